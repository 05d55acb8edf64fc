"""
The controller's connections to gateways: a request the pool sends once more (its kept
connection was lost) is signed again, and what the pool gives up with becomes the right error.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import RequestNotSent, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from arvproxy import policy
from arvproxy.carrier import (
    CLOSE,
    DATA,
    HEADER,
    STREAM_WINDOW,
    WINDOW_HEADER,
    WINDOW_SIZE,
    Carrier,
)
from arvproxy.controller.proxy import CARRIED_BODY_MAX, GatewayConnector
from arvproxy.errors import BadGateway
from arvproxy.testing import MemoryEndpoint
from tests.test_hopclient import Upload

SECRET = "ab" * 32
UUID = "zzzzz-dz642-000000000000001"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class _FailingPool:
    """Fails every request with C{error}, as the pool does once it has given up."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.sent = 0

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self.sent += 1
        return defer.fail(self.error)


class _Carriers:
    """
    Stands in for L{GatewayConnector.carrier}: the front door's ends of carriers whose
    connections are C{StringTransport}s.  A new carrier is ready only once L{ready} is called,
    as a real one is once its handshake is answered; an open one is handed out at once.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.opened: list[tuple[Carrier, StringTransport]] = []
        self._waiting: list[defer.Deferred[Carrier]] = []

    def __call__(self, *gateway: str) -> defer.Deferred[Carrier]:
        if self.opened and self.opened[-1][0].lost is None and not self.opened[-1][0].closing:
            return defer.succeed(self.opened[-1][0])
        tunnels = Carrier(self.clock.callLater)
        transport = StringTransport()
        tunnels.makeConnection(transport)
        self.opened.append((tunnels, transport))
        waiting: defer.Deferred[Carrier] = defer.Deferred()
        self._waiting.append(waiting)
        return waiting

    def ready(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.opened[-1][0])

    def lose(self) -> None:
        """The gateway closes the current carrier."""
        self.opened[-1][0].connectionLost(Failure(ConnectionDone()))
        self.clock.advance(0)  # Its streams' protocols learn of it in the next turn.

    def sent(self, carrier: int, stream_id: int) -> bytes:
        """What the front door sent on a stream of a carrier."""
        data = self.opened[carrier][1].value()
        sent, offset = b"", 0
        while offset < len(data):
            kind, frame_id, length = HEADER.unpack_from(data, offset)
            offset += HEADER.size + length
            if kind == DATA and frame_id == stream_id:
                sent += data[offset - length : offset]
        return sent

    def answer(self, stream_id: int, data: bytes) -> None:
        """The gateway answers on a stream of the current carrier."""
        self.opened[-1][0].dataReceived(HEADER.pack(DATA, stream_id, len(data)) + data)


def _signature(request: bytes) -> bytes:
    """The signature in a request."""
    [line] = [
        line for line in request.split(b"\r\n") if line.lower().startswith(policy.SIGNATURE + b":")
    ]
    return line.split(b":", 1)[1].strip()


class RetryTests(SynchronousTestCase):
    def connector(self) -> GatewayConnector:
        clock = MemoryReactorClock()
        clock.advance(1_700_000_000)
        return GatewayConnector(clock)

    def send(
        self, connector: GatewayConnector, method: bytes, body: Any = None, told: Any = None
    ) -> Any:
        headers = Headers()
        connector.sign(headers, SECRET, method, b"/")
        return defer.ensureDeferred(
            connector.request(UUID, "127.0.0.1:9", SECRET, method, b"/", headers, body, told)
        )

    def carried(self) -> tuple[GatewayConnector, _Carriers]:
        connector = self.connector()
        carriers = _Carriers(connector._reactor)
        connector.carrier = carriers  # type: ignore[assignment,method-assign]
        return connector, carriers

    def test_resent_request_is_signed_again(self) -> None:
        """
        A GET whose kept stream the gateway closed (with its carrier) goes again on a new one,
        by the pool, with a fresh, valid signature and the same receiver of interim answers.
        """
        connector, carriers = self.carried()
        self.send(connector, b"GET")
        carriers.ready()
        carriers.answer(1, OK)  # Its stream is kept for the next request.
        told: list[int] = []
        d = self.send(connector, b"GET", told=lambda code, phrase, headers: told.append(code))
        carriers.lose()
        carriers.ready()
        self.assertEqual(len(carriers.opened), 2)
        carriers.answer(1, b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(told, [103])
        [first, lost] = carriers.sent(0, 1).split(b"\r\n\r\n")[:2]
        lost, resent = _signature(lost), _signature(carriers.sent(1, 1))
        self.assertNotEqual(_signature(first), lost)
        self.assertNotEqual(lost, resent)
        nonces = policy.NonceCache(300)
        binding = policy.request_binding(b"GET", b"/", Headers())
        for signature in (lost, resent):
            policy.verify([signature], SECRET, 1_700_000_000, nonces, binding)

    def test_lost_carrier_table(self) -> None:
        """
        A carrier lost before the answer: which requests on it go again on a new carrier.  A
        bodiless GET or HEAD on a stream of a carrier that was open already does (the gateway
        may have closed it just before); one on a new carrier, one with a body, one of a method
        that is not safe to send twice, and one sent again already do not: their client gets
        502.
        """
        cases = [
            # (method, body, on a carrier open already, lost again after the resend, resent)
            (b"GET", None, True, False, True),
            (b"HEAD", None, True, False, True),
            (b"GET", None, False, False, False),
            (b"GET", None, True, True, True),
            (b"POST", None, True, False, False),
            (b"GET", Upload(1), True, False, False),
        ]
        for method, body, open_already, lost_again, resent in cases:
            case = (method, body, open_already, lost_again)
            connector, carriers = self.carried()
            busy = None
            if open_already:
                busy = self.send(connector, b"GET")  # On stream 1: the next takes a new one.
                carriers.ready()
            d = self.send(connector, method, body)
            carriers.ready()
            carriers.lose()
            carriers.ready()
            self.assertEqual(len(carriers.opened), 2 if resent else 1, case)
            if resent and lost_again:
                carriers.lose()
                carriers.ready()
                self.assertEqual(len(carriers.opened), 2, case)
            if resent and not lost_again:
                carriers.answer(1, OK)
                self.assertEqual(self.successResultOf(d).code, 200, case)
            else:
                failure = self.failureResultOf(d, BadGateway)
                self.assertIn("connection", failure.value.message, case)
            if busy is not None:
                # Sent on a new carrier: given up with it.
                self.failureResultOf(busy, BadGateway)

    def test_routing_table(self) -> None:
        """
        Which requests ride a carrier's stream, and which get a connection of their own: those
        with a body larger than CARRIED_BODY_MAX, or of unknown length.
        """
        cases = [
            (None, True),
            (0, True),
            (CARRIED_BODY_MAX, True),
            (CARRIED_BODY_MAX + 1, False),
            (UNKNOWN_LENGTH, False),
        ]
        for length, carried in cases:
            connector, carriers = self.carried()
            endpoint = MemoryEndpoint(9)
            connector.endpoint = lambda *args, endpoint=endpoint: endpoint  # type: ignore[method-assign,misc]
            self.send(connector, b"PUT", None if length is None else Upload(length))
            carriers.ready()
            self.assertEqual(len(carriers.opened), int(carried), length)
            self.assertEqual(endpoint.attempts, int(not carried), length)
            if carried:
                self.assertTrue(carriers.sent(0, 1).startswith(b"PUT / HTTP/1.1\r\n"), length)
            else:
                self.assertTrue(endpoint.connections[0][1].value().startswith(b"PUT /"), length)

    def test_failed_body_on_a_stream(self) -> None:
        """
        A carried request whose body fails (the client left mid-upload) ends its stream, never
        to be reused, and its client gets 502: the hop client finds the stream's producer as
        it would a socket's.
        """
        connector, carriers = self.carried()
        upload = Upload(10)
        d = self.send(connector, b"PUT", upload)
        carriers.ready()
        upload.consumer.write(b"12345")
        upload.done.errback(Failure(ConnectionDone("the client left")))
        self.failureResultOf(d, BadGateway)
        tunnels, transport = carriers.opened[0]
        self.assertEqual(len(tunnels), 0)  # The stream was aborted, and its CLOSE sent.
        self.assertTrue(transport.value().endswith(HEADER.pack(CLOSE, 1, 0)))
        self.assertEqual(connector.pool.idle_connections(), [])

    def test_stream_on_a_closing_carrier_is_not_reused(self) -> None:
        """
        A kept stream whose carrier is closing is not used again (the stream sees its carrier's
        connection as a socket sees a TLS layer's): the next GET goes on a new carrier.
        """
        connector, carriers = self.carried()
        self.send(connector, b"GET")
        carriers.ready()
        carriers.answer(1, OK)
        [kept] = connector.pool.idle_connections()
        self.assertTrue(kept.usable())
        carriers.opened[0][0].close()  # Idle too long, say.
        self.assertFalse(kept.usable())
        d = self.send(connector, b"GET")
        carriers.ready()
        self.assertEqual(carriers.sent(0, 1).count(b"GET / HTTP/1.1"), 1)
        self.assertTrue(carriers.sent(1, 1).startswith(b"GET / HTTP/1.1"))
        carriers.answer(1, OK)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_failures_table(self) -> None:
        """What the pool gave up with → the client's error page, and nothing sent again here."""
        cases = [
            (ResponseNeverReceived([Failure(ConnectionDone())]), b"POST", "connection"),
            (ResponseNeverReceived([Failure(SSL.Error("bad pin"))]), b"GET", "identity"),
            (RequestNotSent(), b"GET", "connection"),
        ]
        for error, method, said in cases:
            connector = self.connector()
            pool = _FailingPool(error)
            connector.pool = pool  # type: ignore[assignment]
            failure = self.failureResultOf(self.send(connector, method), BadGateway)
            self.assertIn(said, failure.value.message, error)
            self.assertEqual(pool.sent, 1, error)


class CarrierWindowTests(SynchronousTestCase):
    """The front door announces its window in a carrier's handshake, and keeps to the answer."""

    def test_table(self) -> None:
        """(the gateway's 101 says) → (this end's window, the gateway's), or 502."""
        cases: list[tuple[bytes, Any]] = [
            (b"", (WINDOW_SIZE, WINDOW_SIZE)),  # A gateway from before windows were announced.
            (b"%d" % (STREAM_WINDOW,), (STREAM_WINDOW, STREAM_WINDOW)),
            (b"%d" % (2 * STREAM_WINDOW,), (STREAM_WINDOW, 2 * STREAM_WINDOW)),
            (b"%d" % (WINDOW_SIZE // 2,), BadGateway),
            (b"lots", BadGateway),
        ]
        for announced, expected in cases:
            clock = MemoryReactorClock()
            connector = GatewayConnector(clock)
            endpoint = MemoryEndpoint(9)
            connector.endpoint = lambda *args, endpoint=endpoint: endpoint  # type: ignore[method-assign,misc]
            d = defer.ensureDeferred(
                connector.upgrade(UUID, "127.0.0.1:9", SECRET, b"GET", b"/ws", Headers())
            )
            protocol, transport = endpoint.connections[0]
            handshake = transport.value().lower()
            self.assertIn(b"%s: %d\r\n" % (WINDOW_HEADER, STREAM_WINDOW), handshake)
            protocol.dataReceived(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: arvproxy-tunnels/1\r\n"
                + (b"%s: %s\r\n" % (WINDOW_HEADER, announced) if announced else b"")
                + b"\r\n"
            )
            if expected is BadGateway:
                self.failureResultOf(d, BadGateway)
                self.assertTrue(transport.disconnecting or transport.disconnected, announced)
                continue
            self.assertNoResult(d)  # The tunnel's own request went out on a stream of it.
            [tunnels] = [c for cs in connector.carriers._carriers.values() for c in cs]
            self.assertEqual((tunnels.window, tunnels.peer_window), expected, announced)
