"""
Tests for L{arvproxy.streaming}: requests reach their handler as soon as their headers are in,
bodies stream with backpressure, early answers cannot desynchronize a connection, and
L{relay_response} streams an upstream response faithfully.  All in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import iweb
from twisted.web.client import PotentialDataLoss
from twisted.web.http_headers import Headers

from arvproxy.errors import Forbidden
from arvproxy.httpserver import EAGER_READ, MAX_PIPELINED, ProxySite, StreamingRequest
from arvproxy.streaming import (
    MAX_BUFFERED_BODY,
    add_parsed_field,
    parsed_headers,
    relay_response,
)
from arvproxy.testing import BodyCollector, FakeResponse, MemoryClient, request_bytes

HandlerFunction = Callable[[StreamingRequest], Coroutine[Any, Any, None]]


def answer(request: StreamingRequest, body: bytes = b"done", code: int = 200) -> None:
    """Write a small complete response."""
    request.setResponseCode(code)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


class Recorder:
    """
    A handler that records each request; what it does with it is C{behaviour}'s business
    (by default it answers at once).
    """

    def __init__(self, behaviour: HandlerFunction | None = None) -> None:
        self.requests: list[StreamingRequest] = []
        self.behaviour = behaviour

    async def __call__(self, request: StreamingRequest) -> None:
        self.requests.append(request)
        if self.behaviour is not None:
            await self.behaviour(request)
        else:
            answer(request)


def connect(handler: Any) -> MemoryClient:
    return MemoryClient(ProxySite(handler, MemoryReactorClock()))


def answer_when_told(told: list[defer.Deferred[None]]) -> HandlerFunction:
    """A behaviour that answers each request with its path once its Deferred in C{told} fires."""

    async def wait(request: StreamingRequest) -> None:
        told.append(defer.Deferred())
        await told[-1]
        answer(request, request.path)

    return wait


async def consume(request: StreamingRequest, collector: BodyCollector) -> None:
    """Stream the body into C{collector}, then answer with what arrived."""
    await request.body.startProducing(collector)
    answer(request, collector.data)


class RequestTests(SynchronousTestCase):
    def test_bodyless_get(self) -> None:
        """A GET without a body reaches the handler with its request line and headers parsed."""
        handler = Recorder()
        client = connect(handler)
        client.send(request_bytes(b"GET", b"/a/b?c=d", [(b"X-Thing", b"1")]))
        [request] = handler.requests
        self.assertEqual(
            (request.method, request.uri, request.path, request.clientproto),
            (b"GET", b"/a/b?c=d", b"/a/b", b"HTTP/1.1"),
        )
        self.assertEqual(request.getHeader(b"x-thing"), b"1")
        self.assertTrue(request.body.empty)
        self.assertTrue(request.body.complete)
        self.assertEqual(client.response().body, b"done")

    def test_content_length_body_streams(self) -> None:
        """A Content-Length body reaches the next hop piece by piece, before the client is done."""
        collector = BodyCollector()
        handler = Recorder(lambda request: consume(request, collector))
        client = connect(handler)
        client.send(request_bytes(b"PUT", b"/up", [(b"Content-Length", b"10")], b"hello"))
        self.assertEqual(len(handler.requests), 1)
        self.assertEqual(handler.requests[0].body.length, 10)
        self.assertEqual(collector.data, b"hello")
        self.assertEqual(client.value(), b"")
        client.send(b"world")
        self.assertEqual(collector.data, b"helloworld")
        self.assertEqual(client.response().body, b"helloworld")

    def test_chunked_body_streams(self) -> None:
        """A chunked body reaches the next hop de-chunked, as each chunk arrives; length unknown."""
        collector = BodyCollector()
        handler = Recorder(lambda request: consume(request, collector))
        client = connect(handler)
        client.send(
            request_bytes(b"POST", b"/up", [(b"Transfer-Encoding", b"chunked")], b"5\r\nhello\r\n")
        )
        self.assertIs(handler.requests[0].body.length, iweb.UNKNOWN_LENGTH)
        self.assertEqual(collector.data, b"hello")
        self.assertEqual(client.value(), b"")
        client.send(b"6\r\n world\r\n")
        self.assertEqual(collector.data, b"hello world")
        client.send(b"0\r\n\r\n")
        self.assertEqual(client.response().body, b"hello world")

    def test_backpressure_from_next_hop(self) -> None:
        """When the next hop pauses the body, the client's socket is paused until it resumes."""
        collector = BodyCollector()
        handler = Recorder(lambda request: consume(request, collector))
        client = connect(handler)
        client.send(request_bytes(b"PUT", b"/", [(b"Content-Length", b"9")], b"abc"))
        body = handler.requests[0].body
        body.pauseProducing()
        self.assertEqual(client.transport.producerState, "paused")
        client.send(b"def")  # already in flight
        self.assertEqual(collector.data, b"abc")
        body.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(collector.data, b"abcdef")
        client.send(b"ghi")
        self.assertEqual(client.response().body, b"abcdefghi")

    def test_bounded_buffer_before_next_hop_is_ready(self) -> None:
        """Until the next hop asks, ~MAX_BUFFERED_BODY is held, then the client is paused."""
        ready: defer.Deferred[None] = defer.Deferred()
        collector = BodyCollector()

        async def later(request: StreamingRequest) -> None:
            await ready
            await consume(request, collector)

        handler = Recorder(later)
        client = connect(handler)
        piece = b"x" * 4096
        total = 4 * MAX_BUFFERED_BODY
        client.send(request_bytes(b"PUT", b"/", [(b"Content-Length", b"%d" % total)]))
        sent = 0
        while client.transport.producerState == "producing" and sent < total:
            client.send(piece)
            sent += len(piece)
        self.assertEqual(client.transport.producerState, "paused")
        self.assertGreaterEqual(sent, MAX_BUFFERED_BODY)
        self.assertLessEqual(sent, MAX_BUFFERED_BODY + len(piece))
        self.assertEqual(collector.data, b"")
        ready.callback(None)
        self.assertEqual(collector.data, b"x" * sent)
        self.assertEqual(client.transport.producerState, "producing")
        client.send(b"x" * (total - sent))
        self.assertEqual(len(client.response().body), total)

    def test_expect_continue_waits_for_next_hop(self) -> None:
        """No 100 Continue is sent until the next hop asks for the body; then exactly one."""
        ready: defer.Deferred[None] = defer.Deferred()
        collector = BodyCollector()

        async def later(request: StreamingRequest) -> None:
            await ready
            await consume(request, collector)

        client = connect(Recorder(later))
        client.send(
            request_bytes(b"PUT", b"/", [(b"Content-Length", b"5"), (b"Expect", b"100-continue")])
        )
        self.assertEqual(client.value(), b"")
        ready.callback(None)
        self.assertEqual(client.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        client.send(b"hello")
        response = client.response(b"PUT")
        self.assertEqual((response.informational, response.body), ([100], b"hello"))

    def test_expect_continue_refused(self) -> None:
        """A request refused before its body is asked for gets no 100, and its connection closes."""

        async def refuse(request: StreamingRequest) -> None:
            raise Forbidden("no")

        handler = Recorder(refuse)
        client = connect(handler)
        client.send(
            request_bytes(b"PUT", b"/", [(b"Content-Length", b"5"), (b"Expect", b"100-continue")])
        )
        response = client.response(b"PUT")
        self.assertEqual((response.status, response.informational), (403, []))
        self.assertNotIn(b"100 Continue", client.value())
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(client.closed)
        self.assertFalse(handler.requests[0].body.complete)

    def test_early_error_cannot_smuggle(self) -> None:
        """An early answer closes the connection; a request-shaped body is never served."""

        async def refuse(request: StreamingRequest) -> None:
            raise Forbidden("no")

        smuggled = request_bytes(b"GET", b"/smuggled")
        for split in (True, False):
            handler = Recorder(refuse)
            client = connect(handler)
            head = request_bytes(b"POST", b"/", [(b"Content-Length", b"%d" % len(smuggled))])
            if split:
                client.send(head)
                client.send(smuggled)
            else:
                client.send(head + smuggled)
            self.assertEqual(len(handler.requests), 1, split)
            response = client.response(b"POST")
            self.assertEqual(response.status, 403)
            self.assertEqual(response.header(b"connection"), b"close")
            self.assertTrue(client.closed)
            self.assertNotIn(b"smuggled", client.value())

    def test_early_error_then_trailing_request(self) -> None:
        """After an early answer, a further request behind the body is not served either."""

        async def refuse(request: StreamingRequest) -> None:
            raise Forbidden("no")

        handler = Recorder(refuse)
        client = connect(handler)
        client.send(request_bytes(b"POST", b"/", [(b"Content-Length", b"3")]))
        client.send(b"abc" + request_bytes(b"GET", b"/next"))
        self.assertEqual(len(handler.requests), 1)
        self.assertEqual(len(client.responses([b"POST", b"GET"])), 1)

    def test_pipelined_in_order(self) -> None:
        """Pipelined body-less requests are served one after another, answered in order."""
        waits: list[defer.Deferred[None]] = []
        handler = Recorder(answer_when_told(waits))
        client = connect(handler)
        client.send(request_bytes(b"GET", b"/a") + request_bytes(b"GET", b"/b"))
        self.assertEqual([r.path for r in handler.requests], [b"/a"])
        waits[0].callback(None)
        self.assertEqual([r.path for r in handler.requests], [b"/a", b"/b"])
        waits[1].callback(None)
        self.assertEqual([r.body for r in client.responses()], [b"/a", b"/b"])
        self.assertFalse(client.closed)

    def test_client_gone_mid_body(self) -> None:
        """A client that disconnects mid-body fails the body's Deferred (the next hop's upload)."""
        handler = Recorder(lambda request: defer.Deferred())  # type: ignore[arg-type,return-value]
        client = connect(handler)
        client.send(request_bytes(b"PUT", b"/", [(b"Content-Length", b"10")], b"abc"))
        done = handler.requests[0].body.startProducing(BodyCollector())
        client.disconnect(ConnectionLost())
        self.failureResultOf(done, ConnectionLost, ConnectionDone)

    def test_client_gone_before_next_hop_asks(self) -> None:
        """A client gone before the next hop asked for its unfinished body fails that upload."""
        handler = Recorder(lambda request: defer.Deferred())  # type: ignore[arg-type,return-value]
        client = connect(handler)
        client.send(request_bytes(b"PUT", b"/", [(b"Content-Length", b"10")], b"abc"))
        client.disconnect(ConnectionLost())
        done = handler.requests[0].body.startProducing(BodyCollector())
        self.failureResultOf(done, ConnectionLost, ConnectionDone)

    def test_reads_ahead_a_little_while_serving(self) -> None:
        """While a request is served, what follows is held up to EAGER_READ, then not read."""
        waits: list[defer.Deferred[None]] = []
        handler = Recorder(answer_when_told(waits))
        client = connect(handler)
        client.send(request_bytes(b"GET", b"/a"))
        client.send(request_bytes(b"GET", b"/b"))
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual([r.path for r in handler.requests], [b"/a"])
        client.send(request_bytes(b"GET", b"/c", [(b"X-Big", b"x" * EAGER_READ)]))
        self.assertEqual(client.transport.producerState, "paused")
        waits[0].callback(None)
        self.assertEqual(client.transport.producerState, "producing")
        waits[1].callback(None)
        waits[2].callback(None)
        self.assertEqual([r.body for r in client.responses()], [b"/a", b"/b", b"/c"])

    def test_too_many_pipelined(self) -> None:
        """Past MAX_PIPELINED waiting requests, those are answered and the connection closes."""
        waits: list[defer.Deferred[None]] = []
        handler = Recorder(answer_when_told(waits))
        client = connect(handler)
        client.send(b"".join(request_bytes(b"GET", b"/%d" % i) for i in range(MAX_PIPELINED + 5)))
        while waits and not client.closed:
            waits.pop().callback(None)
        self.assertEqual(len(handler.requests), MAX_PIPELINED)
        self.assertEqual(len(client.responses()), MAX_PIPELINED)
        self.assertTrue(client.closed)

    def test_body_complete_while_paused_resumes(self) -> None:
        """A body that ends while the next hop holds it up does not leave the client paused."""
        collector = BodyCollector()
        handler = Recorder(lambda request: consume(request, collector))
        client = connect(handler)
        client.send(request_bytes(b"PUT", b"/", [(b"Content-Length", b"6")], b"abc"))
        handler.requests[0].body.pauseProducing()
        self.assertEqual(client.transport.producerState, "paused")
        client.send(b"def" + request_bytes(b"GET", b"/next"))  # already in flight
        handler.requests[0].body.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        # The same collector answers both: the GET adds nothing to it.
        responses = client.responses([b"PUT", b"GET"])
        self.assertEqual([r.body for r in responses], [b"abcdef", b"abcdef"])

    def test_unexpected_error_page(self) -> None:
        """A handler bug becomes a 500 page that does not show the exception."""

        async def broken(request: StreamingRequest) -> None:
            raise RuntimeError("internal detail")

        client = connect(Recorder(broken))
        client.send(request_bytes())
        response = client.response()
        self.assertEqual(response.status, 500)
        self.assertNotIn(b"internal detail", response.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


def relay(response: FakeResponse) -> Recorder:
    """A handler that relays C{response} for every request."""
    return Recorder(lambda request: relay_response(request, response))


class RelayTests(SynchronousTestCase):
    def test_status_and_headers(self) -> None:
        """Status, phrase and repeated headers pass; hop-by-hop and Connection-named ones do not."""
        upstream = FakeResponse(
            201,
            b"Made It",
            [
                (b"Set-Cookie", b"a=1"),
                (b"X-Multi", b"one"),
                (b"Set-Cookie", b"b=2"),
                (b"X-Multi", b"two"),
                (b"Connection", b"x-private, keep-alive"),
                (b"X-Private", b"secret"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Authenticate", b"Basic"),
                (b"Trailer", b"x-t"),
                (b"Upgrade", b"h2c"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Content-Length", b"999"),
            ],
            b"hello",
        )
        client = connect(relay(upstream))
        client.send(request_bytes())
        response = client.response()
        self.assertEqual((response.status, response.reason), (201, b"Made It"))
        self.assertEqual(response.all(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(response.all(b"x-multi"), [b"one", b"two"])
        for name in (b"x-private", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
            self.assertNotIn(name, response.names())
        self.assertEqual(response.all(b"content-length"), [b"5"])
        self.assertNotIn(b"transfer-encoding", response.names())
        self.assertNotIn(b"connection", response.names())
        self.assertEqual(response.body, b"hello")
        self.assertFalse(client.closed)

    def test_whole_answer_gets_its_length(self) -> None:
        """
        An answer that arrived whole goes out with its length, even one the next hop sent
        chunked; a HEAD answer keeps the next hop's length, a 304 gets none.
        """
        upstream = FakeResponse(headers=[(b"X-A", b"1")], body=b"hello", whole=True)
        upstream.length = iweb.UNKNOWN_LENGTH  # as the next hop framed it: chunked
        client = connect(relay(upstream))
        client.send(request_bytes())
        response = client.response()
        self.assertEqual((response.header(b"content-length"), response.body), (b"5", b"hello"))
        self.assertNotIn(b"transfer-encoding", response.names())
        self.assertIsNone(upstream.protocol)  # nothing was delivered: it was taken whole
        self.assertFalse(client.closed)
        for method, code, length in [(b"HEAD", 200, [b"1234"]), (b"GET", 304, [])]:
            upstream = FakeResponse(
                code, headers=[(b"Content-Length", b"1234")], body=b"", length=0, whole=True
            )
            client = connect(relay(upstream))
            client.send(request_bytes(method))
            response = client.responses([method])[0]
            self.assertEqual(response.all(b"content-length"), length, method)
            self.assertTrue(response.complete, method)

    def test_unknown_length_is_chunked(self) -> None:
        """A response of unknown length streams chunked as it arrives."""
        upstream = FakeResponse(body=None)
        client = connect(relay(upstream))
        client.send(request_bytes())
        upstream.write(b"part1")
        self.assertFalse(client.response().complete)
        self.assertEqual(client.response().body, b"part1")
        upstream.write(b"part2")
        upstream.finish()
        response = client.response()
        self.assertEqual(response.header(b"transfer-encoding"), b"chunked")
        self.assertEqual((response.body, response.complete), (b"part1part2", True))

    def test_potential_data_loss_finishes(self) -> None:
        """An upstream body without framing that ends at close (PotentialDataLoss) ends cleanly."""
        upstream = FakeResponse(body=None)
        client = connect(relay(upstream))
        client.send(request_bytes())
        upstream.write(b"all")
        upstream.fail(PotentialDataLoss())
        self.assertTrue(client.response().complete)
        self.assertFalse(client.transport.disconnected)

    def test_head_keeps_length(self) -> None:
        """A HEAD response keeps the upstream Content-Length and has no body."""
        upstream = FakeResponse(headers=[(b"Content-Length", b"1234")], body=b"", length=0)
        client = connect(relay(upstream))
        client.send(request_bytes(b"HEAD") + request_bytes(b"GET", b"/next"))
        responses = client.responses([b"HEAD", b"GET"])
        self.assertEqual(responses[0].all(b"content-length"), [b"1234"])
        self.assertNotIn(b"transfer-encoding", responses[0].names())
        self.assertEqual(responses[0].body, b"")
        self.assertEqual(len(responses), 2)

    def test_no_body_codes(self) -> None:
        """204 and 304 carry no body and no chunked framing; the connection stays usable."""
        for code in (204, 304):
            upstream = FakeResponse(code, b"X", [(b"ETag", b'"e"')], body=b"", length=0)
            client = connect(relay(upstream))
            client.send(request_bytes() + request_bytes(b"GET", b"/next"))
            raw = client.value()
            self.assertNotIn(b"Transfer-Encoding", raw, code)
            responses = client.responses()
            self.assertEqual([r.status for r in responses], [code, code])
            self.assertEqual(responses[0].body, b"")

    def test_truncated_upstream_aborts(self) -> None:
        """An upstream body that breaks off aborts the client connection, never ends cleanly."""
        upstream = FakeResponse(body=None, length=10)
        handler = relay(upstream)
        client = connect(handler)
        client.send(request_bytes())
        upstream.write(b"abc")
        upstream.fail(ConnectionLost())
        self.assertTrue(client.transport.disconnected)
        response = client.response()
        self.assertEqual(response.header(b"content-length"), b"10")
        self.assertFalse(response.complete)
        self.assertFalse(handler.requests[0].finished)

    def test_client_gone_stops_upstream(self) -> None:
        """A client that goes away mid-response stops the upstream producer."""
        upstream = FakeResponse(body=None)
        client = connect(relay(upstream))
        client.send(request_bytes())
        upstream.write(b"abc")
        client.disconnect(ConnectionLost())
        self.assertEqual(upstream.transport.producerState, "stopped")
        upstream.fail(ConnectionLost())  # the upstream connection then closes: no error

    def test_slow_client_pauses_upstream(self) -> None:
        """When the client's socket is full the upstream body is paused, and resumed after."""
        upstream = FakeResponse(body=None)
        client = connect(relay(upstream))
        client.send(request_bytes())
        upstream.write(b"abc")
        client.transport.producer.pauseProducing()  # as the client's full socket does
        self.assertEqual(upstream.transport.producerState, "paused")
        client.transport.producer.resumeProducing()
        self.assertEqual(upstream.transport.producerState, "producing")
        upstream.finish()
        self.assertTrue(client.response().complete)


def parse(fields: list[tuple[bytes, bytes]]) -> tuple[Headers, int | None, list[bytes]]:
    """What a parser makes of C{fields}, gathered one by one as they come."""
    gathered: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        add_parsed_field(gathered, name, value)
    return parsed_headers(gathered)


class ParsedHeadersTests(SynchronousTestCase):
    """
    L{parsed_headers} builds its L{Headers} without Twisted's per-value scrubbing (llhttp has
    refused what that would scrub): the result must be the same as Twisted's, field for field.
    """

    CASES = [
        # fields as llhttp hands them, the length, the codings
        ([], None, []),
        ([(b"Host", b"a")], None, []),
        ([(b"content-length", b"12"), (b"Content-Type", b"text/plain")], 12, []),
        ([(b"Content-Length", b"0")], 0, []),
        ([(b"Transfer-Encoding", b"gzip, Chunked")], None, [b"gzip", b"chunked"]),
        (
            [(b"transfer-encoding", b"gzip"), (b"TRANSFER-ENCODING", b"chunked")],
            None,
            [b"gzip", b"chunked"],
        ),
        # Repeated, in different cases: one name, values in order.
        ([(b"X-A", b"1"), (b"Cookie", b"c=1"), (b"x-a", b"2"), (b"COOKIE", b"d=2")], None, []),
        # Names Twisted spells its own way, and an empty value.
        ([(b"etag", b'"x"'), (b"www-authenticate", b"Basic"), (b"x-empty", b"")], None, []),
        ([(b"X-Arvados-Target-Uuid", b"u"), (b"x-arvados-target-port", b"80")], None, []),
    ]

    def test_same_as_twisted(self) -> None:
        """Each case's fields and framing come out as Twisted's own Headers would hold them."""
        for fields, length, codings in self.CASES:
            expected = Headers()
            for name, value in fields:
                expected.addRawHeader(name, value)
            headers, parsed_length, parsed_codings = parse(fields)
            self.assertEqual(list(headers.getAllRawHeaders()), list(expected.getAllRawHeaders()))
            self.assertEqual(headers, expected, fields)
            self.assertEqual((parsed_length, parsed_codings), (length, codings), fields)

    def test_lookups_by_any_case(self) -> None:
        """The parsed fields answer lookups and take additions in any spelling of a name."""
        headers, _, _ = parse([(b"x-a", b"1"), (b"X-A", b"2")])
        self.assertEqual(headers.getRawHeaders(b"X-a"), [b"1", b"2"])
        self.assertTrue(headers.hasHeader(b"x-A"))
        headers.addRawHeader(b"x-a", b"3")
        self.assertEqual(headers.getRawHeaders(b"x-a"), [b"1", b"2", b"3"])
