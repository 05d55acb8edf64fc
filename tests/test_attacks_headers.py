"""
Attacks on the header rules through the real plugins (issue 16): the front door and a gateway
as twistd processes on loopback, a client sending raw bytes as an outsider would, and a real
WSGI server (the standard library's C{wsgiref}) as the service, since WSGI servers read
C{X_Forwarded_For} and C{X-Forwarded-For} as one variable.
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
                policy.AUTHORIZATION: [policy.sign(cluster.secret, time.time()).encode()],
                b"x-forwarded-for": [b"127.0.0.1"],
            }
        )
        for name, value in UNDERSCORE_FORGERIES:
            headers.addRawHeader(name, value)
        url = b"https://127.0.0.1:%d/env" % (chain.gateway_port,)
        response, body = await direct.fetch(b"GET", url, headers)
        self.assertEqual(response.code, 200, body)
        [environ] = service.environs
        self.assertEqual(environ["HTTP_X_FORWARDED_FOR"], "127.0.0.1")
        self.assertEqual(environ["HTTP_HOST"], host.decode())
        for name in ("HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO"):
            self.assertNotIn(name, environ)
        self.assertEqual([k for k in environ if k.startswith("HTTP_X_ARVADOS")], [])
