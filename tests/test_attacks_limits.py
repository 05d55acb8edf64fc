"""
Attacks on the proxy's limits, as an outsider makes them: raw sockets against the real twistd
plugins on loopback.

  - Idle and slow clients (issue 16, hole 7): connections that never send a byte, send only
    empty lines, trickle a head a byte a second, or sit on a kept connection, at both hops.
    Each must be closed once the header deadline (C{Timeouts.RequestHeaders}) has passed: with
    408 when a request had begun, without a word when nothing had.
  - Anonymous visitors who would take every connection of a container (hole 8): WebSockets
    to a public port, from several client addresses (127.0.0.1, 127.0.0.2, ...: all of
    127.0.0.0/8 is loopback), while the container's owner still opens a private port.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial import unittest
from wsproto.events import CloseConnection

from arvproxy import policy
from arvproxy.backends.registry import RegistryStore
from arvproxy.controller import tap as controller_tap
from arvproxy.service import ListeningService
from tests import e2e
from tests.e2e import Cluster, Twistd
from tests.wsservice import Client as WebSocketClient
from tests.wsservice import EchoFactory, Rejected, TextMessage

# The header deadline in these tests (RequestHeaders), in seconds: short, so that the tests are
# quick, yet long enough that a busy machine sends a whole head in time.
DEADLINE = 2
# How long a test waits for what must happen within a deadline or two: long, so that a slow
# machine never fails a test, yet far shorter than ClientIdle (300 s), which kept every one of
# these connections open before.
PATIENCE = 60.0


def run(coroutine: Any) -> defer.Deferred[Any]:
    return defer.ensureDeferred(coroutine)


@dataclass
class Running:
    """A controller and the container's gateway as twistd processes, and the registry."""

    directory: str
    cluster: Cluster
    controller_port: int
    controller: Twistd
    gateway: Twistd

    def vhost(self, port: int) -> bytes:
        label = f"{self.cluster.request.uuid}-{port}"
        return f"{label}.{e2e.SUFFIX}:{self.controller_port}".encode()

    @property
    def gateway_port(self) -> int:
        return int(self.cluster.gateway_address().rsplit(":", 1)[1])


async def start(
    testcase: unittest.TestCase,
    ports: dict[int, str],
    controller_args: tuple[str, ...] = (),
    **arvproxy: Any,
) -> Running:
    """
    Start a controller (with C{controller_args}) and a gateway for a container request that
    publishes C{ports} (port to C{"public"} or C{"private"}), with these extra C{ArvProxy} keys;
    everything is stopped by the test's cleanups.
    """
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    store = RegistryStore(
        os.path.join(directory, "registry.sqlite"), e2e.CLUSTER_ID, system_root_token=e2e.ROOT_TOKEN
    )
    testcase.addCleanup(store.close)
    user = store.create_user("Owner")
    token, _ = store.create_token(user.uuid)
    request = store.create_container_request(
        user.uuid,
        name="limits",
        published_ports={port: {"access": access} for port, access in ports.items()},
    )
    cluster = Cluster(store, user, token, request, next(iter(ports)))
    controller_port = e2e.free_port()
    config = e2e.write_config(directory, controller_port, **arvproxy)
    controller, gateway = await e2e.start_plugins(
        reactor, testcase, directory, config, cluster, controller_port, controller_args
    )
    return Running(directory, cluster, controller_port, controller, gateway)


def timeouts(**values: str) -> dict[str, Any]:
    return {"Timeouts": {"RequestHeaders": f"{DEADLINE}s", **values}}


# --- Raw clients ---------------------------------------------------------------------------------


class RawClient(protocol.Protocol):
    """
    A client that writes what it is told, when it is told, and collects what comes back.

    @ivar closed: fires with everything received once the server has closed the connection.
    """

    transport: Any

    def __init__(self) -> None:
        self.received = bytearray()
        self.connected_now: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[bytes] = defer.Deferred()
        self._trickle: task.LoopingCall | None = None

    def connectionMade(self) -> None:
        self.connected_now.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def trickle(self, data: bytes, interval: float = 1.0) -> None:
        """Send C{data} a byte every C{interval} seconds, for as long as the connection lasts."""
        pieces = iter([data[i : i + 1] for i in range(len(data))])

        def one() -> None:
            piece = next(pieces, None)
            if piece is not None:
                self.transport.write(piece)

        self._trickle = task.LoopingCall(one)
        self._trickle.clock = reactor
        self._trickle.start(interval)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._trickle is not None and self._trickle.running:
            self._trickle.stop()
        self.closed.callback(bytes(self.received))


async def connect(testcase: unittest.TestCase, port: int, source: str = "127.0.0.1") -> RawClient:
    """A raw connection to 127.0.0.1:C{port} from C{source}, aborted at clean-up if still open."""
    client = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30, bindAddress=(source, 0))
    await endpoint.connect(protocol.Factory.forProtocol(lambda: client))

    async def abort() -> None:
        if not client.closed.called:
            client.transport.abortConnection()
        await client.closed

    testcase.addCleanup(lambda: run(abort()))
    return client


async def closed_by_server(clients: list[RawClient], what: str) -> list[bytes]:
    """What each client received, once the server has closed every connection (or fail)."""
    await e2e.wait_for(
        reactor,
        lambda: all(c.closed.called for c in clients),
        f"the server to close all {len(clients)} {what} (within {PATIENCE} s)",
        timeout=PATIENCE,
    )
    return [bytes(c.received) for c in clients]


def sockets(process: Twistd) -> int:
    """How many sockets C{process} has open."""
    return sum(target.startswith("socket:") for target in process.open_files())


async def let_go(process: Twistd, before: int) -> None:
    """Wait until C{process} has no more sockets open than C{before}: it let go of them all."""
    await e2e.wait_for(
        reactor,
        lambda: sockets(process) <= before,
        f"the {process.name} to close its sockets",
        [process],
    )


# --- TLS from a client that never answers close_notify ------------------------------------------


def tls_exchange(port: int, data: bytes) -> tuple[bytes, str]:
    """
    Complete a TLS handshake with 127.0.0.1:C{port} (any certificate), send C{data} (if any)
    over it, then never write again (no C{close_notify} either) and read until the server
    closes the TCP connection.  Blocks: call it in a thread.

    @return: what the server sent, decrypted, and how it ended: C{"closed"} (FIN) or
        C{"reset"}.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                chunk = sock.recv(65536)
                if not chunk:
                    raise AssertionError("the server closed during the handshake") from None
                incoming.write(chunk)
        if data:
            tls.write(data)
        sock.sendall(outgoing.read())
        raw = b""
        ending = "closed"
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                ending = "reset"
                break
            except TimeoutError:
                raise AssertionError(f"the server kept the connection for {PATIENCE} s") from None
            if not chunk:
                break
            raw += chunk
    incoming.write(raw)
    plain = b""
    while True:
        try:
            piece = tls.read(65536)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLError):
            break
        if not piece:
            break
        plain += piece
    return plain, ending


# --- Hole 7 --------------------------------------------------------------------------------------


class IdleConnectionTests(unittest.TestCase):
    """
    Connections that do not send a request in time are closed at both hops, however they
    dawdle; none is kept until ClientIdle.
    """

    timeout = 240

    def test_front_door(self) -> defer.Deferred[None]:
        """
        200 idle connections, clients that send only empty lines, trickle a head a byte a
        second, or begin a head and stop: every one closed, 408 only where a request began.
        """
        return run(self._front_door())

    async def _front_door(self) -> None:
        running = await start(self, {8080: "private"}, **timeouts())
        before = sockets(running.controller)
        idle: list[RawClient] = []
        for _ in range(8):
            # In batches, so that the controller's listen queue (50) never overflows.
            idle += await defer.gatherResults(
                [run(connect(self, running.controller_port)) for _ in range(25)]
            )
        # No wait for the controller to hold all 200 at once: on a loaded machine the first
        # ones reach their deadline (2 s from accept) before the last batch is connected.
        # Each is closed by the server below, whenever it was accepted.
        empty_lines = [await connect(self, running.controller_port) for _ in range(3)]
        for client in empty_lines:
            client.trickle(b"\r\n" * 100)
        head = b"GET / HTTP/1.1\r\nHost: " + running.vhost(8080) + b"\r\nX-Slow: " + b"a" * 100
        trickling = [await connect(self, running.controller_port) for _ in range(3)]
        for client in trickling:
            client.trickle(head)
        begun = [await connect(self, running.controller_port) for _ in range(3)]
        for client in begun:
            client.transport.write(head[:30])

        received = await closed_by_server(idle, "idle connections")
        self.assertEqual(set(received), {b""})
        received = await closed_by_server(empty_lines, "connections sending empty lines")
        self.assertEqual(set(received), {b""})
        for what, clients in [("trickling heads", trickling), ("begun heads", begun)]:
            for answer in await closed_by_server(clients, what):
                self.assertEqual(e2e.status_codes(answer), [408], answer)
        await let_go(running.controller, before)

    def test_kept_connection(self) -> defer.Deferred[None]:
        """A kept connection that brings no new request is closed, without a word."""
        return run(self._kept_connection())

    async def _kept_connection(self) -> None:
        service = e2e.ServiceSite(reactor)
        service_port = service.listen(reactor)
        self.addCleanup(service.stop, reactor)
        running = await start(self, {service_port: "private"}, **timeouts())
        client = await connect(self, running.controller_port)
        client.transport.write(
            b"GET /first HTTP/1.1\r\nHost: %s\r\nCookie: %s\r\n\r\n"
            % (running.vhost(service_port), running.cluster.cookie())
        )
        [answer] = await closed_by_server([client], "kept connections")
        self.assertEqual(e2e.status_codes(answer), [200], answer)
        self.assertEqual(service.uris(), [b"/first"])

    def test_gateway(self) -> defer.Deferred[None]:
        """
        The gateway closes connections that bring no request in time too: before a TLS
        handshake, after one, and with a head begun, even from a client that never answers
        the server's close_notify.
        """
        return run(self._gateway())

    async def _gateway(self) -> None:
        running = await start(self, {8080: "private"}, **timeouts())
        before = sockets(running.gateway)
        raw = [await connect(self, running.gateway_port) for _ in range(20)]
        idle_tls = deferToThread(tls_exchange, running.gateway_port, b"")
        begun_tls = deferToThread(tls_exchange, running.gateway_port, b"GET / HTTP/1.1\r\n")
        received = await closed_by_server(raw, "connections without a TLS handshake")
        self.assertEqual(set(received), {b""})
        self.assertEqual((await idle_tls)[0], b"")
        answer, _ = await begun_tls
        self.assertEqual(e2e.status_codes(answer), [408], answer)
        await let_go(running.gateway, before)


class KeptConnectionTests(unittest.TestCase):
    """
    The front door lets go of an idle connection (or carrier stream) to a gateway before the
    gateway would close it (the header deadline from the end of the last answer): a request
    with a body sent just as the gateway closes could not be sent again.
    """

    def test_front_door_lets_go_first(self) -> None:
        """The front door's pool keeps idle connections for half the gateway's wait at most."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # (RequestHeaders, ClientIdle, seconds the pool keeps an idle connection)
        for request_headers, client_idle, kept in [
            ("30s", "5m", 15.0),
            ("2s", "5m", 1.0),
            ("10m", "5m", 150.0),
            ("1h", "1h", 240.0),
        ]:
            timeouts = {"RequestHeaders": request_headers, "ClientIdle": client_idle}
            options = controller_tap.Options()
            options.parseOptions(["--config", e2e.write_config(directory, 8900, Timeouts=timeouts)])
            service = controller_tap.makeService(options, MemoryReactorClock())
            [listening] = [s for s in service if isinstance(s, ListeningService)]
            gateways: Any = listening._factory.handler._gateways
            self.assertEqual(gateways.pool.idle_timeout, kept, request_headers)


# --- Hole 8 --------------------------------------------------------------------------------------

PUBLIC_LIMITS = {
    "Limits": {
        "MaxConnectionsPerContainer": 10,
        "MaxAnonymousConnectionsPerContainer": 6,
        "MaxAnonymousConnectionsPerAddress": 3,
    }
}


class AnonymousFloodTests(unittest.TestCase):
    """
    Anonymous WebSockets to a public port take only their share of the container's
    connections, each client address a part of it: the owner still opens a private port.
    """

    timeout = 240

    def services(self) -> tuple[int, int]:
        """A WebSocket echo service on a public and on a private port."""
        ports = []
        for _ in range(2):
            listening = reactor.listenTCP(0, EchoFactory(), interface="127.0.0.1")
            self.addCleanup(listening.stopListening)
            ports.append(listening.getHost().port)
        return ports[0], ports[1]

    async def websocket(
        self, running: Running, port: int, source: str, cookie: bytes | None = None
    ) -> tuple[int, WebSocketClient]:
        """Open a WebSocket to C{port} from C{source}: 101, or the status it was refused with."""
        headers = [(b"cookie", cookie)] if cookie is not None else []
        client = WebSocketClient(running.vhost(port).decode(), "/ws", headers=headers)
        endpoint = TCP4ClientEndpoint(
            reactor, "127.0.0.1", running.controller_port, timeout=30, bindAddress=(source, 0)
        )
        await endpoint.connect(protocol.Factory.forProtocol(lambda: client))
        self.addCleanup(lambda: client.transport.abortConnection())
        try:
            await client.accepted
        except Rejected as e:
            self.assertIn(b"try again", e.body)
            return e.status or 0, client
        client.send(TextMessage(data="echo?"))
        self.assertEqual(await client.messages.get(), ("text", ("echo?", 1)))
        return 101, client

    def test_owner_keeps_headroom(self) -> defer.Deferred[None]:
        """
        Each address gets its part of the anonymous share and no more; when the share is used
        up, signed-in visitors without access are refused too, and the owner still connects.
        """
        return run(self._owner_keeps_headroom())

    async def _owner_keeps_headroom(self) -> None:
        public, private = self.services()
        running = await start(self, {public: "public", private: "private"}, **PUBLIC_LIMITS)
        store = running.cluster.store
        mallory = store.create_user("Mallory, who has no access")
        mallory_cookie = (
            policy.TOKEN_COOKIE
            + b"="
            + policy.encode_token_cookie(store.create_token(mallory.uuid)[0].encode())
        )
        owner = running.cluster.cookie()
        first: list[WebSocketClient] = []
        # (client address, cookie, port, status)
        steps: list[tuple[str, bytes | None, int, int]] = [
            *[("127.0.0.1", None, public, 101)] * 3,
            ("127.0.0.1", None, public, 503),
            *[("127.0.0.2", None, public, 101)] * 3,
            ("127.0.0.3", None, public, 503),
            ("127.0.0.4", mallory_cookie, public, 503),
            ("127.0.0.1", owner, private, 101),
            ("127.0.0.1", owner, public, 101),
            ("127.0.0.5", owner, private, 101),
        ]
        for i, (source, cookie, port, status) in enumerate(steps):
            got, client = await self.websocket(running, port, source, cookie)
            self.assertEqual(got, status, (i, source, port))
            if source == "127.0.0.1" and got == 101 and cookie is None:
                first.append(client)

        # A tunnel that ends gives its place back: the first address may open one again.
        first[0].send(CloseConnection(code=1000))
        await first[0].closed
        for _ in range(200):
            status, _ = await self.websocket(running, public, "127.0.0.1")
            if status == 101:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail("the closed tunnel's place was never given back")

    def test_several_front_door_processes(self) -> defer.Deferred[None]:
        """
        With two front-door processes (--workers 2), the gateway still keeps anonymous
        visitors to their share: the owner connects however they flood.
        """
        return run(self._several_front_door_processes())

    async def _several_front_door_processes(self) -> None:
        public, private = self.services()
        running = await start(
            self,
            {public: "public", private: "private"},
            controller_args=("--workers", "2"),
            **PUBLIC_LIMITS,
        )
        await e2e.wait_for(
            reactor,
            lambda: (
                "worker 1| " in running.controller.log_text()
                and "starting on" in running.controller.log_text().split("worker 1|", 1)[1]
            ),
            "the second front-door process to listen",
            [running.controller],
        )
        # Each process would let 6 through, 3 per address: 24 tries from 8 addresses spread
        # over both (SO_REUSEPORT), and the gateway lets 6 in all through.
        opened = 0
        for address in range(1, 9):
            for _ in range(3):
                status, _ = await self.websocket(running, public, f"127.0.0.{address}")
                self.assertIn(status, (101, 503))
                opened += status == 101
        self.assertEqual(opened, 6)
        for address in range(1, 5):
            status, _ = await self.websocket(
                running, private, f"127.0.0.{address}", running.cluster.cookie()
            )
            self.assertEqual(status, 101, address)


class LimitConfigurationTests(unittest.TestCase):
    """A mistake in the new limits stops both plugins at start-up, naming the key."""

    def test_refused_at_start_up(self) -> defer.Deferred[None]:
        """A share as large as the budget, or a part larger than the share: exit 1, the key."""
        return run(self._refused_at_start_up())

    async def _refused_at_start_up(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cluster = e2e.make_cluster(directory, 1)
        self.addCleanup(cluster.store.close)
        key = "Clusters.zzzzz.ArvProxy.Limits."
        cases = [
            (
                {"MaxConnectionsPerContainer": 10, "MaxAnonymousConnectionsPerContainer": 10},
                key + "MaxAnonymousConnectionsPerContainer",
            ),
            (
                {"MaxAnonymousConnectionsPerContainer": 5, "MaxAnonymousConnectionsPerAddress": 6},
                key + "MaxAnonymousConnectionsPerAddress",
            ),
        ]
        processes = []
        for i, (limits, _) in enumerate(cases):
            case = os.path.join(directory, str(i))
            os.makedirs(case)
            config = e2e.write_config(case, e2e.free_port(), Limits=limits)
            processes += [
                Twistd.spawn(reactor, case, "controller", ["arv-controller-proxy", "-c", config]),
                Twistd.spawn(
                    reactor,
                    case,
                    "gateway",
                    [
                        "crunch-run-gateway",
                        "-c",
                        config,
                        "--container-uuid",
                        cluster.container_uuid,
                    ],
                    stdin=e2e.dispatch_json(cluster.secret),
                ),
            ]
        codes = await defer.gatherResults([p.ended for p in processes])
        for i, process in enumerate(processes):
            output = process.output.decode(errors="replace")
            self.assertEqual(codes[i], 1, output)
            self.assertIn(": " + cases[i // 2][1] + ": expected ", output)
