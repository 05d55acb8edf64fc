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
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from arvproxy import backends, policy
from arvproxy.gateway.runtime import HostRuntime, IRuntime
from arvproxy.gateway.server import Gateway, tls_ports
from arvproxy.gateway.watch import ContainerWatch, drain
from arvproxy.httpserver import ProxySite
from arvproxy.service import (
    ListeningService,
    fatal,
    freeze_start_up,
    open_cluster,
    read_config,
)
from arvproxy.tlsidentity import server_context_factory

log = Logger()

SECRET_LENGTH = 64


def read_dispatch(stream: IO[str]) -> dict[str, Any]:
    """
    Read one JSON document from the dispatcher (without waiting for end of file).

    @raise usage.UsageError: it is not a JSON object with the settings a gateway needs.
    """
    text = ""
    document: Any = None
    while document is None:
        line = stream.readline()
        if not line:
            raise usage.UsageError(
                "expected the dispatcher's JSON on standard input, like "
                '{"Env": {"GatewayAddress": "10.0.0.5:0", "GatewayAuthSecret": "..."}}'
            )
        text += line
        try:
            document = json.loads(text)
        except ValueError:
            continue
    env = document.get("Env") if isinstance(document, dict) else None
    if not isinstance(env, dict):
        raise usage.UsageError('the JSON on standard input has no "Env" object')
    return document


def parse_gateway_env(env: dict[str, Any]) -> tuple[str, int, str]:
    """
    The listening host, port and secret from the dispatcher's C{Env}.

    @raise usage.UsageError: C{GatewayAddress} or C{GatewayAuthSecret} is missing or malformed.
    """
    address = env.get("GatewayAddress")
    if not isinstance(address, str) or not address:
        raise usage.UsageError('Env.GatewayAddress is missing: expected "host:0" (or host:port)')
    try:
        name, port = policy.split_host(address.encode("ascii"))
    except (policy.BadRequest, UnicodeEncodeError):
        port = None
    if port is None or not name:
        raise usage.UsageError(f"Env.GatewayAddress must be host:port, got {address!r}")
    secret = env.get("GatewayAuthSecret")
    if not isinstance(secret, str) or not secret:
        raise usage.UsageError(
            "Env.GatewayAuthSecret is missing: refusing to start without a secret "
            "(the dispatcher passes hex(HMAC-SHA256(SystemRootToken, container UUID)))"
        )
    if len(secret) < SECRET_LENGTH:
        raise usage.UsageError(
            f"Env.GatewayAuthSecret is too short ({len(secret)} characters, "
            f"expected {SECRET_LENGTH} hex digits)"
        )
    return name.decode("ascii").strip("[]"), port, secret


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
        if self["runtime"] == "docker":
            from arvproxy.gateway.netns import PERMISSION_HINT, has_cap_sys_admin

            if not has_cap_sys_admin():
                raise usage.UsageError(f"--runtime docker: {PERMISSION_HINT}")
        self["cluster"] = read_config(self["config"])
        self["dispatch"] = read_dispatch(self.stdin)
        self["host"], self["port"], self["secret"] = parse_gateway_env(self["dispatch"]["Env"])
        self["api"] = parse_api_env(self["dispatch"]["Env"])


def parse_api_env(env: dict[str, Any]) -> Any:
    """
    The Arvados API server the dispatcher's C{Env} names (a
    L{arvproxy.backends.arvados.DispatchAPI}), or C{None}.

    @raise usage.UsageError: it names one wrongly (a URL, a host without a token...).
    """
    if not (env.get("ARVADOS_API_HOST") or env.get("ARVADOS_API_TOKEN")):
        return None
    from arvproxy.backends.arvados import parse_dispatch_api

    try:
        return parse_dispatch_api(env)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


class ContainerSupervisor(Service):
    """
    Keeps the container record in step with the container: Running with the gateway's address
    once listening, and its final state and exit code when it stops.
    """

    def __init__(
        self,
        reactor: Any,
        cluster: Any,
        uuid: str,
        runtime: IRuntime,
        gateway: Gateway,
        lock_check: Callable[[str], defer.Deferred[str]] | None = None,
    ) -> None:
        """
        @param lock_check: on Arvados, fails (L{arvproxy.backends.arvados.NotLockHolder}) when
            the gateway's token does not hold the container's lock.
        """
        self._reactor = reactor
        self._cluster = cluster
        self._lock_check = lock_check
        self._uuid = uuid
        self._runtime = runtime
        self._gateway = gateway
        self.finished: defer.Deferred[None] | None = None
        self.watch = ContainerWatch(reactor, cluster, uuid, runtime)
        # The listening service, so that a finished container stops new connections.
        self.listener: ListeningService | None = None

    def serving(self, address: str) -> defer.Deferred[None]:
        """Called once the gateway listens at C{address}."""
        d = defer.ensureDeferred(self._serve(address))
        d.addErrback(self._failed)
        return d

    @defer.inlineCallbacks
    def _failed(self, failure: Any) -> Any:
        """The container cannot be served: cancel it with the reason, then exit with status 1."""
        from arvproxy.backends.arvados import NotLockHolder

        if failure.check(NotLockHolder):
            # Not ours to cancel: it belongs to whoever holds the lock.
            fatal(failure, self._reactor, f"cannot serve container {self._uuid}")
            return
        try:
            yield self._cluster.update_container(
                self._uuid,
                state=backends.CANCELLED,
                runtime_status={"error": f"the gateway could not start it: {failure.value}"},
            )
        except Exception as e:
            log.warn("Cannot mark container {uuid} Cancelled: {e}", uuid=self._uuid, e=e)
        fatal(failure, self._reactor, f"cannot serve container {self._uuid}")

    async def _serve(self, address: str) -> None:
        container = await self._cluster.get_container(self._uuid)
        if container.state in backends.FINAL_STATES:
            raise RuntimeError(f"container {self._uuid} is {container.state}: nothing to serve")
        if self._lock_check is not None:
            await self._lock_check(self._uuid)
        self._gateway.connector.use_tls(tls_ports(container.published_ports))
        await self._runtime.start()
        await self._cluster.update_container(
            self._uuid, state=backends.RUNNING, gateway_address=address
        )
        log.info(
            "Container {uuid} is Running; gateway at {address}", uuid=self._uuid, address=address
        )
        self.finished = self._runtime.exited().addCallback(self._exited)
        self.watch.start()

    @defer.inlineCallbacks
    def _exited(self, exit_code: int | None) -> Any:
        self._gateway.accepting = False
        # Record the final state first: at shutdown (SIGTERM) the registry service is stopped
        # alongside this one, and a call made after a later yield would find it stopped.
        state = backends.COMPLETE if exit_code is not None else backends.CANCELLED
        update = self._cluster.update_container(
            self._uuid, state=state, exit_code=exit_code, listening_ports=[]
        )
        if self.listener is not None and self.listener.port is not None:
            port, self.listener.port = self.listener.port, None
            yield port.stopListening()
        yield self.watch.stop()
        yield update
        yield defer.ensureDeferred(drain(self._reactor, self._gateway.open_requests))
        log.info(
            "Container {uuid} is {state} (exit code {code})",
            uuid=self._uuid,
            state=state,
            code=exit_code,
        )
        if self.running and self._reactor.running:
            self._reactor.stop()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        yield self._runtime.stop()
        if self.finished is not None:
            yield self.finished


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    freeze_start_up(reactor)
    config = options["cluster"]
    uuid = options["container-uuid"]
    host, port, secret = options["host"], options["port"], options["secret"]
    cluster = open_cluster(reactor, config, options["dispatch"]["Env"])
    runtime: IRuntime
    if options["runtime"] == "docker":
        from arvproxy.gateway.docker_runtime import DockerRuntime, spec_from_record

        if options["docker-container"]:
            runtime = DockerRuntime(reactor, container_id=options["docker-container"])
        else:
            runtime = DockerRuntime(
                reactor, spec=lambda: spec_from_record(cluster, uuid, config.external_url)
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

    top = MultiService()
    cluster.setServiceParent(top)
    lock_check = cluster.container_auth if options["api"] is not None else None
    supervisor = ContainerSupervisor(reactor, cluster, uuid, runtime, gateway, lock_check)
    supervisor.setServiceParent(top)

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


def _escape(host: str) -> str:
    return host.replace(":", "\\:")
