"""
Tests for L{arvproxy.tlsidentity}: the derived gateway key and the controller's pin on it.

Handshakes run over real loopback sockets on 127.0.0.1, because a fake transport could not
show that a wrong key stops the request before the server sees it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface.verify import verifyObject

from arvproxy.hopclient import HopPool, HopResponse
from arvproxy.tlsidentity import (
    CERTIFICATE_LIFETIME,
    CLOCK_SKEW,
    client_creator,
    derive_private_key,
    expected_public_key,
    leaf_is_acceptable,
    make_server_certificate,
    server_context_factory,
)


def _container_secret(uuid: str) -> str:
    return hmac.new(b"system-root-token", uuid.encode(), hashlib.sha256).hexdigest()


SECRET = _container_secret("zzzzz-dz642-000000000000001")
OTHER_SECRET = _container_secret("zzzzz-dz642-000000000000002")
HOST = b"gw-zzzzz-dz642-000000000000001-0.invalid"
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _crypto_cert(certificate: PrivateCertificate) -> x509.Certificate:
    return certificate.original.to_cryptography()


def _options(certificate: PrivateCertificate) -> CertificateOptions:
    """Server options for an arbitrary (possibly hostile) certificate."""
    return CertificateOptions(
        privateKey=certificate.privateKey.original, certificate=certificate.original
    )


def _impostor_certificate(genuine: PrivateCertificate) -> PrivateCertificate:
    """A self-signed certificate copying C{genuine}'s subject and names, with a random key."""
    original = _crypto_cert(genuine)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.issuer)
        .public_key(key.public_key())
        .serial_number(original.serial_number)
        .not_valid_before(original.not_valid_before_utc)
        .not_valid_after(original.not_valid_after_utc)
    )
    for extension in original.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    forged = builder.sign(key, hashes.SHA256())
    return PrivateCertificate.loadPEM(
        forged.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class DerivationTests(SynchronousTestCase):
    def test_deterministic(self) -> None:
        """The same secret always derives the same private key."""
        first = derive_private_key(SECRET).private_numbers().private_value
        second = derive_private_key(SECRET).private_numbers().private_value
        self.assertEqual(first, second)

    def test_differs_per_secret(self) -> None:
        """Different secrets derive different keys."""
        self.assertNotEqual(expected_public_key(SECRET), expected_public_key(OTHER_SECRET))

    def test_p256(self) -> None:
        """The derived key is on P-256."""
        self.assertIsInstance(derive_private_key(SECRET).curve, ec.SECP256R1)

    def test_expected_public_key_is_der_spki(self) -> None:
        """expected_public_key is the DER SubjectPublicKeyInfo of the derived key."""
        pinned = expected_public_key(SECRET)
        self.assertEqual(pinned, _spki(derive_private_key(SECRET)))
        loaded = serialization.load_der_public_key(pinned)
        self.assertIsInstance(loaded, ec.EllipticCurvePublicKey)

    def test_malformed_secret_rejected(self) -> None:
        """A secret that is not 64 lower-case hex characters is refused without being echoed."""
        for bad in ["", "s3cret", SECRET[:-1], SECRET + "0", SECRET.upper(), SECRET + "\n"]:
            with self.assertRaises(ValueError) as caught:
                derive_private_key(bad)
            if bad:
                self.assertNotIn(bad.strip(), str(caught.exception))


class CertificateTests(SynchronousTestCase):
    def test_certificate_carries_derived_key(self) -> None:
        """The certificate's public key is the one the controller pins."""
        cert = _crypto_cert(make_server_certificate(SECRET, now=NOW))
        self.assertEqual(_spki_of(cert), expected_public_key(SECRET))

    def test_private_key_matches(self) -> None:
        """The PrivateCertificate holds the derived private key."""
        certificate = make_server_certificate(SECRET, now=NOW)
        key = certificate.privateKey.original.to_cryptography_key()
        self.assertEqual(_spki(key), expected_public_key(SECRET))

    def test_validity_period(self) -> None:
        """The certificate is valid from an hour before now for a year."""
        cert = _crypto_cert(make_server_certificate(SECRET, now=NOW))
        self.assertEqual(cert.not_valid_before_utc, NOW - CLOCK_SKEW)
        self.assertEqual(cert.not_valid_after_utc, NOW + CERTIFICATE_LIFETIME)
        self.assertEqual(CERTIFICATE_LIFETIME, timedelta(days=365))

    def test_not_a_ca(self) -> None:
        """The certificate is a server leaf, not a CA."""
        cert = _crypto_cert(make_server_certificate(SECRET, now=NOW))
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.SERVER_AUTH])

    def test_subject_alternative_names(self) -> None:
        """Names become DNSName entries and IP literals IPAddress entries."""
        names = ["gw.example", "127.0.0.1", "::1"]
        cert = _crypto_cert(make_server_certificate(SECRET, names, now=NOW))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["gw.example"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    def test_no_names(self) -> None:
        """Without names the certificate has no subjectAltName extension."""
        cert = _crypto_cert(make_server_certificate(SECRET, now=NOW))
        with self.assertRaises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    def test_fresh_serial_each_time(self) -> None:
        """Each certificate gets a new random serial number."""
        first = _crypto_cert(make_server_certificate(SECRET, now=NOW))
        second = _crypto_cert(make_server_certificate(SECRET, now=NOW))
        self.assertNotEqual(first.serial_number, second.serial_number)

    def test_self_signed(self) -> None:
        """The certificate is signed by its own key."""
        cert = _crypto_cert(make_server_certificate(SECRET, now=NOW))
        cert.verify_directly_issued_by(cert)

    def test_naive_now_rejected(self) -> None:
        """A naive datetime for now is refused rather than guessed at."""
        with self.assertRaises(ValueError):
            make_server_certificate(SECRET, now=datetime(2030, 1, 1))

    def test_server_context_factory(self) -> None:
        """server_context_factory builds a usable server context for the derived key."""
        options = server_context_factory(SECRET, ["127.0.0.1"])
        self.assertIsInstance(options, CertificateOptions)
        context = options.getContext()
        context.check_privatekey()


def _spki_of(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class LeafCheckTests(SynchronousTestCase):
    def test_pinned_and_valid(self) -> None:
        """The pinned key inside its validity period is accepted."""
        cert = _crypto_cert(make_server_certificate(SECRET, now=NOW))
        self.assertTrue(leaf_is_acceptable(cert, expected_public_key(SECRET), NOW))

    def test_other_key(self) -> None:
        """Any other key is refused."""
        cert = _crypto_cert(make_server_certificate(OTHER_SECRET, now=NOW))
        self.assertFalse(leaf_is_acceptable(cert, expected_public_key(SECRET), NOW))

    def test_validity_bounds(self) -> None:
        """The pinned key is refused before and after the validity period."""
        cert = _crypto_cert(make_server_certificate(SECRET, now=NOW))
        pinned = expected_public_key(SECRET)
        cases = [
            (NOW - CLOCK_SKEW - timedelta(seconds=1), False),
            (NOW - CLOCK_SKEW, True),
            (NOW + CERTIFICATE_LIFETIME, True),
            (NOW + CERTIFICATE_LIFETIME + timedelta(seconds=1), False),
        ]
        for when, expected in cases:
            self.assertEqual(leaf_is_acceptable(cert, pinned, when), expected, when)


class CreatorTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """client_creator gives what wrapClientTLS expects."""
        verifyObject(IOpenSSLClientConnectionCreator, client_creator(SECRET))


class _CountingResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.renders = 0

    def render_GET(self, request: Request) -> bytes:
        self.renders += 1
        return b"hello from the gateway"


class _TrackingSite(Site):
    """A Site that remembers each connection it served and when it was lost."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        lost: Deferred[None] = Deferred()
        original = protocol.connectionLost

        def connectionLost(reason: Failure) -> None:
            try:
                original(reason)
            finally:
                lost.callback(None)

        protocol.connectionLost = connectionLost
        self.lost.append(lost)
        return protocol


class _Recorder(Protocol):
    """Records what arrives; C{lost} fires on disconnection, with the reason in C{reason}."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.received = b""
        self.greeting = greeting
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason
        self.lost.callback(None)


class _Echo(_Recorder):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(data)  # type: ignore[union-attr]


class LoopbackClientTests(TestCase):
    """
    The front door's client to a gateway (L{HopPool} over C{wrapClientTLS(client_creator())},
    as L{arvproxy.controller.proxy.GatewayConnector} builds it) against a gateway Site over
    real TLS on 127.0.0.1.
    """

    async def _serve(self, options: Any) -> tuple[int, _TrackingSite, _CountingResource]:
        resource = _CountingResource()
        site = _TrackingSite(resource)
        endpoint: IStreamServerEndpoint = SSL4ServerEndpoint(
            reactor, 0, options, interface="127.0.0.1"
        )
        port = await endpoint.listen(site)
        self.addCleanup(port.stopListening)
        # Cleanups run last-in first-out: this waits for the server side to see every
        # disconnection before the port above stops listening.
        self.addCleanup(lambda: gatherResults(site.lost))
        return cast(IPv4Address, port.getHost()).port, site, resource

    def _get(self, pool: HopPool, port: int, secret: str = SECRET) -> Deferred[HopResponse]:
        endpoint = wrapClientTLS(
            client_creator(secret), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        )
        headers = Headers({b"host": [b"gw.example"]})
        return pool.request(("container", port), endpoint, b"GET", b"/", headers, None)

    def _pool(self) -> HopPool:
        pool = HopPool(reactor, idle_timeout=60)
        self.addCleanup(pool.closeCachedConnections)
        return pool

    async def _refused(
        self, options: Any, secret: str = SECRET
    ) -> tuple[ResponseNeverReceived, _TrackingSite, _CountingResource]:
        port, site, resource = await self._serve(options)
        try:
            await self._get(self._pool(), port, secret)
        except ResponseNeverReceived as error:
            await gatherResults(site.lost)
            return error, site, resource
        self.fail("the request reached a server that does not hold the pinned key")

    def assertHandshakeRefused(self, error: ResponseNeverReceived) -> None:
        reasons = error.reasons
        self.assertEqual(len(reasons), 1)
        self.assertTrue(reasons[0].check(SSL.Error), reasons[0])
        self.assertIn("certificate verify failed", str(reasons[0].value))

    def test_pinned_gateway_reused(self) -> Deferred[None]:
        """Two requests to the pinned gateway succeed over one reused connection."""

        async def go() -> None:
            port, site, resource = await self._serve(server_context_factory(SECRET))
            pool = self._pool()
            for _ in range(2):
                response = await self._get(pool, port)
                self.assertEqual(response.code, 200)
                self.assertEqual(await readBody(response), b"hello from the gateway")
            self.assertEqual(resource.renders, 2)
            self.assertEqual(len(site.lost), 1)

        return ensureDeferred(go())

    def test_other_secret_refused(self) -> Deferred[None]:
        """A gateway keyed by another container's secret fails the handshake unseen."""

        async def go() -> None:
            error, site, resource = await self._refused(server_context_factory(OTHER_SECRET))
            self.assertHandshakeRefused(error)
            self.assertEqual(resource.renders, 0)
            self.assertEqual(len(site.lost), 1)

        return ensureDeferred(go())

    def test_impostor_copying_names_refused(self) -> Deferred[None]:
        """An unrelated key in a certificate copying the real subject and names is refused."""

        async def go() -> None:
            genuine = make_server_certificate(SECRET, ["127.0.0.1", "gw.example"])
            impostor = _impostor_certificate(genuine)
            self.assertEqual(_crypto_cert(impostor).subject, _crypto_cert(genuine).subject)
            error, site, resource = await self._refused(_options(impostor))
            self.assertHandshakeRefused(error)
            self.assertEqual(resource.renders, 0)

        return ensureDeferred(go())

    def test_expired_certificate_refused(self) -> Deferred[None]:
        """The right key in an expired certificate is refused."""

        async def go() -> None:
            long_ago = datetime.now(UTC) - CERTIFICATE_LIFETIME - timedelta(days=1)
            expired = make_server_certificate(SECRET, now=long_ago)
            error, site, resource = await self._refused(_options(expired))
            self.assertHandshakeRefused(error)
            self.assertEqual(resource.renders, 0)

        return ensureDeferred(go())


class LoopbackRawTests(TestCase):
    """client_creator with wrapClientTLS on a raw stream, as the WebSocket code uses it."""

    async def _connect(
        self, server_options: Any, secret: str, greeting: bytes
    ) -> tuple[_Recorder, _Recorder]:
        servers: list[_Recorder] = []

        def build() -> _Recorder:
            servers.append(_Echo())
            return servers[-1]

        endpoint = SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1")
        port = await endpoint.listen(Factory.forProtocol(build))
        self.addCleanup(port.stopListening)
        client = wrapClientTLS(
            client_creator(secret),
            TCP4ClientEndpoint(reactor, "127.0.0.1", cast(IPv4Address, port.getHost()).port),
        )
        protocol = cast(
            _Recorder, await client.connect(Factory.forProtocol(lambda: _Recorder(greeting)))
        )
        self.addCleanup(lambda: gatherResults([s.lost for s in servers] + [protocol.lost]))
        while not servers:
            await _turn()
        return protocol, servers[0]

    def test_pinned_stream(self) -> Deferred[None]:
        """Bytes written before the handshake reach the pinned gateway, over http/1.1 ALPN."""

        async def go() -> None:
            # The server would prefer h2; the client must offer http/1.1 only.
            certificate = make_server_certificate(SECRET)
            options = CertificateOptions(
                privateKey=certificate.privateKey.original,
                certificate=certificate.original,
                acceptableProtocols=[b"h2", b"http/1.1"],
            )
            client, server = await self._connect(options, SECRET, b"ping")
            while client.received != b"ping":
                await _turn()
            self.assertEqual(server.received, b"ping")
            self.assertEqual(client.transport.negotiatedProtocol, b"http/1.1")  # type: ignore[union-attr]
            client.transport.loseConnection()  # type: ignore[union-attr]

        return ensureDeferred(go())

    def test_wrong_key_stream_sends_nothing(self) -> Deferred[None]:
        """Bytes written before the handshake never reach a gateway with another key."""

        async def go() -> None:
            options = server_context_factory(OTHER_SECRET)
            client, server = await self._connect(options, SECRET, b"do not leak")
            await client.lost
            assert client.reason is not None
            self.assertTrue(client.reason.check(SSL.Error), client.reason)
            await server.lost
            self.assertEqual(server.received, b"")

        return ensureDeferred(go())


def _turn() -> Deferred[None]:
    return deferLater(reactor, 0.01, lambda: None)
