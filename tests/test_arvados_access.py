"""
Who may connect on an Arvados cluster (L{arvproxy.backends.arvados_access}, the README's
permission rule): the pure rule, then the attacks, through the real front door
(L{arvproxy.controller.proxy.Controller} on loopback) with the Arvados backend asking the fake
API server: every way of holding write permission on a container request opens its ports, with a
full token and with a token scoped to the port alike, and nothing else does.
"""

from __future__ import annotations

from typing import Any, cast

import treq
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.backends import CAN_MANAGE, CAN_READ, CAN_WRITE, RUNNING
from arvproxy.backends.arvados import ArvadosCluster
from arvproxy.backends.arvados_access import acting_users, best_level, request_level
from arvproxy.config import ClusterConfig, ExternalURL
from arvproxy.controller.proxy import Controller
from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI, OpenConnections
from arvproxy.httpserver import ProxySite
from arvproxy.testing import FakeGatewayConnector, FakeResponse

reactor: Any = _reactor
T0 = 1_700_000_000.0
TTL = 10.0
ROOT_TOKEN = "RootTokenForAccessTests000000000000000000000"
SUFFIX = "containers.example.com"
GATEWAY = "127.0.0.1:4444"
PORT = 8888

USER = "zzzzz-tpzed-000000000000001"
OTHER = "zzzzz-tpzed-000000000000002"
PROJECT = "zzzzz-j7d0g-000000000000001"
REQUEST = "zzzzz-xvhdp-000000000000001"


class RuleTests(unittest.SynchronousTestCase):
    def test_request_level(self) -> None:
        """The level from the user's rows on the request and on its owner, as can? reads them."""
        table: list[tuple[str, str, dict[str, str], str | None]] = [
            ("owner is the user", USER, {}, CAN_MANAGE),
            ("no rows", PROJECT, {}, None),
            ("project shared to write", PROJECT, {PROJECT: CAN_WRITE}, CAN_WRITE),
            ("project shared to read", PROJECT, {PROJECT: CAN_READ}, CAN_READ),
            ("link on the request", PROJECT, {REQUEST: CAN_WRITE}, CAN_WRITE),
            ("the stronger of two", PROJECT, {REQUEST: CAN_MANAGE, PROJECT: CAN_READ}, CAN_MANAGE),
            ("write on the owning user", OTHER, {OTHER: CAN_WRITE}, None),
            ("manage on the owning user", OTHER, {OTHER: CAN_MANAGE}, CAN_MANAGE),
            ("unknown level", PROJECT, {PROJECT: "none"}, None),
            ("owner not a uuid", "nonsense", {"nonsense": CAN_MANAGE}, None),
        ]
        got = [(name, request_level(USER, REQUEST, owner, rows)) for name, owner, rows, _ in table]
        self.assertEqual(got, [(name, want) for name, _, _, want in table])

    def test_acting_users(self) -> None:
        """A user acts as themselves and as each user of whose account they hold can_manage."""
        rows = {USER: CAN_MANAGE, OTHER: CAN_MANAGE, "zzzzz-tpzed-000000000000003": CAN_WRITE}
        self.assertEqual(acting_users(USER, rows), [USER, OTHER])
        self.assertEqual(acting_users(USER, {PROJECT: CAN_MANAGE}), [USER])

    def test_best_level(self) -> None:
        """The strongest level of anyone the user acts as, or None."""
        acting = [USER, OTHER]
        self.assertEqual(best_level(acting, REQUEST, OTHER, {}), CAN_MANAGE)
        self.assertEqual(
            best_level(acting, REQUEST, PROJECT, {OTHER: {PROJECT: CAN_WRITE}}), CAN_WRITE
        )
        self.assertIsNone(best_level([USER], REQUEST, PROJECT, {OTHER: {PROJECT: CAN_WRITE}}))


class FrontDoorTestCase(unittest.TestCase):
    """
    The fake API (over loopback HTTP), the Arvados backend with its cache on C{self.clock}, and
    the real front door on loopback, whose gateway connector answers every request with 200.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.api = FakeArvadosAPI("zzzzz", ROOT_TOKEN, clock=self.clock.seconds)
        self.server = FakeAPIServer(reactor, self.api)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.cluster = ArvadosCluster(
            reactor, self.server.url, ROOT_TOKEN, cluster_id="zzzzz", clock=self.clock
        )
        self.cluster.startService()
        self.addCleanup(self.cluster.stopService)
        self.gateways = FakeGatewayConnector()
        self.gateways.responder = lambda call: FakeResponse(200, b"OK", [], b"from the service")
        config = ClusterConfig(
            source="test",
            cluster_id="zzzzz",
            system_root_token=ROOT_TOKEN,
            external_url=ExternalURL("http", SUFFIX),
        )
        site = ProxySite(
            Controller(reactor, config, self.cluster, cast(Any, self.gateways)), reactor
        )
        connections = OpenConnections(site)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(connections.close_all)
        self.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    def running_request(self, owner: str, **fields: Any) -> tuple[str, str]:
        """A container request in C{owner} whose container is Running with a gateway."""
        container = self.api.add_container(state=RUNNING, gateway_address=GATEWAY)
        return self.api.add_container_request(owner, container, **fields), container

    async def status(self, token: str, target: str, port: int = PORT) -> int:
        """What the front door answers C{token}'s browser for C{target}'s C{port}."""
        cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(token.encode())
        response = await treq.get(
            f"http://127.0.0.1:{self.port.getHost().port}/",
            headers=Headers({b"Host": [f"{target}-{port}.{SUFFIX}".encode()], b"Cookie": [cookie]}),
            pool=self.pool,
        )
        await response.content()
        return int(response.code)

    def scoped(self, user: str, target: str, port: int = PORT) -> str:
        return self.api.add_token(user, [policy.connect_scope(target, port)])


class AttackTests(FrontDoorTestCase):
    def test_every_path_to_write_permission(self) -> defer.Deferred[None]:
        """
        Full and port-scoped tokens get the same answer: 200 for every path to write permission
        on the request (ownership, project, nested project, role group, a link on the request
        itself, can_manage on the owning user), 403 for read only, 404 for no permission.
        """
        api = self.api
        alice = api.add_user("Alice")
        project = api.add_project(alice)
        inner = api.add_project(project)
        cr, container = self.running_request(project)
        inner_cr, _ = self.running_request(inner)
        own_cr, _ = self.running_request(alice)
        # Submitted into Alice's project by someone who has since lost access to it.
        left_cr, _ = self.running_request(project, modified_by_user_uuid=api.add_user("Left"))
        users = {
            name: api.add_user(name)
            for name in (
                "stranger reader writer cr_writer cr_manager cr_reader member weak_member "
                "user_writer user_manager writers_manager"
            ).split()
        }
        admin = api.add_user("Admin", is_admin=True)
        api.grant(users["reader"], project, CAN_READ)
        api.grant(users["writer"], project, CAN_WRITE)
        api.grant(users["cr_writer"], cr, CAN_WRITE)
        api.grant(users["cr_manager"], cr, CAN_MANAGE)
        api.grant(users["cr_reader"], cr, CAN_READ)
        team = api.add_role_group("team")
        api.grant(users["member"], team, CAN_WRITE)
        api.grant(team, project, CAN_WRITE)
        readers = api.add_role_group("readers")
        api.grant(users["weak_member"], readers, CAN_READ)
        api.grant(readers, project, CAN_MANAGE)
        api.grant(users["user_writer"], alice, CAN_WRITE)
        api.grant(users["user_manager"], alice, CAN_MANAGE)
        # Manages the account of a project writer: acts as them (User#can?).
        api.grant(users["writers_manager"], users["writer"], CAN_MANAGE)
        left = api.container_requests[left_cr]["modified_by_user_uuid"]
        table = [
            ("alice", alice, cr, 200),
            ("alice, by container", alice, container, 200),
            ("alice, nested project", alice, inner_cr, 200),
            ("alice, owned by her", alice, own_cr, 200),
            ("project writer", users["writer"], cr, 200),
            ("project writer, nested", users["writer"], inner_cr, 200),
            ("project writer, by container", users["writer"], container, 200),
            ("project reader", users["reader"], cr, 403),
            ("write link on the request", users["cr_writer"], cr, 200),
            ("write link, by container", users["cr_writer"], container, 200),
            ("write link, another request", users["cr_writer"], inner_cr, 404),
            ("manage link on the request", users["cr_manager"], cr, 200),
            ("read link on the request", users["cr_reader"], cr, 403),
            ("role group member", users["member"], cr, 200),
            ("role group member, nested", users["member"], inner_cr, 200),
            ("read-only member of a managing group", users["weak_member"], cr, 403),
            ("can_write on the owning user", users["user_writer"], own_cr, 404),
            ("can_manage on the owning user", users["user_manager"], own_cr, 200),
            ("can_manage on the owning user, her project", users["user_manager"], cr, 200),
            ("manages a project writer's account", users["writers_manager"], cr, 200),
            ("submitter without access", left, left_cr, 404),
            ("stranger", users["stranger"], cr, 404),
            ("stranger, by container", users["stranger"], container, 404),
            ("admin", admin, cr, 200),
        ]

        async def run() -> None:
            got = []
            for name, user, target, _ in table:
                full = await self.status(api.add_token(user), target)
                scoped = await self.status(self.scoped(user, target), target)
                got.append((name, full, scoped))
            self.assertEqual(got, [(name, want, want) for name, _, _, want in table])

        return defer.ensureDeferred(run())

    def test_scope_narrows_never_widens(self) -> defer.Deferred[None]:
        """A scoped token opens only its own target and port, whatever its user may open."""
        alice = self.api.add_user("Alice")
        cr, container = self.running_request(alice)
        other, _ = self.running_request(alice)
        token = self.scoped(alice, cr)

        async def run() -> None:
            self.assertEqual(await self.status(token, cr), 200)
            self.assertEqual(await self.status(token, cr, PORT + 1), 403)
            self.assertEqual(await self.status(token, other), 403)
            self.assertEqual(await self.status(token, container), 403)

        return defer.ensureDeferred(run())

    def test_lost_access(self) -> defer.Deferred[None]:
        """
        When a user loses access (their share is removed), their scoped token stops opening the
        port, as their full token does: within CacheTTL, and not later.
        """
        alice = self.api.add_user("Alice")
        project = self.api.add_project(alice)
        cr, _ = self.running_request(project)
        sharer = self.api.add_user("Sharer")
        link = self.api.grant(sharer, project, CAN_WRITE)
        full, scoped = self.api.add_token(sharer), self.scoped(sharer, cr)

        async def run() -> None:
            self.assertEqual(
                (await self.status(full, cr), await self.status(scoped, cr)), (200, 200)
            )
            self.api.links = [lk for lk in self.api.links if lk["uuid"] != link]
            self.clock.advance(TTL)
            self.assertEqual(
                (await self.status(full, cr), await self.status(scoped, cr)), (404, 404)
            )

        return defer.ensureDeferred(run())
