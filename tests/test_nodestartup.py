"""
C{twistd arv-node-dispatcher} refuses to start on a configuration it cannot work with, naming the
key, with exit status 1 and no traceback: table-driven, through real twistd processes (with the
host runtime, so no Docker engine is needed), against the fake Arvados API over TLS.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI, self_signed
from arvproxy.nodeapi import DISPATCHER_SCOPES
from tests import e2e

reactor: Any = _reactor
AT = "Clusters.zzzzz"


class StartupTests(unittest.TestCase):
    """Each mistake stops the node dispatcher at start with one line naming it."""

    timeout = 120

    def setUp(self) -> None:
        self.fake = FakeArvadosAPI("zzzzz", e2e.ROOT_TOKEN)
        self.server = FakeAPIServer(reactor, self.fake, tls=self_signed()[0])
        self.server.start()
        self.addCleanup(self.server.stop)
        admin = self.fake.add_user("Dispatchers", is_admin=True)
        self.token = self.fake.add_token(admin, scopes=DISPATCHER_SCOPES)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.token_file = self.write("token", self.token)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def config(self, name: str, node: Any = None, url: str = "", backend: str = "arvados") -> str:
        if node is None:
            node = {"TokenFile": self.token_file, "GatewayAddress": "127.0.0.1:0"}
        own: dict[str, Any] = {"Backend": backend, "ContainerLogs": {"Directory": name + "-logs"}}
        if node != "absent":
            own["NodeDispatcher"] = node
        document = {
            "Clusters": {
                "zzzzz": {
                    "SystemRootToken": e2e.ROOT_TOKEN,
                    "Services": {
                        "ContainerWebServices": {"ExternalURL": f"http://*.{e2e.SUFFIX}:8900"},
                        "Controller": {"ExternalURL": url or self.server.url},
                    },
                    "TLS": {"Insecure": True},
                    "ArvProxy": own,
                }
            }
        }
        return self.write(name + ".yml", yaml.safe_dump(document))

    def test_mistakes(self) -> defer.Deferred[None]:
        """Wrong backend, http API, no section, no token, no address, a refused token."""
        return defer.ensureDeferred(self._mistakes())

    async def _mistakes(self) -> None:
        refused = self.write("refused", "v2/zzzzz-gj3su-000000000000077/notatoken")
        cases = [
            ("embedded", {"backend": "embedded"}, [], f"{AT}.ArvProxy.Backend"),
            (
                "http",
                {"url": self.server.url.replace("https", "http")},
                [],
                f"{AT}.Services.Controller.ExternalURL",
            ),
            ("absent", {"node": "absent"}, [], f"{AT}.ArvProxy.NodeDispatcher: missing"),
            (
                "no-token",
                {"node": {"GatewayAddress": "127.0.0.1:0"}},
                [],
                "NodeDispatcher.TokenFile: missing",
            ),
            (
                "no-address",
                {"node": {"TokenFile": self.token_file}},
                [],
                "NodeDispatcher.GatewayAddress: missing",
            ),
            ("bad-option", {}, ["--gateway-address", "0.0.0.0:0"], "--gateway-address"),
            (
                "refused",
                {"node": {"TokenFile": refused, "GatewayAddress": "127.0.0.1:0"}},
                [],
                "does not accept this node dispatcher's token",
            ),
        ]
        for name, settings, extra, message in cases:
            config = self.config(name, **settings)
            process = e2e.Twistd.spawn(
                reactor,
                self.directory,
                name,
                ["arv-node-dispatcher", "--config", config, "--runtime", "host", *extra],
            )
            self.addCleanup(process.stop, reactor)
            code = await process.ended
            said = process.output.decode() + process.log_text()
            self.assertEqual(code, 1, f"{name}\n{said}")
            self.assertIn(message, said, name)
            self.assertNotIn("Traceback", said, name)
            self.assertNotIn("notatoken", said, name)
            self.assertNotIn(self.token.split("/")[2], said, name)

    def test_one_per_node(self) -> defer.Deferred[None]:
        """A second node dispatcher on the same node says so and exits 1; the first runs on."""
        return defer.ensureDeferred(self._one_per_node())

    async def _one_per_node(self) -> None:
        config = self.config("node")
        args = ["arv-node-dispatcher", "--config", config, "--runtime", "host"]
        first = e2e.Twistd.spawn(reactor, self.directory, "first", args)
        self.addCleanup(first.stop, reactor)
        await e2e.wait_for(
            reactor,
            lambda: "Node dispatcher with token" in first.log_text(),
            "the first node dispatcher",
            [first],
        )
        second = e2e.Twistd.spawn(reactor, self.directory, "second", args)
        self.addCleanup(second.stop, reactor)
        self.assertEqual(await second.ended, 1)
        self.assertIn("another dispatcher runs on this node", second.output.decode())
        self.assertTrue(first.running)
