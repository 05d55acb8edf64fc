"""
Tests for the header rules of L{arvproxy.policy} that close the holes of issue 16, written as an
attacker would: header names spelled with underscores, which CGI, WSGI and Rack servers read as
the proxy's own headers; request targets in other forms than a path, which named one host in the
request line and another in C{Host}; X-Real-IP and the other headers that services believe
about the client's address or the original request.

Each table collects every mismatching row before failing (L{TableMixin}).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.errors import BadRequest
from arvproxy.httpserver import ProxySite, StreamingRequest
from arvproxy.testing import MemoryClient
from tests.test_policy import TableMixin, as_dict, headers_of

CTR = "zzzzz-dz642-0123456789abcde"
OTHER_CTR = "zzzzz-dz642-zzzzzzzzzzzzzzz"
REQUEST_HOST = f"{CTR}-8080.containers.localhost:8900".encode("ascii")
CLIENT_IP = "198.51.100.7"
PROXY_IP = "10.0.0.1"


def to_gateway(client: Headers, **overrides: Any) -> Headers:
    """The headers the front door sends a gateway for C{client}'s, with test defaults."""
    arguments: dict[str, Any] = dict(
        target_uuid=CTR,
        target_port=8080,
        request_host=REQUEST_HOST,
        client_ip=CLIENT_IP,
        proto="https",
        trusted_peer=False,
    )
    arguments.update(overrides)
    return policy.gateway_request_headers(client, **arguments)


def front_door_forwards(row: tuple[bytes, bool]) -> list[bytes] | None:
    """
    The values of header C{row[0]} the front door forwards when a client (a trusted proxy when
    C{row[1]}) sends it, beside a header that must pass; C{None} when it forwards none.
    """
    name, trusted = row
    client = headers_of((name, b"6.6.6.6"), (b"X-Keep", b"1"))
    result = as_dict(to_gateway(client, trusted_peer=trusted))
    assert result[b"x-keep"] == [b"1"], result
    return result.get(name.lower())


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
        rows = [((name, trusted), None) for name in UNDERSCORE_SPELLINGS for trusted in (0, 1)]
        self.assertRows(rows, front_door_forwards)

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


OTHER_HOST = f"{OTHER_CTR}-8080.containers.localhost:8900".encode("ascii")


class OriginFormTests(TableMixin, SynchronousTestCase):
    """Hole 6: L{policy.origin_form}, what every request target becomes, or a 400."""

    def test_table(self) -> None:
        """Paths pass; absolute http(s) URLs give their path and host; everything else is 400."""
        rows = [
            ((b"GET", b"/"), (b"/", None)),
            ((b"GET", b"/a/b?c=d&e=%20"), (b"/a/b?c=d&e=%20", None)),
            ((b"GET", b"//evil.example/x"), (b"//evil.example/x", None)),
            ((b"POST", b"/?http://x/"), (b"/?http://x/", None)),
            ((b"GET", b"http://" + OTHER_HOST + b"/abs"), (b"/abs", OTHER_HOST)),
            ((b"GET", b"HTTPS://" + OTHER_HOST + b"/a?b"), (b"/a?b", OTHER_HOST)),
            ((b"GET", b"http://" + OTHER_HOST), (b"/", OTHER_HOST)),
            ((b"GET", b"http://" + OTHER_HOST + b"?q=1"), (b"/?q=1", OTHER_HOST)),
            ((b"GET", b"http://[::1]:8900/x"), (b"/x", b"[::1]:8900")),
            ((b"GET", b"http://host//double"), (b"//double", b"host")),
            ((b"OPTIONS", b"*"), BadRequest),
            ((b"GET", b"*"), BadRequest),
            ((b"CONNECT", OTHER_HOST), BadRequest),
            ((b"CONNECT", b"/"), BadRequest),
            ((b"GET", OTHER_HOST), BadRequest),
            ((b"GET", b"example.com:443"), BadRequest),
            ((b"GET", b"relative/path"), BadRequest),
            ((b"GET", b"?q=1"), BadRequest),
            ((b"GET", b""), BadRequest),
            ((b"GET", b"/a#fragment"), BadRequest),
            ((b"GET", b"http://host/a#fragment"), BadRequest),
            ((b"GET", b"ftp://host/file"), BadRequest),
            ((b"GET", b"javascript://host/%0aalert(1)"), BadRequest),
            ((b"GET", b"http:///no-host"), BadRequest),
            ((b"GET", b"http://user:pass@" + OTHER_HOST + b"/"), BadRequest),
            ((b"GET", b"http://" + REQUEST_HOST + b"@" + OTHER_HOST + b"/"), BadRequest),
            ((b"GET", b"http://host:port/"), BadRequest),
            ((b"GET", b"http://host:99999999/"), BadRequest),
            ((b"GET", b"http:/path"), BadRequest),
            ((b"GET", b"http:host/path"), BadRequest),
        ]
        self.assertRows(rows, lambda line: policy.origin_form(*line))


class _Recorder:
    """A handler that records each request's method, target and Host, and answers 200."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes, list[bytes] | None]] = []

    async def __call__(self, request: StreamingRequest) -> None:
        self.seen.append(
            (request.method, request.uri, request.requestHeaders.getRawHeaders(b"host"))
        )
        request.setHeader(b"content-length", b"0")
        request.finish()


class ServedTargetTests(TableMixin, SynchronousTestCase):
    """Hole 6: what the server under both hops hands its handler for each request line."""

    def test_table(self) -> None:
        """
        An absolute-form target reaches the handler as a path with its host as the only Host;
        any other form, a fragment or CONNECT is refused with 400 and never reaches it.
        """
        absolute = b"http://" + OTHER_HOST + b"/abs?x=1"
        rows = [
            ((b"GET /p?q HTTP/1.1", REQUEST_HOST), (b"GET", b"/p?q", [REQUEST_HOST])),
            (
                (b"GET " + absolute + b" HTTP/1.1", REQUEST_HOST),
                (b"GET", b"/abs?x=1", [OTHER_HOST]),
            ),
            ((b"GET " + absolute + b" HTTP/1.1", None), (b"GET", b"/abs?x=1", [OTHER_HOST])),
            (
                (b"GET " + absolute + b" HTTP/1.0", REQUEST_HOST),
                (b"GET", b"/abs?x=1", [OTHER_HOST]),
            ),
            ((b"OPTIONS * HTTP/1.1", REQUEST_HOST), 400),
            ((b"CONNECT " + OTHER_HOST + b" HTTP/1.1", REQUEST_HOST), 400),
            ((b"GET " + OTHER_HOST + b" HTTP/1.1", REQUEST_HOST), 400),
            ((b"GET /p#frag HTTP/1.1", REQUEST_HOST), 400),
            ((b"GET ftp://host/x HTTP/1.1", REQUEST_HOST), 400),
            ((b"GET http://u@" + OTHER_HOST + b"/ HTTP/1.1", REQUEST_HOST), 400),
        ]

        def served(row: tuple[bytes, bytes | None]) -> object:
            line, host = row
            handler = _Recorder()
            client = MemoryClient(ProxySite(handler, MemoryReactorClock()))
            head = [line] + ([b"Host: " + host] if host is not None else [])
            client.send(b"\r\n".join(head) + b"\r\n\r\n")
            response = client.response()
            if response.status != 200:
                assert client.closed and not handler.seen, (client.value(), handler.seen)
                assert response.body.startswith(b"Bad request: "), response.body
                return response.status
            [seen] = handler.seen
            return seen

        self.assertRows(rows, served)


# What servers and frameworks behind proxies believe about the client or the original request,
# besides X-Forwarded-For/-Proto/-Host (Tornado, Rack, Werkzeug's ProxyFix, Express, Symfony,
# CDNs), each in three spellings.
CLAIM_NAMES = [
    b"x-real-ip",
    b"forwarded",
    b"x-client-ip",
    b"client-ip",
    b"true-client-ip",
    b"cf-connecting-ip",
    b"fastly-client-ip",
    b"x-cluster-client-ip",
    b"x-original-forwarded-for",
    b"forwarded-for",
    b"x-forwarded",
    b"x-forwarded-port",
    b"x-forwarded-prefix",
    b"x-forwarded-scheme",
    b"x-forwarded-ssl",
    b"x-forwarded-server",
    b"x-scheme",
    b"x-url-scheme",
    b"front-end-https",
    b"x-original-url",
    b"x-rewrite-url",
    b"x-original-host",
    b"x-host",
]
CLAIMS_SPELLINGS = [
    spelling for name in CLAIM_NAMES for spelling in (name, name.upper(), name.title())
]


class ClientClaimTests(TableMixin, SynchronousTestCase):
    """X-Real-IP and the other headers services believe about the client or the request."""

    def test_claims_dropped(self) -> None:
        """
        Every claim header, any case, from an untrusted or a trusted peer, is dropped; the
        proxy's own X-Real-IP replaces the client's.
        """
        real_ip = [(name, trusted) for name in CLAIMS_SPELLINGS[:3] for trusted in (0, 1)]
        self.assertEqual(CLAIMS_SPELLINGS[0], b"x-real-ip")
        rows = [((name, trusted), None) for name in CLAIMS_SPELLINGS[3:] for trusted in (0, 1)]
        rows += [(row, [CLIENT_IP.encode()]) for row in real_ip]
        self.assertRows(rows, front_door_forwards)

    def test_real_ip(self) -> None:
        """
        X-Real-IP is the peer, or through trusted proxies the client they report: never what
        the client wrote in it.
        """
        cdn = "192.0.2.0/24"
        rows = [
            # (client_ip, trusted peer, X-Forwarded-For values, trusted networks) -> X-Real-IP
            ((CLIENT_IP, False, (), ()), [CLIENT_IP.encode()]),
            ((CLIENT_IP, False, (b"1.2.3.4",), ()), [CLIENT_IP.encode()]),
            ((None, False, (b"1.2.3.4",), ()), None),
            ((PROXY_IP, True, (), ()), [PROXY_IP.encode()]),
            ((PROXY_IP, True, (b"1.2.3.4",), ()), [b"1.2.3.4"]),
            ((PROXY_IP, True, (b"6.6.6.6, 1.2.3.4",), ()), [b"1.2.3.4"]),
            ((PROXY_IP, True, (b"6.6.6.6", b"1.2.3.4"), ()), [b"1.2.3.4"]),
            # Through a trusted CDN, then the trusted proxy: the address the CDN saw.
            ((PROXY_IP, True, (b"6.6.6.6, 1.2.3.4, 192.0.2.7",), (cdn,)), [b"1.2.3.4"]),
            ((PROXY_IP, True, (b"192.0.2.8, 192.0.2.7",), (cdn,)), [b"192.0.2.8"]),
            # Not an address: the proxy that sent it is the client as far as anyone knows.
            ((PROXY_IP, True, (b"unknown",), ()), [PROXY_IP.encode()]),
            ((PROXY_IP, True, (b"1.2.3.4, unknown, 192.0.2.7",), (cdn,)), [b"192.0.2.7"]),
            ((PROXY_IP, True, (b"1.2.3.4:5678",), ()), [PROXY_IP.encode()]),
            ((PROXY_IP, True, (b" 2001:DB8::1 ",), ()), [b"2001:db8::1"]),
        ]

        def real_ip(row: tuple[str | None, bool, tuple[bytes, ...], tuple[str, ...]]) -> object:
            client_ip, trusted, values, networks = row
            client = headers_of(
                (b"X-Real-IP", b"6.6.6.6"), *[(b"X-Forwarded-For", value) for value in values]
            )
            result = to_gateway(
                client,
                client_ip=client_ip,
                trusted_peer=trusted,
                trusted_proxies=tuple(ipaddress.ip_network(n) for n in networks),
            )
            return as_dict(result).get(b"x-real-ip")

        self.assertRows(rows, real_ip)

    def test_forwarded_host_is_the_routed_host(self) -> None:
        """A trusted proxy's X-Forwarded-Host (Nginx passes a client's on) is not believed."""
        client = headers_of((b"X-Forwarded-Host", b"evil.example"))
        for trusted in (False, True):
            result = as_dict(to_gateway(client, trusted_peer=trusted, client_ip=PROXY_IP))
            self.assertEqual(result[b"x-forwarded-host"], [REQUEST_HOST])

    def test_gateway_passes_the_proxy_values(self) -> None:
        """The gateway passes the front door's X-Real-IP and X-Forwarded-* to the service."""
        client = headers_of((b"X-Real-IP", b"6.6.6.6"), (b"True-Client-IP", b"6.6.6.6"))
        through = as_dict(policy.container_request_headers(to_gateway(client), REQUEST_HOST))
        self.assertEqual(through[b"x-real-ip"], [CLIENT_IP.encode()])
        self.assertEqual(through[b"x-forwarded-for"], [CLIENT_IP.encode()])
        self.assertNotIn(b"true-client-ip", through)
