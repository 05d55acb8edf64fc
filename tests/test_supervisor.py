"""
Tests for L{arvproxy.gateway.tap.ContainerSupervisor}: how a gateway keeps its container's
record -- retries of transient failures, a permanent failure, stopping (SIGTERM), handing back
-- in memory, on a fake clock.  The real twistd gateway is in L{tests.test_lifecycle}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from arvproxy import backends, errors
from arvproxy.gateway.server import Gateway
from arvproxy.gateway.tap import ContainerSupervisor
from arvproxy.testing import FakeCluster, FakeRuntime

SECRET = "ab" * 32
ADDRESS = "127.0.0.1:4321"


class FlakyCluster(FakeCluster):
    """A fake cluster whose next calls of a method fail with the errors queued for it."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: dict[str, list[Exception]] = {}

    def _answer(self, name: str, args: tuple[Any, ...], f: Any) -> Any:
        queued = self.failures.get(name)
        if queued:
            self.calls.append((name, args))
            return defer.fail(queued.pop(0))
        return super()._answer(name, args, f)


class HeldRuntime(FakeRuntime):
    """A runtime whose start waits until the test lets it go; it counts stops and detaches."""

    def __init__(self) -> None:
        super().__init__()
        self.starting: defer.Deferred[None] = defer.Deferred()
        self.stops = 0

    def start(self) -> Any:
        return self.starting

    def stop(self) -> Any:
        self.stops += 1
        return super().stop()


class FakeListener:
    """What the supervisor uses of a L{ListeningService}: its port, stopped at most once."""

    def __init__(self) -> None:
        self.port = self
        self.stopped = 0

    def stopListening(self) -> defer.Deferred[None]:
        self.stopped += 1
        return defer.succeed(None)


class SupervisorTests(unittest.TestCase):
    """The record follows the container through transient failures, stops and hand-backs."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.cluster = FlakyCluster()
        self.uuid = self.cluster.add_container(state=backends.LOCKED, gateway_address="").uuid
        self.runtime = HeldRuntime()
        self.gateway = Gateway(self.reactor, self.uuid, SECRET, self.runtime)
        self.supervisor = ContainerSupervisor(
            self.reactor, self.cluster, self.uuid, self.runtime, self.gateway, random=lambda: 0.0
        )
        self.listener = FakeListener()
        self.supervisor.listener = self.listener  # type: ignore[assignment]
        self.supervisor.startService()

    def record(self) -> backends.Container:
        return self.cluster.containers[self.uuid]

    def run_until_running(self) -> defer.Deferred[None]:
        d = self.supervisor.serving(ADDRESS)
        self.runtime.starting.callback(None)
        return d

    def test_transient_failures_at_start(self) -> None:
        """Transient failures at start are retried; the container gets Running, not Cancelled."""
        self.cluster.failures = {
            "get_container": [errors.Unavailable("503", transient=True), ConnectionRefusedError()],
            "update_container": [errors.Unavailable("API 502", transient=True)],
        }
        d = self.supervisor.serving(ADDRESS)
        self.runtime.starting.callback(None)
        for _ in range(10):
            self.reactor.advance(1.0)
        self.successResultOf(d)
        self.assertEqual(self.record().state, backends.RUNNING)
        self.assertEqual(self.record().gateway_address, ADDRESS)
        self.assertEqual(self.cluster.failures, {"get_container": [], "update_container": []})
        self.assertFalse(self.reactor.hasStopped)
        self.supervisor.stopService()

    def test_permanent_failure_cancels(self) -> None:
        """A permanent failure at start cancels the container with the reason, and exits."""
        self.cluster.failures = {"update_container": [ValueError("refused: no such image")]}
        d = self.run_until_running()
        self.successResultOf(d)
        record = self.record()
        self.assertEqual(record.state, backends.CANCELLED)
        self.assertEqual(
            record.runtime_status["error"], "the gateway could not start the container"
        )
        self.assertIn("refused: no such image", record.runtime_status["errorDetail"])
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.successResultOf(self.supervisor.stopService())
        self.assertEqual(self.record().state, backends.CANCELLED)  # not handed back after all

    def test_deadline_passed_cancels(self) -> None:
        """A transient failure that outlasts the deadline cancels the container."""
        supervisor = ContainerSupervisor(
            self.reactor, self.cluster, self.uuid, self.runtime, self.gateway, retry_deadline=30.0
        )
        supervisor.startService()
        self.cluster.failures = {"get_container": [errors.Unavailable("503", transient=True)] * 100}
        d = supervisor.serving(ADDRESS)
        for _ in range(40):
            self.reactor.advance(1.0)
        self.successResultOf(d)
        self.assertEqual(self.record().state, backends.CANCELLED)
        self.assertEqual(self.record().runtime_status["errorDetail"], "503")
        self.flushLoggedErrors(errors.Unavailable)

    def test_stop_while_running(self) -> None:
        """Stopping a Running gateway stops the container and records Cancelled, saying why."""
        self.successResultOf(self.run_until_running())
        self.assertEqual(self.record().state, backends.RUNNING)
        self.successResultOf(self.supervisor.stopService())
        record = self.record()
        self.assertEqual(record.state, backends.CANCELLED)
        self.assertIn("SIGTERM", record.runtime_status["error"])
        self.assertEqual(self.runtime.stops, 1)
        self.assertEqual(self.listener.stopped, 1)
        self.assertFalse(self.gateway.accepting)

    def test_stop_waits_for_transient_failure_of_final_write(self) -> None:
        """The final state is written even through transient failures while stopping."""
        self.successResultOf(self.run_until_running())
        self.cluster.failures = {
            "update_container": [errors.Unavailable("503", transient=True)] * 3
        }
        stopped = self.supervisor.stopService()
        self.assertNoResult(stopped)
        for _ in range(20):
            self.reactor.advance(1.0)
        self.successResultOf(stopped)
        self.assertEqual(self.record().state, backends.CANCELLED)

    def test_stop_before_running_hands_back(self) -> None:
        """Stopped before its container is Running, a gateway hands it back: Queued again."""
        d = self.supervisor.serving(ADDRESS)
        stopped = self.supervisor.stopService()
        self.assertNoResult(stopped)  # the start under way finishes first
        self.runtime.starting.callback(None)
        self.successResultOf(stopped)
        self.successResultOf(d)
        self.assertEqual(self.record().state, backends.QUEUED)
        self.assertEqual(self.runtime.stops, 1)
        self.assertEqual(self.cluster.called("update_container")[-1][1], {"state": "Queued"})

    def test_stop_during_start_retries(self) -> None:
        """A stop while start-up calls are being retried ends the retries and hands back."""
        self.cluster.failures = {"get_container": [errors.Unavailable("503", transient=True)]}
        self.supervisor.serving(ADDRESS)
        self.successResultOf(self.supervisor.stopService())
        self.assertEqual(self.record().state, backends.QUEUED)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_hand_back(self) -> None:
        """Handing back leaves the container running: Running, with no gateway address."""
        self.successResultOf(self.run_until_running())
        self.supervisor.hand_back = True
        self.successResultOf(self.supervisor.stopService())
        record = self.record()
        self.assertEqual((record.state, record.gateway_address), (backends.RUNNING, ""))
        self.assertTrue(self.runtime.detached)
        self.assertEqual(self.runtime.stops, 1)  # FakeRuntime.detach stops watching

    def test_exit_recorded(self) -> None:
        """A container that exits by itself is recorded Complete with its exit code."""
        self.successResultOf(self.run_until_running())
        self.runtime.exited().callback(3)
        record = self.record()
        self.assertEqual((record.state, record.exit_code), (backends.COMPLETE, 3))
        self.assertNotIn("error", record.runtime_status)
        self.assertTrue(self.reactor.hasStopped)
        self.successResultOf(self.supervisor.stopService())
        self.assertEqual(self.listener.stopped, 1)
