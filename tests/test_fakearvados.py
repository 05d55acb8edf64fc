"""
The fake Arvados API server (L{arvproxy.fakearvados}) against the rules of the real one, over
loopback HTTP: the container state machine and who may move it (C{container.rb}), C{lock},
C{unlock}, C{auth} and C{current} (C{containers_controller.rb}), lists (C{load_param.rb},
C{record_filters.rb}), and tokens users make for themselves
(C{api_client_authorizations_controller.rb}, C{api_client_authorization.rb}).

Each table row is something a client may try, with the status the real server answers; the
dispatcher's calls are the ones C{sdk/go/dispatch} and C{lib/dispatchcloud} make.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI
from arvproxy.fakearvados_lists import jsonb_contains, like_matcher, parse_time

reactor: Any = _reactor
T0 = 1_700_000_000.0
ROOT = "FakeArvadosTestsRootToken0123456789abcdefghijklmnop"


def run(coroutine: Any) -> defer.Deferred[Any]:
    return defer.ensureDeferred(coroutine)


class FakeAPITestCase(unittest.TestCase):
    """
    A fake API on loopback with a scene: two dispatchers (admins, with their own tokens), Alice
    with a project, and a Queued container that her request (priority 1) asks for.
    """

    def setUp(self) -> Any:
        self.clock = Clock()
        self.clock.advance(T0)
        self.api = FakeArvadosAPI("zzzzz", ROOT, clock=self.clock.seconds)
        self.server = FakeAPIServer(reactor, self.api)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.d1_user = self.api.add_user("Dispatcher One", is_admin=True)
        self.d1 = self.api.add_token(self.d1_user)
        self.d2 = self.api.add_token(self.api.add_user("Dispatcher Two", is_admin=True))
        self.alice = self.api.add_user("Alice")
        self.alice_token = self.api.add_token(self.alice)
        self.stranger = self.api.add_token(self.api.add_user("Stranger"))
        self.project = self.api.add_project(self.alice)
        self.container = self.api.add_container()
        self.cr = self.api.add_container_request(self.project, self.container)

    async def call(
        self,
        method: str,
        path: str,
        token: str | None,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        form: dict[str, Any] | None = None,
    ) -> tuple[int, Any]:
        """One call; C{params} values that are not strings are sent as JSON."""
        headers = Headers()
        if token is not None:
            headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
        query = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (params or {}).items()}
        url = self.server.url + "/arvados/v1/" + path
        if query:
            url += "?" + urlencode(query)
        kwargs: dict[str, Any] = {"headers": headers, "pool": self.pool}
        if body is not None:
            kwargs["json"] = body
        if form is not None:
            kwargs["data"] = {
                k: v if isinstance(v, str) else json.dumps(v) for k, v in form.items()
            }
        response = await treq.request(method, url, **kwargs)
        return response.code, json.loads(await response.content())

    async def update(self, token: str, changes: dict[str, Any], uuid: str = "") -> tuple[int, Any]:
        return await self.call(
            "PUT", f"containers/{uuid or self.container}", token, body={"container": changes}
        )

    async def lock(self, token: str, uuid: str = "") -> tuple[int, Any]:
        return await self.call("POST", f"containers/{uuid or self.container}/lock", token)

    def assertError(self, answer: tuple[int, Any], status: int, text: str = "") -> None:
        """The answer is the server's error: this status, C{errors} and C{error_token}."""
        code, body = answer
        self.assertEqual(code, status, body)
        self.assertEqual(set(body), {"errors", "error_token"})
        self.assertTrue(all(isinstance(e, str) for e in body["errors"]))
        self.assertIn(text, " ".join(body["errors"]))


class LockTests(FakeAPITestCase):
    """POST containers/<uuid>/lock and unlock (Container#lock, #unlock, check_lock/unlock)."""

    def test_lock(self) -> defer.Deferred[None]:
        """A dispatcher locks a Queued container: its token holds the lock; a token is made."""

        async def go() -> None:
            code, body = await self.lock(self.d1)
            self.assertEqual(code, 200, body)
            self.assertEqual(
                set(body), {"uuid", "state", "priority", "auth_uuid", "locked_by_uuid"}
            )
            self.assertEqual(body["state"], "Locked")
            self.assertEqual(body["locked_by_uuid"], self.d1.split("/")[1])
            record = self.api.containers[self.container]
            self.assertEqual((record["lock_count"], record["auth_uuid"]), (1, body["auth_uuid"]))
            # The container's token is its runtime user's, and works while Locked.
            code, current = await self.call(
                "GET", "containers/current", self.api.container_token(self.container)
            )
            self.assertEqual((code, current["uuid"]), (200, self.container))

        return run(go())

    def test_lock_refusals(self) -> defer.Deferred[None]:
        """Locking what is not Queued is 422, at priority 0 422, by a non-admin 403 or 404."""
        zero = self.api.add_container()
        self.api.add_container_request(self.project, zero, priority=0)
        running = self.api.add_container("Running")
        self.api.add_container_request(self.project, running)

        async def go() -> None:
            self.assertEqual((await self.lock(self.d1))[0], 200)
            self.assertError(await self.lock(self.d2), 422, "cannot lock when Locked")
            self.assertError(await self.lock(self.d1), 422, "cannot lock when Locked")
            self.assertError(await self.lock(self.d1, running), 422, "cannot lock when Running")
            self.assertError(await self.lock(self.d1, zero), 422, "cannot lock when priority<=0")
            queued = self.api.add_container()
            self.api.add_container_request(self.project, queued)
            # Alice may read it (her request) but not lock it; a stranger cannot even see it.
            self.assertError(await self.lock(self.alice_token, queued), 403, "PermissionDenied")
            self.assertError(await self.lock(self.stranger, queued), 404, "Path not found")
            self.assertEqual(self.api.containers[queued]["state"], "Queued")

        return run(go())

    def test_unlock(self) -> defer.Deferred[None]:
        """Only the holder unlocks; the container's token dies and its runtime_status clears."""

        async def go() -> None:
            await self.lock(self.d1)
            own = self.api.container_token(self.container)
            self.assertEqual((await self.update(self.d1, {"runtime_status": {"x": "1"}}))[0], 200)
            unlock = f"containers/{self.container}/unlock"
            self.assertError(
                await self.call("POST", unlock, self.d2), 403, "locked by a different token"
            )
            code, body = await self.call("POST", unlock, self.d1)
            self.assertEqual((code, body["state"], body["locked_by_uuid"]), (200, "Queued", None))
            record = self.api.containers[self.container]
            self.assertEqual((record["runtime_status"], record["auth_uuid"]), ({}, None))
            self.assertError(await self.call("GET", "users/current", own), 401, "Not logged in")
            self.assertError(
                await self.call("POST", unlock, self.d1), 422, "cannot unlock when Queued"
            )
            # Another dispatcher may lock it now, and gets a new container token.
            code, body = await self.lock(self.d2)
            self.assertEqual((code, body["locked_by_uuid"]), (200, self.d2.split("/")[1]))
            self.assertNotEqual(self.api.container_token(self.container), own)

        return run(go())

    def test_too_many_dispatch_attempts(self) -> defer.Deferred[None]:
        """An unlock at Containers.MaxDispatchAttempts locks cancels the container instead."""
        self.api.max_dispatch_attempts = 2

        async def go() -> None:
            unlock = f"containers/{self.container}/unlock"
            await self.lock(self.d1)
            self.assertEqual((await self.call("POST", unlock, self.d1))[1]["state"], "Queued")
            await self.lock(self.d1)
            code, body = await self.call("POST", unlock, self.d1)
            self.assertEqual((code, body["state"]), (200, "Cancelled"))
            record = self.api.containers[self.container]
            self.assertIn("MaxDispatchAttempts", record["runtime_status"]["error"])

        return run(go())


class StateMachineTests(FakeAPITestCase):
    """PUT containers/<uuid>: validate_state_change, validate_change, validate_lock."""

    def setUp(self) -> Any:
        super().setUp()
        self.lock_done = run(self.lock(self.d1))
        return self.lock_done

    def test_who_moves_it_to_running(self) -> defer.Deferred[None]:
        """Locked to Running: not by the container's own token nor its user; by the holder."""
        running = {"state": "Running", "gateway_address": "127.0.0.1:4444"}

        async def go() -> None:
            own = self.api.container_token(self.container)
            self.assertError(await self.update(own, running), 403, "PermissionDenied")
            self.assertError(await self.update(self.alice_token, running), 403)
            self.assertError(await self.update(self.stranger, running), 404)
            self.assertEqual(self.api.containers[self.container]["state"], "Locked")
            code, body = await self.update(self.d1, running)
            self.assertEqual((code, body["state"]), (200, "Running"), body)
            self.assertEqual(body["gateway_address"], "127.0.0.1:4444")
            self.assertIsNotNone(body["started_at"])
            self.assertEqual(body["locked_by_uuid"], self.d1.split("/")[1])

        return run(go())

    def test_what_may_change_when(self) -> defer.Deferred[None]:
        """Each attribute only in the states validate_change allows, by whom it allows."""
        own = lambda: self.api.container_token(self.container)  # noqa: E731
        steps: list[tuple[str, Any, dict[str, Any], int, str]] = [
            ("address while Locked", self.d1, {"gateway_address": "h:1"}, 422, "Gateway address"),
            ("status while Locked", self.d1, {"runtime_status": {"activity": "pull"}}, 200, ""),
            ("status, not the holder", self.d2, {"runtime_status": {"a": "b"}}, 422, "Runtime"),
            ("exit code while Locked", self.d1, {"exit_code": 0}, 422, "Exit code"),
            ("skip to Complete", self.d1, {"state": "Complete"}, 422, "cannot change from"),
            ("bad status type", self.d1, {"runtime_status": {"error": 1}}, 422, "must be a string"),
            ("unknown attribute", self.d1, {"colour": "red"}, 422, "unknown attribute 'colour'"),
            ("holder's token", self.d1, {"locked_by_uuid": None}, 422, "Locked by uuid"),
            ("own token while Locked", own, {"runtime_status": {"a": "b"}}, 403, ""),
            ("to Running", self.d1, {"state": "Running", "gateway_address": "h:1"}, 200, ""),
            ("own token: progress", own, {"runtime_status": {"activity": "run"}}, 200, ""),
            ("own token: priority", own, {"priority": 5}, 422, "Priority cannot be modified"),
            ("own token: log", own, {"log": "x"}, 422, "Log cannot be modified"),
            ("own token: address", own, {"gateway_address": "h:2"}, 200, ""),
            ("other admin: progress", self.d2, {"progress": 0.5}, 422, "Progress"),
            ("other admin: priority", self.d2, {"priority": 7}, 200, ""),
            ("session started", self.d1, {"interactive_session_started": True}, 200, ""),
            ("session un-started", self.d1, {"interactive_session_started": False}, 422, ""),
            ("user", self.alice_token, {"priority": 1}, 403, ""),
            ("back to Locked", self.d1, {"state": "Locked"}, 422, "cannot change from Running"),
            ("done", self.d1, {"state": "Complete", "exit_code": 0}, 200, ""),
            ("after the end", self.d1, {"state": "Running"}, 422, "cannot change from Complete"),
            ("own token after the end", own, {"progress": 1.0}, 401, "Not logged in"),
        ]

        async def go() -> None:
            got, want = [], []
            # The container's token, read once: it stays the same until the container ends.
            own_token = own()
            for name, who, changes, status, text in steps:
                token = own_token if who is own else who
                code, body = await self.update(token, changes)
                message = " ".join(body.get("errors", []))
                got.append((name, code, text in message))
                want.append((name, status, True))
            self.assertEqual(got, want)
            record = self.api.containers[self.container]
            self.assertEqual((record["state"], record["exit_code"]), ("Complete", 0))
            self.assertIsNotNone(record["finished_at"])
            self.assertIsNone(record["auth_uuid"])
            self.assertEqual(self.api.container_requests[self.cr]["state"], "Final")

        return run(go())

    def test_container_token_may_finish_its_container(self) -> defer.Deferred[None]:
        """While Running, the container's own token may set its final state (validate_change)."""

        async def go() -> None:
            own = self.api.container_token(self.container)
            await self.update(self.d1, {"state": "Running"})
            code, body = await self.update(own, {"state": "Complete", "exit_code": 3})
            self.assertEqual((code, body["state"], body["exit_code"]), (200, "Complete", 3))
            # Its four-part form (v2/uuid/secret/container) is refused once it has ended.
            self.assertError(
                await self.call("GET", "users/current", own + "/" + self.container), 401
            )

        return run(go())

    def test_cancelled_is_retried(self) -> defer.Deferred[None]:
        """A Cancelled container is retried for a request with priority (handle_completed)."""

        async def go() -> None:
            await self.update(self.d1, {"state": "Running"})
            code, body = await self.update(self.d1, {"state": "Cancelled"})
            self.assertEqual((code, body["state"]), (200, "Cancelled"))
            cr = self.api.container_requests[self.cr]
            self.assertEqual((cr["state"], cr["container_count"]), ("Committed", 2))
            retry = self.api.containers[cr["container_uuid"]]
            self.assertNotEqual(retry["uuid"], self.container)
            self.assertEqual(retry["state"], "Queued")
            self.assertGreater(retry["priority"], 0)
            # At container_count_max it is not retried: the request is finished.
            cr["container_count"] = cr["container_count_max"]
            self.assertEqual((await self.lock(self.d1, retry["uuid"]))[0], 200)
            await self.update(self.d1, {"state": "Cancelled"}, retry["uuid"])
            self.assertEqual((cr["state"], cr["container_uuid"]), ("Final", retry["uuid"]))

        return run(go())

    def test_form_encoded_update(self) -> defer.Deferred[None]:
        """The Go SDK's form-encoded update (container=<json>, select=<json>) is understood."""

        async def go() -> None:
            code, body = await self.call(
                "PUT",
                f"containers/{self.container}",
                self.d1,
                form={"container": {"runtime_status": {"activity": "x"}}, "select": ["uuid"]},
            )
            self.assertEqual((code, set(body)), (200, {"kind", "uuid"}), body)
            self.assertEqual(
                self.api.containers[self.container]["runtime_status"], {"activity": "x"}
            )

        return run(go())


class PriorityTests(FakeAPITestCase):
    """A container's priority follows its committed requests (container_priority())."""

    def test_request_priority(self) -> defer.Deferred[None]:
        """A request set to priority 0 by its owner takes the container's priority to 0."""

        async def go() -> None:
            self.assertGreater(self.api.containers[self.container]["priority"], 0)
            path = f"container_requests/{self.cr}"
            code, body = await self.call(
                "PUT", path, self.alice_token, body={"container_request": {"priority": 0}}
            )
            self.assertEqual((code, body["priority"]), (200, 0))
            self.assertEqual(body["modified_by_user_uuid"], self.alice)
            self.assertEqual(self.api.containers[self.container]["priority"], 0)
            self.assertError(await self.lock(self.d1), 422, "priority<=0")
            reader = self.api.add_user("Reader")
            self.api.grant(reader, self.project, "can_read")
            reader_token = self.api.add_token(reader)
            change = {"container_request": {"priority": 2}}
            self.assertError(await self.call("PUT", path, reader_token, body=change), 403)
            self.assertError(await self.call("PUT", path, self.stranger, body=change), 404)
            self.assertError(
                await self.call(
                    "PUT", path, self.alice_token, body={"container_request": {"priority": 1001}}
                ),
                422,
                "less than or equal to 1000",
            )
            self.assertError(
                await self.call(
                    "PUT", path, self.alice_token, body={"container_request": {"command": ["x"]}}
                ),
                422,
                "Command cannot be modified in state 'Committed'",
            )

        return run(go())


class AuthTests(FakeAPITestCase):
    """GET containers/<uuid>/auth: the container's token, for the token holding the lock."""

    def test_auth(self) -> defer.Deferred[None]:
        """The holder gets the container's token; another admin 403; a stranger 404."""

        async def go() -> None:
            path = f"containers/{self.container}/auth"
            self.assertError(await self.call("GET", path, self.d1), 403, "Not locked by your token")
            await self.lock(self.d1)
            code, body = await self.call("GET", path, self.d1)
            self.assertEqual(code, 200, body)
            token = f"v2/{body['uuid']}/{body['api_token']}"
            self.assertEqual(token, self.api.container_token(self.container))
            self.assertError(await self.call("GET", path, self.d2), 403, "Not locked by your token")
            self.assertError(await self.call("GET", path, self.stranger), 404)
            # crunch-run's form of it works too, and names the container.
            code, current = await self.call(
                "GET", "containers/current", token + "/" + self.container
            )
            self.assertEqual((code, current["uuid"]), (200, self.container))
            self.assertError(await self.call("GET", "containers/current", self.d1), 404)

        return run(go())


class ListTests(FakeAPITestCase):
    """GET containers and container_requests: filters, order, limit, offset, count, select."""

    def setUp(self) -> Any:
        super().setUp()
        self.queued = [self.container]
        for priority in (3, 2):
            self.clock.advance(1)
            uuid = self.api.add_container()
            self.api.add_container_request(self.project, uuid, priority=priority)
            self.queued.append(uuid)
        self.running = self.api.add_container("Running", locked_by_uuid=self.d1.split("/")[1])
        self.api.add_container_request(self.project, self.running)
        self.done = self.api.add_container("Complete")
        self.api.add_container_request(self.project, self.done)
        self.orphan = self.api.add_container()  # no request: priority 0, readable by admins

    async def list(self, token: str, **params: Any) -> tuple[int, Any]:
        return await self.call("GET", "containers", token, params=params)

    def test_dispatcher_queries(self) -> defer.Deferred[None]:
        """sdk/go/dispatch's and lib/dispatchcloud's queries get what they ask for."""
        queued = [["state", "=", "Queued"], ["priority", ">", "0"]]

        async def go() -> None:
            code, body = await self.list(self.d1, filters=queued, count="exact", limit=0)
            self.assertEqual((code, body["items"], body["items_available"]), (200, [], 3))
            code, body = await self.list(
                self.d1, filters=queued, order="priority desc", limit=2, count="none"
            )
            self.assertNotIn("items_available", body)
            self.assertEqual([c["uuid"] for c in body["items"]], [self.queued[1], self.queued[2]])
            code, body = await self.list(
                self.d1, filters=queued, order=["priority desc"], limit=2, offset=2
            )
            self.assertEqual([c["uuid"] for c in body["items"]], [self.queued[0]])
            self.assertEqual(body["items_available"], 3)
            mine = [["locked_by_uuid", "=", self.d1.split("/")[1]]]
            code, body = await self.list(
                self.d1, filters=mine, select=["uuid", "state", "priority"], order="uuid"
            )
            self.assertEqual([c["uuid"] for c in body["items"]], [self.running])
            self.assertEqual(set(body["items"][0]), {"kind", "uuid", "state", "priority"})
            batch = [["uuid", "in", [self.done, self.orphan]]]
            code, body = await self.list(self.d1, filters=batch, order="uuid asc")
            self.assertEqual([c["uuid"] for c in body["items"]], [self.done, self.orphan])
            after = [["uuid", ">", self.queued[2]]]
            code, body = await self.list(self.d1, filters=after, order="uuid")
            self.assertEqual(
                [c["uuid"] for c in body["items"]], [self.running, self.done, self.orphan]
            )

        return run(go())

    def test_readable_only(self) -> defer.Deferred[None]:
        """A user lists the containers of requests they can read; admins list every one."""

        async def go() -> None:
            _, body = await self.list(self.alice_token, limit=100)
            self.assertEqual(len(body["items"]), 5)
            self.assertNotIn(self.orphan, [c["uuid"] for c in body["items"]])
            _, body = await self.list(self.stranger)
            self.assertEqual((body["items"], body["items_available"]), ([], 0))
            _, body = await self.list(self.d2)
            self.assertEqual(body["items_available"], 6)

        return run(go())

    def test_paging(self) -> defer.Deferred[None]:
        """The server's page limit caps limit (and says so); every page is reachable."""
        self.api.max_page = 2

        async def go() -> None:
            seen: list[str] = []
            offset = 0
            while True:
                _, body = await self.list(self.d1, limit=1000, offset=offset, order="uuid")
                self.assertEqual(body["limit"], 2)
                if not body["items"]:
                    break
                seen += [c["uuid"] for c in body["items"]]
                offset += len(body["items"])
            self.assertEqual(seen, sorted(self.api.containers))

        return run(go())

    def test_order(self) -> defer.Deferred[None]:
        """Unknown order attributes are ignored; the default is modified_at desc, uuid desc."""

        async def go() -> None:
            _, body = await self.list(self.d1, order=["no_such_column desc"])
            uuids = [c["uuid"] for c in body["items"]]
            expected = sorted(
                self.api.containers.values(),
                key=lambda c: (c["modified_at"], c["uuid"]),
                reverse=True,
            )
            self.assertEqual(uuids, [c["uuid"] for c in expected])
            _, body = await self.list(self.d1, order="started_at asc, uuid asc")
            # NULLs last when ascending (PostgreSQL).
            self.assertEqual(body["items"][0]["uuid"], self.running)

        return run(go())

    def test_filter_rules(self) -> defer.Deferred[None]:
        """Filters match as SQL does (!= keeps NULLs) and bad ones are 422, naming the problem."""
        table: list[tuple[Any, Any]] = [
            ([["gateway_address", "!=", "x"]], 6),
            ([["exit_code", "=", None]], 6),
            ([["exit_code", "!=", None]], 0),
            ([["state", "in", ["Running", "Complete"]]], 2),
            ([["state", "not in", ["Queued"]]], 2),
            ([["state", "like", "Q%"]], 4),
            ([["state", "ilike", "q%"]], 4),
            ([["uuid", "is_a", "arvados#container"]], 6),
            ([["priority", ">=", 1]], 4),
            ([["created_at", "<", "2100-01-01T00:00:00Z"]], 6),
            ([["interactive_session_started", "=", False]], 6),
            ([["runtime_status.error", "exists", False]], 6),
            ([["no_such_column", "=", 1]], "Invalid attribute 'no_such_column'"),
            ([["priority", "in", 3]], "Invalid operand type"),
            ([["priority", "=", "many"]], "invalid input syntax"),
            ([["priority", "like", "1%"]], "Invalid attribute 'priority'"),
            ([["state", "~", "x"]], "Invalid operator '~'"),
            ([["progress", "=", 1]], "Invalid attribute 'progress'"),
            (["state", "=", "Queued"], "is not an array"),
            ("[bad json", "Could not parse"),
        ]

        async def go() -> None:
            got = []
            for filters, _ in table:
                code, body = await self.list(self.d1, filters=filters)
                got.append(body["items_available"] if code == 200 else " ".join(body["errors"]))
            for (filters, want), answer in zip(table, got, strict=True):
                if isinstance(want, int):
                    self.assertEqual(answer, want, filters)
                else:
                    self.assertIn(want, answer, filters)

        return run(go())

    def test_parameter_errors(self) -> defer.Deferred[None]:
        """Bad limit, offset, count or select are 422, as ArgumentErrors are."""

        async def go() -> None:
            for params, text in [
                ({"limit": "-1"}, "Invalid value for limit parameter"),
                ({"offset": "x"}, "Invalid value for offset parameter"),
                ({"count": "some"}, "count parameter must be 'exact' or 'none'"),
                ({"select": ["uuid", "secret_mounts"]}, "Invalid attribute 'secret_mounts'"),
            ]:
                self.assertError(await self.list(self.d1, **params), 422, text)

        return run(go())

    def test_container_request_join(self) -> defer.Deferred[None]:
        """Container requests filter on their container's attributes with container.<attr>."""

        async def go() -> None:
            code, body = await self.call(
                "GET",
                "container_requests",
                self.alice_token,
                params={"filters": [["container.state", "=", "Running"]]},
            )
            self.assertEqual(code, 200, body)
            self.assertEqual([cr["container_uuid"] for cr in body["items"]], [self.running])

        return run(go())


class TokenTests(FakeAPITestCase):
    """POST, GET and DELETE api_client_authorizations."""

    async def create(self, token: str, **attrs: Any) -> tuple[int, Any]:
        return await self.call(
            "POST", "api_client_authorizations", token, body={"api_client_authorization": attrs}
        )

    def test_narrower_expiring_token(self) -> defer.Deferred[None]:
        """A user mints a token for themselves with narrower scopes and an expiry; it obeys both."""
        scope = f"GET /arvados/v1/container_requests/{self.cr}"

        async def go() -> None:
            code, body = await self.create(
                self.alice_token, scopes=[scope], expires_at="2023-11-14T22:15:00Z"
            )
            self.assertEqual(code, 200, body)
            self.assertEqual((body["owner_uuid"], body["scopes"]), (self.alice, [scope]))
            token = f"v2/{body['uuid']}/{body['api_token']}"
            self.assertEqual(
                (await self.call("GET", f"container_requests/{self.cr}", token))[0], 200
            )
            self.assertError(await self.call("GET", "users/current", token), 403, "Forbidden")
            code, current = await self.call("GET", "api_client_authorizations/current", token)
            self.assertEqual(current["expires_at"], "2023-11-14T22:15:00.000000000Z")
            self.clock.advance(100)
            self.assertError(await self.call("GET", f"container_requests/{self.cr}", token), 401)

        return run(go())

    def test_refusals(self) -> defer.Deferred[None]:
        """Tokens for others, from scoped tokens, when untrusted, or with bad scopes: refused."""
        bob = self.api.add_user("Bob")
        scoped = self.api.add_token(self.alice, [f"GET /arvados/v1/container_requests/{self.cr}"])

        async def go() -> None:
            self.assertError(await self.create(self.alice_token, owner_uuid=bob), 403)
            self.assertError(await self.create(scoped, scopes=["all"]), 403, "Forbidden")
            self.assertError(await self.create(self.alice_token, scopes="all"), 422, "Array")
            self.assertError(
                await self.call("POST", "api_client_authorizations", self.alice_token, body={}),
                422,
                "No api_client_authorization",
            )
            code, body = await self.create(self.d1, owner_uuid=bob)
            self.assertEqual((code, body["owner_uuid"]), (200, bob))
            self.api.issue_trusted_tokens = False
            self.assertError(await self.create(self.alice_token), 403, "IssueTrustedTokens")
            self.assertEqual((await self.create(ROOT, owner_uuid=bob))[0], 200)

        return run(go())

    def test_max_token_lifetime(self) -> defer.Deferred[None]:
        """API.MaxTokenLifetime clamps a user's new token (no expiry included); not an admin's."""
        self.api.max_token_lifetime = 3600

        async def go() -> None:
            _, body = await self.create(self.alice_token)
            self.assertEqual(body["expires_at"], "2023-11-14T23:13:20.000000000Z")
            _, body = await self.create(self.d1)
            self.assertIsNone(body["expires_at"])

        return run(go())

    def test_delete(self) -> defer.Deferred[None]:
        """A user revokes their own token; others' are 404 to them; the root token revokes any."""
        other = self.api.add_token(self.alice)
        bobs = self.api.add_token(self.api.add_user("Bob"))

        async def go() -> None:
            path = "api_client_authorizations/" + other.split("/")[1]
            code, body = await self.call("DELETE", path, self.alice_token)
            self.assertEqual((code, body["uuid"]), (200, other.split("/")[1]))
            self.assertError(await self.call("GET", "users/current", other), 401)
            bobs_path = "api_client_authorizations/" + bobs.split("/")[1]
            self.assertError(await self.call("DELETE", bobs_path, self.alice_token), 404)
            self.assertError(await self.call("DELETE", bobs_path, self.d1), 404)
            self.assertEqual((await self.call("DELETE", bobs_path, ROOT))[0], 200)

        return run(go())

    def test_root_token_forms(self) -> defer.Deferred[None]:
        """The SystemRootToken works bare, not dressed as a v2 token of its UUID."""

        async def go() -> None:
            code, body = await self.call("GET", "api_client_authorizations/current", ROOT)
            self.assertEqual((code, body["uuid"]), (200, "zzzzz-gj3su-000000000000000"))
            dressed = f"v2/zzzzz-gj3su-000000000000000/{ROOT}"
            self.assertError(await self.call("GET", "users/current", dressed), 401)

        return run(go())


class FaultTests(FakeAPITestCase):
    def test_fail_next(self) -> defer.Deferred[None]:
        """fail_next fails only the matching calls, as many times as asked."""
        self.api.fail_next(503, count=2, method="POST", path="containers/")

        async def go() -> None:
            self.assertEqual((await self.call("GET", "users/current", self.d1))[0], 200)
            self.assertError(await self.lock(self.d1), 503)
            self.assertError(await self.lock(self.d1), 503)
            self.assertEqual((await self.lock(self.d1))[0], 200)

        return run(go())


class PureHelperTests(unittest.SynchronousTestCase):
    def test_jsonb_contains(self) -> None:
        """PostgreSQL's @> on JSON: objects by keys, arrays by elements, top-level primitives."""
        table = [
            ({"a": 1, "b": 2}, {"a": 1}, True),
            ({"a": 1}, {"a": 2}, False),
            ({"a": [1, 2]}, {"a": [2]}, True),
            ([1, 2], 1, True),
            ({"a": [1]}, {"a": 1}, False),
            ({"a": True}, {"a": 1}, False),
        ]
        for have, want, expected in table:
            self.assertEqual(jsonb_contains(have, want), expected, (have, want))

    def test_like(self) -> None:
        """LIKE's % and _ and escapes; ILIKE ignores case."""
        self.assertTrue(like_matcher("a%c_", False)("abbbcd"))
        self.assertFalse(like_matcher("a%c_", False)("abbbc"))
        self.assertTrue(like_matcher("50\\%", False)("50%"))
        self.assertFalse(like_matcher("50\\%", False)("500"))
        self.assertTrue(like_matcher("ABC", True)("abc"))

    def test_parse_time(self) -> None:
        """Timestamps in the forms clients send parse to UTC."""
        self.assertEqual(parse_time("2023-11-14T22:13:20Z").timestamp(), T0)
        self.assertEqual(parse_time("2023-11-14T22:13:20.5+01:00").timestamp(), T0 - 3600 + 0.5)
        self.assertEqual(parse_time("2023-11-14").timestamp(), T0 - 80000)
