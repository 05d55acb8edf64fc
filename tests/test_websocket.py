"""
WebSockets through the whole chain (controller → TLS gateway → service), on loopback.
"""

from __future__ import annotations

import gc
import os
import socket

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from arvproxy.httpserver import StreamingRequest
from tests.chain import exchange, start_chain
from tests.wsservice import Client, EchoFactory, Rejected

SIZES = [0, 125, 126, 65535, 65536, 16 * 1024 * 1024]


class WebSocketChainTests(unittest.TestCase):
    timeout = 120

    async def _chain(self):
        self.service = EchoFactory()
        port = reactor.listenTCP(0, self.service, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return await start_chain(self, port.getHost().port)

    async def _connect(self, chain, cookie=True, target="/ws", **kwargs) -> Client:
        headers = [(b"cookie", chain.cookie)] if cookie else []
        client = Client(chain.host.decode(), target, headers=headers, **kwargs)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", chain.controller_port)
        await connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport.abortConnection())
        return client

    def test_messages_of_every_size_echo(self):
        """Text and binary messages of 0 to 16 MiB bytes cross both hops unchanged, both ways."""

        async def go():
            chain = await self._chain()
            client = await self._connect(chain)
            await client.accepted
            for size in SIZES:
                payload = os.urandom(size)
                client.send(BytesMessage(data=payload))
                kind, (data, _) = await client.messages.get()
                self.assertEqual((kind, len(data)), ("bytes", size))
                self.assertEqual(data, payload)
                text = "é" * (size // 2)
                client.send(TextMessage(data=text))
                kind, (data, _) = await client.messages.get()
                self.assertEqual((kind, data), ("text", text))

        return defer.ensureDeferred(go())

    def test_open_tunnel_keeps_no_request(self):
        """
        Once spliced, neither hop keeps the handshake's request (its headers, the handler that
        served it): thousands of idle notebook tunnels must cost only their connections.
        """

        def alive() -> int:
            gc.collect()
            return sum(isinstance(o, StreamingRequest) for o in gc.get_objects())

        async def go():
            chain = await self._chain()
            before = alive()
            clients = [await self._connect(chain) for _ in range(3)]
            for client in clients:
                await client.accepted
            self.assertEqual(alive(), before)
            # The tunnels still work after their requests are gone.
            for client in clients:
                client.send(TextMessage(data="still here"))
                self.assertEqual(await client.messages.get(), ("text", ("still here", 1)))

        return defer.ensureDeferred(go())

    def test_fragments_pings_and_close_codes_pass_untouched(self):
        """Fragmented messages stay fragmented; pings get pongs; the close code arrives."""

        async def go():
            chain = await self._chain()
            client = await self._connect(chain)
            await client.accepted
            client.send(TextMessage(data="one ", message_finished=False))
            client.send(TextMessage(data="two ", message_finished=False))
            client.send(TextMessage(data="three", message_finished=True))
            kind, (data, parts) = await client.messages.get()
            self.assertEqual((kind, data, parts), ("text", "one two three", 3))
            self.assertEqual(
                self.service.frames[-3:], [("TextMessage", 4)] * 2 + [("TextMessage", 5)]
            )

            client.send(Ping(payload=b"are you there"))
            self.assertEqual(await client.messages.get(), ("pong", b"are you there"))

            client.send(CloseConnection(code=4001, reason="done"))
            self.assertEqual(await client.closed, 4001)
            self.assertEqual(self.service.close_codes, [4001])

        return defer.ensureDeferred(go())

    def test_subprotocols_and_extensions_are_negotiated_end_to_end(self):
        """Sec-WebSocket-Protocol and -Extensions reach the service and its choice comes back."""

        async def go():
            chain = await self._chain()
            client = await self._connect(chain, subprotocols=["superchat", "chat"], deflate=True)
            accepted = await client.accepted
            self.assertEqual(accepted.subprotocol, "superchat")
            self.assertEqual([e.name for e in accepted.extensions], ["permessage-deflate"])
            request = self.service.requests[-1]
            self.assertEqual(request.subprotocols, ["superchat", "chat"])
            payload = b"compressible " * 10000
            client.send(BytesMessage(data=payload))
            self.assertEqual(await client.messages.get(), ("bytes", (payload, 1)))

        return defer.ensureDeferred(go())

    def test_upgrade_without_token_is_refused_before_the_service(self):
        """An upgrade without a token gets 401 and the service never sees a handshake."""

        async def go():
            chain = await self._chain()
            client = await self._connect(chain, cookie=False)
            error = await self.assertFailure(client.accepted, Rejected)
            self.assertEqual(error.status, 401)
            self.assertEqual(self.service.requests, [])

        return defer.ensureDeferred(go())

    def test_client_cannot_open_a_carrier(self):
        """A client asking for the hops' own tunnel carrier gets 400; the gateway never hears."""

        async def go():
            chain = await self._chain()
            sock = socket.create_connection(("127.0.0.1", chain.controller_port))
            self.addCleanup(sock.close)
            request = (
                b"GET /.arvproxy/carrier HTTP/1.1\r\nHost: %s\r\nCookie: %s\r\n"
                b"Connection: Upgrade\r\nUpgrade: arvproxy-tunnels/1\r\n\r\n"
            ) % (chain.host, chain.cookie)
            reply = await exchange(sock, request, b"reserved")
            self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply)
            self.assertEqual(chain.gateway.open_requests(), 0)
            self.assertEqual(self.service.plain_requests, 0)

        return defer.ensureDeferred(go())

    def test_tunnels_share_one_connection_to_the_gateway(self):
        """Many WebSockets to one container travel on one carrier (one TLS connection)."""

        async def go():
            chain = await self._chain()
            clients = [await self._connect(chain) for _ in range(5)]
            for client in clients:
                await client.accepted
            for i, client in enumerate(clients):
                client.send(TextMessage(data=f"tunnel {i}"))
            for i, client in enumerate(clients):
                self.assertEqual(await client.messages.get(), ("text", (f"tunnel {i}", 1)))
            carriers = chain.controller._gateways.carriers._carriers
            self.assertEqual([len(c) for cs in carriers.values() for c in cs], [5])

        return defer.ensureDeferred(go())

    async def _tunnel_and_its_carrier(self):
        """A chain with one open tunnel: the chain, the tunnel's client, and its carrier."""
        chain = await self._chain()
        client = await self._connect(chain)
        await client.accepted
        (carrier,) = self._carriers(chain)
        return chain, client, carrier

    async def _works_on_a_new_carrier(self, chain, old):
        """A new tunnel echoes, on a carrier other than C{old} (the only one)."""
        client = await self._connect(chain)
        await client.accepted
        client.send(TextMessage(data="again"))
        self.assertEqual(await client.messages.get(), ("text", ("again", 1)))
        (new,) = self._carriers(chain)
        self.assertIsNot(new, old)

    def _carriers(self, chain):
        pool = chain.controller._gateways.carriers
        return [c for cs in pool._carriers.values() for c in cs]

    def test_a_lost_carrier_ends_its_tunnels_and_a_new_one_serves_the_next(self):
        """When a carrier's connection drops, its tunnels close; the next tunnel gets a new one."""

        async def go():
            chain, first, old = await self._tunnel_and_its_carrier()
            old.transport.abortConnection()
            self.assertIsNone(await first.closed)
            await self._works_on_a_new_carrier(chain, old)

        return defer.ensureDeferred(go())

    def test_a_carrier_lost_as_a_tunnel_sets_out_is_replaced(self):
        """
        A carrier that drops just after a tunnel was sent on it (as when the gateway closes an
        idle carrier at that moment) costs the client nothing: the tunnel goes on a new one.
        """

        async def go():
            chain, _, old = await self._tunnel_and_its_carrier()
            open_stream = old.open_stream

            def open_then_drop(protocol):
                stream = open_stream(protocol)
                old.transport.abortConnection()
                return stream

            old.open_stream = open_then_drop
            await self._works_on_a_new_carrier(chain, old)

        return defer.ensureDeferred(go())

    def test_carrier_refused_by_a_finished_container(self):
        """A gateway whose container has finished refuses the carrier: the client gets 410."""

        async def go():
            chain = await self._chain()
            chain.gateway.accepting = False
            client = await self._connect(chain)
            rejected = await self.assertFailure(client.accepted, Rejected)
            self.assertEqual(rejected.status, 410)
            self.assertEqual(chain.controller._gateways.carriers._carriers, {})

        return defer.ensureDeferred(go())

    def test_refused_upgrade_is_relayed_and_connection_stays_http(self):
        """A non-101 answer reaches the client as a response; the connection serves HTTP again."""

        async def go():
            chain = await self._chain()
            sock = socket.create_connection(("127.0.0.1", chain.controller_port))
            self.addCleanup(sock.close)
            request = (
                b"GET /ws?reject HTTP/1.1\r\nHost: %s\r\nCookie: %s\r\n"
                b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ) % (chain.host, chain.cookie)
            # Read to the end of the chunked answer, which may leave in more than one piece.
            reply = await exchange(sock, request, b"\r\n0\r\n\r\n")
            self.assertTrue(reply.startswith(b"HTTP/1.1 403 "), reply)
            self.assertIn(b"refused by the service", reply)
            head = reply.lower().split(b"\r\n\r\n")[0]
            self.assertNotIn(b"upgrade", head)
            # A first visit: the proxy's own cookie, set before relaying, goes with the answer.
            self.assertIn(b"set-cookie: arvados_container_uuid=", head)
            # The same connection now carries an ordinary request, authorized as usual.
            again = b"GET / HTTP/1.1\r\nHost: %s\r\nCookie: %s\r\n\r\n" % (chain.host, chain.cookie)
            reply = await exchange(sock, again, b"plain HTTP answer")
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
            self.assertEqual(self.service.plain_requests, 1)

        return defer.ensureDeferred(go())
