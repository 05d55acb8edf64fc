"""
Tests for L{arvproxy.nodedispatcher}: node dispatchers against the fake Arvados API over HTTP
(which follows the API server's lock and state rules), with gateway processes faked
(C{tests/test_multinode.py} runs real ones, in network namespaces, with Docker).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from arvproxy import backends, policy
from arvproxy.dispatcher import GatewayProcess, gateway_argv
from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI
from arvproxy.nodeapi import DISPATCHER_SCOPES, DispatchAPI
from arvproxy.nodeconfig import CANCEL, GatewayAddress, NodeDispatcherConfig
from arvproxy.nodedispatcher import NodeDispatcher, NodeInventory, api_host
from arvproxy.nodepolicy import Capacity, Resources
from arvproxy.reconcile import Found
from tests.test_dispatcher import FakeProcess

ROOT = "NodeDispatcherTestRootToken0000000000000000"
GiB = 1 << 30
PORTS = {"8080": {"access": "private", "label": "web", "initial_path": ""}}
TMP = {"/out": {"kind": "tmp"}}


def uuid_in(argv: list[str]) -> str:
    """The container a gateway's command line names."""
    return argv[argv.index("--container-uuid") + 1]


class FakeInventory:
    """Docker containers by record UUID, as L{arvproxy.reconcile.IInventory} reports them."""

    def __init__(self) -> None:
        self.found: dict[str, Found] = {}
        self.removed: list[str] = []

    def find(self, uuid: str) -> defer.Deferred[Found | None]:
        return defer.succeed(self.found.get(uuid))

    def leftovers(self) -> defer.Deferred[dict[str, Found]]:
        return defer.succeed(dict(self.found))

    def remove(self, uuid: str, found: Found) -> defer.Deferred[None]:
        self.removed.append(uuid)
        self.found.pop(uuid, None)
        return defer.succeed(None)


class Node:
    """One node dispatcher with faked gateway processes, its clock and its API client."""

    def __init__(
        self,
        testcase: NodeTests,
        token: str,
        node: NodeDispatcherConfig | None = None,
        capacity: Capacity | None = None,
        address: GatewayAddress | None = None,
    ) -> None:
        self.token = token
        self.clock = task.Clock()
        self.api = DispatchAPI(
            reactor,
            testcase.server.url,
            token,
            cluster_id="zzzzz",
            service_token_is_root=False,
            cache_ttl=0,
        )
        self.api.startService()
        testcase.addCleanup(self.api.stopService)
        self.spawned: list[tuple[FakeProcess, list[str]]] = []
        self.cleaned: list[str] = []
        self.inventory = FakeInventory()
        self.running_gateways: set[str] = set()
        self.fatal: list[str] = []
        self.busy_ports: set[int] = set()
        self.dispatcher = NodeDispatcher(
            self.clock,
            self.api,
            "/etc/arvados/config.yml",
            ROOT,
            node=node or NodeDispatcherConfig(),
            token=token,
            api_host="zzzzz.example:443",
            insecure=False,
            address=address or GatewayAddress("10.0.0.5"),
            capacity=capacity or Capacity(Resources(16 * GiB, 8)),
            port_free=lambda host, port: port not in self.busy_ports,
            spawn=self.spawn,
            cleanup=self.cleaned.append,
            inventory=self.inventory,
            gateway_running=self.running_gateways.__contains__,
            start_timeout=60.0,
            stop_timeout=5.0,
            on_fatal=self.fatal.append,
        )

    def spawn(self, protocol: GatewayProcess, executable: str, argv: list[str], env: Any) -> Any:
        process = FakeProcess(protocol)
        protocol.makeConnection(process)
        self.spawned.append((process, argv))
        return process

    def gateway(self, uuid: str) -> FakeProcess:
        [process] = [p for p, argv in self.spawned if uuid in argv and not p.ended]
        return process

    def env(self, uuid: str) -> dict[str, str]:
        process = self.gateway(uuid)
        env: dict[str, str] = json.loads(process.value())["Env"]
        return env

    async def start(self) -> None:
        await self.dispatcher.recover()

    async def poll(self) -> None:
        await self.dispatcher.poll()


class NodeTests(unittest.TestCase):
    """Node dispatchers take the queue's containers through the API, as Arvados' do."""

    def setUp(self) -> None:
        self.fake = FakeArvadosAPI("zzzzz", ROOT)
        self.server = FakeAPIServer(reactor, self.fake)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.alice = self.fake.add_user("Alice")
        self.project = self.fake.add_project(self.alice)
        dispatchers = self.fake.add_user("Dispatchers", is_admin=True)
        self.token_a = self.fake.add_token(dispatchers, scopes=DISPATCHER_SCOPES)
        self.token_b = self.fake.add_token(dispatchers, scopes=DISPATCHER_SCOPES)

    def queue(self, priority: int = 1, properties: Any = None, **fields: Any) -> str:
        """A committed request and its Queued container (a service publishing 8080)."""
        fields.setdefault("published_ports", PORTS)
        fields.setdefault("mounts", TMP)
        fields.setdefault("runtime_constraints", {"ram": GiB, "vcpus": 1})
        uuid = self.fake.add_container(**fields)
        self.fake.add_container_request(
            self.project,
            uuid,
            priority=priority,
            properties=properties or {},
            published_ports=fields["published_ports"],
        )
        return uuid

    def record(self, uuid: str) -> dict[str, Any]:
        return self.fake.containers[uuid]

    @staticmethod
    def uuid_of(token: str) -> str:
        return token.split("/")[1]

    async def running(self, node: Node, uuid: str) -> None:
        """What the gateway does once it runs the container (with the token it was given)."""
        await node.api.update_container(
            uuid, state=backends.RUNNING, gateway_address=node.env(uuid)["GatewayAddress"]
        )

    def test_takes_queue_in_priority_order(self) -> defer.Deferred[None]:
        """Queued containers are locked highest priority first; each gateway gets the JSON."""
        return defer.ensureDeferred(self._takes_queue_in_priority_order())

    async def _takes_queue_in_priority_order(self) -> None:
        low, high = self.queue(priority=1), self.queue(priority=500)
        node = Node(self, self.token_a, address=GatewayAddress("10.0.0.5", (7000, 7009)))
        await node.start()
        await node.poll()
        self.assertEqual(
            [argv for _, argv in node.spawned],
            [
                gateway_argv("/etc/arvados/config.yml", high, "docker"),
                gateway_argv("/etc/arvados/config.yml", low, "docker"),
            ],
        )
        for uuid, port in ((high, 7000), (low, 7001)):
            self.assertEqual(self.record(uuid)["state"], "Locked")
            self.assertEqual(self.record(uuid)["locked_by_uuid"], self.uuid_of(self.token_a))
            self.assertEqual(
                node.env(uuid),
                {
                    "GatewayAddress": f"10.0.0.5:{port}",
                    "GatewayAuthSecret": policy.gateway_secret(ROOT, uuid),
                    "ARVADOS_API_HOST": "zzzzz.example:443",
                    "ARVADOS_API_TOKEN": self.token_a,
                    "ARVADOS_API_HOST_INSECURE": "",
                },
            )
        # Nothing is taken twice: the next look starts no other gateway.
        await node.poll()
        self.assertEqual(len(node.spawned), 2)

    def test_pages(self) -> defer.Deferred[None]:
        """The queue is read page after page (the server caps pages), in priority order."""
        return defer.ensureDeferred(self._pages())

    async def _pages(self) -> None:
        self.fake.max_page = 2
        uuids = [self.queue(priority=p) for p in (3, 9, 1, 7, 5)]
        node = Node(self, self.token_a)
        await node.start()
        await node.poll()
        self.assertEqual(
            [uuid_in(argv) for _, argv in node.spawned],
            [uuids[1], uuids[3], uuids[4], uuids[0], uuids[2]],
        )
        lists = [c for c in self.fake.calls if c.path == "/arvados/v1/containers"]
        self.assertGreaterEqual(len(lists), 4)

    def test_losing_the_race_is_quiet(self) -> defer.Deferred[None]:
        """A container another node locks first is left to it; the next one is still taken."""
        return defer.ensureDeferred(self._losing_the_race_is_quiet())

    async def _losing_the_race_is_quiet(self) -> None:
        first, second = self.queue(priority=9), self.queue(priority=1)
        a, b = Node(self, self.token_a), Node(self, self.token_b)
        await a.start()
        await b.start()
        lock = a.api.lock

        async def b_first(uuid: str) -> Any:
            if uuid == first:
                await b.api.lock(uuid)
            return await lock(uuid)

        a.api.lock = lambda uuid: defer.ensureDeferred(b_first(uuid))  # type: ignore[method-assign]
        errors = self.flushLoggedErrors()
        await a.poll()
        self.assertEqual(self.record(first)["locked_by_uuid"], self.uuid_of(self.token_b))
        self.assertEqual(self.record(second)["locked_by_uuid"], self.uuid_of(self.token_a))
        self.assertEqual([uuid_in(argv) for _, argv in a.spawned], [second])
        self.assertEqual(self.flushLoggedErrors(), errors)
        # B, which holds the first, starts its gateway for it when it looks at what it holds.
        await b.poll()
        self.assertEqual([uuid_in(argv) for _, argv in b.spawned], [first])

    def test_filters_and_capacity(self) -> defer.Deferred[None]:
        """Only containers this node takes, while it has room; nothing lower jumps the queue."""
        return defer.ensureDeferred(self._filters_and_capacity())

    async def _filters_and_capacity(self) -> None:
        node_settings = NodeDispatcherConfig(properties={"arvproxy": "yes"})
        no_ports = self.queue(priority=900, published_ports={}, properties={"arvproxy": "yes"})
        not_marked = self.queue(priority=800)
        big = self.queue(
            priority=700, properties={"arvproxy": "yes"}, runtime_constraints={"ram": 3 * GiB}
        )
        small = self.queue(priority=600, properties={"arvproxy": "yes"})
        smaller = self.queue(
            priority=500, properties={"arvproxy": "yes"}, runtime_constraints={"ram": GiB // 2}
        )
        node = Node(self, self.token_a, node_settings, Capacity(Resources(4 * GiB, 8)))
        await node.start()
        await node.poll()
        started = [uuid_in(argv) for _, argv in node.spawned]
        self.assertEqual(started, [big, small])
        for uuid in (no_ports, not_marked, smaller):
            self.assertEqual(self.record(uuid)["state"], "Queued")
            self.assertEqual(self.record(uuid)["lock_count"], 0)
        # The big one ends: its room goes to the next in line.
        await node.api.update_container(big, state=backends.RUNNING, gateway_address="x:1")
        await node.api.update_container(big, state=backends.COMPLETE, exit_code=0)
        await node.gateway(big).end(exit_code=0)
        await node.poll()
        self.assertEqual([uuid_in(argv) for _, argv in node.spawned][2:], [smaller])

    def test_waits_for_room_in_order(self) -> defer.Deferred[None]:
        """A container with no room yet holds back those of lower priority (MaxContainers)."""
        return defer.ensureDeferred(self._waits_for_room_in_order())

    async def _waits_for_room_in_order(self) -> None:
        first, second, third = self.queue(priority=3), self.queue(priority=2), self.queue()
        capacity = Capacity(Resources(16 * GiB, 8), max_containers=2)
        node = Node(self, self.token_a, capacity=capacity)
        await node.start()
        await node.poll()
        self.assertEqual([uuid_in(argv) for _, argv in node.spawned], [first, second])
        self.assertEqual(self.record(third)["state"], "Queued")

    def test_port_range(self) -> defer.Deferred[None]:
        """Gateways get free ports of the range; a port something else holds is skipped."""
        return defer.ensureDeferred(self._port_range())

    async def _port_range(self) -> None:
        uuids = [self.queue(priority=9 - i) for i in range(3)]
        node = Node(self, self.token_a, address=GatewayAddress("fd00::5", (7000, 7002)))
        node.busy_ports.add(7001)
        await node.start()
        await node.poll()
        self.assertEqual(
            [node.env(u)["GatewayAddress"] for u in uuids[:2]], ["[fd00::5]:7000", "[fd00::5]:7002"]
        )
        self.assertEqual(self.record(uuids[2])["state"], "Queued")
        # The first gateway dies before its container runs: unlocked, its port free again.
        await node.gateway(uuids[0]).end(exit_code=1)
        self.assertEqual(self.record(uuids[0])["state"], "Queued")
        node.busy_ports.clear()
        await node.poll()
        self.assertEqual(node.dispatcher.ports[uuids[2]], 7001)

    def test_gateway_ends(self) -> defer.Deferred[None]:
        """A gateway dead before Running: unlocked for anyone; after: Cancelled, with why."""
        return defer.ensureDeferred(self._gateway_ends())

    async def _gateway_ends(self) -> None:
        early, late = self.queue(priority=2), self.queue(priority=1)
        node = Node(self, self.token_a)
        await node.start()
        await node.poll()
        await self.running(node, late)
        await node.gateway(early).end(exit_code=1)
        await node.gateway(late).end(signal=9)
        self.assertEqual(self.record(early)["state"], "Queued")
        self.assertEqual(self.record(early)["lock_count"], 1)
        self.assertEqual(self.record(late)["state"], "Cancelled")
        self.assertIn("its gateway ended (signal 9)", self.record(late)["runtime_status"]["error"])
        self.assertEqual(sorted(node.cleaned), sorted([early, late]))
        # Arvados retries the request with a new container, without published_ports (they
        # stay on the request): this node still takes it.
        [retry] = [u for u in self.fake.containers if u not in (early, late)]
        self.assertEqual(self.record(retry)["published_ports"], {})
        await node.poll()
        self.assertEqual(
            sorted(uuid_in(argv) for p, argv in node.spawned if not p.ended), sorted([early, retry])
        )

    def test_unsuitable(self) -> defer.Deferred[None]:
        """Mounts a node cannot provide: left alone by default, cancelled saying why if asked."""
        return defer.ensureDeferred(self._unsuitable())

    async def _unsuitable(self) -> None:
        keep = {**TMP, "/in": {"kind": "collection", "portable_data_hash": "abc+1"}}
        left, refused = self.queue(mounts=keep, priority=2), self.queue(mounts=keep)
        leaving = Node(self, self.token_a)
        await leaving.start()
        await leaving.poll()
        self.assertEqual(leaving.spawned, [])
        self.assertEqual(self.record(left)["lock_count"], 0)
        self.fake.containers[left]["priority"] = 0  # out of the way of the next node
        cancelling = Node(self, self.token_b, NodeDispatcherConfig(unsuitable=CANCEL))
        await cancelling.start()
        await cancelling.poll()
        self.assertEqual(cancelling.spawned, [])
        self.assertEqual(self.record(refused)["state"], "Cancelled")
        self.assertIn(
            "cannot provide mounts of kind collection (/in)",
            self.record(refused)["runtime_status"]["error"],
        )

    def test_priority_zero_stops_gateway(self) -> defer.Deferred[None]:
        """A held container whose priority fell to 0 has its gateway stopped (SIGTERM)."""
        return defer.ensureDeferred(self._priority_zero_stops_gateway())

    async def _priority_zero_stops_gateway(self) -> None:
        uuid = self.queue()
        node = Node(self, self.token_a)
        await node.start()
        await node.poll()
        await self.running(node, uuid)
        [request] = [
            r for r in self.fake.container_requests.values() if r["container_uuid"] == uuid
        ]
        request["priority"] = 0
        self.fake._update_priority(uuid)
        await node.poll()
        await node.poll()
        self.assertEqual(node.gateway(uuid).signals, ["TERM"])
        # One held with no gateway (a restart) and priority 0 goes back to the queue.
        other = self.queue()
        await node.api.lock(other)
        [request] = [
            r for r in self.fake.container_requests.values() if r["container_uuid"] == other
        ]
        request["priority"] = 0
        self.fake._update_priority(other)
        await node.poll()
        self.assertEqual(self.record(other)["state"], "Queued")
        self.assertNotIn(other, [uuid_in(argv) for _, argv in node.spawned])

    def test_restart_settles_what_it_holds(self) -> defer.Deferred[None]:
        """A restarted node finds its containers by locked_by_uuid and settles each."""
        return defer.ensureDeferred(self._restart_settles_what_it_holds())

    async def _restart_settles_what_it_holds(self) -> None:
        locked, attached, gone, finished, served = (self.queue() for _ in range(5))
        before = Node(self, self.token_a)
        await before.start()
        await before.poll()
        for uuid in (attached, gone, finished, served):
            await self.running(before, uuid)
        others = self.queue()
        other = Node(self, self.token_b)
        await other.start()
        await other.poll()
        # The node dispatcher dies; a new one starts with the same token.
        after = Node(self, self.token_a)
        after.inventory.found = {
            attached: Found("docker-1", running=True),
            finished: Found("docker-2", running=False, exit_code=3),
        }
        after.running_gateways.add(served)
        await after.start()
        started = {uuid_in(argv): argv for _, argv in after.spawned}
        self.assertEqual(set(started), {locked, attached})
        self.assertEqual(started[attached][-3:], ["--docker-container", "docker-1", "--adopt"])
        self.assertNotIn("--docker-container", started[locked])
        self.assertEqual(self.record(gone)["state"], "Cancelled")
        self.assertEqual(self.record(finished)["state"], "Complete")
        self.assertEqual(self.record(finished)["exit_code"], 3)
        self.assertEqual(self.record(served)["state"], "Running")
        self.assertEqual(after.dispatcher.orphans, {served})
        self.assertEqual(self.record(others)["locked_by_uuid"], self.uuid_of(self.token_b))
        self.assertEqual(self.record(others)["state"], "Locked")

    def test_bad_token_stops(self) -> defer.Deferred[None]:
        """A token the API refuses stops the node dispatcher at start, saying so."""
        return defer.ensureDeferred(self._bad_token_stops())

    async def _bad_token_stops(self) -> None:
        node = Node(self, "v2/zzzzz-gj3su-00000000000000x/nope")
        await node.start()
        [message] = node.fatal
        self.assertIn("does not accept this node dispatcher's token", message)
        self.assertNotIn("nope", message)
        await node.poll()
        self.assertEqual(node.spawned, [])


class HelperTests(unittest.TestCase):
    """Small parts of the node dispatcher."""

    def test_api_host(self) -> None:
        """ARVADOS_API_HOST is the controller's host:port, the port made explicit."""
        for url, host in (
            ("https://zzzzz.example.com", "zzzzz.example.com:443"),
            ("https://zzzzz.example.com:8443/", "zzzzz.example.com:8443"),
            ("https://[fd00::1]:444", "[fd00::1]:444"),
        ):
            self.assertEqual(api_host(url), host)

    def test_inventory_keeps_to_this_node(self) -> defer.Deferred[None]:
        """Leftovers are only the containers whose output this node kept."""
        inner = FakeInventory()
        inner.found = {"a": Found("1", False, 0), "b": Found("2", False, 0)}
        d = NodeInventory(inner, lambda uuid: uuid == "a").leftovers()
        d.addCallback(self.assertEqual, {"a": Found("1", False, 0)})
        return d
