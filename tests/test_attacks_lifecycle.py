"""
Adversarial tests of the proxy's life cycle, through the real plugins (issue 16): several
processes sharing the registry (hole 0), a gateway that freezes (hole 9), and faults at shutdown
and start-up (hole 10).  See L{tests.e2e} for the harness.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from twisted.internet import defer, protocol, task, utils
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.backends import ContainerRequest
from arvproxy.backends.registry import RegistryStore
from arvproxy.tlsidentity import server_context_factory
from tests import e2e
from tests.test_end_to_end import connections_to
from tests.wsservice import Client as WebSocketClient
from tests.wsservice import EchoFactory, TextMessage

reactor: Any = _reactor


def run(coroutine: Any) -> defer.Deferred[Any]:
    """A coroutine as the Deferred trial waits for."""
    return defer.ensureDeferred(coroutine)


async def admin(directory: str, config: str, *args: str) -> str:
    """
    Run the real C{arvproxy} admin command (a process of its own, as an operator would) and
    return what it printed.

    @raise AssertionError: it failed.
    """
    env = dict(os.environ, PYTHONPATH=e2e.REPO_ROOT)
    argv = ["-m", "arvproxy.cli", "--config", config, *args]
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable, argv, env=env, path=directory
    )
    if code != 0:
        raise AssertionError(f"arvproxy {' '.join(args)} failed ({code}): {err.decode()}")
    return out.decode().strip()


async def until(
    check: Callable[[], Awaitable[Any]], what: str, watch: list[e2e.Twistd], timeout: float
) -> Any:
    """
    Ask C{check()} again and again until it gives something true, and return that.

    @raise AssertionError: C{timeout} seconds passed (saying what C{check} last gave), or a
        watched process exited.
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = await check()
        if result:
            return result
        for process in watch:
            if not process.running:
                raise AssertionError(
                    f"{process.name} exited waiting for {what}\n{process.describe()}"
                )
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {result!r})")
        await task.deferLater(reactor, 0.1, lambda: None)


class RegistrySharedByProcessesTests(unittest.TestCase):
    """
    Hole 0: the front door, the gateways and admin commands come and go on one registry file;
    every process sees every change, and no write is lost.
    """

    CACHE_TTL = 10.0
    # Changes must show within CacheTTL; the margin only absorbs a slow machine.
    DEADLINE = CACHE_TTL + 20.0

    def test_every_change_is_seen_and_nothing_lost(self) -> defer.Deferred[None]:
        """Running processes see every admin change within CacheTTL, and lose no write."""
        return run(self._every_change())

    async def _every_change(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        service = e2e.ServiceSite(reactor)
        service_port = service.listen(reactor)
        self.addCleanup(service.stop, reactor)
        controller_port = e2e.free_port()
        config = e2e.write_config(directory, controller_port, CacheTTL=f"{self.CACHE_TTL:g}s")

        # Everything through the admin command: this test process holds no connection to the
        # registry, so it cannot hold the locks a stale process would lack.
        async def cli(*args: str) -> str:
            return await admin(directory, config, *args)

        user = json.loads(await cli("user", "create", "--name", "Ada"))["uuid"]
        requests = [
            json.loads(
                await cli(
                    "container-request", "create", "--user", user, "--port", str(service_port)
                )
            )
            for _ in range(2)
        ]
        containers = [r["container_uuid"] for r in requests]
        token = await cli("token", "create", "--user", user, "--plain")

        controller = e2e.Twistd.spawn(
            reactor, directory, "controller", ["arv-controller-proxy", "--config", config]
        )
        self.addCleanup(controller.stop, reactor)

        def gateway(name: str, container: str) -> e2e.Twistd:
            process = e2e.Twistd.spawn(
                reactor,
                directory,
                name,
                ["crunch-run-gateway", "--config", config, "--container-uuid", container],
                stdin=e2e.dispatch_json(policy.gateway_secret(e2e.ROOT_TOKEN, container)),
            )
            self.addCleanup(process.stop, reactor)
            return process

        async def record(uuid: str) -> dict[str, Any]:
            return dict(json.loads(await cli("get", uuid)))

        async def running(uuid: str) -> str:
            container = await record(uuid)
            return container["gateway_address"] if container["state"] == "Running" else ""

        await e2e.wait_for(
            reactor, lambda: e2e.accepting(controller_port), "the controller", [controller]
        )
        client = e2e.Client(reactor)
        self.addCleanup(client.close)

        def vhost(index: int) -> bytes:
            label = f"{requests[index]['uuid']}-{service_port}"
            return f"{label}.{e2e.SUFFIX}:{controller_port}".encode()

        async def status(index: int, token: str | None) -> int:
            headers = Headers({b"host": [vhost(index)]})
            if token is not None:
                cookie = policy.encode_token_cookie(token.encode())
                headers.setRawHeaders(b"cookie", [policy.TOKEN_COOKIE + b"=" + cookie])
            response, _ = await client.fetch(
                b"GET", b"http://127.0.0.1:%d/" % (controller_port,), headers
            )
            return int(response.code)

        async def answers(index: int, token: str | None, code: int) -> bool:
            return await status(index, token) == code

        async def token_rounds(processes: list[e2e.Twistd], valid: int) -> str:
            """New tokens work and revoked ones stop working (C{valid}: a good token's status)."""
            nonlocal token
            for round in range(3):
                # Commands that only read come and go between the changes: each is a process
                # that closes the registry last when nobody else holds it properly.
                await cli("user", "list")
                new = await cli("token", "create", "--user", user, "--plain")
                await until(
                    lambda i=round % 2, t=new: answers(i, t, valid),
                    "a new token works",
                    processes,
                    self.DEADLINE,
                )
                await cli("container", "list")
                await cli("token", "revoke", token)
                await until(
                    lambda i=round % 2, t=token: answers(i, t, 401),
                    "a revoked token fails",
                    processes,
                    self.DEADLINE,
                )
                token = new
            return token

        # The front door alone, as before any container runs: the containers are Queued
        # (503 for a good token), and a bad token is refused (401).
        self.assertEqual(await status(0, token), 503)
        await token_rounds([controller], 503)

        # The gateways start and mark their containers Running.
        gateways = [gateway("gateway-0", containers[0]), gateway("gateway-1", containers[1])]
        processes = [controller, *gateways]
        for uuid in containers:
            await until(lambda uuid=uuid: running(uuid), "the gateway", processes, 30.0)
        for index in range(2):
            await until(
                lambda i=index: answers(i, token, 200),
                "the running container is reached",
                processes,
                self.DEADLINE,
            )
        await token_rounds(processes, 200)

        # A Connect link: the front door exchanges it for a session token (its own write).
        link = await cli(
            "token",
            "create",
            "--user",
            user,
            "--scope",
            f"CONNECT /arvados/v1/container/{requests[0]['uuid']}/{service_port}",
            "--ttl",
            "90",
            "--plain",
        )
        headers = Headers({b"host": [vhost(0)]})
        path = b"/?arvados_api_token=" + quote(link, safe="").encode()
        response, _ = await client.fetch(
            b"GET", b"http://127.0.0.1:%d%s" % (controller_port, path), headers
        )
        self.assertEqual(response.code, 303)
        [set_cookie] = response.headers.getRawHeaders(b"set-cookie")
        value = set_cookie.split(b";")[0].split(b"=", 1)[1]
        session = policy.decode_token_cookie(value).decode()
        self.assertNotEqual(session, link)
        self.assertEqual(await status(0, session), 200)

        # The gateway of container 1 dies unannounced, and a new one takes over at a new
        # address: the front door must follow the record to it.
        old_address = await running(containers[1])
        await gateways[1].stop(reactor, "KILL")
        processes.remove(gateways[1])
        gateways[1] = gateway("gateway-1b", containers[1])
        processes.append(gateways[1])
        await until(
            lambda: _moved(running, containers[1], old_address),
            "the new gateway address",
            processes,
            30.0,
        )
        await until(
            lambda: answers(1, token, 200), "the new gateway is used", processes, self.DEADLINE
        )

        # An admin cancels container 0: its gateway notices, stops and exits; the front door
        # refuses it as finished.
        await cli("cancel", containers[0])
        processes.remove(gateways[0])
        await e2e.wait_for(
            reactor,
            lambda: not gateways[0].running,
            "the cancelled container's gateway to exit",
            processes,
            timeout=self.DEADLINE,
        )
        await until(
            lambda: answers(0, token, 410),
            "the cancelled container is gone",
            processes,
            self.DEADLINE,
        )

        # Nothing any process wrote is lost: a new process finds every record as it must be.
        tokens = json.loads(await cli("token", "list", "--user", user))
        live = {t["uuid"] for t in tokens}
        self.assertEqual(
            live,
            {token.split("/")[1], session.split("/")[1]},
            "only the last admin token and the front door's session token are left",
        )
        self.assertEqual((await record(containers[0]))["state"], "Cancelled")
        moved = await record(containers[1])
        self.assertEqual(moved["state"], "Running")
        self.assertNotEqual(moved["gateway_address"], old_address)
        self.assertEqual(
            moved["gateway_address"].rsplit(":", 1)[1],
            str(await _listening_port(gateways[1])),
        )


async def _moved(running: Any, uuid: str, old: str) -> str:
    address = await running(uuid)
    return address if address not in ("", old) else ""


async def _listening_port(process: e2e.Twistd) -> int:
    """The port a gateway says it listens on (from its log)."""
    text = await e2e.wait_for(
        reactor, lambda: "Listening on" in process.log_text() and process.log_text(), "a port"
    )
    line = [line for line in text.splitlines() if "Listening on" in line][-1]
    return int(line.rsplit(":", 1)[1])


class RegistryAtStartupTests(unittest.TestCase):
    """Hole 10 (b): a front door whose registry cannot be used refuses to start."""

    def test_unusable_registry_refused_at_start(self) -> defer.Deferred[None]:
        """An unusable Registry makes the front door exit 1 before listening, in one line."""
        return run(self._unusable_registry())

    async def _unusable_registry(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "a-file"), "w") as f:
            f.write("not a directory\n")
        with open(os.path.join(directory, "garbage.sqlite"), "wb") as f:
            f.write(b"this is no database " * 100)
        os.makedirs(os.path.join(directory, "a-directory.sqlite"))
        newer = sqlite3.connect(os.path.join(directory, "newer.sqlite"))
        newer.execute("PRAGMA user_version = 99")
        newer.close()
        cases = [
            ("not-a-directory", "a-file/registry.sqlite", "Not a directory"),
            ("a-directory", "a-directory.sqlite", "unable to open database file"),
            ("garbage", "garbage.sqlite", "file is not a database"),
            ("newer", "newer.sqlite", "schema version 99"),
        ]
        processes = []
        ports = []
        for name, registry, _ in cases:
            port = e2e.free_port()
            config = e2e.write_config(directory, port, Registry=registry)
            os.rename(config, os.path.join(directory, f"{name}.yml"))
            ports.append(port)
            process = e2e.Twistd.spawn(
                reactor,
                directory,
                name,
                ["arv-controller-proxy", "--config", f"{name}.yml"],
            )
            self.addCleanup(process.stop, reactor)
            processes.append(process)
        for (name, _, reason), process, port in zip(cases, processes, ports, strict=True):
            await e2e.wait_for(
                reactor, lambda p=process: not p.running, f"{name} to exit", timeout=60.0
            )
            self.assertEqual(await process.ended, 1, name)
            lines = process.output.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, f"{name}: {lines}")
            self.assertIn("Clusters.zzzzz.ArvProxy.Registry: cannot use the registry: ", lines[0])
            self.assertIn(reason, lines[0], name)
            self.assertNotIn("Traceback", process.log_text(), name)
            self.assertNotIn("Listening on", process.log_text(), name)
            self.assertFalse(e2e.accepting(port), name)


class _DyingService(resource.Resource):
    """A service whose C{/die} starts an answer and then closes the connection."""

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        if request.path != b"/die":
            request.setHeader(b"content-length", b"2")
            return b"ok"
        request.setHeader(b"content-length", b"1000")
        request.write(b"cut short")
        # What was written goes first; then the connection ends, 991 bytes short.
        request.channel.transport.loseConnection()
        return server.NOT_DONE_YET


class ShutdownTests(unittest.TestCase):
    """Hole 10 (a): a failed answer on a reused connection never stops a shutdown."""

    def test_sigterm_after_a_failed_answer_on_a_reused_connection(self) -> defer.Deferred[None]:
        """SIGTERM stops both hops after GET A, GET B, and a GET A dying on a reused connection."""
        return run(self._sigterm_after_failed_answer())

    async def _sigterm_after_failed_answer(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        sites = [e2e.ServiceSite(reactor), e2e.ServiceSite(reactor)]
        ports = []
        for site in sites:
            site.resource = _DyingService()
            ports.append(site.listen(reactor))
            self.addCleanup(site.stop, reactor)
        store = RegistryStore(
            os.path.join(directory, "registry.sqlite"),
            e2e.CLUSTER_ID,
            system_root_token=e2e.ROOT_TOKEN,
        )
        self.addCleanup(store.close)
        user = store.create_user("Ada")
        token, _ = store.create_token(user.uuid)
        # Container A publishes two ports (the gateway pools by port), B one (the front door
        # pools by container).
        a = store.create_container_request(user.uuid, published_ports={p: {} for p in ports})
        b = store.create_container_request(user.uuid, published_ports={ports[0]: {}})
        controller_port = e2e.free_port()
        config = e2e.write_config(directory, controller_port)
        controller = e2e.Twistd.spawn(
            reactor, directory, "controller", ["arv-controller-proxy", "--config", config]
        )
        self.addCleanup(controller.stop, reactor)
        gateways = []
        for name, request in (("gateway-a", a), ("gateway-b", b)):
            assert request.container_uuid is not None
            gateway = e2e.Twistd.spawn(
                reactor,
                directory,
                name,
                [
                    "crunch-run-gateway",
                    "--config",
                    config,
                    "--container-uuid",
                    request.container_uuid,
                ],
                stdin=e2e.dispatch_json(
                    policy.gateway_secret(e2e.ROOT_TOKEN, request.container_uuid)
                ),
            )
            self.addCleanup(gateway.stop, reactor)
            gateways.append(gateway)
        processes = [controller, *gateways]
        await e2e.wait_for(
            reactor, lambda: e2e.accepting(controller_port), "the controller", processes
        )
        for request in (a, b):
            await e2e.wait_for(
                reactor,
                lambda r=request: store.get_container(r.container_uuid).gateway_address,
                "the gateways",
                processes,
            )
        client = e2e.Client(reactor)
        self.addCleanup(client.close)
        cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(token.encode())

        async def get(request: Any, port: int, path: bytes) -> Any:
            host = f"{request.uuid}-{port}.{e2e.SUFFIX}:{controller_port}".encode()
            headers = Headers({b"host": [host], b"cookie": [cookie]})
            url = b"http://127.0.0.1:%d%s" % (controller_port, path)
            return await client.fetch(b"GET", url, headers)

        for request, port in ((a, ports[0]), (a, ports[1]), (b, ports[0])):
            response, body = await get(request, port, b"/")
            self.assertEqual((response.code, body), (200, b"ok"))
        with self.assertRaises(ResponseFailed):
            await get(a, ports[0], b"/die")

        stopping = [
            controller.stop(reactor, "TERM", grace=60.0),
            gateways[0].stop(reactor, "TERM", grace=60.0),
        ]
        codes = await defer.gatherResults([defer.ensureDeferred(s) for s in stopping])
        # twistd re-raises the signal once it has shut down cleanly; -9 would be the KILL that
        # follows a shutdown that never ends.
        for process, code in zip(processes, codes, strict=False):
            self.assertIn(code, (0, -15), process.describe())


@dataclass
class System:
    """One container request (its ports in this process) behind the real front door."""

    directory: str
    store: RegistryStore
    request: ContainerRequest
    token: str
    controller_port: int
    controller: e2e.Twistd
    gateway: e2e.Twistd
    client: e2e.Client

    @property
    def container_uuid(self) -> str:
        assert self.request.container_uuid is not None
        return self.request.container_uuid

    def vhost(self, port: int) -> bytes:
        return f"{self.request.uuid}-{port}.{e2e.SUFFIX}:{self.controller_port}".encode()

    def headers(self, port: int) -> Headers:
        cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(self.token.encode())
        return Headers({b"host": [self.vhost(port)], b"cookie": [cookie]})

    def url(self, path: bytes) -> bytes:
        return b"http://127.0.0.1:%d%s" % (self.controller_port, path)

    async def get(self, port: int, path: bytes, body: bytes | None = None) -> tuple[Any, bytes]:
        method = b"GET" if body is None else b"POST"
        return await self.client.fetch(method, self.url(path), self.headers(port), body)

    def gateway_port(self) -> int:
        address = self.store.get_container(self.container_uuid).gateway_address
        return int(address.rsplit(":", 1)[1])


async def start_system(testcase: Any, ports: list[int], **arvproxy: Any) -> System:
    """
    Start the front door and the gateway (twistd) for one container request publishing
    C{ports}; C{arvproxy}: extra keys of the configuration's C{ArvProxy} section.
    """
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    store = RegistryStore(
        os.path.join(directory, "registry.sqlite"), e2e.CLUSTER_ID, system_root_token=e2e.ROOT_TOKEN
    )
    testcase.addCleanup(store.close)
    user = store.create_user("Ada")
    token, _ = store.create_token(user.uuid)
    request = store.create_container_request(user.uuid, published_ports={p: {} for p in ports})
    assert request.container_uuid is not None
    controller_port = e2e.free_port()
    config = e2e.write_config(directory, controller_port, **arvproxy)
    controller = e2e.Twistd.spawn(
        reactor, directory, "controller", ["arv-controller-proxy", "--config", config]
    )
    testcase.addCleanup(controller.stop, reactor)
    gateway = e2e.Twistd.spawn(
        reactor,
        directory,
        "gateway",
        ["crunch-run-gateway", "--config", config, "--container-uuid", request.container_uuid],
        stdin=e2e.dispatch_json(policy.gateway_secret(e2e.ROOT_TOKEN, request.container_uuid)),
    )
    testcase.addCleanup(gateway.stop, reactor)
    client = e2e.Client(reactor)
    testcase.addCleanup(client.close)
    system = System(directory, store, request, token, controller_port, controller, gateway, client)
    await e2e.wait_for(
        reactor, lambda: e2e.accepting(controller_port), "the controller", [controller, gateway]
    )
    await e2e.wait_for(
        reactor,
        lambda: store.get_container(system.container_uuid).gateway_address,
        "the gateway",
        [controller, gateway],
    )
    return system


class _SlowService(resource.Resource):
    """
    C{/hang} never answers; C{/slow} answers at once and ends its body only when the test
    says so (L{finish_slow}); anything else answers C{ok}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.slow: list[Any] = []
        self.hanging: list[Any] = []
        self.started: defer.Deferred[None] = defer.Deferred()

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        if request.path == b"/slow":
            request.write(b"first part, ")
            self.slow.append(request)
            return server.NOT_DONE_YET
        request.setHeader(b"content-length", b"2")
        return b"ok"

    render_POST = render_GET

    def finish_slow(self) -> None:
        for request in self.slow:
            request.write(b"last part")
            request.finish()


class _Silent(protocol.Protocol):
    """Accepts a connection and never says a thing."""


def listen_silently(testcase: Any, context: Any = None) -> int:
    """
    Listen on loopback where nothing is ever answered (with TLS from C{context}, if given: the
    handshake completes, and then nothing); return the port.
    """
    factory: Any = protocol.Factory.forProtocol(_Silent)
    if context is not None:
        factory = TLSMemoryBIOFactory(context, False, factory)
    return e2e.listen_tracked(testcase, reactor, factory)


def error_message(body: bytes) -> str:
    """The message of one of the front door's JSON error pages."""
    return str(json.loads(body)["errors"][0])


TIGHT = {"Timeouts": {"TLSHandshake": "2s", "CarrierHandshake": "2s", "ResponseHeaders": "3s"}}
"""Deadlines short enough for a test to wait them out."""


class FrozenGatewayTests(unittest.TestCase):
    """Hole 9: a gateway that says nothing costs the client a 504, never an endless wait."""

    def test_stopped_gateway(self) -> defer.Deferred[None]:
        """A SIGSTOPped gateway costs a request a 504 naming the step, and SIGTERM still works."""
        return run(self._stopped_gateway())

    async def _stopped_gateway(self) -> None:
        site = e2e.ServiceSite(reactor)
        service_port = site.listen(reactor)
        self.addCleanup(site.stop, reactor)
        system = await start_system(self, [service_port], **TIGHT)
        response, _ = await system.get(service_port, b"/before")
        self.assertEqual(response.code, 200)

        assert system.gateway.pid is not None
        os.kill(system.gateway.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, system.gateway.pid, signal.SIGCONT)
        response, body = await system.get(service_port, b"/frozen")
        self.assertEqual(response.code, 504, body)
        self.assertEqual(
            error_message(body), "The container's service did not start to answer within 3 s."
        )
        # An upload larger than a carrier takes goes on a connection of its own: the stopped
        # process's socket still accepts TCP, and then the TLS handshake never ends.
        response, body = await system.get(service_port, b"/upload", b"x" * (100 * 1024))
        self.assertEqual(response.code, 504, body)
        self.assertEqual(
            error_message(body),
            "The container's gateway did not complete the TLS handshake within 2 s.",
        )
        self.assertEqual(site.uris(), [b"/before"])
        await system.client.close()
        # The front door's carrier to the stopped gateway never sees TLS close politely.
        self.assertIn(await system.controller.stop(reactor, "TERM", grace=60.0), (0, -15))

    def test_silent_listeners(self) -> defer.Deferred[None]:
        """Silent TCP gets a 504 for the TLS handshake; silent TLS, one for the carrier's."""
        return run(self._silent_listeners())

    async def _silent_listeners(self) -> None:
        site = e2e.ServiceSite(reactor)
        service_port = site.listen(reactor)
        self.addCleanup(site.stop, reactor)
        system = await start_system(self, [service_port], **TIGHT)
        secret = policy.gateway_secret(e2e.ROOT_TOKEN, system.container_uuid)
        cases = [
            (
                listen_silently(self),
                "The container's gateway did not complete the TLS handshake within 2 s.",
            ),
            (
                listen_silently(self, server_context_factory(secret, ["127.0.0.1"])),
                "The container's gateway did not accept the connection within 2 s.",
            ),
        ]
        for port, message in cases:
            system.store.update_container(
                system.container_uuid, gateway_address=f"127.0.0.1:{port}"
            )
            response, body = await system.get(service_port, b"/")
            self.assertEqual((response.code, error_message(body)), (504, message))
        self.assertEqual(site.uris(), [])

    def test_answering_streams_are_not_cut(self) -> defer.Deferred[None]:
        """A 504 for a late head never cuts a slow answer or a WebSocket on the same carrier."""
        return run(self._answering_streams())

    async def _answering_streams(self) -> None:
        service = _SlowService()
        site = e2e.ServiceSite(reactor)
        site.resource = service
        http_port = site.listen(reactor)
        self.addCleanup(site.stop, reactor)
        echo = EchoFactory()
        listening = reactor.listenTCP(0, echo, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        ws_port = listening.getHost().port
        system = await start_system(self, [http_port, ws_port], **TIGHT)

        slow = await system.client.request(b"GET", system.url(b"/slow"), system.headers(http_port))
        self.assertEqual(slow.code, 200)
        slow_body = e2e.Collect()
        slow.deliverBody(slow_body)

        ws = WebSocketClient(
            system.vhost(ws_port).decode(),
            "/ws",
            [(b"cookie", system.headers(ws_port).getRawHeaders(b"cookie")[0])],
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", system.controller_port)
        await connectProtocol(endpoint, ws)
        self.addCleanup(lambda: ws.transport.abortConnection())
        await ws.accepted

        response, body = await system.get(http_port, b"/hang")
        self.assertEqual(response.code, 504, body)
        self.assertEqual(
            error_message(body), "The container's service did not start to answer within 3 s."
        )
        self.assertEqual(connections_to(system.gateway_port()), 1, "one carrier for all")

        ws.send(TextMessage(data="still there"))
        self.assertEqual(await ws.messages.get(), ("text", ("still there", 1)))
        service.finish_slow()
        self.assertEqual(await slow_body.done, b"first part, last part")
