"""
What web apps need from the chain (controller → TLS gateway → service, on loopback): streamed
responses as they are written, Expect: 100-continue, bodiless answers, HTTPS services, and the
limits that protect a container.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web import resource, server

from arvproxy.config import Limits
from arvproxy.streaming import closing
from arvproxy.tlsidentity import make_server_certificate
from tests.chain import Chain, exchange, read_until, start_chain
from tests.wsservice import Client, EchoFactory


class _Events(resource.Resource):
    """Server-Sent Events: the first event at once, the second only when the test says so."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.release: defer.Deferred[None] = defer.Deferred()
        self.finished: list[defer.Deferred[None]] = []

    def render_GET(self, request):
        self.finished.append(request.notifyFinish())
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: first\n\n")
        self.release.addCallback(lambda _: (request.write(b"data: second\n\n"), request.finish()))
        return server.NOT_DONE_YET


class _Held(resource.Resource):
    """Holds each answer until the test says so; then writes it (headers and body) at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.arrived: defer.Deferred[None] = defer.Deferred()
        self._held: list[server.Request] = []

    def render_GET(self, request):
        if request.path != b"/held":
            return b"fresh answer"
        self._held.append(request)
        if not self.arrived.called:
            self.arrived.callback(None)
        return server.NOT_DONE_YET

    def answer(self) -> None:
        for request in self._held:
            request.setHeader(b"content-length", b"11")
            request.write(b"held answer")
            request.finish()


class _App(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.uploads: list[bytes] = []

    def render_GET(self, request):
        if request.path == b"/empty":
            request.setResponseCode(204)
            return b""
        if request.path == b"/cached":
            request.setResponseCode(304)
            request.setHeader(b"etag", b'"v1"')
            return b""
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from the app\n"

    def render_OPTIONS(self, request):
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"GET, POST")
        return b""

    def render_POST(self, request):
        body = request.content.read()
        self.uploads.append(body)
        return b"got %d bytes" % (len(body),)


class _RawService(protocol.Protocol):
    """
    Answers every request with fixed bytes: a 103 Early Hints, then a chunked 200 whose body is
    followed by a trailer field.
    """

    ANSWER = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n"
        b"Content-Type: text/plain\r\n\r\n"
        b"6\r\nhello \r\n5\r\nworld\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.append(data)
        if b"\r\n\r\n" in b"".join(self.factory.received):
            self.transport.write(self.ANSWER)


class _RawFactory(protocol.Factory):
    protocol = _RawService

    def __init__(self) -> None:
        self.received: list[bytes] = []


class _CloseDelimitedService(_RawService):
    """Answers like an old HTTP/1.0 server: no length, the body ends when the connection does."""

    ANSWER = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"old style " * 1000

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if b"\r\n\r\n" in b"".join(self.factory.received):
            self.transport.loseConnection()


class _OneRequestPerConnection(protocol.Protocol):
    """
    Answers a connection's first request and keeps the connection open, then closes it when
    the next request arrives, unanswered: a server dropping an idle keep-alive connection just
    as a request goes out on it.
    """

    answered = False

    def connectionMade(self) -> None:
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            self.transport.loseConnection()
            return
        self.answered = True
        self.factory.answered += 1
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")


class _OneRequestPerConnectionFactory(protocol.Factory):
    protocol = _OneRequestPerConnection

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0


def _dechunk(body: bytes) -> bytes:
    """The payload of a chunked body (trailers ignored)."""
    payload = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return payload
        payload, body = payload + body[:size], body[size + 2 :]


def _raw(port: int, data: bytes, until: bytes) -> defer.Deferred[bytes]:
    """Send C{data} on a fresh socket and read until C{until} arrives or the server closes."""

    def work() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(data)
            return read_until(sock, until)

    return deferToThread(work)


class WebAppTests(unittest.TestCase):
    timeout = 60

    async def _chain(self, site_resource, limits=None, published=None, tls=False) -> Chain:
        site = (
            site_resource
            if isinstance(site_resource, EchoFactory | protocol.Factory)
            else server.Site(site_resource)
        )
        if tls:
            certificate = make_server_certificate(os.urandom(32).hex(), ["127.0.0.1"])
            port = reactor.listenSSL(0, site, certificate.options(), interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        if published is not None:
            published = {number: published}
        return await start_chain(self, number, limits=limits, published=published)

    def _request(self, chain: Chain, head: bytes, body: bytes = b"", cookie: bool = True) -> bytes:
        lines = [head, b"Host: " + chain.host]
        if cookie:
            lines.append(b"Cookie: " + chain.cookie)
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def test_server_sent_events_arrive_as_written(self):
        """An event reaches the client while the service has not yet written the next one."""

        async def go():
            events = _Events()
            chain = await self._chain(events)
            sock = socket.create_connection(("127.0.0.1", chain.controller_port), timeout=20)
            self.addCleanup(sock.close)

            sock.sendall(self._request(chain, b"GET /events HTTP/1.1"))
            # The service writes "second" only after the client has seen "first".
            first = await deferToThread(read_until, sock, b"data: first")
            self.assertIn(b"data: first", first)
            self.assertNotIn(b"data: second", first)
            self.assertIn(b"text/event-stream", first)
            events.release.callback(None)
            rest = await deferToThread(read_until, sock, b"0\r\n\r\n")
            self.assertIn(b"data: second", rest)

        return defer.ensureDeferred(go())

    def test_expect_continue_refused_before_the_body(self):
        """Without a token, Expect: 100-continue gets 401 at once and no 100 Continue."""

        async def go():
            app = _App()
            chain = await self._chain(app)
            head = self._request(
                chain,
                b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue",
                cookie=False,
            )
            reply = await _raw(chain.controller_port, head, b"\r\n\r\n")
            self.assertTrue(reply.startswith(b"HTTP/1.1 401 "), reply)
            self.assertNotIn(b"100 Continue", reply)
            self.assertEqual(app.uploads, [])

        return defer.ensureDeferred(go())

    def test_expect_continue_accepted_then_body_sent(self):
        """With a token, the client is told to continue, and its body reaches the service."""

        async def go():
            app = _App()
            chain = await self._chain(app)
            head = self._request(
                chain, b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue"
            )

            def work() -> bytes:
                with socket.create_connection(("127.0.0.1", chain.controller_port), 20) as sock:
                    sock.sendall(head)
                    interim = sock.recv(65536)
                    assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
                    sock.sendall(b"hello")
                    return read_until(sock, b"got 5 bytes")

            reply = await deferToThread(work)
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
            self.assertEqual(app.uploads, [b"hello"])

        return defer.ensureDeferred(go())

    def test_bodiless_answers(self):
        """HEAD keeps Content-Length without a body; 204 and 304 carry no body nor chunking."""

        async def go():
            chain = await self._chain(_App())
            for head, status in [
                (b"HEAD /text HTTP/1.1", b"200"),
                (b"GET /empty HTTP/1.1", b"204"),
                (b"GET /cached HTTP/1.1", b"304"),
            ]:
                reply = await _raw(
                    chain.controller_port,
                    self._request(chain, head + b"\r\nConnection: close"),
                    b"\x00",  # read until the server closes
                )
                headers, _, body = reply.partition(b"\r\n\r\n")
                self.assertTrue(headers.startswith(b"HTTP/1.1 " + status), reply)
                self.assertEqual(body, b"", reply)
                self.assertNotIn(b"transfer-encoding", headers.lower())
                if status == b"200":
                    self.assertIn(b"content-length: 19", headers.lower())

        return defer.ensureDeferred(go())

    def test_early_hints_relayed_trailers_dropped_body_intact(self):
        """
        A service's 103 Early Hints reach the client ahead of the answer, through both hops
        (RFC 9110 15.2: a proxy forwards 1xx).  A chunked answer with a trailer arrives whole,
        without the trailer: RFC 9112 7.1.2 lets a recipient that removes the chunked coding
        discard trailers.
        """

        async def go():
            chain = await self._chain(_RawFactory())
            request = self._request(chain, b"GET / HTTP/1.1\r\nConnection: close")
            reply = await _raw(chain.controller_port, request, b"\x00")
            hints, _, rest = reply.partition(b"\r\n\r\n")
            self.assertTrue(hints.startswith(b"HTTP/1.1 103 Early Hints\r\n"), reply)
            self.assertIn(b"link: </style.css>; rel=preload", hints.lower())
            head, _, body = rest.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200 "), reply)
            # It arrived whole at each hop, so it goes on with its length, not chunked.
            self.assertIn(b"content-length: 11\r\n", head.lower() + b"\r\n")
            self.assertEqual(body, b"hello world")

        return defer.ensureDeferred(go())

    def test_body_ended_by_closing(self):
        """
        A service that ends its answer by closing the connection (HTTP/1.0, no length): the
        whole body reaches the client, framed for it, and the next request works.
        """

        async def go():
            factory = _RawFactory()
            factory.protocol = _CloseDelimitedService
            chain = await self._chain(factory)
            for _ in range(2):
                factory.received.clear()
                request = self._request(chain, b"GET / HTTP/1.1\r\nConnection: close")
                reply = await _raw(chain.controller_port, request, b"\x00")
                head, _, body = reply.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 200 "), reply[:200])
                # Framed for the client: chunked while it streams, or with its length when the
                # front door had it whole before relaying it.
                if b"transfer-encoding: chunked" in head.lower():
                    body = _dechunk(body)
                else:
                    self.assertIn(b"content-length: 10000\r\n", head.lower() + b"\r\n")
                self.assertEqual(body, b"old style " * 1000)

        return defer.ensureDeferred(go())

    def test_kept_connection_dropped_by_the_service(self):
        """
        A GET that goes out on a kept connection the service drops is sent again on a new one:
        the client gets its answer, not a 502.
        """

        async def go():
            factory = _OneRequestPerConnectionFactory()
            chain = await self._chain(factory)
            for _ in range(3):
                reply = await _raw(
                    chain.controller_port,
                    self._request(chain, b"GET / HTTP/1.1\r\nConnection: close"),
                    b"\x00",
                )
                self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:300])
                self.assertTrue(reply.endswith(b"hello"), reply[-100:])
            self.assertEqual((factory.connections, factory.answered), (3, 3))

        return defer.ensureDeferred(go())

    def test_unforwardable_address(self):
        """
        An address that could not be a request line to the next hop (a DEL byte, a byte past
        ASCII) gets 400 saying why, not a proxy error; an upgrade too.
        """

        async def go():
            chain = await self._chain(_App())
            for extra in (b"", b"\r\nConnection: Upgrade\r\nUpgrade: websocket"):
                for target in (b"/a\x7fb", b"/a\xffb"):
                    request = self._request(chain, b"GET " + target + b" HTTP/1.1" + extra)
                    reply = await _raw(chain.controller_port, request, b"url")
                    self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply[:300])
                    self.assertIn(b"Invalid char in url", reply)

        return defer.ensureDeferred(go())

    def test_chunked_upload_with_trailer(self):
        """A chunked upload with a trailer field reaches the service whole."""

        async def go():
            app = _App()
            chain = await self._chain(app)
            body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n"
            request = self._request(
                chain, b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked", body=body
            )
            reply = await _raw(chain.controller_port, request, b"got 11 bytes")
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
            self.assertEqual(app.uploads, [b"hello world"])

        return defer.ensureDeferred(go())

    def test_options_request(self):
        """OPTIONS (a CORS preflight, say) reaches the service like any request."""

        async def go():
            app = _App()
            chain = await self._chain(app)
            request = self._request(chain, b"OPTIONS /x HTTP/1.1\r\nConnection: close")
            reply = await _raw(chain.controller_port, request, b"\x00")
            self.assertTrue(reply.startswith(b"HTTP/1.1 204 "), reply)
            self.assertIn(b"access-control-allow-methods: get, post", reply.lower())

        return defer.ensureDeferred(go())

    def test_https_service_port(self):
        """A port declared "protocol": "https" is reached over TLS (self-signed)."""

        async def go():
            chain = await self._chain(_App(), published={"protocol": "https"}, tls=True)
            reply = await _raw(
                chain.controller_port, self._request(chain, b"GET / HTTP/1.1"), b"from the app"
            )
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)

        return defer.ensureDeferred(go())

    def test_headers_too_large(self):
        """Request headers over the limit get 431 and the connection closes."""

        async def go():
            chain = await self._chain(_App(), limits=Limits(max_header_bytes=4096))
            big = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 5000
            reply = await _raw(chain.controller_port, self._request(chain, big), b"\x00")
            self.assertTrue(reply.startswith(b"HTTP/1.1 431 "), reply)
            many = b"GET / HTTP/1.1" + b"\r\nX-Many: abcdefghij" * 400
            reply = await _raw(chain.controller_port, self._request(chain, many), b"\x00")
            self.assertTrue(reply.startswith(b"HTTP/1.1 431 "), reply)

        return defer.ensureDeferred(go())

    def test_slow_headers_time_out(self):
        """A client that trickles its headers past the deadline gets 408 and is closed."""

        async def go():
            chain = await self._chain(_App(), limits=Limits(request_headers=0.5))
            reply = await _raw(chain.controller_port, b"GET / HTTP/1.1\r\nHost: x", b"\x00")
            self.assertTrue(reply.startswith(b"HTTP/1.1 408 "), reply)

        return defer.ensureDeferred(go())

    def test_connections_per_container_are_capped(self):
        """Past the cap a request gets 503 with Retry-After; a slot frees when a tunnel closes."""

        async def go():
            echo = EchoFactory()
            chain = await self._chain(echo, limits=Limits(max_connections_per_container=1))
            client = Client(chain.host.decode(), "/ws", headers=[(b"cookie", chain.cookie)])
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", chain.controller_port)
            await connectProtocol(endpoint, client)
            await client.accepted
            request = self._request(chain, b"GET / HTTP/1.1\r\nConnection: close")
            reply = await _raw(chain.controller_port, request, b"\x00")
            self.assertTrue(reply.startswith(b"HTTP/1.1 503 "), reply)
            self.assertIn(b"retry-after", reply.lower())
            client.transport.loseConnection()
            await client.closed
            await chain.wait_idle()
            reply = await _raw(chain.controller_port, request, b"\x00")
            self.assertFalse(reply.startswith(b"HTTP/1.1 503 "), reply)

        return defer.ensureDeferred(go())

    def test_client_leaving_before_the_answer_leaves_no_closing_connection_pooled(self):
        """
        A client that leaves before the service answers makes the controller stop that
        response, closing its connection to the gateway; when the answer had already arrived
        whole, Twisted still called that connection reusable.  It must not be pooled: the next
        request sent on it, another user's perhaps, would fail with 502.
        """

        async def go():
            service = _Held()
            chain = await self._chain(service)
            leaving = protocol.Protocol()
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", chain.controller_port)
            await connectProtocol(endpoint, leaving)
            leaving.transport.write(self._request(chain, b"GET /held HTTP/1.1"))
            await service.arrived
            leaving.transport.loseConnection()
            # Give the controller a moment to see the client go.
            await deferLater(reactor, 0.2)
            service.answer()
            await chain.wait_idle()
            pool = chain.controller._gateways.pool
            pooled = pool.idle_connections()
            self.assertEqual([c for c in pooled if closing(c.transport)], [])
            reply = await _raw(
                chain.controller_port,
                self._request(chain, b"GET /fresh HTTP/1.1\r\nConnection: close"),
                b"fresh answer",
            )
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)

        return defer.ensureDeferred(go())

    def test_refused_upgrade_streaming_forever_ends_with_its_client(self):
        """
        An upgrade the service answers with an endless 200 (events) is relayed as it streams;
        when the client leaves, both hops close the stream and give the connection slot back.
        """

        async def go():
            events = _Events()
            chain = await self._chain(events)
            sock = socket.create_connection(("127.0.0.1", chain.controller_port), timeout=20)
            self.addCleanup(sock.close)
            head = self._request(
                chain,
                b"GET /events HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            )
            reply = await exchange(sock, head, b"data: first")
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
            self.assertEqual(chain.controller._slots.open(chain.container_uuid), 1)
            sock.close()
            # The service sees its stream's connection go: nothing is left relaying it.
            await self.assertFailure(events.finished[-1], Exception)
            await chain.wait_idle()

        return defer.ensureDeferred(go())

    def test_idle_tunnel_is_closed(self):
        """A WebSocket that carries nothing for the tunnel idle timeout is closed."""

        async def go():
            echo = EchoFactory()
            chain = await self._chain(echo, limits=Limits(tunnel_idle=0.5))
            client = Client(chain.host.decode(), "/ws", headers=[(b"cookie", chain.cookie)])
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", chain.controller_port)
            await connectProtocol(endpoint, client)
            await client.accepted
            self.assertIsNone(await client.closed)

        return defer.ensureDeferred(go())


del ssl
