"""
The L{ICluster} contract, run against every backend: the embedded registry, the in-memory
L{FakeCluster}, and the Arvados API backend talking to the fake Arvados API over loopback HTTP.
The same questions must get the same answers from all of them.

Each backend gets a harness that sets the same scene its own way (on Arvados, a container request
shared with someone lives in its own project, and the project is what is shared, as on a real
cluster).  The access questions are asked the way the controller asks them (L{decide}).

Where the backends differ on purpose, the difference is tested in the backend's own tests, not
here.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from arvproxy import permissions
from arvproxy.backends import (
    CAN_MANAGE,
    CAN_READ,
    CAN_WRITE,
    COMPLETE,
    CONTAINER_REQUEST_INFIX,
    LOCKED,
    RUNNING,
    ICluster,
    uuid_infix,
)
from arvproxy.backends.arvados import ArvadosCluster
from arvproxy.backends.embedded import EmbeddedRegistry
from arvproxy.backends.registry import RegistryStore
from arvproxy.errors import NotFound, ProxyError, Unauthorized
from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI
from arvproxy.policy import connect_scope

try:
    from arvproxy.testing import FakeCluster
except ImportError:  # pragma: no cover - the fake is being written alongside
    FakeCluster = None  # type: ignore[assignment,misc]

reactor: Any = _reactor
T0 = 1_700_000_000.0
ROOT_TOKEN = "RootTokenForContractTests0000000000000000000000"
GATEWAY = "127.0.0.1:4444"


async def decide(cluster: Any, token: str, uuid: str, port: int) -> str:
    """
    Ask the controller's questions, in its order, and say what it would do: C{"ok"} or the name
    of the L{ProxyError} the person would see.
    """
    try:
        credentials = await cluster.authenticate(token)
        if uuid_infix(uuid) == CONTAINER_REQUEST_INFIX:
            cr = await cluster.get_container_request(uuid)
            container = await cluster.get_container(cr.container_uuid)
            requests = [cr]
        else:
            container = await cluster.get_container(uuid)
            requests = list(await cluster.container_requests_for(uuid))
        permissions.check_scope(credentials, {uuid, container.uuid}, port)
        levels = {}
        if not credentials.is_admin:
            for cr in requests:
                levels[cr.uuid] = await cluster.permission_level(
                    credentials.user_uuid, cr.uuid, credentials=credentials
                )
        permissions.check_access(credentials, uuid, requests, levels)
        permissions.check_running(container)
    except ProxyError as e:
        return type(e).__name__
    return "ok"


class Harness:
    """Sets a scene in one backend.  Subclasses implement each step their backend's way."""

    cluster: Any
    clock: Clock

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def user(self, name: str, admin: bool = False) -> str:
        raise NotImplementedError

    def deactivate(self, user: str) -> None:
        raise NotImplementedError

    def token(self, user: str, scopes: Iterable[str] = ("all",), ttl: float | None = None) -> str:
        raise NotImplementedError

    def revoke(self, token: str) -> None:
        raise NotImplementedError

    def container(self, state: str = RUNNING, gateway_address: str = GATEWAY) -> str:
        """A container with no request yet."""
        raise NotImplementedError

    def request(self, owner: str, container: str) -> str:
        """A container request by C{owner} (owner and submitter) that uses C{container}."""
        raise NotImplementedError

    def share(self, user: str, request: str, level: str) -> None:
        """Give C{user} C{level} on C{request} (and on nothing else)."""
        raise NotImplementedError


class FakeClusterHarness(Harness):
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.cluster = FakeCluster(system_root_token=ROOT_TOKEN, clock=self.clock.seconds)

    def user(self, name: str, admin: bool = False) -> str:
        return str(self.cluster.add_user(name, is_admin=admin).uuid)

    def deactivate(self, user: str) -> None:
        self.cluster.set_user_active(user, False)

    def token(self, user: str, scopes: Iterable[str] = ("all",), ttl: float | None = None) -> str:
        return str(self.cluster.add_token(user, scopes, ttl))

    def revoke(self, token: str) -> None:
        self.cluster.revoke_token(token)

    def container(self, state: str = RUNNING, gateway_address: str = GATEWAY) -> str:
        return str(self.cluster.add_container(state=state, gateway_address=gateway_address).uuid)

    def request(self, owner: str, container: str) -> str:
        return str(self.cluster.add_container_request(owner, container).uuid)

    def share(self, user: str, request: str, level: str) -> None:
        self.cluster.grant(user, request, level)


class RegistryHarness(Harness):
    def __init__(self, directory: str) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        os.makedirs(directory)
        self.path = os.path.join(directory, "registry.sqlite")
        self.store = RegistryStore(
            self.path, "zzzzz", self.clock.seconds, system_root_token=ROOT_TOKEN
        )
        self.cluster = EmbeddedRegistry(reactor, self.store)
        self._spare: list[str] = []

    async def start(self) -> None:
        self.cluster.start()

    async def stop(self) -> None:
        self.cluster.stop()
        self.store.close()

    def _sql(self, statement: str, *args: Any) -> None:
        conn = sqlite3.connect(self.path)
        try:
            with conn:
                conn.execute(statement, args)
        finally:
            conn.close()

    def user(self, name: str, admin: bool = False) -> str:
        return self.store.create_user(name, is_admin=admin).uuid

    def deactivate(self, user: str) -> None:
        self.store.set_user_active(user, False)

    def token(self, user: str, scopes: Iterable[str] = ("all",), ttl: float | None = None) -> str:
        return self.store.create_token(user, tuple(scopes), ttl)[0]

    def revoke(self, token: str) -> None:
        self.store.revoke_token(token)

    def container(self, state: str = RUNNING, gateway_address: str = GATEWAY) -> str:
        # The registry makes containers with their requests: make one with a throw-away
        # request, and drop the request.
        owner = self.store.create_user("container maker")
        cr = self.store.create_container_request(owner.uuid)
        assert cr.container_uuid is not None
        self._sql("DELETE FROM container_requests WHERE uuid = ?", cr.uuid)
        self._sql(
            "UPDATE containers SET state = ?, gateway_address = ? WHERE uuid = ?",
            state,
            gateway_address,
            cr.container_uuid,
        )
        return cr.container_uuid

    def request(self, owner: str, container: str) -> str:
        cr = self.store.create_container_request(owner)
        self._sql(
            "UPDATE container_requests SET container_uuid = ? WHERE uuid = ?", container, cr.uuid
        )
        self._sql("DELETE FROM containers WHERE uuid = ?", cr.container_uuid)
        self.clock.advance(1)  # distinct created_at, so the order is the order of creation
        return cr.uuid

    def share(self, user: str, request: str, level: str) -> None:
        self.store.grant_permission(user, request, level)


class ArvadosHarness(Harness):
    """The Arvados backend, over loopback HTTP, against the fake API server."""

    def __init__(self, **backend: Any) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.api = FakeArvadosAPI("zzzzz", ROOT_TOKEN, clock=self.clock.seconds)
        self.server = FakeAPIServer(reactor, self.api)
        self._backend = backend
        self._projects: dict[str, str] = {}

    async def start(self) -> None:
        self.server.start()
        self.cluster = ArvadosCluster(
            reactor,
            self.server.url,
            ROOT_TOKEN,
            cluster_id="zzzzz",
            clock=self.clock,
            **self._backend,
        )
        self.cluster.startService()

    async def stop(self) -> None:
        await self.cluster.stopService()
        await self.server.stop()

    def user(self, name: str, admin: bool = False) -> str:
        return self.api.add_user(name, is_admin=admin)

    def deactivate(self, user: str) -> None:
        self.api.users[user]["is_active"] = False

    def token(self, user: str, scopes: Iterable[str] = ("all",), ttl: float | None = None) -> str:
        expires = None if ttl is None else self.clock.seconds() + ttl
        return self.api.add_token(user, scopes, expires)

    def revoke(self, token: str) -> None:
        self.api.revoke(token)

    def container(self, state: str = RUNNING, gateway_address: str = GATEWAY) -> str:
        return self.api.add_container(state=state, gateway_address=gateway_address)

    def request(self, owner: str, container: str) -> str:
        # Each request in a project of its own, so sharing the project shares just the request.
        project = self.api.add_project(owner)
        uuid = self.api.add_container_request(project, container, modified_by_user_uuid=owner)
        self._projects[uuid] = project
        self.clock.advance(1)
        return uuid

    def share(self, user: str, request: str, level: str) -> None:
        self.api.grant(user, self._projects[request], level)


if TYPE_CHECKING:
    _Mixin = unittest.TestCase
else:
    _Mixin = object


class ClusterContract(_Mixin):
    """The contract tests.  Mix into a TestCase with C{make_harness}."""

    def make_harness(self) -> Harness:
        raise NotImplementedError

    def setUp(self) -> Any:
        self.h = self.make_harness()
        self.addCleanup(lambda: defer.ensureDeferred(self.h.stop()))
        return defer.ensureDeferred(self.h.start())

    def scene(self) -> None:
        """Alice's request on container X; Alice's and Bob's requests on container Y; shares."""
        h = self.h
        self.alice, self.bob = h.user("Alice"), h.user("Bob")
        self.admin = h.user("Admin", admin=True)
        self.reader, self.writer, self.manager, self.both = (
            h.user("Reader"),
            h.user("Writer"),
            h.user("Manager"),
            h.user("Both"),
        )
        self.x = h.container()
        self.cr_x = h.request(self.alice, self.x)
        self.y = h.container()
        self.cr_y_alice = h.request(self.alice, self.y)
        self.cr_y_bob = h.request(self.bob, self.y)
        h.share(self.reader, self.cr_x, CAN_READ)
        h.share(self.writer, self.cr_x, CAN_WRITE)
        h.share(self.manager, self.cr_x, CAN_MANAGE)
        h.share(self.both, self.cr_y_alice, CAN_WRITE)
        h.share(self.both, self.cr_y_bob, CAN_WRITE)

    def check(self, expectations: list[tuple[str, str, str, int, str]]) -> Any:
        """Each row: (who, their token, target, port, expected decision)."""

        async def run() -> None:
            got = [
                (who, target, await decide(self.h.cluster, token, target, port))
                for who, token, target, port, _ in expectations
            ]
            self.assertEqual(got, [(who, target, want) for who, _, target, _, want in expectations])

        return defer.ensureDeferred(run())

    # -- tokens -----------------------------------------------------------------------------

    def test_provides_icluster(self) -> None:
        """The backend provides ICluster."""
        verifyObject(ICluster, self.h.cluster)

    async def _credentials(self, token: str) -> Any:
        return await self.h.cluster.authenticate(token)

    def test_authenticate(self) -> Any:
        """A valid token proves its user, not an admin, with its scopes and no expiry."""
        user = self.h.user("U")
        token = self.h.token(user)

        async def run() -> None:
            c = await self._credentials(token)
            self.assertEqual(
                (c.user_uuid, c.is_admin, c.scopes, c.expires_at), (user, False, ("all",), None)
            )
            self.assertEqual(c.token_uuid, token.split("/")[1])

        return defer.ensureDeferred(run())

    def test_authenticate_admin_and_scoped(self) -> Any:
        """An admin's token says so; a scoped token keeps its scopes."""
        admin = self.h.user("A", admin=True)
        scope = connect_scope("zzzzz-xvhdp-000000000000001", 8888)
        admin_token = self.h.token(admin)
        scoped = self.h.token(admin, [scope])

        async def run() -> None:
            self.assertTrue((await self._credentials(admin_token)).is_admin)
            self.assertEqual((await self._credentials(scoped)).scopes, (scope,))

        return defer.ensureDeferred(run())

    def test_root_token(self) -> Any:
        """The SystemRootToken proves the system user, an admin, with no token UUID."""

        async def run() -> None:
            c = await self._credentials(ROOT_TOKEN)
            self.assertEqual(
                (c.token_uuid, c.user_uuid, c.is_admin, c.scopes),
                (None, "zzzzz-tpzed-000000000000000", True, ("all",)),
            )

        return defer.ensureDeferred(run())

    def test_bad_tokens(self) -> Any:
        """Unknown, wrong-secret, malformed, revoked and inactive users' tokens are Unauthorized."""
        user = self.h.user("U")
        good = self.h.token(user)
        revoked = self.h.token(user)
        self.h.revoke(revoked)
        inactive_user = self.h.user("I")
        inactive = self.h.token(inactive_user)
        self.h.deactivate(inactive_user)
        bad = [
            "v2/zzzzz-gj3su-000000000000999/nosuchsecret",
            good[:-3] + "xyz",
            "v2/nonsense",
            "",
            revoked,
            inactive,
        ]

        async def run() -> None:
            for token in bad:
                with self.assertRaises(Unauthorized):
                    await self._credentials(token)

        return defer.ensureDeferred(run())

    def test_expired_token(self) -> Any:
        """A token works until its expiry time and not after, by the injected clock."""
        user = self.h.user("U")
        token = self.h.token(user, ttl=60)

        async def run() -> None:
            c = await self._credentials(token)
            self.assertIsNotNone(c.expires_at)
            self.assertEqual(c.expires_at.timestamp(), T0 + 60)
            self.h.clock.advance(61)
            with self.assertRaises(Unauthorized):
                await self._credentials(token)

        return defer.ensureDeferred(run())

    # -- records ----------------------------------------------------------------------------

    def test_records(self) -> Any:
        """Requests and containers read back by UUID; unknown UUIDs are NotFound."""
        self.scene()

        async def run() -> None:
            cluster = self.h.cluster
            cr = await cluster.get_container_request(self.cr_x)
            self.assertEqual(
                (cr.uuid, cr.container_uuid, cr.modified_by_user_uuid),
                (self.cr_x, self.x, self.alice),
            )
            container = await cluster.get_container(self.x)
            self.assertEqual(
                (container.uuid, container.state, container.gateway_address),
                (self.x, RUNNING, GATEWAY),
            )
            for get, uuid in [
                (cluster.get_container_request, "zzzzz-xvhdp-000000000000999"),
                (cluster.get_container, "zzzzz-dz642-000000000000999"),
            ]:
                with self.assertRaises(NotFound):
                    await get(uuid)

        return defer.ensureDeferred(run())

    def test_requests_for_container(self) -> Any:
        """A container's requests come back oldest first, from every user; none is an empty list."""
        self.scene()

        async def run() -> None:
            cluster = self.h.cluster
            y = await cluster.container_requests_for(self.y)
            self.assertEqual([cr.uuid for cr in y], [self.cr_y_alice, self.cr_y_bob])
            x = await cluster.container_requests_for(self.x)
            self.assertEqual([cr.uuid for cr in x], [self.cr_x])
            self.assertEqual(await cluster.container_requests_for(self.h.container()), [])

        return defer.ensureDeferred(run())

    def test_permission_levels(self) -> Any:
        """Ownership is can_manage; shares give their level; strangers get None."""
        self.scene()
        who = [
            (self.alice, CAN_MANAGE),
            (self.reader, CAN_READ),
            (self.writer, CAN_WRITE),
            (self.manager, CAN_MANAGE),
            (self.bob, None),
        ]
        tokens = {user: self.h.token(user) for user, _ in who}

        async def run() -> None:
            got = []
            for user, _ in who:
                credentials = await self.h.cluster.authenticate(tokens[user])
                got.append(
                    await self.h.cluster.permission_level(user, self.cr_x, credentials=credentials)
                )
            self.assertEqual(got, [level for _, level in who])

        return defer.ensureDeferred(run())

    # -- decisions, as the controller makes them ----------------------------------------------

    def test_access_with_full_tokens(self) -> Any:
        """Owners, writers, managers and admins connect; readers may not; strangers see nothing."""
        self.scene()
        t = {
            u: self.h.token(u)
            for u in (self.alice, self.bob, self.admin, self.reader, self.writer, self.manager)
        }
        return self.check(
            [
                ("alice", t[self.alice], self.cr_x, 8888, "ok"),
                ("alice", t[self.alice], self.x, 8888, "ok"),
                ("bob", t[self.bob], self.cr_x, 8888, "NotFound"),
                ("bob", t[self.bob], self.x, 8888, "NotFound"),
                ("reader", t[self.reader], self.cr_x, 8888, "Forbidden"),
                ("writer", t[self.writer], self.cr_x, 8888, "ok"),
                ("writer", t[self.writer], self.x, 8888, "ok"),
                ("manager", t[self.manager], self.cr_x, 8888, "ok"),
                ("admin", t[self.admin], self.cr_x, 8888, "ok"),
                ("admin", t[self.admin], self.y, 8888, "ok"),
                ("root", ROOT_TOKEN, self.y, 8888, "ok"),
                ("bogus", "v2/zzzzz-gj3su-000000000000999/x", self.cr_x, 8888, "Unauthorized"),
            ]
        )

    def test_container_of_two_users(self) -> Any:
        """A container used by two users' requests: each gets in only through their own request."""
        self.scene()
        t = {u: self.h.token(u) for u in (self.alice, self.bob, self.both)}
        return self.check(
            [
                ("alice", t[self.alice], self.y, 8888, "Forbidden"),
                ("alice", t[self.alice], self.cr_y_alice, 8888, "ok"),
                ("bob", t[self.bob], self.y, 8888, "Forbidden"),
                ("bob", t[self.bob], self.cr_y_bob, 8888, "ok"),
                ("alice", t[self.alice], self.cr_y_bob, 8888, "NotFound"),
                ("both", t[self.both], self.y, 8888, "ok"),
            ]
        )

    def test_scoped_tokens(self) -> Any:
        """A CONNECT-scoped token reaches exactly its target and port, and only its owner's."""
        self.scene()
        alice_cr = self.h.token(self.alice, [connect_scope(self.cr_x, 8888)])
        alice_x = self.h.token(self.alice, [connect_scope(self.x, 8888)])
        bob_cr = self.h.token(self.bob, [connect_scope(self.cr_x, 8888)])
        return self.check(
            [
                ("alice", alice_cr, self.cr_x, 8888, "ok"),
                ("alice", alice_cr, self.cr_x, 9999, "Forbidden"),
                ("alice", alice_x, self.x, 8888, "ok"),
                ("alice", alice_x, self.cr_x, 8888, "ok"),
                ("bob", bob_cr, self.cr_x, 8888, "NotFound"),
            ]
        )

    def test_container_states(self) -> Any:
        """Not yet running is Unavailable; finished is Gone, once access is granted."""
        alice = self.h.user("Alice")
        token = self.h.token(alice)
        queued = self.h.request(alice, self.h.container(state="Queued", gateway_address=""))
        done = self.h.request(alice, self.h.container(state=COMPLETE))
        return self.check(
            [
                ("alice", token, queued, 8888, "Unavailable"),
                ("alice", token, done, 8888, "Gone"),
            ]
        )

    # -- updates ------------------------------------------------------------------------------

    def test_update_container(self) -> Any:
        """Running sets started_at, a final state sets finished_at and is final; bad fields fail."""
        alice = self.h.user("Alice")
        container = self.h.container(state=LOCKED, gateway_address="")
        cr = self.h.request(alice, container)

        async def run() -> None:
            cluster = self.h.cluster
            running = await cluster.update_container(
                container, state=RUNNING, gateway_address=GATEWAY
            )
            self.assertEqual((running.state, running.gateway_address), (RUNNING, GATEWAY))
            self.assertIsNotNone(running.started_at)
            self.assertEqual((await cluster.get_container(container)).state, RUNNING)
            done = await cluster.update_container(container, state=COMPLETE, exit_code=0)
            self.assertEqual((done.state, done.exit_code), (COMPLETE, 0))
            self.assertIsNotNone(done.finished_at)
            self.assertEqual((await cluster.get_container_request(cr)).state, "Final")
            with self.assertRaises(ValueError):
                await cluster.update_container(container, state=RUNNING)
            with self.assertRaises(ValueError):
                await cluster.update_container(container, owner_uuid=alice)
            with self.assertRaises(NotFound):
                await cluster.update_container("zzzzz-dz642-000000000000999", state=RUNNING)

        return defer.ensureDeferred(run())


class RegistryContractTests(ClusterContract, unittest.TestCase):
    def make_harness(self) -> Harness:
        return RegistryHarness(self.mktemp())


class ArvadosContractTests(ClusterContract, unittest.TestCase):
    def make_harness(self) -> Harness:
        return ArvadosHarness()


class UncachedArvadosContractTests(ClusterContract, unittest.TestCase):
    """The same, with the cache off: the answers must not depend on it."""

    def make_harness(self) -> Harness:
        return ArvadosHarness(cache_ttl=0, failure_ttl=0)


if FakeCluster is not None:

    class FakeClusterContractTests(ClusterContract, unittest.TestCase):
        def make_harness(self) -> Harness:
            return FakeClusterHarness()
