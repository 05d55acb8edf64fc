"""
C{twistd arv-local-dispatcher}: runs the embedded registry's queued containers on this machine.

Like Arvados' dispatchers, it takes C{Queued} containers, locks them, and starts one
C{crunch-run-gateway} per container with the Arvados-style JSON on standard input
(C{{"Env": {"GatewayAddress": "127.0.0.1:0", "GatewayAuthSecret": "..."}}}); the gateway creates
the container, marks it C{Running} and records how it ended.  The dispatcher watches its
gateways: one that exits while its container is not final (it crashed, was killed, or never got
the container running in time) has its container marked C{Cancelled} with the reason in
C{runtime_status}, so no container stays C{Locked} or C{Running} forever.

When it starts, it settles the C{Locked} and C{Running} containers an earlier dispatcher left
(L{arvproxy.reconcile}): a new gateway for a C{Locked} one, a gateway attached to a Docker
container that still runs, a final state for one that is gone.  Calls to the registry ride out
transient failures (L{arvproxy.retry}).  When it stops, its gateways stop their containers
(C{Cancelled}), or with C{--hand-back} leave them running for the next dispatcher to attach to.
One dispatcher runs per registry: it holds C{dispatcher.lock} in the container logs directory.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, error, protocol, task
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage

from arvproxy import backends, policy
from arvproxy.containerlogs import DISPATCHER_LOCK_NAME, FileLock, Held, gateway_running
from arvproxy.reconcile import IInventory, NoInventory, Reconciler
from arvproxy.retry import DEADLINE, Retrier, RetryingCluster
from arvproxy.service import StopInTurn, open_cluster, read_config

log = Logger()

GATEWAY_ADDRESS = "127.0.0.1:0"
"""Where gateways listen: loopback, a random port (the controller runs on this machine)."""


def gateway_argv(
    config_path: str, uuid: str, runtime: str, attach_to: str | None = None
) -> list[str]:
    """
    The command that runs the gateway of container C{uuid}; with C{attach_to}, one that adopts
    that running Docker container (an earlier gateway's) instead of creating one.
    """
    argv = [
        sys.executable,
        "-m",
        "twisted",
        "--log-format=text",
        "crunch-run-gateway",
        "--config",
        config_path,
        "--container-uuid",
        uuid,
        "--runtime",
        runtime,
    ]
    if attach_to is not None:
        argv += ["--docker-container", attach_to, "--adopt"]
    return argv


def dispatch_document(secret: str) -> bytes:
    """The JSON a gateway reads on standard input."""
    env = {"GatewayAddress": GATEWAY_ADDRESS, "GatewayAuthSecret": secret}
    return json.dumps({"Env": env}).encode("ascii") + b"\n"


OK = "exit status 0"


def describe_exit(reason: Any) -> str:
    """C{"exit status 1"} or C{"signal 9"}, from a C{processEnded} reason."""
    value = reason.value
    if getattr(value, "signal", None):
        return f"signal {value.signal}"
    return f"exit status {getattr(value, 'exitCode', '?')}"


class GatewayProcess(protocol.ProcessProtocol):
    """One gateway: feeds it the dispatch JSON, logs its output, reports its end."""

    def __init__(self, uuid: str, document: bytes, ended: Callable[[str, Any], Any]) -> None:
        self.uuid = uuid
        self._document = document
        self._ended = ended
        self._partial = {1: b"", 2: b""}
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._document)
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            log.info("gateway {uuid}: {line}", uuid=self.uuid, line=line.decode("utf-8", "replace"))

    def signal(self, name: str | int) -> None:
        try:
            assert self.transport is not None
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def processEnded(self, reason: Any) -> None:
        d = defer.maybeDeferred(self._ended, self.uuid, reason)
        d.addErrback(lambda f: log.failure("after gateway {uuid} ended", f, uuid=self.uuid))
        d.addBoth(lambda _: self.done.callback(None))


class LocalDispatcher(Service):
    """
    Polls the registry every C{poll_interval} seconds and runs each queued container.

    @param cluster: the embedded registry (it has C{list_containers} and C{lock_container}).
    @param spawn: C{reactor.spawnProcess}'s signature, for tests.
    @param cleanup: called in a thread with a container UUID after its gateway died, to remove
        what the gateway left behind (its Docker container); C{None} for nothing.
    @param inventory: the runtime's containers, for settling those an earlier dispatcher left.
    @param gateway_running: whether a gateway (of any dispatcher) runs for a container here.
    @param hand_back: when stopped, have the gateways hand their containers back (SIGUSR2:
        left running for the next dispatcher) instead of stopping them (SIGTERM: Cancelled).
    @ivar gateways: the running gateway processes by container UUID.
    @ivar orphans: containers whose gateway an earlier dispatcher left running; settled once
        that gateway is gone.
    """

    def __init__(
        self,
        reactor: Any,
        cluster: Any,
        config_path: str,
        system_root_token: str,
        runtime: str = "docker",
        poll_interval: float = 2.0,
        start_timeout: float = 600.0,
        stop_timeout: float = 30.0,
        spawn: Callable[..., Any] | None = None,
        argv: Callable[..., list[str]] = gateway_argv,
        cleanup: Callable[[str], Any] | None = None,
        inventory: IInventory | None = None,
        gateway_running: Callable[[str], bool] = lambda uuid: False,
        hand_back: bool = False,
        retry_deadline: float = DEADLINE,
    ) -> None:
        self._reactor = reactor
        self._retrier = Retrier(reactor, retry_deadline)
        self._cluster = RetryingCluster(cluster, self._retrier)
        self._gateway_running = gateway_running
        self._hand_back = hand_back
        self._reconciler = Reconciler(
            self._cluster, inventory or NoInventory(), self._running_elsewhere, self.start_gateway
        )
        self.orphans: set[str] = set()
        self._config_path = config_path
        self._root_token = system_root_token
        self._runtime = runtime
        self._poll_interval = poll_interval
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._spawn = spawn or reactor.spawnProcess
        self._argv = argv
        self._cleanup = cleanup
        self._loop = task.LoopingCall(lambda: defer.ensureDeferred(self.poll()))
        self._loop.clock = reactor
        self._looping: defer.Deferred[Any] | None = None
        self.gateways: dict[str, GatewayProcess] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self.recover())
        d.addCallback(lambda _: self._start_loop())

    def _start_loop(self) -> None:
        if not self._stopping:
            self._looping = self._loop.start(self._poll_interval, now=True)

    def _running_elsewhere(self, uuid: str) -> bool:
        """Whether a gateway not started by this dispatcher serves C{uuid} (an orphan)."""
        running = uuid not in self.gateways and self._gateway_running(uuid)
        if running:
            self.orphans.add(uuid)
        return running

    async def recover(self) -> None:
        """
        Settle the containers an earlier dispatcher left C{Locked} or C{Running} (see
        L{arvproxy.reconcile}), then remove Docker containers whose record is final.
        """
        try:
            owned = [
                *await self._cluster.list_containers(backends.LOCKED),
                *await self._cluster.list_containers(backends.RUNNING),
            ]
        except Exception:
            log.failure("Cannot list the Locked and Running containers")
            return
        steps = await self._reconciler.reconcile(
            c for c in owned if c.uuid not in self.gateways and not self._stopping
        )
        await self._reconciler.remove_leftovers({step.uuid: step for step in steps})

    async def _settle_orphans(self) -> None:
        """Settle the containers whose orphaned gateway has gone since the last look."""
        for uuid in sorted(self.orphans):
            if self._gateway_running(uuid):
                continue
            self.orphans.discard(uuid)
            container = await self._cluster.get_container(uuid)
            await self._reconciler.reconcile([container])

    async def poll(self) -> None:
        """Lock and start every queued container (never fails)."""
        try:
            if self.orphans:
                await self._settle_orphans()
            queued = await self._cluster.list_containers(backends.QUEUED)
            for container in queued:
                if self._stopping:
                    return
                if await self._cluster.lock_container(container.uuid):
                    await self.start_gateway(container.uuid)
        except Exception:
            log.failure("Cannot dispatch queued containers")

    def start_gateway(self, uuid: str, attach_to: str | None = None) -> defer.Deferred[None]:
        """
        Start the gateway of a container this dispatcher has locked (or, with C{attach_to},
        of a running one whose Docker container that is).

        @return: a Deferred that fires when it has started, or when the container has been
            cancelled because it could not be.
        """
        process = GatewayProcess(uuid, self.dispatch_document(uuid), self._gateway_ended)
        if attach_to is None:
            argv = self._argv(self._config_path, uuid, self._runtime)
        else:
            argv = self._argv(self._config_path, uuid, self._runtime, attach_to)
        try:
            self._spawn(process, argv[0], argv, env=dict(os.environ))
        except Exception as e:
            log.failure("Cannot start the gateway of {uuid}", uuid=uuid)
            return defer.ensureDeferred(
                self._not_started(uuid, f"the gateway could not be started: {e}")
            )
        log.info("Started the gateway of {uuid}", uuid=uuid)
        self.gateways[uuid] = process
        self._reactor.callLater(self._start_timeout, self._check_started, uuid, process)
        return defer.succeed(None)

    def dispatch_document(self, uuid: str) -> bytes:
        """The JSON the gateway of container C{uuid} reads on standard input."""
        return dispatch_document(policy.gateway_secret(self._root_token, uuid))

    async def _not_started(self, uuid: str, reason: str) -> None:
        """A locked container's gateway could not be started: cancel it, saying why."""
        await self._cancel(uuid, reason)

    def _check_started(self, uuid: str, process: GatewayProcess) -> Any:
        """Kill a gateway that has not got its container Running in time."""
        if self.gateways.get(uuid) is not process:
            return None

        def check(container: backends.Container) -> None:
            if container.state == backends.LOCKED and self.gateways.get(uuid) is process:
                log.warn(
                    "The gateway of {uuid} did not start it within {t}s: stopping it",
                    uuid=uuid,
                    t=self._start_timeout,
                )
                process.signal("KILL")

        d = self._cluster.get_container(uuid)
        d.addCallback(check)
        d.addErrback(lambda f: log.failure("Cannot check container {uuid}", f, uuid=uuid))
        return d

    async def _gateway_ended(self, uuid: str, reason: Any) -> None:
        self.gateways.pop(uuid, None)
        how = describe_exit(reason)
        if self._stopping:
            # Stopped by stopService: it records its container's end itself, and the registry
            # service is stopping alongside this one (asking it now fails).
            log.info("The gateway of {uuid} ended ({how})", uuid=uuid, how=how)
            return
        container = await self._cluster.get_container(uuid)
        if container.state in backends.FINAL_STATES:
            log.info("The gateway of {uuid} ended ({how})", uuid=uuid, how=how)
            return
        if container.state == backends.QUEUED:
            # Stopped before its container ran, it handed it back: the next poll runs it.
            log.info("The gateway of {uuid} ended ({how}), handing it back", uuid=uuid, how=how)
            return
        if container.state == backends.RUNNING and not container.gateway_address and how == OK:
            # Handed back while running (SIGUSR2): a new gateway takes it over.
            log.info("The gateway of {uuid} handed it back: attaching a new one", uuid=uuid)
            await self._reconciler.reconcile([container])
            return
        log.warn(
            "The gateway of {uuid} ended ({how}) while the container was {state}",
            uuid=uuid,
            how=how,
            state=container.state,
        )
        await self._gateway_lost(container, how)

    async def _gateway_lost(self, container: backends.Container, how: str) -> None:
        """
        The gateway of C{container} (Locked or Running) ended before it: cancel it, saying
        why, and remove what the gateway left behind.
        """
        uuid = container.uuid
        await self._cancel(uuid, f"its gateway ended ({how}) before the container finished")
        if self._cleanup is not None:
            try:
                await deferToThread(self._cleanup, uuid)
            except Exception:
                log.failure("Cannot clean up after the gateway of {uuid}", uuid=uuid)

    async def _cancel(self, uuid: str, reason: str) -> None:
        try:
            await self._cluster.update_container(
                uuid, state=backends.CANCELLED, runtime_status={"error": reason}
            )
        except Exception:
            log.failure("Cannot cancel container {uuid}", uuid=uuid)
        else:
            log.info("Cancelled container {uuid}: {reason}", uuid=uuid, reason=reason)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """
        Stop polling; stop every gateway (they stop their containers, or hand them back),
        killing stragglers.
        """
        super().stopService()
        self._stopping = True
        self._retrier.stop()
        if self._loop.running:
            self._loop.stop()
        if self._looping is not None:
            yield self._looping
        processes = list(self.gateways.values())
        for process in processes:
            process.signal(signal.SIGUSR2 if self._hand_back else "TERM")

        def kill_all() -> None:
            for process in processes:
                process.signal("KILL")

        kill = self._reactor.callLater(self._stop_timeout, kill_all)
        yield defer.DeferredList([p.done for p in processes])
        if kill.active():
            kill.cancel()


def remove_docker_leftover(uuid: str) -> None:
    """Remove the Docker container a dead gateway of C{uuid} left (blocking; best effort)."""
    import docker.errors

    from arvproxy.gateway.docker_runtime import default_client, docker_name

    try:
        default_client().containers.get(docker_name(uuid)).remove(force=True)
    except docker.errors.NotFound:
        pass


HAND_BACK_FLAG = [
    "hand-back",
    None,
    "When stopped, leave the containers running (their gateways hand them back) for "
    "the next dispatcher to attach to, instead of stopping them (Cancelled).",
]
RUNTIME_PARAMETER = ["runtime", None, "docker", 'The gateways\' runtime: "docker" or "host".']
START_TIMEOUT_PARAMETER = [
    "start-timeout",
    None,
    600.0,
    "Seconds a gateway may take to get its container Running (image pulls included).",
    float,
]
"""Options both dispatchers take (this one and L{arvproxy.nodedispatcher}'s)."""


def check_runtime(runtime: str) -> None:
    """
    Refuse a gateway runtime this machine cannot give: not C{docker} or C{host}, or Docker
    without root (gateways enter containers' namespaces) or without an engine.

    @raise usage.UsageError: saying why.
    """
    if runtime not in ("docker", "host"):
        raise usage.UsageError(f'--runtime must be "docker" or "host", got {runtime!r}')
    if runtime == "docker":
        from arvproxy.gateway.docker_runtime import engine_status
        from arvproxy.gateway.netns import PERMISSION_HINT, has_cap_sys_admin

        if not has_cap_sys_admin():
            raise usage.UsageError(f"--runtime docker: {PERMISSION_HINT}")
        problem = engine_status()
        if problem is not None:
            raise usage.UsageError(problem)


class Options(usage.Options):
    synopsis = "--config FILE [--runtime docker|host] [--poll-interval SECONDS]"
    longdesc = (
        "Run the embedded registry's queued containers on this machine: lock each one and "
        "start a crunch-run-gateway for it."
    )
    optFlags = [HAND_BACK_FLAG]
    optParameters = [
        ["config", "c", None, "The cluster configuration file (YAML)."],
        RUNTIME_PARAMETER,
        ["poll-interval", None, 2.0, "Seconds between two looks at the queue.", float],
        START_TIMEOUT_PARAMETER,
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required (see conf/local.yml)")
        self["cluster"] = read_config(self["config"])
        self["config"] = os.path.abspath(self["config"])
        if self["cluster"].backend != "embedded":
            raise usage.UsageError(
                "the local dispatcher runs the embedded registry's containers; with the "
                f"{self['cluster'].backend} backend, Arvados' own dispatcher starts gateways"
            )
        check_runtime(self["runtime"])
        if not self["poll-interval"] > 0 or not self["start-timeout"] > 0:
            raise usage.UsageError("--poll-interval and --start-timeout must be positive")


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options["cluster"]
    running: Callable[[str], bool] = _no_gateway
    if config.container_logs:
        _hold_dispatcher_lock(config.container_logs)
        running = functools.partial(gateway_running, config.container_logs)
    inventory = runtime_inventory(config, options["runtime"])
    top = StopInTurn()
    cluster = open_cluster(reactor, config)
    cluster.setServiceParent(top)
    LocalDispatcher(
        reactor,
        cluster,
        options["config"],
        config.system_root_token,
        runtime=options["runtime"],
        poll_interval=options["poll-interval"],
        start_timeout=options["start-timeout"],
        cleanup=remove_docker_leftover if options["runtime"] == "docker" else None,
        inventory=inventory,
        gateway_running=running,
        hand_back=bool(options["hand-back"]),
        retry_deadline=config.limits.cluster_retry,
    ).setServiceParent(top)
    return top


def runtime_inventory(config: Any, runtime: str) -> IInventory:
    """The containers gateways of C{runtime} left on this machine (Docker's, by label)."""
    if runtime != "docker":
        return NoInventory()
    from arvproxy.gateway.docker_inventory import DockerInventory

    return DockerInventory(
        config.cluster_id,
        output_directory=config.container_logs,
        output_bytes=config.container_log_bytes,
    )


def _no_gateway(uuid: str) -> bool:
    return False


def _hold_dispatcher_lock(
    directory: str, prog: str = "arv-local-dispatcher", where: str = "here"
) -> None:
    """
    Hold the dispatcher lock in C{directory} (one dispatcher per registry, or per node) until
    the process exits; exit 1, saying so as C{prog}, if another holds it.
    """
    lock = FileLock(os.path.join(directory, DISPATCHER_LOCK_NAME))
    try:
        lock.acquire()
    except Held as e:
        sys.stderr.write(f"{prog}: error: another dispatcher runs {where} ({e})\n")
        raise SystemExit(1) from None
    except OSError as e:
        sys.stderr.write(f"{prog}: error: cannot use {lock.path}: {e}\n")
        raise SystemExit(1) from None
