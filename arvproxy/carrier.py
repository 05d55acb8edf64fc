"""
Carriers: the front door's requests and WebSocket tunnels to one gateway share a few
long-lived, pinned TLS connections instead of each holding one of its own.

An idle TLS connection costs more memory than the 20 KB a tunnel may cost (C{make bench} prints
the figure), so a connection per tunnel made thousands of idle notebook tunnels expensive on
both hops; and a connection per request cost each hop a system call each way for every
request, where the requests that one turn of the reactor puts on a carrier leave together (see
L{arvproxy.controller.proxy.GatewayConnector}).  A carrier is opened like any forwarded
request: an HTTP/1.1 upgrade to C{arvproxy-tunnels/1}, signed with the container's secret
(L{policy.sign_request}), that the gateway verifies before answering C{101}.  Each request or
tunnel is then a L{Stream} on it: a transport that the usual protocols run over unchanged: the front
door's HTTP or upgrade client on one side, the gateway's HTTP channel (which verifies each
request's own signature) on the other.

After the handshake the connection carries frames: a 9-byte header (type, stream id, payload
length; network byte order), then the payload.

  - C{OPEN} (front door to gateway): a new stream; stream ids only grow, and at most
    L{MAX_STREAMS} streams are open at once.
  - C{DATA}: 1 to 65,536 bytes of a stream, within the receiver's window.
  - C{WINDOW}: 4 bytes, how many more bytes of the stream its sender will now accept.
  - C{CLOSE}: the stream is over in both directions; sent once, by whichever end closes first.

Each stream has at most a window's bytes in flight in each direction (L{WINDOW_SIZE}, or what
each end announced in the handshake: L{WINDOW_HEADER}), and a receiver whose
consumer is paused grants no more: a slow tunnel never holds up the others and never costs more
than its window.  A frame that breaks these rules ends the carrier, and with it all its
streams: both ends are this code, so it can only be a bug or someone who should not be there.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from arvproxy import policy

log = Logger()

PROTOCOL = policy.CARRIER_UPGRADE
"""The C{Upgrade} token of a carrier's handshake; a client can never ask for it."""

PATH = b"/.arvproxy/carrier"
"""The request target of a carrier's handshake."""

OPEN, DATA, WINDOW, CLOSE = 1, 2, 3, 4
HEADER = struct.Struct("!BII")
MAX_PAYLOAD = 65536
WINDOW_SIZE = 256 * 1024
"""Each stream's window, in each direction, unless both ends announce theirs (L{WINDOW_HEADER})."""

STREAM_WINDOW = 1024 * 1024
"""The window this end offers for each stream it receives.  A download through a carrier with
256 KiB windows took a C{WINDOW} frame, and a wake-up of each hop, per 64 KiB: a third slower
than on a connection of its own, at twice the CPU (make bench, interleaved rounds); with 1 MiB
as fast.  A stalled stream costs at most its window, as a stalled connection costs its socket
buffers."""

MAX_WINDOW = 16 * 1024 * 1024
"""The largest window an end may announce."""

WINDOW_HEADER = policy.CARRIER_WINDOW
"""The header of a carrier's handshake, and of its C{101}, in which each end announces the
window it offers (L{STREAM_WINDOW}).  An end that does not (an older version) gets and gives
L{WINDOW_SIZE}.  The handshake's signature covers it."""
_MAX_ID = 2**32 - 1

# How many DATA frames a stream sends in one write, at most.
_FRAMES_PER_WRITE = 4

MAX_STREAMS = 1000
"""How many streams (requests and tunnels) one carrier carries at most: the front door opens no
more on it, and the gateway's end ends a carrier that opens more (its memory is the gateway's
to guard)."""

CLOSE_GRACE = 5.0
"""Seconds L{CarrierPool.close} lets carriers close politely before it aborts them."""


class CarrierError(Exception):
    """A frame, or a handshake, broke the carrier protocol."""


def announced_window(headers: Headers) -> int | None:
    """
    The window that the other end announced in a carrier's handshake (L{WINDOW_HEADER}), or
    C{None} when it announced none.

    @raise CarrierError: it announced more than one, or one that is not a number of bytes
        from L{WINDOW_SIZE} to L{MAX_WINDOW}.
    """
    values = headers.getRawHeaders(WINDOW_HEADER)
    if values is None:
        return None
    if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 9:
        raise CarrierError(f"a carrier window of {values!r}")
    window = int(values[0])
    if not WINDOW_SIZE <= window <= MAX_WINDOW:
        raise CarrierError(f"a carrier window of {window} bytes")
    return window


@implementer(ITransport, IConsumer, IPushProducer)
class Stream:
    """
    One request or tunnel on a carrier, as a transport: what its protocol writes reaches the
    protocol at the other end of the stream, with backpressure both ways.

    As a producer it delivers the bytes that arrive; as a consumer it pauses its registered
    producer while it has bytes the other end has no window for.

    @ivar id: the stream's number on its carrier.
    @ivar protocol: what receives the stream's bytes (set by whoever makes the stream).
    """

    def __init__(self, carrier: Carrier, stream_id: int) -> None:
        self._carrier = carrier
        self.id = stream_id
        self.protocol: Any = None
        self.connected = True
        self.disconnecting = False
        self._closed = False
        # Sending: bytes the other end has room for, and what waits for room.
        self._credit = carrier.peer_window
        self._outgoing: deque[bytes | memoryview] = deque()
        self._outgoing_size = 0
        self._producer: Any = None
        self._streaming = True
        self._producer_paused = False
        # Receiving: how much more the other end may send, what arrived while paused, and
        # what has been delivered but not yet granted back.
        self._window = carrier.window
        self._incoming: deque[bytes] = deque()
        self._paused = False
        self._delivered = 0
        self._remote_closed = False

    @property
    def transport(self) -> Any:
        """
        The carrier's connection, under the stream as a TLS layer is under its protocol: so
        L{streaming.send_now} sends a finished message, and L{streaming.closing} sees a closing
        carrier, through a stream as through any other transport.
        """
        return self._carrier.transport

    @property
    def producer(self) -> Any:
        """The producer registered with the stream, as a socket's C{producer} is."""
        return self._producer

    # ITransport

    def write(self, data: bytes) -> None:
        if self._closed or self.disconnecting or not data:
            return
        self._outgoing.append(data)
        self._outgoing_size += len(data)
        self._flush()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close once everything written has been sent."""
        if self._closed or self.disconnecting:
            return
        self.disconnecting = True
        self._flush()

    def abortConnection(self) -> None:
        """Close now, dropping whatever has not been sent."""
        self._outgoing.clear()
        self._outgoing_size = 0
        self._finish(ConnectionAborted(), tell_peer=True)

    def getPeer(self) -> Any:
        return self._carrier.transport.getPeer()

    def getHost(self) -> Any:
        return self._carrier.transport.getHost()

    # IConsumer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if self._outgoing_size:
            self._pause_producer()
        elif not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    # IPushProducer: the stream's incoming bytes.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._deliver()

    def stopProducing(self) -> None:
        self.abortConnection()

    # Sending.

    def _flush(self) -> None:
        carrier = self._carrier
        while self._outgoing and self._credit > 0 and not carrier.paused and not self._closed:
            # A few frames at a time, in one write: a frame's header never ends up in a TLS
            # record of its own (a 64 KiB payload and its header make 64 KiB and 9 bytes).
            frames: list[bytes | memoryview] = []
            while self._outgoing and self._credit > 0 and len(frames) < 2 * _FRAMES_PER_WRITE:
                chunk = self._outgoing.popleft()
                size = min(len(chunk), self._credit, MAX_PAYLOAD)
                if size < len(chunk):
                    view = memoryview(chunk)
                    self._outgoing.appendleft(view[size:])
                    chunk = view[:size]
                self._outgoing_size -= size
                self._credit -= size
                frames += (HEADER.pack(DATA, self.id, size), chunk)
            carrier.write(frames)
        if self._closed:
            return
        if self._outgoing_size:
            self._pause_producer()
        else:
            self._resume_producer()
            if self.disconnecting:
                self._finish(ConnectionDone(), tell_peer=True)

    def _pause_producer(self) -> None:
        if self._producer is not None and self._streaming and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()

    def _resume_producer(self) -> None:
        if self._producer is None:
            return
        if not self._streaming:
            self._producer.resumeProducing()
        elif self._producer_paused:
            self._producer_paused = False
            self._producer.resumeProducing()

    def _granted(self, increment: int) -> None:
        """The other end made room for C{increment} more bytes."""
        if self._credit + increment > self._carrier.peer_window:
            raise CarrierError(f"stream {self.id} was granted more than its window")
        self._credit += increment
        self._flush()

    # Receiving.

    def _received(self, payload: bytes) -> None:
        if len(payload) > self._window:
            raise CarrierError(f"stream {self.id} was sent more than its window")
        self._window -= len(payload)
        self._incoming.append(payload)
        self._deliver()

    def _deliver(self) -> None:
        while self._incoming and not self._paused and not self._closed:
            payload = self._incoming.popleft()
            self._delivered += len(payload)
            try:
                self.protocol.dataReceived(payload)
            except Exception:
                # As with a connection of its own: this stream ends, the others go on.
                log.failure("Error in a carrier stream's protocol; closing the stream")
                self.abortConnection()
                return
        if self._closed:
            return
        if self._incoming or self._paused:
            return
        if self._remote_closed:
            self._finish(ConnectionDone(), tell_peer=False)
        elif self._delivered >= self._carrier.window // 4 or (self._delivered and not self._window):
            granted, self._delivered = self._delivered, 0
            self._window += granted
            self._carrier.send(WINDOW, self.id, struct.pack("!I", granted))

    def _remotely_closed(self) -> None:
        # The other end has forgotten the stream: deliver what had crossed (a window at most,
        # even to a paused consumer, which would otherwise keep the stream forever), then end.
        self._remote_closed = True
        self._outgoing.clear()
        self._outgoing_size = 0
        self._paused = False
        self._deliver()

    # Ending.

    def _finish(self, reason: Exception, tell_peer: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self.connected = False
        self.disconnecting = True
        self._incoming.clear()
        self._carrier.forget(self, tell_peer)
        # As a real transport does: whatever was producing into the stream is told to stop.
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                log.failure("Error stopping a carrier stream's producer")
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            # Asynchronously, as a real transport does: callers of loseConnection may still
            # be in the middle of something.
            self._carrier.call_later(0, protocol.connectionLost, Failure(reason))

    def _carrier_lost(self, reason: Failure) -> None:
        self._finish(ConnectionLost(f"the carrier was lost: {reason.getErrorMessage()}"), False)


@implementer(IPushProducer)
class Carrier(Protocol):
    """
    One end of a carrier connection, once its handshake is done.

    The front door's end opens streams (L{open_stream}); the gateway's end is given
    C{accept}, which makes the protocol for each stream the other end opens, and ends the
    carrier when that would make more than C{max_streams} open at once.  C{announced} is the
    window the other end announced in the handshake (L{announced_window}), if it did.

    @ivar window: how many bytes of each stream this end receives before it grants more.
    @ivar peer_window: how many bytes of each stream the other end receives before it grants
        more.
    @ivar paused: the connection's write buffer is full; streams hold their bytes.
    @ivar lost: why the connection went, once it has.
    @ivar closing: this end is closing the connection (L{close}).
    @ivar closed: fires (with C{None}) when the connection is gone.
    """

    transport: Any

    def __init__(
        self,
        call_later: Any,
        accept: Callable[[Stream], None] | None = None,
        max_streams: int = MAX_STREAMS,
        announced: int | None = None,
    ) -> None:
        self.call_later = call_later
        self._accept = accept
        self._max_streams = max_streams
        # Each end announces its window only to one that announces its own (see WINDOW_HEADER).
        self.window = WINDOW_SIZE if announced is None else STREAM_WINDOW
        self.peer_window = WINDOW_SIZE if announced is None else announced
        self._streams: dict[int, Stream] = {}
        self._highest = 0
        self._buffer = b""
        # The DATA frame whose payload is arriving: its stream (None once forgotten here), and
        # how many of its bytes are still to come.
        self._data_stream: Stream | None = None
        self._data_left = 0
        self.paused = False
        self.lost: Failure | None = None
        self.closing = False
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.on_idle: Callable[[Carrier], None] | None = None

    def __len__(self) -> int:
        """How many streams are open."""
        return len(self._streams)

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    # Opening.

    def open_stream(self, protocol: Any) -> Stream:
        """
        Open a stream for C{protocol} and connect it (its C{connectionMade} runs now).

        @raise CarrierError: the carrier is gone or closing, or has used up its stream ids.
        """
        if self.lost is not None or self.closing or self._highest >= _MAX_ID:
            raise CarrierError("the carrier cannot open another stream")
        self._highest += 1
        stream = Stream(self, self._highest)
        self._streams[stream.id] = stream
        self.send(OPEN, stream.id, b"")
        stream.protocol = protocol
        protocol.makeConnection(stream)
        return stream

    # Frames.

    def send(self, kind: int, stream_id: int, payload: bytes) -> None:
        """Send a frame."""
        self.write([HEADER.pack(kind, stream_id, len(payload)), payload])

    def write(self, frames: list[bytes | memoryview]) -> None:
        """Send frames, their headers and payloads in order, in one write (one copy)."""
        if self.lost is None:
            self.transport.write(b"".join(frames))

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        offset = 0
        # The payload of one stream's consecutive DATA frames in this read, delivered at once.
        payload = _Payload()
        try:
            while offset < len(buffer):
                if self._data_left:
                    offset = self._data_arrived(buffer, offset, payload)
                    continue
                if len(buffer) - offset < HEADER.size:
                    break
                kind, stream_id, length = HEADER.unpack_from(buffer, offset)
                if length > MAX_PAYLOAD:
                    raise CarrierError(f"a frame of {length} bytes")
                if kind == DATA:
                    self._data_started(stream_id, length)
                    offset += HEADER.size
                    continue
                end = offset + HEADER.size + length
                if len(buffer) < end:
                    break
                payload.deliver()
                self._frame(kind, stream_id, buffer[offset + HEADER.size : end])
                offset = end
                if self.lost is not None:
                    return
            payload.deliver()
        except CarrierError as e:
            log.warn("Closing a carrier: {error}", error=str(e))
            self._data_left = 0
            self.transport.abortConnection()
            return
        # Only the start of a frame is kept: a header, or a control frame's few bytes.
        self._buffer = buffer[offset:]

    def _data_started(self, stream_id: int, length: int) -> None:
        """A DATA frame's header has arrived: its payload goes to its stream as it arrives."""
        if not length:
            raise CarrierError("an empty DATA frame")
        stream = self._streams.get(stream_id)
        if stream is None and not 0 < stream_id <= self._highest:
            raise CarrierError(f"a frame of type {DATA} for unknown stream {stream_id}")
        # A stream that is not known here any more: the frame crossed this end's CLOSE.
        self._data_stream = stream
        self._data_left = length

    def _data_arrived(self, buffer: bytes, offset: int, payload: _Payload) -> int:
        """
        Add as much of the current DATA frame's payload as C{buffer} holds from C{offset} to
        C{payload}, and return where it ends in C{buffer}.
        """
        end = min(len(buffer), offset + self._data_left)
        self._data_left -= end - offset
        stream = self._data_stream
        if not self._data_left:
            self._data_stream = None
        if stream is not None:
            # Not copied when it is all of the read: a bulk transfer's pieces.
            payload.add(
                stream, buffer if offset == 0 and end == len(buffer) else buffer[offset:end]
            )
        return end

    def _frame(self, kind: int, stream_id: int, payload: bytes) -> None:
        if kind == OPEN:
            self._opened(stream_id, payload)
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if not 0 < stream_id <= self._highest or kind not in (WINDOW, CLOSE):
                raise CarrierError(f"a frame of type {kind} for unknown stream {stream_id}")
            # A frame that crossed this end's CLOSE: the stream is over here already.
            return
        if kind == WINDOW:
            if len(payload) != 4:
                raise CarrierError("a WINDOW frame without a 4-byte increment")
            (increment,) = struct.unpack("!I", payload)
            if not increment:
                raise CarrierError("a WINDOW frame of 0")
            stream._granted(increment)
        elif kind == CLOSE:
            if payload:
                raise CarrierError("a CLOSE frame with a payload")
            stream._remotely_closed()
        else:
            raise CarrierError(f"a frame of unknown type {kind}")

    def _opened(self, stream_id: int, payload: bytes) -> None:
        if self._accept is None:
            raise CarrierError("an OPEN frame sent to the end that opens streams")
        if payload or stream_id <= self._highest:
            raise CarrierError(f"a bad OPEN frame for stream {stream_id}")
        if len(self._streams) >= self._max_streams:
            raise CarrierError(f"stream {stream_id} opened beyond {self._max_streams} open streams")
        self._highest = stream_id
        stream = Stream(self, stream_id)
        self._streams[stream_id] = stream
        self._accept(stream)

    def forget(self, stream: Stream, tell_peer: bool) -> None:
        """Called by a stream as it ends."""
        if self._streams.pop(stream.id, None) is not None and tell_peer:
            self.send(CLOSE, stream.id, b"")
        if not self._streams and self.on_idle is not None:
            self.on_idle(self)

    # IPushProducer: the connection's write buffer.

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        for stream in list(self._streams.values()):
            stream._flush()

    def stopProducing(self) -> None:
        self.transport.abortConnection()

    def close(self) -> None:
        """Close the connection (and so every stream on it); no stream opens on it any more."""
        if self.lost is None and not self.closing:
            self.closing = True
            # A transport closes only once its producer has gone.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        for stream in list(self._streams.values()):
            stream._carrier_lost(reason)
        self._streams.clear()
        if not self.closed.called:
            self.closed.callback(None)


class _Payload:
    """What one read of a carrier brought for one stream, gathered from consecutive frames."""

    __slots__ = ("_stream", "_pieces")

    def __init__(self) -> None:
        self._stream: Stream | None = None
        self._pieces: list[bytes] = []

    def add(self, stream: Stream, piece: bytes) -> None:
        if stream is not self._stream:
            self.deliver()
            self._stream = stream
        self._pieces.append(piece)

    def deliver(self) -> None:
        """Hand what was gathered to its stream (one whose end came meanwhile drops it)."""
        stream, self._stream = self._stream, None
        pieces = self._pieces
        if stream is not None and pieces:
            self._pieces = []
            if not stream._closed:
                stream._received(pieces[0] if len(pieces) == 1 else b"".join(pieces))


class CarrierPool:
    """
    The front door's carriers, by gateway: one is opened when a stream needs it (streams that
    ask meanwhile wait for the same one), each carries up to C{max_streams} streams, and one
    without any for C{idle_timeout} seconds is closed.
    """

    def __init__(
        self, clock: Any, max_streams: int = MAX_STREAMS, idle_timeout: float = 240.0
    ) -> None:
        self._clock = clock
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._carriers: dict[Hashable, list[Carrier]] = {}
        self._opening: dict[Hashable, list[defer.Deferred[Carrier]]] = {}
        self._idle_calls: dict[Carrier, Any] = {}

    def get(
        self, key: Hashable, connect: Callable[[], defer.Deferred[Carrier]]
    ) -> defer.Deferred[Carrier]:
        """
        A carrier for C{key} with room for another stream; C{connect()} opens a new one (its
        Deferred fires once the carrier is ready) when none has room.
        """
        for carrier in self._carriers.get(key, ()):
            # Not one that is closing (idle, just as a stream asks): its streams would go nowhere.
            if carrier.lost is None and not carrier.closing and len(carrier) < self.max_streams:
                self._not_idle(carrier)
                return defer.succeed(carrier)
        waiter: defer.Deferred[Carrier] = defer.Deferred()
        waiting = self._opening.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._opening[key] = [waiter]
        connect().addBoth(self._opened, key)
        return waiter

    def _opened(self, result: Carrier | Failure, key: Hashable) -> None:
        waiting = self._opening.pop(key, [])
        if isinstance(result, Carrier):
            self._carriers.setdefault(key, []).append(result)
            result.on_idle = self._went_idle
            result.closed.addBoth(self._closed, key, result)
            if not waiting:
                self._went_idle(result)
        for waiter in waiting:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _went_idle(self, carrier: Carrier) -> None:
        self._not_idle(carrier)
        if carrier.lost is None:
            self._idle_calls[carrier] = self._clock.callLater(
                self.idle_timeout, self._close_idle, carrier
            )

    def _not_idle(self, carrier: Carrier) -> None:
        call = self._idle_calls.pop(carrier, None)
        if call is not None and call.active():
            call.cancel()

    def _close_idle(self, carrier: Carrier) -> None:
        self._idle_calls.pop(carrier, None)
        if not len(carrier):
            carrier.close()

    def _closed(self, result: None, key: Hashable, carrier: Carrier) -> None:
        self._not_idle(carrier)
        carriers = self._carriers.get(key, [])
        if carrier in carriers:
            carriers.remove(carrier)
        if not carriers:
            self._carriers.pop(key, None)

    def close(self, grace: float = CLOSE_GRACE) -> defer.Deferred[list[Any]]:
        """
        Close every carrier; fires once they are all gone.  A carrier still there after
        C{grace} seconds is aborted: TLS closes politely only once the other end answers, and
        a gateway that has stopped (SIGSTOP, a frozen node) never does, which would hold up
        the front door's shutdown for ever.
        """
        carriers = [c for cs in self._carriers.values() for c in cs]
        for carrier in carriers:
            self._not_idle(carrier)
            carrier.close()
        done = defer.gatherResults([_copy(c.closed) for c in carriers])
        if carriers:
            late = self._clock.callLater(grace, _abort_all, carriers)

            def in_time(result: Any) -> Any:
                if late.active():
                    late.cancel()
                return result

            done.addBoth(in_time)
        return done


def _abort_all(carriers: list[Carrier]) -> None:
    for carrier in carriers:
        if carrier.lost is None:
            log.warn("A carrier did not close in time: aborting it")
            carrier.transport.abortConnection()


def _copy(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A Deferred that fires with C{d}'s result without taking it from C{d}'s own callers."""
    copy: defer.Deferred[Any] = defer.Deferred()

    def fire(result: Any) -> Any:
        copy.callback(None)
        return result

    d.addBoth(fire)
    return copy
