"""
Tests for L{arvproxy.gateway.server}: the gateway believes only requests signed for its container,
and proxies them to the target port with the right headers.  In memory: a L{ProxySite} over a
C{StringTransport} in front, the real L{ContainerConnector} (its client and pool) behind,
connecting to L{MemoryEndpoint}s of a L{FakeRuntime}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h11
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy import carrier, policy
from arvproxy.gateway.server import Gateway
from arvproxy.httpserver import ProxySite
from arvproxy.policy import ANONYMOUS_CLIENT as ANONYMOUS_HEADER
from arvproxy.testing import FakeRuntime, MemoryClient, ParsedResponse, request_bytes

T0 = 1_700_000_000.0
CONTAINER = "zzzzz-dz642-000000000000001"
OTHER = "zzzzz-dz642-000000000000002"
SECRET = policy.gateway_secret("RootTokenForTheseTests0123456789abcdefgh", CONTAINER)
REQUEST_HOST = f"{CONTAINER}-8001.containers.example.com".encode()
NAVIGATE = [(b"Sec-Fetch-Mode", b"navigate")]
OTHER_SECRET = policy.gateway_secret("AnotherRootToken0123456789abcdefghijkl", CONTAINER)


def container_request(data: bytes) -> tuple[h11.Request, bytes]:
    """The request the container received (parsed), and its body so far."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(data)
    request = connection.next_event()
    assert isinstance(request, h11.Request), request
    body = b""
    while True:
        event = connection.next_event()
        if not isinstance(event, h11.Data):
            break
        body += bytes(event.data)
    return request, body


@dataclass(frozen=True)
class Signed:
    """Where a signature goes: L{GatewayTestCase.send} signs the request it sends."""

    secret: str = SECRET
    at: float | None = None


class GatewayTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.runtime = FakeRuntime(refusing=[9999])
        self.gateway = Gateway(self.clock, CONTAINER, SECRET, self.runtime)
        self.site = ProxySite(self.gateway, self.clock)

    def forwarded(
        self,
        port: bytes | None = b"8001",
        target: bytes | None = CONTAINER.encode(),
        request_host: bytes | None = REQUEST_HOST,
        authorization: bytes | None = None,
        secret: str = SECRET,
        at: float | None = None,
    ) -> list[tuple[bytes, Any]]:
        """
        The x-arvados-* headers the controller sends (each left out when C{None}), signed with
        C{secret} at C{at} when L{send} sends them, unless given an C{authorization}.
        """
        headers = [
            (policy.TARGET_UUID, target),
            (policy.TARGET_PORT, port),
            (policy.REQUEST_HOST, request_host),
            (policy.SIGNATURE, authorization if authorization is not None else Signed(secret, at)),
        ]
        return [(name, value) for name, value in headers if value is not None]

    def send(
        self,
        headers: Sequence[tuple[bytes, Any]],
        target: bytes = b"/",
        method: bytes = b"GET",
        body: bytes = b"",
    ) -> MemoryClient:
        """Send a request with C{headers} (see L{sign})."""
        client = MemoryClient(self.site)
        all_headers = self.sign(headers, target, method)
        if body:
            all_headers.append((b"Content-Length", b"%d" % len(body)))
        client.send(request_bytes(method, target, all_headers, body, host=b"127.0.0.1:9001"))
        return client

    def sign(
        self, headers: Sequence[tuple[bytes, Any]], target: bytes = b"/", method: bytes = b"GET"
    ) -> list[tuple[bytes, bytes]]:
        """C{headers} with each L{Signed} one a signature of this request, as the front door's."""
        bound = Headers()
        for name, value in headers:
            if not isinstance(value, Signed):
                bound.addRawHeader(name, value)
        binding = policy.request_binding(method, target, bound)

        def signed(value: Signed) -> bytes:
            at = self.clock.seconds() if value.at is None else value.at
            return policy.sign(value.secret, at, binding=binding).encode()

        return [
            (name, signed(value) if isinstance(value, Signed) else value) for name, value in headers
        ]

    def container_side(self, port: int = 8001, index: int = 0):  # type: ignore[no-untyped-def]
        """The (protocol, transport) of a connection the gateway made to C{port}."""
        endpoints = [e for p, e in self.runtime.endpoints if p == port]
        self.assertEqual(len(endpoints), 1)
        return endpoints[0].connections[index]

    def refused(self, client: MemoryClient, status: int) -> ParsedResponse:
        """Check for the gateway's own refusal with C{status}; nothing reached the container."""
        response = client.response()
        self.assertEqual(response.status, status, response.body)
        self.assertTrue(response.header(policy.GATEWAY_ERROR))
        self.assertEqual(self.runtime.endpoints, [])
        return response


class SignatureTests(GatewayTestCase):
    def test_signature_table(self) -> None:
        """Missing, malformed, wrongly keyed or stale signatures are refused with 401."""
        other_secret = policy.gateway_secret("AnotherRootToken0123456789abcdefghijkl", CONTAINER)
        cases = [
            ([h for h in self.forwarded() if h[0] != policy.SIGNATURE], b"missing"),
            (self.forwarded(authorization=b"not a signature"), b"malformed"),
            (self.forwarded(secret=other_secret), b"bad signature"),
            (self.forwarded(at=T0 - 301), b"stale"),
            (self.forwarded(at=T0 + 301), b"stale"),
            (self.forwarded() + [(policy.SIGNATURE, Signed())], b"repeated"),
        ]
        for headers, reason in cases:
            response = self.refused(self.send(headers), 401)
            self.assertIn(reason, response.header(policy.GATEWAY_ERROR) or b"")

    def test_replay(self) -> None:
        """A signed request replayed as is is refused the second time."""
        headers = self.sign(self.forwarded())
        self.send(headers)
        response = self.send(headers).response()
        self.assertEqual(response.status, 401)
        self.assertEqual(response.header(policy.GATEWAY_ERROR), b"replayed signature")

    def test_target_checks(self) -> None:
        """Another container's request is misdirected (502); bad port 400; no request host 502."""
        cases = [
            (self.forwarded(target=OTHER.encode()), 502, b"misdirected"),
            (self.forwarded(target=None), 502, b"misdirected"),
            (self.forwarded(port=None), 400, b"x-arvados-target-port"),
            (self.forwarded(port=b"0"), 400, b"x-arvados-target-port"),
            (self.forwarded(port=b"65536"), 400, b"x-arvados-target-port"),
            (self.forwarded(port=b"http"), 400, b"x-arvados-target-port"),
            (self.forwarded(port=b"8001") + [(policy.TARGET_PORT, b"8002")], 400, b"exactly once"),
            (self.forwarded(request_host=None), 502, b"x-arvados-request-host"),
        ]
        for headers, status, reason in cases:
            response = self.refused(self.send(headers), status)
            self.assertIn(reason, response.header(policy.GATEWAY_ERROR) or b"")

    def test_not_accepting(self) -> None:
        """Once the container has finished, signed requests are refused (410, marked)."""
        self.gateway.accepting = False
        response = self.refused(self.send(self.forwarded()), 410)
        self.assertEqual(response.header(policy.GATEWAY_ERROR), b"the container has finished")


class ProxyTests(GatewayTestCase):
    def test_headers_to_container(self) -> None:
        """The container sees the original Host, and no x-arvados-* or hop-by-hop headers."""
        headers = self.forwarded() + [
            (b"Cookie", b"a=1"),
            (b"Authorization", b"Bearer x"),
            (b"X-Forwarded-For", b"192.0.2.1"),
            (b"Connection", b"x-hop"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=1"),
            (b"TE", b"trailers"),
            (b"X-Arvados-Something-Else", b"1"),
            (b"X-Multi", b"1"),
            (b"X-Multi", b"2"),
        ]
        self.send(headers, b"/path?q=1")
        protocol, transport = self.container_side()
        request, _ = container_request(transport.value())
        self.assertEqual((request.method, request.target), (b"GET", b"/path?q=1"))
        self.assertEqual(
            [(bytes(n), bytes(v)) for n, v in request.headers],
            [
                (b"cookie", b"a=1"),
                (b"authorization", b"Bearer x"),
                (b"x-forwarded-for", b"192.0.2.1"),
                (b"x-multi", b"1"),
                (b"x-multi", b"2"),
                (b"host", REQUEST_HOST),
            ],
        )

    def test_round_trip_and_body(self) -> None:
        """A request body streams to the container and its answer streams back to the controller."""
        client = self.send(self.forwarded(), b"/up", b"POST", b"payload")
        protocol, transport = self.container_side()
        request, body = container_request(transport.value())
        self.assertEqual(body, b"payload")
        self.assertIn((b"content-length", b"7"), list(request.headers))
        protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-App: 1\r\n\r\nok")
        response = client.response(b"POST")
        self.assertEqual((response.status, response.body), (201, b"ok"))
        self.assertEqual(response.header(b"x-app"), b"1")
        self.assertIsNone(response.header(policy.GATEWAY_ERROR))

    def test_nothing_listening(self) -> None:
        """Nothing listening on the port: 503, Retry-After and a page that refreshes itself."""
        client = self.send(self.forwarded(port=b"9999") + NAVIGATE)
        response = client.response()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.header(b"retry-after"), b"5")
        self.assertIn(b'http-equiv="refresh" content="5"', response.body)
        self.assertIn(b"9999", response.body)
        # Not the gateway's own refusal: the controller shows it to the browser as it is.
        self.assertIsNone(response.header(policy.GATEWAY_ERROR))

    def test_one_endpoint_per_port(self) -> None:
        """Requests to two ports use two endpoints; a port's connection is reused from the pool."""
        for port in (b"8001", b"8002", b"8001"):
            client = self.send(self.forwarded(port=port))
            endpoint = dict(self.runtime.endpoints)[int(port)]
            protocol, transport = endpoint.connections[-1]
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + port[-1:])
            self.assertEqual(client.response().body, port[-1:])
        self.assertEqual([port for port, _ in self.runtime.endpoints], [8001, 8002])
        self.assertEqual([e.attempts for _, e in self.runtime.endpoints], [1, 1])

    def test_idle_service_connections_are_dropped_early(self) -> None:
        """An idle pooled connection to the service is closed after 4 s, before Node's 5 s."""
        client = self.send(self.forwarded())
        protocol, transport = self.container_side()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(client.response().body, b"x")
        self.clock.advance(3.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_one_pool_per_gateway(self) -> None:
        """Each gateway has its own connection pool, so two containers never share a connection."""
        other = Gateway(self.clock, OTHER, SECRET, FakeRuntime())
        self.assertIsNot(other.connector.pool, self.gateway.connector.pool)


class CarrierHandshakeTests(GatewayTestCase):
    """Only the front door, signing for this container, may open a carrier for tunnels."""

    UPGRADE = [(b"Connection", b"Upgrade"), (b"Upgrade", carrier.PROTOCOL)]

    def handshake(self, **changes: bytes | None) -> list[tuple[bytes, bytes]]:
        headers = self.forwarded(**{"port": None, "request_host": None, **changes})  # type: ignore[arg-type]
        return self.UPGRADE + headers

    def test_accepted(self) -> None:
        """A signed handshake for this container gets 101, then the connection carries frames."""
        client = self.send(self.handshake(), target=carrier.PATH)
        head, _, rest = client.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(b"Upgrade: " + carrier.PROTOCOL, head)
        self.assertNotIn(carrier.WINDOW_HEADER, head.lower())  # None was announced to it.
        self.assertEqual(rest, b"")
        # A stream opens an HTTP channel of its own, which checks its request as usual.
        unsigned = request_bytes(b"GET", b"/", [], host=b"127.0.0.1:9001")
        client.send(carrier.HEADER.pack(carrier.OPEN, 1, 0))
        client.send(carrier.HEADER.pack(carrier.DATA, 1, len(unsigned)) + unsigned)
        frames = client.value().partition(b"\r\n\r\n")[2]
        kind, stream_id, length = carrier.HEADER.unpack_from(frames)
        self.assertEqual((kind, stream_id), (carrier.DATA, 1))
        answer = frames[carrier.HEADER.size : carrier.HEADER.size + length]
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer)
        self.assertEqual(self.runtime.endpoints, [])

    def test_window_announced(self) -> None:
        """A front door that announces its window gets the gateway's (see WindowTests)."""
        window = [(carrier.WINDOW_HEADER, b"%d" % (2 * carrier.STREAM_WINDOW,))]
        client = self.send(self.handshake() + window, target=carrier.PATH)
        head = client.value().partition(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(b"%s: %d" % (carrier.WINDOW_HEADER, carrier.STREAM_WINDOW), head)

    def test_no_carrier_inside_a_carrier(self) -> None:
        """A signed carrier handshake sent on a stream of a carrier is refused (400)."""
        client = self.send(self.handshake(), target=carrier.PATH)
        accepted = len(client.value())
        handshake = self.sign(self.handshake(), carrier.PATH)
        nested = request_bytes(b"GET", carrier.PATH, handshake, host=b"127.0.0.1:9001")
        client.send(carrier.HEADER.pack(carrier.OPEN, 1, 0))
        client.send(carrier.HEADER.pack(carrier.DATA, 1, len(nested)) + nested)
        frames = client.value()[accepted:]
        kind, stream_id, length = carrier.HEADER.unpack_from(frames)
        self.assertEqual((kind, stream_id), (carrier.DATA, 1))
        answer = frames[carrier.HEADER.size : carrier.HEADER.size + length]
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertIn(b"not a carrier handshake", answer)

    def test_refusals(self) -> None:
        """(handshake, target) → refused with this status and reason; no carrier, no 101."""
        cases = [
            (self.handshake(authorization=b"forged"), carrier.PATH, 401, b"malformed"),
            (self.handshake(at=T0 - 301), carrier.PATH, 401, b"stale"),
            (self.handshake(target=OTHER.encode()), carrier.PATH, 502, b"misdirected"),
            (self.handshake(), b"/", 400, b"not a carrier handshake"),
            (self.handshake(port=b"8001"), carrier.PATH, 400, b"not a carrier handshake"),
            (
                self.handshake(request_host=REQUEST_HOST),
                carrier.PATH,
                400,
                b"not a carrier handshake",
            ),
            (
                self.handshake() + [(carrier.WINDOW_HEADER, b"65536")],
                carrier.PATH,
                400,
                b"a carrier window of 65536 bytes",
            ),
            (
                self.handshake() + [(carrier.WINDOW_HEADER, b"1048576, 1048576")],
                carrier.PATH,
                400,
                b"a carrier window of",
            ),
        ]
        for headers, target, status, reason in cases:
            response = self.refused(self.send(headers, target=target), status)
            self.assertIn(reason, response.header(policy.GATEWAY_ERROR) or b"", headers)

    def test_not_accepting(self) -> None:
        """Once the container has finished, no carrier opens (410, marked)."""
        self.gateway.accepting = False
        response = self.refused(self.send(self.handshake(), target=carrier.PATH), 410)
        self.assertEqual(response.header(policy.GATEWAY_ERROR), b"the container has finished")


class AnonymousBudgetTests(GatewayTestCase):
    """
    The gateway keeps the front door's anonymous share of its container too, so that visitors
    coming through several front-door processes never lock out the people with access (issue
    16, hole 8).  Each request stays open: the service has not answered.
    """

    def setUp(self) -> None:
        super().setUp()
        self.gateway = Gateway(
            self.clock,
            CONTAINER,
            SECRET,
            self.runtime,
            max_connections=5,
            max_anonymous=3,
            max_anonymous_per_client=2,
        )
        self.site = ProxySite(self.gateway, self.clock)

    def test_table(self) -> None:
        """Requests marked anonymous for a client are let through up to their share, no more."""
        # (the client the front door names, or None for someone with access; status or None
        # while the request is open)
        steps: list[tuple[bytes | None, int | None]] = [
            (b"192.0.2.1", None),
            (b"192.0.2.1", None),
            (b"192.0.2.1", 503),
            (b"192.0.2.2", None),
            (b"192.0.2.3", 503),
            (None, None),
            (None, None),
            (None, 503),
        ]
        for i, (client_key, status) in enumerate(steps):
            marked = [(ANONYMOUS_HEADER, client_key)] if client_key is not None else []
            client = self.send(self.forwarded() + marked)
            if status is None:
                self.assertEqual(client.value(), b"", i)
            else:
                response = client.response()
                self.assertEqual(response.status, status, i)
                self.assertEqual(response.header(b"retry-after"), b"2", i)
                # Not the gateway's refusal of the front door: relayed to the client as it is.
                self.assertIsNone(response.header(policy.GATEWAY_ERROR), i)
        self.assertEqual(self.gateway.open_requests(), 5)
        # The service never learns of the mark.
        endpoint = dict(self.runtime.endpoints)[8001]
        for _, transport in endpoint.connections:
            request, _ = container_request(transport.value())
            self.assertNotIn(ANONYMOUS_HEADER, [bytes(n) for n, _ in request.headers])

    def test_after_the_signature(self) -> None:
        """A request with a mark but no valid signature is refused before it counts."""
        marked = [(ANONYMOUS_HEADER, b"192.0.2.1")]
        for _ in range(3):
            self.refused(self.send(self.forwarded(secret=OTHER_SECRET) + marked), 401)
        self.send(self.forwarded() + marked)
        self.assertEqual(self.gateway.open_requests(), 1)
