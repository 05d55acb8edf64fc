"""
Tests for L{arvproxy.policy}, written as an attacker would: every row is a way to name the wrong
target, keep a token where it should not be, smuggle a header past a hop or forge, stretch or
replay a signature between the controller and a gateway.

The tables collect every mismatching row before failing, so one run shows all the rows that break.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.config import ExternalURL
from arvproxy.errors import BadRequest
from arvproxy.policy import NonceCache, SignatureError, Target

CTR = "zzzzz-dz642-0123456789abcde"
CR = "zzzzz-xvhdp-abcdefghij01234"
OTHER_CTR = "zzzzz-dz642-zzzzzzzzzzzzzzz"

# http://*.containers.localhost:8900 (a non-default port) and https://*.containers.example.com.
LOCAL = ExternalURL("http", "containers.localhost", 8900)
SECURE = ExternalURL("https", "containers.example.com", None)

_RAISES = object()


def mismatches(rows: Iterable[tuple[Any, Any]], function: Callable[[Any], Any]) -> list[str]:
    """Run C{function} on each row's input; describe every row whose result is not the expected."""
    problems = []
    for given, expected in rows:
        try:
            actual = function(given)
        except Exception as e:  # the tables expect exceptions as values
            actual = type(e)
        if actual != expected:
            problems.append(f"{given!r}: expected {expected!r}, got {actual!r}")
    return problems


class TableMixin:
    """A table assertion that reports every failing row at once."""

    def assertRows(self, rows: Iterable[tuple[Any, Any]], function: Callable[[Any], Any]) -> None:
        problems = mismatches(rows, function)
        if problems:
            self.fail(  # type: ignore[attr-defined]
                f"{len(problems)} rows failed:\n" + "\n".join(problems)
            )


# --- Hosts --------------------------------------------------------------------------------------


class VhostTests(TableMixin, SynchronousTestCase):
    """L{policy.parse_vhost} and L{policy.is_service_host}."""

    def test_valid_vhosts(self) -> None:
        """A UUID and a port under the suffix name a target, in any case, with or without port."""
        rows = [
            ((f"{CTR}-80.containers.localhost:8900", LOCAL), Target(CTR, 80)),
            ((f"{CTR}-80.containers.localhost", LOCAL), Target(CTR, 80)),
            ((f"{CR}-8888.containers.localhost:8900", LOCAL), Target(CR, 8888)),
            ((f"{CTR.upper()}-80.CONTAINERS.LOCALHOST:8900", LOCAL), Target(CTR, 80)),
            ((f"{CTR}-80.Containers.LocalHost", LOCAL), Target(CTR, 80)),
            ((f"{CTR}-1.containers.localhost", LOCAL), Target(CTR, 1)),
            ((f"{CTR}-65535.containers.localhost", LOCAL), Target(CTR, 65535)),
            # Surrounding whitespace is not part of the value (RFC 9110 5.5).
            ((f"  {CTR}-80.containers.localhost:8900\t", LOCAL), Target(CTR, 80)),
            # Leading zeros are read as the same port; the scope and permission checks use the
            # parsed number, so this is an alias of the same service, not another one.
            ((f"{CTR}-0080.containers.localhost", LOCAL), Target(CTR, 80)),
            ((f"{CTR}-80.containers.localhost:08900", LOCAL), Target(CTR, 80)),
            ((f"{CTR}-443.containers.example.com", SECURE), Target(CTR, 443)),
            ((f"{CTR}-443.containers.example.com:443", SECURE), Target(CTR, 443)),
        ]
        self.assertRows(rows, lambda row: policy.parse_vhost(row[0].encode("latin-1"), row[1]))

    def test_hosts_outside_the_suffix(self) -> None:
        """Hosts that are not under the suffix (or are the bare suffix) name no target: None."""
        rows = [
            "example.com",
            "localhost",
            "localhost:8900",
            "containers.localhost",
            "containers.localhost:8900",
            "containers.localhost:1234",
            # The suffix as a substring, not as whole trailing labels.
            "evil-containers.localhost",
            f"{CTR}-80.evil-containers.localhost",
            f"{CTR}-80containers.localhost",
            "containers.localhost.evil.com",
            f"{CTR}-80.containers.localhost.evil.com",
            f"{CTR}-80.containers.localhost.evil.com:8900",
            # A trailing dot is another origin for a browser; it is not served.
            f"{CTR}-80.containers.localhost.",
            f"{CTR}-80.containers.localhost.:8900",
            "127.0.0.1:8900",
            "[::1]",
            "[::1]:8900",
            "[fe80::1]:8900",
            "x" * 100_000 + ".example.com",
        ]
        self.assertRows(
            [(host, None) for host in rows],
            lambda host: policy.parse_vhost(host.encode("latin-1"), LOCAL),
        )

    def test_bad_vhosts_under_the_suffix(self) -> None:
        """Anything malformed, or under the suffix without a UUID and a valid port, is a 400."""
        rows = [
            "",
            "   ",
            ":8900",
            # Ports that are not TCP ports.
            f"{CTR}-0.containers.localhost",
            f"{CTR}-00000.containers.localhost",
            f"{CTR}-65536.containers.localhost",
            f"{CTR}-99999.containers.localhost",
            f"{CTR}-123456.containers.localhost",
            f"{CTR}-000080.containers.localhost",
            # Not digits.
            f"{CTR}-8o.containers.localhost",
            f"{CTR}-80a.containers.localhost",
            f"{CTR}--80.containers.localhost",
            f"{CTR}-+80.containers.localhost",
            f"{CTR}-0x50.containers.localhost",
            f"{CTR}-.containers.localhost",
            f"{CTR}.containers.localhost",
            f"{CTR}%2D80.containers.localhost",
            # Extra labels in front of the target.
            f"a.b-{CTR}-80.containers.localhost",
            f"x.{CTR}-80.containers.localhost",
            f"{CTR}-80.{CTR}-80.containers.localhost",
            f"{CTR}-80..containers.localhost",
            # Not a UUID.
            "zzzzz-dz642-0123-80.containers.localhost",
            f"{CTR}x-80.containers.localhost",
            f"x{CTR}-80.containers.localhost",
            "zzzzz_dz642_0123456789abcde-80.containers.localhost",
            "-80.containers.localhost",
            "<script>-80.containers.localhost",
            # Userinfo is not part of a Host header.
            f"user@{CTR}-80.containers.localhost",
            f"user:pw@{CTR}-80.containers.localhost",
            f"{CTR}-80.containers.localhost:8900@evil.com",
            # The wrong ExternalURL port, or not a port.
            f"{CTR}-80.containers.localhost:8901",
            f"{CTR}-80.containers.localhost:80",
            f"{CTR}-80.containers.localhost:0",
            f"{CTR}-80.containers.localhost:99999",
            f"{CTR}-80.containers.localhost:123456",
            f"{CTR}-80.containers.localhost:",
            f"{CTR}-80.containers.localhost:http",
            f"{CTR}-80.containers.localhost:8900:8900",
            f"{CTR}-80.containers.localhost: 8900",
            # IPv6 literals are never container vhosts.
            "[::1].containers.localhost",
            f"[{CTR}-80].containers.localhost",
            # Control characters and whitespace inside the name.
            f"{CTR}-80\n.containers.localhost",
            f"{CTR}-80\x00.containers.localhost",
            f"{CTR}-80 .containers.localhost",
            f"{CTR} -80.containers.localhost",
            # Non-ASCII look-alikes.
            f"{CTR}-８０.containers.localhost",
            # Very long names.
            "a" * 100_000 + ".containers.localhost",
            f"{CTR}-" + "8" * 10_000 + ".containers.localhost",
        ]
        self.assertRows(
            [(host, BadRequest) for host in rows],
            lambda host: policy.parse_vhost(host.encode("utf-8"), LOCAL),
        )

    def test_bad_vhosts_with_https_default_port(self) -> None:
        """On an https ExternalURL without a port, only 443 (or no port) is accepted."""
        rows = [
            (f"{CTR}-80.containers.example.com:80", BadRequest),
            (f"{CTR}-80.containers.example.com:8443", BadRequest),
            (f"{CTR}-80.containers.example.com:4430", BadRequest),
            (f"{CTR}-80.containers.example.com:443", Target(CTR, 80)),
        ]
        self.assertRows(rows, lambda host: policy.parse_vhost(host.encode("ascii"), SECURE))

    def test_error_messages_do_not_echo_the_host(self) -> None:
        """A 400 for a bad vhost does not reflect the attacker's text back into the page."""
        for host in [
            b"<script>alert(1)</script>-80.containers.localhost",
            b"v2/zzzzz-gj3su-0123456789abcde/SeKrEt-80.containers.localhost",
        ]:
            error = self.assertRaises(BadRequest, policy.parse_vhost, host, LOCAL)
            self.assertNotIn("script", error.message + error.hint)
            self.assertNotIn("SeKrEt", error.message + error.hint)

    def test_service_host(self) -> None:
        """Only the bare suffix, with the ExternalURL's port or none, is the service host."""
        rows = [
            (("containers.localhost", LOCAL), True),
            (("containers.localhost:8900", LOCAL), True),
            (("CONTAINERS.LocalHost:8900", LOCAL), True),
            ((" containers.localhost ", LOCAL), True),
            (("containers.localhost:8901", LOCAL), False),
            (("containers.localhost:80", LOCAL), False),
            (("containers.localhost.", LOCAL), False),
            (("x.containers.localhost", LOCAL), False),
            ((f"{CTR}-80.containers.localhost", LOCAL), False),
            (("evil-containers.localhost", LOCAL), False),
            (("containers.localhost.evil.com", LOCAL), False),
            (("user@containers.localhost", LOCAL), False),
            (("[::1]:8900", LOCAL), False),
            (("", LOCAL), False),
            (("containers.localhost:99999", LOCAL), False),
            (("containers.example.com", SECURE), True),
            (("containers.example.com:443", SECURE), True),
            (("containers.example.com:80", SECURE), False),
        ]
        self.assertRows(rows, lambda row: policy.is_service_host(row[0].encode("ascii"), row[1]))

    def test_connect_scope(self) -> None:
        """The scope for a target names its UUID and port exactly."""
        self.assertEqual(
            policy.connect_scope(CTR, 8080), f"CONNECT /arvados/v1/container/{CTR}/8080"
        )


# --- The user's token ---------------------------------------------------------------------------


def b64url(token: bytes) -> bytes:
    return base64.urlsafe_b64encode(token)


TOKEN = b"v2/zzzzz-gj3su-0123456789abcde/SeKrEtTokenSecret0123456789"
ENCODED = b64url(TOKEN)


class QueryTokenTests(TableMixin, SynchronousTestCase):
    """L{policy.split_query_token}."""

    def test_table(self) -> None:
        """The token parameter is removed wherever it is; the rest of the URI stays byte-exact."""
        rows = [
            # No token at all: unchanged.
            (b"/", (b"/", None)),
            (b"/p?a=1&b=2", (b"/p?a=1&b=2", None)),
            (b"/p?", (b"/p?", None)),
            (b"/arvados_api_token=T", (b"/arvados_api_token=T", None)),
            # Only, first, middle, last.
            (b"/p?arvados_api_token=T", (b"/p", b"T")),
            (b"/?arvados_api_token=T", (b"/", b"T")),
            (b"/p?arvados_api_token=T&a=1&b=2", (b"/p?a=1&b=2", b"T")),
            (b"/p?a=1&arvados_api_token=T&b=2", (b"/p?a=1&b=2", b"T")),
            (b"/p?a=1&b=2&arvados_api_token=T", (b"/p?a=1&b=2", b"T")),
            # Repeated: every copy goes, the first non-empty value wins.
            (b"/p?arvados_api_token=A&x=1&arvados_api_token=B", (b"/p?x=1", b"A")),
            (b"/p?arvados_api_token=&arvados_api_token=B", (b"/p", b"B")),
            (b"/p?arvados_api_token=A&arvados_api_token=A", (b"/p", b"A")),
            # Percent-encoded name and value.
            (b"/p?arvados%5Fapi%5Ftoken=T&a=1", (b"/p?a=1", b"T")),
            (b"/p?%61rvados_api_token=T", (b"/p", b"T")),
            (
                b"/p?arvados_api_token=v2%2Fzzzzz-gj3su-0123456789abcde%2Fs",
                (
                    b"/p",
                    b"v2/zzzzz-gj3su-0123456789abcde/s",
                ),
            ),
            (b"/p?arvados_api_token=T%26a%3D1", (b"/p", b"T&a=1")),
            # Empty value, or no "=" at all: removed, and an empty token.
            (b"/p?a=1&arvados_api_token=", (b"/p?a=1", b"")),
            (b"/p?arvados_api_token", (b"/p", b"")),
            # Plus signs are spaces in the token, and kept as written in the other parameters.
            (b"/p?arvados_api_token=a+b", (b"/p", b"a b")),
            (b"/p?q=a+b&arvados_api_token=T&r=%2B", (b"/p?q=a+b&r=%2B", b"T")),
            # Other parameters exactly as written: encoding, duplicates, empty pieces, order.
            (b"/p?z=%2F%26x&arvados_api_token=T&a=1&a=2", (b"/p?z=%2F%26x&a=1&a=2", b"T")),
            (b"/p?a=1&&b=2&arvados_api_token=T", (b"/p?a=1&&b=2", b"T")),
            (b"/p?a=?&arvados_api_token=T", (b"/p?a=?", b"T")),
            (b"/p?b=2&a=1&arvados_api_token=T&c", (b"/p?b=2&a=1&c", b"T")),
            (b"/a%20b/c?arvados_api_token=T", (b"/a%20b/c", b"T")),
            # Similar names are other parameters (the name is case-sensitive, as in Arvados).
            (b"/p?xarvados_api_token=T", (b"/p?xarvados_api_token=T", None)),
            (b"/p?arvados_api_token2=T", (b"/p?arvados_api_token2=T", None)),
            (b"/p?arvados_api_tokenx=T", (b"/p?arvados_api_tokenx=T", None)),
            (b"/p?ARVADOS_API_TOKEN=T", (b"/p?ARVADOS_API_TOKEN=T", None)),
            # ";" is not a parameter separator here.
            (b"/p?a=1;arvados_api_token=T", (b"/p?a=1;arvados_api_token=T", None)),
        ]
        self.assertRows(rows, policy.split_query_token)


class TokenCookieTests(TableMixin, SynchronousTestCase):
    """The token cookie: how it is set, read, and removed before the next hop."""

    def test_set_cookie_https(self) -> None:
        """On https the cookie is __Host-, Path=/, HttpOnly, SameSite=Lax, Secure, base64url."""
        self.assertEqual(
            policy.token_set_cookie(TOKEN, secure=True),
            b"__Host-arvados_api_token=" + ENCODED + b"; Path=/; HttpOnly; SameSite=Lax; Secure",
        )

    def test_set_cookie_http(self) -> None:
        """On http the cookie has no Secure attribute (a browser would drop it)."""
        self.assertEqual(
            policy.token_set_cookie(TOKEN, secure=False),
            b"arvados_api_token=" + ENCODED + b"; Path=/; HttpOnly; SameSite=Lax",
        )

    def test_set_cookie_cannot_be_injected(self) -> None:
        """A token with cookie syntax in it cannot add attributes: the value is base64url."""
        evil = b'x; Domain=evil.com; Path=/\r\nSet-Cookie: a=b, "\\+/'
        cookie = policy.token_set_cookie(evil, secure=True)
        name_value, _, attributes = cookie.partition(b"; ")
        self.assertEqual(attributes, b"Path=/; HttpOnly; SameSite=Lax; Secure")
        value = name_value.partition(b"=")[2]
        self.assertTrue(re.fullmatch(rb"[A-Za-z0-9_=-]+", value), value)
        self.assertEqual(policy.decode_token_cookie(value), evil)

    def test_cookie_value_is_base64url(self) -> None:
        """Bytes that need "+" and "/" in standard base64 use "-" and "_"."""
        self.assertEqual(policy.encode_token_cookie(b"\xfb\xff\xfe"), b"-__-")
        self.assertEqual(policy.decode_token_cookie(b"-__-"), b"\xfb\xff\xfe")

    def test_token_from_cookies(self) -> None:
        """Only a cookie named exactly arvados_api_token, decoding to a token, is used."""
        unpadded = ENCODED.rstrip(b"=")
        other = b64url(b"v2/zzzzz-gj3su-zzzzzzzzzzzzzzz/other")
        rows: list[tuple[tuple[bytes, ...], bytes | None]] = [
            ((), None),
            ((b"arvados_api_token=" + ENCODED,), TOKEN),
            ((b"a=1; arvados_api_token=" + ENCODED + b"; b=2",), TOKEN),
            # Several Cookie headers.
            ((b"a=1", b"arvados_api_token=" + ENCODED), TOKEN),
            ((b"a=1", b"b=2; arvados_api_token=" + ENCODED, b"c=3"), TOKEN),
            # Spacing.
            ((b"a=1;arvados_api_token=" + ENCODED + b";b=2",), TOKEN),
            ((b"   arvados_api_token = " + ENCODED + b"  ;",), TOKEN),
            ((b"a=1;;  ; arvados_api_token=" + ENCODED,), TOKEN),
            # Quoted values, and no padding.
            ((b'arvados_api_token="' + ENCODED + b'"',), TOKEN),
            ((b"arvados_api_token=" + unpadded,), TOKEN),
            # Invalid base64 or empty: not a token.
            ((b"arvados_api_token=!!!",), None),
            ((b"arvados_api_token=a",), None),
            ((b"arvados_api_token=abcde",), None),
            ((b"arvados_api_token=",), None),
            ((b"arvados_api_token",), None),
            # An invalid copy does not hide a valid one after it.
            ((b"arvados_api_token=a; arvados_api_token=" + ENCODED,), TOKEN),
            ((b"arvados_api_token=!!!", b"arvados_api_token=" + ENCODED), TOKEN),
            # The first valid one wins.
            ((b"arvados_api_token=" + ENCODED + b"; arvados_api_token=" + other,), TOKEN),
            # Similar names never match.
            ((b"xarvados_api_token=" + ENCODED,), None),
            ((b"arvados_api_token2=" + ENCODED,), None),
            ((b"arvados_api_tokenx=" + ENCODED,), None),
            ((b"_arvados_api_token=" + ENCODED,), None),
            ((b"ARVADOS_API_TOKEN=" + ENCODED,), None),
            ((b"arvados_api_token\x00=" + ENCODED,), None),
            ((b"a=arvados_api_token=" + ENCODED,), None),
            ((b"xarvados_api_token=" + ENCODED + b"; arvados_api_token2=" + other,), None),
        ]

        def read(values: tuple[bytes, ...]) -> bytes | None:
            headers = Headers()
            for value in values:
                headers.addRawHeader(b"Cookie", value)
            return policy.token_from_cookies(headers)

        self.assertRows(rows, read)

    def test_strip_token_cookie(self) -> None:
        """Every token cookie goes; the others stay as written, in order; empty headers go."""
        rows = [
            ((), []),
            ((b"a=1",), [b"a=1"]),
            ((b"a=1; arvados_api_token=E; b=2",), [b"a=1; b=2"]),
            ((b"arvados_api_token=E",), []),
            ((b"arvados_api_token=E", b"c=3"), [b"c=3"]),
            (
                (b"a=1;arvados_api_token=E;arvados_api_token=F;b=2", b"arvados_api_token=G; c=3"),
                [b"a=1; b=2", b"c=3"],
            ),
            ((b" arvados_api_token = E ; z=9",), [b"z=9"]),
            ((b'arvados_api_token="E"; z=9',), [b"z=9"]),
            ((b"arvados_api_token",), []),
            (
                (b"xarvados_api_token=1; arvados_api_token2=2; arvados_api_token=E",),
                [b"xarvados_api_token=1; arvados_api_token2=2"],
            ),
            ((b'q="a b"; j=x=y=z; arvados_api_token=E; k=',), [b'q="a b"; j=x=y=z; k=']),
            ((b"b=2; a=1", b"arvados_api_token=E", b"c=3"), [b"b=2; a=1", b"c=3"]),
        ]
        self.assertRows(rows, lambda values: policy.strip_token_cookie(list(values)))


# --- Headers across a hop -----------------------------------------------------------------------


def headers_of(*pairs: tuple[bytes, bytes]) -> Headers:
    """Headers with these (name, value) pairs added in order."""
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def as_dict(headers: Headers) -> dict[bytes, list[bytes]]:
    """Lower-case name to the list of values, for comparisons."""
    return {name.lower(): list(values) for name, values in headers.getAllRawHeaders()}


REQUEST_HOST = f"{CTR}-8080.containers.localhost:8900".encode("ascii")
CLIENT_IP = "198.51.100.7"
PROXY_IP = "10.0.0.1"


def to_gateway(client: Headers, **overrides: Any) -> dict[bytes, list[bytes]]:
    """The headers the controller sends the gateway, with test defaults."""
    arguments: dict[str, Any] = dict(
        target_uuid=CTR,
        target_port=8080,
        request_host=REQUEST_HOST,
        client_ip=CLIENT_IP,
        proto="https",
        trusted_peer=False,
    )
    arguments.update(overrides)
    return as_dict(policy.gateway_request_headers(client, **arguments))


PROXY_SET = {
    b"x-arvados-target-uuid": [CTR.encode("ascii")],
    b"x-arvados-target-port": [b"8080"],
    b"x-arvados-request-host": [REQUEST_HOST],
    b"x-forwarded-for": [CLIENT_IP.encode("ascii")],
    b"x-real-ip": [CLIENT_IP.encode("ascii")],
    b"x-forwarded-proto": [b"https"],
    b"x-forwarded-host": [REQUEST_HOST],
}


class GatewayRequestHeaderTests(TableMixin, SynchronousTestCase):
    """L{policy.gateway_request_headers}: what the controller lets through to a gateway."""

    def test_plain_request(self) -> None:
        """End-to-end headers pass unchanged; the proxy adds exactly its own headers."""
        client = headers_of(
            (b"Host", REQUEST_HOST),
            (b"Accept", b"text/html"),
            (b"Authorization", b"Bearer app-token"),
            (b"User-Agent", b"test"),
        )
        expected = dict(PROXY_SET)
        expected.update(
            {
                b"accept": [b"text/html"],
                b"authorization": [b"Bearer app-token"],
                b"user-agent": [b"test"],
            }
        )
        self.assertEqual(to_gateway(client), expected)

    def test_hop_by_hop_stripped(self) -> None:
        """Each hop-by-hop header, in any case, is dropped."""
        rows = []
        for name in [
            b"Connection",
            b"keep-alive",
            b"PROXY-CONNECTION",
            b"Te",
            b"tRAILER",
            b"Transfer-Encoding",
            b"Upgrade",
            b"Proxy-Authorization",
            b"Proxy-Authenticate",
        ]:
            rows.append((name, None))

        def forwarded(name: bytes) -> list[bytes] | None:
            client = headers_of((name, b"x"), (b"X-Keep", b"1"))
            result = to_gateway(client)
            assert result[b"x-keep"] == [b"1"]
            return result.get(name.lower())

        self.assertRows(rows, forwarded)

    def test_connection_listed_stripped(self) -> None:
        """Every header named in any Connection header goes, whatever the case and spacing."""
        rows = [
            ((b"X-Foo",), {b"x-bar", b"x-baz"}),
            ((b"x-foo, x-bar",), {b"x-baz"}),
            ((b"x-foo", b"X-BAR"), {b"x-baz"}),
            ((b" X-FOO ,, x-bar ,",), {b"x-baz"}),
            ((b"close, x-foo",), {b"x-bar", b"x-baz"}),
            ((b"keep-alive,X-Foo\t,\tX-Baz",), {b"x-bar"}),
            ((b"x-foo,x-bar,x-baz",), set()),
            ((b"",), {b"x-foo", b"x-bar", b"x-baz"}),
        ]

        def kept(connection: tuple[bytes, ...]) -> set[bytes]:
            client = headers_of(
                *[(b"Connection", value) for value in connection],
                (b"X-Foo", b"1"),
                (b"x-bar", b"2"),
                (b"X-Baz", b"3"),
            )
            return {name for name in to_gateway(client) if name.startswith(b"x-")} - set(PROXY_SET)

        self.assertRows(rows, kept)

    def test_connection_cannot_remove_proxy_headers(self) -> None:
        """
        Naming the proxy's headers in Connection neither removes nor alters them; Authorization
        and Cookie named there are removed (hop-by-hop by the client's own request).
        """
        client = headers_of(
            (
                b"Connection",
                b"x-arvados-target-uuid, x-forwarded-for, cookie, authorization",
            ),
            (
                b"connection",
                b"X-Arvados-Target-Port,x-arvados-request-host , X-ARVADOS-AUTHORIZATION, host,"
                b"x-forwarded-proto, X-Forwarded-Host",
            ),
            (b"Authorization", b"Bearer app-token"),
            (b"Cookie", b"session=1; arvados_api_token=" + ENCODED),
            (b"X-Forwarded-For", b"6.6.6.6"),
            (b"X-Arvados-Target-Uuid", OTHER_CTR.encode("ascii")),
            (b"Host", b"evil.example"),
        )
        self.assertEqual(to_gateway(client), PROXY_SET)

    def test_client_arvados_headers_replaced(self) -> None:
        """Client x-arvados-* headers, any case and repeated, never reach the gateway."""
        client = headers_of(
            (b"X-Arvados-Target-Uuid", OTHER_CTR.encode("ascii")),
            (b"x-arvados-target-uuid", CTR.encode("ascii")),
            (b"X-ARVADOS-TARGET-PORT", b"22"),
            (b"x-arvados-target-port", b"22"),
            (b"x-Arvados-Request-Host", b"evil.example"),
            (b"X-Arvados-Authorization", b"forged"),
            (b"X-Arvados-Gateway-Error", b"forged"),
            (b"X-Arvados-Anything", b"x"),
        )
        self.assertEqual(to_gateway(client), PROXY_SET)

    def test_authorization_passes_unchanged(self) -> None:
        """The client's Authorization (for the service) passes byte-exact, repeats included."""
        client = headers_of(
            (b"Authorization", b"Basic dXNlcjpwYXNz"),
            (b"authorization", b"Bearer  two  spaces "),
        )
        self.assertEqual(
            to_gateway(client)[b"authorization"],
            [b"Basic dXNlcjpwYXNz", b"Bearer  two  spaces "],
        )

    def test_forwarded_for(self) -> None:
        """X-Forwarded-For is replaced for an untrusted peer and extended for a trusted one."""
        ip = CLIENT_IP.encode("ascii")
        rows = [
            ((False, (b"1.2.3.4",), CLIENT_IP), [ip]),
            ((False, (b"1.2.3.4", b"5.6.7.8"), CLIENT_IP), [ip]),
            ((False, (), None), None),
            ((False, (b"1.2.3.4",), None), None),
            ((True, (b"1.2.3.4",), PROXY_IP), [b"1.2.3.4, 10.0.0.1"]),
            (
                (True, (b"1.2.3.4, 5.6.7.8", b"9.9.9.9"), PROXY_IP),
                [b"1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.1"],
            ),
            ((True, (b" 1.2.3.4 ,, ",), PROXY_IP), [b"1.2.3.4, 10.0.0.1"]),
            ((True, (), PROXY_IP), [b"10.0.0.1"]),
            ((True, (b"1.2.3.4",), None), [b"1.2.3.4"]),
        ]

        def xff(row: tuple[bool, tuple[bytes, ...], str | None]) -> list[bytes] | None:
            trusted, values, client_ip = row
            client = headers_of(*[(b"x-FORWARDED-for", value) for value in values])
            result = to_gateway(client, trusted_peer=trusted, client_ip=client_ip)
            return result.get(b"x-forwarded-for")

        self.assertRows(rows, xff)

    def test_forwarded_proto_and_host(self) -> None:
        """
        X-Forwarded-Proto is the proxy's unless the peer is trusted (then its last one);
        X-Forwarded-Host is always the host the request was routed by (issue 16).
        """
        rows = [
            ((False, (), ()), ([b"https"], [REQUEST_HOST])),
            ((False, (b"http",), (b"evil.example",)), ([b"https"], [REQUEST_HOST])),
            ((True, (), ()), ([b"https"], [REQUEST_HOST])),
            ((True, (b"http",), (b"front.example",)), ([b"http"], [REQUEST_HOST])),
            ((True, (b"a", b"b"), (b"h1", b"h2")), ([b"b"], [REQUEST_HOST])),
        ]

        def proto_host(
            row: tuple[bool, tuple[bytes, ...], tuple[bytes, ...]],
        ) -> tuple[list[bytes], list[bytes]]:
            trusted, protos, hosts = row
            client = headers_of(
                *[(b"X-Forwarded-Proto", value) for value in protos],
                *[(b"x-forwarded-HOST", value) for value in hosts],
            )
            result = to_gateway(client, trusted_peer=trusted)
            return result[b"x-forwarded-proto"], result[b"x-forwarded-host"]

        self.assertRows(rows, proto_host)

    def test_rfc7239_forwarded_from_untrusted_peer(self) -> None:
        """
        No client can spoof the client address through RFC 7239 Forwarded, not even through a
        trusted proxy, which passes a client's on as it is (issue 16).
        """
        client = headers_of((b"Forwarded", b"for=6.6.6.6;proto=https;host=evil.example"))
        self.assertNotIn(b"forwarded", to_gateway(client))
        self.assertNotIn(b"forwarded", to_gateway(client, trusted_peer=True, client_ip=PROXY_IP))

    def test_repeated_headers_keep_order(self) -> None:
        """Repeated end-to-end headers keep every value, in order."""
        client = headers_of(
            (b"X-Custom", b"1"),
            (b"Accept", b"a/b"),
            (b"x-custom", b"2"),
            (b"X-CUSTOM", b"3"),
            (b"Accept", b"c/d"),
        )
        result = to_gateway(client)
        self.assertEqual(result[b"x-custom"], [b"1", b"2", b"3"])
        self.assertEqual(result[b"accept"], [b"a/b", b"c/d"])

    def test_token_cookie_never_forwarded(self) -> None:
        """The arvados_api_token cookie never reaches the gateway; other cookies do."""
        rows = [
            ((b"arvados_api_token=" + ENCODED,), None),
            ((b"arvados_api_token=" + ENCODED, b"arvados_api_token=x"), None),
            ((b"a=1; arvados_api_token=" + ENCODED + b"; b=2",), [b"a=1; b=2"]),
            ((b"a=1", b"arvados_api_token=" + ENCODED, b"b=2"), [b"a=1", b"b=2"]),
            ((b"arvados_api_token2=1;arvados_api_token=" + ENCODED,), [b"arvados_api_token2=1"]),
        ]

        def cookies(values: tuple[bytes, ...]) -> list[bytes] | None:
            client = headers_of(*[(b"cookie", value) for value in values])
            return to_gateway(client).get(b"cookie")

        self.assertRows(rows, cookies)

    def test_host_never_forwarded(self) -> None:
        """The client's Host never reaches the gateway (the controller sets its own)."""
        client = headers_of((b"Host", b"evil.example"), (b"HOST", REQUEST_HOST))
        result = to_gateway(client)
        self.assertNotIn(b"host", result)
        self.assertEqual(result[b"x-arvados-request-host"], [REQUEST_HOST])

    def test_does_not_modify_client_headers(self) -> None:
        """The client's request headers are left as they were."""
        client = headers_of(
            (b"Connection", b"x-foo"),
            (b"X-Foo", b"1"),
            (b"Cookie", b"arvados_api_token=" + ENCODED),
            (b"X-Arvados-Target-Port", b"22"),
        )
        before = as_dict(client)
        to_gateway(client)
        self.assertEqual(as_dict(client), before)


class ForwardableDecisionTests(SynchronousTestCase):
    """
    L{policy._forwardable} keeps whether each name passes: kept answers must be the answers,
    whatever the spelling, with or without names listed in C{Connection}, and when no more
    can be kept.
    """

    ATTACKS = [
        [(b"X-Arvados-Target-Uuid", OTHER_CTR.encode("ascii")), (b"Accept", b"*/*")],
        [(b"x-arvados-target-port", b"22"), (b"X-ARVADOS-AUTHORIZATION", b"forged")],
        [(b"Connection", b"x-keep, accept"), (b"X-Keep", b"1"), (b"Accept", b"*/*")],
        [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers")],
        [(b"Transfer-Encoding", b"chunked"), (b"Proxy-Authorization", b"x"), (b"Host", b"e")],
        [(b"Cookie", b"a=1"), (b"Content-Length", b"5"), (b"Forwarded", b"for=6.6.6.6")],
        [(b"X-Forwarded-For", b"6.6.6.6"), (b"X-Keep", b"2"), (b"Upgrade", b"websocket")],
    ]

    def answers(self) -> list[object]:
        results: list[object] = []
        for pairs in self.ATTACKS:
            client = headers_of(*pairs)
            results.append(to_gateway(client))
            results.append(to_gateway(client, trusted_peer=True))
            results.append(as_dict(policy.container_request_headers(client, REQUEST_HOST)))
            results.append(as_dict(policy.response_headers(client)))
        return results

    def test_kept_answers_are_the_answers(self) -> None:
        """Cold, warm, and with nothing kept, every attack gets the same headers through."""
        self.patch(policy, "_decisions", {})
        cold = self.answers()
        self.assertTrue(policy._decisions)
        self.assertEqual(self.answers(), cold)
        self.patch(policy, "_decisions", {})
        self.patch(policy, "_MAX_DECISIONS", 0)
        self.patch(policy, "_MAX_DROPPED_SETS", 0)
        self.assertEqual(self.answers(), cold)
        self.assertEqual(policy._decisions, {})
        # What passes is what the rules say, not just the same every time.
        self.assertNotIn(b"accept", cold[8])
        self.assertNotIn(b"x-keep", cold[8])
        self.assertEqual(cold[0][b"x-arvados-target-uuid"], [CTR.encode("ascii")])

    def test_bounded(self) -> None:
        """A client inventing names fills the kept answers only up to their bound."""
        self.patch(policy, "_decisions", {})
        self.patch(policy, "_MAX_DECISIONS", 5)
        for i in range(50):
            client = headers_of((b"X-Name-%d" % i, b"1"), (b"X-Arvados-Target-Port-%d" % i, b"2"))
            self.assertEqual(
                as_dict(policy.container_request_headers(client, REQUEST_HOST)),
                {b"x-name-%d" % i: [b"1"], b"host": [REQUEST_HOST]},
            )
        self.assertEqual([len(kept) for kept in policy._decisions.values()], [5])


class RefererTests(TableMixin, SynchronousTestCase):
    """L{policy.scrub_referer}: the page a browser came from may have had the token in its URL."""

    def test_table(self) -> None:
        """The token leaves a Referer's query; everything else stays as written."""
        origin = b"https://" + REQUEST_HOST
        rows = [
            (origin + b"/", origin + b"/"),
            (origin + b"/p?a=1#frag", origin + b"/p?a=1#frag"),
            (origin + b"/p?arvados_api_token=T", origin + b"/p"),
            (origin + b"/p?a=1&arvados_api_token=T&b=2", origin + b"/p?a=1&b=2"),
            (origin + b"/p?arvados%5Fapi%5Ftoken=T", origin + b"/p"),
            (origin + b"/p?arvados_api_token=T#arvados_api_token=T", origin + b"/p"),
            (origin + b"/p?a=1&arvados_api_token=", origin + b"/p?a=1"),
            (origin + b"/p?xarvados_api_token=T", origin + b"/p?xarvados_api_token=T"),
            (b"", b""),
        ]
        self.assertRows(rows, policy.scrub_referer)

    def test_referer_to_gateway(self) -> None:
        """Every Referer the gateway gets is scrubbed, repeats kept in order."""
        client = headers_of(
            (b"Referer", b"https://a.example/?arvados_api_token=" + TOKEN),
            (b"referer", b"https://b.example/x?q=1"),
        )
        self.assertEqual(
            to_gateway(client)[b"referer"], [b"https://a.example/", b"https://b.example/x?q=1"]
        )


class ContainerRequestHeaderTests(SynchronousTestCase):
    """L{policy.container_request_headers}: what the gateway sends into the container."""

    def test_container_headers(self) -> None:
        """Host is the original request's host; no x-arvados-* or hop-by-hop header remains."""
        gateway = policy.gateway_request_headers(
            headers_of(
                (b"Host", b"evil.example"),
                (b"Accept", b"*/*"),
                (b"Cookie", b"a=1; arvados_api_token=" + ENCODED),
                (b"Authorization", b"Bearer app"),
                (b"X-Arvados-Target-Port", b"22"),
            ),
            target_uuid=CTR,
            target_port=8080,
            request_host=REQUEST_HOST,
            client_ip=CLIENT_IP,
            proto="https",
            trusted_peer=False,
        )
        # What the controller's connection adds on the wire.
        gateway.setRawHeaders(b"host", [b"10.1.2.3:41234"])
        gateway.addRawHeader(b"Connection", b"keep-alive, x-hop")
        gateway.addRawHeader(b"X-Hop", b"1")
        gateway.addRawHeader(b"Transfer-Encoding", b"chunked")
        result = as_dict(policy.container_request_headers(gateway, REQUEST_HOST))
        self.assertEqual(
            result,
            {
                b"host": [REQUEST_HOST],
                b"accept": [b"*/*"],
                b"cookie": [b"a=1"],
                b"authorization": [b"Bearer app"],
                b"x-forwarded-for": [CLIENT_IP.encode("ascii")],
                b"x-real-ip": [CLIENT_IP.encode("ascii")],
                b"x-forwarded-proto": [b"https"],
                b"x-forwarded-host": [REQUEST_HOST],
            },
        )

    def test_connection_cannot_remove_host(self) -> None:
        """Host named in Connection on the gateway hop is still set to the request host."""
        gateway = headers_of(
            (b"Connection", b"host, x-arvados-request-host"),
            (b"Host", b"10.1.2.3:41234"),
            (b"X-Arvados-Request-Host", REQUEST_HOST),
        )
        result = as_dict(policy.container_request_headers(gateway, REQUEST_HOST))
        self.assertEqual(result, {b"host": [REQUEST_HOST]})


class ResponseHeaderTests(SynchronousTestCase):
    """L{policy.response_headers}: what crosses a hop back towards the client."""

    def test_response_headers(self) -> None:
        """Hop-by-hop, Connection-listed, Content-Length and x-arvados-* go; repeats are kept."""
        upstream = headers_of(
            (b"Connection", b"X-Secret, keep-alive"),
            (b"X-Secret", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"12"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Trailer", b"x"),
            (b"Upgrade", b"h2c"),
            (b"Set-Cookie", b"a=1"),
            (b"Content-Type", b"text/plain"),
            (b"set-cookie", b"b=2"),
            (b"X-Arvados-Gateway-Error", b"x"),
            (b"x-arvados-anything", b"y"),
        )
        self.assertEqual(
            as_dict(policy.response_headers(upstream)),
            {b"set-cookie": [b"a=1", b"b=2"], b"content-type": [b"text/plain"]},
        )


class TargetPortTests(TableMixin, SynchronousTestCase):
    """L{policy.parse_target_port}."""

    def test_table(self) -> None:
        """Exactly one decimal from 1 to 65535; everything else is a ValueError."""
        rows: list[tuple[list[bytes] | None, Any]] = [
            ([b"1"], 1),
            ([b"80"], 80),
            ([b"65535"], 65535),
            ([b" 8080 "], 8080),
            ([b"08080"], 8080),
            (None, ValueError),
            ([], ValueError),
            ([b"80", b"80"], ValueError),
            ([b"80", b"81"], ValueError),
            ([b""], ValueError),
            ([b" "], ValueError),
            ([b"0"], ValueError),
            ([b"00000"], ValueError),
            ([b"65536"], ValueError),
            ([b"99999"], ValueError),
            ([b"123456"], ValueError),
            ([b"000080"], ValueError),
            ([b"-80"], ValueError),
            ([b"+80"], ValueError),
            ([b"8o"], ValueError),
            ([b"80.0"], ValueError),
            ([b"0x50"], ValueError),
            ([b"8 0"], ValueError),
            ([b"1e3"], ValueError),
            ([b"80,81"], ValueError),
            (["٨٠".encode()], ValueError),
            ([b"\xb2"], ValueError),
        ]
        self.assertRows(rows, policy.parse_target_port)


# --- Signing between the hops -------------------------------------------------------------------

# Computed independently with:
#   printf '%s' zzzzz-dz642-0123456789abcde | openssl dgst -sha256 -hmac SystemRootTokenForTests
ROOT_TOKEN = "SystemRootTokenForTests"
CTR_SECRET = "a559491a7fcf0abf95de9b04370403bc967acdea815c8a6eeacc95f265e9d73a"
# printf '%s' 000102030405060708090a0b0c0d0e0f+1700000000 | openssl dgst -sha256 -hmac s3cr3t
SIGN_VECTOR = (
    "000102030405060708090a0b0c0d0e0f+1700000000 "
    "6d43a0cf66e1eeff132be67e234943077897d81378b4dfe87a51b85071d0461c"
)

NOW = 1_700_000_000
WINDOW = 300.0
NONCE = bytes(range(16))


def mac_of(secret: str, message: str) -> str:
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


# What the signatures below are bound to: a GET of / (see tests.test_signing for the binding).
BINDING = policy.request_binding(b"GET", b"/", Headers())


def good(now: float = NOW, nonce: bytes = NONCE, secret: str = CTR_SECRET) -> bytes:
    return policy.sign(secret, now, nonce, BINDING).encode("ascii")


def verify(values: list[bytes] | None, secret: str, now: float, nonces: NonceCache) -> None:
    """L{policy.verify} for a request bound to L{BINDING}."""
    policy.verify(values, secret, now, nonces, BINDING)


class GatewaySecretTests(SynchronousTestCase):
    """L{policy.gateway_secret}."""

    def test_rfc4231_vector(self) -> None:
        """It is HMAC-SHA256 keyed with the root token over the UUID (RFC 4231 case 2)."""
        self.assertEqual(
            policy.gateway_secret("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        )

    def test_container_vector(self) -> None:
        """The secret for a container matches a vector computed with openssl."""
        self.assertEqual(policy.gateway_secret(ROOT_TOKEN, CTR), CTR_SECRET)

    def test_secret_is_per_container_and_per_cluster(self) -> None:
        """Another container or another root token gives another secret."""
        secrets = {
            policy.gateway_secret(ROOT_TOKEN, CTR),
            policy.gateway_secret(ROOT_TOKEN, OTHER_CTR),
            policy.gateway_secret(ROOT_TOKEN + "x", CTR),
            policy.gateway_secret(CTR, ROOT_TOKEN),
        }
        self.assertEqual(len(secrets), 4)
        for secret in secrets:
            self.assertTrue(re.fullmatch("[0-9a-f]{64}", secret), secret)
            self.assertNotIn(ROOT_TOKEN, secret)


class SignTests(SynchronousTestCase):
    """L{policy.sign}; its unbound format, for old gateways, here (the bound one: test_signing)."""

    def test_vector(self) -> None:
        """A fixed nonce and time give the value computed independently with openssl."""
        self.assertEqual(policy.sign("s3cr3t", 1_700_000_000.9, NONCE), SIGN_VECTOR)

    def test_format(self) -> None:
        """C{<hex nonce of 16+ bytes>+<unix seconds> <hex mac>}, with a fresh nonce each time."""
        first = policy.sign(CTR_SECRET, NOW)
        second = policy.sign(CTR_SECRET, NOW)
        for value in (first, second):
            match = re.fullmatch(r"([0-9a-f]{32,})\+([0-9]+) ([0-9a-f]{64})", value)
            assert match is not None, value
            self.assertEqual(match.group(2), str(NOW))
            self.assertEqual(
                match.group(3), mac_of(CTR_SECRET, f"{match.group(1)}+{match.group(2)}")
            )
        self.assertNotEqual(first.split("+")[0], second.split("+")[0])

    def test_macs_share_no_state(self) -> None:
        """
        Each MAC starts afresh from its secret's kept key: signing again, or with other
        secrets in between (the UTF-8 one longer than a SHA-256 block), gives exactly
        HMAC-SHA256 of the message alone.
        """
        secrets = [CTR_SECRET, "s3cr3t", "é" * 70, CTR_SECRET]
        for later in range(2):
            for secret in secrets:
                value = policy.sign(secret, NOW + later, NONCE)
                message, mac = value.split(" ")
                self.assertEqual(mac, mac_of(secret, message), (secret, later))

    def test_round_trip(self) -> None:
        """What sign produces, verify accepts with the same secret (it raises otherwise)."""
        nonces = NonceCache(WINDOW)
        verify([good()], CTR_SECRET, NOW, nonces)
        verify([policy.sign(CTR_SECRET, NOW, binding=BINDING).encode()], CTR_SECRET, NOW, nonces)
        verify([good(nonce=b"\xff" * 64)], CTR_SECRET, NOW, nonces)
        self.assertEqual(len(nonces), 3)


class VerifyTests(TableMixin, SynchronousTestCase):
    """L{policy.verify}: attacks on the controller-to-gateway signature."""

    def attempt(self, values: list[bytes] | None, now: float = NOW) -> str | None:
        """The reason verify refuses C{values} with a fresh cache, or C{None} if it accepts."""
        try:
            verify(values, CTR_SECRET, now, NonceCache(WINDOW))
        except SignatureError as e:
            return str(e).split(":")[0].split(" ")[0]
        return None

    def test_attacks(self) -> None:
        """Missing, repeated, malformed, forged and tampered values are refused, saying why."""
        value = good().decode("ascii")
        message, mac = value.split(" ")
        nonce_hex, timestamp = message.split("+")
        other_secret = policy.gateway_secret(ROOT_TOKEN, OTHER_CTR)
        short = nonce_hex[:30]

        def forged(text: str) -> list[bytes]:
            return [text.encode("latin-1")]

        rows: list[tuple[list[bytes] | None, str | None]] = [
            ([good()], None),
            (None, "missing"),
            ([], "missing"),
            ([good(), good()], "repeated"),
            ([good(), good(nonce=b"\x01" * 16)], "repeated"),
            # Malformed.
            (forged(""), "malformed"),
            (forged(" " + value), "malformed"),
            (forged(value + " "), "malformed"),
            (forged(value + "\n"), "malformed"),
            (forged(value + "\r\n"), "malformed"),
            (forged(f"{message}  {mac}"), "malformed"),
            (forged(f"{message}\t{mac}"), "malformed"),
            (forged(f"{message} {mac.upper()}"), "malformed"),
            (forged(f"{nonce_hex.upper()}+{timestamp} {mac}"), "malformed"),
            (
                forged(f"{short}+{timestamp} {mac_of(CTR_SECRET, f'{short}+{timestamp}')}"),
                "malformed",
            ),
            (forged(f"{'g' * 32}+{timestamp} {mac}"), "malformed"),
            (forged(f"{nonce_hex}+-{timestamp} {mac}"), "malformed"),
            (forged(f"{nonce_hex}+{timestamp}.5 {mac}"), "malformed"),
            (forged(f"{nonce_hex}+{'9' * 13} {mac}"), "malformed"),
            (forged(f"{nonce_hex}+ {mac}"), "malformed"),
            (forged(f"{nonce_hex} {timestamp} {mac}"), "malformed"),
            (forged(message), "malformed"),
            (forged(message + " "), "malformed"),
            (forged(f"{message} {mac[:63]}"), "malformed"),
            (forged(f"{message} {mac}0"), "malformed"),
            (forged(f"{'a' * 130}+{timestamp} {mac}"), "malformed"),
            ([good().replace(b" ", b" \xff")], "malformed"),
            # Well formed but not made with this container's secret.
            ([good(secret=other_secret)], "bad"),
            ([good(secret=ROOT_TOKEN)], "bad"),
            ([good(secret="")], "bad"),
            (forged(f"{message} {'0' * 64}"), "bad"),
            # Tampered after signing: another timestamp or another nonce with the same MAC.
            (forged(f"{nonce_hex}+{int(timestamp) + 1} {mac}"), "bad"),
            (forged(f"{nonce_hex}+{int(timestamp) - 1} {mac}"), "bad"),
            (forged(f"{nonce_hex}+0{timestamp} {mac}"), "bad"),
            (forged(f"{'0' * 32}+{timestamp} {mac}"), "bad"),
            (forged(f"{nonce_hex}00+{timestamp} {mac}"), "bad"),
            # A correctly made MAC over an absurd timestamp is stale.
            ([good(now=999_999_999_999)], "stale"),
            ([good(now=0)], "stale"),
        ]
        self.assertRows(rows, self.attempt)

    def test_window_edges(self) -> None:
        """A timestamp exactly at the window edge passes on both sides; one step beyond fails."""
        rows = [
            (0, None),
            (-WINDOW, None),
            (WINDOW, None),
            (-WINDOW - 1, "stale"),
            (WINDOW + 1, "stale"),
            (-10 * WINDOW, "stale"),
            (10 * WINDOW, "stale"),
        ]
        # The signer's clock is off by `skew` from the gateway's (timestamps are whole seconds).
        self.assertRows(rows, lambda skew: self.attempt([good(now=NOW + skew)]))
        # The gateway's clock is fractional: a hair past the edge is stale.
        self.assertEqual(self.attempt([good()], now=NOW + WINDOW + 0.001), "stale")
        self.assertEqual(self.attempt([good()], now=NOW - WINDOW - 0.001), "stale")
        self.assertIsNone(self.attempt([good()], now=NOW + WINDOW))

    def test_replay_refused(self) -> None:
        """A nonce is accepted once; every later use within its lifetime is a replay."""
        nonces = NonceCache(WINDOW)
        value = good()
        verify([value], CTR_SECRET, NOW, nonces)
        for offset in range(0, int(WINDOW) + 1, 7):
            error = self.assertRaises(
                SignatureError, verify, [value], CTR_SECRET, NOW + offset, nonces
            )
            self.assertIn("replayed", str(error))
        error = self.assertRaises(SignatureError, verify, [value], CTR_SECRET, NOW + WINDOW, nonces)
        self.assertIn("replayed", str(error))
        # Past the window it is refused as stale, never accepted again.
        error = self.assertRaises(
            SignatureError, verify, [value], CTR_SECRET, NOW + WINDOW + 1, nonces
        )
        self.assertIn("stale", str(error))

    def test_replay_of_future_timestamp(self) -> None:
        """A nonce signed at the far edge of the future is remembered until it goes stale."""
        nonces = NonceCache(WINDOW)
        value = good(now=NOW + WINDOW)
        verify([value], CTR_SECRET, NOW, nonces)
        for later in (NOW + 1, NOW + WINDOW, NOW + 2 * WINDOW):
            error = self.assertRaises(SignatureError, verify, [value], CTR_SECRET, later, nonces)
            self.assertIn("replayed", str(error))
        error = self.assertRaises(
            SignatureError, verify, [value], CTR_SECRET, NOW + 2 * WINDOW + 1, nonces
        )
        self.assertIn("stale", str(error))

    def test_same_timestamp_other_nonce(self) -> None:
        """Another nonce with the same timestamp is a new request, accepted."""
        nonces = NonceCache(WINDOW)
        for i in range(5):
            verify([good(nonce=bytes([i]) * 16)], CTR_SECRET, NOW, nonces)
        self.assertEqual(len(nonces), 5)

    def test_forgeries_do_not_burn_nonces(self) -> None:
        """A forged or stale value carrying a real nonce does not stop the real one."""
        nonces = NonceCache(WINDOW)
        message = good().decode("ascii").split(" ")[0]
        forged = f"{message} {'0' * 64}".encode("ascii")
        self.assertRaises(SignatureError, verify, [forged], CTR_SECRET, NOW, nonces)
        stale = good(now=NOW - 2 * WINDOW)
        self.assertRaises(SignatureError, verify, [stale], CTR_SECRET, NOW, nonces)
        self.assertEqual(len(nonces), 0)
        verify([good()], CTR_SECRET, NOW, nonces)

    def test_nonce_cache_stays_bounded(self) -> None:
        """Over hours of simulated traffic the cache holds only nonces that could still pass."""
        window = 30.0
        rate = 10
        duration = 3600
        nonces = NonceCache(window)
        bound = rate * (2 * window + 2)
        largest = 0
        counter = 0
        for second in range(duration):
            now = NOW + second
            for _ in range(rate):
                counter += 1
                # Signers' clocks spread over the whole window, both sides.
                skew = (counter % (2 * int(window) + 1)) - window
                nonce = counter.to_bytes(16, "big")
                verify([good(now=now + skew, nonce=nonce)], CTR_SECRET, now, nonces)
            largest = max(largest, len(nonces))
        self.assertLessEqual(largest, bound)
        self.assertGreater(largest, rate * window)
        # Long after the traffic stops, one more request leaves only itself.
        later = NOW + duration + 10 * window
        verify([good(now=later, nonce=b"\xee" * 16)], CTR_SECRET, later, nonces)
        self.assertEqual(len(nonces), 1)

    def test_constant_time_comparison(self) -> None:
        """The MAC is compared with hmac.compare_digest, and only with it."""
        calls: list[tuple[Any, Any]] = []
        original = hmac.compare_digest

        def spy(a: Any, b: Any) -> bool:
            calls.append((a, b))
            return original(a, b)

        self.patch(hmac, "compare_digest", spy)
        verify([good()], CTR_SECRET, NOW, NonceCache(WINDOW))
        mac = good().decode("ascii").split(" ")[1]
        self.assertEqual(calls, [(mac, mac)])

        # If compare_digest says no, a genuine value is refused: no other comparison decides.
        self.patch(hmac, "compare_digest", lambda a, b: False)
        error = self.assertRaises(
            SignatureError, verify, [good()], CTR_SECRET, NOW, NonceCache(WINDOW)
        )
        self.assertIn("bad signature", str(error))


class ServiceCookieTests(SynchronousTestCase):
    """A service's Set-Cookie can neither plant the proxy's cookies nor reach other vhosts."""

    def test_scrub_set_cookie_table(self) -> None:
        """Proxy cookies are dropped; Domain attributes are removed; the rest is kept as sent."""
        rows = [
            (b"sid=1; Path=/; HttpOnly", b"sid=1; Path=/; HttpOnly"),
            (b"sid=1; Domain=containers.example.com; Path=/", b"sid=1; Path=/"),
            (b"sid=1; domain=.example.com", b"sid=1"),
            (b"sid=1;DOMAIN=x;Secure", b"sid=1;Secure"),
            (b"arvados_api_token=djI; Domain=containers.example.com", None),
            (b"arvados_api_token=djI", None),
            (b" arvados_container_uuid=zzzzz-dz642-x; Path=/", None),
            (b"arvados_api_token_x=1", b"arvados_api_token_x=1"),
        ]
        for value, expected in rows:
            self.assertEqual(policy.scrub_set_cookie(value), expected, value)

    def test_response_headers_scrub_cookies(self) -> None:
        """Relayed responses keep the service's own cookies, host-only, and none of the proxy's."""
        upstream = Headers()
        upstream.setRawHeaders(
            b"set-cookie",
            [b"arvados_api_token=evil; Domain=containers.example.com", b"a=1; Domain=example.com"],
        )
        self.assertEqual(policy.response_headers(upstream).getRawHeaders(b"set-cookie"), [b"a=1"])
        only_proxy = Headers({b"set-cookie": [b"arvados_api_token=evil"]})
        self.assertFalse(policy.response_headers(only_proxy).hasHeader(b"set-cookie"))


class ProxyCookieTests(SynchronousTestCase):
    def test_proxy_cookies_never_reach_the_gateway(self) -> None:
        """Neither the token nor the container-marker cookie is forwarded; the app's cookies are."""
        client = Headers()
        client.setRawHeaders(
            b"cookie",
            [b"a=1; arvados_container_uuid=zzzzz-dz642-000000000000001; arvados_api_token=dg"],
        )
        sent = policy.gateway_request_headers(
            client,
            target_uuid="zzzzz-dz642-000000000000001",
            target_port=80,
            request_host=b"h",
            client_ip="127.0.0.1",
            proto="http",
            trusted_peer=False,
        )
        self.assertEqual(sent.getRawHeaders(b"cookie"), [b"a=1"])


class RequestLineTests(TableMixin, SynchronousTestCase):
    def test_table(self) -> None:
        """Only a token method and a visible-ASCII origin-form target may go to the next hop."""
        rows = [
            ((b"GET", b"/"), True),
            ((b"PROPFIND", b"/a/b?c=d&e=%20"), True),
            # Origin-form only (issue 16, hole 6): no fragment, no other form.
            ((b"GET", b"/a/b?c=d&e=%20#f"), False),
            ((b"M-SEARCH", b"*"), False),
            ((b"GET", b"http://other.example/x"), False),
            ((b"CONNECT", b"other.example:443"), False),
            ((b"GET", b"/a b"), False),
            ((b"GET", b"/a\tb"), False),
            ((b"GET", b"/a\x7fb"), False),
            ((b"GET", b"/a\x00b"), False),
            ((b"GET", b"/\xc3\xa9"), False),
            ((b"GET", b"/a\r\nX-Injected: 1"), False),
            ((b"GET", b""), False),
            ((b"", b"/"), False),
            ((b"G ET", b"/"), False),
            ((b"GET\x7f", b"/"), False),
            ((b"GET /x HTTP/1.1\r\nHost: evil\r\n\r\nGET", b"/"), False),
        ]
        self.assertRows(rows, lambda line: policy.is_forwardable_request_line(*line))


class ReservedUpgradeTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Only the proxy's hops may ask for a tunnel carrier, however a client spells it."""
        cases = [
            (b"websocket", False),
            (b"h2c", False),
            (b"arvproxy-tunnels/1", True),
            (b"ARVPROXY-TUNNELS/1", True),
            (b"websocket, arvproxy-tunnels/1", True),
            (b" arvproxy-tunnels/1 ", True),
            (b"arvproxy-tunnels/2", False),
            (b"arvproxy-tunnels", False),
        ]
        for value, reserved in cases:
            self.assertEqual(policy.is_reserved_upgrade(value), reserved, value)
