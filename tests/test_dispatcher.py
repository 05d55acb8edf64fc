"""
Tests for L{arvproxy.dispatcher}: the local dispatcher against a real embedded registry, with
gateway processes faked (the Docker integration test runs real ones).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, error, reactor, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from arvproxy import backends, policy
from arvproxy.backends.embedded import EmbeddedRegistry
from arvproxy.dispatcher import GatewayProcess, LocalDispatcher, gateway_argv

ROOT_TOKEN = "DispatcherTestRootToken00000000000000000000"


class FakeProcess(StringTransport):
    """A spawned process: records stdin, whether it was closed, and the signals sent."""

    def __init__(self, protocol: GatewayProcess) -> None:
        super().__init__()
        self.protocol = protocol
        self.stdin_closed = False
        self.signals: list[str] = []
        self.pid = 4242
        self.ended = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def end(self, exit_code: int | None = None, signal: int | None = None) -> defer.Deferred[None]:
        """Make the process end; fires once the dispatcher has handled it."""
        self.ended = True
        self.protocol.processEnded(
            Failure(error.ProcessTerminated(exitCode=exit_code, signal=signal))
        )
        return self.protocol.done


class DispatcherTests(unittest.TestCase):
    """The dispatcher locks queued containers, starts gateways, and cancels orphans."""

    def setUp(self) -> None:
        self.registry = EmbeddedRegistry(
            reactor,
            self.mktemp(),
            cluster_id="zzzzz",
            system_root_token=ROOT_TOKEN,
            max_threads=1,  # calls run in order: awaiting one awaits those queued before it
        )
        self.registry.start()
        self.addCleanup(self.registry.stop)
        self.user = self.registry.store.create_user("Dispatcher Tester")
        self.clock = task.Clock()
        self.spawned: list[tuple[FakeProcess, list[str]]] = []
        self.cleaned: list[str] = []
        self.spawn_error: Exception | None = None
        self.dispatcher = LocalDispatcher(
            self.clock,
            self.registry,
            "/etc/arvproxy.yml",
            ROOT_TOKEN,
            runtime="docker",
            start_timeout=60.0,
            stop_timeout=5.0,
            spawn=self.spawn,
            cleanup=self.cleaned.append,
        )

    def spawn(self, protocol: GatewayProcess, executable: str, argv: list[str], env: Any) -> Any:
        if self.spawn_error is not None:
            raise self.spawn_error
        process = FakeProcess(protocol)
        protocol.makeConnection(process)
        self.spawned.append((process, argv))
        return process

    def queue(self) -> str:
        request = self.registry.store.create_container_request(
            self.user.uuid, container_image="img", published_ports={"80": {}}
        )
        assert request.container_uuid is not None
        return request.container_uuid

    def state(self, uuid: str) -> backends.Container:
        return self.registry.store.get_container(uuid)

    @defer.inlineCallbacks
    def test_starts_one_gateway_per_queued_container(self) -> Any:
        """Each queued container is locked and gets one gateway, with the Arvados-style JSON."""
        first, second = self.queue(), self.queue()
        yield defer.ensureDeferred(self.dispatcher.poll())
        yield defer.ensureDeferred(self.dispatcher.poll())
        self.assertEqual(
            [argv for _, argv in self.spawned],
            [
                gateway_argv("/etc/arvproxy.yml", first, "docker"),
                gateway_argv("/etc/arvproxy.yml", second, "docker"),
            ],
        )
        for (process, _), uuid in zip(self.spawned, [first, second], strict=True):
            self.assertEqual(self.state(uuid).state, backends.LOCKED)
            document = json.loads(process.value())
            self.assertEqual(
                document,
                {
                    "Env": {
                        "GatewayAddress": "127.0.0.1:0",
                        "GatewayAuthSecret": policy.gateway_secret(ROOT_TOKEN, uuid),
                    }
                },
            )
            self.assertTrue(process.stdin_closed)

    @defer.inlineCallbacks
    def test_locked_elsewhere_not_started(self) -> Any:
        """A container another dispatcher locked first is left alone."""
        uuid = self.queue()
        self.registry.store.lock_container(uuid)
        yield defer.ensureDeferred(self.dispatcher.poll())
        self.assertEqual(self.spawned, [])

    @defer.inlineCallbacks
    def test_gateway_died(self) -> Any:
        """A gateway dying before its container finished gets it Cancelled, saying why."""
        cases = [
            ("crashed while Locked", None, 1, None, "exit status 1"),
            ("killed while Running", backends.RUNNING, None, 9, "signal 9"),
        ]
        for name, state, exit_code, signal, how in cases:
            uuid = self.queue()
            yield defer.ensureDeferred(self.dispatcher.poll())
            if state is not None:
                self.registry.store.update_container(uuid, state=state)
            process, _ = self.spawned[-1]
            yield process.end(exit_code=exit_code, signal=signal)
            container = self.state(uuid)
            self.assertEqual(container.state, backends.CANCELLED, name)
            self.assertIn(how, container.runtime_status["error"], name)
            self.assertIn("gateway", container.runtime_status["error"], name)
            self.assertEqual(self.cleaned[-1], uuid, name)
            self.assertNotIn(uuid, self.dispatcher.gateways, name)

    @defer.inlineCallbacks
    def test_gateway_done(self) -> Any:
        """A gateway ending after its container finished changes nothing."""
        uuid = self.queue()
        yield defer.ensureDeferred(self.dispatcher.poll())
        self.registry.store.update_container(uuid, state=backends.RUNNING)
        self.registry.store.update_container(uuid, state=backends.COMPLETE, exit_code=0)
        process, _ = self.spawned[-1]
        yield process.end(exit_code=0)
        container = self.state(uuid)
        self.assertEqual((container.state, container.runtime_status), (backends.COMPLETE, {}))
        self.assertEqual(self.cleaned, [])

    @defer.inlineCallbacks
    def test_spawn_fails(self) -> Any:
        """A gateway that cannot be started gets its container Cancelled, never left Locked."""
        uuid = self.queue()
        self.spawn_error = OSError("no such program")
        yield defer.ensureDeferred(self.dispatcher.poll())
        container = self.state(uuid)
        self.assertEqual(container.state, backends.CANCELLED)
        self.assertIn("no such program", container.runtime_status["error"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    @defer.inlineCallbacks
    def test_start_timeout(self) -> Any:
        """A gateway that has not got its container Running in time is killed, then cancelled."""
        stuck, started = self.queue(), self.queue()
        yield defer.ensureDeferred(self.dispatcher.poll())
        self.registry.store.update_container(started, state=backends.RUNNING)
        (stuck_process, _), (started_process, _) = self.spawned
        self.clock.advance(60.0)
        yield self.registry.get_container(stuck)  # both checks were queued before this
        self.assertEqual(stuck_process.signals, ["KILL"])
        self.assertEqual(started_process.signals, [])
        yield stuck_process.end(signal=9)
        self.assertEqual(self.state(stuck).state, backends.CANCELLED)

    @defer.inlineCallbacks
    def test_recover(self) -> Any:
        """Containers left Locked by an earlier dispatcher get a new gateway at start-up."""
        left, queued = self.queue(), self.queue()
        self.registry.store.lock_container(left)
        yield defer.ensureDeferred(self.dispatcher.recover())
        self.assertEqual(self.state(left).state, backends.LOCKED)
        self.assertEqual(
            [argv for _, argv in self.spawned],
            [gateway_argv("/etc/arvproxy.yml", left, "docker")],
        )
        self.assertEqual(self.state(queued).state, backends.QUEUED)

    @defer.inlineCallbacks
    def test_stop(self) -> Any:
        """Stopping sends TERM to every gateway, waits for them, and KILLs stragglers."""
        self.queue(), self.queue()
        yield defer.ensureDeferred(self.dispatcher.poll())
        (polite, _), (stubborn, _) = self.spawned
        stopped = self.dispatcher.stopService()
        self.assertEqual((polite.signals, stubborn.signals), (["TERM"], ["TERM"]))
        yield polite.end(exit_code=0)
        self.assertNoResult(stopped)
        self.clock.advance(5.0)
        self.assertEqual(stubborn.signals, ["TERM", "KILL"])
        yield stubborn.end(signal=9)
        yield stopped
