"""
Tests for C{arvproxy node} (L{arvproxy.clinode}): the command run as a process against the fake
Arvados API over TLS, which follows the API server's lock rules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import yaml
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from arvproxy import backends
from arvproxy.clinode import release_reason
from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI, self_signed
from arvproxy.nodeapi import DISPATCHER_SCOPES, DispatchAPI
from tests.e2e import REPO_ROOT

ROOT = "NodeCommandTestRootToken00000000000000000000"
PORTS = {"8080": {"access": "private"}}


class NodeCommandTests(unittest.TestCase):
    """C{arvproxy node status} and C{release} with a node's own token."""

    def setUp(self) -> None:
        self.fake = FakeArvadosAPI("zzzzz", ROOT)
        self.server = FakeAPIServer(reactor, self.fake, tls=self_signed()[0])
        self.server.start()
        self.addCleanup(self.server.stop)
        alice = self.fake.add_user("Alice")
        self.project = self.fake.add_project(alice)
        admin = self.fake.add_user("Dispatchers", is_admin=True)
        self.gone = self.fake.add_token(admin, scopes=DISPATCHER_SCOPES)
        self.alive = self.fake.add_token(admin, scopes=DISPATCHER_SCOPES)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "gone-token"), "w") as f:
            f.write(self.gone + "\n")

    def config(self, backend: str = "arvados", **node: Any) -> str:
        document = {
            "Clusters": {
                "zzzzz": {
                    "SystemRootToken": ROOT,
                    "Services": {
                        "ContainerWebServices": {"ExternalURL": "https://*.containers.example"},
                        "Controller": {"ExternalURL": self.server.url},
                    },
                    "TLS": {"Insecure": True},
                    "ArvProxy": {
                        "Backend": backend,
                        "NodeDispatcher": {"TokenFile": "gone-token", **node},
                    },
                }
            }
        }
        path = os.path.join(self.directory, f"{backend}.yml")
        with open(path, "w") as f:
            yaml.safe_dump(document, f)
        return path

    def queue(self) -> str:
        uuid = self.fake.add_container(published_ports=PORTS)
        self.fake.add_container_request(self.project, uuid, published_ports=PORTS)
        return uuid

    async def hold(self, token: str, uuid: str, running: bool) -> None:
        api = DispatchAPI(
            reactor,
            self.server.url,
            token,
            cluster_id="zzzzz",
            service_token_is_root=False,
            insecure=True,
        )
        api.startService()
        try:
            await api.lock(uuid)
            if running:
                await api.update_container(
                    uuid, state=backends.RUNNING, gateway_address="10.0.0.9:7000"
                )
        finally:
            await api.stopService()

    def arvproxy(self, *argv: str) -> defer.Deferred[subprocess.CompletedProcess[str]]:
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        env.pop("ARVPROXY_CONFIG", None)
        return deferToThread(
            subprocess.run,
            [sys.executable, "-m", "arvproxy.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    def test_status_and_release(self) -> defer.Deferred[None]:
        """Release unlocks the gone node's Locked containers and cancels its Running ones."""
        return defer.ensureDeferred(self._status_and_release())

    async def _status_and_release(self) -> None:
        locked, running, elsewhere = self.queue(), self.queue(), self.queue()
        await self.hold(self.gone, locked, running=False)
        await self.hold(self.gone, running, running=True)
        await self.hold(self.alive, elsewhere, running=True)
        config = self.config()
        gone_uuid = self.gone.split("/")[1]

        shown = await self.arvproxy("--config", config, "node", "status")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        status = json.loads(shown.stdout)
        self.assertEqual(status["token_uuid"], gone_uuid)
        self.assertEqual(
            sorted((c["uuid"], c["state"]) for c in status["containers"]),
            sorted([(locked, "Locked"), (running, "Running")]),
        )
        self.assertEqual(self.fake.containers[locked]["state"], "Locked")  # status only reads

        done = await self.arvproxy("--config", config, "node", "release")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(
            sorted((r["uuid"], r["was"], r["now"]) for r in json.loads(done.stdout)["released"]),
            sorted([(locked, "Locked", "Queued"), (running, "Running", "Cancelled")]),
        )
        self.assertEqual(self.fake.containers[locked]["locked_by_uuid"], None)
        record = self.fake.containers[running]
        self.assertEqual(record["runtime_status"]["error"], release_reason(gone_uuid))
        # Arvados gives the request a new container, for another node to run.
        [request] = [
            cr for cr in self.fake.container_requests.values() if cr["container_count"] == 2
        ]
        self.assertEqual(self.fake.containers[request["container_uuid"]]["state"], "Queued")
        # The other node's container is not touched.
        self.assertEqual(self.fake.containers[elsewhere]["state"], "Running")
        self.assertEqual(
            self.fake.containers[elsewhere]["locked_by_uuid"], self.alive.split("/")[1]
        )

        again = await self.arvproxy("--config", config, "node", "release")
        self.assertEqual(json.loads(again.stdout)["released"], [])

    def test_other_token_file(self) -> defer.Deferred[None]:
        """--token-file names the gone node's token when the config names another."""
        return defer.ensureDeferred(self._other_token_file())

    async def _other_token_file(self) -> None:
        uuid = self.queue()
        await self.hold(self.gone, uuid, running=False)
        alive_file = os.path.join(self.directory, "alive-token")
        with open(alive_file, "w") as f:
            f.write(self.alive)
        config = self.config()
        gone_file = os.path.join(self.directory, "gone-token")
        os.rename(gone_file, gone_file + ".elsewhere")
        done = await self.arvproxy(
            "--config", config, "node", "release", "--token-file", gone_file + ".elsewhere"
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.fake.containers[uuid]["state"], "Queued")

    def test_mistakes(self) -> defer.Deferred[None]:
        """A refused token, an embedded config or no token: status 1, one line, no secret."""
        return defer.ensureDeferred(self._mistakes())

    async def _mistakes(self) -> None:
        wrong = os.path.join(self.directory, "wrong-token")
        with open(wrong, "w") as f:
            f.write("v2/zzzzz-gj3su-000000000000099/secretsecret")
        cases = [
            (("--config", self.config(), "node", "status", "--token-file", wrong), "401"),
            (("--config", self.config(backend="embedded"), "node", "status"), "arvados backend"),
            (("--config", self.config(TokenFile="nowhere"), "node", "status"), "TokenFile"),
            (("node", "status"), "no configuration"),
        ]
        for argv, message in cases:
            result = await self.arvproxy(*argv)
            self.assertIn(result.returncode, (1, 2), argv)
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
            self.assertIn(message, result.stderr, argv)
            self.assertNotIn("secretsecret", result.stderr)
            self.assertNotIn(self.gone.split("/")[2], result.stderr)
