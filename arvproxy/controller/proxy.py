"""
The front door: authorize each request to a container web service and forward it, signed, to the
container's gateway.

For a request to C{<uuid>-<port>.<suffix>} the L{Controller} moves a query token into a cookie,
checks the token and the user's permission (L{arvproxy.permissions}), resolves the container and
its gateway, and streams the request to the gateway over pinned TLS (L{GatewayConnector}),
then streams the answer back (L{arvproxy.streaming}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import iweb
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from zope.interface import implementer

from arvproxy import carrier, pages, permissions, policy
from arvproxy.backends import CONTAINER_INFIX, CONTAINER_REQUEST_INFIX, ICluster, uuid_infix
from arvproxy.carrier import Carrier, CarrierError, CarrierPool
from arvproxy.config import ClusterConfig
from arvproxy.controller import sitedata
from arvproxy.controller.portal import Portal
from arvproxy.controller.sessions import SessionMarks
from arvproxy.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    Gone,
    NotFound,
    ProxyError,
    Translating,
    Unauthorized,
)
from arvproxy.hopclient import RETRYABLE, HopPool, HopResponse, Informational
from arvproxy.httpserver import StreamingRequest
from arvproxy.limits import ConnectionSlots
from arvproxy.streaming import StreamingEndpoint, relay_informational, relay_response
from arvproxy.tlsidentity import client_creator
from arvproxy.upgrade import UpgradeResponse, open_upgrade, open_upgrade_on, relay_upgrade

log = Logger()


def split_address(address: str) -> tuple[str, int]:
    """
    Split a C{gateway_address} (C{host:port}, C{[v6]:port}).

    @raise BadGateway: it is not one.
    """
    try:
        name, port = policy.split_host(address.encode("ascii"))
    except (policy.BadRequest, UnicodeEncodeError):
        port = None
    if port is None:
        raise BadGateway(f"The container's gateway address {address!r} is not host:port.")
    return name.decode("ascii").strip("[]"), port


CARRIED_BODY_MAX = 64 * 1024
"""The largest request body sent on a carrier's stream; a larger one, or one of unknown length
(chunked), gets a connection of its own."""


class GatewayConnector:
    """
    Sends requests to gateways over TLS pinned to each container's key, reusing connections.

    Requests and WebSocket tunnels ride the streams of a few long-lived connections per
    gateway, carriers (see L{arvproxy.carrier}): the requests that one turn of the reactor
    forwards to a gateway leave in one C{send}, and its answers arrive in one C{recv}, where a
    connection per request took a system call each way for every request (small requests
    through the chain, interleaved rounds: about a fifth less CPU per request in each hop).
    An upload larger than L{CARRIED_BODY_MAX} gets a connection of its own: it costs no
    framing, and does not share a carrier's window with the container's other requests.

    Connections and carriers are pooled by (container, gateway address), so the pool never
    hands one container's connection to a request for another, and each endpoint pins the key
    derived from that container's secret.
    """

    def __init__(self, reactor: Any, connect_timeout: float = 10.0, idle_timeout: float = 240.0):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self.pool = HopPool(reactor, idle_timeout)
        # Requests and WebSocket tunnels share a few connections per gateway (arvproxy.carrier).
        self.carriers = CarrierPool(reactor, idle_timeout=idle_timeout)
        self._endpoints: dict[tuple[str, str], Any] = {}

    def endpoint(self, container_uuid: str, address: str, secret: str) -> Any:
        """A pinned TLS endpoint to a container's gateway."""
        key = (container_uuid, address)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            host, port = split_address(address)
            tcp = HostnameEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
            endpoint = StreamingEndpoint(wrapClientTLS(client_creator(secret), tcp))
            self._endpoints[key] = endpoint
        return endpoint

    async def request(
        self,
        container_uuid: str,
        address: str,
        secret: str,
        method: bytes,
        path: bytes,
        headers: Headers,
        body: iweb.IBodyProducer | None,
        informational: Informational | None = None,
    ) -> HopResponse:
        """
        Send a request to a container's gateway (see L{HopPool.request}).

        @raise BadGateway: the gateway cannot be reached, or fails the identity check.
        @raise GatewayTimeout: the connection timed out.
        """
        key: tuple[str, ...] = (container_uuid, address)
        endpoint: Any
        if body is None or (
            body.length is not iweb.UNKNOWN_LENGTH and body.length <= CARRIED_BODY_MAX
        ):
            endpoint = _CarrierStreams(self, container_uuid, address, secret)
            key = (container_uuid, address, "carried")
        else:
            endpoint = self.endpoint(container_uuid, address, secret)
        headers.setRawHeaders(b"host", [address.encode("ascii")])
        with translate_gateway_errors:
            # A request the pool sends again (its kept connection was lost) is signed again:
            # the gateway would refuse the same signature as a replay.
            return await self.pool.request(
                key,
                endpoint,
                method,
                path,
                headers,
                body,
                informational,
                before_retry=lambda headers: self._sign_again(headers, secret),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _sign_again(self, headers: Headers, secret: str) -> None:
        """Give a request that goes out once more a signature of its own."""
        headers.setRawHeaders(
            policy.AUTHORIZATION, [policy.sign(secret, self._reactor.seconds()).encode()]
        )

    async def upgrade(
        self,
        container_uuid: str,
        address: str,
        secret: str,
        method: bytes,
        path: bytes,
        headers: Headers,
    ) -> UpgradeResponse:
        """
        Send an upgrade request to a container's gateway, on a stream of a carrier.

        A carrier lost before the answer came (a gateway closing an idle carrier just as the
        tunnel set out on it) is retried once on a new carrier, signed again, as an idempotent
        request would be.
        """
        headers.setRawHeaders(b"host", [address.encode("ascii")])
        with translate_gateway_errors:
            for retry in (False, True):
                tunnels = await self.carrier(container_uuid, address, secret)
                try:
                    return await open_upgrade_on(tunnels, method, path, headers)
                except (CarrierError, BadGateway):
                    if retry or tunnels.lost is None or method not in RETRYABLE:
                        raise
                log.info("A carrier to {address} was lost: trying a new one", address=address)
                self._sign_again(headers, secret)
        raise AssertionError("unreachable")  # pragma: no cover

    def carrier(self, container_uuid: str, address: str, secret: str) -> defer.Deferred[Carrier]:
        """A carrier to a container's gateway with room for another stream."""
        return self.carriers.get(
            (container_uuid, address),
            lambda: defer.Deferred.fromCoroutine(
                self._open_carrier(container_uuid, address, secret)
            ),
        )

    async def _open_carrier(self, container_uuid: str, address: str, secret: str) -> Carrier:
        """
        Open a new carrier to a gateway: an upgrade request signed for the container, on a
        connection of its own, that the gateway must answer with C{101}.

        @raise ProxyError: the gateway refused it (see L{gateway_refusal}).
        """
        headers = Headers(
            {
                b"host": [address.encode("ascii")],
                policy.TARGET_UUID: [container_uuid.encode("ascii")],
                policy.AUTHORIZATION: [policy.sign(secret, self._reactor.seconds()).encode()],
                carrier.WINDOW_HEADER: [b"%d" % (carrier.STREAM_WINDOW,)],
            }
        )
        answer = await open_upgrade(
            self.endpoint(container_uuid, address, secret),
            b"GET",
            carrier.PATH,
            policy.with_upgrade(headers, carrier.PROTOCOL),
        )
        if answer.code != 101:
            answer.discard()
            reason = answer.headers.getRawHeaders(policy.GATEWAY_ERROR, [answer.reason])[0]
            raise gateway_refusal(container_uuid, answer.code, reason)
        try:
            window = carrier.announced_window(answer.headers)
        except CarrierError:
            answer.discard()
            raise
        tunnels = carrier.Carrier(self._reactor.callLater, announced=window)
        answer.hand_over(tunnels)
        return tunnels

    def close(self) -> defer.Deferred[list[Any]]:
        """Close every pooled connection and carrier; fires once they are gone."""
        return defer.gatherResults([self.pool.closeCachedConnections(), self.carriers.close()])


@implementer(IStreamClientEndpoint)
class _CarrierStreams:
    """
    An endpoint whose connections are streams on the carriers to one container's gateway.

    A stream set out on a carrier that was open already counts as a kept connection (see
    L{HopConnection.kept}): the gateway may have closed that carrier just before.
    """

    def __init__(
        self, connector: GatewayConnector, container_uuid: str, address: str, secret: str
    ) -> None:
        self._connector = connector
        self._gateway = (container_uuid, address, secret)

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        ready = self._connector.carrier(*self._gateway)
        kept = ready.called

        def opened(tunnels: Carrier) -> Any:
            protocol = factory.buildProtocol(None)
            protocol.kept = kept
            tunnels.open_stream(protocol)
            return protocol

        return ready.addCallback(opened)


def gateway_refusal(container_uuid: str, code: int, reason: bytes) -> ProxyError:
    """
    Log a gateway's refusal of what the front door sent it (a request, an upgrade, a carrier)
    and return the error the client gets: 410 when the container has finished, else 502.
    """
    text = reason.decode("latin-1")
    log.warn(
        "Gateway of {container} refused a request: {reason}", container=container_uuid, reason=text
    )
    if code == Gone.status:
        return Gone(
            f"Container {container_uuid} has finished; its web services are no longer available.",
            hint="Start a new container to use the service again.",
        )
    return BadGateway(
        f"The container's gateway refused the forwarded request ({text[:200]}).",
        hint="This is a problem between the proxy and the worker node; "
        "tell the cluster's administrator.",
    )


def _tls_failure(error: Exception) -> bool:
    """Whether a request failed because the TLS handshake (the gateway's identity) failed."""
    return any(r.check(SSL.Error) for r in getattr(error, "reasons", []))


def gateway_error(error: Exception) -> ProxyError | None:
    """
    The error the client should see for a failure to reach or talk to a gateway, or C{None}
    for an exception that is not one.
    """
    if isinstance(error, net_error.TimeoutError):
        return GatewayTimeout(
            "The container's gateway did not answer in time.",
            hint="The worker node may be overloaded or unreachable; try again shortly.",
        )
    if isinstance(error, (net_error.ConnectError, net_error.DNSLookupError)):
        return BadGateway(
            "The container's gateway cannot be reached.",
            hint="The container may have just stopped, or its node is unreachable.",
        )
    if isinstance(
        error, (RequestNotSent, ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)
    ):
        if _tls_failure(error):
            return BadGateway(
                "The container's gateway failed its identity check (TLS); nothing was sent."
            )
        log.warn(
            "A request to a container's gateway failed: {reasons}",
            reasons="; ".join(r.getErrorMessage() for r in getattr(error, "reasons", []))
            or repr(error),
        )
        return BadGateway("The connection to the container's gateway failed.")
    if isinstance(error, SSL.Error):
        return BadGateway(
            "The container's gateway failed its identity check (TLS); nothing was sent."
        )
    if isinstance(error, CarrierError):
        return BadGateway("The connection to the container's gateway was lost.")
    return None


# Turns failures to reach or talk to a gateway into the errors the client should see.
translate_gateway_errors = Translating(gateway_error)


class Controller:
    """
    The request handler of the front door (see L{arvproxy.streaming.ProxySite}).
    """

    def __init__(
        self,
        reactor: Any,
        config: ClusterConfig,
        cluster: ICluster,
        gateways: GatewayConnector,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._cluster = cluster
        self._gateways = gateways
        self._slots = ConnectionSlots(config.limits.max_connections_per_container)
        self.portal = Portal(reactor, config, cluster)
        self._sessions = SessionMarks(reactor, cluster)
        # Decisions are kept only with a cluster that says when its answers change.
        self._generation: Callable[[], int | None] | None = getattr(cluster, "generation", None)

    async def __call__(self, request: StreamingRequest) -> None:
        external = self._config.external_url
        host = request.getHeader(b"host")
        if host is None:
            raise BadRequest("The request has no Host header.")
        target = policy.parse_vhost(host, external)
        if target is None:
            if policy.is_service_host(host, external):
                await self.portal(request)
                return
            raise BadRequest(
                "This server only serves container web services, at addresses like "
                f"{external.url_for('<container-uuid>-<port>')}",
            )
        if not self._config.connections_enabled:
            raise permissions.services_turned_off()

        uri, query_token = policy.split_query_token(request.uri)
        decided = self._decided(request, host) if query_token is None else None
        if decided is None:
            decided = await self._decide(request, target, host, uri, query_token)
            if decided is None:
                return  # Answered already: a redirect.
        container, seen = decided
        marking = self._sessions.mark(container)  # no reuse after a connection
        if marking is not None:
            await marking
        remember = seen != container.uuid.encode("ascii")
        with self._slots.hold(container.uuid) as slot:
            tunnel = await self._forward(
                request, target, container.uuid, container.gateway_address, host, remember
            )
            if tunnel is not None:
                # The open tunnel keeps the slot; this handler (and the request) can go.
                slot.keep_until(tunnel)

    async def _decide(
        self,
        request: StreamingRequest,
        target: policy.Target,
        host: bytes,
        uri: bytes,
        query_token: bytes | None,
    ) -> tuple[Any, bytes | None] | None:
        """
        Whether C{request} may reach the service C{target} names: check the token and the
        user's permission, and find the running container.

        @return: the container, and the one the browser says it saw last (its cookie); C{None}
            when the request has been answered instead (a redirect that moves a query token
            into a cookie, or that clears a previous container's state).
        @raise ProxyError: the request is refused.
        """
        # Kept only if nothing changed in the cluster while the lookups below were made.
        generation = self._generation() if self._generation is not None else None
        seen = sitedata.seen_container(request.requestHeaders)
        found: tuple[Any, list[Any]] | None = None
        if query_token is not None or seen is not None:
            # A browser that saw a container here: does the vhost still lead to it?
            found = await self._try_resolve(target.uuid) if seen is not None else None
            stale = (
                found is not None
                and found[0] is not None
                and sitedata.is_stale(request.requestHeaders, found[0].uuid)
            )
            if query_token is not None or stale:
                new = found[0].uuid if found is not None and stale else None
                if query_token:
                    query_token = await self._session_token(query_token)
                self._redirect(request, uri, query_token, new)
                return None

        token = policy.token_from_cookies(request.requestHeaders)
        refusal: ProxyError | None = None
        credentials = None
        if token is not None:
            try:
                credentials = await self._cluster.authenticate(token.decode("ascii"))
            except UnicodeDecodeError:
                refusal = Unauthorized("Your token is not valid.")
            except Unauthorized as e:
                refusal = e

        if credentials is None:
            # Only a public port opens without a valid token; nothing else is revealed.
            found = found or await self._try_resolve(target.uuid)
            if found is None or not permissions.is_public(target.uuid, target.port, *found):
                raise refusal or Unauthorized(
                    "You need to sign in to open this container's service.",
                    hint="Open the link with your token (?arvados_api_token=...) once, "
                    "or ask the container's owner to share the container request with you.",
                )
            container, requests = found
        else:
            try:
                # Looked up once per request (the stale-state check above may have done it).
                container, requests = found or await self._resolve(target.uuid)
            except NotFound:
                # A token scoped to something else learns nothing, not even whether this exists.
                permissions.check_scope(credentials, {target.uuid}, target.port)
                raise
            if not permissions.is_public(target.uuid, target.port, container, requests):
                named = {target.uuid} | ({container.uuid} if container is not None else set())
                permissions.check_scope(credentials, named, target.port)
                levels = {}
                if not credentials.is_admin:
                    for cr in requests:
                        levels[cr.uuid] = await self._cluster.permission_level(
                            credentials.user_uuid, cr.uuid, credentials=credentials
                        )
                permissions.check_access(credentials, target.uuid, requests, levels)
        await self._check_connections_allowed(target, container, requests)
        permissions.check_running(container, target.uuid)
        self._keep(request, host, container, seen, credentials, generation)
        return container, seen

    async def _check_connections_allowed(
        self, target: policy.Target, container: Any, requests: list[Any]
    ) -> None:
        """
        @raise Forbidden: a container request that uses the container prohibits connections
            (L{permissions.check_connections_allowed}), the one in the URL or any other.
        """
        permissions.check_connections_allowed(requests)
        if container is not None and target.uuid != container.uuid:
            permissions.check_connections_allowed(
                await self._cluster.container_requests_for(container.uuid)
            )

    # The last decision on each connection: a browser or client sends request after request
    # with the same Host and cookies, and while the cluster's answers stay the same (the cache's
    # generation) and the token has not expired, the same checks would decide the same.

    def _keep(
        self,
        request: StreamingRequest,
        host: bytes,
        container: Any,
        seen: bytes | None,
        credentials: Any,
        generation: int | None,
    ) -> None:
        """
        Keep the decision to let C{request} through on its connection, if the cluster's answers
        were all of one C{generation} (the one when the decision began).
        """
        if generation is None or self._generation is None or self._generation() != generation:
            return
        expires = credentials.expires_at if credentials is not None else None
        request.channel.kept = _Decision(
            host,
            policy.cookie_values(request.requestHeaders),
            generation,
            expires.timestamp() if expires is not None else None,
            container,
            seen,
        )

    def _decided(self, request: StreamingRequest, host: bytes) -> tuple[Any, bytes | None] | None:
        """
        The decision kept on C{request}'s connection, when it holds for C{request}: the same
        Host and cookies, nothing in the cluster changed since, and the token still valid.
        """
        kept: _Decision | None = request.channel.kept
        if kept is None:
            return None
        assert self._generation is not None
        if (
            kept.host != host
            or kept.cookies != policy.cookie_values(request.requestHeaders)
            or kept.generation != self._generation()
            or (kept.expires is not None and kept.expires <= self._reactor.seconds())
        ):
            request.channel.kept = None
            return None
        return kept.container, kept.seen

    async def _session_token(self, query_token: bytes) -> bytes:
        """
        The token to keep in the cookie for a token that came in the URL.

        A short-lived token scoped to one target (the services page's "Connect" link) is used
        up here and replaced by one with the same scope that lasts a session
        (C{ArvProxy.Timeouts.ConnectSession}), so the link in the browser's history is dead at
        once while the service keeps working.  Any other token is kept as it is; an invalid one
        too (the error shows on the request that follows the redirect).
        """
        exchange = getattr(self._cluster, "exchange_token", None)
        if exchange is None:
            return query_token
        try:
            credentials = await self._cluster.authenticate(query_token.decode("ascii"))
        except (ProxyError, UnicodeDecodeError):
            return query_token
        if "all" in credentials.scopes or credentials.expires_at is None:
            return query_token
        session = self._config.limits.connect_session
        lifetime = credentials.expires_at.timestamp() - self._reactor.seconds()
        if lifetime >= session:
            return query_token
        try:
            new: str = await exchange(query_token.decode("ascii"), session)
        except Unauthorized:
            return query_token
        return new.encode("ascii")

    async def _try_resolve(self, uuid: str) -> tuple[Any, list[Any]] | None:
        """Like L{_resolve}, looked up without the user's rights; C{None} when that fails."""
        try:
            return await self._resolve(uuid)
        except ProxyError:
            return None

    def _redirect(
        self,
        request: StreamingRequest,
        uri: bytes,
        query_token: bytes | None,
        new_container: str | None,
    ) -> None:
        """
        The 303 that moves a query token into a cookie and, when the vhost now leads to
        C{new_container} (not the container the browser saw), clears the old app's state.

        @raise Gone: state must be cleared but the request is not a GET or HEAD: a form or
            fetch from the previous container's page must never reach the new one.
        """
        secure = self._config.external_url.secure
        cookies = [policy.token_set_cookie(query_token, secure)] if query_token else []
        if new_container is not None:
            cookies += sitedata.clearing_set_cookies(request.requestHeaders)
            cookies.append(sitedata.container_set_cookie(new_container, secure))
            request.setHeader(b"clear-site-data", sitedata.CLEAR_SITE_DATA)
            if request.method not in (b"GET", b"HEAD"):
                for cookie in cookies:
                    request.responseHeaders.addRawHeader(b"set-cookie", cookie)
                raise Gone(
                    "This address now leads to a different container; the page that sent "
                    "this request belonged to the previous one.",
                    hint="Reload the page.",
                )
        pages.redirect(request, uri, cookies)

    async def _resolve(self, uuid: str) -> tuple[Any, list[Any]]:
        """
        The container a URL's UUID leads to (C{None} when the request has none yet), and the
        container requests that use it.

        @raise NotFound: the same for an unknown UUID as for one the user may not see.
        """
        try:
            infix = uuid_infix(uuid)
        except ValueError:
            infix = ""
        try:
            if infix == CONTAINER_REQUEST_INFIX:
                cr = await self._cluster.get_container_request(uuid)
                if not cr.container_uuid:
                    # Said only after the permission checks (see check_running).
                    return None, [cr]
                return await self._cluster.get_container(cr.container_uuid), [cr]
            if infix == CONTAINER_INFIX:
                container = await self._cluster.get_container(uuid)
                return container, list(await self._cluster.container_requests_for(uuid))
        except NotFound:
            pass
        raise permissions.not_found(uuid)

    async def _forward(
        self,
        request: StreamingRequest,
        target: policy.Target,
        container_uuid: str,
        gateway_address: str,
        host: bytes,
        remember: bool = False,
    ) -> defer.Deferred[None] | None:
        """
        @param remember: also set the cookie that remembers which container this browser saw.
        @return: for an upgrade, a Deferred that fires when its tunnel (or relayed refusal)
            has ended; nothing once an ordinary response has been relayed.
        """
        config = self._config
        secret = policy.gateway_secret(config.system_root_token, container_uuid)
        client_ip = getattr(request.getClientAddress(), "host", None)
        headers = policy.gateway_request_headers(
            request.requestHeaders,
            target_uuid=container_uuid,
            target_port=target.port,
            request_host=host,
            authorization=policy.sign(secret, self._reactor.seconds()),
            client_ip=client_ip,
            proto="https" if request.isSecure() else config.external_url.scheme,
            trusted_peer=policy.is_trusted(client_ip, config.trusted_proxies),
        )
        upgrade = policy.upgrade_requested(request.requestHeaders) if request.body.empty else None
        if upgrade is not None and policy.is_reserved_upgrade(upgrade):
            raise BadRequest(
                "This kind of connection upgrade is reserved for the proxy itself.",
                hint="Ask for the protocol your service speaks, such as websocket.",
            )
        response: Any
        if upgrade is not None:
            response = await self._gateways.upgrade(
                container_uuid,
                gateway_address,
                secret,
                request.method,
                request.uri,
                policy.with_upgrade(headers, upgrade),
            )
        else:
            body = None if request.body.empty else request.body
            response = await self._gateways.request(
                container_uuid,
                gateway_address,
                secret,
                request.method,
                request.uri,
                headers,
                body,
                informational=relay_informational(request),
            )
        reason = response.headers.getRawHeaders(policy.GATEWAY_ERROR)
        if reason:
            if upgrade is not None:
                response.discard()
            else:
                response.deliverBody(_Discard())
            raise gateway_refusal(container_uuid, response.code, reason[0])
        if remember:
            request.responseHeaders.addRawHeader(
                b"set-cookie",
                sitedata.container_set_cookie(container_uuid, config.external_url.secure),
            )
        if upgrade is not None:
            return relay_upgrade(request, response)
        await relay_response(request, response)
        return None


@dataclass(frozen=True, slots=True)
class _Decision:
    """A connection's last decision (see L{Controller._keep})."""

    host: bytes
    cookies: list[bytes] | None
    generation: int
    expires: float | None
    container: Any
    seen: bytes | None


class _Discard(Protocol):
    """Reads and drops a response body, so its connection can go back to the pool."""

    def dataReceived(self, data: bytes) -> None:
        pass
