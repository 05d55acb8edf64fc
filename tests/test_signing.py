"""
The signature between the hops is bound to its request (issue 16): a valid signature, seen by
someone who should not have seen it, cannot be moved to another method, path, port, host,
container, upgrade or carrier handshake.  The binding's bytes and the MAC are checked against
values written out and computed independently with openssl; the attacks run against
L{policy.verify}, the in-memory front door and gateway, and the real plugins.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy import carrier, policy
from arvproxy.config import ClusterConfig, ConfigError, parse_config
from arvproxy.controller import proxy
from arvproxy.controller.proxy import GatewayConnector
from arvproxy.policy import NonceCache, SignatureError
from tests import e2e, test_config, test_controller, test_gateway
from tests.test_attacks_headers import raw_request
from tests.test_policy import TableMixin

reactor: Any = _reactor

CTR = "zzzzz-dz642-0123456789abcde"
OTHER_CTR = "zzzzz-dz642-zzzzzzzzzzzzzzz"
HOST = f"{CTR}-8080.containers.example.com".encode()
SECRET = "ab" * 32
NOW = 1_700_000_000
NONCE = bytes(range(16))


def forwarded(
    uuid: bytes | None = CTR.encode(),
    port: bytes | None = b"8080",
    host: bytes | None = HOST,
    upgrade: bytes | None = None,
    window: bytes | None = None,
    anonymous: bytes | None = None,
) -> Headers:
    """The headers the front door sends a gateway, each bound one left out when C{None}."""
    headers = Headers()
    for name, value in [
        (policy.TARGET_UUID, uuid),
        (policy.TARGET_PORT, port),
        (policy.REQUEST_HOST, host),
        (carrier.WINDOW_HEADER, window),
        (policy.ANONYMOUS_CLIENT, anonymous),
    ]:
        if value is not None:
            headers.addRawHeader(name, value)
    if upgrade is not None:
        policy.with_upgrade(headers, upgrade)
    return headers


class BindingTests(SynchronousTestCase):
    """L{policy.request_binding} and the bound L{policy.sign}."""

    def test_vector(self) -> None:
        """The binding's bytes, and the MAC over them computed independently with openssl."""
        binding = policy.request_binding(b"GET", b"/a?b=1", forwarded(upgrade=b"websocket"))
        self.assertEqual(
            binding,
            b"#1:3:GET#1:6:/a?b=1#1:27:zzzzz-dz642-0123456789abcde#1:4:8080"
            b"#1:55:zzzzz-dz642-0123456789abcde-8080.containers.example.com#1:9:websocket--",
        )
        # printf 'arvproxy-v2 000102030405060708090a0b0c0d0e0f+1700000000\n<binding>' |
        #     openssl dgst -sha256 -hmac s3cr3t
        self.assertEqual(
            policy.sign("s3cr3t", NOW + 0.9, NONCE, binding),
            "000102030405060708090a0b0c0d0e0f+1700000000 "
            "2928076d08c9545b47a6391f346bfb6ea13f1e44d36e345549fa9f3a0ba7109a",
        )

    def test_no_two_requests_bind_alike(self) -> None:
        """Requests that differ in anything bound, even by where a value ends, bind apart."""
        requests = [
            (b"GET", b"/", forwarded()),
            (b"GET", b"/", forwarded(uuid=None)),
            (b"GET", b"/", forwarded(port=None)),
            (b"GET", b"/", forwarded(host=None)),
            (b"GET", b"/", forwarded(port=b"")),
            (b"GET", b"/", forwarded(upgrade=b"")),
            (b"GET", b"/", forwarded(upgrade=b"websocket")),
            (b"GET", b"/", forwarded(window=b"1048576")),
            (b"GET", b"/", forwarded(anonymous=b"127.0.0.1")),
            (b"GET", b"/", forwarded(window=b"127.0.0.1")),
            (b"GET", b"/x", forwarded()),
            (b"GET/", b"", forwarded()),
            (b"GE", b"T/", forwarded()),
            (b"GET", b"/", forwarded(port=b"8080", host=b"h#1:1:x")),
            (b"GET", b"/", forwarded(port=b"8080#1:1:h", host=b"x")),
        ]
        two_ports = forwarded()
        two_ports.addRawHeader(policy.TARGET_PORT, b"8081")
        requests.append((b"GET", b"/", two_ports))
        joined = forwarded(port=b"8080, 8081")
        requests.append((b"GET", b"/", joined))
        bindings = [policy.request_binding(*request) for request in requests]
        self.assertEqual(len(set(bindings)), len(bindings), bindings)

    def test_sign_request(self) -> None:
        """
        C{x-arvados-signature} verifies for the request; a second signing replaces it; the
        old format is sent only for old gateways, and replaced or removed with it.
        """
        headers = forwarded()
        binding = policy.request_binding(b"GET", b"/", headers)
        policy.sign_request(headers, SECRET, NOW, b"GET", b"/")
        first = headers.getRawHeaders(policy.SIGNATURE)
        self.assertIsNone(headers.getRawHeaders(policy.AUTHORIZATION))
        policy.sign_request(headers, SECRET, NOW, b"GET", b"/", old_gateways=True)
        [second] = headers.getRawHeaders(policy.SIGNATURE, [])
        self.assertNotEqual([second], first)
        policy.verify([second], SECRET, NOW, NonceCache(300), binding)
        # The old format: a MAC of the nonce and timestamp alone, as old gateways check it.
        [old] = headers.getRawHeaders(policy.AUTHORIZATION, [])
        stamp, mac = old.decode().split(" ")
        expected = hmac.new(SECRET.encode(), stamp.encode(), hashlib.sha256).hexdigest()
        self.assertEqual(mac, expected)
        policy.sign_request(headers, SECRET, NOW, b"GET", b"/")
        self.assertIsNone(headers.getRawHeaders(policy.AUTHORIZATION))


class MovedSignatureTests(TableMixin, SynchronousTestCase):
    """L{policy.verify}: a signature made for one request, presented with another."""

    def test_table(self) -> None:
        """Only the very request it was made for passes; every change is a bad signature."""
        signed = (b"GET", b"/a?b=1", forwarded())
        two_ports = forwarded()
        two_ports.addRawHeader(policy.TARGET_PORT, b"8081")
        handshake = (
            b"GET",
            carrier.PATH,
            forwarded(port=None, host=None, upgrade=carrier.PROTOCOL),
        )
        rows = [
            (signed, None),
            ((b"POST", b"/a?b=1", forwarded()), "bad"),
            ((b"HEAD", b"/a?b=1", forwarded()), "bad"),
            ((b"get", b"/a?b=1", forwarded()), "bad"),
            ((b"GET", b"/a?b=2", forwarded()), "bad"),
            ((b"GET", b"/a", forwarded()), "bad"),
            ((b"GET", b"/a?b=1&c", forwarded()), "bad"),
            ((b"GET", b"/A?b=1", forwarded()), "bad"),
            ((b"GET", b"/a?b=1", forwarded(port=b"8081")), "bad"),
            ((b"GET", b"/a?b=1", forwarded(port=b"08080")), "bad"),
            ((b"GET", b"/a?b=1", forwarded(port=None)), "bad"),
            ((b"GET", b"/a?b=1", two_ports), "bad"),
            ((b"GET", b"/a?b=1", forwarded(host=b"evil.example")), "bad"),
            ((b"GET", b"/a?b=1", forwarded(host=HOST.upper())), "bad"),
            ((b"GET", b"/a?b=1", forwarded(host=HOST + b":443")), "bad"),
            ((b"GET", b"/a?b=1", forwarded(uuid=OTHER_CTR.encode())), "bad"),
            ((b"GET", b"/a?b=1", forwarded(upgrade=b"websocket")), "bad"),
            ((b"GET", b"/a?b=1", forwarded(upgrade=carrier.PROTOCOL)), "bad"),
            ((b"GET", b"/a?b=1", forwarded(window=b"1048576")), "bad"),
            ((b"GET", b"/a?b=1", forwarded(anonymous=b"127.0.0.1")), "bad"),
            (handshake, "bad"),
        ]
        value = policy.sign(SECRET, NOW, binding=policy.request_binding(*signed))

        def attempt(request: tuple[bytes, bytes, Headers]) -> str | None:
            try:
                binding = policy.request_binding(*request)
                policy.verify([value.encode()], SECRET, NOW, NonceCache(300), binding)
            except SignatureError as e:
                return str(e).split(" ")[0]
            return None

        self.assertRows(rows, attempt)

    def test_anonymous_marker_bound(self) -> None:
        """An anonymous request's signature does not pass without its marker, nor with another."""
        anonymous = (b"GET", b"/", forwarded(anonymous=b"127.0.0.1"))
        value = policy.sign(SECRET, NOW, binding=policy.request_binding(*anonymous))
        for headers in (forwarded(), forwarded(anonymous=b"127.0.0.2")):
            binding = policy.request_binding(b"GET", b"/", headers)
            with self.assertRaises(SignatureError):
                policy.verify([value.encode()], SECRET, NOW, NonceCache(300), binding)
        policy.verify(
            [value.encode()], SECRET, NOW, NonceCache(300), policy.request_binding(*anonymous)
        )

    def test_handshake_moved(self) -> None:
        """A carrier handshake's signature fits no request, and no other handshake or window."""
        window = b"%d" % (carrier.STREAM_WINDOW,)
        handshake = forwarded(port=None, host=None, upgrade=carrier.PROTOCOL, window=window)
        value = policy.sign(
            SECRET, NOW, binding=policy.request_binding(b"GET", carrier.PATH, handshake)
        )
        others = [
            (b"GET", carrier.PATH, forwarded(port=None, host=None, upgrade=carrier.PROTOCOL)),
            (
                b"GET",
                carrier.PATH,
                forwarded(port=None, host=None, upgrade=carrier.PROTOCOL, window=b"16777216"),
            ),
            (
                b"GET",
                b"/",
                forwarded(port=None, host=None, upgrade=carrier.PROTOCOL, window=window),
            ),
            (b"GET", carrier.PATH, forwarded(upgrade=carrier.PROTOCOL, window=window)),
            (b"GET", carrier.PATH, forwarded(port=None, host=None, window=window)),
        ]
        for other in others:
            binding = policy.request_binding(*other)
            with self.assertRaises(SignatureError, msg=other):
                policy.verify([value.encode()], SECRET, NOW, NonceCache(300), binding)

    def test_old_format_refused(self) -> None:
        """A valid signature of the old, unbound format is refused as a bad signature."""
        value = policy.sign(SECRET, NOW, NONCE).encode()
        binding = policy.request_binding(b"GET", b"/", forwarded())
        error = self.assertRaises(
            SignatureError, policy.verify, [value], SECRET, NOW, NonceCache(300), binding
        )
        self.assertEqual(str(error), "bad signature")


class FrontDoorSigningTests(test_controller.ControllerTestCase):
    """The front door signs each request for exactly what it forwards."""

    def test_forwarded_requests_verify(self) -> None:
        """Requests of any method, and one with an absolute URL, each verify as sent."""
        secret = policy.gateway_secret(test_controller.ROOT_TOKEN, self.container.uuid)
        host = self.host(self.cr.uuid)
        absolute = b"http://" + host + b"/abs?x=1"
        requests = [
            (b"GET", b"/p?q=1", []),
            (b"DELETE", b"/item", []),
            (b"GET", absolute, []),
        ]
        for method, target, headers in requests:
            self.send(host, target, token=self.tokens["alice"], headers=headers, method=method)
        self.assertEqual(len(self.gateways.calls), len(requests))
        nonces = NonceCache(300)
        for call in self.gateways.calls:
            binding = policy.request_binding(call.method, call.path, call.headers)
            signature = call.headers.getRawHeaders(policy.SIGNATURE)
            policy.verify(signature, secret, self.clock.seconds(), nonces, binding)
            self.assertIsNone(call.headers.getRawHeaders(policy.AUTHORIZATION))
        self.assertEqual(self.gateways.calls[-1].path, b"/abs?x=1")

    def test_old_gateways(self) -> None:
        """With SignForOldGateways the old, unbound format goes too, beside the bound one."""
        self.config = replace(self.config, sign_for_old_gateways=True)
        self.site.handler._config = self.config  # type: ignore[attr-defined]
        self.send(self.host(self.cr.uuid), b"/p", token=self.tokens["alice"])
        [call] = self.gateways.calls
        secret = policy.gateway_secret(test_controller.ROOT_TOKEN, self.container.uuid)
        [old] = call.headers.getRawHeaders(policy.AUTHORIZATION, [])
        stamp, mac = old.decode().split(" ")
        self.assertEqual(mac, hmac.new(secret.encode(), stamp.encode(), hashlib.sha256).hexdigest())
        binding = policy.request_binding(call.method, call.path, call.headers)
        signature = call.headers.getRawHeaders(policy.SIGNATURE)
        policy.verify(signature, secret, self.clock.seconds(), NonceCache(300), binding)


class ConnectorSigningTests(SynchronousTestCase):
    """The connector's own signatures: a carrier's handshake, with and without old gateways."""

    def handshake(self, old_gateways: bool) -> Headers:
        connector = GatewayConnector(MemoryReactorClock(), old_gateways=old_gateways)
        sent: list[Any] = []

        async def capture(
            endpoint: Any, method: bytes, target: bytes, headers: Headers, deadline: Any = None
        ) -> Any:
            sent.append((method, target, headers))
            raise RuntimeError("captured")

        self.patch(proxy, "open_upgrade", capture)
        d = defer.ensureDeferred(connector._open_carrier(CTR, "127.0.0.1:9", SECRET))
        self.failureResultOf(d, RuntimeError)
        [(method, target, headers)] = sent
        self.assertEqual((method, target), (b"GET", carrier.PATH))
        binding = policy.request_binding(method, target, headers)
        policy.verify(headers.getRawHeaders(policy.SIGNATURE), SECRET, 0, NonceCache(300), binding)
        return headers

    def test_handshake_signed(self) -> None:
        """The handshake's signature covers its path, upgrade, target and window."""
        headers = self.handshake(old_gateways=False)
        self.assertIsNone(headers.getRawHeaders(policy.AUTHORIZATION))
        self.assertEqual(
            headers.getRawHeaders(carrier.WINDOW_HEADER), [b"%d" % carrier.STREAM_WINDOW]
        )

    def test_handshake_for_old_gateways(self) -> None:
        """With old gateways, the handshake carries the old format too."""
        headers = self.handshake(old_gateways=True)
        [old] = headers.getRawHeaders(policy.AUTHORIZATION, [])
        stamp, mac = old.decode().split(" ")
        self.assertEqual(mac, hmac.new(SECRET.encode(), stamp.encode(), hashlib.sha256).hexdigest())


class GatewayMovedSignatureTests(test_gateway.GatewayTestCase):
    """The in-memory gateway refuses a signature moved to another request, before the service."""

    def test_table(self) -> None:
        """Signed for GET /a on port 8001: any other method, path, port, host or upgrade is 401."""
        signed = self.sign(self.forwarded(), b"/a")
        value = dict(signed)[policy.SIGNATURE]

        def moved(**changes: Any) -> list[tuple[bytes, Any]]:
            return self.forwarded(authorization=value, **changes)

        cases = [
            ("POST", moved(), b"/a", b"POST"),
            ("path", moved(), b"/b", b"GET"),
            ("query", moved(), b"/a?admin=1", b"GET"),
            ("port", moved(port=b"8002"), b"/a", b"GET"),
            ("host", moved(request_host=b"evil.example"), b"/a", b"GET"),
            ("uuid", moved(target=test_gateway.OTHER.encode()), b"/a", b"GET"),
            (
                "upgrade",
                moved() + [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
                b"/a",
                b"GET",
            ),
            (
                "carrier",
                moved(port=None, request_host=None)
                + [(b"Connection", b"Upgrade"), (b"Upgrade", carrier.PROTOCOL)],
                carrier.PATH,
                b"GET",
            ),
        ]
        for name, headers, target, method in cases:
            response = self.refused(self.send(headers, target, method), 401)
            self.assertEqual(response.header(policy.GATEWAY_ERROR), b"bad signature", name)
        # Nothing was burned: the request it was made for still passes, once.
        self.send(signed, b"/a")
        self.assertEqual(len(self.runtime.endpoints), 1)

    def test_old_format_refused(self) -> None:
        """A request carrying only a valid signature of the old format is refused (401)."""
        headers = [h for h in self.forwarded(authorization=b"x") if h[0] != policy.SIGNATURE]
        headers.append(
            (policy.AUTHORIZATION, policy.sign(test_gateway.SECRET, self.clock.seconds()).encode())
        )
        response = self.refused(self.send(headers), 401)
        self.assertEqual(response.header(policy.GATEWAY_ERROR), b"missing x-arvados-signature")


class RealGatewayMovedSignatureTests(unittest.TestCase):
    """A signature captured from one request, sent straight to the real gateway with another."""

    def test_moved_signatures(self) -> defer.Deferred[None]:
        """Each moved signature gets 401 and reaches nothing; the request it was made for passes."""
        return defer.ensureDeferred(self._moved_signatures())

    async def _moved_signatures(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        cluster = chain.cluster
        other = cluster.store.create_container_request(cluster.user.uuid, name="other")
        assert other.container_uuid is not None
        bound = {
            policy.TARGET_UUID: cluster.container_uuid.encode(),
            policy.TARGET_PORT: b"%d" % (cluster.port,),
            policy.REQUEST_HOST: chain.vhost,
        }
        headers = Headers({name: [value] for name, value in bound.items()})
        policy.sign_request(headers, cluster.secret, time.time(), b"GET", b"/page")
        [signature] = headers.getRawHeaders(policy.SIGNATURE, [])

        def request(line: bytes, *extra: bytes, **changes: bytes) -> bytes:
            fields = dict(bound)
            for name, value in changes.items():
                fields[name.replace("_", "-").encode()] = value
            return raw_request(
                line,
                b"Host: " + cluster.gateway_address().encode(),
                *[name + b": " + value for name, value in fields.items()],
                policy.SIGNATURE + b": " + signature,
                *extra,
            )

        moved = [
            request(b"POST /page HTTP/1.1", b"Content-Length: 0"),
            request(b"DELETE /page HTTP/1.1"),
            request(b"GET /admin HTTP/1.1"),
            request(b"GET /page?x=1 HTTP/1.1"),
            request(b"GET /page HTTP/1.1", x_arvados_target_port=b"%d" % (cluster.port + 1,)),
            request(b"GET /page HTTP/1.1", x_arvados_request_host=b"evil.example"),
            request(b"GET /page HTTP/1.1", x_arvados_target_uuid=other.container_uuid.encode()),
            request(b"GET /page HTTP/1.1", b"Connection: Upgrade", b"Upgrade: websocket"),
        ]
        for data in moved:
            raw = await e2e.raw_exchange(reactor, chain.gateway_port, data, secret=cluster.secret)
            self.assertEqual(e2e.status_codes(raw), [401], (data, raw))
            self.assertIn(b"bad signature", raw)
        self.assertEqual(chain.service.received, [])
        raw = await e2e.raw_exchange(
            reactor, chain.gateway_port, request(b"GET /page HTTP/1.1"), secret=cluster.secret
        )
        self.assertEqual(e2e.status_codes(raw), [200], raw)
        self.assertEqual(chain.service.uris(), [b"/page"])


class OldGatewaysConfigTests(SynchronousTestCase):
    """C{ArvProxy.Gateway.SignForOldGateways}: off unless set to true; anything else refused."""

    def parse(self, gateway: dict[str, Any] | None) -> ClusterConfig:
        document = test_config.minimal()
        if gateway is not None:
            document["Clusters"]["zzzzz"]["ArvProxy"] = {"Gateway": gateway}
        return parse_config(document, "config.yml")

    def test_values(self) -> None:
        """Absent or false: off; true: on; a string or number: one error naming the key."""
        self.assertFalse(self.parse(None).sign_for_old_gateways)
        self.assertFalse(self.parse({"SignForOldGateways": False}).sign_for_old_gateways)
        self.assertTrue(self.parse({"SignForOldGateways": True}).sign_for_old_gateways)
        for value in ("true", 1, None):
            error = self.assertRaises(ConfigError, self.parse, {"SignForOldGateways": value})
            self.assertIn("Clusters.zzzzz.ArvProxy.Gateway.SignForOldGateways", str(error))
