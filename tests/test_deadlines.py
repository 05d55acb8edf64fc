"""
Tests for the front door's deadlines towards a gateway (L{arvproxy.deadlines}; issue 16, hole
9): the answer's head in L{HopPool}, an upgrade's answer, the TLS handshake over real loopback
sockets, the 504 each becomes, the configuration keys, and closing carriers at shutdown.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.http_headers import Headers

from arvproxy import deadlines, policy
from arvproxy.carrier import Carrier, CarrierPool
from arvproxy.config import ConfigError, Limits, parse_config
from arvproxy.controller.proxy import gateway_error
from arvproxy.deadlines import DeadlinePassed, tls_with_deadline
from arvproxy.errors import GatewayTimeout
from arvproxy.hopclient import HopConnection, HopPool, HopResponse
from arvproxy.testing import MemoryEndpoint
from arvproxy.tlsidentity import client_creator, server_context_factory
from arvproxy.upgrade import open_upgrade
from tests import e2e
from tests.test_hopclient import Upload

reactor: Any = _reactor
SECRET = policy.gateway_secret("r" * 40, "zzzzz-dz642-000000000000000")
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"


class _Body(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.reason = reason


class AnswerDeadlineTests(SynchronousTestCase):
    """HopPool.answer_timeout: the head of an answer must come in time; its body need not."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.pool = HopPool(self.clock, idle_timeout=100, answer_timeout=30)
        self.endpoint = MemoryEndpoint(8080)

    def send(
        self, body: Any = None, method: bytes = b"GET"
    ) -> tuple[defer.Deferred[HopResponse], HopConnection, StringTransport]:
        d = self.pool.request("k", self.endpoint, method, b"/", Headers(), body)
        connection, transport = self.endpoint.connections[-1]
        return d, connection, transport

    def test_no_answer_fails_and_closes(self) -> None:
        """No head within the deadline: DeadlinePassed (never sent again), connection closed."""
        d, _, transport = self.send()
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        failure = self.failureResultOf(d, DeadlinePassed)
        self.assertEqual(str(failure.value), "the answer's head did not finish within 30 s")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_body_takes_as_long_as_it_likes(self) -> None:
        """Once the head has come, the body may take far longer than the deadline."""
        d, connection, transport = self.send()
        connection.dataReceived(HEAD + b"part")
        body = _Body()
        self.successResultOf(d).deliverBody(body)
        self.clock.advance(3600)
        connection.dataReceived(b", end")
        self.assertEqual(body.data, b"part, end")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertFalse(transport.disconnecting)

    def test_starts_once_the_body_is_sent(self) -> None:
        """An upload's deadline runs from the end of its body, however long that takes."""
        upload = Upload(4)
        d, connection, _ = self.send(upload, b"POST")
        self.clock.advance(3600)
        self.assertNoResult(d)
        upload.consumer.write(b"data")
        upload.done.callback(None)
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.failureResultOf(d, DeadlinePassed)

    def test_interim_answers_do_not_count(self) -> None:
        """A 103 Early Hints is not the answer's head: the deadline still runs."""
        d, connection, _ = self.send()
        connection.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        self.clock.advance(31)
        self.failureResultOf(d, DeadlinePassed)

    def test_kept_connection_not_retried(self) -> None:
        """On a kept connection a request past its deadline is not sent again."""
        d, connection, _ = self.send()
        connection.dataReceived(HEAD + b"123456789")
        self.successResultOf(d).deliverBody(_Body())
        d, reused, _ = self.send()
        self.assertIs(reused, connection)
        self.clock.advance(31)
        self.failureResultOf(d, DeadlinePassed)
        connection.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_lost_connection_stops_the_deadline(self) -> None:
        """A connection lost before the deadline leaves no timer behind."""
        d, connection, _ = self.send()
        connection.dataReceived(HEAD)
        connection.connectionLost(Failure(ConnectionDone()))
        d, connection, _ = self.send()
        connection.connectionLost(Failure(ConnectionAborted()))
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_without_deadline_nothing_is_scheduled(self) -> None:
        """A pool without answer_timeout (the gateway's) sets no timer."""
        pool = HopPool(self.clock, idle_timeout=100)
        pool.request("k", self.endpoint, b"GET", b"/", Headers(), None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UpgradeDeadlineTests(SynchronousTestCase):
    """An upgrade's answer (a carrier's or a WebSocket's 101) must come in time."""

    def test_no_answer(self) -> None:
        """No answer within the deadline: DeadlinePassed naming the step, connection aborted."""
        clock = Clock()
        endpoint = MemoryEndpoint(1)
        d = defer.ensureDeferred(
            open_upgrade(
                endpoint, b"GET", b"/", Headers({b"host": [b"h"]}), (clock, 10, "the step")
            )
        )
        clock.advance(10)
        failure = self.failureResultOf(d, DeadlinePassed)
        self.assertEqual(failure.value.step, "the step")
        self.assertTrue(endpoint.connections[0][1].disconnecting)

    def test_answer_in_time(self) -> None:
        """An answer in time stops the deadline."""
        clock = Clock()
        endpoint = MemoryEndpoint(1)
        headers = Headers({b"host": [b"h"], b"connection": [b"upgrade"], b"upgrade": [b"x"]})
        d = defer.ensureDeferred(open_upgrade(endpoint, b"GET", b"/", headers, (clock, 10, "step")))
        endpoint.connections[0][0].dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )
        self.assertEqual(self.successResultOf(d).code, 101)
        self.assertEqual(clock.getDelayedCalls(), [])


class _Silent(protocol.Protocol):
    pass


class _Answer(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(HEAD + b"123456789")


class TLSDeadlineTests(unittest.TestCase):
    """tls_with_deadline over real loopback sockets."""

    def listen(self, factory: Any) -> int:
        return e2e.listen_tracked(self, reactor, factory)

    def pool(self) -> HopPool:
        pool = HopPool(reactor, idle_timeout=60)
        self.addCleanup(pool.closeCachedConnections)
        return pool

    def endpoint(self, port: int, timeout: float) -> Any:
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
        return tls_with_deadline(client_creator(SECRET), tcp, reactor, timeout)

    def test_silent_listener(self) -> defer.Deferred[None]:
        """Something that accepts TCP and never speaks TLS fails the request with the deadline."""
        return defer.ensureDeferred(self._silent_listener())

    async def _silent_listener(self) -> None:
        port = self.listen(protocol.Factory.forProtocol(_Silent))
        d = self.pool().request("k", self.endpoint(port, 0.5), b"GET", b"/", Headers(), None)
        with self.assertRaises(ResponseNeverReceived) as caught:
            await d
        deadline = deadlines.deadline_of(caught.exception)
        assert deadline is not None
        self.assertEqual(deadline.step, deadlines.TLS_HANDSHAKE)

    def test_handshake_in_time(self) -> defer.Deferred[None]:
        """A gateway that completes TLS in time serves the request; no deadline is left."""
        return defer.ensureDeferred(self._handshake_in_time())

    async def _handshake_in_time(self) -> None:
        server = TLSMemoryBIOFactory(
            server_context_factory(SECRET, ["127.0.0.1"]),
            False,
            protocol.Factory.forProtocol(_Answer),
        )
        port = self.listen(server)
        pool = self.pool()
        response = await pool.request(
            "k", self.endpoint(port, 30), b"GET", b"/", Headers({b"host": [b"x"]}), None
        )
        self.assertEqual(response.code, 200)
        self.assertNotIn("_handshake_late", [c.func.__name__ for c in reactor.getDelayedCalls()])
        await pool.closeCachedConnections()


class GatewayErrorTests(SynchronousTestCase):
    """Each missed deadline becomes a 504 that names the step."""

    def test_table(self) -> None:
        """(error) → the 504's message, also when a client error carries the deadline."""
        cases = [
            (
                DeadlinePassed(deadlines.TLS_HANDSHAKE, 10),
                "The container's gateway did not complete the TLS handshake within 10 s.",
            ),
            (
                ResponseNeverReceived([Failure(DeadlinePassed(deadlines.TLS_HANDSHAKE, 2.5))]),
                "The container's gateway did not complete the TLS handshake within 2.5 s.",
            ),
            (
                DeadlinePassed(deadlines.CARRIER_HANDSHAKE, 10),
                "The container's gateway did not accept the connection within 10 s.",
            ),
            (
                DeadlinePassed(deadlines.ANSWER_HEAD, 300),
                "The container's service did not start to answer within 300 s.",
            ),
        ]
        for error, message in cases:
            translated = gateway_error(error)
            self.assertIsInstance(translated, GatewayTimeout)
            assert translated is not None
            self.assertEqual((translated.status, translated.message), (504, message))
            self.assertTrue(translated.hint)
        self.flushLoggedErrors()


class ConfigTests(SynchronousTestCase):
    """The deadlines are ArvProxy.Timeouts keys, with defaults."""

    def parse(self, timeouts: dict[str, Any]) -> Limits:
        document = {
            "Clusters": {
                "zzzzz": {
                    "SystemRootToken": "x" * 40,
                    "Services": {
                        "ContainerWebServices": {"ExternalURL": "https://*.containers.example"}
                    },
                    "ArvProxy": {"Timeouts": timeouts},
                }
            }
        }
        return parse_config(json.loads(json.dumps(document)), "/c.yml").limits

    def test_defaults(self) -> None:
        """TLSHandshake 10 s, CarrierHandshake 10 s, ResponseHeaders 5 min."""
        limits = self.parse({})
        self.assertEqual(
            (limits.tls_handshake, limits.carrier_handshake, limits.response_headers),
            (10.0, 10.0, 300.0),
        )

    def test_set(self) -> None:
        """Each key sets its deadline (Arvados durations)."""
        limits = self.parse(
            {"TLSHandshake": "2s", "CarrierHandshake": "1500ms", "ResponseHeaders": "1h"}
        )
        self.assertEqual(
            (limits.tls_handshake, limits.carrier_handshake, limits.response_headers),
            (2.0, 1.5, 3600.0),
        )

    def test_bad_values_name_the_key(self) -> None:
        """A value that is no positive duration is refused, naming the key in full."""
        for key in ("TLSHandshake", "CarrierHandshake", "ResponseHeaders"):
            for value in (0, "-1s", "soon"):
                with self.assertRaises(ConfigError) as caught:
                    self.parse({key: value})
                self.assertIn(f"Clusters.zzzzz.ArvProxy.Timeouts.{key}", str(caught.exception))


class CarrierShutdownTests(SynchronousTestCase):
    """Closing the carriers at shutdown ends, even when a gateway never answers the close."""

    def test_carrier_not_closing_is_aborted(self) -> None:
        """A carrier still there after the grace period is aborted; closing then finishes."""
        clock = Clock()
        pool = CarrierPool(clock, idle_timeout=10)
        carrier = Carrier(clock.callLater)
        transport = StringTransport()
        carrier.makeConnection(transport)
        self.successResultOf(pool.get("gateway", lambda: defer.succeed(carrier)))
        closed = pool.close(grace=5)
        self.assertTrue(carrier.closing)
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        clock.advance(4.9)
        self.assertNoResult(closed)
        self.assertEqual(aborted, [])
        clock.advance(0.2)
        self.assertEqual(aborted, [True])
        carrier.connectionLost(Failure(ConnectionAborted()))
        self.successResultOf(closed)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_carrier_closing_in_time(self) -> None:
        """A carrier that closes within the grace period is not aborted, and no timer is left."""
        clock = Clock()
        pool = CarrierPool(clock, idle_timeout=10)
        carrier = Carrier(clock.callLater)
        carrier.makeConnection(StringTransport())
        self.successResultOf(pool.get("gateway", lambda: defer.succeed(carrier)))
        closed = pool.close(grace=5)
        carrier.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)
        self.assertEqual(clock.getDelayedCalls(), [])
