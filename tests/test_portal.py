"""
Tests for the container services page (L{arvproxy.controller.portal}), and for what the
controller does with published ports: public ports, and clearing a previous container's state
(L{arvproxy.controller.sitedata}).  In memory: a L{FakeCluster} (with the two calls the page
needs), a L{FakeGatewayConnector} and a L{ProxySite} over a C{StringTransport}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.backends import CAN_READ, CAN_WRITE, COMPLETE, QUEUED, ContainerRequest
from arvproxy.backends.registry import Token
from arvproxy.config import ClusterConfig, ExternalURL
from arvproxy.controller import portal, sitedata
from arvproxy.controller.proxy import Controller
from arvproxy.controller.statecookies import StateCookies
from arvproxy.httpserver import ProxySite
from arvproxy.testing import (
    FakeCluster,
    FakeGatewayConnector,
    FakeResponse,
    MemoryClient,
    ParsedResponse,
    request_bytes,
)

T0 = 1_700_000_000.0
ROOT_TOKEN = "RootTokenForThePortalTests0123456789abcd"
SUFFIX = "containers.example.com"
ORIGIN = b"https://" + SUFFIX.encode()
GATEWAY = "127.0.0.1:9001"
SAME_ORIGIN = [(b"Origin", ORIGIN), (b"Sec-Fetch-Site", b"same-origin")]
API = [*SAME_ORIGIN, (b"X-Requested-With", b"arvproxy"), (b"Content-Type", b"application/json")]


class PortalCluster(FakeCluster):
    """The fake cluster, plus the two calls the page needs (as the embedded registry has)."""

    def list_container_requests(
        self, owner_uuid: str | None = None, credentials: Any = None
    ) -> Any:
        return self._answer(
            "list_container_requests",
            (owner_uuid,),
            lambda: [
                cr
                for cr in self.container_requests.values()
                if owner_uuid is None or cr.owner_uuid == owner_uuid
            ],
        )

    def create_token(
        self,
        user_uuid: str,
        scopes: Iterable[str] = ("all",),
        ttl: float | None = None,
        credentials: Any = None,
    ) -> Any:
        def create() -> tuple[str, Token]:
            token = self.add_token(user_uuid, list(scopes), ttl)
            expires = None if ttl is None else datetime.fromtimestamp(self.clock() + ttl, UTC)
            return token, Token(token.split("/")[1], user_uuid, tuple(scopes), expires)

        return self._answer("create_token", (user_uuid, tuple(scopes), ttl), create)


def cookie(token: str, secure: bool = True) -> tuple[bytes, bytes]:
    """The token cookie, named as the front door names it for an https (or http) ExternalURL."""
    name = policy.token_cookie_name(secure)
    return (b"Cookie", name + b"=" + policy.encode_token_cookie(token.encode()))


class PortalTestCase(SynchronousTestCase):
    """
    alice owns C{cr} (its running container listens on 8888 and 9000; 8888 is declared with a
    label and an initial path, 80 is declared public); bob can only read C{cr}; carol can write
    it; an admin.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.config = ClusterConfig(
            source="test",
            cluster_id="zzzzz",
            system_root_token=ROOT_TOKEN,
            external_url=ExternalURL("https", SUFFIX),
        )
        self.cluster = PortalCluster("zzzzz", ROOT_TOKEN, clock=self.clock.seconds)
        self.gateways = FakeGatewayConnector()
        self.gateways.responder = lambda call: FakeResponse(
            200, b"OK", [(b"Content-Type", b"text/plain")], b"from the service"
        )
        self.controller = Controller(self.clock, self.config, self.cluster, self.gateways)
        self.site = ProxySite(self.controller, self.clock)
        c = self.cluster
        self.alice = c.add_user("Alice")
        self.bob = c.add_user("Bob")
        self.carol = c.add_user("Carol")
        self.admin = c.add_user("Admin", is_admin=True)
        self.ports = {
            "8888": {"access": "private", "label": "Jupyter", "initial_path": "/lab"},
            "80": {"access": "public", "label": "Web", "initial_path": ""},
        }
        self.container = c.add_container(
            gateway_address=GATEWAY,
            listening_ports=(8888, 9000),
            container_image="jupyter:latest",
            published_ports=self.ports,
            started_at=datetime.fromtimestamp(T0 - 60, UTC),
        )
        self.cr = c.add_container_request(
            self.alice.uuid,
            self.container.uuid,
            name="notebook",
            published_ports=self.ports,
            created_at=datetime.fromtimestamp(T0 - 100, UTC),
        )
        c.grant(self.bob.uuid, self.cr.uuid, CAN_READ)
        c.grant(self.carol.uuid, self.cr.uuid, CAN_WRITE)
        self.tokens = {
            name: c.add_token(user.uuid)
            for name, user in [
                ("alice", self.alice),
                ("bob", self.bob),
                ("carol", self.carol),
                ("admin", self.admin),
            ]
        }

    def send(
        self,
        target: bytes = b"/",
        token: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        method: bytes = b"GET",
        body: bytes = b"",
        host: bytes = SUFFIX.encode(),
    ) -> ParsedResponse:
        """Send one request; return its complete response."""
        all_headers = list(headers)
        if token is not None:
            all_headers.append(cookie(token))
        if body:
            all_headers.append((b"Content-Length", b"%d" % len(body)))
        client = MemoryClient(self.site)
        client.send(request_bytes(method, target, all_headers, body, host=host))
        response = client.response(method)
        self.assertTrue(response.complete)
        return response

    def api(self, path: bytes, token: str | None = "alice", **kwargs: Any) -> Any:
        """Call the JSON API as a user (by name); return (status, document)."""
        response = self.send(path, self.tokens[token] if token in self.tokens else token, **kwargs)
        return response.status, json.loads(response.body)

    def connect(
        self, uuid: str, port: Any, token: str = "alice", headers: Sequence[Any] = API
    ) -> tuple[int, Any]:
        body = json.dumps({"uuid": uuid, "port": port}).encode()
        return self.api(b"/api/connect", token, method=b"POST", body=body, headers=headers)

    def vhost(self, uuid: str, port: int) -> bytes:
        return f"{uuid}-{port}.{SUFFIX}".encode()


class PageTests(PortalTestCase):
    def test_static_files(self) -> None:
        """The page and its script and styles are served, with a strict CSP, to anyone."""
        cases = [
            (b"/", b"text/html; charset=utf-8", b"<title>Container services</title>"),
            (b"/static/app.js", b"text/javascript; charset=utf-8", b"/api/connect"),
            (b"/static/app.css", b"text/css; charset=utf-8", b":focus-visible"),
        ]
        for path, content_type, snippet in cases:
            response = self.send(path)
            self.assertEqual(response.status, 200, path)
            self.assertEqual(response.header(b"content-type"), content_type)
            self.assertIn(snippet, response.body)
            csp = response.header(b"content-security-policy") or b""
            self.assertIn(b"default-src 'none'", csp)
            self.assertIn(b"script-src 'self'", csp)
            self.assertIn(b"frame-ancestors 'none'", csp)
            self.assertEqual(response.header(b"referrer-policy"), b"no-referrer")
        self.assertEqual(self.cluster.calls, [])

    def test_nothing_from_elsewhere(self) -> None:
        """The page loads nothing from another host (no CDN, no fonts)."""
        for path in (b"/", b"/static/app.js", b"/static/app.css"):
            body = self.send(path).body
            self.assertNotIn(b"http://", body.replace(b"http://*.", b""))
            self.assertNotIn(b"https://", body)
            self.assertNotIn(b"@import", body)

    def test_unknown_paths_and_methods(self) -> None:
        """Other paths are 404; other methods on known paths are 405."""
        self.assertEqual(self.send(b"/nope").status, 404)
        self.assertEqual(self.send(b"/static/../portal.py").status, 404)
        self.assertEqual(self.send(b"/", method=b"DELETE").status, 405)
        self.assertEqual(self.send(b"/api/connect", headers=API).status, 405)

    def test_query_token_to_cookie(self) -> None:
        """?arvados_api_token= on the page becomes a host-only cookie by a 303, as elsewhere."""
        token = self.tokens["alice"]
        response = self.send(b"/?x=1&arvados_api_token=" + quote(token, safe="").encode())
        self.assertEqual(response.status, 303)
        self.assertEqual(response.header(b"location"), b"/?x=1")
        [set_cookie] = response.all(b"set-cookie")
        self.assertEqual(set_cookie, policy.token_set_cookie(token.encode(), True))
        self.assertNotIn(b"Domain", set_cookie)


class SignInTests(PortalTestCase):
    def sign_in(self, token: str, headers: Sequence[Any] = SAME_ORIGIN) -> ParsedResponse:
        body = b"token=" + quote(token, safe="").encode()
        form = [(b"Content-Type", b"application/x-www-form-urlencoded"), *headers]
        return self.send(b"/sign-in", method=b"POST", body=body, headers=form)

    def test_sign_in(self) -> None:
        """A valid token is stored in the cookie by a 303 to the page."""
        token = self.tokens["alice"]
        response = self.sign_in(token)
        self.assertEqual((response.status, response.header(b"location")), (303, b"/"))
        self.assertEqual(
            response.all(b"set-cookie"), [policy.token_set_cookie(token.encode(), True)]
        )

    def test_refused_tokens(self) -> None:
        """Unknown, empty and scoped tokens are not stored; the page says sign-in failed."""
        scoped = self.cluster.add_token(self.alice.uuid, [policy.connect_scope(self.cr.uuid, 8888)])
        for token in ("v2/zzzzz-gj3su-000000000000999/nope", "", "garbage", scoped):
            response = self.sign_in(token)
            self.assertEqual(response.status, 303)
            self.assertEqual(response.header(b"location"), b"/?signin=failed")
            [set_cookie] = response.all(b"set-cookie")
            self.assertIn(b"Max-Age=0", set_cookie)
            self.assertNotIn(token.encode() or b"x", response.raw if token else b"")

    def test_cross_site(self) -> None:
        """A sign-in or sign-out posted from another site, or with no origin at all, is 403."""
        for headers in (
            [(b"Origin", b"https://evil.example"), (b"Sec-Fetch-Site", b"cross-site")],
            [(b"Sec-Fetch-Site", b"same-site")],
            [(b"Origin", b"https://x.containers.example.com")],
            [(b"Origin", b"null")],
            [],
        ):
            self.assertEqual(self.sign_in(self.tokens["alice"], headers).status, 403, headers)
            response = self.send(b"/sign-out", method=b"POST", headers=headers)
            self.assertEqual(response.status, 403)
        self.assertEqual(self.cluster.called("authenticate"), [])

    def test_sign_out(self) -> None:
        """Signing out deletes the cookie and goes back to the page."""
        response = self.send(b"/sign-out", self.tokens["alice"], SAME_ORIGIN, b"POST")
        self.assertEqual((response.status, response.header(b"location")), (303, b"/"))
        [set_cookie] = response.all(b"set-cookie")
        self.assertTrue(set_cookie.startswith(b"__Host-arvados_api_token=;"))
        self.assertIn(b"Max-Age=0", set_cookie)

    def test_large_body(self) -> None:
        """A body larger than a few KB is refused with 413, and the connection closes."""
        client = MemoryClient(self.site)
        headers = [*SAME_ORIGIN, (b"Content-Length", b"100000")]
        client.send(request_bytes(b"POST", b"/sign-in", headers, b"token=", host=SUFFIX.encode()))
        response = client.response(b"POST")
        self.assertEqual(response.status, 413)
        self.assertTrue(client.closed)

    def test_chunked_body_over_limit(self) -> None:
        """A chunked body that grows past the limit is refused with 413 too."""
        client = MemoryClient(self.site)
        headers = [*SAME_ORIGIN, (b"Transfer-Encoding", b"chunked")]
        chunk = b"a" * 3000
        body = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
        client.send(request_bytes(b"POST", b"/sign-in", headers, body, host=SUFFIX.encode()))
        self.assertEqual(client.response(b"POST").status, 413)


class ContainersTests(PortalTestCase):
    def test_not_signed_in(self) -> None:
        """Without a valid token the list is 401 (JSON), so the page shows the sign-in form."""
        for token in (None, "v2/zzzzz-gj3su-000000000000999/nope"):
            status, document = self.api(b"/api/containers", token, headers=[(b"Accept", b"*/*")])
            self.assertEqual(status, 401)
            self.assertEqual(document["status"], 401)

    def test_scoped_token(self) -> None:
        """A token scoped to one container port cannot list containers (403)."""
        scoped = self.cluster.add_token(self.alice.uuid, [policy.connect_scope(self.cr.uuid, 8888)])
        self.assertEqual(self.api(b"/api/containers", scoped)[0], 403)

    def test_list(self) -> None:
        """The list shows the request, its container and every declared or listening port."""
        status, document = self.api(b"/api/containers")
        self.assertEqual(status, 200)
        self.assertEqual(document["user"]["uuid"], self.alice.uuid)
        self.assertEqual(document["poll_seconds"], portal.POLL_SECONDS)
        [item] = document["items"]
        self.assertEqual(
            {k: item[k] for k in ("uuid", "name", "state", "image", "can_connect")},
            {
                "uuid": self.cr.uuid,
                "name": "notebook",
                "state": "Running",
                "image": "jupyter:latest",
                "can_connect": True,
            },
        )
        self.assertEqual(item["started_at"], "2023-11-14T22:12:20Z")
        self.assertIsNone(item["finished_at"])
        base = f"https://{self.cr.uuid}"
        self.assertEqual(
            item["ports"],
            [
                {
                    "port": 80,
                    "label": "Web",
                    "access": "public",
                    "declared": True,
                    "listening": False,
                    "initial_path": "",
                    "url": f"{base}-80.{SUFFIX}/",
                },
                {
                    "port": 8888,
                    "label": "Jupyter",
                    "access": "private",
                    "declared": True,
                    "listening": True,
                    "initial_path": "/lab",
                    "url": f"{base}-8888.{SUFFIX}/lab",
                },
                {
                    "port": 9000,
                    "label": "",
                    "access": "private",
                    "declared": False,
                    "listening": True,
                    "initial_path": "",
                    "url": f"{base}-9000.{SUFFIX}/",
                },
            ],
        )

    def test_which_requests(self) -> None:
        """Only the user's own requests; finished ones only for a day; newest first."""
        c = self.cluster
        queued = c.add_container(state=QUEUED, gateway_address="")
        new = c.add_container_request(
            self.alice.uuid, queued.uuid, created_at=datetime.fromtimestamp(T0, UTC)
        )
        recent = c.add_container(
            state=COMPLETE,
            finished_at=datetime.fromtimestamp(T0 - 3600, UTC),
            exit_code=0,
        )
        c.add_container_request(self.alice.uuid, recent.uuid, name="recent")
        old = c.add_container(
            state=COMPLETE, finished_at=datetime.fromtimestamp(T0 - 2 * 86400, UTC)
        )
        c.add_container_request(self.alice.uuid, old.uuid, name="old")
        c.add_container_request(self.bob.uuid, self.container.uuid, name="bob's")
        _, document = self.api(b"/api/containers")
        names = [(item["name"], item["state"], item["can_connect"]) for item in document["items"]]
        self.assertEqual(
            names,
            [("", "Queued", False), ("notebook", "Running", True), ("recent", "Complete", False)],
        )
        self.assertEqual(document["items"][0]["uuid"], new.uuid)
        self.assertEqual(document["items"][2]["exit_code"], 0)

    def test_empty(self) -> None:
        """A user with nothing running gets an empty list."""
        self.assertEqual(self.api(b"/api/containers", "carol")[1]["items"], [])

    def test_backend_without_listing(self) -> None:
        """A backend that cannot list requests makes the API say so (501), not crash."""
        cluster = FakeCluster("zzzzz", ROOT_TOKEN, clock=self.clock.seconds)
        user = cluster.add_user("U")
        token = cluster.add_token(user.uuid)
        site = ProxySite(Controller(self.clock, self.config, cluster, self.gateways), self.clock)
        client = MemoryClient(site)
        client.send(
            request_bytes(b"GET", b"/api/containers", [cookie(token)], host=SUFFIX.encode())
        )
        self.assertEqual(client.response().status, 501)


class ConnectTests(PortalTestCase):
    def test_connect(self) -> None:
        """Connect returns the port's URL (at its initial path) with a fresh scoped token."""
        status, document = self.connect(self.cr.uuid, 8888)
        self.assertEqual(status, 200)
        url = urlsplit(document["url"])
        self.assertEqual(
            (url.scheme, url.netloc, url.path),
            ("https", self.vhost(self.cr.uuid, 8888).decode(), "/lab"),
        )
        [scoped] = parse_qs(url.query)["arvados_api_token"]
        self.assertNotEqual(scoped, self.tokens["alice"])
        self.assertNotIn(self.tokens["alice"], json.dumps(document))
        credentials = self.successResultOf(self.cluster.authenticate(scoped))
        self.assertEqual(credentials.user_uuid, self.alice.uuid)
        self.assertEqual(
            credentials.scopes, (f"CONNECT /arvados/v1/container/{self.cr.uuid}/8888",)
        )
        self.assertEqual(credentials.expires_at.timestamp(), T0 + portal.CONNECT_TOKEN_TTL)
        self.assertTrue(60 <= portal.CONNECT_TOKEN_TTL <= 120)
        self.assertEqual(document["expires_at"], "2023-11-14T22:14:50Z")

    def test_link_opens_the_service(self) -> None:
        """The link works once through the controller: 303 to a cookie, then the service."""
        _, document = self.connect(self.cr.uuid, 9000)
        url = urlsplit(document["url"])
        host = url.netloc.encode()
        first = self.send(f"{url.path}?{url.query}".encode(), host=host)
        self.assertEqual((first.status, first.header(b"location")), (303, b"/"))
        pair = (first.header(b"set-cookie") or b"").split(b";")[0]
        second = self.send(b"/", headers=[(b"Cookie", pair)], host=host)
        self.assertEqual((second.status, second.body), (200, b"from the service"))
        # The scoped token opens only that port, and expires.
        other = self.send(b"/", headers=[(b"Cookie", pair)], host=self.vhost(self.cr.uuid, 8888))
        self.assertEqual(other.status, 403)
        self.clock.advance(portal.CONNECT_TOKEN_TTL)
        late = self.send(b"/", headers=[(b"Cookie", pair)], host=host)
        self.assertEqual(late.status, 401)

    def test_csrf(self) -> None:
        """Connect needs X-Requested-With and a same-origin request; otherwise 403, no token."""
        json_type = (b"Content-Type", b"application/json")
        for headers in (
            [*SAME_ORIGIN, json_type],
            [(b"X-Requested-With", b"x"), json_type],
            [(b"X-Requested-With", b"x"), (b"Sec-Fetch-Site", b"cross-site"), json_type],
            [(b"X-Requested-With", b"x"), (b"Origin", b"https://evil.example"), json_type],
        ):
            status, _ = self.connect(self.cr.uuid, 8888, headers=headers)
            self.assertEqual(status, 403, headers)
        self.assertEqual(self.cluster.called("create_token"), [])

    def test_bad_requests(self) -> None:
        """Malformed targets are 400; the body must be JSON."""
        for uuid, port in (
            (self.container.uuid, 8888),
            ("nope", 8888),
            (self.cr.uuid, 0),
            (self.cr.uuid, 65536),
            (self.cr.uuid, "8888"),
            (self.cr.uuid, True),
        ):
            self.assertEqual(self.connect(uuid, port)[0], 400, (uuid, port))
        form = [*API[:3], (b"Content-Type", b"text/plain")]
        self.assertEqual(self.connect(self.cr.uuid, 8888, headers=form)[0], 400)
        status, _ = self.api(b"/api/connect", method=b"POST", body=b"{nope", headers=API)
        self.assertEqual(status, 400)

    def test_who_may_connect(self) -> None:
        """Owner, writer and admin get a link; a reader is refused; a stranger sees nothing."""
        stranger = self.cluster.add_user("Stranger")
        self.tokens["stranger"] = self.cluster.add_token(stranger.uuid)
        table = {"alice": 200, "carol": 200, "admin": 200, "bob": 403, "stranger": 404}
        for user, status in table.items():
            self.assertEqual(self.connect(self.cr.uuid, 8888, user)[0], status, user)
        self.assertEqual(self.connect("zzzzz-xvhdp-000000000000999", 8888)[0], 404)
        self.assertEqual(len(self.cluster.called("create_token")), 3)

    def test_not_running(self) -> None:
        """A queued container's port is 503; a finished one's is 410: no token is made."""
        c = self.cluster
        queued = c.add_container_request(
            self.alice.uuid, c.add_container(state=QUEUED, gateway_address="").uuid
        )
        done = c.add_container_request(self.alice.uuid, c.add_container(state=COMPLETE).uuid)
        self.assertEqual(self.connect(queued.uuid, 8888)[0], 503)
        self.assertEqual(self.connect(done.uuid, 8888)[0], 410)
        self.assertEqual(self.cluster.called("create_token"), [])


class UrlTests(SynchronousTestCase):
    def test_with_token(self) -> None:
        """The token goes into the query, encoded, before any fragment."""
        cases = [
            ("https://h/", "https://h/?arvados_api_token=v2%2Fa%2Fb"),
            ("https://h/lab?x=1", "https://h/lab?x=1&arvados_api_token=v2%2Fa%2Fb"),
            ("https://h/p#frag", "https://h/p?arvados_api_token=v2%2Fa%2Fb#frag"),
        ]
        for url, expected in cases:
            self.assertEqual(portal.with_token(url, "v2/a/b"), expected)

    def test_port_url(self) -> None:
        """The initial path is appended with exactly one slash."""
        config = ClusterConfig(
            source="t",
            cluster_id="zzzzz",
            system_root_token=ROOT_TOKEN,
            external_url=ExternalURL("http", "containers.localhost", 8900),
        )
        uuid = "zzzzz-xvhdp-000000000000001"
        for initial, path in (("", "/"), ("/lab", "/lab"), ("lab", "/lab"), ("?p=1", "/?p=1")):
            self.assertEqual(
                portal.port_url(config, uuid, 8888, initial),
                f"http://{uuid}-8888.containers.localhost:8900{path}",
            )


class PublicPortTests(PortalTestCase):
    def test_access_table(self) -> None:
        """Public ports open for anyone, token or not; private and undeclared ones do not."""
        c = self.cluster
        stranger = c.add_user("Stranger")
        bad = "v2/zzzzz-gj3su-000000000000999/nope"
        strangers = [None, bad, c.add_token(stranger.uuid)]
        # The container itself declares only 8080 public (as if its request said so).
        other = c.add_container(
            gateway_address=GATEWAY, published_ports={"8080": {"access": "public"}}
        )
        c.add_container_request(self.alice.uuid, other.uuid, published_ports={"8080": {}})
        cases = [
            (self.cr.uuid, 80, 200),  # public on the request
            (self.cr.uuid, 8888, None),  # private
            (self.cr.uuid, 9000, None),  # listening, undeclared
            (self.container.uuid, 80, 200),  # public on the container too
            (other.uuid, 8080, 200),  # the container's own entry counts for its URL
        ]
        for uuid, port, status in cases:
            for token in strangers:
                response = self.send(b"/x", token, host=self.vhost(uuid, port))
                expected = status or (404 if token == strangers[2] else 401)
                self.assertEqual(response.status, expected, (uuid, port, token))
        self.assertEqual(
            self.send(b"/", host=self.vhost(self.cr.uuid, 80)).body, b"from the service"
        )

    def test_public_but_finished(self) -> None:
        """A public port of a finished container is 410, as for anyone else."""
        done = self.cluster.add_container(state=COMPLETE, gateway_address=GATEWAY)
        cr = self.cluster.add_container_request(
            self.alice.uuid, done.uuid, published_ports={"80": {"access": "public"}}
        )
        self.assertEqual(self.send(b"/", host=self.vhost(cr.uuid, 80)).status, 410)

    def test_unknown_target_without_token(self) -> None:
        """An unknown request or container without a token is 401, so nothing is revealed."""
        for uuid in ("zzzzz-xvhdp-000000000000999", "zzzzz-dz642-000000000000999"):
            self.assertEqual(self.send(b"/", host=self.vhost(uuid, 80)).status, 401)


class StaleStateTests(PortalTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.cookies = StateCookies(ROOT_TOKEN, self.config.external_url)

    def set_marker(self, uuid: str, port: int = 9000) -> bytes:
        """The Set-Cookie of the container marker for C{uuid} on the vhost of C{cr}'s port."""
        host_name = self.vhost(self.cr.uuid, port).split(b":")[0]
        return self.cookies.container_set_cookie(host_name, uuid)

    def marker(self, uuid: str, port: int = 9000) -> bytes:
        """The marker as the browser sends it back (its name and value)."""
        return self.set_marker(uuid, port).split(b";")[0]

    def test_first_visit_remembers_container(self) -> None:
        """The first response from a container sets the container cookie; later ones do not."""
        host = self.vhost(self.cr.uuid, 9000)
        first = self.send(b"/", self.tokens["alice"], host=host)
        self.assertEqual(first.status, 200)
        self.assertEqual(first.all(b"set-cookie"), [self.set_marker(self.container.uuid)])
        seen = (b"Cookie", self.marker(self.container.uuid))
        again = self.send(b"/", self.tokens["alice"], [seen], host=host)
        self.assertEqual((again.status, again.all(b"set-cookie")), (200, []))
        self.assertIsNone(again.header(b"clear-site-data"))

    def retry(self) -> str:
        """The request is retried: its URL now leads to a new container."""
        c = self.cluster
        new = c.add_container(gateway_address=GATEWAY, listening_ports=(9000,))
        c.container_requests[self.cr.uuid] = ContainerRequest(
            **{**self.cr.__dict__, "container_uuid": new.uuid}
        )
        return new.uuid

    def test_retried_request_clears_state(self) -> None:
        """A new container behind the vhost: one 303 clears the old app's cookies and storage."""
        old = self.container.uuid
        new = self.retry()
        stale = [
            (b"Cookie", self.marker(old) + b"; app_session=abc"),
            (b"Cookie", b"theme=dark; bad name=x; __Host-pref=1"),
            cookie(self.tokens["alice"]),
        ]
        host = self.vhost(self.cr.uuid, 9000)
        response = self.send(b"/page?x=1", headers=stale, host=host)
        self.assertEqual((response.status, response.header(b"location")), (303, b"/page?x=1"))
        self.assertEqual(response.header(b"clear-site-data"), b'"cache", "storage"')
        self.assertEqual(
            response.all(b"set-cookie"),
            [
                b"app_session=; Path=/; Max-Age=0; Secure",
                b"theme=; Path=/; Max-Age=0; Secure",
                b"__Host-pref=; Path=/; Max-Age=0; Secure",
                self.set_marker(new),
            ],
        )
        self.assertEqual(self.gateways.calls, [])
        # The browser follows with the new cookie: the new container answers.
        fresh = [(b"Cookie", self.marker(new)), cookie(self.tokens["alice"])]
        after = self.send(b"/page?x=1", headers=fresh, host=host)
        self.assertEqual((after.status, after.all(b"set-cookie")), (200, []))
        self.assertEqual(self.gateways.calls[-1].container_uuid, new)

    def test_stale_post_refused(self) -> None:
        """An old page's POST never reaches the new container: 410, state cleared."""
        old = self.container.uuid
        new = self.retry()
        seen = (b"Cookie", self.marker(old) + b"; a=1")
        response = self.send(
            b"/save", self.tokens["alice"], [seen], b"POST", b"data", self.vhost(self.cr.uuid, 9000)
        )
        self.assertEqual(response.status, 410)
        self.assertEqual(response.header(b"clear-site-data"), b'"cache", "storage"')
        self.assertIn(self.set_marker(new), response.all(b"set-cookie"))
        self.assertEqual(self.gateways.calls, [])

    def test_query_token_and_stale_in_one_redirect(self) -> None:
        """With a query token too, a single 303 sets the token and clears the old state."""
        old = self.container.uuid
        new = self.retry()
        token = self.tokens["alice"]
        target = b"/?arvados_api_token=" + quote(token, safe="").encode()
        seen = (b"Cookie", self.marker(old))
        response = self.send(target, headers=[seen], host=self.vhost(self.cr.uuid, 9000))
        self.assertEqual((response.status, response.header(b"location")), (303, b"/"))
        self.assertEqual(
            response.all(b"set-cookie"),
            [policy.token_set_cookie(token.encode(), True), self.set_marker(new)],
        )
        self.assertEqual(response.header(b"clear-site-data"), b'"cache", "storage"')

    def test_rules(self) -> None:
        """The cookie rules: which containers count as seen, staleness, which cookies go."""
        headers = Headers(
            {
                b"cookie": [
                    b"__Host-arvados_container_uuid=c1; __Host-arvados_api_token=t; x=1; x=2",
                    b"y; arvados_api_token=old; ARVADOS_API_TOKEN=z",
                ]
            }
        )
        self.assertFalse(sitedata.is_stale([b"c1"], "c1"))
        self.assertFalse(sitedata.is_stale([b"c2", b"c1"], "c1"))
        self.assertTrue(sitedata.is_stale([b"c2"], "c1"))
        self.assertFalse(sitedata.is_stale([], "c2"))
        self.assertEqual(
            sitedata.clearing_set_cookies(headers),
            [b"x=; Path=/; Max-Age=0", b"y=; Path=/; Max-Age=0"],
        )
        self.assertEqual(
            sitedata.clearing_set_cookies(headers, secure=True),
            [b"x=; Path=/; Max-Age=0; Secure", b"y=; Path=/; Max-Age=0; Secure"],
        )
