"""
The whole chain with a real Docker engine: the controller and the local dispatcher as twistd
subprocesses, the dispatcher's gateways running busybox containers with C{--network none}.

Requests go to the controller on 127.0.0.1 only; the gateway reaches the service inside the
container's own network namespace.  Without an engine these tests skip with the fix, or fail
when C{CI=true} (see L{tests.dockerhelp.require_docker}).
"""

from __future__ import annotations

import os
from typing import Any

import docker.errors
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from arvproxy import backends, policy
from arvproxy.backends.registry import RegistryStore
from arvproxy.gateway.docker_runtime import LABEL, docker_name
from arvproxy.gateway.netns import has_cap_sys_admin
from tests import dockerhelp
from tests.e2e import (
    CLUSTER_ID,
    ROOT_TOKEN,
    SUFFIX,
    Client,
    Twistd,
    accepting,
    free_port,
    wait_for,
    write_config,
)


def gateway_pids(container_uuid: str) -> list[int]:
    """The processes running the gateway of C{container_uuid}."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"crunch-run-gateway" in argv and container_uuid.encode() in argv:
            pids.append(int(entry))
    return pids


class DockerChain(unittest.TestCase):
    """
    The set-up of the tests below (a controller and a dispatcher as twistd processes, a
    registry) and their helpers, for test cases of their own (L{tests.test_restart}).
    """

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        dockerhelp.require_docker()
        if not has_cap_sys_admin():
            raise unittest.SkipTest("the Docker runtime needs root or CAP_SYS_ADMIN")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        config = write_config(self.directory, self.port)
        self.store = RegistryStore(
            os.path.join(self.directory, "registry.sqlite"),
            CLUSTER_ID,
            system_root_token=ROOT_TOKEN,
        )
        self.addCleanup(self.store.close)
        self.user = self.store.create_user("Docker Tester")
        self.token, _ = self.store.create_token(self.user.uuid)
        self.uuids: list[str] = []
        self.addCleanup(self.remove_containers)
        self.controller = Twistd.spawn(
            reactor, self.directory, "controller", ["arv-controller-proxy", "--config", config]
        )
        self.addCleanup(lambda: defer.ensureDeferred(self.controller.stop(reactor)))
        self.dispatcher = Twistd.spawn(
            reactor,
            self.directory,
            "dispatcher",
            ["arv-local-dispatcher", "--config", config, "--poll-interval", "0.5"],
        )
        self.addCleanup(lambda: defer.ensureDeferred(self.dispatcher.stop(reactor, grace=30)))
        self.client = Client(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(self.client.close()))
        yield defer.ensureDeferred(
            wait_for(reactor, lambda: accepting(self.port), "the controller", [self.controller])
        )

    def remove_containers(self) -> defer.Deferred[None]:
        def remove() -> None:
            for uuid in self.uuids:
                dockerhelp.remove_labelled(LABEL, uuid)

        return deferToThread(remove)

    def start(self, command: list[str], ports: list[int]) -> backends.ContainerRequest:
        request = self.store.create_container_request(
            self.user.uuid,
            container_image=dockerhelp.TEST_IMAGE,
            command=command,
            published_ports={str(p): {"access": "private"} for p in ports},
        )
        assert request.container_uuid is not None
        self.uuids.append(request.container_uuid)
        return request

    async def until(self, uuid: str, what: str, check: Any, timeout: float = 60.0) -> Any:
        def look() -> Any:
            container = self.store.get_container(uuid)
            return container if check(container) else None

        return await wait_for(reactor, look, what, [self.controller, self.dispatcher], timeout)

    async def get(self, request: backends.ContainerRequest, port: int) -> tuple[int, bytes, Any]:
        host = f"{request.uuid}-{port}.{SUFFIX}:{self.port}".encode()
        cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(self.token.encode())
        response, body = await self.client.fetch(
            b"GET",
            b"http://127.0.0.1:%d/index.html" % (self.port,),
            {b"host": [host], b"cookie": [cookie], b"accept": [b"text/html"]},
        )
        return response.code, body, response.headers


class DockerChainTests(DockerChain):
    """controller -> gateway -> network namespace -> busybox httpd, started by the dispatcher."""

    @defer.inlineCallbacks
    def test_serve_sync_exit(self) -> Any:
        """A request reaches httpd inside; ports are synced; the exit is recorded; then 410."""
        request = self.start(dockerhelp.serve_command([8080]), [8080, 8081])
        uuid = request.container_uuid
        assert uuid is not None
        yield defer.ensureDeferred(
            self.until(uuid, "Running", lambda c: c.state == backends.RUNNING and c.gateway_address)
        )
        container = yield defer.ensureDeferred(
            self.until(uuid, "listening ports", lambda c: c.listening_ports == (8080,))
        )
        self.assertTrue(container.gateway_address.startswith("127.0.0.1:"))

        code, body, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual((code, body), (200, dockerhelp.HELLO))

        code, body, headers = yield defer.ensureDeferred(self.get(request, 8081))
        self.assertEqual(code, 503, body)
        self.assertIn(b"retry", body.lower())
        self.assertTrue(headers.hasHeader(b"retry-after"))

        client = yield deferToThread(dockerhelp.client)
        docker_container = yield deferToThread(client.containers.get, docker_name(uuid))
        self.assertEqual(docker_container.attrs["HostConfig"]["NetworkMode"], "none")
        yield deferToThread(dockerhelp.tell_exit, docker_container, 3)
        container = yield defer.ensureDeferred(
            self.until(uuid, "Complete", lambda c: c.state in backends.FINAL_STATES)
        )
        self.assertEqual((container.state, container.exit_code), (backends.COMPLETE, 3))
        self.assertEqual(container.listening_ports, ())

        code, _, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual(code, 410)
        yield defer.ensureDeferred(
            wait_for(reactor, lambda: not gateway_pids(uuid), "the gateway to exit", timeout=30)
        )

    @defer.inlineCallbacks
    def test_gateway_killed(self) -> Any:
        """When a gateway is killed, the dispatcher cancels its container and removes it."""
        request = self.start(dockerhelp.serve_command([8080]), [8080])
        uuid = request.container_uuid
        assert uuid is not None
        yield defer.ensureDeferred(
            self.until(uuid, "Running", lambda c: c.state == backends.RUNNING and c.gateway_address)
        )
        [pid] = gateway_pids(uuid)
        os.kill(pid, 9)
        container = yield defer.ensureDeferred(
            self.until(uuid, "Cancelled", lambda c: c.state == backends.CANCELLED)
        )
        self.assertIn("signal 9", container.runtime_status.get("error", ""))

        def leftovers() -> list[Any]:
            try:
                return dockerhelp.client().containers.list(
                    all=True, filters={"label": f"{LABEL}={uuid}"}
                )
            except docker.errors.NotFound:
                # Listed, then removed before docker-py read it: still going, look again.
                return [None]

        async def removed() -> bool:
            return not await deferToThread(leftovers)

        yield defer.ensureDeferred(self.eventually(removed))

    @defer.inlineCallbacks
    def test_cancel(self) -> Any:
        """Cancelling the record (arvproxy cancel) stops the container and its gateway."""
        request = self.start(dockerhelp.serve_command([8080]), [8080])
        uuid = request.container_uuid
        assert uuid is not None
        yield defer.ensureDeferred(
            self.until(uuid, "Running", lambda c: c.state == backends.RUNNING and c.gateway_address)
        )
        self.store.update_container(uuid, state=backends.CANCELLED)
        yield defer.ensureDeferred(
            wait_for(reactor, lambda: not gateway_pids(uuid), "the gateway to exit", timeout=60)
        )
        container = self.store.get_container(uuid)
        self.assertEqual(container.state, backends.CANCELLED)
        self.assertNotIn("error", container.runtime_status)  # not blamed on a dead gateway

    async def eventually(self, check: Any, timeout: float = 30.0) -> None:
        deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
        while not await check():
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                raise AssertionError("condition not met in time")
            from twisted.internet import task

            await task.deferLater(reactor, 0.2, lambda: None)
