"""
The gateway's TLS identity, derived from the per-container secret so the controller can pin it.

Every container has a secret, C{hex(HMAC-SHA256(key=SystemRootToken, msg=container UUID))}: 64
lower-case hex characters that the controller computes on demand and the gateway reads from its
standard input.  Both ends derive the same P-256 key pair from it (L{derive_private_key}).  The
gateway wraps the key in a fresh self-signed certificate at start-up
(L{make_server_certificate}, L{server_context_factory}); the controller expects exactly that
public key (L{expected_public_key}) and refuses, during the handshake, any peer that does not
hold it (L{client_creator}).  No CA, no stored certificate, no fingerprint shipped anywhere: a
machine in the middle with any other key fails the handshake before a single byte of the
request is sent, because TLS buffers application writes until the handshake has completed and
the handshake cannot complete without our verify callback's approval.

Why deriving the key is safe: the secret is 256 bits of HMAC-SHA256 output, unknown to anyone
without the SystemRootToken.  It is run through HKDF-SHA256 with a purpose label, so the
key never equals the secret and this use cannot collide with any other use of it, and 320 bits
of output are reduced modulo M{n-1} (FIPS 186-4 B.4.1, "extra random bits"), so the scalar is
uniform to within 2**-64.  The public key, or the certificate, reveals neither the private key
(that would be the discrete logarithm problem) nor the secret; the private key does not reveal
the secret either (HKDF is one-way).  So the private key is exactly as secret as the
per-container secret: anyone who can compute it already knows the secret, and could already
forge the requests the secret authenticates.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
)
from zope.interface import implementer

__all__ = [
    "ALPN_PROTOCOLS",
    "client_creator",
    "leaf_is_acceptable",
    "derive_private_key",
    "expected_public_key",
    "make_server_certificate",
    "server_context_factory",
]

_KEY_LABEL = b"arvproxy gateway TLS key v1"
_CURVE = ec.SECP256R1()
_CURVE_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# 256 bits of the order plus 64 extra, so the reduction below is unbiased to within 2**-64.
_DERIVED_BYTES = 40
_SECRET_FORMAT = re.compile(r"[0-9a-f]{64}")

CERTIFICATE_LIFETIME = timedelta(days=365)
"""How long a gateway certificate is valid after it is made.  The gateway makes a new one
every time it starts, so this only needs to outlast the longest container."""

CLOCK_SKEW = timedelta(hours=1)
"""How far back a new certificate's validity starts, so a controller whose clock is behind the
gateway's still accepts it."""

ALPN_PROTOCOLS: tuple[bytes, ...] = (b"http/1.1",)
"""The only application protocol either end offers: the hops speak HTTP/1.1, never h2."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _secret_bytes(secret: str) -> bytes:
    """
    Parse a per-container secret, refusing anything that is not 64 lower-case hex characters.

    The message never contains the secret, since it may end up in a log.
    """
    if not isinstance(secret, str) or not _SECRET_FORMAT.fullmatch(secret):
        raise ValueError(
            "a container secret must be 64 lower-case hex characters (an HMAC-SHA256 hex digest)"
        )
    return secret.encode("ascii")


def derive_private_key(secret: str) -> ec.EllipticCurvePrivateKey:
    """
    Derive the gateway's P-256 private key from the per-container secret.

    The scalar is C{(HKDF-SHA256(secret, info=b"arvproxy gateway TLS key v1", 40 bytes)
    mod (n - 1)) + 1}, so it lies in C{[1, n-1]}; the same secret always gives the same key.
    See the module docstring for why this is safe.  Getting the public key costs a scalar
    multiplication: cache what you derive from it.

    @raise ValueError: if C{secret} is not 64 lower-case hex characters.
    """
    okm = HKDF(algorithm=hashes.SHA256(), length=_DERIVED_BYTES, salt=None, info=_KEY_LABEL).derive(
        _secret_bytes(secret)
    )
    scalar = int.from_bytes(okm, "big") % (_CURVE_ORDER - 1) + 1
    return ec.derive_private_key(scalar, _CURVE)


def _public_key_der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def expected_public_key(secret: str) -> bytes:
    """
    Return the DER SubjectPublicKeyInfo of the gateway key for C{secret}: what the controller pins.

    @raise ValueError: if C{secret} is not 64 lower-case hex characters.
    """
    return _public_key_der(derive_private_key(secret).public_key())


def _general_name(name: str) -> x509.GeneralName:
    """An C{IPAddress} entry for an IP address literal, a C{DNSName} for anything else."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_server_certificate(
    secret: str, hostnames: Sequence[str] = (), now: datetime | None = None
) -> PrivateCertificate:
    """
    Make a fresh self-signed certificate for the gateway key derived from C{secret}.

    The certificate has a random serial, is valid from C{now - CLOCK_SKEW} for
    L{CERTIFICATE_LIFETIME}, is not a CA, and names each of C{hostnames} in its
    subjectAltName (IP address literals as C{IPAddress}, anything else as C{DNSName}).  The
    controller does not check the names, only the key and the validity period; they are there
    for people inspecting the certificate and for other clients.

    @param now: the time the certificate is made, timezone-aware; C{None} means now.
    @raise ValueError: if C{secret} is malformed or C{now} is naive.
    """
    if now is None:
        now = _utcnow()
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    key = derive_private_key(secret)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "arvproxy gateway")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CERTIFICATE_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if hostnames:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in hostnames]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    return PrivateCertificate.fromCertificateAndKeyPair(
        Certificate(crypto.X509.from_cryptography(cert)),
        KeyPair(crypto.PKey.from_cryptography_key(key)),
    )


def server_context_factory(secret: str, hostnames: Sequence[str] = ()) -> CertificateOptions:
    """
    Return the gateway's server TLS options: a fresh certificate for the key derived from
    C{secret}, TLS 1.2 or newer, ALPN offering only C{http/1.1}.

    Pass the result to C{SSL4ServerEndpoint}, C{wrapServerTLS} or C{listenSSL}.
    """
    certificate = make_server_certificate(secret, hostnames)
    options = CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableProtocols=list(ALPN_PROTOCOLS),
    )
    # Idle connections (WebSockets) give their read and write buffers back: ~20 KB each.
    options.getContext().set_mode(SSL.MODE_RELEASE_BUFFERS)
    return options


def leaf_is_acceptable(certificate: x509.Certificate, expected_spki: bytes, now: datetime) -> bool:
    """
    Decide whether the certificate a gateway presented is the one we pinned.

    True only if its public key is exactly C{expected_spki} (DER SubjectPublicKeyInfo) and
    C{now} lies within its validity period.  Names, issuer and signature are not consulted:
    the TLS handshake itself proves the peer holds the private key of the key we compare.
    """
    presented = _public_key_der(certificate.public_key())
    if not hmac.compare_digest(presented, expected_spki):
        return False
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedConnectionCreator:
    """
    Makes client TLS connections that complete only with the holder of one pinned key.

    One L{SSL.Context} serves every connection; it holds the expected public key, not the
    secret it was derived from.
    """

    def __init__(self, expected_spki: bytes, clock: Callable[[], datetime]) -> None:
        self._expected_spki = expected_spki
        self._clock = clock
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION)
        # No trust store is loaded, so OpenSSL alone never accepts a chain: the connection
        # completes only if _verify says yes, and it says yes only for the pinned leaf.
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        ctx.set_alpn_protos(list(ALPN_PROTOCOLS))
        # Idle connections (WebSockets) give their read and write buffers back.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        self._context = ctx

    def _verify(
        self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        """
        OpenSSL's verify callback: accept the leaf (depth 0) only if it is the pinned one.

        OpenSSL's own verdict (C{ok}, C{errno}) is ignored: it always objects to a self-signed
        certificate.  Any certificate above the leaf is refused; a gateway sends only its own.
        """
        if depth != 0:
            return False
        try:
            return leaf_is_acceptable(cert.to_cryptography(), self._expected_spki, self._clock())
        except Exception:
            # An exception here would surface later from the handshake; refusing is simpler.
            return False

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """Make a client-side connection that verifies the peer against the pin."""
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


def client_creator(
    secret: str, clock: Callable[[], datetime] = _utcnow
) -> IOpenSSLClientConnectionCreator:
    """
    Return client TLS options that complete a handshake only with the gateway holding the key
    derived from C{secret}, and only while its certificate is valid according to C{clock}.

    A peer with any other key fails the handshake; whatever the application wrote is discarded
    unsent.  Usable directly as C{wrapClientTLS(client_creator(secret), endpoint)}.  Making
    one costs a key derivation; reuse it for every connection to the same gateway.

    @raise ValueError: if C{secret} is not 64 lower-case hex characters.
    """
    return _PinnedConnectionCreator(expected_public_key(secret), clock)
