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
from twisted.internet.endpoints import HostnameEndpoint
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

from arvproxy import carrier, deadlines, pages, permissions, policy
from arvproxy.backends import CONTAINER_INFIX, CONTAINER_REQUEST_INFIX, ICluster, uuid_infix
from arvproxy.carrier import Carrier, CarrierError, CarrierPool
from arvproxy.config import ClusterConfig, Limits
from arvproxy.controller import signin, sitedata
from arvproxy.controller.logpage import logs_path
from arvproxy.controller.portal import Portal
from arvproxy.controller.sessions import SessionMarks
from arvproxy.controller.statecookies import StateCookies
from arvproxy.deadlines import tls_with_deadline
from arvproxy.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    Gone,
    NotFound,
    ProxyError,
    Translating,
    Unauthorized,
    Unavailable,
)
from arvproxy.hopclient import RETRYABLE, HopPool, HopResponse, Informational
from arvproxy.httpserver import StreamingRequest
from arvproxy.limits import ConnectionSlots, client_key
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

    Each step towards a gateway has a deadline (L{arvproxy.deadlines}), past which the client
    gets a 504: TCP's connect (C{connect_timeout}), the TLS handshake (C{tls_handshake}), a
    carrier's handshake (C{carrier_handshake}) and the head of each answer, or of a WebSocket's
    C{101}, once the request has been sent (C{response_headers}).
    """

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float = 10.0,
        idle_timeout: float = 240.0,
        tls_handshake: float = Limits.tls_handshake,
        carrier_handshake: float = Limits.carrier_handshake,
        response_headers: float = Limits.response_headers,
        old_gateways: bool = False,
    ):
        """
        @param old_gateways: sign for gateways from before signatures were bound to requests
            too (see L{policy.sign_request}).
        """
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._tls_handshake = tls_handshake
        self._carrier_handshake = carrier_handshake
        self._response_headers = response_headers
        self._old_gateways = old_gateways
        self.pool = HopPool(reactor, idle_timeout, answer_timeout=response_headers)
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
            tls = tls_with_deadline(client_creator(secret), tcp, self._reactor, self._tls_handshake)
            endpoint = StreamingEndpoint(tls)
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
        Send a request to a container's gateway (see L{HopPool.request}), signed already (see
        L{sign}).

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
                before_retry=lambda headers: self.sign(headers, secret, method, path),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def sign(self, headers: Headers, secret: str, method: bytes, target: bytes) -> None:
        """
        Sign a request for a container's gateway (L{policy.sign_request}), once C{headers} hold
        everything the signature binds; a request that goes out once more is signed again (the
        gateway would refuse the same signature as a replay).
        """
        policy.sign_request(
            headers, secret, self._reactor.seconds(), method, target, self._old_gateways
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
        Send an upgrade request to a container's gateway, on a stream of a carrier, signed
        already (see L{sign}).

        A carrier lost before the answer came (a gateway closing an idle carrier just as the
        tunnel set out on it) is retried once on a new carrier, signed again, as an idempotent
        request would be.
        """
        headers.setRawHeaders(b"host", [address.encode("ascii")])
        with translate_gateway_errors:
            for retry in (False, True):
                tunnels = await self.carrier(container_uuid, address, secret)
                try:
                    return await open_upgrade_on(
                        tunnels,
                        method,
                        path,
                        headers,
                        (self._reactor, self._response_headers, deadlines.ANSWER_HEAD),
                    )
                except (CarrierError, BadGateway):
                    if retry or tunnels.lost is None or method not in RETRYABLE:
                        raise
                log.info("A carrier to {address} was lost: trying a new one", address=address)
                self.sign(headers, secret, method, path)
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
                carrier.WINDOW_HEADER: [b"%d" % (carrier.STREAM_WINDOW,)],
            }
        )
        policy.with_upgrade(headers, carrier.PROTOCOL)
        self.sign(headers, secret, b"GET", carrier.PATH)
        answer = await open_upgrade(
            self.endpoint(container_uuid, address, secret),
            b"GET",
            carrier.PATH,
            headers,
            (self._reactor, self._carrier_handshake, deadlines.CARRIER_HANDSHAKE),
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
    deadline = deadlines.deadline_of(error)
    if deadline is not None:
        log.warn("A request to a container's gateway timed out: {error}", error=str(deadline))
        return _TIMEOUTS[deadline.step](deadline.seconds)
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


# The 504 for each step that missed its deadline (see arvproxy.deadlines), given the seconds.
_TIMEOUTS: dict[str, Callable[[float], ProxyError]] = {
    deadlines.TLS_HANDSHAKE: lambda seconds: GatewayTimeout(
        f"The container's gateway did not complete the TLS handshake within {seconds:g} s.",
        hint="Its node may be stopped or overloaded, or something else answers at its address; "
        "try again shortly.",
    ),
    deadlines.CARRIER_HANDSHAKE: lambda seconds: GatewayTimeout(
        f"The container's gateway did not accept the connection within {seconds:g} s.",
        hint="Its node may be stopped or overloaded; try again shortly.",
    ),
    deadlines.ANSWER_HEAD: lambda seconds: GatewayTimeout(
        f"The container's service did not start to answer within {seconds:g} s.",
        hint="The service, or its node, is busy or stuck; try again later.",
    ),
}

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
        self._slots = ConnectionSlots.from_limits(config.limits)
        self.cookies = StateCookies(config.system_root_token, config.external_url)
        self.portal = Portal(reactor, config, cluster)
        self._sessions = SessionMarks(reactor, cluster)
        # Decisions are kept only with a cluster that says when its answers change.
        self._generation: Callable[[], int | None] | None = getattr(cluster, "generation", None)

    async def __call__(self, request: StreamingRequest) -> None:
        try:
            await self._handle(request)
        except (Gone, BadGateway, Unavailable) as e:
            # The container finished, broke or is not there yet: say where its logs are.
            host = request.getHeader(b"host")
            target = policy.parse_vhost(host, self._config.external_url) if host else None
            if target is not None:
                url = self._config.external_url.url_for(None, logs_path(target.uuid))
                e.links = (*e.links, ("Logs", url))
            raise

    async def _handle(self, request: StreamingRequest) -> None:
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
        uri, sealed = policy.split_query_token(uri, signin.SWITCH_PARAM)
        linked = query_token is not None or sealed is not None
        decided = self._decided(request, host) if not linked else None
        if decided is None:
            decided = await self._decide(request, target, host, uri, query_token, sealed)
            if decided is None:
                return  # Answered already: a redirect.
        container, seen, with_access = decided
        marking = self._sessions.mark(container)  # no reuse after a connection
        if marking is not None:
            await marking
        # The marker is set again unless the browser sent a valid one naming this container.
        remember = container.uuid.encode("ascii") not in seen
        anonymous = None if with_access else self._client_key(request)
        with self._slots.hold(container.uuid, anonymous) as slot:
            tunnel = await self._forward(
                request,
                target,
                container.uuid,
                container.gateway_address,
                host,
                remember,
                anonymous,
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
        sealed: bytes | None = None,
    ) -> tuple[Any, tuple[bytes, ...], bool] | None:
        """
        Whether C{request} may reach the service C{target} names: check the token and the
        user's permission, and find the running container.

        @return: the container, the containers the browser says it saw here last (its valid
            markers), and whether the user has access to the container (C{False}: anonymous,
            let through only because the port is public); C{None} when the request has been
            answered instead (a redirect that moves a query token into a cookie, or that clears
            a previous container's state, or the question whether to switch users, L{signin}).
        @raise ProxyError: the request is refused.
        """
        # Kept only if nothing changed in the cluster while the lookups below were made.
        generation = self._generation() if self._generation is not None else None
        host_name = policy.split_host(host)[0]
        seen = tuple(self.cookies.seen_containers(request.requestHeaders, host_name))
        found: tuple[Any, list[Any]] | None = None
        linked = query_token is not None or sealed is not None
        if linked or seen:
            # A browser that saw a container here: does the vhost still lead to it?
            found = await self._try_resolve(target.uuid) if seen else None
            stale = (
                found is not None
                and found[0] is not None
                and sitedata.is_stale(list(seen), found[0].uuid)
            )
            if linked or stale:
                new = found[0].uuid if found is not None and stale else None
                confirmed = False
                if linked:
                    # Never silently signed in as someone else (login CSRF): see signin.
                    answer = await signin.link_token(
                        request,
                        self._cluster,
                        self.cookies,
                        self._config,
                        host,
                        uri,
                        query_token,
                        sealed,
                        self._reactor.seconds(),
                    )
                    if answer is None:
                        return None
                    query_token, confirmed = answer
                    if query_token:
                        query_token = await self._session_token(query_token)
                self._redirect(request, host_name, uri, query_token, new, confirmed)
                return None

        credentials = None
        refusal: ProxyError | None = None
        # A cookie planted from a sibling host may come first: the first that works is used.
        for token in self.cookies.tokens(request.requestHeaders):
            try:
                credentials = await self._cluster.authenticate(token.decode("ascii"))
            except Unauthorized as e:
                refusal = refusal or e
            else:
                break

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
            with_access = False
        else:
            try:
                # Looked up once per request (the stale-state check above may have done it).
                container, requests = found or await self._resolve(target.uuid)
            except NotFound:
                # A token scoped to something else learns nothing, not even whether this exists.
                permissions.check_scope(credentials, {target.uuid}, target.port)
                raise
            if not permissions.is_public(target.uuid, target.port, container, requests):
                await self._check_access(credentials, target, container, requests)
                with_access = True
            else:
                # Anyone may open a public port; someone with access does not count as anonymous.
                try:
                    await self._check_access(credentials, target, container, requests)
                    with_access = True
                except ProxyError:
                    with_access = False
        await self._check_connections_allowed(target, container, requests)
        permissions.check_running(container, target.uuid)
        self._keep(request, host, container, seen, credentials, generation, with_access)
        return container, seen, with_access

    async def _check_access(
        self, credentials: Any, target: policy.Target, container: Any, requests: list[Any]
    ) -> None:
        """
        @raise ProxyError: the token's scope or the user's permissions do not let them connect
            to C{target} (see L{permissions.check_scope} and L{permissions.check_access}).
        """
        named = {target.uuid} | ({container.uuid} if container is not None else set())
        permissions.check_scope(credentials, named, target.port)
        levels = {}
        if not credentials.is_admin:
            for cr in requests:
                levels[cr.uuid] = await self._cluster.permission_level(
                    credentials.user_uuid, cr.uuid, credentials=credentials
                )
        permissions.check_access(credentials, target.uuid, requests, levels)

    def _client_key(self, request: StreamingRequest) -> str:
        """What an anonymous request counts under: its client's address (L{client_key})."""
        return client_key(
            getattr(request.getClientAddress(), "host", None),
            request.requestHeaders.getRawHeaders(b"x-forwarded-for"),
            self._config.trusted_proxies,
        )

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
        seen: tuple[bytes, ...],
        credentials: Any,
        generation: int | None,
        with_access: bool,
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
            with_access,
        )

    def _decided(
        self, request: StreamingRequest, host: bytes
    ) -> tuple[Any, tuple[bytes, ...], bool] | None:
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
        return kept.container, kept.seen, kept.with_access

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
        host_name: bytes,
        uri: bytes,
        query_token: bytes | None,
        new_container: str | None,
        confirmed: bool = False,
    ) -> None:
        """
        The 303 that moves a query token into a cookie and, when the vhost now leads to
        C{new_container} (not the container the browser saw), clears the old app's state.

        @param confirmed: the request is the POST of the front door's own question whether to
            switch users (L{signin}), which never reaches any container.
        @raise Gone: state must be cleared but the request is not a GET or HEAD (nor
            C{confirmed}): a form or fetch from the previous container's page must never reach
            the new one.
        """
        secure = self._config.external_url.secure
        cookies = [self.cookies.token_set_cookie(query_token)] if query_token else []
        if new_container is not None:
            cookies += sitedata.clearing_set_cookies(request.requestHeaders, secure)
            cookies.append(self.cookies.container_set_cookie(host_name, new_container))
            request.setHeader(b"clear-site-data", sitedata.CLEAR_SITE_DATA)
            if request.method not in (b"GET", b"HEAD") and not confirmed:
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
        anonymous: str | None = None,
    ) -> defer.Deferred[None] | None:
        """
        @param remember: also set the cookie that remembers which container this browser saw.
        @param anonymous: for an anonymous request, its client's key, which the gateway is told
            (L{policy.ANONYMOUS_CLIENT}) to count it under.
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
            client_ip=client_ip,
            proto="https" if request.isSecure() else config.external_url.scheme,
            trusted_peer=policy.is_trusted(client_ip, config.trusted_proxies),
            trusted_proxies=config.trusted_proxies,
        )
        if anonymous is not None:
            headers.setRawHeaders(policy.ANONYMOUS_CLIENT, [anonymous.encode("ascii")])
        upgrade = policy.upgrade_requested(request.requestHeaders) if request.body.empty else None
        if upgrade is not None and policy.is_reserved_upgrade(upgrade):
            raise BadRequest(
                "This kind of connection upgrade is reserved for the proxy itself.",
                hint="Ask for the protocol your service speaks, such as websocket.",
            )
        if upgrade is not None:
            policy.with_upgrade(headers, upgrade)
        # Bound to what the gateway acts on, all set by now (see policy.request_binding).
        policy.sign_request(
            headers,
            secret,
            self._reactor.seconds(),
            request.method,
            request.uri,
            config.sign_for_old_gateways,
        )
        response: Any
        if upgrade is not None:
            response = await self._gateways.upgrade(
                container_uuid, gateway_address, secret, request.method, request.uri, headers
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
                self.cookies.container_set_cookie(policy.split_host(host)[0], container_uuid),
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
    seen: tuple[bytes, ...]
    with_access: bool


class _Discard(Protocol):
    """Reads and drops a response body, so its connection can go back to the pool."""

    def dataReceived(self, data: bytes) -> None:
        pass
