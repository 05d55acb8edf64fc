"""
Fakes and helpers for testing arvproxy in memory, shipped in the package so every test (and any
downstream project) drives the real code without sockets or sleeps.

  - L{FakeCluster}: an L{ICluster} held in dicts, obeying the same contract as the embedded
    registry, with helpers to add users, tokens, container requests, containers and permission
    links, and a record of every call.
  - L{FakeGatewayConnector}: stands in for the controller's L{GatewayConnector}; records what the
    controller would send to a gateway and answers with a canned (or streamed) L{FakeResponse}.
  - L{FakeRuntime} and L{MemoryEndpoint}: a container runtime whose ports are in-memory
    connections, or refuse.
  - L{MemoryClient} and L{parse_responses}: feed raw request bytes to a L{ProxySite} over a
    C{StringTransport} and read back the responses.
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import h11
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import iweb
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from arvproxy.backends import (
    CAN_MANAGE,
    CONTAINER_INFIX,
    CONTAINER_REQUEST_INFIX,
    FINAL_STATES,
    LEVELS,
    LINK_INFIX,
    QUEUED,
    RUNNING,
    TOKEN_INFIX,
    UPDATABLE_CONTAINER_FIELDS,
    USER_INFIX,
    UUID_RE,
    Container,
    ContainerRequest,
    Credentials,
    ICluster,
    User,
    uuid_infix,
)
from arvproxy.errors import NotFound, Unauthorized
from arvproxy.gateway.runtime import IRuntime

_STATES = frozenset({QUEUED, "Locked", RUNNING, *FINAL_STATES})


# --- The cluster ---------------------------------------------------------------------------------


@dataclass
class FakeToken:
    """A token the fake cluster knows: its secret is kept whole (this is a fake)."""

    uuid: str
    token: str
    user_uuid: str
    scopes: tuple[str, ...] = ("all",)
    expires_at: float | None = None


@implementer(ICluster)
class FakeCluster:
    """
    An in-memory L{ICluster} whose methods return Deferreds that have already fired.

    It follows the embedded registry's contract: L{authenticate} fails with L{Unauthorized} for a
    malformed, unknown, revoked or expired token (by the injected C{clock}) or an inactive user;
    the C{SystemRootToken} proves the system user, an admin.  Lookups fail with L{NotFound}.
    L{permission_level} counts ownership of container requests and tokens (C{can_manage}) and
    permission links, never admin rights.  L{update_container} never moves a container out of a
    final state (C{ValueError}), sets C{started_at} on C{Running} and C{finished_at} on a final
    state (marking the container's requests C{Final}), and sets C{interactive_session_started}
    only while Running, never clearing it.

    @ivar calls: every L{ICluster} call as C{(method name, arguments)}, in order.
    """

    def __init__(
        self,
        cluster_id: str = "zzzzz",
        system_root_token: str = "",
        clock: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.cluster_id = cluster_id
        self.system_root_token = system_root_token
        self.clock = clock
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.users: dict[str, User] = {}
        self.tokens: dict[str, FakeToken] = {}
        self.container_requests: dict[str, ContainerRequest] = {}
        self.containers: dict[str, Container] = {}
        # (user uuid, target uuid) -> levels granted by links
        self.links: dict[tuple[str, str], set[str]] = {}
        self._serial = itertools.count(1)

    # -- setting up ------------------------------------------------------------------------

    def new_uuid(self, infix: str) -> str:
        """A fresh UUID of the record type C{infix}, unique in this cluster."""
        return f"{self.cluster_id}-{infix}-{next(self._serial):015d}"

    def system_user_uuid(self) -> str:
        return f"{self.cluster_id}-{USER_INFIX}-000000000000000"

    def add_user(self, full_name: str = "", is_admin: bool = False, is_active: bool = True) -> User:
        user = User(self.new_uuid(USER_INFIX), full_name, is_admin=is_admin, is_active=is_active)
        self.users[user.uuid] = user
        return user

    def set_user_active(self, user_uuid: str, is_active: bool) -> None:
        self.users[user_uuid] = replace(self.users[user_uuid], is_active=is_active)

    def add_token(
        self, user_uuid: str, scopes: Iterable[str] = ("all",), ttl: float | None = None
    ) -> str:
        """
        Issue a v2 token for C{user_uuid} that expires C{ttl} seconds from now (by the clock),
        or never.

        @return: the token (C{v2/<uuid>/<secret>}).
        """
        if user_uuid not in self.users:
            raise NotFound(f"There is no user {user_uuid}.")
        uuid = self.new_uuid(TOKEN_INFIX)
        token = f"v2/{uuid}/secret{uuid[-15:]}x{len(self.tokens)}"
        expires_at = None if ttl is None else self.clock() + ttl
        self.tokens[uuid] = FakeToken(uuid, token, user_uuid, tuple(scopes), expires_at)
        return token

    def revoke_token(self, token: str) -> None:
        """Forget a token (given whole); it stops working at once."""
        del self.tokens[token.split("/")[1]]

    def add_container(
        self, state: str = RUNNING, gateway_address: str = "127.0.0.1:1", **fields: Any
    ) -> Container:
        """A container record (other L{Container} fields as keywords, C{uuid} included)."""
        uuid = fields.pop("uuid", None) or self.new_uuid(CONTAINER_INFIX)
        container = Container(uuid=uuid, state=state, gateway_address=gateway_address, **fields)
        self.containers[uuid] = container
        return container

    def add_container_request(
        self, owner_uuid: str, container_uuid: str | None = None, **fields: Any
    ) -> ContainerRequest:
        """A container request owned (C{can_manage}) by C{owner_uuid}, using C{container_uuid}."""
        uuid = fields.pop("uuid", None) or self.new_uuid(CONTAINER_REQUEST_INFIX)
        request = ContainerRequest(
            uuid=uuid,
            owner_uuid=owner_uuid,
            modified_by_user_uuid=owner_uuid,
            container_uuid=container_uuid,
            **fields,
        )
        self.container_requests[uuid] = request
        return request

    def grant(self, user_uuid: str, target_uuid: str, level: str) -> str:
        """
        Give C{user_uuid} C{level} on C{target_uuid} by a permission link.

        @return: a link UUID.
        """
        if level not in LEVELS:
            raise ValueError(f"permission level must be one of {', '.join(LEVELS)}: {level!r}")
        self.links.setdefault((user_uuid, target_uuid), set()).add(level)
        return self.new_uuid(LINK_INFIX)

    def called(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of every call to method C{name}."""
        return [args for method, args in self.calls if method == name]

    # -- ICluster ----------------------------------------------------------------------------

    def _answer(self, name: str, args: tuple[Any, ...], f: Callable[[], Any]) -> Any:
        self.calls.append((name, args))
        try:
            return defer.succeed(f())
        except Exception:
            return defer.fail()

    def authenticate(self, token: str) -> Any:
        return self._answer("authenticate", (token,), lambda: self._authenticate(token))

    def _authenticate(self, token: str) -> Credentials:
        if self.system_root_token and hmac.compare_digest(
            token.encode("utf-8", "surrogateescape"), self.system_root_token.encode("utf-8")
        ):
            return Credentials(None, self.system_user_uuid(), True, ("all",))
        parts = token.split("/")
        record = None
        if len(parts) == 3 and parts[0] == "v2" and UUID_RE.match(parts[1]):
            record = self.tokens.get(parts[1])
        if record is None or not hmac.compare_digest(
            record.token.encode("utf-8", "surrogateescape"),
            token.encode("utf-8", "surrogateescape"),
        ):
            raise Unauthorized("The token is not valid: it is unknown, wrong, or has been revoked.")
        if record.expires_at is not None and record.expires_at <= self.clock():
            raise Unauthorized("The token has expired.", hint="Get a new token.")
        user = self.users[record.user_uuid]
        if not user.is_active:
            raise Unauthorized("The account this token belongs to is not active.")
        expires_at = (
            None if record.expires_at is None else datetime.fromtimestamp(record.expires_at, UTC)
        )
        return Credentials(record.uuid, user.uuid, user.is_admin, record.scopes, expires_at)

    def get_container_request(self, uuid: str) -> Any:
        def get() -> ContainerRequest:
            if uuid not in self.container_requests:
                raise NotFound(f"There is no container request {uuid}.")
            return self.container_requests[uuid]

        return self._answer("get_container_request", (uuid,), get)

    def get_container(self, uuid: str) -> Any:
        return self._answer("get_container", (uuid,), lambda: self._container(uuid))

    def _container(self, uuid: str) -> Container:
        if uuid not in self.containers:
            raise NotFound(f"There is no container {uuid}.")
        return self.containers[uuid]

    def container_requests_for(self, container_uuid: str) -> Any:
        return self._answer(
            "container_requests_for",
            (container_uuid,),
            lambda: [
                cr for cr in self.container_requests.values() if cr.container_uuid == container_uuid
            ],
        )

    def permission_level(
        self, user_uuid: str, target_uuid: str, credentials: Credentials | None = None
    ) -> Any:
        # Like the embedded registry, the fake decides from its records: credentials are unused.
        return self._answer(
            "permission_level",
            (user_uuid, target_uuid),
            lambda: self._permission_level(user_uuid, target_uuid),
        )

    def _permission_level(self, user_uuid: str, target_uuid: str) -> str | None:
        if not UUID_RE.match(target_uuid):
            return None
        infix = uuid_infix(target_uuid)
        if infix == CONTAINER_REQUEST_INFIX:
            cr = self.container_requests.get(target_uuid)
            if cr is not None and cr.owner_uuid == user_uuid:
                return CAN_MANAGE
        elif infix == TOKEN_INFIX:
            token = self.tokens.get(target_uuid)
            if token is not None and token.user_uuid == user_uuid:
                return CAN_MANAGE
        granted = self.links.get((user_uuid, target_uuid), set())
        ranks = [LEVELS.index(level) for level in granted]
        return LEVELS[max(ranks)] if ranks else None

    def update_container(self, uuid: str, **changes: Any) -> Any:
        return self._answer(
            "update_container", (uuid, changes), lambda: self._update_container(uuid, changes)
        )

    def _update_container(self, uuid: str, changes: dict[str, Any]) -> Container:
        unknown = set(changes) - UPDATABLE_CONTAINER_FIELDS
        if unknown:
            raise ValueError(f"cannot change container field(s): {', '.join(sorted(unknown))}")
        if "state" in changes and changes["state"] not in _STATES:
            raise ValueError(f"unknown container state {changes['state']!r}")
        old = self._container(uuid)
        values = dict(changes)
        if "listening_ports" in values:
            values["listening_ports"] = tuple(sorted(set(values["listening_ports"])))
        new_state = values.get("state", old.state)
        started = values.get("interactive_session_started", old.interactive_session_started)
        if started != old.interactive_session_started and (not started or new_state != RUNNING):
            raise ValueError(f"container {uuid}: interactive_session_started can only be set")
        if new_state != old.state:
            if old.state in FINAL_STATES:
                raise ValueError(f"container {uuid} is {old.state}: its state is final")
            now = datetime.fromtimestamp(self.clock(), UTC)
            if new_state == RUNNING and old.started_at is None:
                values["started_at"] = now
            if new_state in FINAL_STATES:
                if old.finished_at is None:
                    values["finished_at"] = now
                for cr in list(self.container_requests.values()):
                    if cr.container_uuid == uuid:
                        self.container_requests[cr.uuid] = replace(cr, state="Final")
        new = replace(old, **values)
        self.containers[uuid] = new
        return new


# --- Responses and the controller's side of a gateway --------------------------------------------


@implementer(IPushProducer)
class FakeBodyTransport:
    """
    What a response body's protocol sees as its transport: a push producer that records whether
    the reader paused it (C{producerState}: C{"producing"}, C{"paused"} or C{"stopped"}).
    """

    producerState = "producing"

    def pauseProducing(self) -> None:
        if self.producerState != "stopped":
            self.producerState = "paused"

    def resumeProducing(self) -> None:
        if self.producerState != "stopped":
            self.producerState = "producing"

    def stopProducing(self) -> None:
        self.producerState = "stopped"


@implementer(iweb.IResponse)
class FakeResponse:
    """
    An L{iweb.IResponse} from the next hop.

    With C{body} bytes, L{deliverBody} delivers them and ends the body cleanly (or, made
    C{whole}, L{complete_body} gives them at once).  With C{body=None} the body streams: once
    delivered, call L{write}, then L{finish} or L{fail}.

    @ivar protocol: the protocol the body was delivered to, once it was.
    @ivar transport: the producer that protocol can pause.
    """

    version = (b"HTTP", 1, 1)
    previousResponse = None
    request = None

    def __init__(
        self,
        code: int = 200,
        phrase: bytes = b"OK",
        headers: Headers | Sequence[tuple[bytes, bytes]] = (),
        body: bytes | None = b"",
        length: int | object | None = None,
        whole: bool = False,
    ) -> None:
        self.code = code
        self._whole = whole
        self.phrase = phrase
        if isinstance(headers, Headers):
            self.headers = headers
        else:
            self.headers = Headers()
            for name, value in headers:
                self.headers.addRawHeader(name, value)
        self._body = body
        if length is None:
            length = len(body) if body is not None else iweb.UNKNOWN_LENGTH
        self.length = length
        self.protocol: Any = None
        self.transport = FakeBodyTransport()

    def complete_body(self) -> bytes | None:
        """C{body}, when made C{whole} (arrived whole before anything asked); else C{None}."""
        return self._body if self._whole else None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if self._body is not None:
            if self._body:
                protocol.dataReceived(self._body)
            self.finish()

    def write(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))

    def fail(self, reason: BaseException | None = None) -> None:
        """End the body early, as a broken upstream connection does."""
        self.protocol.connectionLost(Failure(reason or ConnectionLost("upstream went away")))

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response


@implementer(IConsumer)
class BodyCollector:
    """An L{IConsumer} that keeps what a body producer writes (C{data}) and can pause it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.producer: Any = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


@dataclass
class GatewayCall:
    """One request the controller sent to a gateway (through L{FakeGatewayConnector})."""

    container_uuid: str
    address: str
    secret: str
    method: bytes
    path: bytes
    headers: Headers
    body: Any
    received: BodyCollector = field(default_factory=BodyCollector)


Responder = Callable[[GatewayCall], "FakeResponse | Awaitable[FakeResponse]"]


class FakeGatewayConnector:
    """
    Stands in for L{arvproxy.controller.proxy.GatewayConnector}: records every request (C{calls})
    and answers it.

    By default a request's body, if any, is read whole (into C{call.received}) before the
    answer; the answer is C{response} (a fresh empty 200 when C{None}), or
    whatever C{responder} returns, or C{error} is raised.
    """

    def __init__(self) -> None:
        self.calls: list[GatewayCall] = []
        self.response: FakeResponse | None = None
        self.responder: Responder | None = None
        self.error: BaseException | None = None
        self.read_body = True

    async def request(
        self,
        container_uuid: str,
        address: str,
        secret: str,
        method: bytes,
        path: bytes,
        headers: Headers,
        body: iweb.IBodyProducer | None,
        informational: Callable[[int, bytes, Headers], None] | None = None,
    ) -> iweb.IResponse:
        call = GatewayCall(container_uuid, address, secret, method, path, headers.copy(), body)
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        if body is not None and self.read_body:
            await body.startProducing(call.received)
        if self.responder is not None:
            answer = self.responder(call)
            if not isinstance(answer, FakeResponse):
                answer = await answer
            return answer
        return self.response if self.response is not None else FakeResponse(body=b"")


# --- A container runtime in memory --------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """
    A client endpoint whose connections are C{StringTransport}s (C{connections}: a list of
    C{(protocol, transport)}), or that refuses every connection when C{refuse} is set.
    """

    def __init__(self, port: int, refuse: bool = False) -> None:
        self.port = port
        self.refuse = refuse
        self.connections: list[tuple[Any, StringTransport]] = []
        self.attempts = 0

    def connect(self, factory: Any) -> Any:
        self.attempts += 1
        if self.refuse:
            return defer.fail(ConnectionRefusedError("127.0.0.1", self.port))
        address = IPv4Address("TCP", "127.0.0.1", self.port)
        protocol = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address, lenient=True)
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)


@implementer(IRuntime)
class FakeRuntime:
    """
    A container whose ports are L{MemoryEndpoint}s; ports in C{refusing} refuse connections.

    @ivar endpoints: every endpoint handed out, in order, as C{(port, endpoint)}.
    """

    def __init__(self, refusing: Iterable[int] = ()) -> None:
        self.refusing = set(refusing)
        self.endpoints: list[tuple[int, MemoryEndpoint]] = []
        self._exited: defer.Deferred[int | None] = defer.Deferred()
        self.ports: list[int] = []

    def start(self) -> Any:
        return defer.succeed(None)

    def exited(self) -> Any:
        return self._exited

    def stop(self) -> Any:
        if not self._exited.called:
            self._exited.callback(None)
        return defer.succeed(None)

    def detach(self) -> Any:
        self.detached = True
        return self.stop()

    detached = False

    def endpoint(self, port: int) -> MemoryEndpoint:
        endpoint = MemoryEndpoint(port, refuse=port in self.refusing)
        self.endpoints.append((port, endpoint))
        return endpoint

    def listening_ports(self) -> Any:
        return defer.succeed(sorted(self.ports))


# --- Driving a site in memory -------------------------------------------------------------------


class MemoryClient:
    """
    One client connection to a site, in memory: L{send} raw bytes, read C{transport.value()} or
    L{responses}.
    """

    def __init__(self, site: Any, peer: IPv4Address | None = None, lenient: bool = True) -> None:
        self.peer = peer or IPv4Address("TCP", "127.0.0.1", 1234)
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8900),
            peerAddress=self.peer,
            lenient=lenient,
        )
        self.protocol = site.buildProtocol(self.peer)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def value(self) -> bytes:
        return self.transport.value()

    def responses(self, methods: Sequence[bytes] = ()) -> list[ParsedResponse]:
        """The responses written so far; see L{parse_responses}."""
        return parse_responses(self.transport.value(), methods)

    def response(self, method: bytes = b"GET") -> ParsedResponse:
        """The one response written so far (fails if there is not exactly one)."""
        responses = self.responses([method])
        if len(responses) != 1:
            raise AssertionError(f"expected one response, got {len(responses)}: {self.value()!r}")
        return responses[0]

    def disconnect(self, reason: BaseException | None = None) -> None:
        """The client goes away."""
        self.transport.loseConnection()
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    @property
    def closed(self) -> bool:
        """Whether the server closed (or aborted) the connection."""
        return bool(self.transport.disconnecting)


def request_bytes(
    method: bytes = b"GET",
    target: bytes = b"/",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    host: bytes | None = b"example.com",
) -> bytes:
    """A raw HTTP/1.1 request: C{Host} first (unless C{None}), then C{headers}, then C{body}."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host)
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class ParsedResponse:
    """
    A response read back from a connection.

    @ivar headers: C{(lower-case name, value)} pairs, in order, repeats kept.
    @ivar complete: whether the whole body arrived (the framing said it ended).
    @ivar informational: the status codes of any 1xx responses before this one.
    """

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool
    informational: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        """The last value of C{name}, or C{None}."""
        values = self.all(name)
        return values[-1] if values else None

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name.lower()]

    def names(self) -> list[bytes]:
        return [n for n, _ in self.headers]

    @property
    def raw(self) -> bytes:
        """Everything in the response, for "this never appears" checks."""
        head = b"".join(n + b": " + v + b"\r\n" for n, v in self.headers)
        return b"%d " % self.status + self.reason + b"\r\n" + head + b"\r\n" + self.body


def parse_responses(data: bytes, methods: Sequence[bytes] = ()) -> list[ParsedResponse]:
    """
    Parse the responses in a connection's output with h11.

    @param methods: the method of each request, in order (C{GET} for the rest); a C{HEAD}
        response has no body whatever its headers say.
    @return: each response, the last possibly incomplete; a stream that is not HTTP raises
        C{h11.RemoteProtocolError}.
    """
    responses: list[ParsedResponse] = []
    connection = h11.Connection(h11.CLIENT)
    connection.receive_data(data)
    index = 0
    while True:
        method = methods[index] if index < len(methods) else b"GET"
        connection.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
        connection.send(h11.EndOfMessage())
        current: ParsedResponse | None = None
        informational: list[int] = []
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                current = ParsedResponse(
                    event.status_code,
                    event.reason,
                    [(bytes(n), bytes(v)) for n, v in event.headers.raw_items()],
                    b"",
                    False,
                    informational,
                )
                current.headers = [(n.lower(), v) for n, v in current.headers]
                responses.append(current)
            elif isinstance(event, h11.Data) and current is not None:
                current.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) and current is not None:
                current.complete = True
                break
        if current is None or not current.complete:
            return responses
        if connection.their_state is not h11.DONE or connection.our_state is not h11.DONE:
            return responses
        try:
            connection.start_next_cycle()
        except h11.LocalProtocolError:
            return responses
        index += 1
