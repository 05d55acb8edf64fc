"""
Many nodes on one machine: three C{arv-node-dispatcher}s, each in a network namespace of its own,
one front door (C{arv-controller-proxy}, C{Backend: arvados}) and the fake Arvados API in a
"hub" namespace, joined by veth pairs -- every namespace, link and address made by this test
(C{10.199.N.1} on the hub's side, C{10.199.N.2} on node N's), so no packet leaves them.  The
nodes share this machine's Docker engine (each container has no network: C{--network none}).

Ten service containers are queued; each must run exactly once (locked once, its Docker
container never replaced), spread over the three nodes, and answer through the front door; one
node's dispatcher and gateways are killed mid-way (SIGKILL) and the dispatcher started again
finds what it held by C{locked_by_uuid} and the Docker labels, so no container is lost.

Needs root (namespaces, C{setns}), C{ip} and a Docker engine; without them the test skips,
and fails under C{CI=true}.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any

import yaml
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from arvproxy import policy
from arvproxy.fakearvados import FakeArvadosAPI, OpenConnections, self_signed
from arvproxy.gateway.docker_runtime import LABEL, docker_name
from arvproxy.gateway.netns import NamespaceEndpoint, NetworkNamespace, has_cap_sys_admin
from arvproxy.nodeapi import DISPATCHER_SCOPES
from tests import dockerhelp
from tests.e2e import REPO_ROOT, ROOT_TOKEN, SUFFIX, TWISTD, Twistd, wait_for
from tests.test_docker_integration import gateway_pids

CLUSTER = "zzzzz"
NODES = 3
CONTAINERS = 10
PER_NODE = 4  # 3 nodes x 4 >= 10, and no two nodes can hold all ten: every node runs some
FRONT_DOOR_PORT = 8900  # inside the hub namespace: nothing else listens there
SERVICE_PORT = 8080
# Each container tells who it is at /who, from 127.0.0.1:8080 inside itself.
SERVICE = (
    'mkdir -p /tmp/www && echo "$ARVADOS_CONTAINER_UUID" > /tmp/www/who && '
    f"exec httpd -f -p 127.0.0.1:{SERVICE_PORT} -h /tmp/www"
)


def require_namespaces() -> None:
    """Skip (fail under C{CI=true}) without root, C{ip} or a Docker engine."""
    dockerhelp.require_docker()
    problem = None
    if not has_cap_sys_admin():
        problem = "network namespaces and setns need root or CAP_SYS_ADMIN"
    elif shutil.which("ip") is None:
        problem = "the ip command (iproute2) is missing"
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            raise unittest.FailTest(f"CI=true and the multi-node test cannot run: {problem}")
        raise unittest.SkipTest(problem)


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


class Namespaces:
    """A hub and C{count} nodes, each node joined to the hub by a veth pair."""

    def __init__(self, count: int) -> None:
        tag = secrets.token_hex(3)
        self.hub = f"arvp-{tag}-hub"
        self.nodes = [f"arvp-{tag}-n{i}" for i in range(1, count + 1)]
        self.made: list[str] = []

    def create(self) -> None:
        for name in [self.hub, *self.nodes]:
            ip("netns", "add", name)
            self.made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        for i, node in enumerate(self.nodes, 1):
            ip("-n", self.hub, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0",
               "netns", node)  # fmt: skip
            ip("-n", self.hub, "addr", "add", f"10.199.{i}.1/24", "dev", f"h{i}")
            ip("-n", self.hub, "link", "set", f"h{i}", "up")
            ip("-n", node, "addr", "add", f"10.199.{i}.2/24", "dev", "eth0")
            ip("-n", node, "link", "set", "eth0", "up")

    def destroy(self) -> None:
        """Delete every namespace made (their veths go with them)."""
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made = []

    @staticmethod
    def path(name: str) -> str:
        return f"/var/run/netns/{name}"


def listen_inside(namespace: str) -> socket.socket:
    """A listening TCP socket on 0.0.0.0 (any port) of C{namespace} (run in a thread there)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def spawn_in(namespace: str, directory: str, name: str, plugin_args: list[str]) -> Twistd:
    """C{twistd -n <plugin_args>} inside C{namespace} (C{ip netns exec} execs it: same pid)."""
    log_path = os.path.join(directory, f"{name}.log")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1")
    process = Twistd(name, log_path)
    argv = ["ip", "netns", "exec", namespace, sys.executable, TWISTD, "-n", "--pidfile="]
    argv += ["-l", log_path, *plugin_args]
    executable = shutil.which("ip") or "ip"
    transport = reactor.spawnProcess(process, executable, argv, env=env, path=directory)
    process.pid = transport.pid
    transport.closeStdin()
    return process


@implementer(IAgentEndpointFactory)
class IntoNamespace:
    """Every connection goes to 127.0.0.1:<port> inside one namespace."""

    def __init__(self, namespace: str, port: int) -> None:
        self._namespace = NetworkNamespace(Namespaces.path(namespace))
        self._port = port

    def endpointForURI(self, uri: Any) -> Any:
        return NamespaceEndpoint(reactor, self._namespace, self._port, hosts=("127.0.0.1",))

    def close(self) -> None:
        self._namespace.close()


class MultiNodeTests(unittest.TestCase):
    """Three node dispatchers, one front door, ten containers, one node killed mid-way."""

    timeout = 900

    def setUp(self) -> Any:
        require_namespaces()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.spaces = Namespaces(NODES)
        self.addCleanup(self.spaces.destroy)
        self.spaces.create()
        self.fake = FakeArvadosAPI(CLUSTER, ROOT_TOKEN)
        self.uuids: list[str] = []
        self.addCleanup(self._remove_docker_containers)
        return self._serve_api()

    @defer.inlineCallbacks
    def _serve_api(self) -> Any:
        """The fake API, over TLS, on every address of the hub."""
        from twisted.web import server

        site = server.Site(self.fake, reactor=reactor)
        connections = OpenConnections(site)
        hosts = ["127.0.0.1", *(f"10.199.{i}.1" for i in range(1, NODES + 1))]
        tls = TLSMemoryBIOFactory(self_signed(hosts)[0], False, site)
        namespace = NetworkNamespace(Namespaces.path(self.spaces.hub))
        try:
            sock = yield namespace.run_inside(reactor, listen_inside, self.spaces.hub)
        finally:
            namespace.close()
        try:
            port = reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, tls)
        finally:
            sock.close()
        self.api_port = port.getHost().port

        @defer.inlineCallbacks
        def stop() -> Any:
            yield port.stopListening()
            yield connections.close_all()

        self.addCleanup(stop)

    def _remove_docker_containers(self) -> defer.Deferred[None]:
        def remove() -> None:
            for uuid in self.uuids:
                for pid in gateway_pids(uuid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                dockerhelp.remove_labelled(LABEL, uuid)

        return deferToThread(remove)

    # -- the cluster ---------------------------------------------------------------------------

    def write_config(self, name: str, api_host: str, **arvproxy: Any) -> str:
        document = {
            "Clusters": {
                CLUSTER: {
                    "SystemRootToken": ROOT_TOKEN,
                    "Services": {
                        "ContainerWebServices": {
                            "ExternalURL": f"http://*.{SUFFIX}:{FRONT_DOOR_PORT}",
                            "InternalURLs": {f"http://127.0.0.1:{FRONT_DOOR_PORT}": {}},
                        },
                        "Controller": {"ExternalURL": f"https://{api_host}:{self.api_port}"},
                    },
                    "TLS": {"Insecure": True},
                    "ArvProxy": {"Backend": "arvados", **arvproxy},
                }
            }
        }
        path = os.path.join(self.directory, f"{name}.yml")
        with open(path, "w") as f:
            yaml.safe_dump(document, f)
        return path

    def node_config(self, i: int, token: str) -> str:
        token_file = os.path.join(self.directory, f"node{i}-token")
        with open(token_file, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o600)
        # Node 2 takes ports from a range; the others any free port.
        address = f"10.199.{i}.2:7000-7009" if i == 2 else f"10.199.{i}.2:0"
        return self.write_config(
            f"node{i}",
            f"10.199.{i}.1",
            ContainerLogs={"Directory": f"node{i}-logs"},
            NodeDispatcher={
                "TokenFile": token_file,
                "GatewayAddress": address,
                "MaxContainers": PER_NODE,
                "MaxVCPUs": 2 * PER_NODE,
                "PollInterval": "0.5s",
            },
        )

    def start_node(self, i: int, name: str) -> Twistd:
        process = spawn_in(
            self.spaces.nodes[i - 1],
            self.directory,
            name,
            ["arv-node-dispatcher", "--config", self.configs[i]],
        )
        self.addCleanup(lambda: defer.ensureDeferred(process.stop(reactor, grace=60)))
        return process

    def queue(self, owner: str) -> tuple[str, str]:
        ports = {str(SERVICE_PORT): {"access": "private", "label": "web", "initial_path": ""}}
        uuid = self.fake.add_container(
            container_image=dockerhelp.TEST_IMAGE,
            command=["sh", "-c", SERVICE],
            published_ports=ports,
            mounts={"/out": {"kind": "tmp"}},
            runtime_constraints={"ram": 64 << 20, "vcpus": 1},
        )
        self.uuids.append(uuid)
        request = self.fake.add_container_request(owner, uuid, published_ports=ports)
        return request, uuid

    def holder(self, uuid: str) -> str | None:
        holder: str | None = self.fake.containers[uuid]["locked_by_uuid"]
        return holder

    def state(self, uuid: str) -> str:
        state: str = self.fake.containers[uuid]["state"]
        return state

    # -- the test ------------------------------------------------------------------------------

    def test_ten_containers_three_nodes(self) -> defer.Deferred[None]:
        """Ten containers run once each, over three nodes, through one front door, past a kill."""
        return defer.ensureDeferred(self._ten_containers_three_nodes())

    async def _ten_containers_three_nodes(self) -> None:
        alice = self.fake.add_user("Alice")
        alice_token = self.fake.add_token(alice)
        project = self.fake.add_project(alice)
        dispatchers = self.fake.add_user("Node dispatchers", is_admin=True)
        # Each node has a token of its own, limited to what node dispatchers need.
        tokens = {
            i: self.fake.add_token(dispatchers, scopes=DISPATCHER_SCOPES)
            for i in range(1, NODES + 1)
        }
        token_uuids = {i: t.split("/")[1] for i, t in tokens.items()}
        node_of = {u: i for i, u in token_uuids.items()}
        self.configs = {i: self.node_config(i, tokens[i]) for i in tokens}
        hub_config = self.write_config("hub", "127.0.0.1")
        requests = dict(self.queue(project) for _ in range(CONTAINERS))

        front_door = spawn_in(
            self.spaces.hub,
            self.directory,
            "controller",
            ["arv-controller-proxy", "--config", hub_config],
        )
        self.addCleanup(lambda: defer.ensureDeferred(front_door.stop(reactor)))
        nodes = {i: self.start_node(i, f"node{i}") for i in tokens}
        watched = [front_door, *nodes.values()]

        # Mid-way: node 2 runs a container, and dies with its gateways, as when its cgroup is
        # killed; its Docker containers keep running.
        await wait_for(
            reactor,
            lambda: any(
                self.holder(u) == token_uuids[2] and self.state(u) == "Running" for u in self.uuids
            ),
            "node 2 to run a container",
            watched,
            timeout=300,
        )
        nodes[2].transport.signalProcess("KILL")
        await nodes[2].ended
        held_by_2 = [u for u in self.uuids if self.holder(u) == token_uuids[2]]
        for uuid in held_by_2:
            for pid in gateway_pids(uuid):
                os.kill(pid, signal.SIGKILL)
        await wait_for(
            reactor,
            lambda: not any(gateway_pids(u) for u in held_by_2),
            "node 2's gateways to die",
        )
        was_running = [u for u in held_by_2 if self.state(u) == "Running"]
        self.assertTrue(was_running)
        running_before = await deferToThread(self._docker_ids, was_running)
        nodes[2] = self.start_node(2, "node2-again")
        watched = [front_door, *nodes.values()]

        await wait_for(
            reactor,
            lambda: all(
                self.state(u) == "Running" and self.fake.containers[u]["gateway_address"]
                for u in self.uuids
            ),
            "all ten containers to be Running with a gateway",
            watched,
            timeout=600,
            interval=0.5,
        )
        describe = "\n".join(p.describe() for p in watched)

        # Each ran exactly once: locked once, by the node that runs it; its Docker container
        # the one it had before the kill (attached to, not replaced), never restarted.
        for uuid in self.uuids:
            record = self.fake.containers[uuid]
            self.assertEqual(record["lock_count"], 1, f"{uuid}\n{describe}")
            node = node_of[record["locked_by_uuid"]]
            self.assertTrue(
                record["gateway_address"].startswith(f"10.199.{node}.2:"), record["gateway_address"]
            )
            if node == 2:
                self.assertTrue(record["gateway_address"].split(":")[1].startswith("700"))
        after = await deferToThread(self._docker_ids, self.uuids)
        for uuid, (docker_id, _) in running_before.items():
            self.assertIsNotNone(docker_id, uuid)
            self.assertEqual(after[uuid], (docker_id, 0), uuid)
        self.assertEqual(sorted(after), sorted(self.uuids))
        self.assertTrue(all(restarts == 0 for _, restarts in after.values()), after)
        # Spread over the nodes: each ran some.
        per_node = {
            i: sum(1 for u in self.uuids if self.holder(u) == t) for i, t in token_uuids.items()
        }
        self.assertTrue(all(1 <= n <= PER_NODE for n in per_node.values()), per_node)

        # Each opens through the front door, and it is the right container that answers.
        door = IntoNamespace(self.spaces.hub, FRONT_DOOR_PORT)
        self.addCleanup(door.close)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent.usingEndpointFactory(reactor, door, pool=pool)
        cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(alice_token.encode())
        for request, uuid in requests.items():
            vhost = f"{request}-{SERVICE_PORT}.{SUFFIX}:{FRONT_DOOR_PORT}".encode()

            async def fetch(vhost: bytes = vhost) -> tuple[int, bytes]:
                response = await agent.request(
                    b"GET",
                    f"http://127.0.0.1:{FRONT_DOOR_PORT}/who".encode(),
                    Headers({b"host": [vhost], b"cookie": [cookie]}),
                )
                return response.code, await readBody(response)

            answer = await self._until_served(fetch, watched)
            self.assertEqual(answer, (200, uuid.encode() + b"\n"), describe)

        # Nothing changed hands while they were opened.
        self.assertEqual(
            {u: self.fake.containers[u]["lock_count"] for u in self.uuids},
            dict.fromkeys(self.uuids, 1),
        )

    async def _until_served(self, fetch: Any, watched: list[Twistd]) -> tuple[int, bytes]:
        """The first 200 (a gateway may not see its service listen at once: 503 until then)."""
        deadline = reactor.seconds() + 120
        while True:
            answer: tuple[int, bytes] = await fetch()
            if answer[0] == 200 or reactor.seconds() > deadline:
                return answer
            for process in watched:
                if not process.running:
                    raise AssertionError(f"{process.name} exited\n{process.describe()}")
            await task.deferLater(reactor, 0.5, lambda: None)

    @staticmethod
    def _docker_ids(uuids: list[str]) -> dict[str, tuple[str | None, int]]:
        """Each container's Docker container id and restart count (C{None}: there is none)."""
        client = dockerhelp.client()
        found: dict[str, tuple[str | None, int]] = {}
        for uuid in uuids:
            try:
                container = client.containers.get(docker_name(uuid))
            except Exception:
                found[uuid] = (None, 0)
                continue
            found[uuid] = (container.id, int(container.attrs.get("RestartCount", 0)))
        return found
