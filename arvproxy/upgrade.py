"""
Protocol upgrades (WebSockets) through a hop: the request goes to the next hop on a connection of
its own, and only a C{101 Switching Protocols} answer turns the client's connection into a tunnel.

Any other answer is relayed as an ordinary response and the client's connection stays an HTTP
connection, so a refused upgrade can never become a way around the checks.  Once spliced, each
side's transport is the other's producer: a slow reader pauses the writer, in both directions.
Frames are never parsed: subprotocols, extensions, fragmentation, pings and close codes pass
untouched.

Twisted's server has no public way to take over a connection after a request; this uses the same
private hook as Twisted's own WebSocket support (the channel's C{dataReceived} and
C{connectionLost} are replaced), which the pinned Twisted release series keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h11
from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from arvproxy import policy
from arvproxy.carrier import Carrier
from arvproxy.deadlines import DeadlinePassed
from arvproxy.errors import BadGateway
from arvproxy.httpserver import StreamingRequest
from arvproxy.streaming import add_field_lines, relay_headers

log = Logger()


class UpgradeResponse:
    """
    The next hop's answer to an upgrade request, before anything has been sent to the client.

    @ivar code: the status code.
    @ivar headers: the response headers, as received.
    """

    def __init__(self, client: _UpgradeClient, code: int, reason: bytes, headers: Headers):
        self._client = client
        self.code = code
        self.reason = reason
        self.headers = headers

    def discard(self) -> None:
        """Close the next hop's connection without using the response."""
        self._client.transport.loseConnection()

    def hand_over(self, protocol: Protocol) -> None:
        """
        Give the switched connection (after a C{101}) to C{protocol}: the connection becomes
        its transport, and the bytes that follow the answer, and the connection's end, go to
        it.
        """
        client = self._client
        protocol.makeConnection(client.transport)
        client.attach(_ProtocolSide(protocol))
        client.release()


class _Switched:
    """Stands in for the h11 connection once a tunnel is spliced."""

    their_state = h11.SWITCHED_PROTOCOL


_SWITCHED: Any = _Switched()


@implementer(IHandshakeListener)
class _UpgradeClient(Protocol):
    """
    Sends one upgrade request to the next hop and reads its answer with h11.

    Bytes that follow the answer (a response body, or the first frames after a 101) are held
    until a sink is attached with L{attach}.

    With a C{deadline} (its clock, seconds and the step's name), an answer that has not come
    that long after the request was sent (after the TLS handshake, on a TLS connection) fails
    the request with L{DeadlinePassed} and ends the connection.
    """

    transport: Any

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        deadline: tuple[IReactorTime, float, str] | None = None,
    ) -> None:
        self._request = h11.Request(
            method=method,
            target=target,
            headers=[
                (name, value) for name, values in headers.getAllRawHeaders() for value in values
            ],
        )
        self._h11 = h11.Connection(h11.CLIENT)
        self.answered: defer.Deferred[UpgradeResponse] = defer.Deferred()
        self._answer: Any = None
        self._sink: Any = None
        self._pending: list[bytes] = []
        self._ended = False
        self._lost: Failure | None = None
        self._deadline = deadline
        self._timer: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self._h11.send(self._request) + self._h11.send(h11.EndOfMessage()))
        if not isinstance(self.transport, TLSMemoryBIOProtocol):
            self._start_deadline()

    def handshakeCompleted(self) -> None:
        """TLS is up (L{IHandshakeListener}): the answer's deadline starts now."""
        self._start_deadline()

    def _start_deadline(self) -> None:
        if self._deadline is not None and not self.answered.called:
            clock, seconds, _ = self._deadline
            self._timer = clock.callLater(seconds, self._late)

    def _stop_deadline(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _late(self) -> None:
        self._timer = None
        assert self._deadline is not None
        _, seconds, step = self._deadline
        self._fail(DeadlinePassed(step, seconds))

    def dataReceived(self, data: bytes) -> None:
        if self._h11.their_state is h11.SWITCHED_PROTOCOL:
            self._deliver(data)
            return
        try:
            self._h11.receive_data(data)
            self._process()
        except h11.RemoteProtocolError as e:
            self._fail(BadGateway(f"The next hop sent an invalid response ({e})."))

    def _process(self) -> None:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                break
            if event is h11.PAUSED:
                trailing, _ = self._h11.trailing_data
                if trailing:
                    self._deliver(bytes(trailing))
                break
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._answer = event
                # Other 1xx answers are not relayed.
            elif isinstance(event, h11.Response):
                self._answer = event
            elif isinstance(event, h11.Data):
                self._deliver(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._ended = True
                if self._sink is not None:
                    self._sink.bodyDone()
                self.transport.loseConnection()
                break
            elif isinstance(event, h11.ConnectionClosed):
                break
        if self._answer is not None and not self.answered.called:
            self._stop_deadline()
            headers = Headers()
            for name, value in self._answer.headers.raw_items():
                headers.addRawHeader(name, value)
            answer = UpgradeResponse(self, self._answer.status_code, self._answer.reason, headers)
            self.answered.callback(answer)

    def _deliver(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.dataReceived(data)
        else:
            self._pending.append(data)

    def attach(self, sink: Any) -> None:
        """Send everything after the answer to C{sink}, starting with what has already come."""
        self._sink = sink
        pending, self._pending = self._pending, []
        for data in pending:
            sink.dataReceived(data)
        if self._ended:
            sink.bodyDone()
        if self._lost is not None:
            sink.peerLost(self._lost)

    def release(self) -> None:
        """Forget the handshake's state once the connection only carries a tunnel's bytes."""
        self._h11 = _SWITCHED
        self._answer = None
        self._request = None  # type: ignore[assignment]

    def _fail(self, error: Exception) -> None:
        if not self.answered.called:
            self.answered.errback(error)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason
        self._stop_deadline()
        if not self.answered.called:
            if reason.check(DeadlinePassed):
                self.answered.errback(reason)  # The TLS handshake's deadline.
                return
            self.answered.errback(
                BadGateway("The next hop closed the connection without answering.")
            )
        elif self._sink is not None:
            self._sink.peerLost(reason)


class _Splice:
    """
    A client connection and a next-hop connection joined after a C{101}: bytes flow both ways,
    each transport is the other's producer, and the pair closes together — when either side
    closes, or when no byte has crossed in either direction for C{idle_timeout} seconds.

    @ivar closed: fires when both sides have been told to close.
    """

    def __init__(self, call_later: Any, client: Any, upstream: Any, idle_timeout: float) -> None:
        self._client = client
        self._upstream = upstream
        self._idle_timeout = idle_timeout
        self._timer = call_later(idle_timeout, self._idle) if idle_timeout else None
        self.closed: defer.Deferred[None] = defer.Deferred()

    def from_client(self, data: bytes) -> None:
        self._touch()
        self._upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        self._touch()
        self._client.write(data)

    def client_lost(self, reason: Failure = connectionDone) -> None:
        self._upstream.loseConnection()
        self._end()

    def upstream_lost(self, reason: Failure) -> None:
        self._client.loseConnection()
        self._end()

    def bodyDone(self) -> None:
        pass

    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)

    def _idle(self) -> None:
        log.info("Closing a tunnel idle for {seconds} s", seconds=self._idle_timeout)
        self._client.loseConnection()
        self._upstream.loseConnection()

    def _end(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.closed.called:
            self.closed.callback(None)


class _ResponseRelay:
    """Relays a non-101 answer's body to the request, then finishes it."""

    def __init__(self, request: StreamingRequest, upstream: Any) -> None:
        self._request = request
        self._upstream = upstream
        self.done: defer.Deferred[None] = defer.Deferred()
        request.registerProducer(upstream, True)

    def dataReceived(self, data: bytes) -> None:
        if not self._request.gone:
            self._request.write(data)

    def bodyDone(self) -> None:
        if not self.done.called:
            if not self._request.gone:
                self._request.unregisterProducer()
                self._request.finish()
            self.done.callback(None)

    def peerLost(self, reason: Failure) -> None:
        if not self.done.called:
            if not self._request.gone:
                self._request.unregisterProducer()
                self._request.client_transport().abortConnection()
            self.done.callback(None)


async def open_upgrade(
    endpoint: Any,
    method: bytes,
    target: bytes,
    headers: Headers,
    deadline: tuple[IReactorTime, float, str] | None = None,
) -> UpgradeResponse:
    """
    Send an upgrade request to the next hop over a connection of its own.

    @param deadline: how long the answer may take once the request is sent (see
        L{_UpgradeClient}).
    @return: its answer, once the status and headers have arrived.
    @raise DeadlinePassed: it did not come in time.
    """
    client = _UpgradeClient(method, target, headers, deadline)
    await endpoint.connect(_SingleUse(client))
    return await client.answered


class _SingleUse:
    """A client factory for exactly one already-built protocol."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def relay_upgrade(request: StreamingRequest, response: UpgradeResponse) -> defer.Deferred[None]:
    """
    Pass the next hop's answer to the client: splice the two connections on C{101}; otherwise
    relay it as an ordinary response.

    @return: a Deferred that fires when the tunnel has closed, or the response has been relayed.
    """
    client = response._client
    upstream = client.transport
    if request.gone:
        upstream.loseConnection()
        return defer.succeed(None)
    if response.code != 101:
        request.setResponseCode(response.code, response.reason)
        relay_headers(request, response.headers)
        length = response.headers.getRawHeaders(b"content-length")
        if length and request.method != b"HEAD":
            request.setHeader(b"content-length", length[-1])
        relay = _ResponseRelay(request, upstream)
        client.attach(relay)
        return relay.done

    head = [b"HTTP/1.1 101 %s\r\n" % (response.reason or b"Switching Protocols",)]
    add_field_lines(head, policy.response_headers(response.headers))
    head.append(b"Connection: Upgrade\r\n")
    for value in response.headers.getRawHeaders(b"upgrade", []):
        head.append(b"Upgrade: %s\r\n" % (value,))
    head.append(b"\r\n")
    channel = request.channel
    transport = channel.transport
    splice = _Splice(channel.callLater, transport, upstream, channel.site.limits.tunnel_idle)
    _, buffered = take_over(request, b"".join(head), splice.from_client, splice.client_lost)
    client.attach(_UpstreamSide(splice))
    # From here on only bytes flow: drop what the handshake needed, since a notebook may hold
    # thousands of these tunnels open for hours.
    client.release()
    if buffered:
        splice.from_client(buffered)
    transport.registerProducer(upstream, True)
    upstream.registerProducer(transport, True)
    transport.resumeProducing()
    return splice.closed


def take_over(
    request: StreamingRequest,
    head: bytes,
    data_received: Callable[[bytes], None],
    connection_lost: Callable[[Failure], None],
) -> tuple[Any, bytes]:
    """
    Answer C{request} with C{head} (a C{101}) and take its connection from the HTTP channel:
    from now on its bytes go to C{data_received}, and its end to C{connection_lost}.  The
    request never finishes; nothing waits on it.

    @return: the connection's transport, still paused by the channel while the request was
        answered, and the bytes that had already arrived after the request.
    """
    channel = request.channel
    transport = channel.transport
    transport.write(head)
    return transport, channel.take_over(data_received, connection_lost)


async def open_upgrade_on(
    carrier: Carrier,
    method: bytes,
    target: bytes,
    headers: Headers,
    deadline: tuple[IReactorTime, float, str] | None = None,
) -> UpgradeResponse:
    """
    Send an upgrade request to the next hop on a stream of C{carrier}.

    @param deadline: how long the answer may take once the request is sent (see
        L{_UpgradeClient}); past it the stream closes, and the carrier stays.
    @return: its answer, once the status and headers have arrived.
    @raise CarrierError: the carrier can take no more streams (it has just been lost).
    @raise DeadlinePassed: the answer did not come in time.
    """
    client = _UpgradeClient(method, target, headers, deadline)
    carrier.open_stream(client)
    return await client.answered


class _ProtocolSide:
    """Where the next hop's bytes go once its connection belongs to a protocol."""

    def __init__(self, protocol: Protocol) -> None:
        self.dataReceived = protocol.dataReceived
        self.peerLost = protocol.connectionLost

    def bodyDone(self) -> None:
        pass


class _UpstreamSide:
    """Where the next hop's bytes go once spliced."""

    def __init__(self, splice: _Splice) -> None:
        self.dataReceived = splice.from_upstream
        self.peerLost = splice.upstream_lost
        self.bodyDone = splice.bodyDone
