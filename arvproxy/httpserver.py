"""
The HTTP/1.1 server side of both hops: a connection (L{ProxyChannel}) parses requests with
httptools (llhttp, Node's parser) and hands each to its site's handler as a L{StreamingRequest}
as soon as its headers are in, so that its body can stream to the next hop as it arrives.

Twisted's own server reads a whole request body before any resource runs, and builds a request
line by line through several layers; in the chain, replacing it with this took 70–90 µs (about
a fifth) off each process's CPU per small request (make bench, interleaved runs).  Handlers see
the part of L{twisted.web.http.Request} they use: C{method}, C{uri}, C{path}, C{clientproto},
C{requestHeaders}, C{responseHeaders}, C{setResponseCode}, C{setHeader}, C{getHeader},
C{write}, C{finish}, C{registerProducer}, C{notifyFinish}.

What a connection promises:

  - Requests are served one at a time, in order.  While one is served, L{EAGER_READ} bytes
    more are read and held (to notice a client that leaves), then no more; pipelined requests
    read together wait (at most L{MAX_PIPELINED}).
  - Only requests llhttp's strict rules accept are served: one length, never with chunking,
    valid chunks, CRLF line ends, token names, no bare CR or LF in values, a method llhttp
    knows (the IANA registry), HTTP/1.0 or 1.1; and, checked here, at most one C{Host} and no
    transfer coding but chunked (and that only in HTTP/1.1).  Anything else gets 400 (505 for
    another version, 501 for another coding) and the connection closes.  An upgrade request
    (C{Connection: upgrade}, C{CONNECT}) may not have a body: llhttp would take its body for
    the upgraded protocol's bytes.
  - A request's target is served, and passed on, in origin-form (C{/path?query}).  An
    absolute-form target (C{http://host/path}) is turned into one, and its host replaces
    C{Host}, as RFC 9112 section 3.2.2 says; any other form (C{*}, an authority, C{CONNECT}),
    user information or a fragment gets 400 (L{policy.origin_form}).
  - A request's line and headers must arrive within C{Limits.request_headers}, counted from
    the connection's accept and, on a kept connection, from the end of the answer before (so
    idle keep-alive connections last that long too), and fit in C{Limits.max_header_bytes}
    (431).  When the deadline passes, a client that had begun a request gets 408; one that had
    sent nothing (or only the empty lines RFC 9112 lets a request follow) is closed without a
    word, as Nginx closes it: a 408 nobody asked for could be read as the answer to a request
    the client is just sending.  A connection that waits for its client in a request's body
    for C{Limits.client_idle} is closed.  A client that does not let go of a connection closed
    for either reason, or refused (a TLS peer that never answers C{close_notify}), is cut off
    after one more header deadline.
  - A response answered before its request's body has arrived closes the connection after it,
    so that the rest of the body can never be read as a request.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import httptools
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, OK, RESPONSES
from twisted.web.http_headers import Headers

from arvproxy import pages, policy
from arvproxy.config import Limits
from arvproxy.errors import ProxyError
from arvproxy.streaming import (
    RequestBody,
    add_field_lines,
    add_parsed_field,
    parsed_headers,
    send_now,
    tune_transport,
)

log = Logger()

# A handler serves one request; it returns when the response has been written (or has failed).
Handler = Callable[["StreamingRequest"], Coroutine[Any, Any, None]]

# Requests parsed ahead of the one being served; a client that pipelines more is served those
# and then disconnected (it retries the rest, RFC 9112 section 9.3.2).
MAX_PIPELINED = 16

# What a connection reads ahead while a request is served, before it stops reading (Twisted's
# server reads 16 KiB ahead too).
EAGER_READ = 16 * 1024

# The soonest a connection checks its deadlines again.
_MIN_CHECK_DELAY = 0.01

# Why a connection stops reading (besides a request body's backpressure).
_HOLDING = "a request is being served"


def _canned(status: bytes, message: bytes) -> bytes:
    """A complete response that closes the connection: for a request no handler will see."""
    return (
        b"HTTP/1.1 %s\r\nConnection: close\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n%s\r\n" % (status, len(message) + 2, message)
    )


_REQUEST_TIMEOUT = _canned(
    b"408 Request Timeout", b"The request's headers did not arrive in time; try again."
)
_HEADERS_TOO_LARGE = _canned(
    b"431 Request Header Fields Too Large",
    b"The request's headers are too large (large cookies?); try again.",
)
_NOT_CHUNKED = _canned(
    b"501 Not Implemented", b"A request body's only transfer coding may be chunked."
)
_BAD_VERSION = _canned(b"505 HTTP Version Not Supported", b"Only HTTP/1.0 and 1.1 are served.")


def _bad_request(reason: str) -> bytes:
    return _canned(b"400 Bad Request", b"Bad request: " + reason.encode("ascii", "replace"))


class _Refusal(Exception):
    """Raised in a parser callback: answer with C{response} and close."""

    def __init__(self, response: bytes) -> None:
        self.response = response


class StreamingRequest:
    """
    A request handed to its site's handler as soon as its headers are in.

    Its body streams through L{body}.  The handler writes the response with C{setResponseCode},
    C{setHeader}, C{write} and C{finish}, or raises a L{ProxyError}.  A response without a
    C{Content-Length} is sent chunked (close-delimited to an HTTP/1.0 client); C{HEAD}, 204 and
    304 responses never carry a body.

    @ivar gone: whether the client has disconnected.
    @ivar persistent: whether the connection serves another request after this one.
    """

    def __init__(
        self,
        channel: ProxyChannel,
        method: bytes,
        uri: bytes,
        version: bytes,
        headers: Headers,
        length: int | None,
        persistent: bool,
    ) -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self.clientproto = version
        self.requestHeaders = headers
        self.responseHeaders = Headers()
        self.body = RequestBody(self, length)
        self.persistent = persistent
        self.code = OK
        self.code_message = b"OK"
        self.sentLength = 0
        self.startedWriting = False
        self.finished = False
        self.gone = False
        self._chunked = False
        self._bodiless = False
        self._notifications: list[defer.Deferred[None]] = []
        expect = headers.getRawHeaders(b"expect")
        self._expects_continue = bool(
            expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1"
        )

    # Reading the request.

    def getHeader(self, name: bytes) -> bytes | None:
        """The last value of the request header C{name}, or C{None}."""
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self) -> Any:
        return self.channel.transport.getPeer()

    def isSecure(self) -> bool:
        return self.channel.secure

    # Writing the response.

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message if message is not None else RESPONSES.get(code, b"")

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write() after finish()")
        if self.gone:
            return
        if not self.startedWriting:
            self.channel.transport.write(self._head(data))
        elif data and not self._bodiless:
            self.sentLength += len(data)
            if self._chunked:
                self.channel.transport.writeSequence((b"%x\r\n" % (len(data),), data, b"\r\n"))
            else:
                self.channel.transport.write(data)

    def _head(self, data: bytes) -> bytes:
        """The status line and headers, framed, with C{data} (the start of the body) after."""
        self.startedWriting = True
        headers = self.responseHeaders
        if self.method == b"HEAD" or self.code in NO_BODY_CODES or self.code < 200:
            self._bodiless = True
        elif not headers.hasHeader(b"content-length"):
            if self.clientproto == b"HTTP/1.1":
                self._chunked = True
            else:
                self.persistent = False  # The body ends when the connection does.
        if not self.persistent:
            headers.setRawHeaders(b"connection", [b"close"])
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.code, self.code_message)]
        add_field_lines(lines, headers)
        if self._chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(b"\r\n")
        if data and not self._bodiless:
            self.sentLength += len(data)
            lines += (b"%x\r\n" % (len(data),), data, b"\r\n") if self._chunked else (data,)
        return b"".join(lines)

    def write_informational(self, code: int, phrase: bytes, headers: Headers) -> None:
        """
        Send an interim (1xx) response ahead of the response: only to an HTTP/1.1 client, and
        only before the response has begun (RFC 9110 section 15.2).
        """
        if self.gone or self.startedWriting or self.clientproto != b"HTTP/1.1":
            return
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, phrase)]
        add_field_lines(lines, headers)
        lines.append(b"\r\n")
        self.channel.transport.write(b"".join(lines))

    def finish(self) -> None:
        """End the response and send what is left of it at once (L{send_now})."""
        if self.finished:
            raise RuntimeError("finish() called twice")
        if self.gone:
            return
        transport = self.channel.transport
        ending = b"0\r\n\r\n" if self._chunked else b""
        if not self.startedWriting:
            ending = self._head(b"") + ending
        if ending:
            transport.write(ending)
        self.finished = True
        send_now(transport)
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.callback(None)
        self.channel.request_done(self)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Let the client's socket pause C{producer} (the response's source) when it is full."""
        if not self.gone:
            self.channel.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self.gone:
            self.channel.transport.unregisterProducer()

    def notifyFinish(self) -> defer.Deferred[None]:
        """A Deferred that fires when the response is finished, or fails if the client goes."""
        if self.finished:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._notifications.append(d)
        return d

    # What the streaming machinery needs.

    def finishEarly(self) -> None:
        """
        Prepare to answer before the whole body has arrived: the connection closes after the
        response, so that the rest of the body can never be read as a new request.
        """
        if not self.body.complete:
            self.persistent = False
            self.setHeader(b"connection", b"close")

    def sendContinue(self) -> None:
        """
        Tell a client that waits with C{Expect: 100-continue} to send its body: done only when the
        next hop asks for the body, so a refused request is refused before its body is read.
        """
        if self._expects_continue and not self.body.complete and not self.startedWriting:
            self._expects_continue = False
            if not self.gone:
                self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def client_transport(self) -> Any:
        """The client's transport, or C{None} once the client has gone or the response is done."""
        return None if self.gone or self.finished else self.channel.transport

    def pause_client(self, reason: object) -> None:
        """Stop reading from the client for C{reason} (until L{resume_client} with it)."""
        if not self.gone and not self.finished:
            self.channel.pause_reading(reason)

    def resume_client(self, reason: object) -> None:
        if not self.gone:
            self.channel.resume_reading(reason)

    def connection_lost(self, reason: Failure) -> None:
        self.gone = True
        self.body.clientGone(reason)
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.errback(reason)

    def failed(self, failure: Failure) -> None:
        """The handler failed: answer with an error page if nothing has been sent yet."""
        if self.gone or self.finished:
            if not failure.check(ProxyError, defer.CancelledError):
                log.failure("Error after the response started", failure)
            return
        if self.startedWriting:
            log.failure("Error while relaying a response", failure)
            self.channel.transport.abortConnection()
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


class ProxyChannel(Protocol):
    """One client connection: see the module's docstring for what it promises."""

    transport: Any

    def __init__(self, site: ProxySite) -> None:
        self.site = site
        limits = site.limits
        self._header_deadline = limits.request_headers
        self._idle_limit = limits.client_idle
        self._max_header_bytes = limits.max_header_bytes
        self.callLater = site.reactor.callLater
        self._now = site.reactor.seconds
        self.secure = False
        # None after an upgrade request, until it is answered without a tunnel.
        self._parser: Any = httptools.HttpRequestParser(self)
        # Requests in order: the first is being served, the others (parsed from the same read)
        # wait for it.  Lists, here and below: short, and small when a tunnel keeps this object.
        self._queue: list[StreamingRequest] = []
        # The request whose body is being parsed (the last one queued).
        self._parsing: StreamingRequest | None = None
        # The head being parsed: its target, headers, size (as parsed, and as read in reads
        # that ended inside it) and when it began (None: no head has begun).
        self._url: list[bytes] = []
        self._headers: dict[bytes, list[bytes]] = {}
        self._head_bytes = 0
        self._head_read = 0
        self._head_began: float | None = None
        self._head_began_in_chunk = False
        # When the wait for the next request's head began (accept, or the end of the answer
        # before); None while no head is due (a request is read past its head, or served).
        self._awaiting: float | None = None
        # What arrives while a request is served after its message ended: parsed once it is
        # answered (what follows an upgrade request may be a tunnel's instead).
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._feeding = False
        self._tunnel: Callable[[bytes], None] | None = None
        self._closing = False
        self._refusal: bytes | None = None
        self._pauses: list[object] = []
        self._last_heard = 0.0
        self._timer: Any = None
        # What the site's handler keeps about this connection from one request to the next.
        self.kept: Any = None

    def connectionMade(self) -> None:
        tune_transport(self.transport)
        self.secure = ISSLTransport.providedBy(self.transport)
        self._last_heard = self._awaiting = self._now()
        self._arm(self._last_heard + min(self._header_deadline, self._idle_limit))

    # Reading.

    def dataReceived(self, data: bytes) -> None:
        self._last_heard = self._now()
        if self._closing:
            return
        if self._serving():
            # As Twisted's server does, keep reading a little (to notice a client that leaves),
            # then push back.
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > EAGER_READ:
                self.pause_reading(_HOLDING)
            return
        self._feed(data)

    def _serving(self) -> bool:
        """Whether a request is being served whose message has been read whole."""
        return bool(self._queue) and self._parsing is None

    def _feed(self, data: bytes) -> None:
        self._feeding = True
        try:
            while data:
                size = len(data)
                try:
                    self._parser.feed_data(data)
                    data = b""
                except httptools.HttpParserUpgrade as e:
                    # llhttp stops after an upgrade request.
                    data = data[e.args[0] :]
                    if self._tunnel is not None:
                        if data:
                            self._tunnel(data)  # Taken over while llhttp ran (a carrier).
                        return
                    if self._queue:
                        # What follows waits for the answer: a tunnel's bytes, or requests.
                        self._parser = None
                        self._held.insert(0, data)
                        self._held_bytes += len(data)
                        return
                    # Answered already, and not with a tunnel: requests follow.
                    self._parser = httptools.HttpRequestParser(self)
                    continue
                except httptools.HttpParserError as e:
                    self._parse_error(e)
                    return
                if self._head_began is not None:
                    self._count_unfinished_head(size)
        finally:
            self._feeding = False

    def _parse_error(self, error: httptools.HttpParserError) -> None:
        cause = error.__context__
        if isinstance(cause, _Refusal):
            self._refuse(cause.response)
        elif isinstance(cause, _Overflow):
            log.info("Closing a connection that pipelined too many requests")
            self._refuse(None)
        elif cause is not None:
            log.failure("Closing a connection after an error", Failure(cause))
            self._close()
        else:
            self._refuse(_bad_request(f"{error}."))

    def _count_unfinished_head(self, size: int) -> None:
        """
        Count a read that ended inside a head: llhttp holds the unfinished header line, which
        the callbacks have not seen yet.  The read the head began in is not counted (part of it
        may be the request before).
        """
        if self._head_began_in_chunk:
            self._head_began_in_chunk = False
        else:
            self._head_read += size
            if self._head_read > self._max_header_bytes:
                self._refuse(_HEADERS_TOO_LARGE)

    def _take_held(self) -> bytes:
        held = b"".join(self._held)
        self._held = []
        self._held_bytes = 0
        self.resume_reading(_HOLDING)
        return held

    # httptools callbacks (called during feed_data).

    def on_message_begin(self) -> None:
        if len(self._queue) >= MAX_PIPELINED:
            raise _Overflow()
        self._head_began = self._last_heard
        self._head_began_in_chunk = True
        self._head_bytes = self._head_read = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if self._parsing is None:  # Trailers are not passed on.
            add_parsed_field(self._headers, name, value)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._max_header_bytes:
            raise _Refusal(_HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Refusal(_BAD_VERSION)
        headers, length, codings = parsed_headers(self._headers)
        if length is None:
            length = 0  # A request without framing has no body.
        if len(headers.getRawHeaders(b"host", ())) > 1:
            # Which one the proxy and the service would each believe is anybody's guess.
            raise _Refusal(_bad_request("a request may have only one Host header."))
        if codings:
            # llhttp lets other codings before chunked through (and refuses some only after
            # this callback); passed on, the next hop would never learn of them.
            if version == "1.0":
                raise _Refusal(_bad_request("an HTTP/1.0 request cannot be chunked."))
            if codings != [b"chunked"]:
                raise _Refusal(_NOT_CHUNKED)
            length = None
        if parser.should_upgrade() and length != 0:
            # llhttp would take the body for the upgraded protocol's bytes.
            raise _Refusal(_bad_request("an upgrade request cannot have a body."))
        method = parser.get_method()
        try:
            target, authority = policy.origin_form(method, b"".join(self._url))
        except ProxyError as e:
            raise _Refusal(_bad_request(e.message)) from None
        if authority is not None:
            # An absolute-form target names the host; Host is ignored (RFC 9112 section 3.2.2).
            headers.setRawHeaders(b"host", [authority])
        request = StreamingRequest(
            self,
            method,
            target,
            b"HTTP/1.1" if version == "1.1" else b"HTTP/1.0",
            headers,
            length,
            parser.should_keep_alive(),
        )
        self._url = []
        self._headers = {}
        self._head_began = self._awaiting = None
        self._parsing = request
        self._queue.append(request)
        if length != 0 and len(self._queue) == 1:
            # Start now, so the body can stream to the next hop as it arrives.
            self._serve(request)

    def on_body(self, data: bytes) -> None:
        assert self._parsing is not None
        self._parsing.body.dataReceived(data)

    def on_message_complete(self) -> None:
        request, self._parsing = self._parsing, None
        assert request is not None
        request.body.bodyComplete()
        if self._queue and request is self._queue[0] and request.body.empty:
            # Without a body, start once llhttp is done with the request.
            self._serve(request)

    # Serving.

    def _serve(self, request: StreamingRequest) -> None:
        handler = self.site.handler
        defer.Deferred.fromCoroutine(handler(request)).addErrback(request.failed)

    def request_done(self, request: StreamingRequest) -> None:
        """C{request}'s response is finished: serve the next one, or close."""
        self._queue.pop(0)
        if self.site.access_log:
            self.site.log(request)
        if not request.persistent or not request.body.complete:
            self._close()
        elif self._queue:
            self._serve(self._queue[0])  # Read whole already, with the one before.
        elif self._closing:
            self._refuse(self._refusal)
        else:
            # The next request's head is due within the deadline from now.
            self._awaiting = self._now()
            if not self._feeding:
                # Answered while llhttp is not running: go on with what arrived meanwhile.
                if self._parser is None:
                    # An upgrade answered without a tunnel: the connection stays HTTP.
                    self._parser = httptools.HttpRequestParser(self)
                if self._held:
                    self._feed(self._take_held())

    def take_over(
        self, data_received: Callable[[bytes], None], connection_lost: Callable[[Failure], None]
    ) -> bytes:
        """
        Give this connection to a tunnel: from now on its bytes go to C{data_received}, and its
        end to C{connection_lost}.  The request being served never finishes.

        @return: the bytes that had already arrived after the request.
        """
        self._cancel_timer()
        self._tunnel = data_received
        held = b"".join(self._held)
        self._held = []
        # Only bytes flow from here on: drop what parsing needed (a notebook may hold thousands
        # of tunnels for hours).
        self._parser = None
        self._queue = []
        self._pauses = []
        self.dataReceived = data_received  # type: ignore[method-assign,assignment]
        self.connectionLost = connection_lost  # type: ignore[method-assign,assignment]
        return held

    # Flow control.

    def pause_reading(self, reason: object) -> None:
        if not self._pauses:
            self.transport.pauseProducing()
        if reason not in self._pauses:
            self._pauses.append(reason)

    def resume_reading(self, reason: object) -> None:
        if reason in self._pauses:
            self._pauses.remove(reason)
            if not self._pauses and not self._closing:
                self.transport.resumeProducing()

    # Ending.

    def _refuse(self, response: bytes | None) -> None:
        """
        Stop reading requests: answer with C{response} (if any) once every request before it
        has been answered, and close.
        """
        broken = self._parsing
        if broken is not None:
            # A request's body broke off: it fails, and nothing more can be said after it.
            broken.connection_lost(Failure(ConnectionAborted()))
            if broken is self._queue[0] and not broken.startedWriting:
                self._queue.clear()
            else:
                self._close()
                return
        self._closing = True
        self._held = []
        if self._queue:
            self._refusal = response
            return
        if response is not None:
            self.transport.write(response)
        self._close()
        self._abort_later()

    def _close(self) -> None:
        self._closing = True
        self._held = []
        self._cancel_timer()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self._closing = True
        self._held = []
        queue, self._queue = self._queue, []
        for request in queue:
            request.connection_lost(reason)

    # Deadlines: one timer per connection, re-armed only when it fires (cheap per request).

    def _arm(self, when: float) -> None:
        # Never at once: a check that finds nothing due must not run again in the same turn.
        delay = max(_MIN_CHECK_DELAY, when - self._now())
        if self._timer is None:
            self._timer = self.callLater(delay, self._check_deadlines)
        elif self._timer.getTime() > when:
            self._timer.reset(delay)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _check_deadlines(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self._now()
        # A head due after now must be complete by now + the deadline at the earliest.
        next_check = now + self._header_deadline
        if self._awaiting is not None:  # Then no request is queued.
            if now - self._awaiting >= self._header_deadline:
                self._time_out()
                return
            next_check = self._awaiting + self._header_deadline
        if self._waiting_for_client():
            if now - self._last_heard >= self._idle_limit:
                log.info("Closing a client idle for {seconds} s", seconds=self._idle_limit)
                self._close()
                self._abort_later()
                return
            next_check = min(next_check, self._last_heard + self._idle_limit)
        self._arm(next_check)

    def _time_out(self) -> None:
        """
        No request's head arrived whole in time: 408 if one had begun, else close without a
        word (see the module's docstring).
        """
        if self._head_began is not None:
            self._refuse(_REQUEST_TIMEOUT)
        else:
            self._close()
            self._abort_later()

    def _abort_later(self) -> None:
        """
        Cut off a client that has not let go of its connection within one more header deadline
        after the server closed it: a TLS peer that never answers C{close_notify} would keep it
        open for ever.
        """
        self._timer = self.callLater(self._header_deadline, self.transport.abortConnection)

    def _waiting_for_client(self) -> bool:
        """Whether the connection waits for its client: between requests, or in a body."""
        if not self._queue:
            return True
        return self._parsing is not None and not self._pauses


class _Overflow(Exception):
    """Raised in a parser callback: too many pipelined requests."""


class ConnectionAborted(Exception):
    """The server closes the connection: the request broke HTTP."""


def safe_keep_alive(limits: Limits) -> float:
    """
    How long a client of a server with C{limits} may keep an idle connection and still send a
    request on it: half of what the server waits for the next request (see the module's
    docstring), so that a request never races the server's close.  The front door keeps its
    idle connections and streams to gateways no longer than this; a request sent on one just
    as the gateway closes it could not be retried if it had a body.
    """
    return min(limits.request_headers, limits.client_idle) / 2


class ProxySite(Factory):
    """
    A factory of L{ProxyChannel}s whose every request goes to C{handler} (see
    L{StreamingRequest}), over HTTP/1.1 only, within C{limits}.

    The access log never shows a query string (it could hold a token).
    """

    def __init__(self, handler: Handler, reactor: Any, limits: Limits | None = None) -> None:
        self.handler = handler
        self.reactor = reactor
        self.limits = limits or Limits()
        self.access_log = False

    def buildProtocol(self, addr: Any) -> ProxyChannel:
        return ProxyChannel(self)

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]

    def log(self, request: StreamingRequest) -> None:
        log.info(
            "{client} {method} {path} {code} {length}",
            client=request.getClientAddress(),
            method=request.method,
            path=request.path,
            code=request.code,
            length=request.sentLength,
        )
