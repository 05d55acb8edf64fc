"""
A container's life through real C{twistd crunch-run-gateway} processes: transient API errors at
start-up, SIGTERM, handing a container back.  The gateway talks to the embedded registry or to
the fake Arvados API server over HTTPS (as Arvados' dispatchers start crunch-run: C{host:port}
in C{ARVADOS_API_HOST}, with C{ARVADOS_API_HOST_INSECURE} for its self-signed certificate).
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.resource import Resource

from arvproxy import backends, policy
from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI, self_signed
from tests import e2e

reactor: Any = _reactor


class FirstCallsFail(Resource):
    """
    The fake API server, except that its first C{count} calls (of C{methods}, or any) get
    C{status} (with the API's JSON error body), as a busy or restarting API server answers, or
    one that refuses an update.
    """

    isLeaf = True

    def __init__(
        self,
        api: FakeArvadosAPI,
        count: int,
        status: int = 503,
        methods: frozenset[bytes] | None = None,
    ) -> None:
        super().__init__()
        self.api = api
        self.remaining = count
        self.status = status
        self.methods = methods
        self.failed: list[str] = []

    def render(self, request: Any) -> Any:
        if self.remaining > 0 and (self.methods is None or request.method in self.methods):
            self.remaining -= 1
            self.failed.append(f"{request.method.decode()} {request.path.decode()}")
            request.setResponseCode(self.status)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"errors": [f"status {self.status} from the test"]}).encode()
        return self.api.render(request)


class ArvadosGateway:
    """A fake Arvados API server over HTTPS, with one Locked container and its request."""

    def __init__(self, testcase: unittest.TestCase, failing: int = 0, **failure: Any) -> None:
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self.api = FakeArvadosAPI(e2e.CLUSTER_ID, system_root_token=e2e.ROOT_TOKEN)
        user = self.api.add_user("Lifecycle Tester")
        self.uuid = self.api.add_container("Locked")
        self.api.add_container_request(user, container_uuid=self.uuid)
        self.front = FirstCallsFail(self.api, failing, **failure)
        options, _ = self_signed()
        self.server = FakeAPIServer(reactor, self.front, tls=options)  # type: ignore[arg-type]
        self.server.start()
        testcase.addCleanup(self.server.stop)
        # A short retry deadline keeps the waits short: at most a tenth of it each (2 s).
        self.config = e2e.write_config(
            self.directory, e2e.free_port(), Timeouts={"ClusterRetry": "20s"}
        )

    def spawn(self, testcase: unittest.TestCase) -> e2e.Twistd:
        env = json.loads(e2e.dispatch_json(policy.gateway_secret(e2e.ROOT_TOKEN, self.uuid)))
        env["Env"].update(
            {
                "ARVADOS_API_HOST": f"127.0.0.1:{self.server.port}",
                "ARVADOS_API_HOST_INSECURE": "1",
                # The dispatcher's own token (an admin's, as Arvados' dispatchers run with).
                "ARVADOS_API_TOKEN": e2e.ROOT_TOKEN,
            }
        )
        gateway = e2e.Twistd.spawn(
            reactor,
            self.directory,
            "gateway",
            ["crunch-run-gateway", "--config", self.config, "--container-uuid", self.uuid],
            stdin=json.dumps(env).encode() + b"\n",
        )
        testcase.addCleanup(gateway.stop, reactor)
        return gateway

    def record(self) -> dict[str, Any]:
        return dict(self.api.containers[self.uuid])

    async def until_running(self, gateway: e2e.Twistd) -> None:
        await e2e.wait_for(
            reactor,
            lambda: self.record()["state"] == "Running" and self.record()["gateway_address"],
            "the container to be Running",
            [gateway],
            timeout=60,
        )


def run(coroutine: Any) -> defer.Deferred[Any]:
    return defer.ensureDeferred(coroutine)


class TransientErrorTests(unittest.TestCase):
    """A gateway rides out an API server that fails for a moment."""

    timeout = 120

    def test_first_calls_get_503(self) -> defer.Deferred[None]:
        """A gateway whose first three API calls get 503 still brings its container to Running."""
        return run(self._first_calls())

    async def _first_calls(self) -> None:
        cluster = ArvadosGateway(self, failing=3)
        gateway = cluster.spawn(self)
        await cluster.until_running(gateway)
        self.assertEqual(cluster.front.remaining, 0)
        self.assertEqual(len(cluster.front.failed), 3)
        self.assertTrue(gateway.running)
        log = gateway.log_text()
        self.assertIn("trying again in", log)
        self.assertNotIn("Traceback", log)
        code = await gateway.stop(reactor)
        self.assertEqual(code, -signal.SIGTERM, gateway.describe())  # twistd passes it on


class PermanentErrorTests(unittest.TestCase):
    """A permanent refusal ends the container at once, saying why, as crunch-run does."""

    timeout = 120

    def test_refused_update_cancels(self) -> defer.Deferred[None]:
        """An API server that refuses Running (422) gets the container Cancelled with why."""
        return run(self._refused())

    async def _refused(self) -> None:
        # The first update (to Running) is refused, as an API server refuses a change.
        cluster = ArvadosGateway(self, 1, status=422, methods=frozenset({b"PUT", b"PATCH"}))
        gateway = cluster.spawn(self)
        code = await gateway.ended
        self.assertEqual(code, 1, gateway.describe())
        record = cluster.record()
        self.assertEqual(record["state"], "Cancelled")
        status = record["runtime_status"]
        self.assertEqual(status["error"], "the gateway could not start the container")
        self.assertIn("status 422 from the test", status["errorDetail"])
        self.assertNotIn("trying again", gateway.log_text())  # no retry of a refusal
        self.assertEqual(len(cluster.front.failed), 1)
        puts = [c for c in cluster.api.calls if c.method in ("PUT", "PATCH")]
        self.assertEqual(len(puts), 1)  # after the refused one: Cancelled


class SigtermTests(unittest.TestCase):
    """SIGTERM ends the container in a final state, never Running with a dead address."""

    timeout = 120

    def test_sigterm_arvados(self) -> defer.Deferred[None]:
        """A gateway on the Arvados API stopped with SIGTERM records Cancelled, then exits."""
        return run(self._sigterm_arvados())

    async def _sigterm_arvados(self) -> None:
        cluster = ArvadosGateway(self)
        gateway = cluster.spawn(self)
        await cluster.until_running(gateway)
        address = cluster.record()["gateway_address"]
        self.assertTrue(e2e.accepting(int(address.rsplit(":", 1)[1])))
        code = await gateway.stop(reactor, "TERM")
        self.assertEqual(code, -signal.SIGTERM, gateway.describe())  # twistd passes it on
        record = cluster.record()
        self.assertEqual(record["state"], "Cancelled", gateway.describe())
        self.assertIn("SIGTERM", record["runtime_status"].get("error", ""))
        self.assertFalse(e2e.accepting(int(address.rsplit(":", 1)[1])))
        self.assertNotIn("Traceback", gateway.log_text())

    def test_sigterm_registry(self) -> defer.Deferred[None]:
        """A gateway on the embedded registry stopped with SIGTERM records Cancelled."""
        return run(self._sigterm_registry())

    async def _sigterm_registry(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cluster = e2e.make_cluster(directory, 8080)
        self.addCleanup(cluster.store.close)
        config = e2e.write_config(directory, e2e.free_port())
        gateway = e2e.start_gateway(reactor, self, directory, config, cluster)
        await e2e.wait_for(reactor, cluster.gateway_address, "the gateway", [gateway])
        code = await gateway.stop(reactor, "TERM")
        self.assertEqual(code, -signal.SIGTERM, gateway.describe())  # twistd passes it on
        record = cluster.store.get_container(cluster.container_uuid)
        self.assertEqual(record.state, backends.CANCELLED)
        self.assertIn("SIGTERM", record.runtime_status.get("error", ""))
        log = gateway.log_text()
        self.assertNotIn("Traceback", log)
        self.assertEqual(log.count("Port None Closed"), 0, log)

    def test_sigusr2_hands_back(self) -> defer.Deferred[None]:
        """SIGUSR2 stops a gateway handing its container back: Running, no gateway address."""
        return run(self._hand_back())

    async def _hand_back(self) -> None:
        cluster = ArvadosGateway(self)
        gateway = cluster.spawn(self)
        await cluster.until_running(gateway)
        code = await gateway.stop(reactor, signal.SIGUSR2)  # type: ignore[arg-type]
        self.assertEqual(code, 0, gateway.describe())
        record = cluster.record()
        self.assertEqual((record["state"], record["gateway_address"]), ("Running", ""))
