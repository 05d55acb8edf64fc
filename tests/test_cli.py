"""
Tests for L{arvproxy.cli}: the C{arvproxy} admin command, end to end on a real registry file.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Any

from twisted.trial import unittest

import arvproxy
from arvproxy import cli
from arvproxy.backends.registry import RegistryStore
from arvproxy.errors import Unauthorized

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(arvproxy.__file__)))

CONFIG = """\
Clusters:
  zzzzz:
    SystemRootToken: "{token}"
    Services:
      ContainerWebServices:
        ExternalURL: "http://*.containers.localhost:8900"
    ArvProxy:
      Registry: var/registry.sqlite
"""


class CommandTestCase(unittest.TestCase):
    """Runs C{cli.main} in-process with captured output, on a fresh registry."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.registry = os.path.join(self.dir, "registry.sqlite")
        # Nothing from the developer's environment or working directory leaks in.
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != cli.CONFIG_ENV})
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)

    def run_raw(self, *argv: str) -> tuple[int, str, str]:
        """Run the command; return its exit status, stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        try:
            status = cli.main(list(argv))
        finally:
            self.patch(sys, "stdout", sys.__stdout__)
            self.patch(sys, "stderr", sys.__stderr__)
        return status, out.getvalue(), err.getvalue()

    def arvproxy(self, *argv: str) -> Any:
        """Run the command against the test registry; expect success and return its JSON."""
        status, out, err = self.run_raw("--registry", self.registry, "--cluster-id", "zzzzz", *argv)
        self.assertEqual((status, err), (0, ""))
        return json.loads(out)

    def fails(self, status: int, *argv: str) -> str:
        """Run the command against the test registry; expect C{status}, return the error line."""
        got, out, err = self.run_raw("--registry", self.registry, "--cluster-id", "zzzzz", *argv)
        self.assertEqual((got, out), (status, ""))
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("arvproxy: error: "), err)
        return err

    def store(self) -> RegistryStore:
        store = RegistryStore(self.registry, "zzzzz")
        self.addCleanup(store.close)
        return store


class CommandTests(CommandTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.user = self.arvproxy("user", "create", "--name", "Alice Example")

    def test_user_create(self) -> None:
        """user create prints the new user record, active and not an admin unless --admin."""
        self.assertEqual(self.user["kind"], "arvados#user")
        self.assertRegex(self.user["uuid"], r"^zzzzz-tpzed-[a-z0-9]{15}$")
        self.assertEqual(
            (self.user["full_name"], self.user["is_admin"], self.user["is_active"]),
            ("Alice Example", False, True),
        )
        admin = self.arvproxy("user", "create", "--name", "Root", "--admin")
        self.assertTrue(admin["is_admin"])
        users = self.arvproxy("user", "list")
        self.assertEqual([u["uuid"] for u in users], [self.user["uuid"], admin["uuid"]])

    def test_token_create(self) -> None:
        """token create prints the record with the whole token under api_token, and it works."""
        token = self.arvproxy("token", "create", "--user", self.user["uuid"])
        self.assertEqual(token["kind"], "arvados#apiClientAuthorization")
        self.assertEqual(token["api_token"].split("/")[:2], ["v2", token["uuid"]])
        self.assertEqual((token["owner_uuid"], token["scopes"]), (self.user["uuid"], ["all"]))
        self.assertIsNone(token["expires_at"])
        credentials = self.store().authenticate(token["api_token"])
        self.assertEqual(credentials.user_uuid, self.user["uuid"])

    def test_token_create_scopes_and_ttl(self) -> None:
        """--scope repeats, and --ttl sets an expiry."""
        token = self.arvproxy(
            "token", "create", "--user", self.user["uuid"], "--scope", "GET /a", "--scope",
            "GET /b", "--ttl", "3600",
        )  # fmt: skip
        self.assertEqual(token["scopes"], ["GET /a", "GET /b"])
        self.assertIsNotNone(token["expires_at"])

    def test_token_create_plain(self) -> None:
        """token create --plain prints only the token line."""
        status, out, err = self.run_raw(
            "--registry", self.registry, "--cluster-id", "zzzzz",
            "token", "create", "--user", self.user["uuid"], "--plain",
        )  # fmt: skip
        self.assertEqual((status, err), (0, ""))
        self.assertRegex(out, r"^v2/zzzzz-gj3su-[a-z0-9]{15}/[A-Za-z0-9]+\n$")
        self.store().authenticate(out.strip())

    def test_token_revoke(self) -> None:
        """token revoke, by whole token or by uuid, stops the token working."""
        by_token = self.arvproxy("token", "create", "--user", self.user["uuid"])
        by_uuid = self.arvproxy("token", "create", "--user", self.user["uuid"])
        revoked = self.arvproxy("token", "revoke", by_token["api_token"])
        self.assertEqual(revoked["uuid"], by_token["uuid"])
        self.assertNotIn("api_token", revoked)
        self.arvproxy("token", "revoke", by_uuid["uuid"])
        for token in (by_token, by_uuid):
            self.assertRaises(Unauthorized, self.store().authenticate, token["api_token"])
        self.assertIn("no token", self.fails(1, "token", "revoke", by_uuid["uuid"]))

    def test_token_revoke_malformed_keeps_secret(self) -> None:
        """Revoking a malformed token is a usage error that does not print the token."""
        err = self.fails(2, "token", "revoke", "v2/not-a-uuid/sekrit")
        self.assertNotIn("sekrit", err)

    def test_token_list(self) -> None:
        """token list shows a user's tokens without their secrets."""
        token = self.arvproxy("token", "create", "--user", self.user["uuid"])
        listed = self.arvproxy("token", "list", "--user", self.user["uuid"])
        self.assertEqual([t["uuid"] for t in listed], [token["uuid"]])
        self.assertNotIn(token["api_token"].split("/")[2], json.dumps(listed))

    def test_container_request_create(self) -> None:
        """container-request create takes ports and a command after --, and queues a container."""
        request = self.arvproxy(
            "container-request", "create", "--user", self.user["uuid"], "--name", "nb",
            "--image", "python:3", "--port", "8888", "--public-port", "9000",
            "--env", "A=b=c", "--cwd", "/srv",
            "--", "python", "-m", "http.server", "--bind", "0.0.0.0", "8888",
        )  # fmt: skip
        self.assertEqual(request["kind"], "arvados#containerRequest")
        self.assertEqual(
            (request["owner_uuid"], request["name"], request["state"]),
            (self.user["uuid"], "nb", "Committed"),
        )
        self.assertEqual(
            request["command"], ["python", "-m", "http.server", "--bind", "0.0.0.0", "8888"]
        )
        self.assertEqual(request["environment"], {"A": "b=c"})
        self.assertEqual(
            request["published_ports"],
            {
                "8888": {"access": "private", "label": "", "initial_path": ""},
                "9000": {"access": "public", "label": "", "initial_path": ""},
            },
        )
        container = self.arvproxy("get", request["container_uuid"])
        self.assertEqual((container["state"], container["container_image"]), ("Queued", "python:3"))
        self.assertEqual(container["published_ports"], request["published_ports"])
        listed = self.arvproxy("container", "list", "--state", "Queued")
        self.assertEqual([c["uuid"] for c in listed], [request["container_uuid"]])

    def test_permission_grant(self) -> None:
        """permission grant creates a permission link that permission_level honours."""
        other = self.arvproxy("user", "create", "--name", "Bob")
        request = self.arvproxy("container-request", "create", "--user", self.user["uuid"])
        link = self.arvproxy(
            "permission", "grant", "--user", other["uuid"], "--target", request["uuid"],
            "--level", "can_write",
        )  # fmt: skip
        self.assertEqual(
            (link["kind"], link["link_class"], link["name"], link["tail_uuid"], link["head_uuid"]),
            ("arvados#link", "permission", "can_write", other["uuid"], request["uuid"]),
        )
        self.assertEqual(self.store().permission_level(other["uuid"], request["uuid"]), "can_write")
        self.assertEqual(self.arvproxy("get", link["uuid"])["uuid"], link["uuid"])

    def test_get(self) -> None:
        """get prints any record by uuid; an unknown one fails with status 1."""
        self.assertEqual(self.arvproxy("get", self.user["uuid"]), self.user)
        self.assertIn("no user", self.fails(1, "get", "zzzzz-tpzed-000000000000009"))

    def test_failures(self) -> None:
        """Unknown records fail with status 1, and a one-line message on stderr."""
        unknown = "zzzzz-tpzed-000000000000009"
        for argv in [
            ("token", "create", "--user", unknown),
            ("container-request", "create", "--user", unknown),
            ("permission", "grant", "--user", self.user["uuid"], "--target",
             "zzzzz-xvhdp-000000000000009", "--level", "can_read"),
        ]:  # fmt: skip
            with self.subTest(argv=argv):
                self.fails(1, *argv)

    def test_usage_errors(self) -> None:
        """Malformed command lines fail with status 2 and a one-line message."""
        user = self.user["uuid"]
        for argv in [
            (),
            ("user",),
            ("user", "create"),
            ("frobnicate",),
            ("get", "not-a-uuid"),
            ("token", "create", "--user", "zzzzz-xvhdp-000000000000009"),
            ("token", "create", "--user", user, "--ttl", "-5"),
            ("token", "create", "--user", user, "--ttl", "soon"),
            ("container-request", "create", "--user", user, "--port", "0"),
            ("container-request", "create", "--user", user, "--port", "http"),
            ("container-request", "create", "--user", user, "--env", "NOVALUE"),
            ("permission", "grant", "--user", user, "--target", user, "--level", "can_read"),
            ("permission", "grant", "--user", user, "--target", "zzzzz-dz642-000000000000009",
             "--level", "can_fly"),
            ("token", "revoke", "garbage"),
        ]:  # fmt: skip
            with self.subTest(argv=argv):
                self.fails(2, *argv)

    def test_help(self) -> None:
        """--help prints help and exits 0."""
        status, out, _ = self.run_raw("--help")
        self.assertEqual(status, 0)
        self.assertIn("container-request", out)


class ConfigurationTests(CommandTestCase):
    def write_config(self, name: str = "local.yml") -> str:
        path = os.path.join(self.dir, "conf", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(CONFIG.format(token="t" * 40))
        return path

    def config_registry(self) -> str:
        return os.path.join(self.dir, "conf", "var", "registry.sqlite")

    def test_config_option(self) -> None:
        """--config names the file that gives the registry path and cluster id."""
        path = self.write_config("other.yml")
        status, out, err = self.run_raw("--config", path, "user", "create", "--name", "A")
        self.assertEqual((status, err), (0, ""))
        user = json.loads(out)
        self.assertTrue(user["uuid"].startswith("zzzzz-tpzed-"))
        store = RegistryStore(self.config_registry(), "zzzzz")
        self.addCleanup(store.close)
        self.assertEqual(store.get_user(user["uuid"]).full_name, "A")

    def test_config_from_environment(self) -> None:
        """Without --config, $ARVPROXY_CONFIG names the file."""
        os.environ[cli.CONFIG_ENV] = self.write_config("other.yml")
        status, _, err = self.run_raw("user", "create", "--name", "A")
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(os.path.exists(self.config_registry()))

    def test_default_config(self) -> None:
        """Without --config or $ARVPROXY_CONFIG, conf/local.yml in the working directory is used."""
        self.write_config()
        status, _, err = self.run_raw("user", "create", "--name", "A")
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(os.path.exists(self.config_registry()))

    def test_registry_overrides_config(self) -> None:
        """--registry wins over the configured registry file, keeping the cluster id."""
        self.write_config()
        status, _, err = self.run_raw("--registry", self.registry, "user", "create", "--name", "A")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(len(self.store().list_users()), 1)
        self.assertFalse(os.path.exists(self.config_registry()))

    def test_no_configuration(self) -> None:
        """With no configuration at all, the command says how to give one, with status 2."""
        status, out, err = self.run_raw("user", "create", "--name", "A")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("--config", err)

    def test_broken_configuration(self) -> None:
        """An unreadable configuration file fails with status 1 and names the file."""
        missing = os.path.join(self.dir, "missing.yml")
        status, out, err = self.run_raw("--config", missing, "user", "list")
        self.assertEqual((status, out), (1, ""))
        self.assertIn(missing, err)

    def test_bad_cluster_id(self) -> None:
        """A malformed --cluster-id is a usage error."""
        status, _, err = self.run_raw(
            "--registry", self.registry, "--cluster-id", "Z", "user", "list"
        )
        self.assertEqual(status, 2)
        self.assertIn("cluster id", err)

    def test_unusable_registry(self) -> None:
        """A registry path that is not a SQLite database fails with status 1, naming it."""
        with open(self.registry, "w") as f:
            f.write("this is not a database" * 100)
        status, _, err = self.run_raw(
            "--registry", self.registry, "--cluster-id", "zzzzz", "user", "list"
        )
        self.assertEqual(status, 1)
        self.assertIn(self.registry, err)


class ProcessTests(CommandTestCase):
    def run_process(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=SOURCE_ROOT)
        return subprocess.run(
            [sys.executable, "-m", "arvproxy.cli", "--registry", self.registry,
             "--cluster-id", "zzzzz", *argv],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def test_as_a_process(self) -> None:
        """python -m arvproxy.cli works as a separate process sharing the registry file."""
        store = self.store()
        user = store.create_user("A")
        done = self.run_process("token", "create", "--user", user.uuid, "--plain")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(store.authenticate(done.stdout.strip()).user_uuid, user.uuid)
        done = self.run_process("get", "bad")
        self.assertEqual((done.returncode, done.stdout), (2, ""))
        self.assertIn("arvproxy: error:", done.stderr)
