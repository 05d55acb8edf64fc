"""
Tests for L{arvproxy.streaming.send_now} and the two places that use it: a hop sends a finished
message to its socket at once, not when the reactor next turns.

Real loopback sockets and the real reactor.  Each check runs between two reactor turns (inside
one callback), so data that reaches the peer's socket there can only have been sent by the code
under test; the test first shows that without it the data would still be queued.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from arvproxy.hopclient import HopPool
from arvproxy.httpserver import ProxySite, StreamingRequest
from arvproxy.streaming import EAGER_WRITE_MAX, StreamingEndpoint, send_now, tune_transport
from arvproxy.tlsidentity import server_context_factory
from tests.chain import read_until

WAIT = 2.0  # seconds a check waits for bytes that should already be there


def arrived(sock: socket.socket, size: int = 65536) -> bytes:
    """What C{sock} can read within L{WAIT} seconds, without the reactor turning."""
    readable, _, _ = select.select([sock], [], [], WAIT)
    return sock.recv(size) if readable else b""


def read_count(sock: socket.socket, size: int) -> bytes:
    """Read C{size} bytes from a blocking socket (in a thread: it blocks), or until it closes."""
    received = b""
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    return received


def nothing_yet(sock: socket.socket) -> bool:
    """Whether C{sock} has nothing to read right now."""
    readable, _, _ = select.select([sock], [], [], 0.05)
    return not readable


@implementer(IHandshakeListener)
class _Accepted(Protocol):
    factory: _AcceptFactory

    def connectionMade(self) -> None:
        if not self.factory.tls:
            self.factory.accepted.callback(self)

    def handshakeCompleted(self) -> None:
        if not self.factory.accepted.called:  # Already, when TLS was started later.
            self.factory.accepted.callback(self)


class _AcceptFactory(Factory):
    """Fires C{accepted} with the server's protocol once connected (and TLS is up)."""

    protocol = _Accepted

    def __init__(self, tls: bool) -> None:
        self.tls = tls
        self.accepted: defer.Deferred[_Accepted] = defer.Deferred()


class SendNowTests(TestCase):
    """L{send_now} on a Twisted server connection, read by a plain socket."""

    async def _pair(self, tls: str = "") -> tuple[Any, socket.socket]:
        """
        A Twisted server connection and the client socket at its other end: plain, or TLS as the
        gateway listens (C{"wrapped"}: a TLS factory around the site), as an C{ssl:} endpoint
        does (C{"listenSSL"}), or started on a plain connection (C{"startTLS"}).
        """
        factory = _AcceptFactory(tls not in ("", "startTLS"))
        options = server_context_factory("5" * 64)
        if tls == "listenSSL":
            port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        else:
            wrapped = TLSMemoryBIOFactory(options, False, factory) if tls == "wrapped" else factory
            port = reactor.listenTCP(0, wrapped, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        if tls == "startTLS":
            # TLS started on a plain connection: the socket's own write encrypts.
            accepted = await factory.accepted
            accepted.transport.startTLS(options)
            factory.accepted = defer.succeed(accepted)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # The key is not what is under test here.
            # The handshake needs the reactor to run: it blocks a thread, not the reactor.
            sock = await threads.deferToThread(context.wrap_socket, sock)
        self.addCleanup(sock.close)
        server = await factory.accepted
        self.addCleanup(server.transport.abortConnection)
        return server, sock

    async def test_plain_socket(self) -> None:
        server, sock = await self._pair()
        server.transport.write(b"first")
        self.assertTrue(nothing_yet(sock), "Twisted sent a write before its next turn")
        send_now(server.transport)
        self.assertEqual(arrived(sock), b"first")

    async def test_tls(self) -> None:
        """A TLS transport's gathered writes leave in one record, at once."""
        for tls in ("wrapped", "listenSSL"):
            server, sock = await self._pair(tls)
            server.transport.write(b"head ")
            server.transport.write(b"body")
            sock.setblocking(False)
            with self.assertRaises(ssl.SSLWantReadError, msg=tls):
                sock.recv(100)
            send_now(server.transport)
            sock.setblocking(True)
            sock.settimeout(WAIT)
            self.assertEqual(sock.recv(100), b"head body", tls)

    async def test_tuned_write_leaves_at_once(self) -> None:
        """A tuned socket sends a write (or a sequence, joined) without waiting for the reactor."""
        server, sock = await self._pair()
        tune_transport(server.transport)
        server.transport.write(b"first")
        self.assertEqual(arrived(sock), b"first")
        server.transport.writeSequence([b"a", b"b", b"c"])
        self.assertEqual(arrived(sock), b"abc")

    async def test_tuned_tls_writes_leave_encrypted(self) -> None:
        """
        Through each kind of TLS transport, a tuned connection's writes reach the peer's TLS
        layer whole, as TLS (a write that skipped the encryption would break the peer's TLS).
        """
        for tls in ("wrapped", "listenSSL", "startTLS"):
            server, sock = await self._pair(tls)
            tune_transport(server.transport)
            server.transport.write(b"first")
            server.transport.write(b"x" * (EAGER_WRITE_MAX + 1))
            send_now(server.transport)
            sock.settimeout(WAIT)
            received = await threads.deferToThread(read_count, sock, EAGER_WRITE_MAX + 6)
            self.assertEqual(received, b"first" + b"x" * (EAGER_WRITE_MAX + 1), tls)

    async def test_tuned_tls_write_leaves_at_once(self) -> None:
        """A small write on a tuned TLS connection is encrypted and sent without waiting."""
        server, sock = await self._pair("wrapped")
        # What the handshake left (session tickets) goes first, when the reactor turns.
        await deferLater(reactor, 0.1, lambda: None)
        tune_transport(server.transport)
        server.transport.write(b"frame")
        sock.settimeout(WAIT)
        self.assertEqual(sock.recv(100), b"frame")

    async def test_tuned_large_write_waits(self) -> None:
        """A larger write (a piece of a stream) waits for the reactor, to leave with the rest."""
        server, sock = await self._pair()
        tune_transport(server.transport)
        server.transport.write(b"x" * (EAGER_WRITE_MAX + 1))
        self.assertTrue(nothing_yet(sock))
        send_now(server.transport)
        self.assertEqual(
            len(await threads.deferToThread(read_count, sock, EAGER_WRITE_MAX + 1)),
            EAGER_WRITE_MAX + 1,
        )

    async def test_tuning_twice_wraps_once(self) -> None:
        """A transport tuned twice (two wrappers over one socket) writes through one wrapper."""
        for tls in ("", "wrapped"):
            server, sock = await self._pair(tls)
            tune_transport(server.transport)
            layers = [server.transport, getattr(server.transport, "transport", None)]
            writes = [layer.__dict__.get("write") for layer in layers if layer is not None]
            tune_transport(server.transport)
            self.assertEqual(
                [layer.__dict__.get("write") for layer in layers if layer is not None], writes, tls
            )

    async def test_tuned_write_behind_queued_data(self) -> None:
        """Behind bytes the socket could not take, a write is queued: nothing is reordered."""
        server, sock = await self._pair()
        tune_transport(server.transport)
        sent = b""
        piece = bytes(range(256)) * 256
        while not server.transport._tempDataBuffer:  # Until the socket is full.
            server.transport.write(piece)
            sent += piece
        # Make room in the socket without letting the reactor send what is queued.
        sock.setblocking(False)
        received = b""
        with contextlib.suppress(BlockingIOError):
            while True:
                received += sock.recv(1 << 20)
        sock.setblocking(True)
        server.transport.write(b"tail")
        received += await threads.deferToThread(read_until, sock, b"tail")
        self.assertEqual(received, sent + b"tail")

    async def test_nothing_queued(self) -> None:
        server, sock = await self._pair()
        send_now(server.transport)
        self.assertTrue(nothing_yet(sock))
        self.assertTrue(server.transport.connected)

    async def test_closing_connection_left_to_the_reactor(self) -> None:
        """A connection asked to close still sends everything, then closes, as usual."""
        server, sock = await self._pair()
        server.transport.write(b"last words")
        server.transport.loseConnection()
        send_now(server.transport)
        self.assertTrue(nothing_yet(sock))
        self.assertEqual(await threads.deferToThread(read_to_end, sock), b"last words")

    async def test_pull_producer_left_to_the_reactor(self) -> None:
        """A pull producer is resumed by the reactor, once its write has been sent."""
        server, sock = await self._pair()
        producer = _PullProducer(server.transport)
        server.transport.registerProducer(producer, False)  # Asks for a first write at once.
        server.transport.write(b"part 1")
        send_now(server.transport)
        self.assertTrue(nothing_yet(sock))
        self.assertEqual(producer.resumed, 1)
        await producer.more
        self.assertEqual(arrived(sock), b"part 1")


@implementer(IPullProducer)
class _PullProducer:
    """Counts its resumptions; fires C{more} when asked again after the first."""

    def __init__(self, transport: Any) -> None:
        self.resumed = 0
        self.more: defer.Deferred[None] = defer.Deferred()
        self._transport = transport

    def resumeProducing(self) -> None:
        self.resumed += 1
        if self.resumed == 2:
            self._transport.unregisterProducer()
            self.more.callback(None)

    def stopProducing(self) -> None:
        pass


class MessageEndTests(TestCase):
    """Both hops send each finished message at once: a response, and a request's head."""

    async def test_response_sent_when_finished(self) -> None:
        seen: list[bytes] = []
        client: list[socket.socket] = []

        async def handler(request: StreamingRequest) -> None:
            request.setHeader(b"content-length", b"2")
            request.write(b"ok")
            request.finish()
            # Still inside the reactor's turn that read the request.
            seen.append(arrived(client[0]))

        port = reactor.listenTCP(0, ProxySite(handler, reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(sock.close)
        client.append(sock)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        while not seen:
            await threads.deferToThread(lambda: None)
        self.assertTrue(seen[0].startswith(b"HTTP/1.1 200 "), seen[0])
        self.assertTrue(seen[0].endswith(b"\r\n\r\nok"), seen[0])

    async def test_request_head_sent_at_once(self) -> None:
        """A pooled connection sends a request's head while the request is being made."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.addCleanup(listener.close)
        endpoint = StreamingEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getsockname()[1])
        )
        pool = HopPool(reactor, idle_timeout=10)
        self.addCleanup(pool.closeCachedConnections)

        first = pool.request("upstream", endpoint, b"GET", b"/1", Headers(), None)
        upstream, _ = await threads.deferToThread(listener.accept)
        self.addCleanup(upstream.close)
        await threads.deferToThread(read_until, upstream, b"\r\n\r\n")
        upstream.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        await first
        # The rest of that answer (its end, the connection back in the pool) is handled once
        # this coroutine lets the reactor go on.
        await threads.deferToThread(lambda: None)
        # No Nagle delay on the client's socket either (tune_transport; Twisted's HTTP server
        # sets it on its own).
        (connection,) = pool.idle_connections()
        self.assertTrue(connection.transport.getTcpNoDelay())

        second = pool.request("upstream", endpoint, b"GET", b"/2", Headers(), None)
        self.assertTrue(arrived(upstream).startswith(b"GET /2 HTTP/1.1\r\n"))
        upstream.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        await second


def read_to_end(sock: socket.socket) -> bytes:
    """Read (blocking: call it in a thread) until the peer closes; fail after L{WAIT} seconds."""
    sock.settimeout(WAIT)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
