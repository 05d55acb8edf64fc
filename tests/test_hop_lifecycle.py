"""
Tests for how L{arvproxy.hopclient.HopPool} ends (issue 16, hole 10 a): closing the pool at
shutdown always finishes, whatever happened to its connections before.  In memory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy.hopclient import HopConnection, HopPool, HopResponse
from arvproxy.testing import MemoryEndpoint

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Transport(StringTransport):
    """Like a socket: closing or aborting it is seen by its protocol only later (L{lose})."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class _Endpoint(MemoryEndpoint):
    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        transport = _Transport(lenient=True)
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)


def lose(connection: HopConnection, reason: Exception | None = None) -> None:
    """The connection's end, as the reactor reports it."""
    connection.connectionLost(Failure(reason or ConnectionDone()))


class PoolShutdownTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pool = HopPool(MemoryReactorClock(), idle_timeout=10)
        self.endpoints = {"a": _Endpoint(1), "b": _Endpoint(2), "c": _Endpoint(3)}

    def send(self, key: str) -> tuple[defer.Deferred[HopResponse], HopConnection]:
        endpoint = self.endpoints[key]
        d = self.pool.request(key, endpoint, b"GET", b"/", Headers(), None)
        return d, endpoint.connections[-1][0]

    def get(self, key: str) -> HopConnection:
        """A request for C{key}, answered whole; its connection goes back to the pool."""
        d, connection = self.send(key)
        connection.dataReceived(OK)
        self.assertEqual(self.successResultOf(d).complete_body(), b"ok")
        return connection

    def test_closing_after_a_failed_answer_on_a_reused_connection(self) -> None:
        """After GET A, GET B and a GET A dying on its kept connection, closing still finishes."""
        self.get("a")
        b = self.get("b")
        d, reused = self.send("a")
        self.assertEqual(len(self.endpoints["a"].connections), 1, "A's connection was reused")
        reused.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart")
        lose(reused)
        self.successResultOf(d)
        closed = self.pool.closeCachedConnections()
        self.assertNoResult(closed)
        lose(b, ConnectionAborted())
        self.successResultOf(closed)

    def test_closing_does_not_wait_for_busy_connections(self) -> None:
        """A connection busy while the pool closes, and kept afterwards, does not hold it up."""
        b = self.get("b")
        d, busy = self.send("c")
        closed = self.pool.closeCachedConnections()
        busy.dataReceived(OK)
        self.successResultOf(d)
        self.assertEqual(self.pool.idle_connections(), [busy])
        lose(b, ConnectionAborted())
        self.successResultOf(closed)

    def test_closing_aborts_idle_connections(self) -> None:
        """Idle connections are aborted at close: a frozen next hop cannot stall a shutdown."""
        connections = [self.get(key) for key in ("a", "b")]
        closed = self.pool.closeCachedConnections()
        self.assertEqual([c.transport.aborted for c in connections], [True, True])
        self.assertEqual(self.pool.idle_connections(), [])
        for connection in connections:
            lose(connection, ConnectionAborted())
        self.successResultOf(closed)

    def test_nothing_to_close(self) -> None:
        """With nothing idle (even after keys were emptied), closing finishes at once."""
        self.get("a")
        d, reused = self.send("a")
        reused.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart")
        lose(reused)
        self.successResultOf(d)
        self.successResultOf(self.pool.closeCachedConnections())

    def test_pool_used_after_closing(self) -> None:
        """A pool closed once serves and closes again."""
        self.get("a")
        first = self.pool.closeCachedConnections()
        lose(self.endpoints["a"].connections[-1][0], ConnectionAborted())
        self.successResultOf(first)
        b = self.get("b")
        second = self.pool.closeCachedConnections()
        lose(b, ConnectionAborted())
        self.successResultOf(second)
