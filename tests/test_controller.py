"""
Tests for L{arvproxy.controller.proxy.Controller}: every outcome of a request to the front door,
and exactly what it forwards to a gateway.  In memory: a L{FakeCluster}, a
L{FakeGatewayConnector} and a L{ProxySite} over a C{StringTransport}.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from arvproxy import policy
from arvproxy.backends import CAN_MANAGE, CAN_READ, CAN_WRITE, CANCELLED, COMPLETE, LOCKED, QUEUED
from arvproxy.backends.cache import CachedCluster
from arvproxy.config import ClusterConfig, ExternalURL
from arvproxy.controller.proxy import Controller
from arvproxy.controller.statecookies import StateCookies
from arvproxy.errors import BadGateway, GatewayTimeout, NotFound, Unauthorized
from arvproxy.httpserver import ProxySite
from arvproxy.policy import ANONYMOUS_CLIENT as ANONYMOUS_HEADER
from arvproxy.testing import (
    FakeCluster,
    FakeGatewayConnector,
    FakeResponse,
    GatewayCall,
    MemoryClient,
    ParsedResponse,
    request_bytes,
)

T0 = 1_700_000_000.0
ROOT_TOKEN = "RootTokenForTheseTests0123456789abcdefgh"
SUFFIX = "containers.example.com"
GATEWAY = "127.0.0.1:9001"
PORT = 8888
NAVIGATE = [(b"Sec-Fetch-Mode", b"navigate"), (b"Accept", b"text/html")]
FETCH = [(b"Sec-Fetch-Mode", b"cors"), (b"Accept", b"*/*")]


def cookie(token: str, secure: bool = True) -> tuple[bytes, bytes]:
    """The token cookie, named as the front door names it for an https (or http) ExternalURL."""
    name = policy.token_cookie_name(secure)
    return (b"Cookie", name + b"=" + policy.encode_token_cookie(token.encode()))


class ControllerTestCase(SynchronousTestCase):
    """
    A cluster with: alice, who owns C{cr} (using the running container C{container}); bob, who
    can only read C{cr}; carol, who can write it; dave, who cannot see it; an admin.
    """

    scheme = "https"

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.config = ClusterConfig(
            source="test",
            cluster_id="zzzzz",
            system_root_token=ROOT_TOKEN,
            external_url=ExternalURL(self.scheme, SUFFIX),
            trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),),
        )
        self.cluster = FakeCluster("zzzzz", ROOT_TOKEN, clock=self.clock.seconds)
        self.gateways = FakeGatewayConnector()
        self.gateways.responder = lambda call: FakeResponse(
            200, b"OK", [(b"Content-Type", b"text/plain")], b"from the service"
        )
        self.site = ProxySite(
            Controller(self.clock, self.config, self.cluster, cast(Any, self.gateways)), self.clock
        )
        c = self.cluster
        self.alice = c.add_user("Alice")
        self.bob = c.add_user("Bob")
        self.carol = c.add_user("Carol")
        self.dave = c.add_user("Dave")
        self.admin = c.add_user("Admin", is_admin=True)
        self.container = c.add_container(gateway_address=GATEWAY)
        self.cr = c.add_container_request(self.alice.uuid, self.container.uuid)
        c.grant(self.bob.uuid, self.cr.uuid, CAN_READ)
        c.grant(self.carol.uuid, self.cr.uuid, CAN_WRITE)
        self.tokens = {
            name: c.add_token(user.uuid)
            for name, user in [
                ("alice", self.alice),
                ("bob", self.bob),
                ("carol", self.carol),
                ("dave", self.dave),
                ("admin", self.admin),
            ]
        }

    def host(self, uuid: str, port: int = PORT) -> bytes:
        return f"{uuid}-{port}.{SUFFIX}".encode()

    def marker(self, host: bytes, container_uuid: str) -> tuple[bytes, bytes]:
        """The container marker cookie the front door sets on C{host} for C{container_uuid}."""
        cookies = StateCookies(ROOT_TOKEN, self.config.external_url)
        set_cookie = cookies.container_set_cookie(policy.split_host(host)[0], container_uuid)
        return (b"Cookie", set_cookie.split(b";")[0])

    def send(
        self,
        host: bytes | None,
        target: bytes = b"/",
        token: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        method: bytes = b"GET",
        body: bytes = b"",
        peer: str = "127.0.0.1",
    ) -> ParsedResponse:
        """Send one request; return its (complete) response, checked for leaked tokens."""
        all_headers = list(headers)
        if token is not None:
            all_headers.append(cookie(token))
        if body:
            all_headers.append((b"Content-Length", b"%d" % len(body)))
        self.client = MemoryClient(self.site, IPv4Address("TCP", peer, 40000))
        self.client.send(request_bytes(method, target, all_headers, body, host=host))
        response = self.client.response(method)
        self.assertTrue(response.complete)
        self.assertNoSecrets(response)
        return response

    def assertNoSecrets(self, response: ParsedResponse) -> None:
        """No token appears in the response, except in the Set-Cookie of the query redirect."""
        secrets = [ROOT_TOKEN, *(t.token for t in self.cluster.tokens.values())]
        headers = [
            (n, v) for n, v in response.headers if n != b"set-cookie" or response.status != 303
        ]
        shown = b"".join(n + b": " + v for n, v in headers) + response.body
        for secret in secrets:
            self.assertNotIn(secret.encode(), shown)
            self.assertNotIn(policy.encode_token_cookie(secret.encode()), shown)
            self.assertNotIn(secret.split("/")[-1].encode(), shown)

    def assertError(self, response: ParsedResponse, status: int) -> None:
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.header(b"cache-control"), b"no-store")

    def get_ok(self, uuid: str, token: str, port: int = PORT) -> GatewayCall:
        """Expect the request to reach the gateway, and its answer to reach the client."""
        before = len(self.gateways.calls)
        response = self.send(self.host(uuid, port), b"/p", token)
        self.assertEqual((response.status, response.body), (200, b"from the service"))
        self.assertEqual(len(self.gateways.calls), before + 1)
        return self.gateways.calls[-1]


class LookupTests(ControllerTestCase):
    def test_one_lookup_per_request_with_the_container_cookie(self) -> None:
        """A browser that carries the container cookie costs no second lookup of the target."""
        container_cookie = self.marker(self.host(self.cr.uuid), self.container.uuid)
        self.cluster.calls.clear()
        response = self.send(
            self.host(self.cr.uuid), b"/p", self.tokens["alice"], headers=[container_cookie]
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(len(self.cluster.called("get_container_request")), 1)
        self.assertEqual(len(self.cluster.called("get_container")), 1)


class HostTests(ControllerTestCase):
    def test_hosts_that_name_no_target(self) -> None:
        """Hosts outside the suffix or malformed under it are 400; the bare suffix is the page."""
        cases = [
            (b"example.org", 400),
            (b"containers.example.com.evil.org", 400),
            (b"x.containers.example.com", 400),
            (b"zzzzz-xvhdp-short-8888.containers.example.com", 400),
            (self.host(self.cr.uuid, 0), 400),
            (self.host(self.cr.uuid, 70000), 400),
            (self.host(self.cr.uuid) + b":8443", 400),
            (b"bad host!", 400),
            (SUFFIX.encode(), 200),
            (SUFFIX.encode() + b":443", 200),
        ]
        for host, status in cases:
            response = self.send(host, token=self.tokens["alice"])
            self.assertEqual(response.status, status, host)
        self.assertEqual(self.cluster.calls, [])
        self.assertEqual(self.gateways.calls, [])

    def test_no_host(self) -> None:
        """A request without a Host header is a 400."""
        self.assertError(self.send(None), 400)

    def test_explicit_default_port_and_case(self) -> None:
        """The host may carry the ExternalURL's port and any letter case."""
        host = self.host(self.cr.uuid).upper() + b":443"
        response = self.send(host, token=self.tokens["alice"])
        self.assertEqual(response.status, 200)


class QueryTokenTests(ControllerTestCase):
    def test_query_token_moves_to_cookie(self) -> None:
        """?arvados_api_token= becomes a 303 to the same URL without it, and a Secure cookie."""
        token = self.tokens["alice"]
        target = b"/a/b?x=1&arvados_api_token=" + token.encode() + b"&y=2&x=3"
        response = self.send(self.host(self.cr.uuid), target)
        self.assertEqual(response.status, 303)
        self.assertEqual(response.header(b"location"), b"/a/b?x=1&y=2&x=3")
        [set_cookie] = response.all(b"set-cookie")
        self.assertTrue(
            set_cookie.startswith(
                b"__Host-arvados_api_token=" + policy.encode_token_cookie(token.encode()) + b";"
            )
        )
        self.assertIn(b"; Secure", set_cookie)
        self.assertIn(b"HttpOnly", set_cookie)
        self.assertNotIn(token.encode(), response.header(b"location") or b"")
        self.assertNotIn(token.encode(), response.body)
        self.assertEqual(self.cluster.calls, [])
        self.assertEqual(self.gateways.calls, [])

    def test_only_param(self) -> None:
        """A query holding only the token redirects to the bare path."""
        response = self.send(
            self.host(self.cr.uuid), b"/x?arvados_api_token=" + self.tokens["bob"].encode()
        )
        self.assertEqual(response.header(b"location"), b"/x")

    def test_cookie_then_works(self) -> None:
        """The cookie the redirect set is enough to reach the service."""
        response = self.send(
            self.host(self.cr.uuid), b"/?arvados_api_token=" + self.tokens["alice"].encode()
        )
        value = response.header(b"set-cookie") or b""
        pair = value.split(b";")[0]
        response = self.send(self.host(self.cr.uuid), headers=[(b"Cookie", pair)])
        self.assertEqual(response.status, 200)


class PlainQueryTokenTests(ControllerTestCase):
    scheme = "http"

    def test_not_secure_over_http(self) -> None:
        """With an http ExternalURL the cookie is not marked Secure (the browser would drop it)."""
        response = self.send(
            f"{self.cr.uuid}-{PORT}.{SUFFIX}".encode(),
            b"/?arvados_api_token=" + self.tokens["alice"].encode(),
        )
        self.assertEqual(response.status, 303)
        self.assertNotIn(b"Secure", response.header(b"set-cookie") or b"")


class AuthenticationTests(ControllerTestCase):
    def test_no_token(self) -> None:
        """No token: 401 (HTML for a navigation, JSON for fetch), never a redirect; only the
        lookups that tell whether the port is public."""
        page = self.send(self.host(self.cr.uuid), headers=NAVIGATE)
        self.assertError(page, 401)
        self.assertTrue((page.header(b"content-type") or b"").startswith(b"text/html"))
        self.assertIsNone(page.header(b"location"))
        document = self.send(self.host(self.cr.uuid), headers=FETCH)
        self.assertError(document, 401)
        self.assertEqual(document.header(b"content-type"), b"application/json")
        self.assertEqual(json.loads(document.body)["status"], 401)
        self.assertEqual(
            {name for name, _ in self.cluster.calls}, {"get_container_request", "get_container"}
        )
        self.assertEqual(self.gateways.calls, [])

    def test_bad_tokens(self) -> None:
        """Malformed, unknown, revoked and expired tokens, and inactive users, get 401."""
        expiring = self.cluster.add_token(self.alice.uuid, ttl=60)
        revoked = self.cluster.add_token(self.alice.uuid)
        self.cluster.revoke_token(revoked)
        inactive_user = self.cluster.add_user("Gone")
        inactive = self.cluster.add_token(inactive_user.uuid)
        self.cluster.set_user_active(inactive_user.uuid, False)
        self.assertEqual(self.send(self.host(self.cr.uuid), token=expiring).status, 200)
        self.clock.advance(61)
        wrong_secret = self.tokens["alice"][:-1] + "Q"
        for token in ["garbage", wrong_secret, revoked, expiring, inactive, "v2/x/y"]:
            response = self.send(self.host(self.cr.uuid), token=token, headers=FETCH)
            self.assertError(response, 401)
            self.assertNotIn(token.encode(), response.body)
        self.assertEqual(len(self.gateways.calls), 1)

    def test_undecodable_cookie(self) -> None:
        """A cookie whose token is not ASCII is a 401, not a crash."""
        response = self.send(
            self.host(self.cr.uuid),
            headers=[(b"Cookie", b"arvados_api_token=" + policy.encode_token_cookie(b"\xff\xfe"))],
        )
        self.assertError(response, 401)

    def test_root_token(self) -> None:
        """The SystemRootToken may connect to any container."""
        self.get_ok(self.cr.uuid, ROOT_TOKEN)


class PermissionTests(ControllerTestCase):
    def test_access_table(self) -> None:
        """Owner, writer and admin connect; a reader is refused; others cannot see the target."""
        cases = [
            ("alice", 200),
            ("carol", 200),
            ("admin", 200),
            ("bob", 403),
            ("dave", 404),
        ]
        for uuid in (self.cr.uuid, self.container.uuid):
            for name, status in cases:
                response = self.send(self.host(uuid), token=self.tokens[name])
                self.assertEqual(response.status, status, (uuid, name))

    def test_scopes(self) -> None:
        """A token scoped to exactly this target and port works; any other scope is 403."""
        c = self.cluster
        cr, container = self.cr.uuid, self.container.uuid
        # (scoped to, named in the URL) -> status: a request's scope does not open its container's
        # URL (which other requests may share), a container's scope opens both.
        table = {
            (cr, cr): 200,
            (cr, container): 403,
            (container, cr): 200,
            (container, container): 200,
        }
        for (scoped_to, named), status in table.items():
            token = c.add_token(self.alice.uuid, [policy.connect_scope(scoped_to, PORT)])
            self.assertEqual(self.send(self.host(named), token=token).status, status)
            self.assertEqual(self.send(self.host(named, PORT + 1), token=token).status, 403)
        for scopes in (["GET /arvados/v1/users/current"], [policy.connect_scope(self.cr.uuid, 1)]):
            token = c.add_token(self.alice.uuid, scopes)
            self.assertError(self.send(self.host(self.cr.uuid), token=token), 403)
        other = c.add_container_request(self.alice.uuid, self.container.uuid)
        token = c.add_token(self.alice.uuid, [policy.connect_scope(other.uuid, PORT)])
        self.assertError(self.send(self.host(self.cr.uuid), token=token), 403)

    def test_unknown_targets(self) -> None:
        """Unknown requests and containers, and UUIDs of other record types, are 404."""
        for uuid in (
            "zzzzz-xvhdp-000000000000999",
            "zzzzz-dz642-000000000000999",
            self.alice.uuid,
            "zzzzz-gj3su-000000000000001",
        ):
            response = self.send(self.host(uuid), token=self.tokens["alice"])
            self.assertError(response, 404)
        self.assertEqual(self.gateways.calls, [])

    def test_container_without_requests(self) -> None:
        """A container no request uses is invisible to users (404) but open to an admin."""
        orphan = self.cluster.add_container()
        self.assertError(self.send(self.host(orphan.uuid), token=self.tokens["alice"]), 404)
        self.get_ok(orphan.uuid, self.tokens["admin"])

    def test_shared_container(self) -> None:
        """A container two users' requests share: its URL refuses each user, not an admin."""
        c = self.cluster
        shared = c.add_container(gateway_address=GATEWAY)
        mine = c.add_container_request(self.alice.uuid, shared.uuid)
        theirs = c.add_container_request(self.bob.uuid, shared.uuid)
        self.assertError(self.send(self.host(shared.uuid), token=self.tokens["alice"]), 403)
        self.assertError(self.send(self.host(shared.uuid), token=self.tokens["bob"]), 403)
        self.get_ok(shared.uuid, self.tokens["admin"])
        # Through their own request's URL, each connects (only that request is checked).
        self.get_ok(mine.uuid, self.tokens["alice"])
        self.get_ok(theirs.uuid, self.tokens["bob"])
        # With write on both, the container URL works too.
        c.grant(self.alice.uuid, theirs.uuid, CAN_MANAGE)
        self.get_ok(shared.uuid, self.tokens["alice"])


class ContainerStateTests(ControllerTestCase):
    def test_not_running_yet(self) -> None:
        """Not running or no gateway yet: 503, Retry-After and a page that refreshes itself."""
        c = self.cluster
        queued = c.add_container(state=QUEUED, gateway_address="")
        locked = c.add_container(state=LOCKED, gateway_address="")
        starting = c.add_container(gateway_address="")
        uuids = [
            c.add_container_request(self.alice.uuid, container.uuid).uuid
            for container in (queued, locked, starting)
        ]
        uuids.append(c.add_container_request(self.alice.uuid, None).uuid)
        for uuid in uuids:
            response = self.send(self.host(uuid), token=self.tokens["alice"], headers=NAVIGATE)
            self.assertError(response, 503)
            self.assertEqual(response.header(b"retry-after"), b"5")
            self.assertIn(b'http-equiv="refresh"', response.body)
        self.assertEqual(self.gateways.calls, [])

    def test_finished(self) -> None:
        """A Complete or Cancelled container is 410."""
        for state in (COMPLETE, CANCELLED):
            container = self.cluster.add_container(state=state, gateway_address=GATEWAY)
            cr = self.cluster.add_container_request(self.alice.uuid, container.uuid)
            response = self.send(self.host(cr.uuid), token=self.tokens["alice"])
            self.assertError(response, 410)
            self.assertIsNone(response.header(b"retry-after"))
        self.assertEqual(self.gateways.calls, [])

    def test_permission_before_state(self) -> None:
        """Someone who may not connect learns nothing about the container's state."""
        container = self.cluster.add_container(state=QUEUED, gateway_address="")
        cr = self.cluster.add_container_request(self.alice.uuid, container.uuid)
        self.assertError(self.send(self.host(cr.uuid), token=self.tokens["dave"]), 404)
        # Not even that a request has no container yet.
        pending = self.cluster.add_container_request(self.alice.uuid, None)
        self.assertError(self.send(self.host(pending.uuid), token=self.tokens["dave"]), 404)

    def test_unknown_and_unreadable_look_alike(self) -> None:
        """An unknown UUID and one the user may not see get the very same answer."""
        hidden = self.cluster.add_container_request(self.alice.uuid, None).uuid
        unknown = hidden[:-3] + ("zzz" if not hidden.endswith("zzz") else "yyy")
        answers = []
        for uuid in (hidden, unknown):
            response = self.send(self.host(uuid), token=self.tokens["dave"])
            self.assertError(response, 404)
            answers.append(response.body.replace(uuid.encode(), b"UUID"))
        self.assertEqual(answers[0], answers[1])


class KeptDecisionTests(ControllerTestCase):
    """
    The decision kept on a connection (L{Controller._decided}) lets a request through without
    its checks only when they would decide the same: the same Host and cookies, nothing changed
    in the cluster (a L{CachedCluster} with a version), and the token not expired.  Each row
    opens a connection, lets alice through once, then sends its second request on it.
    """

    def setUp(self) -> None:
        super().setUp()
        self.version = 1
        self.cached = CachedCluster(self.clock, self.cluster, 60.0, version=lambda: self.version)
        self.site = ProxySite(
            Controller(self.clock, self.config, self.cached, cast(Any, self.gateways)), self.clock
        )
        self.decided = 0
        controller: Any = self.site.handler
        decide = controller._decide

        def counted(*args: Any) -> Any:
            self.decided += 1
            return decide(*args)

        controller._decide = counted

    def on(self, client: MemoryClient, host: bytes, target: bytes = b"/", cookies: Any = ()) -> int:
        """Send one more request on C{client}'s connection; its status."""
        client.transport.clear()
        client.send(request_bytes(b"GET", target, list(cookies), b"", host=host))
        response = client.response()
        self.assertNoSecrets(response)
        return response.status

    def changed(self) -> None:
        """The registry's data changed; the cache looks again in the next reactor turn."""
        self.version += 1
        self.clock.advance(0)

    def revoke(self) -> None:
        self.cluster.revoke_token(self.tokens["alice"])
        self.changed()

    def finish(self) -> None:
        self.cluster.update_container(self.container.uuid, state=COMPLETE)
        self.changed()

    def unshare(self) -> None:
        self.cluster.container_requests[self.cr.uuid] = replace(self.cr, owner_uuid=self.dave.uuid)
        self.changed()

    def test_table(self) -> None:
        """(what changes between two requests on a connection, the second) → its status."""
        rows: list[tuple[str, Any, Any, int]] = [
            # (what happens between the requests, the second request, its status)
            ("nothing", None, lambda alice, host, other: (host, b"/", [alice]), 200),
            (
                "another user's token",
                None,
                lambda alice, host, other: (host, b"/", [cookie(self.tokens["dave"])]),
                404,
            ),
            ("no token", None, lambda alice, host, other: (host, b"/", []), 401),
            (
                "another vhost",
                None,
                lambda alice, host, other: (self.host(other.uuid), b"/", [alice]),
                404,
            ),
            (
                "another port",
                None,
                lambda alice, host, other: (self.host(self.cr.uuid, 9999), b"/", [alice]),
                200,
            ),
            (
                "a token in the query",
                None,
                lambda alice, host, other: (
                    host,
                    b"/?arvados_api_token=" + self.tokens["alice"].encode(),
                    [alice],
                ),
                303,
            ),
            (
                "a previous container's cookie",
                None,
                lambda alice, host, other: (
                    host,
                    b"/",
                    [alice, self.marker(host, other.container_uuid)],
                ),
                303,
            ),
            (
                "a planted, unsigned container cookie",
                None,
                lambda alice, host, other: (
                    host,
                    b"/",
                    [
                        alice,
                        (b"Cookie", b"arvados_container_uuid=" + other.container_uuid.encode()),
                    ],
                ),
                200,
            ),
            ("token revoked", self.revoke, lambda alice, host, other: (host, b"/", [alice]), 401),
            (
                "container finished",
                self.finish,
                lambda alice, host, other: (host, b"/", [alice]),
                410,
            ),
            (
                "request no longer alice's",
                self.unshare,
                lambda alice, host, other: (host, b"/", [alice]),
                404,
            ),
        ]
        for name, between, second, status in rows:
            self.setUp()  # A fresh cluster and front door for each row.
            other = self.cluster.add_container_request(
                self.dave.uuid, self.cluster.add_container(gateway_address=GATEWAY).uuid
            )
            alice, host = cookie(self.tokens["alice"]), self.host(self.cr.uuid)
            client = MemoryClient(self.site, IPv4Address("TCP", "127.0.0.1", 40000))
            self.assertEqual(self.on(client, host, cookies=[alice]), 200, name)
            self.assertEqual(self.decided, 1, name)
            if between is not None:
                between()
            second_host, target, cookies = second(alice, host, other)
            self.assertEqual(self.on(client, second_host, target, cookies), status, name)
            # Only the unchanged request goes through on the kept decision.
            self.assertEqual(self.decided, 1 if name == "nothing" else 2, name)

    def test_change_while_deciding(self) -> None:
        """
        A decision during which the cluster changed is not kept: its answers may be from before
        the change (here the token is revoked between the token check and the permission check).
        """
        permission_level = self.cached.permission_level

        def revoking(*args: Any, **kwargs: Any) -> Any:
            answer = permission_level(*args, **kwargs)
            if self.tokens["alice"].split("/")[1] in self.cluster.tokens:
                self.revoke()
            return answer

        self.cached.permission_level = revoking  # type: ignore[method-assign]
        client = MemoryClient(self.site, IPv4Address("TCP", "127.0.0.1", 40000))
        host, alice = self.host(self.cr.uuid), cookie(self.tokens["alice"])
        self.assertEqual(self.on(client, host, cookies=[alice]), 200)  # In flight already.
        self.assertEqual(self.on(client, host, cookies=[alice]), 401)
        self.assertEqual(self.decided, 2)

    def test_expired_token(self) -> None:
        """A token that expires is refused on the connection that was let through with it."""
        short = cookie(self.cluster.add_token(self.alice.uuid, ttl=30))
        client = MemoryClient(self.site, IPv4Address("TCP", "127.0.0.1", 40000))
        host = self.host(self.cr.uuid)
        self.assertEqual(self.on(client, host, cookies=[short]), 200)
        self.clock.advance(29)
        self.assertEqual(self.on(client, host, cookies=[short]), 200)
        self.assertEqual(self.decided, 1)
        self.clock.advance(1)
        self.assertEqual(self.on(client, host, cookies=[short]), 401)

    def test_per_connection(self) -> None:
        """A decision is its connection's: another connection is checked on its own."""
        host = self.host(self.cr.uuid)
        first = MemoryClient(self.site, IPv4Address("TCP", "127.0.0.1", 40000))
        self.assertEqual(self.on(first, host, cookies=[cookie(self.tokens["alice"])]), 200)
        second = MemoryClient(self.site, IPv4Address("TCP", "127.0.0.1", 40001))
        self.assertEqual(self.on(second, host, cookies=[cookie(self.tokens["dave"])]), 404)
        self.assertEqual(self.on(second, host, cookies=[cookie(self.tokens["alice"])]), 200)
        self.assertEqual(self.decided, 3)

    def test_not_kept_without_version(self) -> None:
        """A cluster that cannot say when its answers change gets every request checked."""
        self.cached = CachedCluster(self.clock, self.cluster, 60.0)
        self.site = ProxySite(
            Controller(self.clock, self.config, self.cached, cast(Any, self.gateways)), self.clock
        )
        client = MemoryClient(self.site, IPv4Address("TCP", "127.0.0.1", 40000))
        calls = len(self.cluster.called("authenticate"))
        for _ in range(3):
            self.assertEqual(
                self.on(client, self.host(self.cr.uuid), cookies=[cookie(self.tokens["alice"])]),
                200,
            )
        self.assertEqual(len(self.cluster.called("authenticate")), calls + 1)
        self.assertIsNone(client.protocol.kept)


class ForwardingTests(ControllerTestCase):
    def test_headers_to_gateway(self) -> None:
        """Exactly the expected headers reach the gateway (no token cookie, hop-by-hop, forged)."""
        headers = [
            (
                b"Cookie",
                b"a=1; __Host-arvados_api_token="
                + policy.encode_token_cookie(self.tokens["alice"].encode())
                + b"; b=2; arvados_api_token=old; __Host-arvados_container_uuid=x",
            ),
            (b"Cookie", b"c=3"),
            (b"Authorization", b"Bearer service-own-credential"),
            (b"X-Arvados-Target-Uuid", b"zzzzz-dz642-forged000000000"),
            (b"X-Arvados-Authorization", b"forged"),
            (b"X-Arvados-Request-Host", b"evil.example"),
            (b"X-Forwarded-For", b"6.6.6.6"),
            (b"X-Forwarded-Proto", b"gopher"),
            (b"X-Forwarded-Host", b"evil.example"),
            (b"Connection", b"keep-alive, x-drop-me"),
            (b"X-Drop-Me", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Proxy-Authorization", b"Basic eA=="),
            (b"Accept", b"text/html"),
            (b"X-Multi", b"1"),
            (b"X-Multi", b"2"),
        ]
        host = self.host(self.cr.uuid)
        response = self.send(
            host, b"/some/path?q=1&r=2", headers=headers, method=b"POST", body=b"data"
        )
        self.assertEqual(response.status, 200)
        [call] = self.gateways.calls
        self.assertEqual(
            (call.container_uuid, call.address, call.method, call.path),
            (self.container.uuid, GATEWAY, b"POST", b"/some/path?q=1&r=2"),
        )
        secret = policy.gateway_secret(ROOT_TOKEN, self.container.uuid)
        self.assertEqual(call.secret, secret)
        self.assertEqual(call.received.data, b"data")
        sent = {name.lower(): values for name, values in call.headers.getAllRawHeaders()}
        binding = policy.request_binding(call.method, call.path, call.headers)
        signature = sent.pop(policy.SIGNATURE)
        policy.verify(signature, secret, self.clock.seconds(), policy.NonceCache(300), binding)
        self.assertEqual(
            sent,
            {
                b"cookie": [b"a=1; b=2", b"c=3"],
                b"authorization": [b"Bearer service-own-credential"],
                b"accept": [b"text/html"],
                b"x-multi": [b"1", b"2"],
                # No content-length: the next hop's framing comes from the streaming body.
                b"x-forwarded-for": [b"127.0.0.1"],
                b"x-real-ip": [b"127.0.0.1"],
                b"x-forwarded-proto": [b"https"],
                b"x-forwarded-host": [host],
                b"x-arvados-target-uuid": [self.container.uuid.encode()],
                b"x-arvados-target-port": [b"%d" % PORT],
                b"x-arvados-request-host": [host],
            },
        )

    def test_fresh_signatures(self) -> None:
        """Each forwarded request carries its own signature (no nonce reused)."""
        first = self.get_ok(self.cr.uuid, self.tokens["alice"])
        second = self.get_ok(self.cr.uuid, self.tokens["alice"])
        values = [c.headers.getRawHeaders(policy.SIGNATURE) for c in (first, second)]
        self.assertNotEqual(values[0], values[1])
        nonces = policy.NonceCache(300)
        secret = policy.gateway_secret(ROOT_TOKEN, self.container.uuid)
        for call, value in zip((first, second), values, strict=True):
            binding = policy.request_binding(call.method, call.path, call.headers)
            policy.verify(value, secret, self.clock.seconds(), nonces, binding)

    def test_trusted_proxy(self) -> None:
        """
        A trusted proxy's X-Forwarded-For is extended and its -Proto kept; an untrusted peer's
        are replaced.  X-Forwarded-Host is always the routed host, X-Real-IP the client's.
        """
        forwarded = [
            (b"X-Forwarded-For", b"198.51.100.7"),
            (b"X-Forwarded-Proto", b"http"),
            (b"X-Forwarded-Host", b"front.example"),
        ]
        host = self.host(self.cr.uuid)
        expected = {
            "10.1.2.3": ([b"198.51.100.7, 10.1.2.3"], [b"http"], [host], [b"198.51.100.7"]),
            "192.0.2.9": ([b"192.0.2.9"], [b"https"], [host], [b"192.0.2.9"]),
        }
        for peer, (xff, proto, xhost, real_ip) in expected.items():
            self.send(host, token=self.tokens["alice"], headers=forwarded, peer=peer)
            sent = self.gateways.calls[-1].headers
            self.assertEqual(
                (
                    sent.getRawHeaders(b"x-forwarded-for"),
                    sent.getRawHeaders(b"x-forwarded-proto"),
                    sent.getRawHeaders(b"x-forwarded-host"),
                    sent.getRawHeaders(b"x-real-ip"),
                ),
                (xff, proto, xhost, real_ip),
                peer,
            )

    def test_target_uuid_is_container(self) -> None:
        """Whether the URL names the request or the container, the gateway is told the container."""
        for uuid in (self.cr.uuid, self.container.uuid):
            call = self.get_ok(uuid, self.tokens["alice"], port=8001)
            self.assertEqual(
                call.headers.getRawHeaders(policy.TARGET_UUID), [self.container.uuid.encode()]
            )
            self.assertEqual(call.headers.getRawHeaders(policy.TARGET_PORT), [b"8001"])

    def test_gateway_refusal(self) -> None:
        """A gateway's own refusal becomes a 502 for the client, without the gateway's marker."""
        self.gateways.responder = lambda call: FakeResponse(
            401, b"Unauthorized", [(policy.GATEWAY_ERROR, b"bad signature")], b"gateway page"
        )
        response = self.send(self.host(self.cr.uuid), token=self.tokens["alice"], headers=FETCH)
        self.assertError(response, 502)
        self.assertNotIn(policy.GATEWAY_ERROR, response.names())
        self.assertNotIn(b"gateway page", response.body)

    def test_service_errors_pass(self) -> None:
        """The service's own error responses reach the client as they are."""
        self.gateways.responder = lambda call: FakeResponse(
            401, b"Who Are You", [(b"WWW-Authenticate", b"Basic")], b"service says no"
        )
        response = self.send(self.host(self.cr.uuid), token=self.tokens["alice"])
        self.assertEqual((response.status, response.reason), (401, b"Who Are You"))
        self.assertEqual(response.body, b"service says no")

    def test_connector_errors(self) -> None:
        """A gateway that cannot be reached or does not answer gives a 502 or 504 page."""
        for error, status in [
            (BadGateway("The container's gateway cannot be reached."), 502),
            (GatewayTimeout("The container's gateway did not answer in time."), 504),
        ]:
            self.gateways.error = error
            response = self.send(
                self.host(self.cr.uuid), token=self.tokens["alice"], headers=NAVIGATE
            )
            self.assertError(response, status)
            self.assertIn(error.message.replace("'", "&#x27;").encode(), response.body)

    def test_body_not_read_when_refused(self) -> None:
        """A refused upload is answered before its body is read, and the connection closes."""
        client = MemoryClient(self.site)
        client.send(
            request_bytes(
                b"PUT",
                b"/",
                [cookie(self.tokens["bob"]), (b"Content-Length", b"100000")],
                b"partial",
                host=self.host(self.cr.uuid),
            )
        )
        response = client.response(b"PUT")
        self.assertEqual(response.status, 403)
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(client.closed)
        self.assertEqual(self.gateways.calls, [])

    def test_cluster_lookups(self) -> None:
        """
        A container request's URL costs five lookups: token, request, container, one level, and
        the container's requests (any may prohibit connections); the first also marks the
        container (a session started).
        """
        lookups = [
            "authenticate",
            "get_container_request",
            "get_container",
            "permission_level",
            "container_requests_for",
        ]
        self.get_ok(self.cr.uuid, self.tokens["carol"])
        names: list[Any] = [name for name, _ in self.cluster.calls]
        self.assertEqual(names, [*lookups, "update_container"])
        self.cluster.calls.clear()
        self.get_ok(self.cr.uuid, self.tokens["carol"])
        self.assertEqual([name for name, _ in self.cluster.calls], lookups)


class FakeClusterTests(SynchronousTestCase):
    def test_contract(self) -> None:
        """The fake provides ICluster and keeps the registry's rules for updates and levels."""
        from zope.interface.verify import verifyObject

        from arvproxy.backends import RUNNING, ICluster

        cluster = FakeCluster(clock=lambda: T0)
        verifyObject(ICluster, cluster)
        user = cluster.add_user("U")
        container = cluster.add_container(state=QUEUED, gateway_address="")
        cr = cluster.add_container_request(user.uuid, container.uuid)
        running = self.successResultOf(cluster.update_container(container.uuid, state=RUNNING))
        self.assertIsNotNone(running.started_at)
        self.successResultOf(cluster.update_container(container.uuid, state=COMPLETE))
        self.assertEqual(cluster.container_requests[cr.uuid].state, "Final")
        self.failureResultOf(cluster.update_container(container.uuid, state=RUNNING), ValueError)
        self.failureResultOf(cluster.update_container("zzzzz-dz642-000000000000999"), NotFound)
        self.assertEqual(
            self.successResultOf(cluster.permission_level(user.uuid, cr.uuid)), CAN_MANAGE
        )
        self.assertIsNone(self.successResultOf(cluster.permission_level(user.uuid, container.uuid)))
        self.failureResultOf(cluster.authenticate("v2/nonsense"), Unauthorized)


PUBLIC, PRIVATE = 8001, 8002


class AnonymousBudgetTests(ControllerTestCase):
    """
    Anonymous visitors of a public port (no token, or one whose user has no access) get only a
    share of the container's connections, each client address a part of it; people with access
    always have the rest (issue 16, hole 8).  Every request here stays open (the gateway has
    not answered) until L{answer_all}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.config = replace(
            self.config,
            limits=replace(
                self.config.limits,
                max_connections_per_container=8,
                max_anonymous_connections_per_container=3,
                max_anonymous_connections_per_address=2,
            ),
        )
        ports = {str(PUBLIC): {"access": "public"}, str(PRIVATE): {"access": "private"}}
        self.public_cr = self.cluster.add_container_request(
            self.alice.uuid, self.container.uuid, published_ports=ports
        )
        self.cluster.grant(self.bob.uuid, self.public_cr.uuid, CAN_READ)
        self.cluster.grant(self.carol.uuid, self.public_cr.uuid, CAN_WRITE)
        self.pending: list[Any] = []
        self.gateways.responder = self.hold_answer
        self.controller = Controller(
            self.clock, self.config, self.cluster, cast(Any, self.gateways)
        )
        self.site = ProxySite(self.controller, self.clock)
        self.open: list[MemoryClient] = []

    def hold_answer(self, call: GatewayCall) -> Any:
        d: Any = Deferred()
        self.pending.append(d)
        return d

    def answer_all(self) -> None:
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(FakeResponse(200, b"OK", [], b"done"))

    def open_request(
        self,
        port: int,
        peer: str,
        token: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> str:
        """
        Send a request that the gateway holds open (if it gets there): "open", or the
        first words of the refusal.
        """
        all_headers = list(headers) + ([cookie(token)] if token is not None else [])
        client = MemoryClient(self.site, IPv4Address("TCP", peer, 40000))
        calls = len(self.gateways.calls)
        client.send(
            request_bytes(b"GET", b"/ws", all_headers, host=self.host(self.public_cr.uuid, port))
        )
        if len(self.gateways.calls) > calls:
            self.assertEqual(client.value(), b"")
            self.open.append(client)
            return "open"
        response = client.response()
        self.assertEqual(response.status, 503, response.body)
        self.assertEqual(response.header(b"retry-after"), b"2")
        [message] = json.loads(response.body)["errors"]
        return " ".join(message.split()[:3])

    def test_table(self) -> None:
        """Each request in turn is let through or refused with 503, for the right reason."""
        t = self.tokens
        visitors = "Too many visitors"
        address = "Your address has"
        # (who: peer and token, port, outcome)
        steps: list[tuple[str, str | None, int, str]] = [
            ("192.0.2.1", None, PUBLIC, "open"),
            ("192.0.2.1", None, PUBLIC, "open"),
            ("192.0.2.1", None, PUBLIC, address),
            ("192.0.2.2", None, PUBLIC, "open"),
            ("192.0.2.3", None, PUBLIC, visitors),
            # Signed in, but without access: anonymous all the same.
            ("192.0.2.4", t["dave"], PUBLIC, visitors),
            ("192.0.2.4", t["bob"], PUBLIC, visitors),
            # A token that is not valid is no token.
            ("192.0.2.4", t["alice"] + "x", PUBLIC, visitors),
            # People with access have the rest, on the private port and the public one.
            ("192.0.2.1", t["alice"], PRIVATE, "open"),
            ("192.0.2.1", t["alice"], PUBLIC, "open"),
            ("192.0.2.5", t["carol"], PUBLIC, "open"),
            ("192.0.2.6", t["admin"], PRIVATE, "open"),
            ("192.0.2.6", t["alice"], PRIVATE, "open"),
            # Until the whole budget is used up.
            ("192.0.2.1", t["alice"], PRIVATE, "Too many connections"),
        ]
        for i, (peer, token, port, outcome) in enumerate(steps):
            self.assertEqual(self.open_request(port, peer, token), outcome, (i, peer, port))
        self.assertEqual(self.controller._slots.open_anonymous(self.container.uuid), 3)
        self.answer_all()
        self.assertEqual([c.response().status for c in self.open], [200] * 8)
        self.assertEqual(self.controller._slots.open(self.container.uuid), 0)
        self.assertEqual(self.open_request(PUBLIC, "192.0.2.3"), "open")

    def test_scoped_token(self) -> None:
        """A token scoped to another port of the container opens the public one anonymously."""
        scoped = self.cluster.add_token(
            self.alice.uuid, scopes=[policy.connect_scope(self.public_cr.uuid, PRIVATE)]
        )
        self.assertEqual(self.open_request(PUBLIC, "192.0.2.1", scoped), "open")
        self.assertEqual(self.controller._slots.open_anonymous(self.container.uuid), 1)
        self.assertEqual(self.open_request(PRIVATE, "192.0.2.1", scoped), "open")
        self.assertEqual(self.controller._slots.open_anonymous(self.container.uuid), 1)

    def test_gateway_is_told(self) -> None:
        """Only an anonymous request tells the gateway its client; a client cannot say it."""
        forged = [(b"X-Arvados-Anonymous-Client", b"192.0.2.99")]
        self.open_request(PUBLIC, "192.0.2.1", headers=forged)
        self.open_request(PUBLIC, "192.0.2.1", self.tokens["alice"], headers=forged)
        self.open_request(PRIVATE, "192.0.2.1", self.tokens["alice"], headers=forged)
        told = [c.headers.getRawHeaders(ANONYMOUS_HEADER) for c in self.gateways.calls]
        self.assertEqual(told, [[b"192.0.2.1"], None, None])

    def test_behind_a_trusted_proxy(self) -> None:
        """Behind a trusted proxy each client counts under the address the proxy saw."""
        for client, outcome in [
            (b"198.51.100.7", "open"),
            (b"203.0.113.1, 198.51.100.7", "open"),
            (b"203.0.113.2, 198.51.100.7", "Your address has"),
            (b"198.51.100.8", "open"),
        ]:
            headers = [(b"X-Forwarded-For", client)]
            self.assertEqual(self.open_request(PUBLIC, "10.0.0.5", headers=headers), outcome)
        told = [c.headers.getRawHeaders(ANONYMOUS_HEADER) for c in self.gateways.calls]
        self.assertEqual(told, [[b"198.51.100.7"]] * 2 + [[b"198.51.100.8"]])
        # From a peer that is not trusted, X-Forwarded-For is no one's address.
        headers = [(b"X-Forwarded-For", b"198.51.100.9")]
        self.assertEqual(
            self.open_request(PUBLIC, "192.0.2.1", headers=headers), "Too many visitors"
        )

    def test_kept_decision(self) -> None:
        """A decision kept on a connection keeps whether its user had access."""
        cached = CachedCluster(self.clock, self.cluster, 60.0, version=lambda: 1)
        controller = Controller(self.clock, self.config, cached, cast(Any, self.gateways))
        site = ProxySite(controller, self.clock)
        self.gateways.responder = lambda call: FakeResponse(200, b"OK", [], b"done")
        seen: list[str | None] = []
        hold = controller._slots.hold

        def recording(uuid: str, anonymous: str | None = None) -> Any:
            seen.append(anonymous)
            return hold(uuid, anonymous)

        controller._slots.hold = recording  # type: ignore[method-assign]
        decide = controller._decide
        decided: list[object] = []

        def counted(*args: Any) -> Any:
            decided.append(args)
            return decide(*args)

        controller._decide = counted  # type: ignore[method-assign]
        host = self.host(self.public_cr.uuid, PUBLIC)
        for token in [None, self.tokens["alice"], self.tokens["dave"]]:
            client = MemoryClient(site, IPv4Address("TCP", "192.0.2.1", 40000))
            for _ in range(2):
                client.transport.clear()
                headers = [cookie(token)] if token is not None else []
                client.send(request_bytes(b"GET", b"/", headers, host=host))
                self.assertEqual(client.response().status, 200)
        self.assertEqual(seen, ["192.0.2.1", "192.0.2.1", None, None, "192.0.2.1", "192.0.2.1"])
        self.assertEqual(len(decided), 3)  # The second request on each connection was kept.
