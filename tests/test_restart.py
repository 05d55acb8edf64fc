"""
Restarts with the real Docker engine: the local dispatcher and its gateway are killed
(SIGKILL) while a container runs; the dispatcher started again re-attaches a gateway to the
container that still runs (the same one answers through the front door), or records a final
state for one that is gone, so neither C{arvproxy ls} nor the services page shows a zombie.
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
from arvproxy.gateway.docker_runtime import LABEL, docker_name
from tests import dockerhelp
from tests.e2e import SUFFIX, Twistd, wait_for
from tests.test_docker_integration import DockerChain, gateway_pids


class RestartTests(DockerChain):
    """controller + dispatcher + Docker, with the dispatcher killed and started again."""

    def start_dispatcher(self, name: str, *options: str) -> Twistd:
        config = os.path.join(self.directory, "config.yml")
        dispatcher = Twistd.spawn(
            reactor,
            self.directory,
            name,
            ["arv-local-dispatcher", "--config", config, "--poll-interval", "0.5", *options],
        )
        self.addCleanup(lambda: defer.ensureDeferred(dispatcher.stop(reactor, grace=30)))
        return dispatcher

    async def kill_dispatcher_and_gateway(self, uuid: str) -> None:
        [pid] = gateway_pids(uuid)
        self.dispatcher.transport.signalProcess("KILL")
        os.kill(pid, 9)
        await self.dispatcher.ended
        await wait_for(reactor, lambda: not gateway_pids(uuid), "the gateway to die")

    def docker_container(self, uuid: str) -> Any:
        return dockerhelp.client().containers.get(docker_name(uuid))

    async def running(self, request: backends.ContainerRequest) -> backends.Container:
        uuid = request.container_uuid
        assert uuid is not None
        return await self.until(
            uuid, "Running", lambda c: c.state == backends.RUNNING and c.gateway_address
        )

    def arvproxy(self, *argv: str) -> Any:
        config = os.path.join(self.directory, "config.yml")
        result = subprocess.run(
            [sys.executable, "-m", "arvproxy.cli", "--config", config, *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": dockerhelp.SOURCE_ROOT},
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    async def services_page_state(self, request: backends.ContainerRequest) -> str:
        cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(self.token.encode())
        response, body = await self.client.fetch(
            b"GET",
            b"http://127.0.0.1:%d/api/containers" % (self.port,),
            {
                b"host": [f"{SUFFIX}:{self.port}".encode()],
                b"cookie": [cookie],
                b"x-requested-with": [b"test"],
            },
        )
        assert response.code == 200, body
        [item] = [i for i in json.loads(body)["items"] if i["uuid"] == request.uuid]
        return str(item["state"])

    @defer.inlineCallbacks
    def test_reattach_after_kill(self) -> Any:
        """Killed dispatcher and gateway; started again, the same container answers again."""
        request = self.start(dockerhelp.serve_command([8080]), [8080])
        uuid = request.container_uuid
        assert uuid is not None
        before = yield defer.ensureDeferred(self.running(request))
        code, body, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual((code, body), (200, dockerhelp.HELLO))
        docker_id = (yield deferToThread(self.docker_container, uuid)).id

        yield defer.ensureDeferred(self.kill_dispatcher_and_gateway(uuid))
        code, _, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual(code, 502)  # a dead address: what a zombie looked like

        self.dispatcher = self.start_dispatcher("dispatcher-again")
        after = yield defer.ensureDeferred(
            self.until(
                uuid,
                "a new gateway",
                lambda c: (
                    c.state == backends.RUNNING
                    and c.gateway_address
                    and c.gateway_address != before.gateway_address
                ),
            )
        )
        self.assertTrue(after.gateway_address.startswith("127.0.0.1:"))
        code, body, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual((code, body), (200, dockerhelp.HELLO))
        still = yield deferToThread(self.docker_container, uuid)
        self.assertEqual(still.id, docker_id)  # the same container, not a new one
        self.assertEqual(still.status, "running")

        # The adopted container is owned again: its exit is recorded, and it is removed.
        yield deferToThread(dockerhelp.tell_exit, still, 4)
        finished = yield defer.ensureDeferred(
            self.until(uuid, "Complete", lambda c: c.state in backends.FINAL_STATES)
        )
        self.assertEqual((finished.state, finished.exit_code), (backends.COMPLETE, 4))
        yield defer.ensureDeferred(
            wait_for(reactor, lambda: not gateway_pids(uuid), "the gateway to exit", timeout=30)
        )

        def labelled() -> list[Any]:
            return dockerhelp.client().containers.list(
                all=True, filters={"label": f"{LABEL}={uuid}"}
            )

        leftovers = yield deferToThread(labelled)
        self.assertEqual(leftovers, [])

    @defer.inlineCallbacks
    def test_gone_after_kill(self) -> Any:
        """Killed, and its Docker container removed meanwhile: Cancelled, shown so everywhere."""
        request = self.start(dockerhelp.serve_command([8080]), [8080])
        uuid = request.container_uuid
        assert uuid is not None
        yield defer.ensureDeferred(self.running(request))
        yield defer.ensureDeferred(self.kill_dispatcher_and_gateway(uuid))
        yield deferToThread(dockerhelp.remove_labelled, LABEL, uuid)
        listed = yield deferToThread(self.arvproxy, "ls", "--json", "--user", self.user.uuid)
        self.assertEqual([row["state"] for row in listed], [backends.RUNNING])  # the zombie
        state = yield defer.ensureDeferred(self.services_page_state(request))
        self.assertEqual(state, backends.RUNNING)

        self.dispatcher = self.start_dispatcher("dispatcher-again")
        container = yield defer.ensureDeferred(
            self.until(uuid, "Cancelled", lambda c: c.state == backends.CANCELLED)
        )
        self.assertIn("gone", container.runtime_status.get("error", ""))
        listed = yield deferToThread(self.arvproxy, "ls", "--json", "--user", self.user.uuid)
        self.assertEqual([row["state"] for row in listed], [backends.CANCELLED])
        self.assertIn("gone", listed[0]["runtime_status"]["error"])
        state = yield defer.ensureDeferred(self.services_page_state(request))
        self.assertEqual(state, backends.CANCELLED)
        code, _, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual(code, 410)

    @defer.inlineCallbacks
    def test_sigterm_gateway(self) -> Any:
        """SIGTERM to a Docker gateway stops the container and records Cancelled, saying why."""
        request = self.start(dockerhelp.serve_command([8080]), [8080])
        uuid = request.container_uuid
        assert uuid is not None
        yield defer.ensureDeferred(self.running(request))
        [pid] = gateway_pids(uuid)
        os.kill(pid, 15)
        container = yield defer.ensureDeferred(
            self.until(uuid, "Cancelled", lambda c: c.state == backends.CANCELLED)
        )
        self.assertIn("SIGTERM", container.runtime_status.get("error", ""))
        self.assertEqual(container.listening_ports, ())
        yield defer.ensureDeferred(
            wait_for(reactor, lambda: not gateway_pids(uuid), "the gateway to exit", timeout=60)
        )
        gone = yield deferToThread(
            lambda: dockerhelp.client().containers.list(
                all=True, filters={"label": f"{LABEL}={uuid}"}
            )
        )
        self.assertEqual(gone, [])
        code, _, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual(code, 410)

    @defer.inlineCallbacks
    def test_hand_back_restart(self) -> Any:
        """A dispatcher stopped with --hand-back leaves the container running; the next attaches."""
        yield defer.ensureDeferred(self.dispatcher.stop(reactor))
        self.dispatcher = self.start_dispatcher("dispatcher-hand-back", "--hand-back")
        request = self.start(dockerhelp.serve_command([8080]), [8080])
        uuid = request.container_uuid
        assert uuid is not None
        yield defer.ensureDeferred(self.running(request))
        docker_id = (yield deferToThread(self.docker_container, uuid)).id
        yield defer.ensureDeferred(self.dispatcher.stop(reactor))
        yield defer.ensureDeferred(
            wait_for(reactor, lambda: not gateway_pids(uuid), "the gateway to hand back")
        )
        container = self.store.get_container(uuid)
        self.assertEqual((container.state, container.gateway_address), (backends.RUNNING, ""))
        code, _, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual(code, 503)  # no gateway for now: "not ready yet", with Retry-After
        still = yield deferToThread(self.docker_container, uuid)
        self.assertEqual((still.id, still.status), (docker_id, "running"))

        self.dispatcher = self.start_dispatcher("dispatcher-after")
        yield defer.ensureDeferred(self.running(request))
        code, body, _ = yield defer.ensureDeferred(self.get(request, 8080))
        self.assertEqual((code, body), (200, dockerhelp.HELLO))
        self.assertEqual((yield deferToThread(self.docker_container, uuid)).id, docker_id)
