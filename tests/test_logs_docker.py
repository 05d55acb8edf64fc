"""
People can see why their container died, with the real Docker engine: the gateway keeps the
container's output and its own notes, C{arvproxy logs} prints them (and follows them), the
front door serves them at C{/logs/<uuid>} to whoever may connect, the services page's card
says why it ended, and a 410 names where the logs are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from arvproxy import backends, policy
from arvproxy.containerlogs import read_output
from tests import dockerhelp
from tests.e2e import SUFFIX, wait_for
from tests.test_docker_integration import DockerChain

NO_IMAGE = "127.0.0.1:1/arvproxy-test/no-such-image:1"
"""An image only a registry on 127.0.0.1:1 could have: the pull fails at once, on loopback."""


def talking_command(ports: list[int]) -> list[str]:
    """L{dockerhelp.serve_command}, saying something on stdout and on stderr first."""
    command = dockerhelp.serve_command(ports)
    return ["sh", "-c", "echo hello-on-stdout; echo hello-on-stderr >&2; " + command[2]]


class ContainerLogsTests(DockerChain):
    """Output kept by the gateway, shown by the CLI and the front door."""

    def cli(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        config = os.path.join(self.directory, "config.yml")
        return subprocess.run(
            [sys.executable, "-m", "arvproxy.cli", "--config", config, *argv],
            capture_output=True,
            env={**os.environ, "PYTHONPATH": dockerhelp.SOURCE_ROOT},
            timeout=120,
        )

    async def services_host(self, path: bytes, html: bool = False) -> tuple[int, bytes]:
        cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(self.token.encode())
        headers = {
            b"host": [f"{SUFFIX}:{self.port}".encode()],
            b"cookie": [cookie],
            b"x-requested-with": [b"test"],
        }
        if html:
            headers = {**headers, b"sec-fetch-mode": [b"navigate"]}
        response, body = await self.client.fetch(
            b"GET", b"http://127.0.0.1:%d%s" % (self.port, path), headers
        )
        return response.code, body

    @defer.inlineCallbacks
    def test_output_kept_and_followed(self) -> Any:
        """stdout and stderr are kept as they come; logs -f follows them to the end."""
        request = self.start(talking_command([8080]), [8080])
        uuid = request.container_uuid
        assert uuid is not None
        yield defer.ensureDeferred(
            self.until(uuid, "Running", lambda c: c.state == backends.RUNNING and c.gateway_address)
        )
        config = os.path.join(self.directory, "config.yml")
        follower = subprocess.Popen(
            [sys.executable, "-m", "arvproxy.cli", "--config", config, "logs", "-f", request.uuid],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": dockerhelp.SOURCE_ROOT},
        )
        self.addCleanup(follower.kill)

        directory = os.path.join(self.directory, "container-logs")
        yield defer.ensureDeferred(
            wait_for(
                reactor,
                lambda: b"hello-on-stderr" in read_output(directory, uuid),
                "the container's output to be kept",
                [self.dispatcher],
            )
        )
        docker_container = yield deferToThread(
            dockerhelp.client().containers.get, f"arvproxy-{uuid}"
        )
        yield deferToThread(dockerhelp.tell_exit, docker_container, 3)
        out, err = yield deferToThread(follower.communicate, None, 90)
        self.assertEqual(follower.returncode, 0, err)
        self.assertIn(b"hello-on-stdout\n", out)
        self.assertIn(b"hello-on-stderr\n", out)
        self.assertIn(b"The container is Running", out)
        self.assertIn(b"The container is Complete (exit code 3).", out)
        self.assertIn(f"container {uuid} is Complete (exit code 3)".encode(), err)

        code, body = yield defer.ensureDeferred(
            self.services_host(f"/logs/{request.uuid}".encode())
        )
        self.assertEqual(code, 200, body)
        self.assertIn(b"hello-on-stdout\n", body)

    @defer.inlineCallbacks
    def test_cannot_pull_image(self) -> Any:
        """An image that cannot be pulled: Cancelled, the reason on the card, logs and pages."""
        request = self.store.create_container_request(
            self.user.uuid,
            name="broken",
            container_image=NO_IMAGE,
            published_ports={"8080": {"access": "private"}},
        )
        uuid = request.container_uuid
        assert uuid is not None
        self.uuids.append(uuid)
        container = yield defer.ensureDeferred(
            self.until(uuid, "Cancelled", lambda c: c.state == backends.CANCELLED)
        )
        self.assertEqual(
            container.runtime_status["error"], "the gateway could not start the container"
        )
        self.assertIn(f"cannot pull image {NO_IMAGE}", container.runtime_status["errorDetail"])

        result = yield deferToThread(self.cli, "logs", request.uuid)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"cannot pull image", result.stdout)
        self.assertIn(b"cannot pull image", result.stderr)

        code, body = yield defer.ensureDeferred(self.services_host(b"/api/containers"))
        self.assertEqual(code, 200)
        [item] = [i for i in json.loads(body)["items"] if i["uuid"] == request.uuid]
        self.assertEqual(item["reason"], "the gateway could not start the container")
        self.assertIn("cannot pull image", item["reason_detail"])
        self.assertEqual(item["logs_url"], f"/logs/{request.uuid}")

        code, body = yield defer.ensureDeferred(
            self.services_host(item["logs_url"].encode(), html=True)
        )
        self.assertEqual(code, 200)
        self.assertIn(b"Why it ended:", body)
        self.assertIn(b"cannot pull image", body)

        code, body, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual(code, 410)
        self.assertIn(f"http://{SUFFIX}:{self.port}/logs/{request.uuid}".encode(), body)
        self.assertIn(b">Logs</a>", body)
