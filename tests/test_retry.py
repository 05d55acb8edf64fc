"""
Tests for L{arvproxy.retry}: which failures are transient, how long it waits, and the retrier
on a fake clock.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, reactor, task
from twisted.internet import error as net_error
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseNeverReceived

from arvproxy import errors
from arvproxy.backends.arvados import ArvadosCluster
from arvproxy.backends.embedded import EmbeddedRegistry
from arvproxy.backends.registry import RegistryStore
from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI, self_signed
from arvproxy.retry import (
    DEADLINE,
    MIN_WAIT,
    Retrier,
    RetryingCluster,
    backoff,
    is_transient,
    transient_status,
)

STATUSES = [
    (408, True),
    (429, True),
    (500, True),
    (502, True),
    (503, True),
    (504, True),
    (501, False),
    (400, False),
]
"""API statuses, and whether each is worth another try."""


class TransientTests(unittest.TestCase):
    """What is worth another try, and what is not."""

    def test_statuses(self) -> None:
        """408, 429 and every 5xx but 501 are transient; other 4xx and 501 are not."""
        cases = [*STATUSES, (599, True), (401, False), (403, False), (404, False), (409, False)]
        for status, expected in [*cases, (422, False), (200, False)]:
            self.assertEqual(transient_status(status), expected, status)

    def test_errors(self) -> None:
        """Refused, reset, timed out and a busy database are transient; the rest is not."""
        tls = ResponseNeverReceived([Failure(SSL.Error([("", "", "certificate verify failed")]))])
        cases = [
            ("connection refused", net_error.ConnectionRefusedError(), True),
            ("connect timeout", net_error.TCPTimedOutError(), True),
            ("dns", net_error.DNSLookupError(), True),
            ("connection reset", ConnectionResetError(), True),
            ("connection lost", net_error.ConnectionLost(), True),
            ("deferred timeout", defer.TimeoutError(), True),
            ("no answer", ResponseNeverReceived([Failure(net_error.ConnectionLost())]), True),
            ("database locked", sqlite3.OperationalError("database is locked"), True),
            ("database busy", sqlite3.OperationalError("database table is busy"), True),
            (
                "backend says transient",
                errors.Unavailable("503 from the API", transient=True),
                True,
            ),
            ("untrusted certificate", tls, False),
            ("tls error", SSL.Error([]), False),
            ("backend unavailable for good", errors.Unavailable("wrong root token"), False),
            ("unauthorized", errors.Unauthorized("bad token"), False),
            ("forbidden", errors.Forbidden("no"), False),
            ("not found", errors.NotFound("gone"), False),
            ("refused update", ValueError("its state is final"), False),
            ("corrupt database", sqlite3.DatabaseError("file is not a database"), False),
            ("no such table", sqlite3.OperationalError("no such table: users"), False),
            ("bug", KeyError("x"), False),
        ]
        for name, error, expected in cases:
            self.assertEqual(is_transient(error), expected, name)

    def test_backoff(self) -> None:
        """Waits grow as 1 + (2^n - 1) * jitter seconds, between 1 s and a tenth of the deadline."""
        cases = [
            (1, 0.0, MIN_WAIT),
            (1, 0.5, 1.5),
            (1, 0.999, 1.0 + 0.999),
            (3, 0.5, 1.0 + 7 * 0.5),
            (5, 1.0, 32.0),
            (6, 1.0, DEADLINE / 10),
            (20, 0.0, MIN_WAIT),
            (20, 0.9, DEADLINE / 10),
        ]
        for attempt, jitter, expected in cases:
            self.assertAlmostEqual(backoff(attempt, jitter), expected, msg=(attempt, jitter))
        self.assertEqual(backoff(10, 1.0, deadline=30.0), 3.0)


class Flaky:
    """A call that fails with each of C{failures} in turn, then returns C{"done"}."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


class RetrierTests(unittest.TestCase):
    """The retrier on a fake clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.retrier = Retrier(self.clock, deadline=600.0, random=lambda: 0.5)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level") == LogLevel.warn]

    def test_transient_then_success(self) -> None:
        """Transient failures are tried again after growing waits, each logged once."""
        call = Flaky(
            [
                errors.Unavailable("API 503", transient=True),
                ConnectionRefusedError(),
                errors.Unavailable("x", transient=True),
            ]
        )
        d = defer.Deferred.fromCoroutine(self.retrier.call("update container X", call))
        waits = [1.5, 2.5, 4.5]  # 1 + (2^n - 1) * 0.5
        for n, wait in enumerate(waits, start=1):
            self.assertNoResult(d)
            self.assertEqual(call.calls, n)
            self.clock.advance(wait - 0.01)
            self.assertEqual(call.calls, n)
            self.clock.advance(0.01)
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(call.calls, 4)
        logged = self.warnings()
        self.assertEqual(len(logged), 3)
        self.assertEqual(logged[0]["what"], "update container X")
        self.assertEqual(logged[0]["error"], "API 503")
        self.assertEqual(logged[1]["error"], "ConnectionRefusedError")
        self.assertEqual([e["wait"] for e in logged], waits)

    def test_permanent_at_once(self) -> None:
        """A permanent failure is raised at once, with no retry and no wait."""
        for error in (errors.NotFound("gone"), ValueError("refused"), errors.Unavailable("x")):
            call = Flaky([error])
            d = defer.Deferred.fromCoroutine(self.retrier.call("read container X", call))
            self.assertIs(self.failureResultOf(d).value, error)
            self.assertEqual(call.calls, 1)
        self.assertEqual(self.warnings(), [])

    def test_permanent_after_transient(self) -> None:
        """A permanent failure after transient ones ends the retries with it."""
        call = Flaky([errors.Unavailable("503", transient=True), errors.Forbidden("no")])
        d = defer.Deferred.fromCoroutine(self.retrier.call("x", call))
        self.clock.advance(1.5)
        self.assertIsInstance(self.failureResultOf(d).value, errors.Forbidden)

    def test_deadline(self) -> None:
        """After the deadline (from the first failure) the last transient error is raised."""
        retrier = Retrier(self.clock, deadline=30.0, random=lambda: 0.999)
        call = Flaky([errors.Unavailable(f"503 #{n}", transient=True) for n in range(1000)])
        d = defer.Deferred.fromCoroutine(retrier.call("lock container X", call))
        while not d.called:
            self.clock.advance(0.5)
        self.assertLessEqual(self.clock.seconds(), 30.5)
        failure = self.failureResultOf(d)
        self.assertTrue(failure.value.transient)
        self.assertEqual(failure.value.message, f"503 #{call.calls - 1}")
        self.assertTrue(all(e["wait"] <= 3.0 for e in self.warnings()))  # a tenth of 30 s
        errors_logged = [e for e in self.events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors_logged), 1)
        self.assertIn("Giving up", errors_logged[0]["log_format"])

    def test_stop(self) -> None:
        """Stopping the retrier ends a call waiting to try again with its last error."""
        call = Flaky(
            [
                errors.Unavailable("503", transient=True),
                errors.Unavailable("503 again", transient=True),
            ]
        )
        d = defer.Deferred.fromCoroutine(self.retrier.call("x", call))
        self.assertNoResult(d)
        self.retrier.stop()
        self.assertEqual(self.failureResultOf(d).value.message, "503")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        later = defer.Deferred.fromCoroutine(self.retrier.call("y", Flaky([ConnectionError()])))
        self.assertIsInstance(self.failureResultOf(later).value, ConnectionError)


class FakeBackend:
    """Methods returning Deferreds, failing as told."""

    def __init__(self) -> None:
        self.failures: list[Exception] = []
        self.calls: list[tuple[Any, ...]] = []
        self.name = "backend"

    def update_container(self, uuid: str, **changes: Any) -> defer.Deferred[str]:
        self.calls.append((uuid, changes))
        if self.failures:
            return defer.fail(self.failures.pop(0))
        return defer.succeed(f"updated {uuid}")


class RetryingClusterTests(unittest.TestCase):
    """The cluster wrapper retries every method and hands the rest through."""

    def test_wraps_methods(self) -> None:
        """A method is retried with the same arguments; non-methods are the backend's."""
        clock = task.Clock()
        backend = FakeBackend()
        backend.failures = [errors.Unavailable("busy", transient=True)]
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        cluster = RetryingCluster(backend, Retrier(clock, random=lambda: 0.0))
        d = cluster.update_container("zzzzz-dz642-000000000000000", state="Running")
        self.assertNoResult(d)
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), "updated zzzzz-dz642-000000000000000")
        self.assertEqual(len(backend.calls), 2)
        self.assertEqual(backend.calls[0], backend.calls[1])
        self.assertEqual(cluster.name, "backend")
        [warning] = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(
            warning["what"], "update container zzzzz-dz642-000000000000000 (to Running)"
        )


class BackendClassificationTests(unittest.TestCase):
    """The backends say which of their failures are transient, as the retry rule needs."""

    @defer.inlineCallbacks
    def test_arvados_statuses(self) -> Any:
        """The API server's 408/429/5xx (not 501) and a refused connection are transient."""

        api = FakeArvadosAPI("zzzzz", system_root_token=ROOT_TOKEN)
        uuid = api.add_container("Locked")
        server = FakeAPIServer(reactor, api)
        server.start()
        self.addCleanup(server.stop)
        cluster = ArvadosCluster(reactor, server.url, ROOT_TOKEN, cluster_id="zzzzz", cache_ttl=0)
        cluster.startService()
        self.addCleanup(cluster.stopService)
        for status, transient in STATUSES:
            api.outage = status
            failure = yield self.assertFailure(cluster.get_container(uuid), errors.ProxyError)
            self.assertEqual(is_transient(failure), transient, status)
        api.outage = None
        container = yield cluster.get_container(uuid)
        self.assertEqual(container.state, "Locked")
        wrong = ArvadosCluster(reactor, server.url, "v2/x/" + "y" * 40, cluster_id="zzzzz")
        wrong.startService()
        self.addCleanup(wrong.stopService)
        refused = yield self.assertFailure(wrong.get_container(uuid), errors.Unavailable)
        self.assertFalse(is_transient(refused), "a wrong service token is permanent")
        yield server.stop()
        gone = yield self.assertFailure(cluster.get_container(uuid), errors.Unavailable)
        self.assertTrue(is_transient(gone), "connection refused")

    @defer.inlineCallbacks
    def test_arvados_untrusted_certificate(self) -> Any:
        """An API certificate the gateway does not trust is a permanent failure."""
        api = FakeArvadosAPI("zzzzz", system_root_token=ROOT_TOKEN)
        uuid = api.add_container("Locked")
        options, _ = self_signed()
        server = FakeAPIServer(reactor, api, tls=options)
        server.start()
        self.addCleanup(server.stop)
        cluster = ArvadosCluster(reactor, server.url, ROOT_TOKEN, cluster_id="zzzzz")
        cluster.startService()
        self.addCleanup(cluster.stopService)
        failure = yield self.assertFailure(cluster.get_container(uuid), errors.Unavailable)
        self.assertFalse(is_transient(failure))

    @defer.inlineCallbacks
    def test_embedded_locked_database(self) -> Any:
        """The registry's "database is locked" is transient; a pool that stopped is not."""
        path = self.mktemp()
        store = RegistryStore(path, "zzzzz", busy_timeout=0.05)
        user = store.create_user("Locker")
        request = store.create_container_request(user.uuid, published_ports={"80": {}})
        registry = EmbeddedRegistry(reactor, store, max_threads=1)
        registry.start()
        self.addCleanup(registry.stop)
        blocker = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(blocker.close)
        blocker.execute("BEGIN IMMEDIATE")
        busy = yield self.assertFailure(
            registry.update_container(request.container_uuid, state="Locked"), errors.Unavailable
        )
        self.assertTrue(is_transient(busy))
        self.flushLoggedErrors(sqlite3.OperationalError)
        blocker.execute("ROLLBACK")
        container = yield registry.update_container(request.container_uuid, state="Locked")
        self.assertEqual(container.state, "Locked")
        registry.stop()
        stopped = yield self.assertFailure(registry.get_container("x"), errors.Unavailable)
        self.assertFalse(is_transient(stopped))


ROOT_TOKEN = "RetryTestRootToken000000000000000000000000"
