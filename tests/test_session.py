"""
Short-lived links (the services page's Connect) become lasting sessions, and die on first use.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web import server
from twisted.web.resource import Resource

from arvproxy import policy
from arvproxy.errors import Unauthorized
from tests.chain import start_chain


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


def _get(port: int, host: bytes, target: bytes, cookie: bytes | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        head = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"
        if cookie:
            head += b"Cookie: " + cookie + b"\r\n"
        sock.sendall(head + b"\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def _cookie_token(reply: bytes) -> bytes:
    for line in reply.split(b"\r\n"):
        if line.lower().startswith(b"set-cookie: arvados_api_token="):
            value = line.split(b"=", 1)[1].split(b";", 1)[0]
            token = policy.decode_token_cookie(value)
            assert token is not None
            return token
    raise AssertionError(f"no token cookie in {reply!r}")


class ConnectSessionTests(unittest.TestCase):
    timeout = 60

    async def _chain(self):
        port = reactor.listenTCP(0, server.Site(_Hello()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return await start_chain(self, port.getHost().port)

    def test_short_connect_link_becomes_a_session_and_dies(self):
        """A 90 s connect token is swapped for a 12 h one with the same scope, and used up."""

        async def go():
            chain = await self._chain()
            credentials = await chain.registry.authenticate(chain.token)
            scope = policy.connect_scope(chain.request_uuid, chain.service_port)
            link, _ = await chain.registry.create_token(credentials.user_uuid, [scope], 90)
            target = b"/?arvados_api_token=" + link.encode()

            reply = await deferToThread(_get, chain.controller_port, chain.host, target)
            self.assertTrue(reply.startswith(b"HTTP/1.1 303 "), reply)
            session = _cookie_token(reply)
            self.assertNotEqual(session, link.encode())
            granted = await chain.registry.authenticate(session.decode())
            self.assertEqual(granted.scopes, (scope,))
            self.assertEqual(granted.user_uuid, credentials.user_uuid)
            lasts = granted.expires_at.timestamp() - datetime.now(UTC).timestamp()
            self.assertGreater(lasts, 11 * 3600)
            await self.assertFailure(chain.registry.authenticate(link), Unauthorized)

            cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(session)
            reply = await deferToThread(_get, chain.controller_port, chain.host, b"/", cookie)
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
            self.assertTrue(reply.endswith(b"hello"), reply)

        return defer.ensureDeferred(go())

    def test_full_tokens_are_kept_as_they_are(self):
        """A token with scope "all" goes into the cookie unchanged, and still works."""

        async def go():
            chain = await self._chain()
            target = b"/?arvados_api_token=" + chain.token.encode()
            reply = await deferToThread(_get, chain.controller_port, chain.host, target)
            self.assertEqual(_cookie_token(reply), chain.token.encode())
            await chain.registry.authenticate(chain.token)

        return defer.ensureDeferred(go())
