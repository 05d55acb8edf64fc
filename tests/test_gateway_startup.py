"""
A gateway given bad input by its dispatcher refuses to start with one plain line on standard
error and exit status 1, never a traceback: table-driven, through real C{twistd
crunch-run-gateway} processes.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from tests import e2e

reactor: Any = _reactor


class SeparateStreams(e2e.Twistd):
    """A twistd process whose standard error is kept apart from its standard output."""

    def __init__(self, name: str, log_path: str) -> None:
        super().__init__(name, log_path)
        self.stderr = bytearray()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        self.output += data


def env_json(**env: Any) -> bytes:
    return json.dumps({"Env": env}).encode() + b"\n"


class StdinErrorTests(unittest.TestCase):
    """Each kind of bad dispatcher JSON, and a taken address, gets one plain line and exit 1."""

    timeout = 120

    def test_bad_dispatch_input(self) -> defer.Deferred[None]:
        """Bad secrets, bad JSON, bad addresses: one line on stderr naming it, exit status 1."""
        return defer.ensureDeferred(self._bad_input())

    async def _bad_input(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cluster = e2e.make_cluster(directory, 1)
        self.addCleanup(cluster.store.close)
        config = e2e.write_config(directory, e2e.free_port())
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        good = cluster.secret
        not_hex = "z" * 64
        cases: list[tuple[str, bytes, str]] = [
            ("not hex", env_json(GatewayAddress="127.0.0.1:0", GatewayAuthSecret=not_hex), "hex"),
            (
                "upper-case hex",
                env_json(GatewayAddress="127.0.0.1:0", GatewayAuthSecret=good.upper()),
                "Env.GatewayAuthSecret",
            ),
            (
                "too long",
                env_json(GatewayAddress="127.0.0.1:0", GatewayAuthSecret=good + "00"),
                "Env.GatewayAuthSecret",
            ),
            ("nested", b"[" * 200_000 + b"\n", "nested too deeply"),
            ("nested object", b'{"Env": ' + b'{"a": ' * 100_000 + b"\n", "nested too deeply"),
            ("not json", b"hello there\n", "not valid JSON"),
            ("empty", b"", "expected the dispatcher's JSON"),
            ("not utf-8", b'{"Env": {"GatewayAddress": "\xff\xfe"}}\n', "not UTF-8"),
            ("too large", b" " * (1024 * 1024 + 10) + b"{}\n", "larger than"),
            ("no env", b'{"env": {}}\n', '"Env"'),
            ("env not object", b'{"Env": 5}\n', '"Env"'),
            ("array", b"[1, 2]\n", '"Env"'),
            (
                "port out of range",
                env_json(GatewayAddress="127.0.0.1:99999", GatewayAuthSecret=good),
                "Env.GatewayAddress",
            ),
            (
                "address not a string",
                env_json(GatewayAddress=["127.0.0.1", 0], GatewayAuthSecret=good),
                "Env.GatewayAddress",
            ),
            (
                "secret not a string",
                env_json(GatewayAddress="127.0.0.1:0", GatewayAuthSecret=12345),
                "Env.GatewayAuthSecret",
            ),
            (
                "api host garbage",
                env_json(
                    GatewayAddress="127.0.0.1:0",
                    GatewayAuthSecret=good,
                    ARVADOS_API_HOST="ftp://x/?y",
                    ARVADOS_API_TOKEN="t" * 40,
                ),
                "Env.ARVADOS_API_HOST",
            ),
            (
                "api token missing",
                env_json(
                    GatewayAddress="127.0.0.1:0",
                    GatewayAuthSecret=good,
                    ARVADOS_API_HOST="127.0.0.1:1",
                ),
                "Env.ARVADOS_API_TOKEN",
            ),
            (
                "address in use",
                env_json(
                    GatewayAddress=f"127.0.0.1:{taken.getsockname()[1]}", GatewayAuthSecret=good
                ),
                "address already in use",
            ),
        ]
        processes = []
        for name, stdin, _ in cases:
            process = SeparateStreams.spawn(
                reactor,
                directory,
                name.replace(" ", "-"),
                [
                    "crunch-run-gateway",
                    "--config",
                    config,
                    "--container-uuid",
                    cluster.container_uuid,
                ],
                stdin=stdin,
            )
            self.addCleanup(process.stop, reactor)
            processes.append(process)
        codes = await defer.gatherResults([p.ended for p in processes])
        for (name, _, expected), process, code in zip(cases, processes, codes, strict=True):
            stderr = process.stderr.decode(errors="replace")
            lines = [line for line in stderr.splitlines() if line.strip()]
            self.assertEqual(code, 1, f"{name}\n{process.describe()}")
            self.assertEqual(len(lines), 1, f"{name}: {stderr!r}")
            self.assertIn(expected.lower(), lines[0].lower(), name)
            self.assertIn("error", lines[0], name)
            everything = process.output.decode(errors="replace") + process.log_text()
            self.assertNotIn("Traceback", everything, name)
            self.assertNotIn(good, everything, name)
            self.assertNotIn(not_hex, everything, name)
        # Nothing was recorded for a gateway that never started.
        container = cluster.store.get_container(cluster.container_uuid)
        self.assertEqual(container.state, "Queued")


class OneAtATimeTests(unittest.TestCase):
    """One gateway per container and one dispatcher per registry: the second says so, exits 1."""

    timeout = 120

    def test_second_gateway_and_dispatcher(self) -> defer.Deferred[None]:
        """A second gateway or dispatcher is refused in one line; the first keeps running."""
        return defer.ensureDeferred(self._second())

    async def _second(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cluster = e2e.make_cluster(directory, 1)
        self.addCleanup(cluster.store.close)
        config = e2e.write_config(directory, e2e.free_port())
        first = e2e.start_gateway(reactor, self, directory, config, cluster)
        await e2e.wait_for(reactor, cluster.gateway_address, "the first gateway", [first])
        address = cluster.gateway_address()
        dispatcher_args = ["arv-local-dispatcher", "--config", config, "--runtime", "host"]
        dispatcher = e2e.Twistd.spawn(reactor, directory, "dispatcher", dispatcher_args)
        self.addCleanup(dispatcher.stop, reactor)
        await e2e.wait_for(
            reactor,
            # It finds the container Running, served by a gateway that is not its own.
            lambda: "a gateway still serves it" in dispatcher.log_text(),
            "the dispatcher to leave the first gateway alone",
            [dispatcher],
        )
        second = SeparateStreams.spawn(
            reactor,
            directory,
            "second-gateway",
            ["crunch-run-gateway", "--config", config, "--container-uuid", cluster.container_uuid],
            stdin=e2e.dispatch_json(cluster.secret),
        )
        self.addCleanup(second.stop, reactor)
        other = SeparateStreams.spawn(reactor, directory, "second-dispatcher", dispatcher_args)
        self.addCleanup(other.stop, reactor)
        for process, expected in [
            (second, "another gateway already serves container"),
            (other, "another dispatcher runs here"),
        ]:
            code = await process.ended
            lines = process.stderr.decode().strip().splitlines()
            self.assertEqual(code, 1, process.describe())
            self.assertEqual(len(lines), 1, lines)
            self.assertIn(expected, lines[0])
            self.assertNotIn("Traceback", process.output.decode() + process.log_text())
        self.assertTrue(first.running and dispatcher.running)
        self.assertEqual(cluster.gateway_address(), address)
