"""
Tests for C{arvproxy run}, C{ls} and C{cancel} (L{arvproxy.clirun}), against a real registry file;
the dispatcher's part is played by the test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any

from twisted.trial import unittest

from arvproxy import backends, clirun, policy
from arvproxy.backends.registry import RegistryStore
from arvproxy.cli import main, published_ports

CONFIG = """
Clusters:
  zzzzz:
    SystemRootToken: "CliRunTestRootToken000000000000000000000000"
    Services:
      ContainerWebServices:
        ExternalURL: "http://*.containers.localhost:8900"
        InternalURLs:
          "http://127.0.0.1:8900": {}
    ArvProxy:
      Registry: registry.sqlite
"""


class CliRunTests(unittest.TestCase):
    """The person-facing commands."""

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.config = os.path.join(directory, "config.yml")
        with open(self.config, "w") as f:
            f.write(CONFIG)
        self.store = RegistryStore(os.path.join(directory, "registry.sqlite"), "zzzzz")
        self.addCleanup(self.store.close)
        self.patch(clirun, "engine_problem", lambda: None)

    def test_run_published_port_options(self) -> None:
        """run takes the same port options as container-request create: access, label, path."""
        from arvproxy.cli import build_parser

        args = build_parser().parse_args(
            [
                "run",
                "--port",
                "8888",
                "--port-label",
                "8888=Jupyter",
                "--initial-path",
                "8888=/lab",
                "--public-port",
                "9000",
                "--https-port",
                "8888",
                "img",
            ]
        )
        self.assertEqual(
            published_ports(args),
            {
                "8888": {
                    "access": "private",
                    "label": "Jupyter",
                    "initial_path": "/lab",
                    "protocol": "https",
                },
                "9000": {"access": "public"},
            },
        )

    def args(self, **fields: Any) -> argparse.Namespace:
        defaults = {
            "config": self.config,
            "cluster_id": None,
            "user": None,
            "port": [8080],
            "public_port": [],
            "https_port": [],
            "port_label": [],
            "initial_path": [],
            "env": [],
            "cwd": "",
            "name": "",
            "timeout": 5.0,
            "image": "arvproxy-test/busybox:1",
            "command": ["--", "httpd", "-f"],
            "json": False,
        }
        defaults.update(fields)
        return argparse.Namespace(**defaults)

    def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = main(["--config", self.config, *argv])
        return status, out.getvalue(), err.getvalue()

    def dispatch(self, state: str = backends.RUNNING, **changes: Any) -> Any:
        """A sleep() that plays dispatcher and gateway: the queued container moves to C{state}."""

        def sleep(seconds: float) -> None:
            for container in self.store.list_containers(backends.QUEUED):
                self.store.lock_container(container.uuid)
                if state == backends.RUNNING:
                    changes.setdefault("gateway_address", "127.0.0.1:4444")
                self.store.update_container(container.uuid, state=state, **changes)

        return sleep

    def test_no_engine(self) -> None:
        """Without a Docker engine, run says so with the fix, exits 1 and queues nothing."""
        self.patch(
            clirun, "engine_problem", lambda: "no Docker engine answers (run scripts/ensure-docker)"
        )
        status, out, err = self.cli("run", "--port", "8080", "img")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("scripts/ensure-docker", err)
        self.assertEqual(self.store.list_containers(), [])

    def test_run_prints_urls(self) -> None:
        """run waits for Running and prints each port's URL with a token scoped to it."""
        output = clirun.run_container(
            self.store, self.args(port=[8080, 9000]), sleep=self.dispatch(), clock=lambda: 0.0
        )
        [request] = self.store.list_container_requests()
        self.assertEqual(request.command, ("httpd", "-f"))
        self.assertEqual(sorted(request.published_ports), ["8080", "9000"])
        urls = [line.split()[-1] for line in output.splitlines() if line.startswith("  port")]
        prefix = f"http://{request.uuid}-8080.containers.localhost:8900/?arvados_api_token="
        self.assertTrue(urls[0].startswith(prefix), urls)
        token = urls[0][len(prefix) :]
        self.assertEqual(urls[1].split("=", 1)[1], token)
        credentials = self.store.authenticate(token)
        self.assertEqual(
            set(credentials.scopes),
            {policy.connect_scope(request.uuid, 8080), policy.connect_scope(request.uuid, 9000)},
        )
        self.assertIn(f"arvproxy cancel {request.uuid}", output)

    def test_run_fails(self) -> None:
        """A container that ends before Running makes run fail with its reason."""
        sleep = self.dispatch(backends.CANCELLED, runtime_status={"error": "image not found"})
        e = self.assertRaises(
            clirun.CommandFailed,
            clirun.run_container,
            self.store,
            self.args(),
            sleep=sleep,
            clock=lambda: 0.0,
        )
        self.assertIn("image not found", str(e))

    def test_run_no_dispatcher(self) -> None:
        """A container nobody dispatches makes run give up, naming the dispatcher."""
        now = [0.0]

        def sleep(seconds: float) -> None:
            now[0] += seconds

        err = io.StringIO()
        self.patch(sys, "stderr", err)
        e = self.assertRaises(
            clirun.CommandFailed,
            clirun.run_container,
            self.store,
            self.args(timeout=20.0),
            sleep=sleep,
            clock=lambda: now[0],
        )
        self.assertIn("arv-local-dispatcher", str(e))
        self.assertIn("make run", err.getvalue())  # said once while waiting, too

    def test_ls(self) -> None:
        """ls lists the caller's containers with state, image, ports and URLs."""
        clirun.run_container(self.store, self.args(), sleep=self.dispatch(), clock=lambda: 0.0)
        [container] = self.store.list_containers()
        self.store.update_container(container.uuid, listening_ports=[8080])
        other = self.store.create_user("Someone else")
        self.store.create_container_request(other.uuid, container_image="theirs")
        status, out, _ = self.cli("ls", "--json")
        self.assertEqual(status, 0)
        [row] = json.loads(out)
        self.assertEqual(
            (row["state"], row["image"], row["listening_ports"], list(row["urls"])),
            ("Running", "arvproxy-test/busybox:1", [8080], ["8080"]),
        )
        status, out, _ = self.cli("ls")
        self.assertIn("listening: 8080", out)
        self.assertIn(row["urls"]["8080"], out)

    def test_cancel(self) -> None:
        """cancel (by request UUID) cancels the container; cancelling again says it finished."""
        clirun.run_container(self.store, self.args(), sleep=self.dispatch(), clock=lambda: 0.0)
        [request] = self.store.list_container_requests()
        status, out, _ = self.cli("cancel", request.uuid)
        self.assertEqual((status, json.loads(out)["state"]), (0, "Cancelled"))
        status, _, err = self.cli("cancel", request.uuid)
        self.assertEqual(status, 1)
        self.assertIn("already finished", err)
