"""
The fake Arvados API's permission rules (L{arvproxy.fakearvados_permissions}): the graph the API
server materializes, C{User#can?} on it, and the C{computed_permissions} list, as the Rails
server has them (C{db/structure.sql}, C{PERM_QUERY_TEMPLATE}, C{app/models/user.rb}).
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI
from arvproxy.fakearvados_permissions import graph_edges, materialized

reactor: Any = _reactor
ROOT_TOKEN = "RootTokenForFakePermissionTests00000000000000"


class Scene:
    """Users, projects, a role group and container requests in one fake cluster."""

    def __init__(self) -> None:
        api = self.api = FakeArvadosAPI("zzzzz", ROOT_TOKEN)
        self.alice = api.add_user("Alice")
        self.project = api.add_project(self.alice, "P")
        self.inner = api.add_project(self.project, "P/inner")
        self.cr = api.add_container_request(self.project)
        self.inner_cr = api.add_container_request(self.inner)
        self.own_cr = api.add_container_request(self.alice)
        self.users: dict[str, str] = {}
        for name in (
            "stranger project_reader project_writer cr_writer cr_reader member "
            "weak_member user_writer user_manager admin"
        ).split():
            self.users[name] = api.add_user(name, is_admin=name == "admin")
        u = self.users
        api.grant(u["project_reader"], self.project, "can_read")
        api.grant(u["project_writer"], self.project, "can_write")
        api.grant(u["cr_writer"], self.cr, "can_write")
        api.grant(u["cr_reader"], self.cr, "can_read")
        team = api.add_role_group("team")
        api.grant(u["member"], team, "can_write")
        api.grant(team, self.project, "can_write")
        readers = api.add_role_group("readers")
        api.grant(u["weak_member"], readers, "can_read")
        api.grant(readers, self.project, "can_manage")
        api.grant(u["user_writer"], self.alice, "can_write")
        api.grant(u["user_manager"], self.alice, "can_manage")


class GraphTests(unittest.SynchronousTestCase):
    def test_levels(self) -> None:
        """Each path of the permission graph gives the level Arvados gives, and no more."""
        s = Scene()
        u = s.users
        table = [
            # (who, record, level)
            (s.alice, s.cr, "can_manage"),
            (s.alice, s.inner_cr, "can_manage"),
            (s.alice, s.own_cr, "can_manage"),
            (u["stranger"], s.cr, None),
            (u["project_reader"], s.cr, "can_read"),
            (u["project_writer"], s.cr, "can_write"),
            (u["project_writer"], s.inner_cr, "can_write"),
            (u["project_writer"], s.own_cr, None),
            # A link on the request itself counts for that request only.
            (u["cr_writer"], s.cr, "can_write"),
            (u["cr_writer"], s.inner_cr, None),
            (u["cr_reader"], s.cr, "can_read"),
            # Through a role group: the weakest link of the path.
            (u["member"], s.cr, "can_write"),
            (u["member"], s.inner_cr, "can_write"),
            (u["weak_member"], s.cr, "can_read"),
            # On a user: only can_manage reaches what the user owns.
            (u["user_writer"], s.own_cr, None),
            (u["user_writer"], s.alice, "can_write"),
            (u["user_manager"], s.own_cr, "can_manage"),
            (u["user_manager"], s.cr, "can_manage"),
            (u["admin"], s.cr, "can_manage"),
        ]
        got = [(who, record, s.api.level(who, record)) for who, record, _ in table]
        self.assertEqual(got, table)

    def test_materialized_rows(self) -> None:
        """A user's rows: their own projects traverse; a user they may only write does not."""
        s = Scene()
        edges = graph_edges(s.api.users.values(), s.api.groups.values(), s.api.links)
        alice = materialized(s.alice, edges)
        self.assertEqual(alice[s.alice], (3, True))
        self.assertEqual(alice[s.project], (3, True))
        self.assertEqual(alice[s.inner], (3, True))
        writer = materialized(s.users["user_writer"], edges)
        self.assertEqual(writer[s.alice], (2, False))
        self.assertNotIn(s.project, writer)
        weak = materialized(s.users["weak_member"], edges)
        self.assertEqual(weak[s.project], (1, True))


class ComputedPermissionsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.scene = Scene()
        self.server = FakeAPIServer(reactor, self.scene.api)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    async def list(self, token: str, **params: Any) -> tuple[int, Any]:
        args = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
        response = await treq.get(
            self.server.url + "/arvados/v1/computed_permissions",
            params=args,
            headers=Headers({b"Authorization": [f"Bearer {token}".encode()]}),
            pool=self.pool,
        )
        return response.code, json.loads(await response.content())

    def test_rows(self) -> defer.Deferred[None]:
        """An admin lists a user's rows for some targets: user, target and level, nothing else."""
        s = self.scene

        async def run() -> None:
            writer = s.users["member"]
            code, body = await self.list(
                ROOT_TOKEN,
                filters=[["user_uuid", "=", writer], ["target_uuid", "in", [s.project, s.cr]]],
                count="none",
            )
            self.assertEqual(code, 200, body)
            self.assertEqual(body["kind"], "arvados#computedPermissionList")
            self.assertEqual(
                body["items"],
                [{"user_uuid": writer, "target_uuid": s.project, "perm_level": "can_write"}],
            )
            code, body = await self.list(
                ROOT_TOKEN,
                filters=[["user_uuid", "=", s.users["cr_writer"]], ["target_uuid", "=", s.cr]],
                select=["target_uuid", "perm_level"],
            )
            self.assertEqual(body["items"], [{"target_uuid": s.cr, "perm_level": "can_write"}])

        return defer.ensureDeferred(run())

    def test_refusals(self) -> defer.Deferred[None]:
        """Non-admins get 403; other attributes, text operators, counts and offsets get 422."""
        s = self.scene
        own = s.api.add_token(s.users["member"])
        admin = s.api.add_token(s.users["admin"])
        table: list[tuple[str, dict[str, Any], int]] = [
            (own, {}, 403),
            (admin, {}, 200),
            (admin, {"filters": [["perm_level", "=", "can_write"]]}, 422),
            (admin, {"filters": [["user_uuid", "like", "zzzzz-%"]]}, 422),
            (admin, {"count": "exact"}, 422),
            (admin, {"offset": "5"}, 422),
            (admin, {"select": ["traverse_owned"]}, 422),
        ]

        async def run() -> None:
            got = [(await self.list(token, **params))[0] for token, params, _ in table]
            self.assertEqual(got, [status for _, _, status in table])

        return defer.ensureDeferred(run())
