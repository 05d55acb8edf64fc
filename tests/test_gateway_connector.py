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

from arvproxy import policy
from arvproxy.controller.proxy import GatewayConnector
from arvproxy.errors import BadGateway
from arvproxy.testing import MemoryEndpoint

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


def _signature(transport: StringTransport) -> bytes:
    """The signature in the one request a connection sent."""
    [line] = [
        line
        for line in transport.value().split(b"\r\n")
        if line.lower().startswith(policy.AUTHORIZATION + b":")
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
        headers = Headers({policy.AUTHORIZATION: [policy.sign(SECRET, 1_700_000_000).encode()]})
        return defer.ensureDeferred(
            connector.request(UUID, "127.0.0.1:9", SECRET, method, b"/", headers, body, told)
        )

    def test_resent_request_is_signed_again(self) -> None:
        """
        A GET whose kept connection the gateway closed goes again on a new one (by the pool),
        with a fresh, valid signature and the same receiver of interim answers.
        """
        connector = self.connector()
        endpoint = MemoryEndpoint(9)
        connector.endpoint = lambda *args: endpoint  # type: ignore[method-assign]
        self.send(connector, b"GET")
        first, kept = endpoint.connections[-1]
        first.dataReceived(OK)  # Kept for the next request.
        kept.clear()
        told: list[int] = []
        d = self.send(connector, b"GET", told=lambda code, phrase, headers: told.append(code))
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(endpoint.attempts, 2)
        again, new = endpoint.connections[-1]
        again.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(told, [103])
        lost, resent = _signature(kept), _signature(new)
        self.assertNotEqual(lost, resent)
        nonces = policy.NonceCache(300)
        for signature in (lost, resent):
            policy.verify([signature], SECRET, 1_700_000_000, nonces)

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
