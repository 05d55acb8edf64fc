"""
The node gateway's request handler: believe only requests the controller signed for this
container, then proxy them to the target port inside the container.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from zope.interface import implementer

from arvproxy import carrier, policy
from arvproxy.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    Gone,
    ProxyError,
    Translating,
    Unauthorized,
    Unavailable,
)
from arvproxy.gateway.runtime import IRuntime
from arvproxy.hopclient import HopPool, HopResponse, Informational
from arvproxy.httpserver import StreamingRequest
from arvproxy.limits import ConnectionSlots
from arvproxy.streaming import StreamingEndpoint, relay_informational, relay_response
from arvproxy.upgrade import UpgradeResponse, open_upgrade, relay_upgrade, take_over

log = Logger()


def refusal(error_type: type[ProxyError], reason: str) -> ProxyError:
    """An error the gateway produces itself, marked as such for the controller."""
    return error_type(reason, headers={policy.GATEWAY_ERROR: reason.encode("ascii", "replace")})


class ContainerConnector:
    """
    Sends requests to ports inside the container, reusing connections per port.

    The pool is this gateway's own and serves one container, so it can never mix two
    containers' connections.
    """

    # Idle pooled connections to the service are dropped before common servers drop them
    # themselves (Node's default keep-alive is 5 s): a request sent on a connection the service
    # is closing fails, and one with a body cannot be retried.
    IDLE_TIMEOUT = 4.0

    def __init__(self, reactor: Any, runtime: IRuntime, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._runtime = runtime
        self.pool = HopPool(reactor, idle_timeout)
        self._endpoints: dict[int, Any] = {}
        self.tls_ports: frozenset[int] = frozenset()

    def endpoint(self, port: int) -> Any:
        """
        The endpoint for C{port} in the container: TLS when the port is one of L{tls_ports}.

        The service's certificate is not verified: the connection never leaves the node (it is
        made inside the container's own network namespace or on loopback), and services that
        speak TLS there use self-signed certificates.
        """
        endpoint = self._endpoints.get(port)
        if endpoint is None:
            endpoint = self._runtime.endpoint(port)
            if port in self.tls_ports:
                endpoint = wrapClientTLS(_UnverifiedTLS(), endpoint)
            endpoint = self._endpoints[port] = StreamingEndpoint(endpoint)
        return endpoint

    def use_tls(self, ports: Iterable[int]) -> None:
        """Speak TLS to these ports (declared C{"protocol": "https"} in C{published_ports})."""
        self.tls_ports = frozenset(ports)
        self._endpoints.clear()

    async def request(
        self,
        port: int,
        method: bytes,
        path: bytes,
        headers: Any,
        body: Any,
        informational: Informational | None = None,
    ) -> HopResponse:
        """
        Send a request to C{port} (see L{HopPool.request}).

        @raise Unavailable: nothing listens on C{port} (yet).
        @raise BadGateway: the connection failed otherwise.
        """
        with translate_container_errors(port):
            return await self.pool.request(
                port, self.endpoint(port), method, path, headers, body, informational
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def upgrade(self, port: int, method: bytes, path: bytes, headers: Any) -> UpgradeResponse:
        """Send an upgrade request to C{port} on a connection of its own."""
        with translate_container_errors(port):
            return await open_upgrade(self.endpoint(port), method, path, headers)
        raise AssertionError("unreachable")  # pragma: no cover


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS to a service inside the container, whatever its (usually self-signed) certificate."""

    def __init__(self) -> None:
        self._context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._context.set_verify(SSL.VERIFY_NONE)
        self._context.set_alpn_protos([b"http/1.1"])

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


def tls_ports(published_ports: dict[str, dict[str, Any]]) -> list[int]:
    """The ports declared with C{"protocol": "https"} in a container's C{published_ports}."""
    return [int(port) for port, spec in published_ports.items() if spec.get("protocol") == "https"]


def container_error(port: int, error: Exception) -> ProxyError | None:
    """
    The error the client should see for a failure to reach the service on C{port}, or C{None}
    for an exception that is not one.
    """
    if isinstance(error, net_error.ConnectionRefusedError):
        return Unavailable(
            f"Nothing in the container is listening on port {port} yet. "
            "This page will retry by itself.",
            hint="If the service should be up by now, check that it listens on this port.",
        )
    if isinstance(error, net_error.TimeoutError):
        return GatewayTimeout(f"The service on port {port} did not accept a connection in time.")
    if isinstance(
        error,
        (
            net_error.ConnectError,
            RequestNotSent,
            ResponseNeverReceived,
            RequestTransmissionFailed,
            ResponseFailed,
        ),
    ):
        return BadGateway(f"The connection to the service on port {port} failed.")
    return None


@functools.lru_cache(maxsize=256)
def translate_container_errors(port: int) -> Translating:
    """
    Turns failures to reach the service on C{port} into the errors the client should see (one
    for each port, made once: it wraps every request).
    """
    return Translating(functools.partial(container_error, port))


class Gateway:
    """
    The request handler of a node gateway (see L{arvproxy.streaming.ProxySite}).

    Requests and tunnels open at once are limited as in the front door (L{ConnectionSlots}):
    C{max_connections} in all, of which C{max_anonymous} (and C{max_anonymous_per_client} per
    client) for those the front door marked anonymous (L{policy.ANONYMOUS_CLIENT}), so that a
    container's anonymous visitors never lock out the people with access to it, however many
    front-door processes send their requests here.

    @ivar accepting: whether new requests are served; cleared when the container has finished.
    """

    def __init__(
        self,
        reactor: Any,
        container_uuid: str,
        secret: str,
        runtime: IRuntime,
        max_clock_skew: float = 300.0,
        max_connections: int = 1000,
        max_anonymous: int | None = None,
        max_anonymous_per_client: int | None = None,
    ) -> None:
        self._reactor = reactor
        self._uuid = container_uuid.encode("ascii")
        self._secret = secret
        self.nonces = policy.NonceCache(max_clock_skew)
        self.connector = ContainerConnector(reactor, runtime)
        self.accepting = True
        self._slots = ConnectionSlots(max_connections, max_anonymous, max_anonymous_per_client)

    def open_requests(self) -> int:
        """How many requests (and tunnels) to the container are open now."""
        return self._slots.open(self._uuid.decode("ascii"))

    def _check_signed(self, request: StreamingRequest) -> None:
        """
        Check that a request was signed by the front door, for this container, and for this
        very request (L{policy.request_binding}).

        @raise ProxyError: marked as the gateway's own refusal.
        """
        headers = request.requestHeaders
        try:
            policy.verify(
                headers.getRawHeaders(policy.SIGNATURE),
                self._secret,
                self._reactor.seconds(),
                self.nonces,
                policy.request_binding(request.method, request.uri, headers),
            )
        except policy.SignatureError as e:
            raise refusal(Unauthorized, str(e)) from None
        if headers.getRawHeaders(policy.TARGET_UUID) != [self._uuid]:
            raise refusal(BadGateway, "misdirected request: the target is another container")

    def check(self, request: StreamingRequest) -> tuple[int, bytes]:
        """
        Check a forwarded request's signature and target.

        @return: the target port and the original request's host.
        @raise ProxyError: marked as the gateway's own refusal.
        """
        self._check_signed(request)
        headers = request.requestHeaders
        try:
            port = policy.parse_target_port(headers.getRawHeaders(policy.TARGET_PORT))
        except ValueError as e:
            raise refusal(BadRequest, str(e)) from None
        hosts = headers.getRawHeaders(policy.REQUEST_HOST)
        if not hosts or len(hosts) != 1 or not hosts[0]:
            raise refusal(BadGateway, "missing x-arvados-request-host")
        return port, hosts[0]

    async def __call__(self, request: StreamingRequest) -> None:
        if policy.upgrade_requested(request.requestHeaders) == carrier.PROTOCOL:
            self._carry(request)
            return
        port, request_host = self.check(request)
        if not self.accepting:
            raise refusal(Gone, "the container has finished")
        # Believed: the request is the front door's (checked above), and no client can send it.
        anonymous = request.requestHeaders.getRawHeaders(policy.ANONYMOUS_CLIENT)
        client = anonymous[-1].decode("ascii", "replace") if anonymous else None
        with self._slots.hold(self._uuid.decode("ascii"), client) as slot:
            tunnel = await self._proxy(request, port, request_host)
            if tunnel is not None:
                # The open tunnel keeps the slot; this handler (and the request) can go.
                slot.keep_until(tunnel)

    def _carry(self, request: StreamingRequest) -> None:
        """
        Accept a carrier from the front door (see L{arvproxy.carrier}): its handshake is
        signed like any forwarded request, and each stream on it (a request or a tunnel) is then
        served by an HTTP channel of its own, which checks the stream's own signed request as
        usual.
        """
        headers = request.requestHeaders
        self._check_signed(request)
        if (
            request.path != carrier.PATH
            or headers.hasHeader(policy.TARGET_PORT)
            or headers.hasHeader(policy.REQUEST_HOST)
            or not request.body.empty
            or isinstance(request.client_transport(), carrier.Stream)
        ):
            raise refusal(BadRequest, "not a carrier handshake")
        try:
            window = carrier.announced_window(headers)
        except carrier.CarrierError as e:
            raise refusal(BadRequest, str(e)) from None
        if not self.accepting:
            raise refusal(Gone, "the container has finished")
        http_channel: Any = request.channel
        site = http_channel.site

        def serve(stream: carrier.Stream) -> None:
            channel = site.buildProtocol(stream.getPeer())
            stream.protocol = channel
            channel.makeConnection(stream)

        tunnels = carrier.Carrier(self._reactor.callLater, accept=serve, announced=window)
        head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n" % (
            carrier.PROTOCOL,
        )
        if window is not None:
            head += b"%s: %d\r\n" % (carrier.WINDOW_HEADER, tunnels.window)
        transport, buffered = take_over(
            request,
            head + b"\r\n",
            tunnels.dataReceived,
            tunnels.connectionLost,
        )
        tunnels.makeConnection(transport)
        if buffered:
            tunnels.dataReceived(buffered)
        transport.resumeProducing()

    async def _proxy(
        self, request: StreamingRequest, port: int, request_host: bytes
    ) -> defer.Deferred[None] | None:
        """
        @return: for an upgrade, a Deferred that fires when its tunnel (or relayed refusal)
            has ended; nothing once an ordinary response has been relayed.
        """
        headers = policy.container_request_headers(request.requestHeaders, request_host)
        upgrade = policy.upgrade_requested(request.requestHeaders) if request.body.empty else None
        if upgrade is not None:
            headers = policy.with_upgrade(headers, upgrade)
            answer = await self.connector.upgrade(port, request.method, request.uri, headers)
            return relay_upgrade(request, answer)
        body = None if request.body.empty else request.body
        response = await self.connector.request(
            port, request.method, request.uri, headers, body, relay_informational(request)
        )
        await relay_response(request, response)
        return None
