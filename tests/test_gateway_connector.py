"""
The controller's connections to gateways: a request that meets a dead pooled connection is sent
once more, freshly signed, when that is safe.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.controller.proxy import GatewayConnector
from arvproxy.errors import BadGateway

SECRET = "ab" * 32
UUID = "zzzzz-dz642-000000000000001"


class _FlakyPool:
    """Fails the first request with C{error}, answers the next ones."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.sent: list[tuple[bytes, list[bytes]]] = []
        self.informational: list[Any] = []

    def request(
        self,
        key: Any,
        endpoint: Any,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: Any,
        informational: Any = None,
    ) -> Any:
        self.sent.append((method, list(headers.getRawHeaders(policy.AUTHORIZATION, []))))
        self.informational.append(informational)
        if len(self.sent) == 1:
            return defer.fail(self.error)
        return defer.succeed("response")


class RetryTests(SynchronousTestCase):
    def connector(self, error: Exception) -> tuple[GatewayConnector, _FlakyPool]:
        clock = MemoryReactorClock()
        clock.advance(1_700_000_000)
        connector = GatewayConnector(clock)
        pool = _FlakyPool(error)
        connector.pool = pool  # type: ignore[assignment]
        return connector, pool

    def send(
        self, connector: GatewayConnector, method: bytes, body: Any = None, told: Any = None
    ) -> Any:
        headers = Headers({policy.AUTHORIZATION: [policy.sign(SECRET, 1_700_000_000).encode()]})
        return defer.ensureDeferred(
            connector.request(UUID, "127.0.0.1:9", SECRET, method, b"/", headers, body, told)
        )

    def test_idempotent_request_is_resent_with_a_new_signature(self) -> None:
        """
        A GET on a dead pooled connection goes again, with a fresh, valid signature (and the
        same receiver of interim answers).
        """
        connector, agent = self.connector(ResponseNeverReceived([Failure(ConnectionDone())]))
        told = object()
        self.assertEqual(self.successResultOf(self.send(connector, b"GET", told=told)), "response")
        self.assertEqual(agent.informational, [told, told])
        [first], [second] = (headers for _, headers in agent.sent)
        self.assertNotEqual(first, second)
        nonces = policy.NonceCache(300)
        for signature in (first, second):
            policy.verify([signature], SECRET, 1_700_000_000, nonces)

    def test_requests_with_a_body_are_not_resent(self) -> None:
        """A POST is never sent twice: the client gets 502."""
        connector, agent = self.connector(ResponseNeverReceived([Failure(ConnectionDone())]))
        failure = self.failureResultOf(self.send(connector, b"POST", body=object()), BadGateway)
        self.assertIn("connection", failure.value.message)
        self.assertEqual(len(agent.sent), 1)

    def test_identity_failures_are_not_resent(self) -> None:
        """A gateway that fails the TLS identity check is not asked again."""
        connector, agent = self.connector(ResponseNeverReceived([Failure(SSL.Error("bad pin"))]))
        failure = self.failureResultOf(self.send(connector, b"GET"), BadGateway)
        self.assertIn("identity", failure.value.message)
        self.assertEqual(len(agent.sent), 1)
