"""
C{twistd crunch-run-gateway}: the gateway beside one container.

It reads the dispatcher's JSON on standard input (Arvados' shape:
C{{"Env": {"GatewayAddress": "host:0", "GatewayAuthSecret": "..."}}}), listens with TLS on a
random port of that host using a certificate for the key derived from the secret, marks the
container Running with its C{gateway_address}, and serves until the container stops.
When C{Env} also holds C{ARVADOS_API_HOST} (C{host:port}), C{ARVADOS_API_TOKEN} and perhaps
C{ARVADOS_API_HOST_INSECURE}, as Arvados' dispatchers pass them to crunch-run, the container
record is read and updated through that Arvados API server instead of the configured backend,
with that token: the dispatcher's, which holds the container's lock (only the lock holder may
move a container on).  Before serving, the gateway reads the container's own token with it, as
crunch-run does (C{GET containers/<uuid>/auth}); a token that does not hold the lock stops the
gateway at once, leaving the container alone.
"""

from __future__ import annotations

import json
import random as _random
import re
import signal
import sys
from collections.abc import Callable
from typing import IO, Any, NoReturn

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from arvproxy import backends, policy
from arvproxy.containerlogs import ContainerLog, Held, gateway_lock
from arvproxy.gateway.runtime import HostRuntime, IRuntime
from arvproxy.gateway.server import Gateway, tls_ports
from arvproxy.gateway.watch import ContainerWatch, drain
from arvproxy.httpserver import ProxySite
from arvproxy.retry import DEADLINE, Retrier, RetryingCluster, describe
from arvproxy.service import (
    ListeningService,
    StopInTurn,
    fatal,
    freeze_start_up,
    open_cluster,
    read_config,
)
from arvproxy.tlsidentity import server_context_factory

log = Logger()

SECRET_LENGTH = 64


MAX_DISPATCH_BYTES = 1024 * 1024
"""The most standard input a gateway reads for the dispatcher's JSON."""


class DispatchError(Exception):
    """
    The dispatcher's JSON on standard input cannot be used; the message says what is wrong in
    one line (never showing the secret).
    """


def read_dispatch(stream: IO[str]) -> dict[str, Any]:
    """
    Read one JSON document from the dispatcher (without waiting for end of file).

    @raise DispatchError: it is not a JSON object with an C{Env} object (not JSON, too large,
        nested too deeply, not UTF-8, or nothing at all).
    """
    text = ""
    document: Any = None
    problem = ""
    while document is None:
        try:
            line = stream.readline(MAX_DISPATCH_BYTES + 1 - len(text))
        except UnicodeDecodeError:
            raise DispatchError("the JSON on standard input is not UTF-8 text") from None
        if not line:
            if not text.strip():
                raise DispatchError(
                    "expected the dispatcher's JSON on standard input, like "
                    '{"Env": {"GatewayAddress": "10.0.0.5:0", "GatewayAuthSecret": "..."}}'
                )
            raise DispatchError(f"the text on standard input is not valid JSON ({problem})")
        try:
            line.encode("utf-8")  # in a C locale, stdin turns bad bytes into lone surrogates
        except UnicodeEncodeError:
            raise DispatchError("the JSON on standard input is not UTF-8 text") from None
        text += line
        if len(text) > MAX_DISPATCH_BYTES:
            raise DispatchError(
                f"the JSON on standard input is larger than {MAX_DISPATCH_BYTES} bytes"
            )
        try:
            document = json.loads(text)
        except RecursionError:
            raise DispatchError("the JSON on standard input is nested too deeply") from None
        except ValueError as e:
            problem = str(e)
            continue
    env = document.get("Env") if isinstance(document, dict) else None
    if not isinstance(env, dict):
        raise DispatchError('the JSON on standard input has no "Env" object')
    return document


def parse_gateway_env(env: dict[str, Any]) -> tuple[str, int, str]:
    """
    The listening host, port and secret from the dispatcher's C{Env}; also checks the Arvados
    settings a dispatcher may pass (C{ARVADOS_API_HOST}, C{ARVADOS_API_TOKEN},
    C{ARVADOS_API_HOST_INSECURE}).

    @raise DispatchError: a setting is missing or malformed.
    """
    address = env.get("GatewayAddress")
    if not isinstance(address, str) or not address:
        raise DispatchError('Env.GatewayAddress is missing: expected "host:0" (or host:port)')
    try:
        name, port = policy.split_host(address.encode("ascii"))
    except (policy.BadRequest, UnicodeEncodeError):
        port = None
    if port is None or not name or port > 65535:
        raise DispatchError(f"Env.GatewayAddress must be host:port, got {address[:100]!r}")
    secret = env.get("GatewayAuthSecret")
    if not isinstance(secret, str) or not secret:
        raise DispatchError(
            "Env.GatewayAuthSecret is missing: refusing to start without a secret "
            "(the dispatcher passes hex(HMAC-SHA256(SystemRootToken, container UUID)))"
        )
    if len(secret) != SECRET_LENGTH or not re.fullmatch(r"[0-9a-f]+", secret):
        raise DispatchError(
            f"Env.GatewayAuthSecret must be {SECRET_LENGTH} lower-case hex digits (an "
            f"HMAC-SHA256 hex digest); got {len(secret)} characters"
            + ("" if len(secret) != SECRET_LENGTH else " that are not all hex digits")
        )
    _check_api_settings(env)
    return name.decode("ascii").strip("[]"), port, secret


def _check_api_settings(env: dict[str, Any]) -> None:
    host, token = env.get("ARVADOS_API_HOST"), env.get("ARVADOS_API_TOKEN")
    if host is None and token is None:
        return
    if not isinstance(host, str) or not host:
        raise DispatchError("Env.ARVADOS_API_HOST must be the API server's host:port")
    try:
        from arvproxy.backends.arvados import api_base_url

        api_base_url(host)
    except ValueError:
        raise DispatchError(
            f"Env.ARVADOS_API_HOST must be the API server's host:port, got {host[:100]!r}"
        ) from None
    if not isinstance(token, str) or not token or not token.isprintable():
        raise DispatchError("Env.ARVADOS_API_TOKEN must be the dispatcher's API token")
    insecure = env.get("ARVADOS_API_HOST_INSECURE", "")
    if not isinstance(insecure, (str, bool)):
        raise DispatchError('Env.ARVADOS_API_HOST_INSECURE must be "1", "true" or empty')


def refuse(message: str) -> NoReturn:
    """Stop a gateway that cannot start: one plain line on standard error, exit status 1."""
    sys.stderr.write(f"crunch-run-gateway: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


class Options(usage.Options):
    synopsis = "--config FILE --container-uuid UUID [--listen ENDPOINT] < dispatch.json"
    longdesc = (
        "Serve one container's web services: verify requests signed by the controller and "
        "proxy them to ports inside the container.  Reads the dispatcher's JSON on stdin."
    )
    optParameters = [
        ["config", "c", None, "The cluster configuration file (YAML)."],
        ["container-uuid", "u", None, "The container this gateway serves."],
        [
            "listen",
            "l",
            None,
            "Listen here (a Twisted TCP endpoint) instead of a random port on the "
            "GatewayAddress host; TLS is added by the gateway.",
        ],
        [
            "runtime",
            None,
            "host",
            'The container runtime: "host" (ports on this node\'s loopback) or "docker" (create '
            "the record's container; its ports are reached inside its network namespace).",
        ],
        [
            "docker-container",
            None,
            None,
            "With --runtime docker: attach to this running Docker container instead of creating "
            "one (it is left running when the gateway stops).",
        ],
    ]
    optFlags = [
        [
            "adopt",
            None,
            "With --docker-container: the container is one an earlier gateway created for this "
            "record (a dispatcher re-attaching after a restart); own it as if created here: stop "
            "it when stopped, remove it once it has exited.",
        ],
    ]

    stdin: IO[str] = sys.stdin

    def postOptions(self) -> None:
        uuid = self["container-uuid"]
        if (
            not uuid
            or not backends.UUID_RE.match(uuid)
            or backends.uuid_infix(uuid) != backends.CONTAINER_INFIX
        ):
            raise usage.UsageError("--container-uuid must be a container UUID (xxxxx-dz642-...)")
        if self["runtime"] not in ("host", "docker"):
            raise usage.UsageError(f'--runtime must be "host" or "docker", got {self["runtime"]!r}')
        if self["docker-container"] and self["runtime"] != "docker":
            raise usage.UsageError("--docker-container needs --runtime docker")
        if self["adopt"] and not self["docker-container"]:
            raise usage.UsageError("--adopt needs --docker-container")
        if self["runtime"] == "docker":
            from arvproxy.gateway.netns import PERMISSION_HINT, has_cap_sys_admin

            if not has_cap_sys_admin():
                raise usage.UsageError(f"--runtime docker: {PERMISSION_HINT}")
        self["cluster"] = read_config(self["config"])
        try:
            self["dispatch"] = read_dispatch(self.stdin)
            env = self["dispatch"]["Env"]
            self["host"], self["port"], self["secret"] = parse_gateway_env(env)
        except DispatchError as e:
            refuse(str(e))
        self["api"] = parse_api_env(self["dispatch"]["Env"])


def parse_api_env(env: dict[str, Any]) -> Any:
    """
    The Arvados API server the dispatcher's C{Env} names (a
    L{arvproxy.backends.arvados.DispatchAPI}), or C{None}.  A mistake in it (a URL, a host
    without a token...) stops the gateway with one plain line (L{refuse}).
    """
    if not (env.get("ARVADOS_API_HOST") or env.get("ARVADOS_API_TOKEN")):
        return None
    from arvproxy.backends.arvados import parse_dispatch_api

    try:
        return parse_dispatch_api(env)
    except ValueError as e:
        refuse(f"Env: {e}")


class ContainerSupervisor(Service):
    """
    Keeps the container record in step with the container: Running with the gateway's address
    once listening, and its final state and exit code when it stops.

    Calls to the cluster go through C{retrier}: a failure that may pass (L{arvproxy.retry}) is
    tried again for up to its deadline, so one 503 never cancels a container.  Only a permanent
    failure before the container runs cancels it, saying why in C{runtime_status}.

    How a stop (the service stopping: SIGTERM, SIGINT) ends the container, as crunch-run does
    (C{lib/crunchrun/crunchrun.go}: C{stop}, C{Run}, C{UpdateContainerFinal}):

      - once it is Running: the container is stopped and recorded C{Cancelled}, with the reason
        in C{runtime_status.error} (C{Complete} with its exit code if it exited first);
      - before it is Running: whatever was started is stopped and the container goes back to
        C{Queued} (crunch-run's final state "Queued"), so a dispatcher can run it again;
      - with L{hand_back} set (SIGUSR2), once it is Running: the container is left running and
        its record keeps C{Running} with an empty C{gateway_address}, for the next gateway to
        adopt (C{arv-local-dispatcher} does, when it starts).

    @ivar finished: fires once the container's end has been recorded (C{None} until Running).
    """

    def __init__(
        self,
        reactor: Any,
        cluster: Any,
        uuid: str,
        runtime: IRuntime,
        gateway: Gateway,
        retry_deadline: float = DEADLINE,
        random: Callable[[], float] = _random.random,
        output: ContainerLog | None = None,
        lock_check: Callable[[str], defer.Deferred[str]] | None = None,
    ) -> None:
        """
        @param output: where to note what happens to the container, besides the log.
        @param lock_check: on Arvados, fails (L{arvproxy.backends.arvados.NotLockHolder}) when
            the gateway's token does not hold the container's lock.
        """
        self._reactor = reactor
        self._output = output
        # Start-up calls stop trying when the gateway is stopped; recording the end never does.
        self._start_retries = Retrier(reactor, retry_deadline, random)
        self._starting = RetryingCluster(cluster, self._start_retries)
        self._cluster = RetryingCluster(cluster, Retrier(reactor, retry_deadline, random))
        self._lock_check = lock_check
        self._uuid = uuid
        self._runtime = runtime
        self._gateway = gateway
        self.finished: defer.Deferred[None] | None = None
        # The watch looks again every few seconds by itself: it needs no retries of its own.
        self.watch = ContainerWatch(reactor, cluster, uuid, runtime)
        # The listening service, so that a finished container stops new connections.
        self.listener: ListeningService | None = None
        self.hand_back = False
        self._serving: defer.Deferred[None] | None = None
        self._given_up = False
        self._status: dict[str, Any] = {}

    def serving(self, address: str) -> defer.Deferred[None]:
        """Called once the gateway listens at C{address}."""
        self._serving = defer.ensureDeferred(self._serve(address))
        self._serving.addErrback(self._failed)
        return self._serving

    def _failed(self, failure: Any) -> Any:
        """The container cannot be served: cancel it with the reason, then exit with status 1."""
        from arvproxy.backends.arvados import NotLockHolder

        if failure.check(NotLockHolder):
            # Not ours to cancel, nor to hand back: it belongs to whoever holds the lock.
            self._given_up = True
            fatal(failure, self._reactor, f"cannot serve container {self._uuid}")
            return None
        if not self.running:
            return None  # stopped while starting: stopService hands the container back
        self._given_up = True
        return defer.ensureDeferred(self._give_up(failure))

    async def _give_up(self, failure: Any) -> None:
        reason = describe(failure.value)
        self._note(f"The gateway could not start the container: {reason}")
        try:
            await self._cluster.update_container(
                self._uuid,
                state=backends.CANCELLED,
                runtime_status={
                    **self._status,
                    "error": "the gateway could not start the container",
                    "errorDetail": reason,
                },
            )
        except Exception as e:
            log.warn("Cannot mark container {uuid} Cancelled: {e}", uuid=self._uuid, e=describe(e))
        fatal(failure, self._reactor, f"cannot serve container {self._uuid}")

    async def _serve(self, address: str) -> None:
        container = await self._starting.get_container(self._uuid)
        if container.state in backends.FINAL_STATES:
            raise RuntimeError(f"container {self._uuid} is {container.state}: nothing to serve")
        if self._lock_check is not None:
            lock_check = self._lock_check
            await self._start_retries.call(
                "checking the container's lock", lambda: lock_check(self._uuid)
            )
        self._status = dict(container.runtime_status)
        self._gateway.connector.use_tls(tls_ports(container.published_ports))
        await self._runtime.start()
        if not self.running:
            return  # stopped meanwhile: stopService stops it again and hands it back
        await self._starting.update_container(
            self._uuid, state=backends.RUNNING, gateway_address=address
        )
        log.info(
            "Container {uuid} is Running; gateway at {address}", uuid=self._uuid, address=address
        )
        self._note(f"The container is Running; its gateway listens at {address}.")
        self.finished = self._runtime.exited().addCallback(
            lambda code: defer.ensureDeferred(self._exited(code))
        )
        self.watch.start()

    async def _exited(self, exit_code: int | None) -> None:
        self._gateway.accepting = False
        if self.listener is not None and self.listener.port is not None:
            port, self.listener.port = self.listener.port, None
            await port.stopListening()
        await self.watch.stop()
        changes: dict[str, Any]
        if self.hand_back and not self.watch.cancelled:
            # Left running for the next gateway: no address until it has one of its own.
            changes = {"gateway_address": ""}
            outcome = "handed back (still running, no gateway)"
        else:
            state = backends.COMPLETE if exit_code is not None else backends.CANCELLED
            changes = {"state": state, "exit_code": exit_code, "listening_ports": []}
            if not self.running and exit_code is None and not self.watch.cancelled:
                changes["runtime_status"] = {
                    **self._status,
                    "error": "its gateway was stopped (SIGTERM) while it ran",
                }
            outcome = f"{state} (exit code {exit_code})"
        try:
            await self._cluster.update_container(self._uuid, **changes)
        except Exception as e:
            log.error(
                "Cannot record that container {uuid} is {outcome}: {e}",
                uuid=self._uuid,
                outcome=outcome,
                e=describe(e),
            )
        await drain(self._reactor, self._gateway.open_requests)
        log.info("Container {uuid} is {outcome}", uuid=self._uuid, outcome=outcome)
        why = changes.get("runtime_status", {}).get("error")
        self._note(f"The container is {outcome}" + (f": {why}." if why else "."))
        if self.running and self._reactor.running:
            self._reactor.stop()

    def _note(self, text: str) -> None:
        if self._output is not None:
            try:
                self._output.note(text)
            except OSError as e:
                log.warn("Cannot keep a note of container {uuid}: {e}", uuid=self._uuid, e=e)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self.finished is not None:
            yield self._runtime.detach() if self.hand_back else self._runtime.stop()
            yield self.finished
            return
        # Not Running yet (or never will be): stop what started, and hand the container back.
        self._start_retries.stop()
        if self._serving is not None:
            yield self._serving  # a start under way finishes first (see _serve)
        if self.finished is not None:  # it got Running just now
            yield self._runtime.stop()
            yield self.finished
            return
        yield self._runtime.stop()
        if self._given_up or self._serving is None:
            return  # it never began (as crunch-run, the record is the dispatcher's to settle)
        try:
            container = yield self._cluster.get_container(self._uuid)
            if container.state == backends.LOCKED:
                yield self._cluster.update_container(self._uuid, state=backends.QUEUED)
                log.info(
                    "Container {uuid} was not Running yet: handed back (Queued)", uuid=self._uuid
                )
                self._note("The gateway was stopped before the container ran: Queued again.")
        except Exception as e:
            log.error("Cannot hand back container {uuid}: {e}", uuid=self._uuid, e=describe(e))


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    freeze_start_up(reactor)
    config = options["cluster"]
    uuid = options["container-uuid"]
    host, port, secret = options["host"], options["port"], options["secret"]
    cluster = open_cluster(reactor, config, options["dispatch"]["Env"])
    output = _keep_output(config, uuid)
    runtime: IRuntime
    if options["runtime"] == "docker":
        from arvproxy.gateway.docker_runtime import DockerRuntime, spec_from_record

        copy = output.write if output is not None else None
        if options["docker-container"]:
            since = output.last_written() if output is not None and options["adopt"] else None
            runtime = DockerRuntime(
                reactor,
                container_id=options["docker-container"],
                adopt=bool(options["adopt"]),
                output=copy,
                output_since=since,
            )
        else:
            runtime = DockerRuntime(
                reactor,
                spec=lambda: spec_from_record(cluster, uuid, config.external_url),
                output=copy,
            )
    else:
        runtime = HostRuntime(reactor)
    gateway = Gateway(
        reactor,
        uuid,
        secret,
        runtime,
        max_clock_skew=config.max_clock_skew,
        max_connections=config.limits.max_connections_per_container,
        max_anonymous=config.limits.max_anonymous_connections_per_container,
        max_anonymous_per_client=config.limits.max_anonymous_connections_per_address,
    )

    # Stopped in turn: the listener, then the supervisor (it records the container's end),
    # then the cluster backend it records that with.
    top = StopInTurn()
    cluster.setServiceParent(top)
    lock_check = cluster.container_auth if options["api"] is not None else None
    supervisor = ContainerSupervisor(
        reactor,
        cluster,
        uuid,
        runtime,
        gateway,
        config.limits.cluster_retry,
        output=output,
        lock_check=lock_check,
    )
    supervisor.setServiceParent(top)
    reactor.callWhenRunning(_hand_back_on, signal.SIGUSR2, reactor, supervisor)

    site = ProxySite(gateway, reactor, config.limits)
    tls = TLSMemoryBIOFactory(server_context_factory(secret, [host]), False, site)
    description = options["listen"] or f"tcp:{port}:interface={_escape(host)}"
    address_host = f"[{host}]" if ":" in host else host
    supervisor.listener = ListeningService(
        reactor,
        description,
        tls,
        on_listening=lambda p: supervisor.serving(f"{address_host}:{p.getHost().port}"),
        on_stopping=gateway.connector.pool.closeCachedConnections,
    )
    supervisor.listener.setServiceParent(top)
    return top


def _keep_output(config: Any, uuid: str) -> ContainerLog | None:
    """
    Where the container's output and the gateway's notes are kept (C{None}: nowhere), once
    this gateway holds the container's lock (see L{arvproxy.containerlogs}).  Held by the
    process until it exits.
    """
    if not config.container_logs:
        return None
    lock = gateway_lock(config.container_logs, uuid)
    try:
        lock.acquire()
    except Held as e:
        refuse(f"another gateway already serves container {uuid} ({e})")
    except OSError as e:
        # Not keeping its output is no reason to keep a container from running.
        log.warn(
            "Cannot keep the output of container {uuid} in {directory}: {e}",
            uuid=uuid,
            directory=config.container_logs,
            e=e,
        )
        return None
    return ContainerLog(config.container_logs, uuid, config.container_log_bytes)


def _hand_back_on(signum: int, reactor: Any, supervisor: ContainerSupervisor) -> None:
    """On C{signum}, stop the gateway handing its container back (see L{ContainerSupervisor})."""

    def hand_back() -> None:
        log.info("Handing container back (signal {signum}): it keeps running", signum=signum)
        supervisor.hand_back = True
        if reactor.running:
            reactor.stop()

    signal.signal(signum, lambda *_: reactor.callFromThread(hand_back))


def _escape(host: str) -> str:
    return host.replace(":", "\\:")
