"""
The streaming machinery both hops share: a request body that streams to the next hop with
backpressure, and a relay that streams the next hop's response back (the server that parses
requests is L{arvproxy.httpserver}, the client to the next hop L{arvproxy.hopclient}).

C{twisted.web.proxy} buffers, drops repeated headers and has no backpressure (see the Twisted
notes in the project's references).  Here nothing is buffered whole: a slow client or a slow
service pauses the other side's socket.

Each hop also sends a finished message in the reactor's turn that finished it (L{send_now}),
a few sockets' messages together (L{_HeldSends}), instead of at the reactor's next turn, so
that a busy chain neither moves in convoys nor switches processes after every message.

This module uses private attributes of Twisted's socket transports (their write buffer) and of
its TLS transports (their write aggregator, and the two methods that move records through
OpenSSL); Twisted is pinned to one release series and the tests exercise every one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet import abstract, defer, tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python.failure import Failure
from twisted.web import iweb
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers, _nameEncoder
from zope.interface import implementer

from arvproxy import policy

if TYPE_CHECKING:
    from arvproxy.hopclient import HopResponse
    from arvproxy.httpserver import StreamingRequest

log = Logger()

# Body bytes held while the next hop is not ready for them; past this the client is paused.
MAX_BUFFERED_BODY = 64 * 1024

# How much a socket's write buffer may hold before its producer is paused.  Twisted's 64 KiB
# made a streaming hop pause and resume the other side several times per megabyte; 256 KiB
# roughly halves the cost of a bulk transfer (make bench) and still bounds memory per
# connection and direction.
STREAM_BUFFER = 256 * 1024


# The largest write a tuned TLS layer encrypts at once (see _encrypt_eagerly): a message's head, a
# small response, a WebSocket frame.
EAGER_WRITE_MAX = 8 * 1024

# The most plaintext a TLS layer encrypts before it hands the records to its socket, and the most
# it decrypts before it hands the bytes to its protocol (see _tls_in_batches): four records.
TLS_BATCH = 64 * 1024

# The most plaintext one TLS record carries.
_RECORD = 16 * 1024

# The largest write a tuned socket sends at once (see _write_eagerly): any message small enough
# to be encrypted at once, and a batch of TLS records or the plaintext of one, with framing.
EAGER_SEND_MAX = TLS_BATCH + 4 * 1024

# How many small messages tuned sockets may hold before all of them send (see _HeldSends).  With
# a connection per request between the hops, 4 and 8 did equally well for small requests through
# the chain, 2 less well, and waiting for the end of the reactor's turn alone idled the next hop;
# with requests on carriers, 8 did better than 4 (3,943 -> 4,565 req/s, 204/194 -> 176/163 us
# per request in the front door and the gateway, 6 interleaved rounds) and 16 no better than 8.
SEND_BATCH = 8


def tune_transport(transport: Any) -> None:
    """
    Give the socket under C{transport} (through any TLS layers) a L{STREAM_BUFFER}-sized
    write buffer before it pauses its producer, and, for TCP, no Nagle delay (a small message
    such as a server-sent event, a WebSocket frame or the next response must not wait for the
    peer to acknowledge the one before) and writes sent in the same turn when nothing is queued
    (L{_write_eagerly}); a TLS layer also encrypts small writes at once (L{_encrypt_eagerly})
    and handles a stream's records in batches (L{_tls_in_batches}).
    """
    for layer in _layers(transport):
        if isinstance(layer, BufferingTLSTransport) and not _already_tuned(layer):
            _encrypt_eagerly(layer)
            _tls_in_batches(layer)
        if isinstance(layer, abstract.FileDescriptor):
            layer.bufferSize = STREAM_BUFFER
            if isinstance(layer, tcp.Connection):
                layer.setTcpNoDelay(True)
                # A listenSSL socket encrypts in its own write: only the reactor writes to it.
                if not getattr(layer, "TLS", False):
                    _write_eagerly(layer)
            return


def _encrypt_eagerly(layer: BufferingTLSTransport) -> None:
    """
    Make a TLS layer encrypt a write of at most L{EAGER_WRITE_MAX} bytes at once, when it holds
    nothing gathered before it, instead of gathering it for the reactor's next turn.

    Twisted's TLS layer gathers small writes into one record per turn, and schedules a call for
    each batch; the hops write each message whole and send it at once (L{send_now}), which
    flushed the batch early and left the scheduled call with nothing to do.  Larger writes, the
    pieces of a stream, are gathered as before.  (Twisted installs its gathering the same way,
    as the instance's C{write}; a lost connection replaces it.)
    """
    aggregator = layer._aggregator
    gather = layer.write
    encrypt = aggregator._write  # type: ignore[union-attr]  # What the gathering flushes to.

    def write(data: bytes) -> None:
        if 0 < len(data) <= EAGER_WRITE_MAX and not aggregator._buffer:  # type: ignore[union-attr]
            encrypt(data)
        elif len(data) > aggregator.MAX_BUFFER_SIZE:  # type: ignore[union-attr]
            # More than the gathering holds: it would copy it and encrypt it at once anyway.
            aggregator.flush()
            encrypt(data)
        else:
            gather(data)

    layer.write = write  # type: ignore[method-assign]
    layer.writeSequence = lambda iovec: write(b"".join(iovec))  # type: ignore[method-assign,assignment]


def _tls_in_batches(layer: BufferingTLSTransport) -> None:
    """
    Make a TLS layer encrypt a large write, and hand on what it decrypts, in batches of up to
    L{TLS_BATCH} bytes instead of one 16 KiB record at a time.

    Twisted's TLS layer encrypts each record of a write on its own (a copy of its slice of the
    write, one C{SSL_write}, one C{bio_read}, one write to the socket, which queues it) and
    hands each record it decrypts to its protocol on its own, so a stream through a hop paid for
    some fifteen Python calls per 16 KiB, each way.  Here a large write is encrypted from a
    memoryview and its records go to the socket four at a time, and the decrypted records of one
    read reach the protocol four at a time: about a tenth less CPU per gigabyte in each hop
    (make bench, interleaved rounds), both ways.  Larger batches were worse: OpenSSL's memory
    BIO copes badly with 256 KiB (downloads at half speed).

    Everything but the sizes is Twisted's (C{TLSMemoryBIOProtocol._write} and
    C{_flushReceiveBIO}, as of Twisted 26): a write OpenSSL cannot take yet is buffered, an
    OpenSSL error ends the connection, and what was decrypted before a TLS close or error is
    delivered before it.  Set on the instance, as L{_encrypt_eagerly} does.
    """
    connection = layer._tlsConnection
    below: Any = layer.transport
    write_records = layer._write

    def write(data: bytes) -> None:
        if len(data) <= _RECORD or layer._lostTLSConnection:
            write_records(data)
            return
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(data):
                batch_end = min(sent + TLS_BATCH, len(data))
                while sent < batch_end:
                    sent += connection.send(view[sent : min(sent + _RECORD, batch_end)])
                # Room for every record's header and tag, whatever the cipher.
                below.write(connection.bio_read(TLS_BATCH + 4096))
        except SSL.WantReadError:
            layer._flushSendBIO()
            layer._bufferedWrite(bytes(view[sent:]))
            return
        except SSL.Error:
            failure = Failure()
            layer._flushSendBIO()
            layer._tlsShutdownFinished(failure)
            return
        layer._flushSendBIO()

    def read_records() -> None:
        gathered: list[bytes] = []
        size = 0
        while not layer._lostTLSConnection:
            try:
                data = connection.recv(_RECORD * 2)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                _deliver(layer, gathered)
                layer._shutdownTLS()
                layer._tlsShutdownFinished(None)
            except SSL.Error:
                failure = Failure()
                _deliver(layer, gathered)
                layer._tlsShutdownFinished(failure)
            else:
                gathered.append(data)
                size += len(data)
                if size >= TLS_BATCH:
                    _deliver(layer, gathered)
                    size = 0
        _deliver(layer, gathered)
        layer._flushSendBIO()

    layer._write = write  # type: ignore[method-assign]
    layer._flushReceiveBIO = read_records  # type: ignore[method-assign]


def _deliver(layer: BufferingTLSTransport, gathered: list[bytes]) -> None:
    """Hand the records gathered by a TLS layer to its protocol, unless it was aborted."""
    if gathered:
        data = gathered[0] if len(gathered) == 1 else b"".join(gathered)
        gathered.clear()
        if not layer._aborted:
            ProtocolWrapper.dataReceived(layer, data)


def _already_tuned(layer: Any) -> bool:
    """Whether C{layer} has been tuned already (so that tuning it twice wraps nothing twice)."""
    if layer.__dict__.get("_arvproxy_tuned"):
        return True
    layer._arvproxy_tuned = True
    return False


def _write_eagerly(layer: tcp.Connection) -> None:
    """
    Make C{layer} send a write of at most L{EAGER_SEND_MAX} bytes in the reactor's current
    turn when nothing is queued before it: held with what follows it in the same turn (up to
    about as much again), and sent at the turn's end, or at once when sockets hold
    L{SEND_BATCH} small messages (L{_HeldSends}).  What the socket does not take is queued as
    usual, and any error is left for the reactor to meet; closing sends what is held first,
    aborting drops it.

    Twisted queues every write for the reactor's next turn, registering the socket for writing
    and unregistering it once sent: two C{epoll_ctl} calls and the reactor's bookkeeping per
    message, about 4% of a small request's CPU in each process (make bench, interleaved runs).
    The hops write each message whole (the server a response's head with the start of its body,
    the client a request's head; a TLS layer gathers its records until L{send_now}), so this
    sends no more segments than the reactor would.  A stream's pieces are batches of TLS records
    or the plaintext of one (L{_tls_in_batches}): sent this way too, they skip the copy that
    joins the queue and its registrations, about a tenth of each hop's CPU per gigabyte
    (interleaved rounds).  (When a stream came in single 16 KiB records, sending each at once
    cost a download a third of its speed; larger writes are still queued.)
    """
    if _already_tuned(layer):
        return
    queue = layer.write
    held: list[bytes] = []
    held_size = 0

    def write(data: bytes) -> None:
        nonlocal held_size
        if not isinstance(data, bytes):
            queue(data)  # Twisted's write refuses it, to the caller, as without tuning.
            return
        if held:
            # Behind what is held already; past a batch's worth it all goes (or is queued, and
            # counts against the buffer that pauses a producer).
            held.append(data)
            held_size += len(data)
            if held_size > EAGER_SEND_MAX:
                send_held()
            elif len(data) <= EAGER_WRITE_MAX:
                # A small message counts towards the batch (a carrier's socket holds many); the
                # pieces of a stream go once there are enough of them.
                _held_sends.hold(layer.reactor, send_held)
        elif 0 < len(data) <= EAGER_SEND_MAX and not layer._tempDataBuffer and _can_send(layer):
            held.append(data)
            held_size = len(data)
            _held_sends.hold(layer.reactor, send_held)
        else:
            queue(data)

    def send_held() -> None:
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        if not layer._tempDataBuffer and _can_send(layer):
            sent = layer.writeSomeData(data)
            if isinstance(sent, int) and sent > 0:
                if sent == len(data):
                    return
                data = data[sent:]
        queue(data)

    def lose_connection(*args: Any, **kwargs: Any) -> None:
        send_held()  # What was written before the close goes first, as with Twisted's queue.
        close(*args, **kwargs)

    def lose_write_connection() -> None:
        send_held()
        close_writing()

    def abort_connection() -> None:
        held.clear()
        abort()

    close, close_writing, abort = (
        layer.loseConnection,
        layer.loseWriteConnection,
        layer.abortConnection,
    )
    layer.write = write  # type: ignore[method-assign]
    layer.writeSequence = lambda iovec: write(b"".join(iovec))  # type: ignore[method-assign]
    layer.loseConnection = lose_connection  # type: ignore[method-assign]
    layer.loseWriteConnection = lose_write_connection  # type: ignore[method-assign]
    layer.abortConnection = abort_connection  # type: ignore[method-assign]


class _HeldSends:
    """
    The tuned sockets holding a message (see L{_write_eagerly}): all of them send at the end of
    the reactor's turn, or at once when they hold L{SEND_BATCH} small messages (a carrier's
    socket may hold several: the requests, or the answers, of several streams).

    Sent as each was finished (one C{send} per message, as a hop serves the requests that one
    turn read), every message woke the process at the other end, which took a core from the
    one still at work on the rest: two busy hops, the client and the service switched places
    on two cores after nearly every message.  Sent a few at a time, each process gets on with
    several; sent only at the end of the turn, the next hop waited for the whole turn's work.
    Interleaved rounds of small requests through the chain: 3,443 -> 4,496 req/s, and 252 and
    213 -> 189 and 174 us of CPU per request in the front door and the gateway.
    """

    def __init__(self) -> None:
        self._senders: list[Callable[[], None]] = []
        self._end_of_turn: Any = None

    def hold(self, reactor: Any, send: Callable[[], None]) -> None:
        """A socket holds a message: C{send} sends what it holds."""
        self._senders.append(send)
        if len(self._senders) >= SEND_BATCH:
            self.send()
        elif self._end_of_turn is None:
            # Called when the reactor has handled every event of this turn, before it waits.
            self._end_of_turn = reactor.callLater(0, self._turn_ended)

    def _turn_ended(self) -> None:
        self._end_of_turn = None
        self.send()

    def send(self) -> None:
        senders, self._senders = self._senders, []
        for send in senders:
            try:
                send()
            except Exception:
                # One socket's unexpected failure must not keep the others' messages.
                log.failure("Sending a held message failed")


_held_sends = _HeldSends()


def send_now(transport: Any) -> None:
    """
    Send what C{transport} (and any TLS layer over its socket) holds to the socket in this turn
    of the reactor (a tuned socket sends it as the turn ends, with other sockets' messages:
    L{_HeldSends}), rather than when the reactor reports the socket writable in its next turn.

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


_known_field_name = _nameEncoder._canonicalHeaderCache.get
_canonical_field_name = _nameEncoder.encode


def add_parsed_field(fields: dict[bytes, list[bytes]], name: bytes, value: bytes) -> None:
    """
    Gather a header field llhttp parsed (in a parser's C{on_header}) under its name in
    Twisted's canonical form, for L{parsed_headers}.
    """
    name = _known_field_name(name) or _canonical_field_name(name)
    values = fields.get(name)
    if values is None:
        fields[name] = [value]
    else:
        values.append(value)


def parsed_headers(fields: dict[bytes, list[bytes]]) -> tuple[Headers, int | None, list[bytes]]:
    """
    The header fields llhttp parsed from a message, gathered by L{add_parsed_field}, as
    L{Headers}, with the framing they declare: the C{Content-Length} (llhttp has checked it:
    digits, and only one) or C{None}, and the transfer codings, lower-case, in order.

    llhttp has refused any name that is not a token and any CR, LF or NUL in a value, so the
    fields go into the L{Headers} as they are, without the scrubbing of each value that
    L{Headers.addRawHeader} does (about a third of the cost of parsing a request's headers).
    """
    lengths = fields.get(b"Content-Length")
    codings = [
        coding.strip().lower()
        for value in fields.get(b"Transfer-Encoding", ())
        for coding in value.split(b",")
    ]
    headers = Headers()
    headers._rawHeaders = fields
    return headers, int(lengths[-1]) if lengths else None, codings


def add_field_lines(
    lines: list[bytes], headers: Headers, skip: frozenset[bytes] = frozenset()
) -> None:
    """
    Append C{headers} to C{lines} as they go on the wire (C{Name: value}, CRLF each), but for
    the lower-case names in C{skip}.  L{Headers} has already turned any CR or LF in a name or
    value into a space, so no field can end early or add another.
    """
    for name, values in headers.getAllRawHeaders():
        if skip and name.lower() in skip:
            continue
        for value in values:
            lines += (name, b": ", value, b"\r\n")


def relay_headers(request: StreamingRequest, upstream: Headers) -> None:
    """
    Give C{request}'s response the headers of the next hop's answer that may cross a hop
    (L{policy.response_headers}); any the proxy set before, its own cookie, are kept.
    """
    headers = policy.response_headers(upstream)
    for name, values in request.responseHeaders.getAllRawHeaders():
        for value in values:
            headers.addRawHeader(name, value)
    request.responseHeaders = headers


def closing(transport: Any) -> bool:
    """Whether C{transport}, or any transport under it (through TLS layers), is closing."""
    # A plain loop: this runs for every request a pooled connection sends.
    for _ in range(4):
        if transport is None:
            return False
        if getattr(transport, "disconnecting", False) or getattr(transport, "disconnected", False):
            return True
        transport = getattr(transport, "transport", None)
    return False


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
        self._request: StreamingRequest | None = request
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
        # Whatever the client sends next is another request's business.
        self._resume_client()
        # Nothing more is asked of the request (no pause, no 100 Continue): without the cycle
        # between the two, a request and its headers go when it ends, not when the garbage
        # collector next runs (that cost each hop about a tenth of its CPU per small request).
        self._request = None
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
        if self._request is not None:
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
        if not self.complete and not self._client_paused:
            self._client_paused = True
            assert self._request is not None  # Until complete.
            self._request.pause_client(self)

    def _resume_client(self) -> None:
        if self._client_paused:
            self._client_paused = False
            assert self._request is not None  # Until complete.
            self._request.resume_client(self)


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


def relay_informational(request: StreamingRequest) -> Callable[[int, bytes, Headers], None]:
    """
    What passes the next hop's interim answers (103 Early Hints) on to C{request}'s client, with
    the same headers policy as a response.
    """

    def relay(code: int, phrase: bytes, headers: Headers) -> None:
        request.write_informational(code, phrase, policy.response_headers(headers))

    return relay


async def relay_response(request: StreamingRequest, response: HopResponse) -> None:
    """
    Send C{response} (from the next hop) to the client: its status, its end-to-end headers and
    its body as it arrives.
    """
    request.setResponseCode(response.code, response.phrase)
    relay_headers(request, response.headers)
    # A small answer has usually arrived whole: it goes out in one write, with its length.
    body = response.complete_body()
    if request.method == b"HEAD":
        length = response.headers.getRawHeaders(b"content-length")
        if length:
            request.responseHeaders.setRawHeaders(b"content-length", length[-1:])
    elif response.code not in NO_BODY_CODES:
        if body is not None:
            request.setHeader(b"content-length", b"%d" % (len(body),))
        elif response.length is not iweb.UNKNOWN_LENGTH:
            request.setHeader(b"content-length", b"%d" % (response.length,))
    request.finishEarly()
    if body is not None:
        request.write(body)
        request.finish()
        return
    relay = Relay(request)
    response.deliverBody(relay)
    await relay.done


CLIENT_GONE = (ConnectionDone, ConnectionLost)
