"""
Tests for L{arvproxy.hopclient}: the client both hops use to reach the next one.  What it sends
(framing is its own; nothing a caller passes can split a request), what answers it believes
(llhttp's strict rules, no bytes nobody asked for), when a connection is used again, and how a
body streams both ways.  In memory (C{StringTransport}); the chain tests run it over real TLS.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import iweb
from twisted.web.client import (
    PotentialDataLoss,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from zope.interface import implementer

from arvproxy.hopclient import HopConnection, HopPool, HopResponse, request_head
from arvproxy.testing import MemoryEndpoint


class Body:
    """A body protocol that records what it gets."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


@implementer(iweb.IBodyProducer)
class Upload:
    """A request body its test feeds by hand."""

    def __init__(self, length: Any) -> None:
        self.length = length
        self.consumer: Any = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.stopped = False

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        self.consumer = consumer
        return self.done

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


class _AbortOnly(StringTransport):
    """Like a TCP transport: aborting it is only seen once the connection is lost."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class HopTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.pool = HopPool(self.clock, idle_timeout=10)
        self.endpoint = MemoryEndpoint(8080)

    def send(
        self, method: bytes = b"GET", body: Any = None, headers: Headers | None = None
    ) -> tuple[defer.Deferred[HopResponse], HopConnection, StringTransport]:
        d = self.pool.request("k", self.endpoint, method, b"/p?q=1", headers or Headers(), body)
        connection, transport = self.endpoint.connections[-1]
        return d, connection, transport

    def answer(self, data: bytes, method: bytes = b"GET") -> tuple[HopResponse, Body, Any]:
        """Send a request, answer it with C{data}; the answer, its body, and its connection."""
        d, connection, _ = self.send(method)
        connection.dataReceived(data)
        response = self.successResultOf(d)
        body = Body()
        response.deliverBody(body)
        return response, body, connection


class RequestHeadTests(SynchronousTestCase):
    """The client frames each request itself; a caller's framing headers never go out."""

    def test_framing_table(self) -> None:
        """(method, body length) → the framing header sent."""
        cases = [
            (b"GET", None, []),
            (b"HEAD", None, []),
            (b"POST", None, [b"Content-Length: 0"]),
            (b"PUT", 5, [b"Content-Length: 5"]),
            (b"POST", iweb.UNKNOWN_LENGTH, [b"Transfer-Encoding: chunked"]),
        ]
        smuggled = Headers(
            {
                b"Content-Length": [b"999"],
                b"Transfer-Encoding": [b"identity"],
                b"Connection": [b"close"],
                b"X-Kept": [b"yes"],
            }
        )
        for method, length, framing in cases:
            head = request_head(method, b"/", smuggled, length)
            lines = head.split(b"\r\n")
            self.assertEqual(lines[0], method + b" / HTTP/1.1")
            self.assertIn(b"X-Kept: yes", lines)
            self.assertEqual(
                [
                    x
                    for x in lines
                    if x.split(b":")[0].lower()
                    in (b"content-length", b"transfer-encoding", b"connection")
                ],
                framing,
                (method, length),
            )
            self.assertTrue(head.endswith(b"\r\n\r\n"))

    def test_bad_request_lines(self) -> None:
        """A method or target that could split the request line is refused; nothing is sent."""
        for method, target in [
            (b"GET /x HTTP/1.1\r\nHost: evil\r\n\r\nGET", b"/"),
            (b"G ET", b"/"),
            (b"", b"/"),
            (b"GET", b"/a b"),
            (b"GET", b"/a\r\nX-Injected: 1"),
            (b"GET", b"/\x00"),
            (b"GET", b""),
        ]:
            with self.assertRaises(ValueError, msg=(method, target)):
                request_head(method, target, Headers(), None)

    def test_header_values_cannot_split_the_request(self) -> None:
        """CR and LF in a header value (Headers turns them into spaces) never start a line."""
        headers = Headers({b"X-A": [b"1\r\nX-Injected: 2"]})
        head = request_head(b"GET", b"/", headers, None)
        self.assertNotIn(b"\r\nX-Injected", head)

    def test_refused_before_sending(self) -> None:
        pool, endpoint = HopPool(MemoryReactorClock(), 10), MemoryEndpoint(80)
        d = pool.request("k", endpoint, b"GET", b"/a b", Headers(), None)
        self.failureResultOf(d, ValueError)
        self.assertEqual(endpoint.connections[-1][1].value(), b"")


class ResponseTests(HopTestCase):
    """What answers the client believes, and what it makes of them."""

    def test_round_trip(self) -> None:
        d, connection, transport = self.send(headers=Headers({b"X-A": [b"1"]}))
        self.assertEqual(transport.value(), b"GET /p?q=1 HTTP/1.1\r\nX-A: 1\r\n\r\n")
        connection.dataReceived(b"HTTP/1.1 201 Made It\r\nX-B: 2\r\nX-B: 3\r\n")
        self.assertNoResult(d)
        connection.dataReceived(b"Content-Length: 4\r\n\r\nbo")
        response = self.successResultOf(d)
        self.assertEqual((response.code, response.phrase, response.length), (201, b"Made It", 4))
        self.assertEqual(response.headers.getRawHeaders(b"x-b"), [b"2", b"3"])
        body = Body()
        response.deliverBody(body)
        self.assertEqual(body.data, b"bo")
        self.assertIsNone(body.reason)
        connection.dataReceived(b"dy")
        self.assertEqual(body.data, b"body")
        assert body.reason is not None
        body.reason.trap(ResponseDone)

    def test_invalid_answers_table(self) -> None:
        """Answers llhttp's strict rules refuse fail the request and close the connection."""
        cases = {
            "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
            "length and chunked": (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\n"
            ),
            "length not a number": b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\nx",
            "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\nx",
            "not HTTP": b"HTTX/1.1 200 OK\r\n\r\n",
            "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
            "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
            "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "headers too large": b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
            "endless interim answers": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 9_000,
            "switching protocols unasked": (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: upgrade\r\n\r\n"
            ),
        }
        for name, data in cases.items():
            self.setUp()
            d, connection, transport = self.send()
            connection.dataReceived(data)
            self.failureResultOf(d, ResponseNeverReceived)
            self.assertTrue(transport.disconnecting, name)
            self.assertEqual(self.pool.idle_connections(), [], name)

    def test_bad_chunk_after_the_headers(self) -> None:
        """An answer already handed over fails in its body, and its connection closes."""
        response, body, connection = self.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
        )
        self.assertEqual(body.data, b"ok")
        connection.dataReceived(b"zz\r\n")
        self.assertTrue(connection.transport.disconnecting)
        connection.connectionLost(Failure(ConnectionLost()))
        assert body.reason is not None
        body.reason.trap(ResponseFailed)

    def test_bytes_nobody_asked_for(self) -> None:
        """A second answer after the first closes the connection: it is never kept."""
        d, connection, transport = self.send()
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        connection.dataReceived(answer + answer)
        self.successResultOf(d)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.idle_connections(), [])

    def test_bytes_while_idle(self) -> None:
        """Bytes on a kept connection that no request asked for: it is closed, never used."""
        _, _, connection = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged")
        self.assertTrue(connection.transport.disconnecting)
        self.send()
        self.assertEqual(self.endpoint.attempts, 2)

    def test_interim_answers(self) -> None:
        """
        Interim answers but 100 go to the caller, in order, before the answer, on both a new
        and a kept connection; without a caller they are dropped.  None is the answer.
        """
        interims = (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </b>\r\nLink: </c>\r\n\r\n"
        )
        final = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        seen: list[tuple[int, bytes, list[bytes]]] = []

        def told(code: int, phrase: bytes, headers: Headers) -> None:
            seen.append((code, phrase, list(headers.getRawHeaders(b"link", []))))

        for _ in range(2):  # The second time on the kept connection.
            seen.clear()
            d = self.pool.request("k", self.endpoint, b"GET", b"/", Headers(), None, told)
            connection, _ = self.endpoint.connections[-1]
            connection.dataReceived(interims)
            self.assertNoResult(d)
            connection.dataReceived(final)
            response = self.successResultOf(d)
            self.assertEqual(
                seen, [(103, b"Early Hints", [b"</a>"]), (103, b"Early Hints", [b"</b>", b"</c>"])]
            )
            self.assertEqual(response.code, 200)
            self.assertFalse(response.headers.hasHeader(b"link"))
            self.assertEqual(self.pool.idle_connections(), [connection])
        self.assertEqual(self.endpoint.attempts, 1)
        d, connection, _ = self.send()
        connection.dataReceived(interims + final)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_no_body_answers(self) -> None:
        """HEAD, 204 and 304 answers have no body, whatever their Content-Length says."""
        for method, data in [
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 68\r\n\r\n"),
            (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
            (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 68\r\n\r\n"),
        ]:
            self.setUp()
            response, body, _ = self.answer(data, method)
            self.assertEqual(response.length, 0)
            assert body.reason is not None
            body.reason.trap(ResponseDone)
        # HEAD keeps the service's length for the client to see.
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"68"])

    def test_trailers_dropped(self) -> None:
        response, body, _ = self.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n"
        )
        self.assertEqual(body.data, b"ok")
        self.assertFalse(response.headers.hasHeader(b"x-t"))
        assert body.reason is not None
        body.reason.trap(ResponseDone)


class ReuseTests(HopTestCase):
    """A connection serves another request only when both messages are complete and allowed."""

    def test_reuse_table(self) -> None:
        """(method, answer) → kept for the next request?"""
        cases = [
            (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", True),
            (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", True),
            (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", True),
            (b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", False),
            (b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", False),
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n", False),
        ]
        for method, data, kept in cases:
            self.setUp()
            _, _, connection = self.answer(data, method)
            self.assertEqual(self.pool.idle_connections() == [connection], kept, data)
            self.assertEqual(connection.transport.disconnecting, not kept, data)
        # A kept connection serves the next request without a new connection.
        self.setUp()
        self.answer(cases[0][1])
        self.answer(cases[0][1])
        self.assertEqual(self.endpoint.attempts, 1)

    def test_next_request_from_the_reader(self) -> None:
        """
        A reader told the answer is complete can send the next request at once: the
        connection is back in the pool by then.
        """
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
        sent: list[defer.Deferred[HopResponse]] = []

        class Next(Body):
            def connectionLost(this, reason: Failure) -> None:
                sent.append(self.pool.request("k", self.endpoint, b"GET", b"/2", Headers(), None))

        d, connection, transport = self.send()
        d.addCallback(lambda response: response.deliverBody(Next()))
        connection.dataReceived(answer)
        self.assertEqual(len(sent), 1)
        self.assertEqual(self.endpoint.attempts, 1)
        self.assertTrue(transport.value().endswith(b"GET /2 HTTP/1.1\r\n\r\n"))

    def test_body_until_the_connection_closes(self) -> None:
        """An answer without length or chunking ends with its connection: possibly cut short."""
        response, body, connection = self.answer(b"HTTP/1.1 200 OK\r\n\r\nsome")
        self.assertIs(response.length, iweb.UNKNOWN_LENGTH)
        connection.dataReceived(b" more")
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.data, b"some more")
        assert body.reason is not None
        body.reason.trap(PotentialDataLoss)

    def test_cut_short(self) -> None:
        """A connection lost inside a body of known length fails the body."""
        response, body, connection = self.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsome"
        )
        connection.connectionLost(Failure(ConnectionDone()))
        assert body.reason is not None
        body.reason.trap(ResponseFailed)

    def test_lost_before_the_answer(self) -> None:
        d, connection, _ = self.send()
        connection.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.endpoint.attempts, 1)  # Never sent again by the client itself.

    def test_closing_connection_never_used(self) -> None:
        _, _, connection = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        connection.transport.loseConnection()  # The far end is going away.
        self.send()
        self.assertEqual(self.endpoint.attempts, 2)

    def test_closing_connection_refuses_a_request(self) -> None:
        """
        A connection asked directly (not through the pool, which checks before it sends) sends
        nothing when it is busy or closing, even when only a transport under it is.
        """
        for setup in ("busy", "closing", "lower layer closing"):
            transport = StringTransport()
            connection = HopConnection(self.pool, "k")
            connection.makeConnection(transport)
            if setup == "busy":
                connection.request(b"GET", b"/", Headers(), None)
                transport.clear()
            elif setup == "closing":
                transport.loseConnection()
            else:
                lower = StringTransport()
                transport.transport = lower  # type: ignore[attr-defined]
                lower.loseConnection()
            d = connection.request(b"GET", b"/", Headers(), None)
            self.failureResultOf(d, RequestNotSent)
            self.assertEqual(transport.value(), b"", setup)

    def test_stopped_after_the_answer_is_complete(self) -> None:
        """
        Stopping a body that has already been read whole does not close its connection, which
        may by now be serving another request (a client that left mid-request, last session's
        pool bug).
        """
        d, connection, transport = self.send()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
        response = self.successResultOf(d)
        self.assertEqual(self.pool.idle_connections(), [connection])
        response.stopProducing()
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.pool.idle_connections(), [connection])

    def test_stopped_while_handed_over(self) -> None:
        """
        A body stopped as its answer is handed over (its client has left) closes the
        connection when the rest of the answer is still to come: never kept.  An answer that
        came whole with the head was complete, and its connection back in the pool, before
        anyone heard of it: stopping it then changes nothing.  (A TCP transport being aborted
        does not say it is disconnecting until it has gone.)
        """
        for answer, kept in [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nx", False),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", True),
        ]:
            self.setUp()
            transport = _AbortOnly()
            connection = HopConnection(self.pool, "k")
            connection.makeConnection(transport)
            d = connection.request(b"GET", b"/", Headers(), None)
            d.addCallback(lambda response: response.stopProducing())
            connection.dataReceived(answer)
            self.assertEqual(transport.aborted, not kept, answer)
            self.assertEqual(self.pool.idle_connections(), [connection] if kept else [], answer)

    def test_complete_body(self) -> None:
        """
        An answer that arrived whole before anything asked for its body gives it at once,
        once; otherwise the body is for deliverBody.
        """
        response, _, _ = self.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertIsNone(response.complete_body())  # delivered already (by answer())
        d, connection, _ = self.send()
        connection.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
        )
        whole = self.successResultOf(d)
        self.assertEqual(whole.complete_body(), b"abc")
        self.assertIsNone(whole.complete_body())
        self.assertRaises(RuntimeError, whole.deliverBody, Body())
        d, connection, _ = self.send()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        partial = self.successResultOf(d)
        self.assertIsNone(partial.complete_body())
        body = Body()
        partial.deliverBody(body)
        connection.dataReceived(b"cd")
        self.assertEqual(body.data, b"abcd")

    def test_paused_when_complete(self) -> None:
        """A connection paused by a slow reader is resumed before it serves another request."""
        d, connection, transport = self.send()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nx")
        response = self.successResultOf(d)
        response.deliverBody(Body())
        response.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        connection.dataReceived(b"y")
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.pool.idle_connections(), [connection])

    def test_stopping_a_body_closes_its_connection(self) -> None:
        response, body, connection = self.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsome"
        )
        body.transport.stopProducing()
        self.assertTrue(connection.transport.disconnecting)

    def test_idle_limits(self) -> None:
        """At most max_idle per key, each for at most idle_timeout seconds."""
        self.pool.max_idle = 1
        answers = []
        for _ in range(2):
            answers.append(self.send())
        for _, connection, _ in answers:
            connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        (first, _), (second, _) = self.endpoint.connections
        self.assertEqual(self.pool.idle_connections(), [first])
        self.assertTrue(second.transport.disconnecting)
        self.clock.advance(9.9)
        self.assertFalse(first.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(first.transport.disconnecting)
        self.assertEqual(self.pool.idle_connections(), [])

    def test_close_cached_connections(self) -> None:
        _, _, connection = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        closed = self.pool.closeCachedConnections()
        self.assertTrue(connection.transport.disconnecting)
        self.assertNoResult(closed)
        connection.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)


class ResendTests(HopTestCase):
    """
    A kept connection the next hop closes just as a request goes out on it: a request safe to
    send twice goes once more on a new connection, after the caller renews its headers.
    """

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def test_resend_table(self) -> None:
        """(kept connection?, method, body?, how the connection ends) → sent again?"""
        lost, dropped = Failure(ConnectionDone()), Failure(ConnectionLost())
        cases = [
            (True, b"GET", False, lost, True),
            (True, b"HEAD", False, dropped, True),
            (True, b"DELETE", False, lost, True),
            (False, b"GET", False, lost, False),  # A new connection's failure is the answer.
            (True, b"POST", False, lost, False),  # Not safe to send twice.
            (True, b"PUT", True, lost, False),  # A body cannot be read twice.
            (True, b"GET", False, Failure(SSL.Error("bad record")), False),  # Not a close.
            (True, b"GET", False, b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", False),
        ]
        for kept, method, with_body, end, resent in cases:
            self.setUp()
            if kept:
                self.answer(self.OK)
            renewed: list[Headers] = []
            headers = Headers({b"x-sig": [b"first"]})
            d = self.pool.request(
                "k",
                self.endpoint,
                method,
                b"/",
                headers,
                Upload(3) if with_body else None,
                before_retry=renewed.append,
            )
            connection, _ = self.endpoint.connections[-1]
            if isinstance(end, bytes):
                connection.dataReceived(end)
            else:
                connection.connectionLost(end)
            case = (kept, method, with_body, end)
            self.assertEqual(self.endpoint.attempts, 1 + resent, case)
            self.assertEqual(renewed, [headers] if resent else [], case)
            if resent:
                self.assertNoResult(d)
                again, transport = self.endpoint.connections[-1]
                self.assertTrue(transport.value().startswith(method + b" / HTTP/1.1"), case)
                again.dataReceived(self.OK)
                self.assertEqual(self.successResultOf(d).code, 200, case)
            else:
                self.failureResultOf(d)

    def test_resent_once(self) -> None:
        """The new connection failing too is the answer: nothing is sent a third time."""
        self.answer(self.OK)
        d, connection, _ = self.send()
        connection.connectionLost(Failure(ConnectionDone()))
        again, _ = self.endpoint.connections[-1]
        again.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.endpoint.attempts, 2)


class UploadTests(HopTestCase):
    """A request body streams to the next hop, framed by the client."""

    def test_known_length(self) -> None:
        upload = Upload(5)
        d, connection, transport = self.send(b"PUT", upload)
        self.assertIs(transport.producer, upload)
        upload.consumer.write(b"he")
        upload.consumer.write(b"llo")
        upload.done.callback(None)
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.value().endswith(b"Content-Length: 5\r\n\r\nhello"))
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        self.assertEqual(self.pool.idle_connections(), [connection])

    def test_chunked(self) -> None:
        upload = Upload(iweb.UNKNOWN_LENGTH)
        d, connection, transport = self.send(b"POST", upload)
        upload.consumer.write(b"hello")
        upload.consumer.write(b"")
        upload.consumer.write(b"x" * 16)
        upload.done.callback(None)
        self.assertTrue(
            transport.value().endswith(
                b"\r\n\r\n5\r\nhello\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"
            )
        )

    def test_body_too_long(self) -> None:
        """Bytes past a body's length are never sent: the connection is closed at once."""
        upload = Upload(5)
        d, connection, transport = self.send(b"PUT", upload)
        upload.consumer.write(b"hel")
        upload.consumer.write(b"lo, and more")
        self.assertTrue(transport.disconnecting)
        self.assertTrue(transport.value().endswith(b"\r\n\r\nhel"), transport.value())
        self.failureResultOf(d, RequestTransmissionFailed)

    def test_body_too_short(self) -> None:
        """A body that ends before its length is never passed off as whole."""
        upload = Upload(5)
        d, connection, transport = self.send(b"PUT", upload)
        upload.consumer.write(b"shrt")
        upload.done.callback(None)
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(d, RequestTransmissionFailed)

    def test_client_gone_mid_body(self) -> None:
        upload = Upload(5)
        d, connection, transport = self.send(b"PUT", upload)
        upload.consumer.write(b"he")
        upload.done.errback(Failure(ConnectionLost()))
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(d, RequestTransmissionFailed)

    def test_answer_before_the_body_is_sent(self) -> None:
        """An early answer (413, say) stops the upload; the connection is not kept."""
        upload = Upload(5)
        d, connection, transport = self.send(b"PUT", upload)
        connection.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).code, 413)
        self.assertTrue(upload.stopped)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.idle_connections(), [])
