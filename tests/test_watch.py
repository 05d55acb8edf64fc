"""
Tests for L{arvproxy.gateway.watch}: port sync, cancellation seen in the record, draining.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from arvproxy import backends
from arvproxy.gateway.watch import ContainerWatch, drain
from arvproxy.testing import FakeCluster, FakeRuntime


class ContainerWatchTests(unittest.TestCase):
    """L{ContainerWatch} keeps the record's listening ports current and notices cancellation."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.cluster = FakeCluster()
        self.container = self.cluster.add_container(state=backends.RUNNING)
        self.runtime = FakeRuntime()
        self.watch = ContainerWatch(
            self.clock, self.cluster, self.container.uuid, self.runtime, interval=3.0
        )

    def writes(self) -> list[Any]:
        return [args for args in self.cluster.called("update_container")]

    def test_sync_only_changes(self) -> None:
        """Ports are written at start and whenever they change, never when they stay the same."""
        self.watch.start()
        self.runtime.ports = [8080]
        self.clock.advance(3.0)
        self.clock.advance(3.0)
        self.runtime.ports = [8080, 9000]
        self.clock.advance(3.0)
        self.assertEqual(len(self.writes()), 3)
        self.assertEqual(self.cluster.containers[self.container.uuid].listening_ports, (8080, 9000))
        self.watch.stop()

    def test_cancelled_in_record(self) -> None:
        """A record cancelled elsewhere stops the runtime and the looking."""
        self.watch.start()
        self.cluster.update_container(self.container.uuid, state=backends.CANCELLED)
        self.clock.advance(3.0)
        self.assertEqual(self.successResultOf(self.runtime.exited()), None)
        self.assertTrue(self.watch.cancelled)
        calls = len(self.cluster.calls)
        self.clock.advance(30.0)
        self.assertEqual(len(self.cluster.calls), calls)
        self.successResultOf(self.watch.stop())

    def test_failure_logged_and_retried(self) -> None:
        """A failed look is logged and the next one still happens."""
        broken = [True]
        listening = self.runtime.listening_ports

        def ports() -> Any:
            if broken[0]:
                return defer.fail(OSError("engine gone"))
            return listening()

        self.runtime.listening_ports = ports  # type: ignore[method-assign]
        self.watch.start()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        broken[0] = False
        self.runtime.ports = [80]
        self.clock.advance(3.0)
        self.assertEqual(self.cluster.containers[self.container.uuid].listening_ports, (80,))
        self.watch.stop()


class DrainTests(unittest.TestCase):
    """L{drain} waits for open requests, but not forever."""

    def test_drained(self) -> None:
        """It returns True once nothing is open."""
        clock = task.Clock()
        open_requests = [2]
        d = defer.ensureDeferred(drain(clock, lambda: open_requests[0], timeout=10.0))
        clock.advance(0.1)
        self.assertNoResult(d)
        open_requests[0] = 0
        clock.advance(0.1)
        self.assertTrue(self.successResultOf(d))

    def test_timeout(self) -> None:
        """It gives up (False) after the timeout when requests stay open."""
        clock = task.Clock()
        d = defer.ensureDeferred(drain(clock, lambda: 1, timeout=1.0))
        clock.pump([0.1] * 12)
        self.assertFalse(self.successResultOf(d))
