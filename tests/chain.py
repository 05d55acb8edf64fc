"""
The whole chain in one process, on loopback: controller → TLS gateway → a service, with the
embedded registry in a temporary file.  Faster than starting the twistd plugins, and still real
sockets, real TLS and real connection pools.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import waitUntilAllDisconnected
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from arvproxy import backends, policy
from arvproxy.backends.embedded import EmbeddedRegistry
from arvproxy.config import ClusterConfig, ExternalURL, Limits
from arvproxy.controller.proxy import Controller, GatewayConnector
from arvproxy.gateway.runtime import HostRuntime
from arvproxy.gateway.server import Gateway, tls_ports
from arvproxy.httpserver import ProxySite
from arvproxy.tlsidentity import server_context_factory

ROOT_TOKEN = "ChainTestRootToken0123456789abcdefghijklmnopqrstuv"


class _TrackingFactory(WrappingFactory):
    """Keeps the server-side protocols, so a test can wait until they have all disconnected."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.seen: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.seen.append(protocol)
        return protocol


@dataclass
class Chain:
    """A running chain; see L{start_chain}."""

    config: ClusterConfig
    registry: EmbeddedRegistry
    controller_port: int
    gateway: Gateway
    container_uuid: str
    request_uuid: str
    token: str
    service_port: int
    controller: Controller

    async def wait_idle(self) -> None:
        """Wait (a few reactor turns at most) until no request or tunnel holds a slot."""
        for _ in range(200):
            if not self.controller._slots.open(self.container_uuid):
                return
            await deferLater(reactor, 0.01)
        raise AssertionError("requests or tunnels are still open")

    @property
    def host(self) -> bytes:
        """The vhost of the service's port (the URL names the container request)."""
        return b"%s-%d.containers.localhost:%d" % (
            self.request_uuid.encode(),
            self.service_port,
            self.controller_port,
        )

    @property
    def cookie(self) -> bytes:
        return policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(self.token.encode())


async def start_chain(
    testcase: Any,
    service_port: int,
    limits: Limits | None = None,
    published: dict[int, dict[str, Any]] | None = None,
) -> Chain:
    """
    Start a controller and a gateway on loopback for a container whose service listens on
    C{127.0.0.1:service_port}, owned by a user with a fresh token; all of it is torn down by the
    test case's cleanups.

    @param limits: the limits both hops apply (the defaults when C{None}).
    @param published: the container request's C{published_ports} (C{service_port}, private,
        when C{None}).
    """
    limits = limits or Limits()
    directory = testcase.mktemp()
    os.makedirs(directory)
    # The controller listens first: its port is part of the ExternalURL.
    controller_site = ProxySite(None, reactor, limits)  # type: ignore[arg-type]
    controller_factory = _TrackingFactory(controller_site)
    controller_port = reactor.listenTCP(0, controller_factory, interface="127.0.0.1")
    config = ClusterConfig(
        source="<chain>",
        cluster_id="zzzzz",
        system_root_token=ROOT_TOKEN,
        external_url=ExternalURL("http", "containers.localhost", controller_port.getHost().port),
        controller_listen="tcp:0:interface=127.0.0.1",
        registry_path=os.path.join(directory, "registry.sqlite"),
        limits=limits,
    )
    registry = EmbeddedRegistry.from_config(reactor, config)
    registry.start()
    testcase.addCleanup(registry.stop)
    user = await registry.create_user("chain user")
    token, _ = await registry.create_token(user.uuid)
    request = await registry.create_container_request(
        user.uuid, published_ports=published if published is not None else {service_port: {}}
    )
    container_uuid = request.container_uuid

    secret = policy.gateway_secret(ROOT_TOKEN, container_uuid)
    gateway = Gateway(
        reactor,
        container_uuid,
        secret,
        HostRuntime(reactor),
        max_connections=limits.max_connections_per_container,
    )
    container = await registry.get_container(container_uuid)
    gateway.connector.use_tls(tls_ports(container.published_ports))
    gateway_site = ProxySite(gateway, reactor, limits)
    gateway_factory = _TrackingFactory(
        TLSMemoryBIOFactory(server_context_factory(secret, ["127.0.0.1"]), False, gateway_site)
    )
    gateway_port = reactor.listenTCP(0, gateway_factory, interface="127.0.0.1")
    address = f"127.0.0.1:{gateway_port.getHost().port}"
    await registry.update_container(container_uuid, state=backends.RUNNING, gateway_address=address)

    connector = GatewayConnector(reactor)
    controller_site.handler = Controller(reactor, config, registry, connector)

    async def stop() -> None:
        await connector.close()
        await gateway.connector.pool.closeCachedConnections()
        await controller_port.stopListening()
        await gateway_port.stopListening()
        for factory in (controller_factory, gateway_factory):
            for protocol in factory.seen:
                if protocol.transport is not None and protocol.transport.connected:
                    protocol.transport.abortConnection()
            await waitUntilAllDisconnected(reactor, factory.seen)

    testcase.addCleanup(lambda: defer.ensureDeferred(stop()))
    return Chain(
        config=config,
        registry=registry,
        controller_port=controller_port.getHost().port,
        gateway=gateway,
        container_uuid=container_uuid,
        request_uuid=request.uuid,
        token=token,
        service_port=service_port,
        controller=controller_site.handler,
    )


def read_until(sock: Any, until: bytes) -> bytes:
    """
    Read from a blocking socket until C{until} has arrived or the peer closes (call it in a
    thread: it blocks).
    """
    received = b""
    while until not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


async def exchange(sock: Any, data: bytes, until: bytes) -> bytes:
    """Send C{data} on a blocking socket, in a thread, and read until C{until} has arrived."""

    def work() -> bytes:
        sock.settimeout(20)
        sock.sendall(data)
        return read_until(sock, until)

    return await deferToThread(work)
