"""
Tests for the container runtimes: one contract, run against L{arvproxy.testing.FakeRuntime}
always and against L{arvproxy.gateway.docker_runtime.DockerRuntime} with a real engine; then what
only the Docker runtime does (image, network, environment, attaching).

The Docker tests dial only into the containers' own network namespaces.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from arvproxy.config import ExternalURL
from arvproxy.errors import Unavailable
from arvproxy.gateway.docker_runtime import (
    LABEL,
    ContainerSpec,
    DockerRuntime,
    spec_from_record,
    web_url_environment,
)
from arvproxy.gateway.netns import has_cap_sys_admin
from arvproxy.gateway.server import ContainerConnector
from arvproxy.testing import FakeCluster, FakeRuntime
from tests import dockerhelp

UNUSED_PORT = 8099


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll C{check} every 0.1 s until it is true, failing after C{timeout} seconds."""
    waited = 0.0
    while not await check():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await task.deferLater(reactor, 0.1, lambda: None)
        waited += 0.1


class RuntimeContract:
    """
    What every L{IRuntime} promises.  Subclasses provide L{make_runtime} (a started runtime whose
    container listens on C{ports}, never on L{UNUSED_PORT}) and L{make_exit}.
    """

    async def make_runtime(self, ports: list[int]) -> Any:
        raise NotImplementedError

    async def make_exit(self, runtime: Any, code: int) -> None:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_listening_ports(self) -> Any:
        """listening_ports() reports the sorted ports the container listens on."""
        runtime = yield defer.ensureDeferred(self.make_runtime([8082, 8081]))

        async def listed() -> bool:
            return await runtime.listening_ports() == [8081, 8082]

        yield defer.ensureDeferred(eventually(listed))

    @defer.inlineCallbacks
    def test_connect(self) -> Any:
        """An endpoint for a listening port connects."""
        runtime = yield defer.ensureDeferred(self.make_runtime([8081]))
        connected = yield runtime.endpoint(8081).connect(
            protocol.Factory.forProtocol(protocol.Protocol)
        )
        self.assertIsNotNone(connected.transport)
        connected.transport.loseConnection()

    @defer.inlineCallbacks
    def test_refused(self) -> Any:
        """An endpoint for a port nothing listens on fails with ConnectionRefusedError."""
        runtime = yield defer.ensureDeferred(self.make_runtime([8081]))
        yield self.assertFailure(  # type: ignore[attr-defined]
            runtime.endpoint(UNUSED_PORT).connect(protocol.Factory()), error.ConnectionRefusedError
        )

    @defer.inlineCallbacks
    def test_exit_code(self) -> Any:
        """exited() fires with the exit code of a container that exits by itself."""
        runtime = yield defer.ensureDeferred(self.make_runtime([8081]))
        yield defer.ensureDeferred(self.make_exit(runtime, 3))
        code = yield runtime.exited()
        self.assertEqual(code, 3)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_stop(self) -> Any:
        """stop() ends the container: exited() fires with None; stopping again is harmless."""
        runtime = yield defer.ensureDeferred(self.make_runtime([8081]))
        yield runtime.stop()
        code = yield runtime.exited()
        self.assertIsNone(code)  # type: ignore[attr-defined]
        yield runtime.stop()


class FakeRuntimeContractTests(RuntimeContract, unittest.TestCase):
    """L{FakeRuntime} obeys the runtime contract."""

    async def make_runtime(self, ports: list[int]) -> Any:
        runtime = FakeRuntime(refusing=[UNUSED_PORT])
        runtime.ports = list(ports)
        await runtime.start()
        return runtime

    async def make_exit(self, runtime: Any, code: int) -> None:
        runtime.exited().callback(code)


class DockerCase(unittest.TestCase):
    """Creates Docker containers labelled with a per-test value and removes them afterwards."""

    def setUp(self) -> Any:
        dockerhelp.require_docker()
        if not has_cap_sys_admin():
            raise unittest.SkipTest("the Docker runtime needs root or CAP_SYS_ADMIN")
        self.test_label = uuid_module.uuid4().hex
        self.addCleanup(deferToThread, dockerhelp.remove_labelled, "arvproxy-test", self.test_label)

    def spec(self, command: list[str], **fields: Any) -> ContainerSpec:
        return ContainerSpec(
            image=dockerhelp.TEST_IMAGE,
            command=tuple(command),
            labels={"arvproxy-test": self.test_label},
            **fields,
        )

    async def started(self, spec: ContainerSpec) -> DockerRuntime:
        async def get_spec() -> ContainerSpec:
            return spec

        runtime = DockerRuntime(reactor, spec=get_spec, wait_slice=1.0)
        self.addCleanup(runtime.stop)
        await runtime.start()
        return runtime


class DockerRuntimeContractTests(RuntimeContract, DockerCase):
    """L{DockerRuntime} obeys the runtime contract with a real engine."""

    async def make_runtime(self, ports: list[int]) -> Any:
        runtime = await self.started(self.spec(dockerhelp.serve_command(ports)))

        # Running is not yet listening: the container's servers take a moment to bind (CI once
        # dialled 8081 before they had).
        async def listening() -> bool:
            return set(ports) <= set(await runtime.listening_ports())

        await eventually(listening)
        return runtime

    async def make_exit(self, runtime: Any, code: int) -> None:
        await deferToThread(dockerhelp.tell_exit, runtime.container, code)


class DockerRuntimeTests(DockerCase):
    """What the Docker runtime does beyond the contract."""

    @defer.inlineCallbacks
    def test_http_through_namespace(self) -> Any:
        """The connector gets a page from httpd on 127.0.0.1 in a --network none container."""
        runtime = yield defer.ensureDeferred(
            self.started(self.spec(dockerhelp.serve_command([8080])))
        )
        inspected = yield deferToThread(
            lambda: (runtime.container.reload(), runtime.container.attrs)[1]
        )
        self.assertEqual(inspected["HostConfig"]["NetworkMode"], "none")
        connector = ContainerConnector(reactor, runtime)
        self.addCleanup(connector.pool.closeCachedConnections)

        async def served() -> bool:
            return 8080 in await runtime.listening_ports()

        yield defer.ensureDeferred(eventually(served))
        response = yield defer.ensureDeferred(
            connector.request(8080, b"GET", b"/index.html", Headers({b"host": [b"x"]}), None)
        )
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, dockerhelp.HELLO))

    @defer.inlineCallbacks
    def test_nothing_listening_is_unavailable(self) -> Any:
        """A request for a port nothing listens on in the container becomes 503 Unavailable."""
        runtime = yield defer.ensureDeferred(self.started(self.spec(dockerhelp.serve_command([]))))
        connector = ContainerConnector(reactor, runtime)
        self.addCleanup(connector.pool.closeCachedConnections)
        e = yield self.assertFailure(
            defer.ensureDeferred(
                connector.request(UNUSED_PORT, b"GET", b"/", Headers({b"host": [b"x"]}), None)
            ),
            Unavailable,
        )
        self.assertEqual(e.status, 503)

    @defer.inlineCallbacks
    def test_environment_and_cwd(self) -> Any:
        """The container gets the record's environment, working directory and its web URLs."""
        cluster = FakeCluster()
        user = cluster.add_user()
        container = cluster.add_container(
            state="Locked",
            container_image=dockerhelp.TEST_IMAGE,
            command=("sh", "-c", "pwd; echo $GREETING; echo $ARVADOS_CONTAINER_WEB_URL_8080"),
            environment={"GREETING": "hi"},
            cwd="/www",
            published_ports={"8080": {"access": "private"}},
        )
        request = cluster.add_container_request(user.uuid, container.uuid)
        external = ExternalURL("https", "containers.example.com", None)
        spec = yield defer.ensureDeferred(spec_from_record(cluster, container.uuid, external))
        spec = ContainerSpec(**{**spec.__dict__, "labels": {"arvproxy-test": self.test_label}})
        runtime = yield defer.ensureDeferred(self.started(spec))
        output = yield deferToThread(runtime.container.logs)
        code = yield runtime.exited()
        self.assertEqual(code, 0)
        url = f"https://{request.uuid}-8080.containers.example.com/"
        self.assertEqual(output.decode().split(), ["/www", "hi", url])

    def test_web_url_environment(self) -> None:
        """Each published port gets ARVADOS_CONTAINER_WEB_URL_<port> with its base URL."""
        external = ExternalURL("http", "containers.localhost", 8900)
        self.assertEqual(
            web_url_environment(external, "zzzzz-xvhdp-000000000000001", {"80": {}, "8888": {}}),
            {
                "ARVADOS_CONTAINER_WEB_URL_80": "http://zzzzz-xvhdp-000000000000001-80.containers.localhost:8900/",
                "ARVADOS_CONTAINER_WEB_URL_8888": "http://zzzzz-xvhdp-000000000000001-8888.containers.localhost:8900/",
            },
        )

    @defer.inlineCallbacks
    def test_attach(self) -> Any:
        """--docker-container attaches: exit codes are reported, and stop() leaves it running."""
        docker_client = yield deferToThread(dockerhelp.client)
        run = docker_client.containers.run
        labels = {"arvproxy-test": self.test_label}
        command = dockerhelp.serve_command([8080])
        first = yield deferToThread(
            run, dockerhelp.TEST_IMAGE, command, detach=True, network_mode="none", labels=labels
        )
        second = yield deferToThread(
            run, dockerhelp.TEST_IMAGE, command, detach=True, network_mode="none", labels=labels
        )

        watching = DockerRuntime(reactor, container_id=first.id, wait_slice=1.0)
        self.addCleanup(watching.stop)
        yield watching.start()
        yield deferToThread(dockerhelp.tell_exit, first, 7)
        self.assertEqual((yield watching.exited()), 7)

        leaving = DockerRuntime(reactor, container_id=second.id, wait_slice=1.0)
        yield leaving.start()
        yield leaving.stop()
        yield deferToThread(second.reload)
        self.assertEqual(second.status, "running")

    @defer.inlineCallbacks
    def test_attach_missing(self) -> Any:
        """Attaching to a container that does not exist fails with a message naming it."""
        runtime = DockerRuntime(reactor, container_id="no-such-container-" + self.test_label)
        self.addCleanup(runtime.stop)
        e = yield self.assertFailure(runtime.start(), ValueError)
        self.assertIn("no-such-container", str(e))

    @defer.inlineCallbacks
    def test_removed_after_exit(self) -> Any:
        """A container the runtime created is removed once it has exited."""
        runtime = yield defer.ensureDeferred(self.started(self.spec(["true"])))
        self.assertEqual((yield runtime.exited()), 0)
        docker_client = yield deferToThread(dockerhelp.client)
        left = yield deferToThread(
            docker_client.containers.list,
            all=True,
            filters={"label": f"arvproxy-test={self.test_label}"},
        )
        self.assertEqual(left, [])

    def test_label_constant(self) -> None:
        """Containers are labelled with the Arvados container UUID under a stable key."""
        self.assertEqual(LABEL, "org.arvados.container_uuid")
