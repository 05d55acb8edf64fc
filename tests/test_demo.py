"""
Tests for C{make run} (L{arvproxy.demo}): the demo itself, spawned as C{python -m arvproxy.demo}
with a configuration of its own on free loopback ports, driven the way a person does (read the
URL it prints, open it, Ctrl-C).

  - With a Docker engine: the local dispatcher's gateway runs the demo site in a real container
    without network, and Ctrl-C leaves no container and no process behind.  Without an engine
    these skip with the fix, or fail under C{CI=true} (L{tests.dockerhelp.require_docker}).
  - Without one (an engine address that answers nothing): the demo says so with the fix and
    serves its loopback page instead; C{--container host} does that without a word.

Every request goes to 127.0.0.1 with the service's name in C{Host}.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from arvproxy import backends
from arvproxy.backends.registry import RegistryStore
from arvproxy.gateway.docker_runtime import LABEL
from arvproxy.gateway.netns import has_cap_sys_admin
from tests import dockerhelp
from tests.e2e import CLUSTER_ID, ROOT_TOKEN, Client, free_port, wait_for, write_config
from tests.test_docker_integration import gateway_pids

SOURCE_ROOT = dockerhelp.SOURCE_ROOT
URL_RE = re.compile(rb"^  (http://\S+\?arvados_api_token=\S+)$", re.MULTILINE)
CONTAINER_RE = re.compile(rb"^  Container     (\S+)", re.MULTILINE)
# An engine address that answers nothing (and dials nothing): "no Docker engine here".
NO_ENGINE = "unix:///nonexistent/arvproxy-test/docker.sock"


class DemoProcess(protocol.ProcessProtocol):
    """
    One C{python -m arvproxy.demo}: its output (stdout and stderr together) and its end.

    @ivar ended: fires with the exit code (negative: the signal that killed it).
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.running = True

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        value: Any = reason.value
        code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        self.ended.callback(code)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def signal(self, name: str) -> None:
        if self.running:
            assert self.transport is not None
            self.transport.signalProcess(name)


class DemoTestCase(unittest.TestCase):
    """Starts the demo in a fresh directory and makes sure it is gone after each test."""

    timeout = 240

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        self.config = write_config(self.directory, self.port)
        self.client = Client(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(self.client.close()))

    def start_demo(self, container: str, **environment: str) -> DemoProcess:
        """Spawn the demo with C{--container container}; its cleanup stops it (Ctrl-C first)."""
        demo = DemoProcess()
        env = dict(os.environ, PYTHONPATH=SOURCE_ROOT, **environment)
        argv = [sys.executable, "-m", "arvproxy.demo", "--config", self.config]
        argv += ["--container", container]
        reactor.spawnProcess(  # type: ignore[attr-defined]
            demo, argv[0], argv, env=env, path=SOURCE_ROOT, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self.addCleanup(lambda: defer.ensureDeferred(self.stop_demo(demo)))
        return demo

    async def stop_demo(self, demo: DemoProcess, grace: float = 90.0) -> int:
        """Ctrl-C the demo; kill it if it is still there after C{grace} seconds."""
        demo.signal("INT")
        killer = reactor.callLater(grace, demo.signal, "KILL")  # type: ignore[attr-defined]
        try:
            return await demo.ended
        finally:
            if killer.active():
                killer.cancel()

    async def url_of(self, demo: DemoProcess, timeout: float = 120.0) -> str:
        """The URL with a token that the demo prints once its container is Running."""
        found = await wait_for(
            reactor,
            lambda: URL_RE.search(demo.output) or (not demo.running and "ended"),
            "the demo's URL",
            timeout=timeout,
            interval=0.1,
        )
        if found == "ended":
            raise AssertionError(f"the demo exited before printing a URL:\n{demo.text()}")
        return str(found.group(1).decode("ascii"))

    async def get(self, url: str, cookie: str | None = None) -> tuple[int, Headers, bytes]:
        """GET C{url} from the controller on 127.0.0.1, with its host name in C{Host}."""
        parts = urlsplit(url)
        assert parts.port == self.port, url
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {b"host": [parts.netloc.encode("ascii")]}
        if cookie is not None:
            headers[b"cookie"] = [cookie.encode("ascii")]
        response, body = await self.client.fetch(
            b"GET", f"http://127.0.0.1:{self.port}{target}".encode("ascii"), headers
        )
        return response.code, response.headers, body

    async def sign_in(self, url: str) -> tuple[str, str]:
        """
        Open the URL with the token as a browser does: the 303 to the URL without it, with the
        token in a cookie.

        @return: the URL it leads to, and the cookies to send there.
        """
        code, headers, _ = await self.get(url)
        self.assertEqual(code, 303)
        location = urljoin(url, headers.getRawHeaders(b"location", [b""])[0].decode("ascii"))
        self.assertNotIn("arvados_api_token", location)
        cookies = [
            value.decode("latin-1").split(";", 1)[0]
            for value in headers.getRawHeaders(b"set-cookie", [])
        ]
        self.assertTrue(any(c.startswith("arvados_api_token=") for c in cookies), cookies)
        return location, "; ".join(cookies)

    def container_uuid(self, demo: DemoProcess) -> str:
        found = CONTAINER_RE.search(demo.output)
        assert found is not None, demo.text()
        return found.group(1).decode("ascii")

    def container_record(self, uuid: str) -> backends.Container:
        store = RegistryStore(
            os.path.join(self.directory, "registry.sqlite"),
            CLUSTER_ID,
            system_root_token=ROOT_TOKEN,
        )
        try:
            return store.get_container(uuid)
        finally:
            store.close()


class DockerDemoTests(DemoTestCase):
    """C{make run} with a Docker engine: the demo site in a real container, no network."""

    def setUp(self) -> None:
        dockerhelp.require_docker()
        if not has_cap_sys_admin():
            raise unittest.SkipTest("the Docker runtime needs root or CAP_SYS_ADMIN")
        super().setUp()
        self.addCleanup(self.remove_leftovers)

    def remove_leftovers(self) -> defer.Deferred[None]:
        """Remove the Docker containers of every container in this test's registry."""

        def remove() -> None:
            path = os.path.join(self.directory, "registry.sqlite")
            if not os.path.exists(path):
                return
            store = RegistryStore(path, CLUSTER_ID, system_root_token=ROOT_TOKEN)
            try:
                for container in store.list_containers():
                    dockerhelp.remove_labelled(LABEL, container.uuid)
            finally:
                store.close()

        return deferToThread(remove)

    @defer.inlineCallbacks
    def test_docker_container_end_to_end(self) -> Any:
        """The printed URL opens the site and its CGI in the container; Ctrl-C leaves nothing."""
        yield defer.ensureDeferred(self.docker_end_to_end())

    async def docker_end_to_end(self) -> None:
        demo = self.start_demo("docker")
        url = await self.url_of(demo)
        uuid = self.container_uuid(demo)
        self.assertIn("dispatcher.log", demo.text())
        self.assertNotIn("NO DOCKER CONTAINER", demo.text())

        docker_containers = await deferToThread(self.docker_containers, uuid)
        self.assertEqual(len(docker_containers), 1)
        self.assertEqual(docker_containers[0].attrs["HostConfig"]["NetworkMode"], "none")

        page_url, cookie = await self.sign_in(url)
        code, _, page = await self.get(page_url, cookie)
        self.assertEqual(code, 200, page)
        self.assertIn(b"Hello from inside a Docker container", page)
        public_url = page_url.split("?", 1)[0]
        self.assertIn(f'<td id="web-url">{public_url}</td>'.encode(), page)
        self.assertIn(b"<td>lo </td>", page)  # its only network interface

        seen = []
        for _ in range(2):
            code, headers, body = await self.get(urljoin(page_url, "cgi-bin/request"), cookie)
            self.assertEqual(code, 200, body)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
            seen.append(dict(line.split("=", 1) for line in body.decode().splitlines()))
        self.assertEqual([s["count"] for s in seen], ["1", "2"])
        received = seen[0]
        host = urlsplit(page_url).netloc
        self.assertEqual(received["HTTP_HOST"], host)
        self.assertEqual(received["HTTP_X_FORWARDED_HOST"], host)
        self.assertEqual(received["HTTP_X_FORWARDED_PROTO"], "http")
        self.assertEqual(received["HTTP_X_FORWARDED_FOR"], "127.0.0.1")
        self.assertEqual(received["REMOTE_ADDR"], "127.0.0.1")  # inside the container
        self.assertNotIn("arvados_api_token", received.get("HTTP_COOKIE", ""))
        self.assertEqual([k for k in received if k.startswith("HTTP_X_ARVADOS")], [])

        self.assertEqual(await self.stop_demo(demo), 0, demo.text())
        self.assertIn(f"Cancelling container {uuid}", demo.text())
        self.assertEqual(self.container_record(uuid).state, backends.CANCELLED)
        self.assertEqual(await deferToThread(self.docker_containers, uuid), [])
        self.assertEqual(gateway_pids(uuid), [])
        self.assertEqual(self.dispatcher_pids(), [])

    def docker_containers(self, uuid: str) -> list[Any]:
        """Docker's containers (running or not) of arvproxy container C{uuid} (blocking)."""
        return list(
            dockerhelp.client().containers.list(all=True, filters={"label": f"{LABEL}={uuid}"})
        )

    def dispatcher_pids(self) -> list[int]:
        """The dispatchers that run with this test's configuration."""
        pids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"arv-local-dispatcher" in argv and self.config.encode() in argv:
                pids.append(int(entry))
        return pids


class HostDemoTests(DemoTestCase):
    """C{make run} without Docker: the loopback page, served by the demo itself."""

    def test_host_page(self) -> Any:
        """The page served by the demo process answers through the chain, and Ctrl-C stops it."""
        cases = [
            # --container, engine address, whether the demo says there is no Docker container
            ("auto", NO_ENGINE, True),
            ("host", os.environ.get("DOCKER_HOST", ""), False),
        ]
        return defer.ensureDeferred(self.each(cases))

    async def each(self, cases: list[tuple[str, str, bool]]) -> None:
        for container, engine, warned in cases:
            environment = {"DOCKER_HOST": engine} if engine else {}
            demo = self.start_demo(container, **environment)
            url = await self.url_of(demo, timeout=60.0)
            text = demo.text()
            self.assertEqual("NO DOCKER CONTAINER" in text, warned, text)
            self.assertEqual("scripts/ensure-docker` as root" in text, warned, text)
            page_url, cookie = await self.sign_in(url)
            code, _, page = await self.get(page_url, cookie)
            self.assertEqual(code, 200, page)
            self.assertIn(b"Hello from inside the container", page)
            uuid = self.container_uuid(demo)
            self.assertEqual(await self.stop_demo(demo), 0, demo.text())
            self.assertEqual(self.container_record(uuid).state, backends.CANCELLED)

    def test_docker_required(self) -> Any:
        """--container docker without an engine exits with status 1 and the fix."""
        demo = self.start_demo("docker", DOCKER_HOST=NO_ENGINE)

        def ended(code: int) -> None:
            self.assertEqual(code, 1, demo.text())
            self.assertIn("cannot run a Docker container here", demo.text())
            self.assertIn("scripts/ensure-docker", demo.text())
            self.assertIsNone(URL_RE.search(demo.output))

        return demo.ended.addCallback(ended)
