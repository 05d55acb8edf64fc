"""
Attacks on the header rules through the real plugins (issue 16): the front door and a gateway
as twistd processes on loopback, a client sending raw bytes as an outsider would, and a real
WSGI server (the standard library's C{wsgiref}) as the service, since WSGI servers read
C{X_Forwarded_For} and C{X-Forwarded-For} as one variable.  Requests to a gateway go straight
to its TLS port, signed as the front door would sign them.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from arvproxy import policy
from tests import e2e

reactor: Any = _reactor


def run(coroutine: Any) -> defer.Deferred[Any]:
    """A coroutine as the Deferred trial waits for."""
    return defer.ensureDeferred(coroutine)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class WSGIService:
    """
    A real WSGI server on 127.0.0.1, serving in a thread of its own: its application answers
    every request with the C{HTTP_*} variables of its environ, as JSON, and records them.
    """

    def __init__(self) -> None:
        self.environs: list[dict[str, str]] = []
        self.server: WSGIServer = make_server(
            "127.0.0.1", 0, self.application, handler_class=_QuietHandler
        )
        self.port = int(self.server.server_port)
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def application(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
        seen["REQUEST_METHOD"] = environ["REQUEST_METHOD"]
        seen["PATH_INFO"] = environ["PATH_INFO"]
        self.environs.append(seen)
        body = json.dumps(seen).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    async def stop(self, reactor: Any) -> None:
        await threads.deferToThreadPool(reactor, reactor.getThreadPool(), self.server.shutdown)
        self.server.server_close()
        self._thread.join()


def wsgi_vhost(chain: e2e.Chain, port: int) -> bytes:
    """The Host that names port C{port} of the chain's container request."""
    return f"{chain.cluster.request.uuid}-{port}.{e2e.SUFFIX}:{chain.controller_port}".encode()


def response_body(raw: bytes) -> bytes:
    """The body of the one response in C{raw} (sent with a Content-Length)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return body


# Request header spellings that a WSGI server reads as the proxy's own headers (hole 5).
UNDERSCORE_FORGERIES = [
    (b"X_Arvados_Target_Uuid", b"zzzzz-dz642-forged000000000"),
    (b"x-arvados_target-port", b"1"),
    (b"X_Arvados_Request_Host", b"evil.example"),
    (b"X_Forwarded_For", b"6.6.6.6"),
    (b"X_Forwarded_Host", b"evil.example"),
    (b"X_Forwarded_Proto", b"gopher"),
]


class UnderscoreSpellingTests(unittest.TestCase):
    """Hole 5: a WSGI service behind the proxy never reads a forged proxy header."""

    async def start(self) -> tuple[e2e.Chain, WSGIService]:
        chain = await e2e.start_chain(self, reactor)
        service = WSGIService()
        self.addCleanup(service.stop, reactor)
        return chain, service

    def test_through_the_front_door(self) -> defer.Deferred[None]:
        """Underscore spellings sent to the front door never reach the WSGI environ."""
        return run(self._through_the_front_door())

    async def _through_the_front_door(self) -> None:
        chain, service = await self.start()
        host = wsgi_vhost(chain, service.port)
        lines = [
            b"GET /env HTTP/1.1",
            b"Host: " + host,
            b"Cookie: " + chain.cluster.cookie(),
            *[name + b": " + value for name, value in UNDERSCORE_FORGERIES],
            b"Connection: close",
        ]
        raw = await e2e.raw_exchange(
            reactor, chain.controller_port, b"\r\n".join(lines) + b"\r\n\r\n"
        )
        self.assertEqual(e2e.status_codes(raw), [200], raw)
        [environ] = service.environs
        self.assertEqual(json.loads(response_body(raw)), environ)
        self.assertEqual(environ["HTTP_X_FORWARDED_FOR"], "127.0.0.1")
        self.assertEqual(environ["HTTP_X_FORWARDED_HOST"], host.decode())
        self.assertEqual(environ["HTTP_X_FORWARDED_PROTO"], "http")
        self.assertEqual([k for k in environ if k.startswith("HTTP_X_ARVADOS")], [])

    def test_straight_to_the_gateway(self) -> defer.Deferred[None]:
        """Underscore spellings in a request signed for the gateway never reach the environ."""
        return run(self._straight_to_the_gateway())

    async def _straight_to_the_gateway(self) -> None:
        chain, service = await self.start()
        cluster = chain.cluster
        direct = e2e.Client(reactor, secret=cluster.secret)
        self.addCleanup(direct.close)
        host = wsgi_vhost(chain, service.port)
        headers = Headers(
            {
                b"host": [cluster.gateway_address().encode()],
                policy.TARGET_UUID: [cluster.container_uuid.encode()],
                policy.TARGET_PORT: [b"%d" % (service.port,)],
                policy.REQUEST_HOST: [host],
                b"x-forwarded-for": [b"127.0.0.1"],
            }
        )
        for name, value in UNDERSCORE_FORGERIES:
            headers.addRawHeader(name, value)
        policy.sign_request(headers, cluster.secret, time.time(), b"GET", b"/env")
        url = b"https://127.0.0.1:%d/env" % (chain.gateway_port,)
        response, body = await direct.fetch(b"GET", url, headers)
        self.assertEqual(response.code, 200, body)
        [environ] = service.environs
        self.assertEqual(environ["HTTP_X_FORWARDED_FOR"], "127.0.0.1")
        self.assertEqual(environ["HTTP_HOST"], host.decode())
        for name in ("HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO"):
            self.assertNotIn(name, environ)
        self.assertEqual([k for k in environ if k.startswith("HTTP_X_ARVADOS")], [])


def raw_request(line: bytes, *headers: bytes) -> bytes:
    """A request with this request line and header lines, closing its connection."""
    return b"\r\n".join([line, *headers, b"Connection: close"]) + b"\r\n\r\n"


class RequestTargetTests(unittest.TestCase):
    """Hole 6: request lines that name one host in the target and another in Host."""

    def test_absolute_form_at_the_front_door(self) -> defer.Deferred[None]:
        """
        C{GET http://<B>/abs} with C{Host: <A>} goes to B, in origin-form; A sees nothing.  A
        target naming no container host, and every other form of target, gets a 400.
        """
        return run(self._absolute_form_at_the_front_door())

    async def _absolute_form_at_the_front_door(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        service_b = WSGIService()
        self.addCleanup(service_b.stop, reactor)
        host_a, host_b = chain.vhost, wsgi_vhost(chain, service_b.port)
        cookie = b"Cookie: " + chain.cluster.cookie()
        raw = await e2e.raw_exchange(
            reactor,
            chain.controller_port,
            raw_request(b"GET http://" + host_b + b"/abs?x=1 HTTP/1.1", b"Host: " + host_a, cookie),
        )
        self.assertEqual(e2e.status_codes(raw), [200], raw)
        self.assertEqual(len(service_b.environs), 1, chain.service.uris())
        [environ] = service_b.environs
        self.assertEqual(
            (environ["PATH_INFO"], environ["HTTP_HOST"], environ["HTTP_X_FORWARDED_HOST"]),
            ("/abs", host_b.decode(), host_b.decode()),
        )
        self.assertEqual(chain.service.received, [])

        refused = [
            raw_request(b"GET http://evil.example/abs HTTP/1.1", b"Host: " + host_a, cookie),
            raw_request(b"GET https://" + host_a + b"/#frag HTTP/1.1", b"Host: " + host_a, cookie),
            raw_request(b"GET ftp://" + host_a + b"/x HTTP/1.1", b"Host: " + host_a, cookie),
            raw_request(b"GET http://u@" + host_a + b"/ HTTP/1.1", b"Host: " + host_a, cookie),
            raw_request(b"OPTIONS * HTTP/1.1", b"Host: " + host_a, cookie),
            raw_request(b"CONNECT " + host_a + b" HTTP/1.1", b"Host: " + host_a, cookie),
            raw_request(b"GET " + host_a + b" HTTP/1.1", b"Host: " + host_a, cookie),
            raw_request(b"GET /p#frag HTTP/1.1", b"Host: " + host_a, cookie),
        ]
        for data in refused:
            raw = await e2e.raw_exchange(reactor, chain.controller_port, data)
            self.assertEqual(e2e.status_codes(raw), [400], (data, raw))
        self.assertEqual(chain.service.received, [])
        self.assertEqual(len(service_b.environs), 1)

    def test_targets_at_the_gateway(self) -> defer.Deferred[None]:
        """
        A signed request with an absolute-form target reaches the service in origin-form; a
        signed C{OPTIONS *} or C{CONNECT} is refused with 400 before the service.
        """
        return run(self._targets_at_the_gateway())

    async def _targets_at_the_gateway(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        cluster = chain.cluster

        def signed(method: bytes, target: bytes, origin_form: bytes = b"/") -> bytes:
            """A request signed as the front door would sign it, for C{origin_form}."""
            headers = Headers(
                {
                    policy.TARGET_UUID: [cluster.container_uuid.encode()],
                    policy.TARGET_PORT: [b"%d" % (cluster.port,)],
                    policy.REQUEST_HOST: [chain.vhost],
                }
            )
            policy.sign_request(headers, cluster.secret, time.time(), method, origin_form)
            return raw_request(
                b"%s %s HTTP/1.1" % (method, target),
                b"Host: " + cluster.gateway_address().encode(),
                *[b"%s: %s" % (n, v) for n, vs in headers.getAllRawHeaders() for v in vs],
            )

        raw = await e2e.raw_exchange(
            reactor,
            chain.gateway_port,
            signed(b"GET", b"http://evil.example/abs?x=1", b"/abs?x=1"),
            secret=cluster.secret,
        )
        self.assertEqual(e2e.status_codes(raw), [200], raw)
        self.assertEqual(chain.service.uris(), [b"/abs?x=1"])
        self.assertEqual(chain.service.received[0].header(b"host"), [chain.vhost])
        for method, target in [(b"OPTIONS", b"*"), (b"CONNECT", b"evil.example:443")]:
            raw = await e2e.raw_exchange(
                reactor, chain.gateway_port, signed(method, target, target), secret=cluster.secret
            )
            self.assertEqual(e2e.status_codes(raw), [400], (method, raw))
        self.assertEqual(chain.service.uris(), [b"/abs?x=1"])


# Headers that servers behind proxies believe about the client or the request, as a client
# would forge them.
CLAIMS = [
    (b"X-Real-IP", b"6.6.6.6"),
    (b"True-Client-IP", b"6.6.6.6"),
    (b"CF-Connecting-IP", b"6.6.6.6"),
    (b"X-Client-IP", b"6.6.6.6"),
    (b"X-Cluster-Client-IP", b"6.6.6.6"),
    (b"Forwarded", b"for=6.6.6.6;proto=https;host=evil.example"),
    (b"X-Forwarded-Port", b"6666"),
    (b"X-Forwarded-Prefix", b"/evil"),
    (b"X-Original-URL", b"/admin"),
    (b"X-Forwarded-Host", b"evil.example"),
]


class ClientClaimTests(unittest.TestCase):
    """X-Real-IP and the other claims about the client reach the service only as the proxy's."""

    async def claims(self, **arvproxy: Any) -> tuple[e2e.Chain, e2e.Received]:
        chain = await e2e.start_chain(self, reactor, **arvproxy)
        lines = [
            b"GET /claims HTTP/1.1",
            b"Host: " + chain.vhost,
            b"Cookie: " + chain.cluster.cookie(),
            b"X-Forwarded-For: 203.0.113.5",
            *[name + b": " + value for name, value in CLAIMS],
        ]
        raw = await e2e.raw_exchange(reactor, chain.controller_port, raw_request(*lines))
        self.assertEqual(e2e.status_codes(raw), [200], raw)
        [seen] = chain.service.received
        for name, _ in CLAIMS:
            if name not in (b"X-Real-IP", b"X-Forwarded-Host"):
                self.assertEqual(seen.header(name), [], name)
        self.assertEqual(seen.header(b"x-forwarded-host"), [chain.vhost])
        return chain, seen

    def test_untrusted_client(self) -> defer.Deferred[None]:
        """A client's X-Real-IP, X-Forwarded-For and other claims are replaced or dropped."""
        return run(self._untrusted_client())

    async def _untrusted_client(self) -> None:
        chain, seen = await self.claims()
        self.assertEqual(seen.header(b"x-real-ip"), [b"127.0.0.1"])
        self.assertEqual(seen.header(b"x-forwarded-for"), [b"127.0.0.1"])

    def test_through_a_trusted_proxy(self) -> defer.Deferred[None]:
        """
        Through a trusted proxy, X-Real-IP is the client it reports in X-Forwarded-For; its
        X-Forwarded-Host, Forwarded and the other claims, which Nginx passes on, are not believed.
        """
        return run(self._through_a_trusted_proxy())

    async def _through_a_trusted_proxy(self) -> None:
        chain, seen = await self.claims(TrustedProxies=["127.0.0.1/32"])
        self.assertEqual(seen.header(b"x-real-ip"), [b"203.0.113.5"])
        self.assertEqual(seen.header(b"x-forwarded-for"), [b"203.0.113.5, 127.0.0.1"])
