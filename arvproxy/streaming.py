"""
The streaming machinery both hops share: a twisted.web site that hands each request to a handler
as soon as its headers have arrived, a request body that streams to the next hop with
backpressure, and a relay that streams the next hop's response back.

Twisted's own server reads a whole request body before any resource runs, and
C{twisted.web.proxy} buffers, drops repeated headers and has no backpressure (see the Twisted
notes in the project's references).  Here nothing is buffered whole: a slow client or a slow
service pauses the other side's socket.

Each hop also sends a finished message at once (L{send_now}) instead of at the reactor's next
turn, so that a busy chain does not move in convoys.

This module uses private attributes of L{twisted.web.http.HTTPChannel} (C{_command}, C{_path},
C{_version}), of Twisted's socket transports (their write buffer) and of its TLS transports (their
write aggregator); Twisted is pinned to one release series and the tests exercise every one of
them.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet import abstract, defer, tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, iweb, resource, server
from twisted.web.client import PotentialDataLoss, ResponseDone
from zope.interface import implementer, provider

from arvproxy import pages, policy
from arvproxy.config import Limits
from arvproxy.errors import ProxyError

if TYPE_CHECKING:
    from arvproxy.hopclient import HopResponse

log = Logger()

# A handler serves one request; it returns when the response has been written (or has failed).
Handler = Callable[["StreamingRequest"], Coroutine[Any, Any, None]]

# Body bytes held while the next hop is not ready for them; past this the client is paused.
MAX_BUFFERED_BODY = 64 * 1024

# How much a socket's write buffer may hold before its producer is paused.  Twisted's 64 KiB
# made a streaming hop pause and resume the other side several times per megabyte; 256 KiB
# roughly halves the cost of a bulk transfer (make bench) and still bounds memory per
# connection and direction.
STREAM_BUFFER = 256 * 1024


def tune_transport(transport: Any) -> None:
    """
    Give the socket under C{transport} (through any TLS layers) a L{STREAM_BUFFER}-sized
    write buffer before it pauses its producer, and, for TCP, no Nagle delay: a small message
    (a server-sent event, a WebSocket frame, the next response) must not wait for the peer to
    acknowledge the one before.
    """
    for layer in _layers(transport):
        if isinstance(layer, abstract.FileDescriptor):
            layer.bufferSize = STREAM_BUFFER
            if isinstance(layer, tcp.Connection):
                layer.setTcpNoDelay(True)
            return


def send_now(transport: Any) -> None:
    """
    Send what C{transport} (and any TLS layer over its socket) holds to the socket now, rather
    than when the reactor next turns.

    A Twisted transport queues a write until the reactor's next turn, after it has served every
    other connection that was ready, and its TLS layer gathers small writes until then too.
    Under load a hop then releases each batch of messages together, and the next hop idles
    until the batch arrives: the chain moves in convoys (C{make bench}: with 32 requests in
    flight, 38% of the CPU idle at 1,200 req/s).  Called at the end of each message, so its
    pieces still leave in one TLS record.

    Nothing is sent early when the socket is already behind (it holds older data), closing, or
    has a pull producer that a drained buffer would resume: the reactor does those as before.
    """
    for layer in _layers(transport):
        # Twisted's TLS transport (listenSSL, ssl: endpoints and wrapClientTLS use it too).
        aggregator = getattr(layer, "_aggregator", None)
        if aggregator is not None:
            aggregator.flush()
        if isinstance(layer, abstract.FileDescriptor):
            if layer._tempDataBuffer and _can_send(layer):
                # On an error the socket stays registered for writing: the reactor's next turn
                # meets the error again and closes the connection as usual.
                layer.doWrite()
            return


def _can_send(layer: abstract.FileDescriptor) -> bool:
    """Whether L{send_now} may empty C{layer}'s queue (see there)."""
    return bool(
        layer.offset == len(layer.dataBuffer)
        and layer.connected
        and not layer.disconnecting
        and not layer._writeDisconnecting
        and (layer.producer is None or (layer.streamingProducer and not layer.producerPaused))
    )


def _layers(transport: Any) -> Iterator[Any]:
    """C{transport} and the transports under it, through TLS and wrapping layers."""
    for _ in range(4):
        if transport is None:
            return
        yield transport
        transport = getattr(transport, "transport", None)


@implementer(IStreamClientEndpoint)
class StreamingEndpoint:
    """An endpoint whose connections get L{STREAM_BUFFER}-sized write buffers."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self._endpoint.connect(factory)
        return d.addCallback(self._connected)

    def _connected(self, protocol: Any) -> Any:
        tune_transport(protocol.transport)
        return protocol


def closing(transport: Any) -> bool:
    """Whether C{transport}, or any transport under it (through TLS layers), is closing."""
    return any(
        getattr(layer, "disconnecting", False) or getattr(layer, "disconnected", False)
        for layer in _layers(transport)
    )


@implementer(iweb.IBodyProducer, IPushProducer)
class RequestBody:
    """
    The body of a client's request, produced to the next hop as it arrives.

    Until the next hop asks for it (L{startProducing}), at most about L{MAX_BUFFERED_BODY} bytes
    are held and the client's socket is paused.  When the next hop's socket is full it pauses
    this producer, which pauses the client's socket.

    @ivar length: the body's length from C{Content-Length}, or C{UNKNOWN_LENGTH} when chunked.
    @ivar complete: whether the whole body has arrived from the client.
    """

    def __init__(self, request: StreamingRequest, length: int | None) -> None:
        self._request = request
        self.length: int | object = iweb.UNKNOWN_LENGTH if length is None else length
        self.complete = False
        self.received = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._consumer: IConsumer | None = None
        self._paused = False
        self._client_paused = False
        self._stopped = False
        self._done: defer.Deferred[None] | None = None
        self._gone: Failure | None = None

    @property
    def empty(self) -> bool:
        """Whether the request has no body at all (no Content-Length, no chunked encoding)."""
        return self.length == 0

    # Called by the request as the client sends.

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self.received += len(data)
        if self._consumer is not None and not self._paused and not self._buffer:
            self._consumer.write(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= MAX_BUFFERED_BODY:
            self._pause_client()

    def bodyComplete(self) -> None:
        self.complete = True
        self._maybe_done()

    def clientGone(self, reason: Failure) -> None:
        """The client's connection closed; an unfinished body fails the next hop's request."""
        if self.complete:
            return
        self._gone = reason
        if self._done is not None and not self._stopped:
            done, self._done = self._done, None
            done.errback(reason)

    # IBodyProducer, driven by the next hop.

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        if self._gone is not None:
            # The client left before the next hop asked: the body will never be complete.
            return defer.fail(self._gone)
        self._consumer = consumer
        self._request.sendContinue()
        # Kept here: _maybe_done may fire and forget self._done before this returns.
        done = self._done = defer.Deferred()
        self._flush()
        if not self._paused:
            self._resume_client()
        self._maybe_done()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        self._pause_client()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()
        if not self._paused:
            self._resume_client()
            self._maybe_done()

    def stopProducing(self) -> None:
        # The next hop gave up; per IBodyProducer the Deferred must never fire now.
        self._stopped = True
        self._done = None
        self._buffer.clear()
        self._buffered = 0

    # Internals.

    def _flush(self) -> None:
        while self._buffer and not self._paused and self._consumer is not None:
            data = self._buffer.pop(0)
            self._buffered -= len(data)
            self._consumer.write(data)

    def _maybe_done(self) -> None:
        if self.complete and not self._buffer and self._done is not None:
            done, self._done = self._done, None
            done.callback(None)

    def _pause_client(self) -> None:
        transport = self._request.client_transport()
        if transport is not None and not self.complete:
            self._client_paused = True
            transport.pauseProducing()

    def _resume_client(self) -> None:
        transport = self._request.client_transport()
        if transport is not None and self._client_paused:
            self._client_paused = False
            transport.resumeProducing()


@provider(iweb.INonQueuedRequestFactory)
class StreamingRequest(http.Request):
    """
    A request handed to its site's handler as soon as its headers are in.

    Its body streams through L{body}; L{method}, L{uri}, L{path} and L{clientproto} are set
    before the handler runs.  The handler writes the response with the usual
    C{setResponseCode}/C{setHeader}/C{write}/C{finish}, or raises a L{ProxyError}.
    """

    body: RequestBody
    _expects_continue = False

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        self.method = channel._command
        self.uri = channel._path
        self.clientproto = channel._version
        self.path = self.uri.split(b"?", 1)[0]
        self.args = {}
        self.body = RequestBody(self, length)
        expect = self.requestHeaders.getRawHeaders(b"expect", [])
        self._expects_continue = bool(
            expect and expect[0].lower() == b"100-continue" and self.clientproto == b"HTTP/1.1"
        )
        self.notifyFinish().addErrback(self.body.clientGone)
        if not self.body.empty:
            # Start now, so the body can stream to the next hop as it arrives.
            self._handle()

    def handleContentChunk(self, data: bytes) -> None:
        self.body.dataReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.body.bodyComplete()
        if self.body.empty:
            # Without a body, start once the channel is ready for the next request's bytes.
            self._handle()

    def _handle(self) -> None:
        channel: Any = self.channel
        handler = channel.site.handler
        defer.Deferred.fromCoroutine(handler(self)).addErrback(self._failed)

    def sendContinue(self) -> None:
        """
        Tell a client that waits with C{Expect: 100-continue} to send its body: done only when the
        next hop asks for the body, so a refused request is refused before its body is read.
        """
        if self._expects_continue and not self.body.complete and not self.startedWriting:
            self._expects_continue = False
            transport = self.client_transport()
            if transport is not None:
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def finish(self) -> None:
        """End the response and send what is left of it at once (L{send_now})."""
        transport = self.client_transport()
        super().finish()
        if transport is not None:
            send_now(transport)

    def client_transport(self) -> Any:
        """The client's transport, or C{None} once the client has gone or the response is done."""
        # http.Request sets channel to None when the client goes, and deletes it once finished.
        channel = getattr(self, "channel", None)
        return None if channel is None else channel.transport

    @property
    def gone(self) -> bool:
        """Whether the client has disconnected."""
        return bool(self._disconnected)

    def finishEarly(self) -> None:
        """
        Prepare to answer before the whole body has arrived: the connection closes after the
        response, so that the rest of the body can never be read as a new request.
        """
        if not self.body.complete and self.channel is not None:
            self.channel.persistent = False
            self.setHeader(b"connection", b"close")

    def _failed(self, failure: Failure) -> None:
        if self.gone or self.finished:
            if not failure.check(ProxyError, defer.CancelledError):
                log.failure("Error after the response started", failure)
            return
        if self.startedWriting:
            log.failure("Error while relaying a response", failure)
            self.client_transport().abortConnection()
            return
        error = failure.value
        if not isinstance(error, ProxyError):
            log.failure(
                "Unexpected error while serving {method} {path}",
                failure,
                method=self.method,
                path=policy.split_query_token(self.path)[0],
            )
            error = ProxyError("Something went wrong in the proxy. The error has been logged.")
        pages.render_error(self, error)


_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 58\r\n\r\nThe request's headers did not arrive in time; try again.\r\n"
)
_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 64\r\n\r\n"
    b"The request's headers are too large (large cookies?); try again.\r\n"
)


def _ignore(*args: Any) -> None:
    """Swallow whatever arrives on a connection that is being closed."""


class ProxyChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel whose requests may be answered before their bodies have arrived, with a
    deadline for each request's headers (408) and a limit on their size (431).
    """

    header_deadline = 30.0
    _header_timer: Any = None
    _awaiting_headers = True

    def connectionMade(self) -> None:
        super().connectionMade()
        tune_transport(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_headers and self._header_timer is None and self.header_deadline:
            self._header_timer = self.callLater(self.header_deadline, self._headers_too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._awaiting_headers and self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse(_HEADERS_TOO_LARGE)
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(_HEADERS_TOO_LARGE)

    def allHeadersReceived(self) -> None:
        self._awaiting_headers = False
        self._cancel_header_timer()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        self._awaiting_headers = True
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_header_timer()
        super().connectionLost(reason)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._awaiting_headers:
            self._refuse(_REQUEST_TIMEOUT)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, response: bytes) -> None:
        """Answer a request that never got as far as its handler, and close."""
        self._cancel_header_timer()
        self.dataReceived = self.lineReceived = _ignore  # type: ignore[method-assign,assignment]
        transport: Any = self.transport
        if len(self.requests) <= 1:
            # No earlier response is still being written (the one request, if any, is the one
            # whose headers are arriving): this answer is next on the wire.
            transport.write(response)
        transport.loseConnection()

    def _send100Continue(self) -> None:
        # StreamingRequest.sendContinue decides when (and whether) to send it.
        pass

    def allContentReceived(self) -> None:
        if not self.requests:
            # Answered early and closing: the rest of the body was discarded.
            return
        super().allContentReceived()


class ProxySite(server.Site):
    """
    A site whose every request goes to C{handler} (see L{StreamingRequest}), over HTTP/1.1 only,
    within C{limits}.

    The access log never shows a query string (it could hold a token).
    """

    protocol = ProxyChannel  # type: ignore[assignment]

    def __init__(
        self,
        handler: Handler,
        reactor: Any,
        limits: Limits | None = None,
        timeout: float | None = None,
    ) -> None:
        self.limits = limits = limits or Limits()
        super().__init__(
            resource.Resource(),
            reactor=reactor,
            timeout=limits.client_idle if timeout is None else timeout,
        )
        self.handler = handler
        self.requestFactory = StreamingRequest  # type: ignore[assignment]
        self.access_log = False

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.header_deadline = self.limits.request_headers
        channel.totalHeadersSize = self.limits.max_header_bytes
        channel.MAX_LENGTH = self.limits.max_header_bytes
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]

    def log(self, request: Any) -> None:
        if self.access_log:
            log.info(
                "{client} {method} {path} {code} {length}",
                client=request.getClientAddress(),
                method=request.method,
                path=request.path,
                code=request.code,
                length=request.sentLength,
            )


class Relay(Protocol):
    """
    Streams an upstream response body to a request, with backpressure both ways.

    A body that ends early is never made to look complete: the client's connection is aborted.
    """

    transport: Any  # the upstream response's producer (a TransportProxyProducer)

    def __init__(self, request: StreamingRequest) -> None:
        self.request = request
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.request.gone:
            self.transport.stopProducing()
            return
        self.request.registerProducer(self.transport, True)
        self.request.notifyFinish().addErrback(self._client_gone)

    def _client_gone(self, reason: Failure) -> None:
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self.request.gone:
            self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        request = self.request
        if not request.gone:
            request.unregisterProducer()
            if reason.check(ResponseDone, PotentialDataLoss):
                request.finish()
            else:
                log.info("Upstream response ended early: {reason}", reason=reason.value)
                request.client_transport().abortConnection()
        self.done.callback(None)


async def relay_response(request: StreamingRequest, response: HopResponse) -> None:
    """
    Send C{response} (from the next hop) to the client: its status, its end-to-end headers and
    its body as it arrives.
    """
    request.setResponseCode(response.code, response.phrase)
    headers = policy.response_headers(response.headers)
    for name, values in headers.getAllRawHeaders():
        # Added, not set: a cookie the proxy set before relaying (its own) is kept.
        for value in values:
            request.responseHeaders.addRawHeader(name, value)
    if request.method == b"HEAD":
        length = response.headers.getRawHeaders(b"content-length")
        if length:
            request.responseHeaders.setRawHeaders(b"content-length", length[-1:])
    elif response.length is not iweb.UNKNOWN_LENGTH and response.code not in http.NO_BODY_CODES:
        request.setHeader(b"content-length", b"%d" % (response.length,))
    request.finishEarly()
    relay = Relay(request)
    response.deliverBody(relay)
    await relay.done


CLIENT_GONE = (ConnectionDone, ConnectionLost)
