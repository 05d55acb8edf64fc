"""
Tests for the header rules of L{arvproxy.policy} that close the holes of issue 16, written as an
attacker would: header names spelled with underscores, which CGI, WSGI and Rack servers read as
the proxy's own headers.

Each table collects every mismatching row before failing (L{TableMixin}).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy import policy
from tests.test_policy import TableMixin

CTR = "zzzzz-dz642-0123456789abcde"
OTHER_CTR = "zzzzz-dz642-zzzzzzzzzzzzzzz"
REQUEST_HOST = f"{CTR}-8080.containers.localhost:8900".encode("ascii")
CLIENT_IP = "198.51.100.7"
PROXY_IP = "10.0.0.1"


def headers_of(*pairs: tuple[bytes, bytes]) -> Headers:
    """Headers with these (name, value) pairs added in order."""
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def as_dict(headers: Headers) -> dict[bytes, list[bytes]]:
    """Lower-case name to the list of values, for comparisons."""
    return {name.lower(): list(values) for name, values in headers.getAllRawHeaders()}


def to_gateway(client: Headers, **overrides: Any) -> Headers:
    """The headers the front door sends a gateway for C{client}'s, with test defaults."""
    arguments: dict[str, Any] = dict(
        target_uuid=CTR,
        target_port=8080,
        request_host=REQUEST_HOST,
        authorization="SIGNATURE",
        client_ip=CLIENT_IP,
        proto="https",
        trusted_peer=False,
    )
    arguments.update(overrides)
    return policy.gateway_request_headers(client, **arguments)


def cgi_names(headers: Headers) -> dict[str, list[bytes]]:
    """
    What a CGI, WSGI or Rack server makes of C{headers}: C{HTTP_} and the name in upper case
    with every C{-} turned into C{_}, the values of names that meet there gathered in order.
    """
    environ: dict[str, list[bytes]] = {}
    for name, values in headers.getAllRawHeaders():
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        environ.setdefault(key, []).extend(values)
    return environ


# Every spelling the attack report used, and more of the same kind: each one, read by a CGI/WSGI
# server, is a header the proxy sets, owns or removes.
UNDERSCORE_SPELLINGS = [
    b"X_Arvados_Target_Uuid",
    b"x-arvados_target-port",
    b"X_ARVADOS_REQUEST_HOST",
    b"x_arvados-authorization",
    b"X_Arvados_Gateway_Error",
    b"X_Forwarded_For",
    b"X_Forwarded_Host",
    b"X_Forwarded_Proto",
    b"x_forwarded-for",
    b"X-Forwarded_For",
    b"X_Real_IP",
    b"Proxy_Authorization",
    b"Transfer_Encoding",
    b"Content_Length",
    b"Keep_Alive",
    b"_",
    b"X_App_Header",
]


class UnderscoreNameTests(TableMixin, SynchronousTestCase):
    """Hole 5: request header names with an underscore never cross a hop."""

    def test_front_door_drops_underscore_names(self) -> None:
        """Each underscore spelling, from an untrusted or a trusted peer, is dropped."""
        rows = []
        for name in UNDERSCORE_SPELLINGS:
            for trusted in (False, True):
                rows.append(((name, trusted), None))

        def forwarded(row: tuple[bytes, bool]) -> list[bytes] | None:
            name, trusted = row
            client = headers_of((name, b"6.6.6.6"), (b"X-Keep", b"1"))
            result = as_dict(to_gateway(client, trusted_peer=trusted))
            assert result[b"x-keep"] == [b"1"], result
            return result.get(name.lower())

        self.assertRows(rows, forwarded)

    def test_gateway_drops_underscore_names(self) -> None:
        """Each underscore spelling that reaches a gateway is dropped before the container."""
        rows = [(name, None) for name in UNDERSCORE_SPELLINGS]

        def forwarded(name: bytes) -> list[bytes] | None:
            gateway = headers_of((name, b"6.6.6.6"), (b"X-Keep", b"1"))
            result = as_dict(policy.container_request_headers(gateway, REQUEST_HOST))
            assert result[b"x-keep"] == [b"1"], result
            return result.get(name.lower())

        self.assertRows(rows, forwarded)

    def test_cgi_server_sees_only_the_proxy_values(self) -> None:
        """Through both hops, a CGI-style server reads only the proxy's values of its headers."""
        client = headers_of(
            *[(name, b"6.6.6.6") for name in UNDERSCORE_SPELLINGS],
            (b"Accept", b"*/*"),
        )
        through = policy.container_request_headers(to_gateway(client), REQUEST_HOST)
        environ = cgi_names(through)
        self.assertEqual(environ["HTTP_X_FORWARDED_FOR"], [CLIENT_IP.encode()])
        self.assertEqual(environ["HTTP_X_FORWARDED_HOST"], [REQUEST_HOST])
        self.assertEqual(environ["HTTP_X_FORWARDED_PROTO"], [b"https"])
        self.assertEqual(environ["HTTP_HOST"], [REQUEST_HOST])
        self.assertEqual(environ["HTTP_ACCEPT"], [b"*/*"])
        self.assertEqual([key for key in environ if "ARVADOS" in key], [])
        self.assertNotIn(b"6.6.6.6", b"".join(b"".join(v) for v in environ.values()))

    def test_connection_listed_underscore_names(self) -> None:
        """Listed in Connection or not, an underscore name is dropped; others listed go too."""
        client = headers_of(
            (b"Connection", b"x-listed"),
            (b"X-Listed", b"1"),
            (b"X_Forwarded_For", b"6.6.6.6"),
            (b"X-Keep", b"2"),
        )
        result = as_dict(to_gateway(client))
        self.assertNotIn(b"x_forwarded_for", result)
        self.assertNotIn(b"x-listed", result)
        self.assertEqual(result[b"x-keep"], [b"2"])

    def test_responses_keep_underscore_names(self) -> None:
        """A service's answer keeps its underscore names: no server maps those to the proxy's."""
        upstream = headers_of((b"X_App_Version", b"3"), (b"Content-Type", b"text/plain"))
        self.assertEqual(as_dict(policy.response_headers(upstream))[b"x_app_version"], [b"3"])

    def test_decisions_kept_per_direction(self) -> None:
        """A name decided for a response is decided again for a request, and the reverse."""
        self.patch(policy, "_decisions", {})
        name = (b"X_Forwarded_For", b"6.6.6.6")
        for _ in range(2):
            self.assertIn(b"x_forwarded_for", as_dict(policy.response_headers(headers_of(name))))
            self.assertNotIn(b"x_forwarded_for", as_dict(to_gateway(headers_of(name))))
            gateway = policy.container_request_headers(headers_of(name), REQUEST_HOST)
            self.assertNotIn(b"x_forwarded_for", as_dict(gateway))
