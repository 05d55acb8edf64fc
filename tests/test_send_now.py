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

from OpenSSL import SSL
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from arvproxy.hopclient import HopPool
from arvproxy.httpserver import ProxySite, StreamingRequest
from arvproxy.streaming import (
    EAGER_SEND_MAX,
    EAGER_WRITE_MAX,
    SEND_BATCH,
    TLS_BATCH,
    StreamingEndpoint,
    send_now,
    tune_transport,
)
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


async def next_turn() -> None:
    """Let the reactor end its turn (and send what tuned sockets hold)."""
    await deferLater(reactor, 0, lambda: None)


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

    def __init__(self, tls: bool, protocol: type[_Accepted] = _Accepted) -> None:
        self.tls = tls
        self.protocol = protocol
        self.accepted: defer.Deferred[_Accepted] = defer.Deferred()


async def connected_pair(
    case: TestCase, tls: str = "", protocol: type[_Accepted] = _Accepted, roomy: bool = False
) -> tuple[Any, socket.socket]:
    """
    A Twisted server connection (a C{protocol}) and the client socket at its other end: plain,
    or TLS as the gateway listens (C{"wrapped"}: a TLS factory around the site), as an C{ssl:}
    endpoint does (C{"listenSSL"}), or started on a plain connection (C{"startTLS"}).

    @param roomy: give both sockets 1 MiB buffers from the start (so that what the client sends
        to a server that does not read waits in the server's socket, to be read at once).
    """
    factory = _AcceptFactory(tls not in ("", "startTLS"), protocol)
    options = server_context_factory("5" * 64)
    if tls == "listenSSL":
        port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
    else:
        wrapped = TLSMemoryBIOFactory(options, False, factory) if tls == "wrapped" else factory
        port = reactor.listenTCP(0, wrapped, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    sock = socket.socket()
    if roomy:
        port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.connect(("127.0.0.1", port.getHost().port))
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
    case.addCleanup(sock.close)
    server = await factory.accepted
    case.addCleanup(server.transport.abortConnection)
    return server, sock


class SendNowTests(TestCase):
    """L{send_now} on a Twisted server connection, read by a plain socket."""

    async def _pair(self, tls: str = "") -> tuple[Any, socket.socket]:
        return await connected_pair(self, tls)

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

    async def test_tuned_write_leaves_this_turn(self) -> None:
        """
        A tuned socket sends a write (or a sequence, joined) when the reactor's turn ends, with
        what followed it in the turn, never queued for the socket to be reported writable.
        """
        server, sock = await self._pair()
        tune_transport(server.transport)
        server.transport.write(b"first")
        server.transport.writeSequence([b"a", b"b", b"c"])
        self.assertTrue(nothing_yet(sock), "sent before the turn ended")
        self.assertEqual(server.transport._tempDataBuffer, [])
        self.assertNotIn(server.transport, reactor.getWriters())
        await next_turn()
        self.assertEqual(arrived(sock), b"firstabc")

    async def test_batch_of_sockets_leaves_at_once(self) -> None:
        """When SEND_BATCH tuned sockets hold a message, all of them send without waiting."""
        pairs = [await self._pair() for _ in range(SEND_BATCH)]
        for i, (server, _) in enumerate(pairs):
            tune_transport(server.transport)
            server.transport.write(b"message %d" % (i,))
        self.assertEqual(
            [arrived(sock) for _, sock in pairs],
            [b"message %d" % (i,) for i in range(SEND_BATCH)],
        )

    async def test_messages_held_by_one_socket_count_towards_the_batch(self) -> None:
        """
        SEND_BATCH small messages held by one socket (a carrier's, say) leave without waiting
        for the turn's end; the larger pieces of a stream do not count, and wait.
        """
        cases = [(EAGER_WRITE_MAX, True), (EAGER_WRITE_MAX + 1, False)]
        for size, sent_at_once in cases:
            server, sock = await connected_pair(self, roomy=True)
            tune_transport(server.transport)
            messages = [bytes([65 + i]) * size for i in range(SEND_BATCH)]
            for message in messages:
                server.transport.write(message)
            if sent_at_once:
                # Read without letting the reactor turn: they left already.
                self.assertEqual(arrived(sock, size * SEND_BATCH), b"".join(messages), size)
            else:
                self.assertTrue(nothing_yet(sock), size)
                await next_turn()
                self.assertEqual(
                    await threads.deferToThread(read_count, sock, size * SEND_BATCH),
                    b"".join(messages),
                )

    async def test_one_failed_send_keeps_no_other(self) -> None:
        """A held message that fails to go (its socket raises) holds up no other socket's."""
        (broken, _), (server, sock) = await self._pair(), await self._pair()
        for pair in (broken, server):
            tune_transport(pair.transport)

        def fails(data: bytes) -> int:
            raise RuntimeError("broken socket")

        broken.transport.writeSomeData = fails
        broken.transport.write(b"lost")
        server.transport.write(b"delivered")
        await next_turn()
        self.assertEqual(arrived(sock), b"delivered")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_write_of_text_refused_at_once(self) -> None:
        """
        A write that is not bytes raises Twisted's TypeError to its caller, as on an untuned
        socket, and what the socket held before it still goes.
        """
        server, sock = await self._pair()
        tune_transport(server.transport)
        server.transport.write(b"held")
        with self.assertRaises(TypeError):
            server.transport.write("text")  # type: ignore[arg-type]
        await next_turn()
        self.assertEqual(arrived(sock), b"held")
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_held_write_then_close(self) -> None:
        """
        A connection closed in the turn of a write sends it first, then closes: also from a
        timed call, after which the reactor would meet the closing socket before the turn's end.
        """
        server, sock = await self._pair()
        tune_transport(server.transport)

        def last_words() -> None:
            server.transport.write(b"last words")
            server.transport.loseConnection()

        reactor.callLater(0, last_words)
        self.assertEqual(await threads.deferToThread(read_to_end, sock), b"last words")

    async def test_held_write_then_abort(self) -> None:
        """A connection aborted in the turn of a write never sends it, nor queues it."""
        server, sock = await self._pair()
        tune_transport(server.transport)
        sent: list[bytes] = []
        server.transport.writeSomeData = sent.append
        server.transport.write(b"never")
        server.transport.abortConnection()
        await next_turn()
        self.assertEqual((sent, server.transport._tempDataBuffer), ([], []))
        self.assertTrue(server.transport.disconnected)

    async def test_held_writes_keep_their_order(self) -> None:
        """Writes of any size in one turn behind a held one arrive in order, all of them."""
        server, sock = await connected_pair(self, roomy=True)
        tune_transport(server.transport)
        big = PAYLOAD[: EAGER_SEND_MAX + 1]
        writes = [b"head", big, b"middle", big, big, b"tail"]
        for data in writes:
            server.transport.write(data)
        expected = b"".join(writes)
        received = await threads.deferToThread(read_count, sock, len(expected))
        self.assertEqual(received, expected)

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

    async def test_tuned_tls_write_leaves_this_turn(self) -> None:
        """A small write on a tuned TLS connection is encrypted and sent as the turn ends."""
        server, sock = await self._pair("wrapped")
        # What the handshake left (session tickets) goes first, when the reactor turns.
        await deferLater(reactor, 0.1, lambda: None)
        tune_transport(server.transport)
        server.transport.write(b"frame")
        self.assertNotIn(server.transport.transport, reactor.getWriters())
        await next_turn()
        sock.settimeout(WAIT)
        self.assertEqual(sock.recv(100), b"frame")

    async def test_tuned_batch_leaves_this_turn(self) -> None:
        """A batch of a stream (TLS records, or their plaintext) is never queued."""
        server, sock = await connected_pair(self, roomy=True)  # Room for all of it at once.
        tune_transport(server.transport)
        server.transport.write(PAYLOAD[:EAGER_SEND_MAX])
        self.assertEqual(server.transport._tempDataBuffer, [])
        self.assertNotIn(server.transport, reactor.getWriters())
        sock.settimeout(WAIT)
        received = await threads.deferToThread(read_count, sock, EAGER_SEND_MAX)
        self.assertEqual(received, PAYLOAD[:EAGER_SEND_MAX])

    async def test_tuned_large_write_waits(self) -> None:
        """A larger write waits for the reactor, to leave with the rest."""
        server, sock = await self._pair()
        tune_transport(server.transport)
        server.transport.write(b"x" * (EAGER_SEND_MAX + 1))
        self.assertTrue(nothing_yet(sock))
        self.assertIn(server.transport, reactor.getWriters())
        send_now(server.transport)
        self.assertEqual(
            len(await threads.deferToThread(read_count, sock, EAGER_SEND_MAX + 1)),
            EAGER_SEND_MAX + 1,
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


# A stream's worth: 64 full records and a few bytes, none of it repeating within a record.
PAYLOAD = bytes(range(251)) * 4178 + b"tail"
RECORD = 16 * 1024


class _Recorder(_Accepted):
    """A tuned connection that records what it receives and how it ended."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        # Whether each chunk arrived while the socket was already closing.
        self.late: list[bool] = []
        self.ended: defer.Deferred[tuple[bytes, Failure]] = defer.Deferred()

    def connectionMade(self) -> None:
        tune_transport(self.transport)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.late.append(self.transport.transport.disconnecting)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended.callback((b"".join(self.chunks), reason))


class _EarlyWriter(_Recorder):
    """Writes a stream as soon as it is connected, before the TLS handshake."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(PAYLOAD)


class TLSBatchTests(TestCase):
    """
    A tuned TLS layer encrypts a large write, and hands on what it decrypts, a few records at a
    time (C{streaming._tls_in_batches}), with Twisted's handling of everything else.
    """

    async def _paused_pair(self, protocol: type[_Recorder] = _Recorder) -> Any:
        """A TLS pair whose server reads nothing until resumed; roomy socket buffers."""
        server, sock = await connected_pair(self, "wrapped", protocol, roomy=True)
        server.transport.pauseProducing()
        return server, sock

    async def test_large_write_leaves_in_batches(self) -> None:
        """A large write goes to the socket a batch of records at a time, not record by record."""
        server, sock = await connected_pair(self, "wrapped", _Recorder)
        below = server.transport.transport
        writes: list[int] = []
        write = below.write

        def counting(data: bytes) -> None:
            writes.append(len(data))
            write(data)

        below.write = counting
        server.transport.write(b"small ")
        server.transport.write(PAYLOAD)
        server.transport.write(b" end")
        send_now(server.transport)
        sock.settimeout(WAIT)
        received = await threads.deferToThread(read_count, sock, len(PAYLOAD) + 10)
        self.assertEqual(received, b"small " + PAYLOAD + b" end")
        # Record by record, that would have been 66 writes.
        self.assertLessEqual(len(writes), len(PAYLOAD) // TLS_BATCH + 3, writes)
        self.assertLessEqual(max(writes), TLS_BATCH + 4096)

    async def test_write_larger_than_gathering_keeps_order(self) -> None:
        """
        A write larger than Twisted's gathering holds is encrypted at once, after what was
        gathered before it (which it would otherwise have copied into the gathering first).
        """
        server, sock = await connected_pair(self, "wrapped", _Recorder, roomy=True)
        tune_transport(server.transport)
        aggregator = server.transport._aggregator
        encrypted: list[bytes] = []
        encrypt = server.transport._write

        def spy(data: bytes) -> None:
            encrypted.append(data)
            encrypt(data)

        server.transport._write = spy
        medium = b"m" * (EAGER_WRITE_MAX + 1)  # Gathered: larger than what goes at once.
        large = PAYLOAD[: aggregator.MAX_BUFFER_SIZE + 1]
        server.transport.write(medium)
        server.transport.write(large)
        self.assertEqual(encrypted, [medium, large])
        self.assertIs(encrypted[1], large)  # Not a copy.
        server.transport.write(b" end")
        send_now(server.transport)
        sock.settimeout(WAIT)
        received = await threads.deferToThread(read_count, sock, len(medium) + len(large) + 4)
        self.assertEqual(received, medium + large + b" end")

    async def test_records_handed_on_in_batches(self) -> None:
        """Five records read at once reach the protocol as a batch of four, then the fifth."""
        server, sock = await self._paused_pair()
        sent = PAYLOAD[: 5 * RECORD]
        await threads.deferToThread(sock.sendall, sent)  # Five records, in one read.
        server.transport.resumeProducing()
        while sum(map(len, server.chunks)) < len(sent):
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([len(chunk) for chunk in server.chunks], [TLS_BATCH, RECORD])
        self.assertEqual(b"".join(server.chunks), sent)

    async def test_write_before_handshake(self) -> None:
        """A large write made before the handshake waits for it, and arrives whole."""
        _, sock = await connected_pair(self, "wrapped", _EarlyWriter)
        sock.settimeout(WAIT)
        received = await threads.deferToThread(read_count, sock, len(PAYLOAD))
        self.assertEqual(received, PAYLOAD)

    async def test_encryption_error_ends_the_connection(self) -> None:
        """An OpenSSL error while a large write is encrypted ends the connection with it."""
        server, _ = await connected_pair(self, "wrapped", _Recorder)

        def refuse(data: bytes) -> int:
            raise SSL.Error([("SSL routines", "", "simulated failure")])

        server.transport._tlsConnection.send = refuse
        server.transport.write(PAYLOAD)
        _, reason = await server.ended
        self.assertTrue(reason.check(SSL.Error), reason)

    async def test_data_before_tls_close_arrives_first(self) -> None:
        """What was sent before a TLS close, read together with it, arrives before the end."""
        server, sock = await self._paused_pair()
        await threads.deferToThread(sock.sendall, PAYLOAD[:40000])
        sock.setblocking(False)
        with self.assertRaises(ssl.SSLWantReadError):
            sock.unwrap()  # Sends close_notify; the answer will not come while paused.
        server.transport.resumeProducing()
        received, reason = await server.ended
        self.assertEqual(received, PAYLOAD[:40000])
        self.assertNotIn(True, server.late, "data handed on after the connection began to close")
        self.assertTrue(reason.check(ConnectionDone), reason)

    async def test_data_before_broken_record_arrives_first(self) -> None:
        """What was sent before a record that fails to decrypt arrives, then the TLS error."""
        server, sock = await self._paused_pair()
        await threads.deferToThread(sock.sendall, PAYLOAD[:40000])
        # An application-data record that cannot decrypt, sent past the TLS layer.
        socket.socket.send(sock, b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        server.transport.resumeProducing()
        received, reason = await server.ended
        self.assertEqual(received, PAYLOAD[:40000])
        self.assertNotIn(True, server.late, "data handed on after the connection began to close")
        self.assertTrue(reason.check(SSL.Error), reason)


class MessageEndTests(TestCase):
    """
    Both hops send each finished message in the reactor's turn that finished it (never queued
    for the socket to be reported writable): a response, and a request's head.
    """

    async def test_response_sent_when_finished(self) -> None:
        seen: list[bytes] = []
        client: list[socket.socket] = []

        async def handler(request: StreamingRequest) -> None:
            request.setHeader(b"content-length", b"2")
            request.write(b"ok")
            request.finish()
            # Still inside the reactor's turn that read the request: it leaves when it ends.
            transport = request.channel.transport
            self.assertEqual(transport._tempDataBuffer, [])
            self.assertNotIn(transport, reactor.getWriters())
            await next_turn()
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
        self.assertEqual(connection.transport._tempDataBuffer, [])
        self.assertNotIn(connection.transport, reactor.getWriters())
        await next_turn()
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
