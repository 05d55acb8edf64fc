"""
Hypothesis property tests of the header, vhost, request-target and signature rules (issue 16):
whatever a client sends, the service reads only the proxy's values of the proxy's headers, under
any spelling a CGI, WSGI or Rack server would map to them; a vhost outside the suffix is never a
target; every request target becomes origin-form or a refusal; no two requests share a binding.

Examples are drawn afresh each run; a failure prints the example that broke the rule.  No
deadline: the machine's speed must never fail a test.
"""

from __future__ import annotations

import re
import string
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.config import ExternalURL
from arvproxy.errors import BadRequest
from arvproxy.policy import NonceCache, SignatureError

CTR = "zzzzz-dz642-0123456789abcde"
REQUEST_HOST = f"{CTR}-8080.containers.localhost:8900".encode()
CLIENT_IP = "198.51.100.7"
PROXY_IP = "10.0.0.1"
LOCAL = ExternalURL("http", "containers.localhost", 8900)
SECRET = "ab" * 32

PROPERTIES = settings(deadline=None, max_examples=200)

# Names the proxy sets, owns or strips, and names frameworks believe about the client.
OWNED = [
    b"x-arvados-target-uuid",
    b"x-arvados-target-port",
    b"x-arvados-request-host",
    b"x-arvados-signature",
    b"x-arvados-authorization",
    b"x-arvados-gateway-error",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-real-ip",
    b"forwarded",
    b"true-client-ip",
    b"x-client-ip",
    b"cf-connecting-ip",
    b"x-cluster-client-ip",
    b"x-forwarded-port",
    b"x-original-url",
    b"arvproxy-carrier-window",
    b"host",
    b"connection",
    b"upgrade",
    b"keep-alive",
    b"te",
    b"transfer-encoding",
    b"content-length",
    b"proxy-authorization",
]
# What the service must see, and only once: the proxy's values (for an untrusted client).
PROXY_VALUES = {
    "HTTP_X_ARVADOS_TARGET_UUID": None,
    "HTTP_X_ARVADOS_TARGET_PORT": None,
    "HTTP_X_ARVADOS_REQUEST_HOST": None,
    "HTTP_X_ARVADOS_SIGNATURE": None,
    "HTTP_X_ARVADOS_AUTHORIZATION": None,
    "HTTP_X_ARVADOS_GATEWAY_ERROR": None,
    "HTTP_X_FORWARDED_FOR": [CLIENT_IP.encode()],
    "HTTP_X_FORWARDED_PROTO": [b"https"],
    "HTTP_X_FORWARDED_HOST": [REQUEST_HOST],
    "HTTP_X_REAL_IP": [CLIENT_IP.encode()],
    "HTTP_HOST": [REQUEST_HOST],
    "HTTP_FORWARDED": None,
    "HTTP_TRUE_CLIENT_IP": None,
    "HTTP_X_CLIENT_IP": None,
    "HTTP_CF_CONNECTING_IP": None,
    "HTTP_X_CLUSTER_CLIENT_IP": None,
    "HTTP_X_FORWARDED_PORT": None,
    "HTTP_X_ORIGINAL_URL": None,
    "HTTP_ARVPROXY_CARRIER_WINDOW": None,
}


@st.composite
def spelling(draw: Any, name: bytes) -> bytes:
    """C{name} with each letter in either case and each C{-} a C{-} or a C{_}."""
    out = bytearray()
    for byte in name:
        char = bytes([byte])
        if char == b"-":
            char = draw(st.sampled_from([b"-", b"_"]))
        elif char.isalpha():
            char = draw(st.sampled_from([char.lower(), char.upper()]))
        out += char
    return bytes(out)


TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
token = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20).map(str.encode)
value = st.binary(max_size=30).map(
    lambda raw: bytes(b for b in raw if 0x20 <= b < 0x7F).strip()
) | st.sampled_from([b"6.6.6.6", b"evil.example", b"1", b"upgrade", b"close, x-real-ip"])
name = st.sampled_from(OWNED).flatmap(spelling) | token
client_headers = st.lists(st.tuples(name, value), max_size=25)


def headers_of(pairs: list[tuple[bytes, bytes]]) -> Headers:
    headers = Headers()
    for header, text in pairs:
        headers.addRawHeader(header, text)
    return headers


def cgi_environ(headers: Headers) -> dict[str, list[bytes]]:
    """C{headers} as a CGI/WSGI/Rack server reads them: C{-} and C{_} alike, any case."""
    environ: dict[str, list[bytes]] = {}
    for header, values in headers.getAllRawHeaders():
        key = "HTTP_" + header.decode("latin-1").upper().replace("-", "_")
        environ.setdefault(key, []).extend(values)
    return environ


def to_gateway(client: Headers, trusted: bool = False) -> Headers:
    return policy.gateway_request_headers(
        client,
        target_uuid=CTR,
        target_port=8080,
        request_host=REQUEST_HOST,
        client_ip=PROXY_IP if trusted else CLIENT_IP,
        proto="https",
        trusted_peer=trusted,
    )


class HeaderProperties(SynchronousTestCase):
    @PROPERTIES
    @given(client_headers)
    def test_front_door(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Whatever the client sends, the gateway gets the proxy's headers once, nothing forged."""
        sent = to_gateway(headers_of(pairs))
        fields = {n.lower(): list(v) for n, v in sent.getAllRawHeaders()}
        self.assertEqual(fields[b"x-arvados-target-uuid"], [CTR.encode()])
        self.assertEqual(fields[b"x-arvados-target-port"], [b"8080"])
        self.assertEqual(fields[b"x-arvados-request-host"], [REQUEST_HOST])
        self.assertEqual(fields[b"x-forwarded-for"], [CLIENT_IP.encode()])
        self.assertEqual(fields[b"x-real-ip"], [CLIENT_IP.encode()])
        self.assertEqual(fields[b"x-forwarded-proto"], [b"https"])
        self.assertEqual(fields[b"x-forwarded-host"], [REQUEST_HOST])
        for header in fields:
            self.assertNotIn(b"_", header)
            self.assertNotIn(header, policy.HOP_BY_HOP | {b"host", b"content-length"})
            self.assertNotIn(header, policy.CLIENT_CLAIMS - {policy.REAL_IP})
        proxy_set = {b"x-arvados-target-uuid", b"x-arvados-target-port", b"x-arvados-request-host"}
        arvados = {h for h in fields if h.startswith(b"x-arvados-")}
        self.assertEqual(arvados, proxy_set)

    @PROPERTIES
    @given(client_headers, client_headers)
    def test_through_both_hops(
        self, pairs: list[tuple[bytes, bytes]], added: list[tuple[bytes, bytes]]
    ) -> None:
        """
        Through both hops (even with headers added between them), a CGI-style service reads
        exactly the proxy's values of every header the proxy sets or owns.
        """
        sent = to_gateway(headers_of(pairs))
        policy.sign_request(sent, SECRET, 0, b"GET", b"/")
        for header, text in added:
            # Whatever else arrives at the gateway: the front door's are still the only ones.
            if not header.lower().startswith(b"x-arvados-") and b"_" in header:
                sent.addRawHeader(header, text)
        environ = cgi_environ(policy.container_request_headers(sent, REQUEST_HOST))
        for key, expected in PROXY_VALUES.items():
            self.assertEqual(environ.get(key), expected, key)

    @PROPERTIES
    @given(client_headers, st.booleans())
    def test_decisions_change_nothing(
        self, pairs: list[tuple[bytes, bytes]], trusted: bool
    ) -> None:
        """The kept per-name decisions give the answers deciding afresh would."""
        client = headers_of(pairs)
        warm = [to_gateway(client, trusted), policy.container_request_headers(client, b"h")]
        saved = policy._decisions
        policy._decisions = {}
        try:
            cold = [to_gateway(client, trusted), policy.container_request_headers(client, b"h")]
        finally:
            policy._decisions = saved
        for a, b in zip(warm, cold, strict=True):
            self.assertEqual(list(a.getAllRawHeaders()), list(b.getAllRawHeaders()))

    @PROPERTIES
    @given(client_headers, st.lists(st.ip_addresses(v=4).map(str), max_size=4))
    def test_trusted_proxy(self, pairs: list[tuple[bytes, bytes]], chain: list[str]) -> None:
        """Through a trusted proxy, X-Real-IP is an address of its X-Forwarded-For, or itself."""
        client = headers_of(pairs)
        client.removeHeader(b"x-forwarded-for")
        if chain:
            client.setRawHeaders(b"x-forwarded-for", [", ".join(chain).encode()])
        fields = {n.lower(): list(v) for n, v in to_gateway(client, True).getAllRawHeaders()}
        [real_ip] = fields[b"x-real-ip"]
        self.assertIn(real_ip.decode(), chain[-1:] or [PROXY_IP])
        self.assertEqual(fields[b"x-forwarded-host"], [REQUEST_HOST])


label = st.from_regex(rb"\A[a-z0-9]{5}-[a-z0-9]{5}-[a-z0-9]{15}-[0-9]{1,5}\Z")
host_part = st.text(alphabet=string.ascii_letters + string.digits + ".-:[]", max_size=40).map(
    str.encode
)


class VhostProperties(SynchronousTestCase):
    @PROPERTIES
    @given(
        st.one_of(
            host_part,
            st.tuples(label, host_part).map(lambda t: t[0] + b"." + t[1]),
            st.tuples(label, st.sampled_from([b"", b"evil", b"x."]), host_part).map(
                lambda t: t[0] + b"." + t[1] + b"containers.localhost" + t[2]
            ),
            label.map(lambda lab: lab + b".containers.localhost:8900"),
        )
    )
    def test_never_outside_the_suffix(self, host: bytes) -> None:
        """A host names a target only if it is C{<uuid>-<port>.<suffix>[:8900]}, any case."""
        try:
            target = policy.parse_vhost(host, LOCAL)
        except BadRequest:
            return
        if target is None:
            return
        name = host.strip().lower().rsplit(b":", 1)[0] if b":" in host else host.strip().lower()
        self.assertTrue(name.endswith(b".containers.localhost"), host)
        # The port may be written with leading zeros, as Arvados' own Sscanf("%d") reads it.
        uuid, _, port = name[: -len(b".containers.localhost")].rpartition(b"-")
        self.assertEqual((uuid.decode(), int(port)), (target.uuid, target.port), host)
        self.assertTrue(1 <= target.port <= 65535)


visible = st.binary(min_size=1, max_size=40).map(
    lambda raw: bytes(b for b in raw if 0x21 <= b < 0x7F)
)
target = visible | st.tuples(
    st.sampled_from([b"http://", b"HTTPS://", b"ftp://", b"http:/", b"//", b"/", b"*", b""]),
    visible,
).map(lambda t: t[0] + t[1])


class TargetProperties(SynchronousTestCase):
    @PROPERTIES
    @given(st.sampled_from([b"GET", b"OPTIONS", b"CONNECT", b"POST"]), target)
    def test_origin_form_or_refused(self, method: bytes, raw: bytes) -> None:
        """Any target becomes a forwardable path (and perhaps a host), or a 400."""
        try:
            path, authority = policy.origin_form(method, raw)
        except BadRequest:
            return
        self.assertTrue(path.startswith(b"/"), (raw, path))
        self.assertNotIn(b"#", path)
        self.assertTrue(policy.is_forwardable_request_line(method, path), (raw, path))
        if authority is None:
            self.assertEqual(path, raw)
            return
        self.assertTrue(re.match(rb"(?i)https?://", raw), raw)
        self.assertNotIn(b"@", authority)
        # The URL is the scheme, the authority, then the path (or a query alone).
        start = raw.index(b"://") + 3
        self.assertEqual(raw[start : start + len(authority)], authority)
        rest = raw[start + len(authority) :]
        self.assertIn(path, (rest, b"/" + rest))


bound_value = st.none() | st.lists(st.binary(max_size=6), min_size=1, max_size=3)
bound_request = st.tuples(
    st.sampled_from([b"GET", b"POST", b"G", b"GE"]),
    st.binary(max_size=8),
    bound_value,
    bound_value,
    bound_value,
    st.none() | st.binary(max_size=6),
)


def binding_of(request: tuple[Any, ...]) -> bytes:
    method, target_, uuid, port, host, upgrade = request
    headers = Headers()
    for header, values in [
        (policy.TARGET_UUID, uuid),
        (policy.TARGET_PORT, port),
        (policy.REQUEST_HOST, host),
    ]:
        if values is not None:
            # As parsed (no scrubbing): the binding must tell apart any bytes at all.
            headers._rawHeaders[policy._canonical(header)] = list(values)
    if upgrade is not None:
        headers._rawHeaders[b"Connection"] = [b"upgrade"]
        headers._rawHeaders[b"Upgrade"] = [upgrade]
    return policy.request_binding(method, target_, headers)


class SignatureProperties(SynchronousTestCase):
    @PROPERTIES
    @given(bound_request, bound_request)
    def test_bindings_differ(self, a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
        """Two requests that differ in anything bound never share a binding."""
        if a != b:
            self.assertNotEqual(binding_of(a), binding_of(b))
        else:
            self.assertEqual(binding_of(a), binding_of(b))

    @PROPERTIES
    @given(bound_request, bound_request)
    def test_signature_fits_its_request_only(self, a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
        """A signature made for one request verifies for no other."""
        value = policy.sign(SECRET, 0, binding=binding_of(a)).encode()
        try:
            policy.verify([value], SECRET, 0, NonceCache(300), binding_of(b))
        except SignatureError:
            self.assertNotEqual(a, b)
        else:
            self.assertEqual(a, b)
