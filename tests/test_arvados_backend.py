"""
Tests for the Arvados API backend (L{arvproxy.backends.arvados}), its answer cache
(L{arvproxy.backends.cache}) and the fake API server it is tested against
(L{arvproxy.fakearvados}): what is only true of this backend -- caching and sharing of API calls,
paging, scope-limited tokens, outages, slowness, API error mapping, TLS, the configuration and
the choice of backend.  What every backend must do is in L{tests.test_cluster_contract}.

Everything talks over real loopback HTTP(S) with treq; time (cache lifetimes, token expiry, call
timeouts) runs on an injected L{Clock}.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, cast

import treq
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.backends import CAN_WRITE, LOCKED, RUNNING, Credentials
from arvproxy.backends.arvados import (
    ArvadosCluster,
    NotLockHolder,
    api_base_url,
    parse_api_time,
    parse_dispatch_api,
    scope_permits,
)
from arvproxy.backends.cache import AnswerCache
from arvproxy.config import ClusterConfig, ConfigError, ExternalURL, parse_config
from arvproxy.controller.proxy import Controller
from arvproxy.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ProxyError,
    Unauthorized,
    Unavailable,
)
from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI, OpenConnections, self_signed
from arvproxy.httpserver import ProxySite
from arvproxy.policy import connect_scope
from arvproxy.service import open_cluster
from arvproxy.testing import FakeGatewayConnector, FakeResponse
from tests.test_cluster_contract import GATEWAY, ROOT_TOKEN, T0, decide

reactor: Any = _reactor
TTL = 10.0


# --- The cache, alone ----------------------------------------------------------------------------


def fail_with(error: Exception) -> Callable[[], defer.Deferred[str]]:
    return lambda: defer.fail(error)


class AnswerCacheTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache: AnswerCache[str] = AnswerCache(self.clock, ttl=10, failure_ttl=1)
        self.fetches: list[defer.Deferred[str]] = []

    def fetch(self) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        self.fetches.append(d)
        return d

    def test_concurrent_lookups_share_one_fetch(self) -> None:
        """Lookups of one key while its fetch runs wait for that fetch: one call, one answer."""
        waiting = [self.cache.get("k", self.fetch) for _ in range(5)]
        self.assertEqual(len(self.fetches), 1)
        self.fetches[0].callback("answer")
        self.assertEqual([self.successResultOf(d) for d in waiting], ["answer"] * 5)

    def test_answers_expire(self) -> None:
        """An answer is reused until its lifetime ends, by the clock, and fetched again after."""
        self.cache.get("k", lambda: "one")
        self.clock.advance(9.9)
        self.assertEqual(self.successResultOf(self.cache.get("k", lambda: "two")), "one")
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(self.cache.get("k", lambda: "two")), "two")

    def test_failures(self) -> None:
        """Outages are never kept, definite failures briefly, other exceptions never."""
        table: list[tuple[Exception, float]] = [
            (Unavailable("down"), 0.0),
            (NotFound("gone"), 1.0),
            (Unauthorized("no"), 1.0),
            (RuntimeError("bug"), 0.0),
        ]
        for i, (error, kept) in enumerate(table):
            key = f"k{i}"
            self.failureResultOf(self.cache.get(key, fail_with(error)), type(error))
            again = self.cache.get(key, lambda: "fresh")
            if kept:
                self.failureResultOf(again, type(error))
                self.clock.advance(kept)
                self.assertEqual(
                    self.successResultOf(self.cache.get(key, lambda: "fresh")), "fresh"
                )
            else:
                self.assertEqual(self.successResultOf(again), "fresh")

    def test_failure_reaches_every_waiter(self) -> None:
        """A failed shared fetch fails every caller waiting for it."""
        waiting = [self.cache.get("k", self.fetch) for _ in range(3)]
        self.fetches[0].errback(Unavailable("down"))
        for d in waiting:
            self.failureResultOf(d, Unavailable)

    def test_cancel_one_waiter(self) -> None:
        """Cancelling one caller's wait leaves the shared fetch and the other callers alone."""
        first = self.cache.get("k", self.fetch)
        second = self.cache.get("k", self.fetch)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.fetches[0].callback("answer")
        self.assertEqual(self.successResultOf(second), "answer")

    def test_clear_while_fetching(self) -> None:
        """
        After clear(), a fetch that was already running still answers its callers, but its
        answer (perhaps from before the change) is not kept, and a new caller fetches afresh.
        """
        before = self.cache.get("k", self.fetch)
        self.cache.clear()
        after = self.cache.get("k", self.fetch)
        self.assertEqual(len(self.fetches), 2)
        self.fetches[1].callback("new")
        self.fetches[0].callback("old")
        self.assertEqual(
            (self.successResultOf(before), self.successResultOf(after)), ("old", "new")
        )
        self.assertEqual(self.successResultOf(self.cache.get("k", self.fetch)), "new")
        self.assertEqual(len(self.fetches), 2)

    def test_zero_ttl(self) -> None:
        """With no lifetime, concurrent callers still share, but nothing is kept."""
        cache: AnswerCache[str] = AnswerCache(self.clock, ttl=0)
        a, b = cache.get("k", self.fetch), cache.get("k", self.fetch)
        self.fetches[0].callback("x")
        self.assertEqual((self.successResultOf(a), self.successResultOf(b)), ("x", "x"))
        cache.get("k", self.fetch)
        self.assertEqual(len(self.fetches), 2)

    def test_bounded(self) -> None:
        """The cache keeps at most max_entries answers, dropping the oldest."""
        cache: AnswerCache[int] = AnswerCache(self.clock, ttl=10, max_entries=3)
        for i in range(5):
            cache.get(i, functools.partial(int, i))
        self.assertEqual(len(cache), 3)
        self.assertEqual(self.successResultOf(cache.get(0, lambda: -1)), -1)
        self.assertEqual(self.successResultOf(cache.get(4, lambda: -1)), 4)


# --- Pure helpers --------------------------------------------------------------------------------


class HelperTests(unittest.SynchronousTestCase):
    def test_scope_permits(self) -> None:
        """Scopes allow all, an exact METHOD /path (GET also HEAD), or a prefix ending in /."""
        table = [
            (["all"], "PUT", "/arvados/v1/x", True),
            (["GET /arvados/v1/users/current"], "GET", "/arvados/v1/users/current", True),
            (["GET /arvados/v1/users/current"], "HEAD", "/arvados/v1/users/current", True),
            (["GET /arvados/v1/users/current"], "PUT", "/arvados/v1/users/current", False),
            (["GET /arvados/v1/users"], "GET", "/arvados/v1/users/current", False),
            (["GET /arvados/v1/users/"], "GET", "/arvados/v1/users/current", True),
            (["GET /arvados/v1/"], "GET", "/arvados/v1/groups/x", True),
            ([connect_scope("zzzzz-xvhdp-000000000000001", 80)], "GET", "/arvados/v1/x", False),
            ([], "GET", "/arvados/v1/users/current", False),
        ]
        for scopes, method, path, expected in table:
            self.assertEqual(scope_permits(scopes, method, path), expected, (scopes, method, path))

    def test_parse_api_time(self) -> None:
        """Arvados timestamps, with nanoseconds or none, parse to aware UTC datetimes."""
        precise = parse_api_time("2023-11-14T22:13:20.123456789Z")
        whole = parse_api_time("2023-11-14T22:13:20Z")
        assert precise is not None and whole is not None
        self.assertEqual((precise.timestamp(), whole.timestamp()), (T0 + 0.123456, T0))
        self.assertIsNone(parse_api_time(None))
        self.assertRaises(ValueError, parse_api_time, "yesterday")

    def test_api_base_url(self) -> None:
        """ExternalURL and ARVADOS_API_HOST forms give one base URL; other things are refused."""
        for given, want in [
            ("https://zzzzz.example.com", "https://zzzzz.example.com/"),
            ("zzzzz.example.com:8443", "https://zzzzz.example.com:8443/"),
            ("http://127.0.0.1:9000/", "http://127.0.0.1:9000/"),
        ]:
            self.assertEqual(api_base_url(given), want)
        for bad in ["ftp://x", "https://", "https://x/?q=1"]:
            self.assertRaises(ValueError, api_base_url, bad)

    def test_token_not_in_repr(self) -> None:
        """Credentials carry the token for the backend but never show or compare it."""
        c = Credentials("zzzzz-gj3su-000000000000001", "u", False, token="v2/x/SeCrEt")
        self.assertNotIn("SeCrEt", repr(c))
        self.assertEqual(c, Credentials("zzzzz-gj3su-000000000000001", "u", False))


# --- The backend against the fake API over loopback ----------------------------------------------


class BackendTestCase(unittest.TestCase):
    """A fake API on loopback and a backend using it; time on C{self.clock}."""

    tls: Any = None
    backend_options: dict[str, Any] = {}

    def setUp(self) -> Any:
        self.clock = Clock()
        self.clock.advance(T0)
        self.api = FakeArvadosAPI("zzzzz", ROOT_TOKEN, clock=self.clock.seconds)
        self.server = FakeAPIServer(reactor, self.api, tls=self.tls)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.cluster = self.backend()
        self.alice = self.api.add_user("Alice")
        self.bob = self.api.add_user("Bob")
        self.project = self.api.add_project(self.alice)
        self.container = self.api.add_container(state=RUNNING, gateway_address=GATEWAY)
        self.cr = self.api.add_container_request(self.project, self.container)
        self.token = self.api.add_token(self.alice)

    def backend(self, **options: Any) -> ArvadosCluster:
        cluster = ArvadosCluster(
            reactor,
            self.server.url,
            ROOT_TOKEN,
            cluster_id="zzzzz",
            clock=self.clock,
            **{**self.backend_options, **options},
        )
        cluster.startService()
        self.addCleanup(cluster.stopService)
        return cluster

    def calls(self) -> int:
        return len(self.api.calls)


class CachingTests(BackendTestCase):
    def test_concurrent_lookups_share_calls(self) -> defer.Deferred[None]:
        """Ten concurrent checks of one token cost one call for the token and one for the user."""

        async def run() -> None:
            results = await defer.gatherResults(
                [self.cluster.authenticate(self.token) for _ in range(10)]
            )
            self.assertEqual({c.user_uuid for c in results}, {self.alice})
            self.assertEqual(self.api.count("api_client_authorizations/current"), 1)
            self.assertEqual(self.api.count("users/current"), 1)

        return defer.ensureDeferred(run())

    def test_page_with_many_assets(self) -> defer.Deferred[None]:
        """
        A hundred requests for one service cost the API calls of the first, and then one each:
        the container's state, read afresh.
        """

        async def run() -> None:
            self.assertEqual(await decide(self.cluster, self.token, self.cr, 80), "ok")
            first = self.calls()
            self.assertLessEqual(first, 7)
            for _ in range(99):
                self.assertEqual(await decide(self.cluster, self.token, self.cr, 80), "ok")
            later = self.api.calls[first:]
            self.assertEqual(len(later), 99)
            self.assertEqual({c.path for c in later}, {f"/arvados/v1/containers/{self.container}"})

        return defer.ensureDeferred(run())

    def test_revoked_token_stops_within_ttl(self) -> defer.Deferred[None]:
        """A revoked token keeps working from the cache until the TTL, and not a moment after."""

        async def run() -> None:
            await self.cluster.authenticate(self.token)
            self.api.revoke(self.token)
            self.clock.advance(TTL - 0.5)
            await self.cluster.authenticate(self.token)
            self.clock.advance(0.5)
            with self.assertRaises(Unauthorized):
                await self.cluster.authenticate(self.token)

        return defer.ensureDeferred(run())

    def test_cached_token_expires_on_time(self) -> defer.Deferred[None]:
        """A cached token stops at its expiry time even when the cache would keep it longer."""
        token = self.api.add_token(self.alice, expires_at=T0 + 3)

        async def run() -> None:
            await self.cluster.authenticate(token)
            before = self.calls()
            self.clock.advance(3)
            with self.assertRaises(Unauthorized):
                await self.cluster.authenticate(token)
            self.assertEqual(self.calls(), before)

        return defer.ensureDeferred(run())

    def test_container_state_is_never_kept(self) -> defer.Deferred[None]:
        """
        A container's state is read afresh for every lookup: its start and its end are seen by
        the very next one, with no clock advance.  Lookups in one turn share one call.
        """
        locked = self.api.add_container(state=LOCKED)

        async def run() -> None:
            self.assertEqual((await self.cluster.get_container(locked)).state, LOCKED)
            self.api.containers[locked].update(state=RUNNING, gateway_address=GATEWAY)
            self.assertEqual((await self.cluster.get_container(locked)).state, RUNNING)
            self.api.containers[locked]["state"] = "Complete"
            self.assertEqual((await self.cluster.get_container(locked)).state, "Complete")
            before = self.calls()
            together = [self.cluster.get_container(locked) for _ in range(5)]
            await defer.gatherResults(together)
            self.assertEqual(self.calls(), before + 1)

        return defer.ensureDeferred(run())


class PagingTests(BackendTestCase):
    def test_all_pages(self) -> defer.Deferred[None]:
        """Every page of a container's requests is read, whatever the server's page size."""
        self.api.max_page = 2
        others = [self.api.add_container_request(self.bob, self.container) for _ in range(4)]

        async def run() -> None:
            found = await self.cluster.container_requests_for(self.container)
            self.assertEqual(sorted(cr.uuid for cr in found), sorted([self.cr, *others]))
            self.assertEqual(self.api.count("container_requests"), 3)
            listed = [c for c in self.api.calls if c.path.endswith("/container_requests")]
            self.assertEqual([c.args["offset"] for c in listed], ["0", "2", "4"])
            self.assertEqual(
                json.loads(listed[0].args["filters"]),
                [["container_uuid", "=", self.container]],
            )
            self.assertEqual({c.token_uuid for c in listed}, {"zzzzz-gj3su-000000000000000"})

        return defer.ensureDeferred(run())

    def test_inconsistent_pages(self) -> defer.Deferred[None]:
        """A list whose pages do not add up to items_available decides nothing: Unavailable."""
        self.api.max_page = 1
        self.api.add_container_request(self.bob, self.container)
        real = self.api._list_container_requests

        def shifting(user_uuid: str, args: dict[str, str]) -> dict[str, Any]:
            page = real(user_uuid, args)
            page["items_available"] += 1
            return page

        self.api._list_container_requests = shifting  # type: ignore[method-assign]

        async def run() -> None:
            with self.assertRaises(Unavailable):
                await self.cluster.container_requests_for(self.container)

        return defer.ensureDeferred(run())


class ScopeTests(BackendTestCase):
    def test_scoped_token_user_from_authorization(self) -> defer.Deferred[None]:
        """A CONNECT-scoped token's user is read with the service token, not users/current."""
        token = self.api.add_token(self.alice, [connect_scope(self.cr, 80)])

        async def run() -> None:
            c = await self.cluster.authenticate(token)
            self.assertEqual((c.user_uuid, c.scopes), (self.alice, (connect_scope(self.cr, 80),)))
            self.assertEqual(self.api.count("users/current"), 0)
            [user_call] = [c for c in self.api.calls if c.path.endswith(self.alice)]
            self.assertEqual(user_call.token_uuid, "zzzzz-gj3su-000000000000000")

        return defer.ensureDeferred(run())

    def test_fake_enforces_scopes(self) -> defer.Deferred[None]:
        """The fake API refuses a scoped token outside its scopes (403), as the API server does."""
        token = self.api.add_token(self.alice, [connect_scope(self.cr, 80)])

        async def run() -> None:
            response = await treq.get(
                self.server.url + f"/arvados/v1/container_requests/{self.cr}",
                headers=Headers({b"Authorization": [f"Bearer {token}".encode()]}),
                pool=self.pool(),
            )
            body = json.loads(await response.content())
            self.assertEqual(response.code, 403)
            self.assertEqual(set(body), {"errors", "error_token"})
            self.assertIsInstance(body["errors"][0], str)

        return defer.ensureDeferred(run())

    def pool(self) -> HTTPConnectionPool:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        return pool

    def test_owner_is_a_user(self) -> defer.Deferred[None]:
        """
        On a request a user owns, can_manage on that user reaches it and can_write does not, as
        in Arvados (permission on a user reaches what they own only through can_manage).
        """
        carol, dave = self.api.add_user("Carol"), self.api.add_user("Dave")
        cr = self.api.add_container_request(self.alice, self.container)
        self.api.grant(carol, self.alice, "can_manage")
        self.api.grant(dave, self.alice, CAN_WRITE)

        async def run() -> None:
            self.assertEqual(await self.cluster.permission_level(carol, cr), "can_manage")
            self.assertIsNone(await self.cluster.permission_level(dave, cr))
            self.assertEqual(await self.cluster.permission_level(self.alice, cr), "can_manage")

        return defer.ensureDeferred(run())

    def test_same_answer_for_every_token(self) -> defer.Deferred[None]:
        """The level is the user's, asked with the service token: the token does not change it."""
        writer = self.api.add_user("Writer")
        self.api.grant(writer, self.project, CAN_WRITE)
        full = self.api.add_token(writer)
        scoped = self.api.add_token(writer, [connect_scope(self.cr, 80)])

        async def run() -> None:
            answers = [await self.cluster.permission_level(writer, self.cr)]
            for token in (full, scoped):
                credentials = await self.cluster.authenticate(token)
                answers.append(
                    await self.cluster.permission_level(writer, self.cr, credentials=credentials)
                )
            self.assertEqual(answers, [CAN_WRITE] * 3)
            self.assertIsNone(await self.cluster.permission_level(self.bob, self.cr))
            self.assertIsNone(await self.cluster.permission_level(self.alice, self.container))
            asked = [c for c in self.api.calls if c.path.endswith("/computed_permissions")]
            self.assertEqual({c.token_uuid for c in asked}, {"zzzzz-gj3su-000000000000000"})

        return defer.ensureDeferred(run())


class OutageTests(BackendTestCase):
    def test_outage_and_recovery(self) -> defer.Deferred[None]:
        """
        During an outage fresh cached answers work, but a container's state is never assumed:
        503 (with Retry-After); then it recovers.
        """
        other = self.api.add_token(self.bob)

        async def run() -> None:
            self.assertEqual(await decide(self.cluster, self.token, self.cr, 80), "ok")
            self.api.outage = 503
            self.assertEqual((await self.cluster.authenticate(self.token)).user_uuid, self.alice)
            self.assertEqual(await decide(self.cluster, self.token, self.cr, 80), "Unavailable")
            with self.assertRaises(Unavailable) as caught:
                await self.cluster.authenticate(other)
            self.assertEqual((caught.exception.status, caught.exception.retry_after), (503, 5))
            self.clock.advance(TTL)
            self.assertEqual(await decide(self.cluster, self.token, self.cr, 80), "Unavailable")
            self.api.outage = None
            self.assertEqual(await decide(self.cluster, self.token, self.cr, 80), "ok")
            self.assertEqual((await self.cluster.authenticate(other)).user_uuid, self.bob)

        return defer.ensureDeferred(run())

    def test_server_gone_and_back(self) -> defer.Deferred[None]:
        """Connection refused is Unavailable; the backend recovers when the server returns."""

        async def run() -> None:
            port = self.server.port
            await self.server.stop()
            with self.assertRaises(Unavailable):
                await self.cluster.authenticate(self.token)
            self.server.start(port)
            self.assertEqual((await self.cluster.authenticate(self.token)).user_uuid, self.alice)

        return defer.ensureDeferred(run())

    def test_slow_server(self) -> defer.Deferred[None]:
        """A server that does not answer within the timeout is Unavailable, not a hang."""
        self.api.stall = True

        async def run() -> None:
            arrived = self.api.next_call()
            d = defer.ensureDeferred(self.cluster.get_container(self.container))
            await arrived
            self.clock.advance(10)
            with self.assertRaises(Unavailable):
                await d
            self.api.release()

        return defer.ensureDeferred(run())

    def test_garbage(self) -> defer.Deferred[None]:
        """An answer that is not the documented JSON is Unavailable."""
        self.api.garbage = True

        async def run() -> None:
            with self.assertRaises(Unavailable):
                await self.cluster.get_container(self.container)

        return defer.ensureDeferred(run())

    def test_error_mapping(self) -> defer.Deferred[None]:
        """API statuses become the right status for the person, by whose token was refused."""
        # (API status, what the person sees when their token was used, when the service's was)
        table: list[tuple[int, int, int]] = [
            (401, Unauthorized.status, Unavailable.status),
            (403, Forbidden.status, Unavailable.status),
            (404, NotFound.status, NotFound.status),
            (422, BadRequest.status, BadRequest.status),
            (500, 503, 503),
            (502, 503, 503),
            (503, 503, 503),
        ]
        cluster = self.backend(cache_ttl=0, failure_ttl=0)

        async def run() -> None:
            got = []
            for status, _, _ in table:
                self.api.outage = status
                kinds = []
                for ask in (
                    lambda: cluster.authenticate(self.token),
                    lambda: cluster.get_container_request(self.cr),
                ):
                    try:
                        await ask()
                    except ProxyError as e:
                        kinds.append(e.status)
                got.append((status, *kinds))
            self.assertEqual(got, table)

        return defer.ensureDeferred(run())

    def test_tokens_never_logged(self) -> defer.Deferred[None]:
        """No token, the SystemRootToken included, appears in any log line, whatever happens."""
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        secrets = [ROOT_TOKEN, self.token, self.token.split("/")[-1]]

        async def run() -> None:
            for outage in (None, 401, 403, 500):
                self.api.outage = outage
                self.clock.advance(TTL)
                for ask in (
                    lambda: self.cluster.authenticate(self.token),
                    lambda: self.cluster.get_container(self.container),
                ):
                    try:
                        await ask()
                    except ProxyError as e:
                        for secret in secrets:
                            self.assertNotIn(secret, e.message + e.hint)
            self.api.garbage = True
            with self.assertRaises(Unavailable):
                await self.cluster.authenticate(self.token + "x")
            self.assertTrue(events)
            text = "\n".join(str(formatEvent(e)) + repr(e) for e in events)
            for secret in secrets:
                self.assertNotIn(secret, text)

        return defer.ensureDeferred(run())


class UpdateTests(BackendTestCase):
    def test_gateway_token_updates_its_container(self) -> defer.Deferred[None]:
        """With the dispatcher's Env, a gateway updates its container; listening ports stay out."""
        dispatcher = self.api.add_user("dispatcher", is_admin=True)
        token = self.api.add_token(dispatcher)
        # Locked by the dispatcher's token, as POST containers/<uuid>/lock leaves it.
        container = self.api.add_container(state=LOCKED, locked_by_uuid=token.split("/")[1])
        self.api.add_container_request(self.project, container)
        config = config_for({})
        gateway = open_cluster(
            reactor,
            config,
            {
                "ARVADOS_API_HOST": self.tls_server.api_host,
                "ARVADOS_API_TOKEN": token,
                "ARVADOS_API_HOST_INSECURE": "1",
            },
        )
        self.assertIsInstance(gateway, ArvadosCluster)
        gateway.startService()
        self.addCleanup(gateway.stopService)

        async def run() -> None:
            own = await gateway.container_auth(container)
            self.assertEqual(own, self.api.container_token(container) + "/" + container)
            updated = await gateway.update_container(
                container, state=RUNNING, gateway_address=GATEWAY, listening_ports=[8888]
            )
            self.assertEqual((updated.state, updated.gateway_address), (RUNNING, GATEWAY))
            [put] = [c for c in self.api.calls if c.method == "PUT"]
            self.assertEqual(put.token_uuid, token.split("/")[1])
            self.assertNotIn("listening_ports", self.api.containers[container])
            # The dispatcher's token is not taken for the SystemRootToken: the API is asked.
            self.assertEqual((await gateway.authenticate(token)).user_uuid, dispatcher)
            self.assertEqual(self.api.count("api_client_authorizations/current"), 1)

        return defer.ensureDeferred(run())

    @property
    def tls_server(self) -> FakeAPIServer:
        """The same fake API served over TLS with a self-signed certificate, as real ones are."""
        server = getattr(self, "_tls_server", None)
        if server is None:
            server = self._tls_server = FakeAPIServer(reactor, self.api, tls=self_signed()[0])
            server.start()
            self.addCleanup(server.stop)
        return server

    def test_refused_update(self) -> defer.Deferred[None]:
        """A service token the API refuses (403) fails the update as Unavailable, logged."""
        self.api.grant(self.bob, self.project, "can_read")
        gateway = ArvadosCluster(
            reactor,
            self.server.url,
            self.api.add_token(self.bob),
            cluster_id="zzzzz",
            service_token_is_root=False,
            clock=self.clock,
        )
        gateway.startService()
        self.addCleanup(gateway.stopService)

        async def run() -> None:
            with self.assertRaises(Unavailable):
                await gateway.update_container(self.container, state="Complete")
            self.assertEqual(self.api.containers[self.container]["state"], RUNNING)

        return defer.ensureDeferred(run())


class TLSTests(BackendTestCase):
    tls, trust_root = self_signed()
    backend_options = {"insecure": True}

    def test_insecure(self) -> defer.Deferred[None]:
        """With TLS.Insecure, the backend talks to a self-signed API server."""

        async def run() -> None:
            self.assertTrue(self.server.url.startswith("https://"))
            self.assertEqual((await self.cluster.authenticate(self.token)).user_uuid, self.alice)

        return defer.ensureDeferred(run())

    def test_verified_by_default(self) -> defer.Deferred[None]:
        """Without TLS.Insecure, an untrusted certificate is Unavailable; a trusted one works."""
        strict = self.backend(insecure=False)
        trusting = self.backend(insecure=False, trust_root=self.trust_root)

        async def run() -> None:
            with self.assertRaises(Unavailable):
                await strict.authenticate(self.token)
            self.assertEqual((await trusting.authenticate(self.token)).user_uuid, self.alice)

        return defer.ensureDeferred(run())


# --- Through the controller ---------------------------------------------------------------------


class ControllerTests(BackendTestCase):
    def test_controller_passes_credentials(self) -> defer.Deferred[None]:
        """Through the real controller, a project writer reaches the service."""
        writer = self.api.add_user("Writer")
        self.api.grant(writer, self.project, CAN_WRITE)
        token = self.api.add_token(writer)
        gateways = FakeGatewayConnector()
        gateways.responder = lambda call: FakeResponse(200, b"OK", [], b"from the service")
        config = ClusterConfig(
            source="test",
            cluster_id="zzzzz",
            system_root_token=ROOT_TOKEN,
            external_url=ExternalURL("http", "containers.example.com"),
        )
        site = ProxySite(Controller(reactor, config, self.cluster, cast(Any, gateways)), reactor)
        connections = OpenConnections(site)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(connections.close_all)
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        host = f"{self.cr}-80.containers.example.com"
        url = f"http://127.0.0.1:{port.getHost().port}/p"
        cookie = b"arvados_api_token=" + policy.encode_token_cookie(token.encode())

        async def run() -> None:
            response = await treq.get(
                url, headers=Headers({b"Host": [host.encode()], b"Cookie": [cookie]}), pool=pool
            )
            self.assertEqual((response.code, await response.content()), (200, b"from the service"))
            # Whom the writer acts as, then their rows on the request and its project.
            self.assertEqual(self.api.count("computed_permissions"), 2)

        return defer.ensureDeferred(run())


# --- Configuration and the choice of backend ----------------------------------------------------


def config_for(arvproxy: dict[str, Any], **cluster: Any) -> ClusterConfig:
    document = {
        "Clusters": {
            "zzzzz": {
                "SystemRootToken": ROOT_TOKEN,
                "Services": {
                    "ContainerWebServices": {"ExternalURL": "https://*.containers.example.com"},
                    "Controller": {"ExternalURL": "https://zzzzz.example.com"},
                },
                "ArvProxy": arvproxy,
                **cluster,
            }
        }
    }
    return parse_config(document, "/etc/arvados/config.yml")


class ConfigTests(unittest.SynchronousTestCase):
    def test_arvados_backend(self) -> None:
        """Backend arvados reads the API's ExternalURL, TLS.Insecure and CacheTTL."""
        config = config_for({"Backend": "arvados", "CacheTTL": "3s"}, TLS={"Insecure": True})
        self.assertEqual(
            (config.backend, config.api_url, config.tls_insecure, config.cache_ttl),
            ("arvados", "https://zzzzz.example.com/", True, 3.0),
        )
        self.assertEqual(config_for({"CacheTTL": 0}).cache_ttl, 0.0)
        defaults = config_for({})
        self.assertEqual(
            (defaults.tls_insecure, defaults.cache_ttl, defaults.api_url), (False, 10.0, "")
        )

    def test_mistakes(self) -> None:
        """Each mistake in the arvados settings names its key."""
        table = [
            ("TLS.Insecure", config_for, ({},), {"TLS": {"Insecure": "yes"}}),
            ("ArvProxy.CacheTTL", config_for, ({"CacheTTL": "-1s"},), {}),
        ]
        for key, make, args, kwargs in table:
            with self.assertRaises(ConfigError) as caught:
                make(*args, **kwargs)
            self.assertIn(key, str(caught.exception))
        for bad in [
            "zzzzz.example.com",
            "https://*.example.com",
            "https://x/path",
            "http://[::1",
            "https://x:99999",
            42,
        ]:
            document = {
                "Clusters": {
                    "zzzzz": {
                        "SystemRootToken": ROOT_TOKEN,
                        "Services": {
                            "ContainerWebServices": {"ExternalURL": "https://*.c.example.com"},
                            "Controller": {"ExternalURL": bad},
                        },
                        "ArvProxy": {"Backend": "arvados"},
                    }
                }
            }
            with self.assertRaises(ConfigError) as caught:
                parse_config(document, "c.yml")
            self.assertIn("Services.Controller.ExternalURL", str(caught.exception))

    def test_open_cluster(self) -> None:
        """open_cluster: the dispatcher's Env wins, then ArvProxy.Backend, else embedded."""
        from arvproxy.backends.embedded import EmbeddedRegistry

        arvados = config_for({"Backend": "arvados"})
        embedded = config_for({"Registry": self.mktemp()})
        env = {"ARVADOS_API_HOST": "zzzzz.example.com", "ARVADOS_API_TOKEN": "v2/a/b"}
        self.assertIsInstance(open_cluster(reactor, arvados), ArvadosCluster)
        self.assertIsInstance(open_cluster(reactor, embedded), EmbeddedRegistry)
        self.assertIsInstance(open_cluster(reactor, embedded, env), ArvadosCluster)
        # Half an API server is a dispatcher's mistake, not a reason to use the registry.
        with self.assertRaises(ValueError):
            open_cluster(reactor, embedded, {"ARVADOS_API_HOST": "x"})


# --- The dispatcher's Env, and whose token a gateway uses ---------------------------------------


class DispatchEnvTests(unittest.SynchronousTestCase):
    def test_parse(self) -> None:
        """ARVADOS_API_HOST is host:port as dispatchers pass it; a URL or half an Env is refused."""
        t = "v2/zzzzz-gj3su-000000000000001/secret"
        # (ARVADOS_API_HOST, ARVADOS_API_TOKEN, ARVADOS_API_HOST_INSECURE, URL and insecure or
        # what the error says); None leaves the variable out.
        table: list[tuple[str | None, str | None, str | None, Any]] = [
            ("zzzzz.example.com", t, None, ("https://zzzzz.example.com/", False)),
            ("zzzzz.example.com:8443/", t, None, ("https://zzzzz.example.com:8443/", False)),
            ("[::1]:8443", t, "1", ("https://[::1]:8443/", True)),
            ("h:1", t, "TRUE", ("https://h:1/", True)),
            ("h:1", t, "yes", ("https://h:1/", True)),
            ("h:1", t, "", ("https://h:1/", False)),
            ("h:1", t, "0", ("https://h:1/", False)),
            (None, None, None, None),
            ("https://zzzzz.example.com", t, None, "not a URL"),
            ("http://127.0.0.1:9000", t, "1", "not a URL"),
            ("h:99999", t, None, "must be host:port"),
            ("h/api", t, None, "must be host:port"),
            ("h:1", None, None, "ARVADOS_API_TOKEN is not"),
            (None, t, None, "ARVADOS_API_HOST is not"),
        ]
        for host, token, insecure, want in table:
            names = ("ARVADOS_API_HOST", "ARVADOS_API_TOKEN", "ARVADOS_API_HOST_INSECURE")
            env = {
                k: v for k, v in zip(names, (host, token, insecure), strict=True) if v is not None
            }
            if isinstance(want, str):
                with self.assertRaises(ValueError) as caught:
                    parse_dispatch_api(env)
                self.assertIn(want, str(caught.exception), env)
                self.assertNotIn("secret", str(caught.exception))
                continue
            api = parse_dispatch_api(env)
            if want is None:
                self.assertIsNone(api)
                continue
            assert api is not None
            self.assertEqual((api.url, api.insecure), want, env)
            self.assertEqual(api.token, t)
            self.assertNotIn("secret", repr(api))


class LockHolderTests(BackendTestCase):
    """A gateway's token must hold its container's lock, as only the holder may move it on."""

    def gateway_with(self, token: str) -> ArvadosCluster:
        gateway = ArvadosCluster(
            reactor,
            self.server.url,
            token,
            cluster_id="zzzzz",
            service_token_is_root=False,
            clock=self.clock,
        )
        gateway.startService()
        self.addCleanup(gateway.stopService)
        return gateway

    def test_container_token_cannot_start_it(self) -> defer.Deferred[None]:
        """The container's own token neither holds its lock nor moves it to Running."""
        dispatcher = self.api.add_token(self.api.add_user("dispatcher", is_admin=True))
        container = self.api.add_container(LOCKED, locked_by_uuid=dispatcher.split("/")[1])
        self.api.add_container_request(self.project, container)
        own = self.gateway_with(self.api.container_token(container))
        other = self.gateway_with(self.api.add_token(self.api.add_user("other", is_admin=True)))

        async def run() -> None:
            for gateway in (own, other):
                with self.assertRaises(NotLockHolder) as caught:
                    await gateway.container_auth(container)
                self.assertIn("does not hold the lock", str(caught.exception))
            with self.assertRaises(Unavailable):
                await own.update_container(container, state=RUNNING, gateway_address=GATEWAY)
            self.assertEqual(self.api.containers[container]["state"], LOCKED)
            holder = self.gateway_with(dispatcher)
            self.assertTrue((await holder.container_auth(container)).endswith("/" + container))
            await holder.update_container(container, state=RUNNING, gateway_address=GATEWAY)
            self.assertEqual(self.api.containers[container]["state"], RUNNING)

        return defer.ensureDeferred(run())
