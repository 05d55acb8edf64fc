"""
Tests for L{arvproxy.httpserver}: what a client connection accepts and refuses, its deadlines,
and how it frames responses.  In memory, with a fake clock.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy.config import Limits
from arvproxy.httpserver import ProxySite, StreamingRequest
from arvproxy.testing import BodyCollector, MemoryClient, request_bytes

HEAD = b"POST / HTTP/1.1\r\nHost: x\r\n"


class Handler:
    """Records each request, and answers it at once unless told to C{hold} it."""

    def __init__(self, hold: bool = False) -> None:
        self.requests: list[StreamingRequest] = []
        self.hold = hold
        self.waiting: list[defer.Deferred[None]] = []

    async def __call__(self, request: StreamingRequest) -> None:
        self.requests.append(request)
        if self.hold:
            self.waiting.append(defer.Deferred())
            await self.waiting[-1]
        if not request.body.empty:
            collector = BodyCollector()
            await request.body.startProducing(collector)
        request.setHeader(b"content-length", b"2")
        request.write(b"ok")
        request.finish()


def connect(handler: Any, limits: Limits | None = None) -> tuple[MemoryClient, MemoryReactorClock]:
    clock = MemoryReactorClock()
    return MemoryClient(ProxySite(handler, clock, limits)), clock


class RefusalTests(SynchronousTestCase):
    """Requests whose framing is ambiguous or broken never reach the handler."""

    # (what is wrong, raw request, status)
    CASES = [
        (
            "length and chunked",
            HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        ("two lengths", HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        ("two equal lengths", HEAD + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\na", 400),
        ("a list of lengths", HEAD + b"Content-Length: 1, 1\r\n\r\na", 400),
        ("a signed length", HEAD + b"Content-Length: +1\r\n\r\na", 400),
        ("not chunked last", HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
        ("unknown coding", HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
        (
            "a coding before chunked",
            HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (
            "codings in two headers",
            HEAD + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        ("chunked twice", HEAD + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
        (
            "chunked in HTTP/1.0",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            400,
        ),
        ("bare LF", b"GET / HTTP/1.1\nHost: x\n\n", 400),
        ("folded header", HEAD + b"X-A: 1\r\n 2\r\n\r\n", 400),
        ("space before colon", HEAD + b"Content-Length : 0\r\n\r\n", 400),
        ("NUL in a value", HEAD + b"X-A: a\x00b\r\n\r\n", 400),
        ("CR in a value", HEAD + b"X-A: a\rb\r\n\r\n", 400),
        ("not a token name", HEAD + b"X(A): 1\r\n\r\n", 400),
        ("space in the target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("DEL in the target", b"GET /a\x7f HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("unknown method", b"FROB / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("two Hosts", HEAD + b"Host: y\r\nContent-Length: 0\r\n\r\n", 400),
        ("HTTP/2 request line", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        ("HTTP/0.9 line", b"GET /\r\n\r\n", 505),
        (
            "upgrade with a body",
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 5\r\n\r\nhello",
            400,
        ),
        ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    ]

    def test_refused(self) -> None:
        for name, raw, status in self.CASES:
            handler = Handler()
            client, _ = connect(handler)
            client.send(raw + request_bytes(b"GET", b"/smuggled"))
            response = client.response()
            self.assertEqual(response.status, status, name)
            self.assertEqual(response.header(b"connection"), b"close", name)
            self.assertTrue(client.closed, name)
            self.assertEqual(handler.requests, [], name)

    def test_bad_chunk_fails_the_body(self) -> None:
        """A broken chunk after the head has been served fails the body; nothing else runs."""
        handler = Handler(hold=True)
        client, _ = connect(handler)
        client.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        [request] = handler.requests
        self.assertTrue(request.gone)
        self.assertEqual(client.response().status, 400)
        self.assertTrue(client.closed)
        done = request.body.startProducing(BodyCollector())
        self.failureResultOf(done)

    def test_headers_too_large(self) -> None:
        """Too many header bytes get 431, whether in many headers or in one endless line."""
        limits = Limits(max_header_bytes=4096)
        many = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 60) for i in range(80))
        for name, pieces in [
            ("many headers", [HEAD + many + b"\r\n"]),
            ("one line, sent bit by bit", [HEAD + b"X-Long: "] + [b"v" * 1000] * 10),
            ("a long target", [b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n"]),
        ]:
            handler = Handler()
            client, _ = connect(handler, limits)
            for piece in pieces:
                client.send(piece)
            self.assertEqual(client.response().status, 431, name)
            self.assertTrue(client.closed, name)
            self.assertEqual(handler.requests, [], name)

    def test_headers_at_the_limit(self) -> None:
        """Headers just under the limit, sent bit by bit, are served."""
        limits = Limits(max_header_bytes=4096)
        handler = Handler()
        client, _ = connect(handler, limits)
        raw = request_bytes(b"GET", b"/", [(b"X-Big", b"v" * 3900)])
        for i in range(0, len(raw), 100):
            client.send(raw[i : i + 100])
        self.assertEqual(client.response().status, 200)

    def test_trailers_are_not_headers(self) -> None:
        """Trailers are dropped: neither the request's headers nor the next request's."""
        handler = Handler()
        client, _ = connect(handler)
        client.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-Late: 1\r\n\r\n")
        client.send(request_bytes())
        self.assertEqual([r.status for r in client.responses([b"POST"])], [200, 200])
        self.assertEqual([r.getHeader(b"x-late") for r in handler.requests], [None, None])


class DeadlineTests(SynchronousTestCase):
    limits = Limits(request_headers=10.0, client_idle=100.0)

    def test_slow_headers(self) -> None:
        """Headers that take longer than the deadline get 408."""
        handler = Handler()
        client, clock = connect(handler, self.limits)
        client.send(b"GET / HTTP/1.1\r\n")
        clock.advance(5)
        client.send(b"Host: x\r\n")
        self.assertFalse(client.closed)
        clock.advance(5)
        self.assertEqual(client.response().status, 408)
        self.assertTrue(client.closed)

    def test_idle_between_requests(self) -> None:
        """A kept connection waits for the next request for the header deadline, no longer."""
        handler = Handler()
        client, clock = connect(handler, self.limits)
        client.send(request_bytes())
        clock.advance(9.9)
        self.assertFalse(client.closed)
        client.send(request_bytes())
        clock.advance(9.9)
        self.assertFalse(client.closed)
        clock.advance(0.2)
        self.assertTrue(client.closed)
        self.assertEqual(len(client.responses()), 2)

    def test_no_limit_while_answering(self) -> None:
        """A response that takes hours (a stream) is not cut; a request queued behind it waits."""
        handler = Handler(hold=True)
        client, clock = connect(handler, self.limits)
        # The next request's head begins in the same read: parsed, then held up.
        client.send(request_bytes(b"GET", b"/events") + request_bytes(b"GET", b"/next")[:20])
        clock.advance(3600)
        client.send(request_bytes(b"GET", b"/next")[20:])
        clock.advance(3600)
        self.assertFalse(client.closed)
        handler.waiting[0].callback(None)
        handler.waiting[1].callback(None)
        self.assertEqual([r.path for r in handler.requests], [b"/events", b"/next"])
        self.assertEqual([r.status for r in client.responses()], [200, 200])

    def test_stalled_body(self) -> None:
        """A client that stops sending a body is disconnected after the idle limit."""
        handler = Handler()
        client, clock = connect(handler, self.limits)
        client.send(HEAD + b"Content-Length: 10\r\n\r\nabc")
        clock.advance(60)
        client.send(b"def")
        clock.advance(60)
        self.assertFalse(client.closed)
        clock.advance(60)
        self.assertTrue(client.closed)


class FramingTests(SynchronousTestCase):
    def answer_with(self, write: Any, raw: bytes) -> MemoryClient:
        async def handler(request: StreamingRequest) -> None:
            write(request)
            request.finish()

        client, _ = connect(handler)
        client.send(raw)
        return client

    def test_http10_without_length_ends_at_close(self) -> None:
        client = self.answer_with(lambda r: r.write(b"abc"), b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Connection: close\r\n", client.value())
        self.assertTrue(client.value().endswith(b"\r\n\r\nabc"))
        self.assertTrue(client.closed)

    def test_http10_keep_alive_with_length(self) -> None:
        def write(request: StreamingRequest) -> None:
            request.setHeader(b"content-length", b"3")
            request.write(b"abc")

        client = self.answer_with(write, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertTrue(client.value().endswith(b"\r\n\r\nabc"))
        self.assertFalse(client.closed)

    def test_chunked_when_length_unknown(self) -> None:
        def write(request: StreamingRequest) -> None:
            request.write(b"abc")
            request.write(b"")
            request.write(b"de")

        client = self.answer_with(write, request_bytes())
        self.assertTrue(client.value().endswith(b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"))
        self.assertEqual(client.response().body, b"abcde")
        self.assertFalse(client.closed)

    def test_no_body_for_head_204_304(self) -> None:
        for code, method in [(200, b"HEAD"), (204, b"GET"), (304, b"GET")]:

            def write(request: StreamingRequest, code: int = code) -> None:
                request.setResponseCode(code)
                request.write(b"never")

            client = self.answer_with(write, request_bytes(method))
            self.assertNotIn(b"never", client.value(), code)
            self.assertNotIn(b"Transfer-Encoding", client.value(), code)
            self.assertTrue(client.responses([method])[0].complete, code)
            self.assertFalse(client.closed, code)

    def test_informational_before_the_response(self) -> None:
        """An interim response goes out ahead of the response, to an HTTP/1.1 client only."""

        def write(request: StreamingRequest) -> None:
            hints = Headers({b"link": [b"</a>; rel=preload"]})
            request.write_informational(103, b"Early Hints", hints)
            request.setHeader(b"content-length", b"2")
            request.write(b"ok")
            request.write_informational(103, b"Early Hints", hints)  # too late: dropped

        client = self.answer_with(write, request_bytes())
        self.assertTrue(client.value().startswith(b"HTTP/1.1 103 Early Hints\r\n"))
        self.assertEqual(client.value().count(b"103"), 1)
        response = client.response()
        self.assertEqual((response.informational, response.body), ([103], b"ok"))
        old = self.answer_with(write, b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(old.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertNotIn(b"103", old.value())

    def test_client_asks_to_close(self) -> None:
        client = self.answer_with(
            lambda r: r.setHeader(b"content-length", b"0"),
            request_bytes(b"GET", b"/", [(b"Connection", b"close")]) + request_bytes(),
        )
        self.assertEqual(len(client.responses()), 1)
        self.assertIn(b"Connection: close\r\n", client.value())
        self.assertTrue(client.closed)


class UpgradeTests(SynchronousTestCase):
    UPGRADE = request_bytes(
        b"GET", b"/ws", [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    )

    def test_refused_upgrade_stays_http(self) -> None:
        """An upgrade answered without a tunnel: what the client sent next is served as HTTP."""
        handler = Handler(hold=True)
        client, _ = connect(handler)
        client.send(self.UPGRADE + request_bytes(b"GET", b"/a"))
        client.send(request_bytes(b"GET", b"/b"))
        handler.waiting[0].callback(None)
        handler.waiting[1].callback(None)
        handler.waiting[2].callback(None)
        self.assertEqual([r.path for r in handler.requests], [b"/ws", b"/a", b"/b"])
        self.assertEqual(len(client.responses()), 3)

    def test_take_over_gets_what_followed(self) -> None:
        """The tunnel gets the bytes that came after the upgrade request, in order."""
        tunnel: list[bytes] = []

        async def handler(request: StreamingRequest) -> None:
            held = request.channel.take_over(tunnel.append, lambda reason: None)
            tunnel.append(held)

        client, _ = connect(handler)
        client.send(self.UPGRADE + b"first")
        client.send(b"second")
        self.assertEqual(b"".join(tunnel), b"firstsecond")


class ReferenceCycleTests(SynchronousTestCase):
    """A served request leaves no reference cycle: it goes when it ends, not when the GC runs."""

    def test_requests_go_when_answered(self) -> None:
        """With the collector off, each answered request (with or without a body) is freed."""
        gc.disable()
        self.addCleanup(gc.enable)
        served: list[weakref.ref[StreamingRequest]] = []

        async def handler(request: StreamingRequest) -> None:
            served.append(weakref.ref(request))
            if not request.body.empty:
                await request.body.startProducing(BodyCollector())
            request.setHeader(b"content-length", b"2")
            request.write(b"ok")
            request.finish()

        client, _ = connect(handler)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        client.send(HEAD + b"Content-Length: 4\r\n\r\nbody")
        client.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n")
        self.assertEqual([r.status for r in client.responses()], [200, 200, 200])
        self.assertEqual([ref() for ref in served], [None, None, None])


# A head sent a byte at a time, and a whole request.
TRICKLE = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
REQUEST = request_bytes()


class HeaderDeadlineTests(SynchronousTestCase):
    """
    The header deadline runs from the accept, and on a kept connection from the end of the
    answer before: a client that sends nothing, only empty lines, or a head a byte at a time
    never keeps a connection past it (issue 16, hole 7).
    """

    limits = Limits(request_headers=10.0, client_idle=100.0)

    # (what the client does, [(second, bytes sent then)], the second the server closes, whether
    # it answers 408 then, responses before that)
    CASES: list[tuple[str, list[tuple[int, bytes]], int, bool, int]] = [
        ("sends nothing", [], 10, False, 0),
        ("sends empty lines each second", [(t, b"\r\n") for t in range(30)], 10, False, 0),
        (
            "sends a head a byte each second",
            [(t, TRICKLE[t : t + 1]) for t in range(30)],
            10,
            True,
            0,
        ),
        ("begins its head at the last second", [(9, b"GET / HTTP/1.1\r\n")], 10, True, 0),
        ("stays idle after an answer", [(4, REQUEST)], 14, False, 1),
        (
            "sends empty lines after an answer",
            [(4, REQUEST)] + [(t, b"\r\n") for t in range(5, 30)],
            14,
            False,
            1,
        ),
        ("begins the next head late", [(4, REQUEST), (13, b"GET / HTTP/1.1\r\n")], 14, True, 1),
        (
            "sends heads a byte a second after an answer",
            [(0, REQUEST)] + [(1 + i, TRICKLE[i : i + 1]) for i in range(30)],
            10,
            True,
            1,
        ),
        ("sends a request every 9 seconds", [(t, REQUEST) for t in range(0, 30, 9)], 37, False, 4),
    ]

    def test_table(self) -> None:
        """Each client is closed exactly at its deadline (408 or silently), then cut off."""
        for name, sends, closes_at, timed_out, answered in self.CASES:
            with self.subTest(name):
                handler = Handler()
                client, clock = connect(handler, self.limits)
                steps = dict(sends)
                for second in range(closes_at):
                    if second in steps:
                        client.send(steps[second])
                    clock.advance(1 if second + 1 < closes_at else 0.999)
                    self.assertFalse(client.closed, (name, second))
                clock.advance(0.001)
                self.assertTrue(client.closed, name)
                responses = client.responses() if client.value() else []
                self.assertEqual([r.status for r in responses[:answered]], [200] * answered)
                self.assertEqual(
                    [r.status for r in responses[answered:]], [408] if timed_out else [], name
                )
                self.assertEqual(len(handler.requests), answered, name)
                # A client that does not let go is cut off one more deadline later.
                self.assertFalse(client.transport.disconnected, name)
                clock.advance(10)
                self.assertTrue(client.transport.disconnected, name)

    def test_from_the_end_of_a_long_answer(self) -> None:
        """The next head is due from the end of the answer before, however long that took."""
        handler = Handler(hold=True)
        client, clock = connect(handler, self.limits)
        client.send(REQUEST)
        clock.advance(3600)
        handler.waiting[0].callback(None)
        clock.advance(9.9)
        self.assertFalse(client.closed)
        clock.advance(0.1)
        self.assertTrue(client.closed)
        self.assertEqual([r.status for r in client.responses()], [200])

    def test_pipelined_head_held_during_an_answer(self) -> None:
        """A head that arrived while the one before was answered is due from that answer."""
        handler = Handler(hold=True)
        client, clock = connect(handler, self.limits)
        client.send(REQUEST + b"GET /next HTTP/1.1\r\n")
        clock.advance(60)
        handler.waiting[0].callback(None)
        clock.advance(9.9)
        self.assertFalse(client.closed)
        client.send(b"Host: x\r\n\r\n")
        handler.waiting[1].callback(None)
        self.assertEqual([r.path for r in handler.requests], [b"/", b"/next"])
        self.assertEqual([r.status for r in client.responses()], [200, 200])
        clock.advance(9.9)
        self.assertFalse(client.closed)
        clock.advance(0.1)
        self.assertTrue(client.closed)

    def test_stalled_body_cut_off(self) -> None:
        """A client that stops in a body is closed after the idle limit, then cut off."""
        handler = Handler(hold=True)
        client, clock = connect(handler, self.limits)
        client.send(HEAD + b"Content-Length: 10\r\n\r\nabc")
        clock.advance(100)
        self.assertTrue(client.closed)
        self.assertFalse(client.transport.disconnected)
        clock.advance(10)
        self.assertTrue(client.transport.disconnected)

    def test_refused_client_cut_off(self) -> None:
        """A refused client (400) that does not let go is cut off one deadline later."""
        client, clock = connect(Handler(), self.limits)
        client.send(b"GET / HTTP/1.1\nHost: x\n\n")
        self.assertEqual(client.response().status, 400)
        self.assertFalse(client.transport.disconnected)
        clock.advance(10)
        self.assertTrue(client.transport.disconnected)
