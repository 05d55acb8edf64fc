"""
The HTTP/1.1 client both hops use to reach the next one: the front door to a gateway, and a
gateway to the service in its container.

Twisted's C{Agent} costs about 130 µs more CPU per small request than this (a twisted.web proxy
to nginx: 230 µs with C{Agent}, 95 µs with a client like this one): it reads a response line by
line and builds a state machine, Deferreds and L{Headers} for every step.  This client parses
with httptools (llhttp, Node's parser), sends one request at a time per connection, and pools
idle connections by key (L{HopPool}).

Its answers follow L{twisted.web.iweb.IResponse} as far as the relays use it (C{code},
C{phrase}, C{headers}, C{length}, C{deliverBody}; the body ends with C{ResponseDone},
C{PotentialDataLoss} or C{ResponseFailed}), and it fails with Twisted's client errors
(C{ResponseNeverReceived}, C{RequestTransmissionFailed}, C{ResponseFailed}), so its callers keep
the contract they had with C{Agent}.

The client owns the framing.  A caller's C{Content-Length}, C{Transfer-Encoding} and
C{Connection} are never sent: a body of known length gets C{Content-Length}, any other body is
sent chunked.  Of the answers, interim ones (1xx but 101) go to the caller's C{informational},
but 100; a 101 (never asked for here), bytes nobody asked for, more than
L{MAX_ANSWER_HEADERS} of headers, and anything llhttp's strict rules refuse (two lengths, a
length with chunking, a bad chunk) fail the request and close the connection.  A connection
is used again only when both messages are complete and both sides allow it; never after a
HEAD, whose answer has no body that llhttp could be told about.  A request safe to send twice
that meets the end of a kept connection before its answer goes once more on a new connection
(L{HopPool.request}).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import httptools
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import iweb
from twisted.web.client import (
    PotentialDataLoss,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import NO_BODY_CODES
from twisted.web.http_headers import Headers
from zope.interface import implementer

from arvproxy import policy
from arvproxy.deadlines import ANSWER_HEAD, DeadlinePassed
from arvproxy.streaming import (
    add_field_lines,
    add_parsed_field,
    closing,
    parsed_headers,
    send_now,
)

log = Logger()

# Framing is the client's business (see the module's docstring).
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})

# The most header bytes an answer may carry (llhttp sets no limit; Node's is 16 KiB, and
# nginx's proxy buffers hold 4 to 8 KiB): more closes the connection and fails the request.
MAX_ANSWER_HEADERS = 64 * 1024

# Told of an interim answer: its code, phrase and headers.
Informational = Callable[[int, bytes, Headers], None]

# Methods a request of which, without a body, may be sent twice (RFC 9110 section 9.2.2).
RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Methods whose requests announce an empty body explicitly, as Twisted's client does.
_EMPTY_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class ProtocolError(Exception):
    """The next hop broke HTTP/1.1: its connection is closed and the request fails."""


def request_head(
    method: bytes, target: bytes, headers: Headers, length: int | object | None
) -> bytes:
    """
    The request line and headers of a request, framed for a body of C{length} bytes
    (C{UNKNOWN_LENGTH}: chunked; C{None}: no body).

    @raise ValueError: the method is not a token, or the target is not visible ASCII.
    """
    if not policy.is_forwardable_request_line(method, target):
        raise ValueError(f"not a valid request line: {method!r} {target!r}")
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    add_field_lines(lines, headers, skip=_FRAMING)
    if length is iweb.UNKNOWN_LENGTH:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif isinstance(length, int):
        lines.append(b"Content-Length: %d\r\n" % (length,))
    elif method in _EMPTY_BODY_METHODS:
        lines.append(b"Content-Length: 0\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


# What a response's body went to when it was taken whole.
_TAKEN = object()

# How every complete body ends: one Failure for all, as Twisted's own connectionDone is (building
# one per answer cost about 2% of a hop's CPU per small request).
_RESPONSE_DONE = Failure(ResponseDone())


@implementer(IPushProducer)
class HopResponse:
    """
    An answer from the next hop, its body delivered to one protocol (L{deliverBody}) as it
    arrives; what comes before that protocol is attached is held.

    It is also the producer that protocol gets as its transport: pausing it stops reading from
    the connection, stopping it closes the connection.  Once the body is complete (and the
    connection perhaps serves another request) those do nothing.
    """

    def __init__(
        self, connection: HopConnection, code: int, phrase: bytes, headers: Headers, length: Any
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection: HopConnection | None = connection
        self._protocol: Any = None
        self._held: list[bytes] = []
        self._end: Failure | None = None
        self._paused = False

    def complete_body(self) -> bytes | None:
        """
        The whole body, taken at once, when all of it has arrived and ended cleanly before
        anything asked for it (a small answer's usually has); otherwise C{None}, and the body is
        for L{deliverBody}.
        """
        if self._protocol is not None or self._end is None or not self._end.check(ResponseDone):
            return None
        self._protocol = _TAKEN
        body = b"".join(self._held)
        self._held = []
        return body

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("the body was delivered already")
        self._protocol = protocol
        protocol.makeConnection(self)
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._end is not None:
            protocol.connectionLost(self._end)

    def _data(self, data: bytes) -> None:
        if self._protocol is None:
            self._held.append(data)
        else:
            self._protocol.dataReceived(data)

    def _ended(self, reason: Failure) -> None:
        """The body is complete (or cannot be): nothing more comes from the connection."""
        connection, self._connection = self._connection, None
        if connection is not None and self._paused:
            connection.transport.resumeProducing()
        if self._protocol is None:
            self._end = reason
        else:
            self._protocol.connectionLost(reason)

    # IPushProducer, for the body's protocol.

    def pauseProducing(self) -> None:
        if self._connection is not None and not self._paused:
            self._paused = True
            self._connection.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._connection is not None and self._paused:
            self._paused = False
            self._connection.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._connection is not None:
            self._connection.abandon()

    # What twisted.web.client.readBody calls when its Deferred is cancelled.
    abortConnection = stopProducing


@implementer(IConsumer)
class _BodyWriter:
    """Writes a request body to the connection: as it comes (Content-Length) or chunked."""

    def __init__(self, connection: HopConnection, length: int | object) -> None:
        self._connection = connection
        self._transport = connection.transport
        self._chunked = length is iweb.UNKNOWN_LENGTH
        self.remaining: Any = 0 if self._chunked else length

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            self._transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
            return
        self.remaining -= len(data)
        if self.remaining < 0:
            error = ProtocolError("the request body is longer than its Content-Length")
            self._connection._body_failed(Failure(error))
            return
        self._transport.write(data)

    def finish(self) -> None:
        if self._chunked:
            self._transport.write(b"0\r\n\r\n")
        elif self.remaining:
            raise ProtocolError("the request body is shorter than its Content-Length")

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass  # The connection registers the body with its transport.

    def unregisterProducer(self) -> None:
        pass


_IDLE, _BUSY, _CLOSED = "idle", "busy", "closed"


class HopConnection(Protocol):
    """
    One connection to the next hop, serving one request at a time (see the module).

    @ivar kept: whether this new connection rides on one kept open already (a stream on a
        carrier), which the next hop may have closed just before: see L{HopPool.request}.
    """

    transport: Any
    kept = False

    def __init__(self, pool: HopPool, key: Hashable) -> None:
        self._pool = pool
        self.key = key
        self.state = _IDLE
        self.idle_call: Any = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer: defer.Deferred[HopResponse] | None = None
        self._response: HopResponse | None = None
        self._announced = False
        self._method = b""
        self._phrase = b""
        self._headers: dict[bytes, list[bytes]] = {}
        self._headers_done = False
        self._header_bytes = 0
        self._interim = False
        self._informational: Informational | None = None
        self._complete = False
        self._keep_alive = False
        self._unusable = False
        self._body: Any = None
        self._writer: _BodyWriter | None = None
        # The deadline on the answer's head (HopPool.answer_timeout), while it runs.
        self._answer_deadline: Any = None

    # Sending.

    def usable(self) -> bool:
        """Whether this connection may send a request now: idle, and not closing."""
        return self.state is _IDLE and not closing(self.transport)

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: iweb.IBodyProducer | None,
        informational: Informational | None = None,
    ) -> defer.Deferred[HopResponse]:
        """
        Send a request; the Deferred fires with the answer once its status and headers are in.

        @param informational: called with each interim answer other than 100 (103 Early Hints,
            say): its code, phrase and headers, before the answer.
        """
        if not self.usable():
            return defer.fail(RequestNotSent())
        try:
            head = request_head(method, target, headers, None if body is None else body.length)
        except ValueError:
            return defer.fail()
        self.state = _BUSY
        self._method = method
        self._informational = informational
        answer = self._answer = defer.Deferred()
        self.transport.write(head)
        if body is not None:
            self._send_body(body)
        else:
            self._await_answer()
        send_now(self.transport)
        return answer

    def _await_answer(self) -> None:
        """
        The whole request has gone: start the deadline on its answer's head, if the pool has
        one (as Go's C{ResponseHeaderTimeout} does, from the end of the request's body).
        """
        timeout = self._pool.answer_timeout
        if timeout is not None and self._answer is not None:
            self._answer_deadline = self._pool._clock.callLater(timeout, self._answer_late)

    def _answer_arrived(self) -> None:
        deadline, self._answer_deadline = self._answer_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _answer_late(self) -> None:
        """The answer's head did not come in time: fail the request, end the connection."""
        self._answer_deadline = None
        timeout = self._pool.answer_timeout
        assert timeout is not None
        if self._answer is not None:
            answer, self._answer = self._answer, None
            # Not a lost connection: never sent again (HopPool._resend).
            answer.errback(DeadlinePassed(ANSWER_HEAD, timeout))
        self._stop_body()
        self.abandon()

    def _send_body(self, body: iweb.IBodyProducer) -> None:
        self._body = body
        writer = self._writer = _BodyWriter(self, body.length)
        # The socket's backpressure pauses the body's producer (the client's request).
        self.transport.registerProducer(body, True)
        try:
            sending = body.startProducing(writer)
        except Exception:
            self._body_failed(Failure())
            return
        sending.addCallbacks(self._body_finished, self._body_failed)

    def _body_finished(self, _: object) -> None:
        if self._body is None:
            return  # Given up already (the answer came, or the connection went).
        try:
            assert self._writer is not None
            self._writer.finish()
        except ProtocolError:
            self._body_failed(Failure())
            return
        self._body = None
        self.transport.unregisterProducer()
        send_now(self.transport)
        self._await_answer()

    def _body_failed(self, reason: Failure) -> None:
        if self._body is None:
            return  # Given up already: stopped, or the connection went.
        self._body = None
        if self.transport.producer is not None:
            self.transport.unregisterProducer()
        # The next hop must never take a cut-off body for a whole one.
        self.abandon()
        if self._answer is not None and not self._announced:
            answer, self._answer = self._answer, None
            answer.errback(RequestTransmissionFailed([reason]))

    def _stop_body(self) -> None:
        """Stop sending the request's body: the exchange is over (answered, or failed)."""
        body, self._body = self._body, None
        if body is not None:
            self.transport.unregisterProducer()
            body.stopProducing()

    # Receiving.

    def dataReceived(self, data: bytes) -> None:
        if self.state is not _BUSY or self._complete:
            # Bytes nobody asked for: this connection can no longer be trusted.
            self.abandon()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(ProtocolError("the next hop switched protocols unasked"))
            return
        except httptools.HttpParserError as e:
            if not self._complete:
                self._broken(ProtocolError(f"the next hop sent an invalid response ({e})"))
                return
            # The answer is whole; what followed it (the rest of a HEAD answer, or bytes
            # nobody asked for) is never read: the connection is not used again.
            self._unusable = True
        response = self._response
        if response is None:
            return
        announce = not self._announced
        self._announced = True
        if self._complete:
            # The whole answer is in: the connection is ready for another request (or closing),
            # and the answer complete, before its reader hears of either and perhaps asks again
            # at once.  A small answer is then taken whole (HopResponse.complete_body).
            self._response = None
            if self._body is not None or self._unusable:
                self._stop_body()
                self.abandon()
            else:
                self._reuse_or_close()
            response._ended(_RESPONSE_DONE)
        if announce:
            answer, self._answer = self._answer, None
            assert answer is not None
            answer.callback(response)

    # httptools callbacks (called during feed_data).

    def on_message_begin(self) -> None:
        if self._complete:
            raise _AnswerComplete()

    def on_status(self, phrase: bytes) -> None:
        self._phrase = phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_ANSWER_HEADERS:
            raise ProtocolError("the answer's headers (or trailers) are too large")
        if not self._headers_done:  # Trailers are not relayed.
            add_parsed_field(self._headers, name, value)

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            # An interim answer.  100 Continue answers an Expect this client never sends (each
            # hop sends its own); the others (103 Early Hints) go to whoever asked for them.
            self._interim = True
            if code != 100 and self._informational is not None:
                self._informational(code, self._phrase, parsed_headers(self._headers)[0])
            self._headers = {}
            return
        self._headers_done = True
        self._informational = None
        self._answer_arrived()
        headers, content_length, codings = parsed_headers(self._headers)
        length: Any = iweb.UNKNOWN_LENGTH
        if content_length is not None and not codings:
            length = content_length
        if self._method == b"HEAD" or code in NO_BODY_CODES:
            length = 0
        self._response = HopResponse(self, code, self._phrase, headers, length)
        self._headers = {}
        if self._method == b"HEAD":
            self._complete = True
            raise _AnswerComplete()

    def on_body(self, data: bytes) -> None:
        if self._response is not None:
            self._response._data(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        # Asked now: once this callback returns, llhttp forgets the message's flags.
        self._keep_alive = self._parser.should_keep_alive()

    # The connection's end.

    def close(self) -> None:
        """Close this connection once what it has sent is out; it is never used again."""
        self.state = _CLOSED
        self.transport.loseConnection()

    def abandon(self) -> None:
        """Close this connection at once; it is never used again."""
        if self.state is not _CLOSED:
            self.state = _CLOSED
            self.transport.abortConnection()

    def _broken(self, error: Exception) -> None:
        log.warn("Closing a connection to the next hop: {error}", error=error)
        self._fail(Failure(error))
        self.abandon()

    def _fail(self, reason: Failure) -> None:
        """End the current exchange with C{reason}."""
        self._answer_arrived()
        self._stop_body()
        if self._answer is not None:
            answer, self._answer = self._answer, None
            answer.errback(ResponseNeverReceived([reason]))
        elif self._response is not None:
            response, self._response = self._response, None
            if self._until_eof(response) and reason.check(ConnectionDone):
                response._ended(Failure(PotentialDataLoss()))
            else:
                response._ended(Failure(ResponseFailed([reason])))

    def _until_eof(self, response: HopResponse) -> bool:
        """Whether C{response}'s body ends when the connection does (no length, not chunked)."""
        return response.length is iweb.UNKNOWN_LENGTH and not response.headers.hasHeader(
            b"transfer-encoding"
        )

    def _reuse_or_close(self) -> None:
        if self.state is _CLOSED:
            return  # Given up while the answer was being handed over.
        keep = self._keep_alive
        self._headers_done = self._complete = self._announced = self._keep_alive = False
        self._header_bytes = 0
        self._response = None
        self._writer = None
        if keep and not closing(self.transport):
            self.state = _IDLE
            self._pool._put(self)
        else:
            self.close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.state = _CLOSED
        self._fail(reason)
        self._pool._forget(self)


class _AnswerComplete(Exception):
    """
    Stops the parser at the end of an answer: after a HEAD answer's head, or before bytes that
    would start another answer.
    """


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: HopPool, key: Hashable) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> HopConnection:
        return HopConnection(self._pool, self._key)


class HopPool:
    """
    Connections to the next hop, kept idle by key for at most C{idle_timeout} seconds and at
    most C{max_idle} per key.  A connection that is closing is never used or kept.

    @ivar answer_timeout: seconds a request's answer has to bring its head once the whole
        request has been sent, or C{None} for no limit.  Past it the request fails with
        L{DeadlinePassed} and its connection is closed; the body of an answer that came in
        time may take as long as it likes.
    """

    def __init__(
        self,
        clock: Any,
        idle_timeout: float,
        max_idle: int = 64,
        answer_timeout: float | None = None,
    ) -> None:
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.answer_timeout = answer_timeout
        # Never an empty list under a key.
        self._idle: dict[Hashable, list[HopConnection]] = {}
        # The connections closeCachedConnections closed and still waits for, and its callers.
        self._closing: set[HopConnection] = set()
        self._closed_waiters: list[defer.Deferred[None]] = []

    def request(
        self,
        key: Hashable,
        endpoint: Any,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: iweb.IBodyProducer | None,
        informational: Informational | None = None,
        before_retry: Callable[[Headers], None] | None = None,
    ) -> defer.Deferred[HopResponse]:
        """
        Send a request on an idle connection for C{key}, or on a new one from C{endpoint}
        (see L{HopConnection.request}).

        A kept connection may be closed by the next hop just as a request goes out on it.  A
        request that is safe to send twice (a method in L{RETRYABLE}, no body) and meets that
        before its answer is sent once more, on a new connection, after C{before_retry} has
        renewed in C{headers} whatever must not be sent twice (a signature).  A request on a
        new connection is never sent again, unless that rides on one kept open (see
        L{HopConnection.kept}); no request is sent a third time.

        Fails with the endpoint's error when a new connection cannot be made.
        """

        def send(connection: HopConnection) -> defer.Deferred[HopResponse]:
            return connection.request(method, target, headers, body, informational)

        def send_on(connection: HopConnection, kept: bool = False) -> defer.Deferred[HopResponse]:
            sent = send(connection)
            if (kept or connection.kept) and body is None and method in RETRYABLE:
                sent.addErrback(self._resend, key, endpoint, send, headers, before_retry)
            return sent

        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if not idle:
                # No key is ever left with an empty list (see closeCachedConnections).
                del self._idle[key]
            if connection.usable():
                return send_on(connection, kept=True)
            connection.abandon()
        return self._connect(key, endpoint, send_on)

    def _resend(
        self,
        failure: Failure,
        key: Hashable,
        endpoint: Any,
        send: Callable[[HopConnection], defer.Deferred[HopResponse]],
        headers: Headers,
        before_retry: Callable[[Headers], None] | None,
    ) -> defer.Deferred[HopResponse] | Failure:
        """
        Send a bodiless request once more, on a new connection, if its kept connection was
        lost before the answer (not when the next hop broke HTTP, nor on a cancel).
        """
        failure.trap(RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)
        reasons = getattr(failure.value, "reasons", [])
        if not all(reason.check(ConnectionDone, ConnectionLost) for reason in reasons):
            return failure
        if before_retry is not None:
            before_retry(headers)
        return self._connect(key, endpoint, send)

    def _connect(
        self,
        key: Hashable,
        endpoint: Any,
        send: Callable[[HopConnection], defer.Deferred[HopResponse]],
    ) -> defer.Deferred[HopResponse]:
        """Make a new connection from C{endpoint} and C{send} the request on it."""
        connecting: defer.Deferred[HopConnection] = endpoint.connect(_ConnectionFactory(self, key))
        return connecting.addCallback(send)

    def idle_connections(self) -> list[HopConnection]:
        """The connections kept for reuse now."""
        return [c for cs in self._idle.values() for c in cs]

    def _put(self, connection: HopConnection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle:
            connection.close()
            return
        idle.append(connection)
        # One timer per connection, pushed back (cheaply) each time it goes idle again.
        call = connection.idle_call
        if call is not None and call.active():
            call.reset(self.idle_timeout)
        else:
            connection.idle_call = self._clock.callLater(
                self.idle_timeout, self._expire, connection
            )

    def _expire(self, connection: HopConnection) -> None:
        connection.idle_call = None
        if connection.state is _IDLE:
            self._unpool(connection)
            connection.close()

    def _forget(self, connection: HopConnection) -> None:
        """A connection is gone: it is no longer kept, nor waited for."""
        self._unpool(connection)
        if self._closing:
            self._closing.discard(connection)
            if not self._closing:
                waiters, self._closed_waiters = self._closed_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

    def _unpool(self, connection: HopConnection) -> None:
        """Keep C{connection} no longer (if it is kept), and drop its idle timer."""
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]
        call, connection.idle_call = connection.idle_call, None
        if call is not None and call.active():
            call.cancel()

    def closeCachedConnections(self) -> defer.Deferred[None]:
        """
        Close every idle connection at once (aborted, as Twisted's own pool does: nothing is in
        flight on an idle connection, and a next hop that has stopped answering must not hold
        up a shutdown waiting for TLS to close politely); fires once those are gone.
        Connections busy meanwhile are not waited for.
        """
        connections = self.idle_connections()
        if not connections:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(done)
        self._closing.update(connections)
        for connection in connections:
            self._unpool(connection)
            connection.abandon()
        return done
