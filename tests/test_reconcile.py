"""
Tests for L{arvproxy.reconcile} and the local dispatcher's use of it: what a dispatcher that
starts does with the containers an earlier one left, with retries of transient failures, in
memory (the real Docker engine and processes are in L{tests.test_restart}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from arvproxy import backends, errors
from arvproxy.backends.embedded import EmbeddedRegistry
from arvproxy.dispatcher import LocalDispatcher, gateway_argv
from arvproxy.reconcile import (
    ATTACH,
    CANCEL,
    FINISH,
    LEAVE,
    START,
    Found,
    IInventory,
    Reconciler,
    plan,
)
from arvproxy.testing import FakeCluster
from tests.test_dispatcher import ROOT_TOKEN, FakeProcess

RUNNING = Found("docker-1", running=True)
EXITED = Found("docker-2", running=False, exit_code=3)
DEAD = Found("docker-3", running=False, exit_code=None)


class PlanTests(unittest.TestCase):
    """Which container gets what, as a table."""

    def test_plan(self) -> None:
        """Each combination of state, runtime container and live gateway gets its step."""
        cases = [
            (backends.LOCKED, None, False, START),
            (backends.LOCKED, RUNNING, False, START),
            (backends.LOCKED, None, True, LEAVE),
            (backends.RUNNING, RUNNING, False, ATTACH),
            (backends.RUNNING, RUNNING, True, LEAVE),
            (backends.RUNNING, EXITED, False, FINISH),
            (backends.RUNNING, DEAD, False, FINISH),
            (backends.RUNNING, None, False, CANCEL),
            (backends.RUNNING, None, True, LEAVE),
            (backends.QUEUED, None, False, LEAVE),
            (backends.COMPLETE, RUNNING, False, LEAVE),
            (backends.CANCELLED, None, False, LEAVE),
        ]
        for state, found, gateway, action in cases:
            container = backends.Container("zzzzz-dz642-000000000000001", state=state)
            step = plan(container, found, gateway)
            self.assertEqual(step.action, action, (state, found, gateway))
            self.assertEqual(step.found, found)
            self.assertTrue(step.reason)


@implementer(IInventory)
class FakeInventory:
    """Runtime containers by record UUID; removals are recorded."""

    def __init__(self, found: dict[str, Found] | None = None) -> None:
        self.found = dict(found or {})
        self.removed: list[tuple[str, Found]] = []

    def find(self, uuid: str) -> defer.Deferred[Found | None]:
        return defer.succeed(self.found.get(uuid))

    def leftovers(self) -> defer.Deferred[dict[str, Found]]:
        return defer.succeed(dict(self.found))

    def remove(self, uuid: str, found: Found) -> defer.Deferred[None]:
        self.removed.append((uuid, found))
        self.found.pop(uuid, None)
        return defer.succeed(None)


class ReconcilerTests(unittest.TestCase):
    """Each step changes the record and the runtime as it says."""

    def setUp(self) -> None:
        self.cluster = FakeCluster()
        self.inventory = FakeInventory()
        self.started: list[tuple[str, str | None]] = []
        self.live: set[str] = set()
        self.reconciler = Reconciler(
            self.cluster,
            self.inventory,
            self.live.__contains__,
            lambda uuid, attach: self.started.append((uuid, attach)),
        )

    def add(self, state: str, found: Found | None = None) -> str:
        uuid = self.cluster.add_container(state=state, gateway_address="127.0.0.1:9").uuid
        if found is not None:
            self.inventory.found[uuid] = found
        return uuid

    def test_steps(self) -> None:
        """Start, attach, finish (exit code), cancel (with the reason), leave."""
        locked = self.add(backends.LOCKED)
        attach = self.add(backends.RUNNING, RUNNING)
        exited = self.add(backends.RUNNING, EXITED)
        gone = self.add(backends.RUNNING)
        served = self.add(backends.RUNNING, Found("docker-9", running=True))
        self.live.add(served)
        uuids = [locked, attach, exited, gone, served]
        steps = self.successResultOf(
            defer.ensureDeferred(
                self.reconciler.reconcile(self.cluster.containers[u] for u in uuids)
            )
        )
        self.assertEqual([s.action for s in steps], [START, ATTACH, FINISH, CANCEL, LEAVE])
        self.assertEqual(self.started, [(locked, None), (attach, "docker-1")])
        finished = self.cluster.containers[exited]
        self.assertEqual((finished.state, finished.exit_code), (backends.COMPLETE, 3))
        self.assertEqual(self.inventory.removed, [(exited, EXITED)])
        cancelled = self.cluster.containers[gone]
        self.assertEqual(cancelled.state, backends.CANCELLED)
        self.assertIn("gone when the dispatcher restarted", cancelled.runtime_status["error"])
        self.assertEqual(self.cluster.containers[served].state, backends.RUNNING)

    def test_leftovers(self) -> None:
        """Runtime containers of final records are removed; unknown records' are not touched."""
        final = self.add(backends.CANCELLED, Found("d-final", running=True))
        running = self.add(backends.RUNNING, Found("d-running", running=True))
        self.inventory.found["zzzzz-dz642-someoneelses000"] = Found("d-other", running=True)
        removed = self.successResultOf(defer.ensureDeferred(self.reconciler.remove_leftovers()))
        self.assertEqual(removed, [final])
        self.assertEqual([uuid for uuid, _ in self.inventory.removed], [final])
        self.assertIn(running, self.inventory.found)

    def test_failure_isolated(self) -> None:
        """A container that cannot be settled is logged and skipped; the others are settled."""
        bad = self.add(backends.RUNNING)
        good = self.add(backends.RUNNING)
        real = self.cluster.update_container

        def update(uuid: str, **changes: Any) -> Any:
            if uuid == bad:
                return defer.fail(errors.Forbidden("refused"))
            return real(uuid, **changes)

        self.cluster.update_container = update  # type: ignore[method-assign]
        steps = self.successResultOf(
            defer.ensureDeferred(
                self.reconciler.reconcile(
                    [self.cluster.containers[bad], self.cluster.containers[good]]
                )
            )
        )
        self.assertEqual([s.uuid for s in steps], [good])
        self.assertEqual(self.cluster.containers[good].state, backends.CANCELLED)


class FlakyRegistry:
    """An embedded registry whose next calls of a method fail transiently."""

    def __init__(self, registry: EmbeddedRegistry) -> None:
        self.registry = registry
        self.failures: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.registry, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.failures.get(name):
                self.failures[name] -= 1
                return defer.fail(errors.Unavailable("database is locked", transient=True))
            return method(*args, **kwargs)

        return call


class DispatcherRestartTests(unittest.TestCase):
    """The local dispatcher settles what an earlier one left, and rides out transient errors."""

    def setUp(self) -> None:
        self.registry = EmbeddedRegistry(
            reactor, self.mktemp(), cluster_id="zzzzz", system_root_token=ROOT_TOKEN, max_threads=1
        )
        self.registry.start()
        self.addCleanup(self.registry.stop)
        self.flaky = FlakyRegistry(self.registry)
        self.store = self.registry.store
        self.user = self.store.create_user("Restart Tester")
        self.clock = task.Clock()
        self.spawned: list[tuple[FakeProcess, list[str]]] = []
        self.inventory = FakeInventory()
        self.live: set[str] = set()
        self.dispatcher = LocalDispatcher(
            self.clock,
            self.flaky,
            "/etc/arvproxy.yml",
            ROOT_TOKEN,
            runtime="docker",
            start_timeout=60.0,
            stop_timeout=5.0,
            spawn=self.spawn,
            inventory=self.inventory,
            gateway_running=self.live.__contains__,
            hand_back=True,
        )

    def spawn(self, protocol: Any, executable: str, argv: list[str], env: Any) -> Any:
        process = FakeProcess(protocol)
        protocol.makeConnection(process)
        self.spawned.append((process, argv))
        return process

    def container(self, state: str) -> str:
        request = self.store.create_container_request(
            self.user.uuid, container_image="img", published_ports={"80": {}}
        )
        assert request.container_uuid is not None
        if state != backends.QUEUED:
            self.store.lock_container(request.container_uuid)
        if state == backends.RUNNING:
            self.store.update_container(
                request.container_uuid, state=state, gateway_address="127.0.0.1:1"
            )
        return request.container_uuid

    @defer.inlineCallbacks
    def test_recover(self) -> Any:
        """At start: attach to what runs, finish what is gone, leave what a gateway serves."""
        attach = self.container(backends.RUNNING)
        self.inventory.found[attach] = RUNNING
        gone = self.container(backends.RUNNING)
        orphan = self.container(backends.RUNNING)
        self.inventory.found[orphan] = Found("docker-orphan", running=True)
        self.live.add(orphan)
        leftover = self.container(backends.RUNNING)
        self.store.update_container(leftover, state=backends.CANCELLED)
        self.inventory.found[leftover] = Found("docker-left", running=False, exit_code=0)
        yield defer.ensureDeferred(self.dispatcher.recover())
        self.assertEqual(
            [argv for _, argv in self.spawned],
            [gateway_argv("/etc/arvproxy.yml", attach, "docker", "docker-1")],
        )
        self.assertEqual(self.spawned[0][1][-3:], ["--docker-container", "docker-1", "--adopt"])
        self.assertEqual(self.store.get_container(gone).state, backends.CANCELLED)
        self.assertEqual(self.store.get_container(orphan).state, backends.RUNNING)
        self.assertEqual(self.dispatcher.orphans, {orphan})
        self.assertEqual([uuid for uuid, _ in self.inventory.removed], [leftover])

        # The orphan's gateway dies later: the next poll settles its container.
        self.live.discard(orphan)
        yield defer.ensureDeferred(self.dispatcher.poll())
        self.assertEqual(
            self.spawned[-1][1][-3:], ["--docker-container", "docker-orphan", "--adopt"]
        )
        self.assertEqual(self.dispatcher.orphans, set())

    @defer.inlineCallbacks
    def test_transient_failures(self) -> Any:
        """A poll that meets transient registry failures retries and still runs the container."""
        uuid = self.container(backends.QUEUED)
        self.flaky.failures = {"list_containers": 2, "lock_container": 1}
        d = defer.ensureDeferred(self.dispatcher.poll())
        for _ in range(30):
            self.clock.advance(1.0)
            yield self.registry.get_container(uuid)  # let the registry's thread answer
        yield d
        self.assertEqual(self.store.get_container(uuid).state, backends.LOCKED)
        self.assertEqual(len(self.spawned), 1)
        self.assertEqual(self.flaky.failures, {"list_containers": 0, "lock_container": 0})

    @defer.inlineCallbacks
    def test_handed_back(self) -> Any:
        """A gateway that handed its container back gets it re-run or re-attached, not cancelled."""
        queued = self.container(backends.QUEUED)
        yield defer.ensureDeferred(self.dispatcher.poll())
        process, _ = self.spawned[-1]
        self.store.update_container(queued, state=backends.QUEUED)  # stopped before Running
        yield process.end(exit_code=0)
        self.assertEqual(self.store.get_container(queued).state, backends.QUEUED)

        running = self.container(backends.RUNNING)
        self.inventory.found[running] = RUNNING
        yield self.dispatcher.start_gateway(running)
        process, _ = self.spawned[-1]
        self.store.update_container(running, gateway_address="")  # handed back (SIGUSR2)
        yield process.end(exit_code=0)
        self.assertEqual(self.store.get_container(running).state, backends.RUNNING)
        self.assertEqual(self.spawned[-1][1][-3:], ["--docker-container", "docker-1", "--adopt"])

    @defer.inlineCallbacks
    def test_stop_hands_back(self) -> Any:
        """With hand_back, stopping sends the gateways SIGUSR2, not SIGTERM."""
        import signal

        self.container(backends.QUEUED)
        yield defer.ensureDeferred(self.dispatcher.poll())
        process, _ = self.spawned[-1]
        stopped = self.dispatcher.stopService()
        self.assertEqual(process.signals, [signal.SIGUSR2])
        yield process.end(exit_code=0)
        yield stopped
