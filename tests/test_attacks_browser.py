"""
Attacks on a person's browser, made as an outsider would make them, through the real twistd
plugins (issue 16: holes 1 to 4 and login CSRF): raw sockets against the front door, a hostile
service behind a real gateway, and a real headless Chromium.

  - hole 1: a request target that makes the 303 leave the origin (C{//evil}, C{/\\evil},
    encoded slashes, dot segments), on a container's host, an unknown container's host and the
    services page's host;
  - hole 2: a service's C{Set-Cookie} with a C{Domain} spelt so that a naive filter misses it,
    or naming the front door's cookies;
  - hole 3: a service's C{Clear-Site-Data} that would clear every container's cookies;
  - hole 4: cookies planted from a sibling host (a script's C{document.cookie = "...;
    domain=.containers.localhost"}) that locked the person out of other containers;
  - login CSRF: a link with someone else's token that silently replaced the person's sign-in.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import ada_url
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from arvproxy import demo, policy
from arvproxy.backends.registry import RegistryStore
from tests import e2e
from tests.browser import Browser, BrowserChain, start_browser_chain

# --- Raw HTTP ------------------------------------------------------------------------------------


def parse_response(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The status, header fields (lower-case names, in order) and body of one raw response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.strip().lower(), value.strip()))
    return int(lines[0].split()[1]), fields, body


def field_values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in fields if key == name]


async def raw_request(
    port: int,
    host: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    method: bytes = b"GET",
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Send one request exactly as given (its target unchanged) and read the whole answer."""
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, host)
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    if method == b"POST":
        head += b"Content-Length: 0\r\n"
    raw = await e2e.raw_exchange(reactor, port, head + b"Connection: close\r\n\r\n")
    return parse_response(raw)


def token_cookie(token: str) -> tuple[bytes, bytes]:
    """The Cookie field of a browser signed in with C{token} (plain http)."""
    return (b"Cookie", policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(token.encode()))


def query(token: str) -> bytes:
    return b"arvados_api_token=" + quote(token, safe="").encode()


# --- Hole 1: the 303 ----------------------------------------------------------------------------

# Request targets that llhttp lets through, each of which once made the 303 leave the origin.
FORGED_TARGETS = [
    b"//evil.example/",
    b"///evil.example/x",
    b"/\\evil.example/",
    b"/\\/evil.example/",
    b"/%2F/evil.example/",
    b"/%2f%2fevil.example/",
    b"/%5Cevil.example/",
    b"/%5c%5cevil.example/",
    b"/.//evil.example/",
    b"/..//evil.example/",
    b"/a/..//evil.example/",
    b"/%2e%2e//evil.example/",
    b"/.%2E/%2F/evil.example/",
]


class OpenRedirectTests(unittest.TestCase):
    """Hole 1: the front door's 303 always stays on the origin the browser asked."""

    timeout = 90

    def test_forged_targets_on_every_kind_of_host(self) -> defer.Deferred[None]:
        """On a container's host, an unknown one's and the services page's, no forged target
        gets a Location that a browser (the WHATWG rules) reads as another origin."""
        return defer.ensureDeferred(self._forged())

    async def _forged(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        port = chain.controller_port
        unknown = f"zzzzz-xvhdp-000000000000999-8080.{e2e.SUFFIX}:{port}".encode()
        page = f"{e2e.SUFFIX}:{port}".encode()
        token = chain.cluster.token
        problems = []
        for host in (chain.vhost, unknown, page):
            for forged in FORGED_TARGETS:
                target = forged + b"?" + query(token)
                status, fields, _ = await raw_request(port, host, target)
                [location] = field_values(fields, b"location") or [b""]
                base = "http://" + host.decode()
                landed = ada_url.URL(location.decode("latin-1"), base + "/start")
                if status != 303 or landed.origin != base:
                    problems.append(f"{host!r} {forged!r}: {status} Location {location!r}")
                if location[:2] in (b"//", b"/\\") or token.encode() in location:
                    problems.append(f"{host!r} {forged!r}: Location {location!r}")
        self.assertEqual(problems, [])
        # The absolute form, naming this very host, keeps only its path.
        absolute = b"http://" + chain.vhost + b"//evil.example/?" + query(token)
        status, fields, _ = await raw_request(port, chain.vhost, absolute)
        self.assertEqual((status, field_values(fields, b"location")), (303, [b"/evil.example/"]))


# --- Holes 2 and 3: what a service answers ------------------------------------------------------

HOSTILE_SET_COOKIES = [
    b"a=1; Domain =.containers.localhost",
    b"b=1; Domain\t=.containers.localhost; Path=/",
    b"c=1; DOMAIN=containers.localhost",
    b"d=1; domain=x.example; Domain=.containers.localhost",
    b"e=1;Path=/;  dOmAiN  =  .containers.localhost  ",
    b"f=1; Domain",
    b"arvados_api_token=djI; Path=/",
    b"ARVADOS_API_TOKEN=x; Domain=.containers.localhost",
    b" arvados_container_uuid =zzzzz-dz642-000000000000000",
    b"__Host-arvados_api_token=x; Secure; Path=/",
    b"__secure-Arvados_Container_Uuid=x; Secure",
    b"=arvados_api_token=x; Domain=.containers.localhost",
    b"arvados_api_token",
    b"keep=1; Path=/; HttpOnly",
]
RELAYED_SET_COOKIES = [
    b"a=1",
    b"b=1; Path=/",
    b"c=1",
    b"d=1",
    b"e=1;Path=/",
    b"f=1",
    b"keep=1; Path=/; HttpOnly",
]
HOSTILE_CLEAR_SITE_DATA = [
    b'"cookies"',
    b'"storage", "cache"',
    b'"*"',
    b'"Cookies", "STORAGE"',
    b' "cookies" ,"executionContexts"',
    b"cookies",
]


class _Hostile(resource.Resource):
    """C{/hostile}: an answer with every hostile header above; anything else as before."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__()
        self.wrapped = wrapped

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        return self

    def render(self, request: Any) -> Any:
        if request.path != b"/hostile":
            return self.wrapped.render(request)
        for value in HOSTILE_SET_COOKIES:
            request.responseHeaders.addRawHeader(b"set-cookie", value)
        for value in HOSTILE_CLEAR_SITE_DATA:
            request.responseHeaders.addRawHeader(b"clear-site-data", value)
        request.setHeader(b"content-type", b"text/plain")
        return b"hostile"


class ServiceAnswerTests(unittest.TestCase):
    """Holes 2 and 3: a service's cookies stay on its host and never pass for the proxy's."""

    timeout = 90

    async def _answer(self) -> list[tuple[bytes, bytes]]:
        chain = await e2e.start_chain(self, reactor)
        chain.service.resource = _Hostile(chain.service.resource)
        status, fields, body = await raw_request(
            chain.controller_port, chain.vhost, b"/hostile", [token_cookie(chain.cluster.token)]
        )
        self.assertEqual((status, body), (200, b"hostile"))
        return fields

    def test_set_cookie_through_both_hops(self) -> defer.Deferred[None]:
        """Hole 2: Set-Cookie loses every Domain (any spelling), and cookies with the proxy's
        names (any spelling, prefixes, nameless) are dropped."""
        return defer.ensureDeferred(self._set_cookie())

    async def _set_cookie(self) -> None:
        cookies = field_values(await self._answer(), b"set-cookie")
        # The marker the front door sets itself is the only other one.
        own = [c for c in cookies if c.startswith(b"arvados_container_uuid=")]
        self.assertEqual(len(own), 1, cookies)
        self.assertEqual([c for c in cookies if c not in own], RELAYED_SET_COOKIES)
        for value in cookies:
            self.assertNotIn(b"domain", value.lower())

    def test_clear_site_data_through_both_hops(self) -> defer.Deferred[None]:
        """Hole 3: Clear-Site-Data keeps only what clears the service's own origin."""
        return defer.ensureDeferred(self._clear_site_data())

    async def _clear_site_data(self) -> None:
        fields = await self._answer()
        self.assertEqual(
            field_values(fields, b"clear-site-data"), [b'"cache", "executionContexts"']
        )


# --- Hole 4 and login CSRF, raw ----------------------------------------------------------------


class PlantedCookieTests(unittest.TestCase):
    """Hole 4: cookies a sibling host planted neither loop nor lock the person out."""

    timeout = 90

    def test_planted_marker_and_token(self) -> defer.Deferred[None]:
        """A planted container marker is ignored (200, not a 303 forever), and a planted
        made-up token before the person's own does not lock them out."""
        return defer.ensureDeferred(self._planted())

    async def _planted(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        port, host = chain.controller_port, chain.vhost
        own = token_cookie(chain.cluster.token)
        planted_marker = (b"Cookie", b"arvados_container_uuid=zzzzz-dz642-planted00000000")
        # A marker planted for the whole domain, with the person's own token: served.
        status, _, _ = await raw_request(port, host, b"/", [planted_marker, own])
        self.assertEqual(status, 200)
        # The first visit: the front door sets its own marker, signed.
        status, fields, _ = await raw_request(port, host, b"/", [own])
        self.assertEqual(status, 200)
        [marker] = [
            c.split(b";")[0]
            for c in field_values(fields, b"set-cookie")
            if c.startswith(b"arvados_container_uuid=")
        ]
        uuid = chain.cluster.container_uuid.encode()
        self.assertTrue(marker.startswith(b"arvados_container_uuid=" + uuid + b"."), marker)
        for cookies in (
            [(b"Cookie", marker), planted_marker, own],
            [planted_marker, (b"Cookie", marker), own],
        ):
            status, _, _ = await raw_request(port, host, b"/", cookies)
            self.assertEqual(status, 200, cookies)
        made_up = policy.encode_token_cookie(b"v2/zzzzz-gj3su-000000000000000/madeup")
        for planted in (b"arvados_api_token=" + made_up, b"arvados_api_token=%%%"):
            status, _, _ = await raw_request(port, host, b"/", [(b"Cookie", planted), own])
            self.assertEqual(status, 200, planted)
        # Alone, a made-up token is still refused.
        alone = [(b"Cookie", b"arvados_api_token=" + made_up)]
        status, _, _ = await raw_request(port, host, b"/", alone)
        self.assertEqual(status, 401)


NAVIGATE = (b"Sec-Fetch-Mode", b"navigate")
_ACTION = re.compile(rb'<form method="post" action="([^"]*)"')


class LoginCsrfRawTests(unittest.TestCase):
    """A link with someone else's token never silently replaces the person's sign-in."""

    timeout = 90

    def test_other_users_link(self) -> defer.Deferred[None]:
        """Signed in as one user, a link for another gets a question, not a cookie; only the
        page's own POST with its code switches; the same user's link signs in at once."""
        return defer.ensureDeferred(self._other())

    async def _other(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        store = chain.cluster.store
        mallory = store.create_user("Mallory Example")
        mallory_token, _ = store.create_token(mallory.uuid)
        port = chain.controller_port
        own = token_cookie(chain.cluster.token)
        for host in (chain.vhost, f"{e2e.SUFFIX}:{port}".encode()):
            origin = b"http://" + host
            target = b"/lab?x=1&" + query(mallory_token)
            status, fields, _ = await raw_request(port, host, target, [own, NAVIGATE])
            self.assertEqual((status, field_values(fields, b"set-cookie")), (303, []), host)
            [question] = field_values(fields, b"location")
            self.assertTrue(question.startswith(b"/lab?x=1&arvados_switch="), question)
            self.assertNotIn(mallory_token.rsplit("/", 1)[1].encode(), question)
            status, fields, body = await raw_request(port, host, question, [own, NAVIGATE])
            self.assertEqual((status, field_values(fields, b"set-cookie")), (200, []), body)
            self.assertIn(b"Mallory Example", body)
            self.assertIn(chain.cluster.user.uuid.encode(), body)
            self.assertNotIn(mallory_token.rsplit("/", 1)[1].encode(), body)
            policies = b"".join(field_values(fields, b"content-security-policy"))
            self.assertIn(b"frame-ancestors 'none'", policies)
            match = _ACTION.search(body)
            assert match is not None
            action = html.unescape(match.group(1).decode()).encode()
            self.assertEqual(action, question)
            # Another site's form, a POST without Sec-Fetch-Site or Origin, or a GET: asked
            # again; the token link itself, POSTed: sent to the question.
            cross = [own, (b"Sec-Fetch-Site", b"cross-site"), (b"Origin", b"http://evil.example")]
            for method, sent, headers in (
                (b"POST", action, cross),
                (b"POST", action, [own, (b"Origin", b"http://evil.example")]),
                (b"POST", action, [own]),
                (b"GET", action, [own, (b"Sec-Fetch-Site", b"same-origin")]),
                (b"POST", target, [own, (b"Sec-Fetch-Site", b"same-origin"), (b"Origin", origin)]),
            ):
                status, fields, _ = await raw_request(port, host, sent, headers, method)
                self.assertIn(status, (200, 303, 409), (method, sent, headers))
                self.assertEqual(field_values(fields, b"set-cookie"), [], (method, sent, headers))
                for location in field_values(fields, b"location"):
                    self.assertIn(b"arvados_switch=", location)
            # The page's own button: switched, and the address keeps no token.
            same = [own, (b"Sec-Fetch-Site", b"same-origin"), (b"Origin", origin)]
            status, fields, _ = await raw_request(port, host, action, same, b"POST")
            self.assertEqual(status, 303)
            self.assertEqual(field_values(fields, b"location"), [b"/lab?x=1"])
            [set_cookie] = field_values(fields, b"set-cookie")
            self.assertTrue(set_cookie.startswith(token_cookie(mallory_token)[1] + b";"))
            # The same user's link: signed in at once, as before.
            own_link = b"/?" + query(chain.cluster.token)
            status, fields, _ = await raw_request(port, host, own_link, [own])
            self.assertEqual(status, 303)
            self.assertEqual(len(field_values(fields, b"set-cookie")), 1)
            # A link whose token does not work: the person stays signed in as they are.
            broken = b"/p?" + query("v2/zzzzz-gj3su-000000000000000/nope")
            status, fields, _ = await raw_request(port, host, broken, [own])
            self.assertEqual((status, field_values(fields, b"location")), (303, [b"/p"]))
            self.assertEqual(field_values(fields, b"set-cookie"), [])


# --- The same in a real browser ----------------------------------------------------------------

ATTACKER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Attacker's service</title></head>
<body><h1>Attacker's service</h1><p id="done">planting</p>
<script>
{script}
document.getElementById("done").textContent = "planted";
</script></body></html>
"""

PLANT_MARKER = (
    'document.cookie = "arvados_container_uuid=zzzzz-dz642-planted00000000; '
    'domain=.containers.localhost; path=/";'
)
PLANT_TOKEN = (
    'document.cookie = "arvados_api_token=djIvenp6enotZ2ozc3UtMDAwMDAwMDAwMDAwMDAwL21hZGV1cA==; '
    'domain=.containers.localhost; path=/";'
)


class _Page(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.requests: list[bytes] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append(request.uri)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.body


def serve(testcase: Any, page: resource.Resource) -> int:
    """Serve C{page} on a free loopback port until C{testcase} ends; return the port."""
    # The demo's own bookkeeping: every connection is closed, and waited for, at the end.
    connections = demo._Connections(server.Site(page, reactor=reactor))
    port = reactor.listenTCP(0, connections, interface="127.0.0.1")

    async def stop() -> None:
        await port.stopListening()
        await connections.close_all()

    testcase.addCleanup(lambda: defer.ensureDeferred(stop()))
    return int(port.getHost().port)


async def add_container(testcase: Any, chain: BrowserChain, service_port: int) -> str:
    """
    Another container request of the chain's user, publishing C{service_port} (a service on
    this machine's loopback), with its own gateway; returns the service's host (and port).
    """
    store = RegistryStore(chain.config.registry_path, "zzzzz")
    testcase.addCleanup(store.close)
    user = store.authenticate(chain.token).user_uuid
    request = store.create_container_request(user, published_ports={service_port: {}})
    assert request.container_uuid is not None
    directory = testcase.mktemp()
    gateway = demo.start_gateway(
        reactor,
        chain.config,
        chain.config.source,
        request.container_uuid,
        directory + "-gateway.log",
        ["--runtime", "host"],
    )
    testcase.addCleanup(gateway.stop, reactor)
    await gateway.ready
    return f"{request.uuid}-{service_port}.containers.localhost:{chain.port}"


def all_cookies(driver: Any) -> list[dict[str, Any]]:
    """Every cookie in the browser, for every domain (DevTools)."""
    return list(driver.execute_cdp_cmd("Network.getAllCookies", {})["cookies"])


class BrowserAttackTests(unittest.TestCase):
    """The attacks in a real headless Chromium, through the real twistd plugins."""

    timeout = 180

    async def _planted(self, script: str, name: str) -> None:
        browser = await Browser.start(self)
        chain = await start_browser_chain(self)
        attacker = _Page(ATTACKER_PAGE.format(script=script).encode())
        attacker_host = await add_container(self, chain, serve(self, attacker))

        # The person opens the attacker's service (any page they can open is enough).
        await browser.get(f"http://{attacker_host}/?arvados_api_token={chain.token}")
        await browser.wait_for_text("#done", lambda text: text == "planted")
        planted = [
            c for c in await browser.call(all_cookies) if c["domain"] == ".containers.localhost"
        ]
        self.assertEqual(len(planted), 1, planted)  # The browser took the planted cookie.

        # Then opens their own container B: its page, not a redirect loop or a 401.
        await browser.get(chain.url(chain.token))
        await browser.screenshot(f"attack-{name}")
        self.assertEqual(await browser.current_url(), f"http://{chain.host}/")
        self.assertEqual(await browser.title(), "arvproxy demo service")
        await browser.wait_for_text("#counter", lambda t: t.isdigit() and int(t) >= 2)
        # The planted cookie is still there, and still harmless on a reload.
        await browser.get(f"http://{chain.host}/again")
        self.assertEqual(await browser.title(), "arvproxy demo service")
        self.assertIn(
            ".containers.localhost", [c["domain"] for c in await browser.call(all_cookies)]
        )

    def test_planted_container_marker(self) -> defer.Deferred[None]:
        """A script on container A sets the container marker for the whole domain: container B
        still opens (it was a redirect loop)."""
        return defer.ensureDeferred(self._planted(PLANT_MARKER, "planted-marker"))

    def test_planted_token(self) -> defer.Deferred[None]:
        """A script on container A sets a made-up token cookie for the whole domain: container B
        still opens with the person's own token (it was a 401)."""
        return defer.ensureDeferred(self._planted(PLANT_TOKEN, "planted-token"))

    def test_open_redirect(self) -> defer.Deferred[None]:
        """A link //other-host/?arvados_api_token= on a container's host lands on that host's
        own service, never on the other host."""
        return defer.ensureDeferred(self._open_redirect())

    async def _open_redirect(self) -> None:
        browser = await Browser.start(self)
        chain = await start_browser_chain(self)
        trap = _Page(b"<!doctype html><title>Somewhere else</title>")
        trap_port = serve(self, trap)
        evil = f"evil.localhost:{trap_port}"
        for forged in (f"//{evil}/", f"/%2F/{evil}/", f"/.//{evil}/"):
            await browser.get(f"http://{chain.host}{forged}?arvados_api_token={chain.token}")
            landed = ada_url.URL(await browser.current_url())
            self.assertEqual(landed.host, chain.host, forged)
            self.assertEqual(await browser.title(), "arvproxy demo service", forged)
        self.assertEqual(trap.requests, [])

    def test_login_csrf(self) -> defer.Deferred[None]:
        """Signed in as one user, a link with another user's token shows who it would sign in
        as; Stay keeps the person, Continue switches."""
        return defer.ensureDeferred(self._login_csrf())

    async def _login_csrf(self) -> None:
        from selenium.webdriver.common.by import By

        browser = await Browser.start(self)
        chain = await start_browser_chain(self)
        store = RegistryStore(chain.config.registry_path, "zzzzz")
        self.addCleanup(store.close)
        mallory = store.create_user("Mallory Example")
        mallory_token, _ = store.create_token(mallory.uuid)
        store.grant_permission(mallory.uuid, chain.request_uuid, "can_write")

        def token_in_browser(cookies: list[dict[str, Any]]) -> bytes | None:
            [cookie] = [c for c in cookies if c["name"] == "arvados_api_token"]
            return policy.decode_token_cookie(cookie["value"].encode())

        await browser.get(chain.url(chain.token))
        self.assertEqual(await browser.title(), "arvproxy demo service")

        await browser.get(chain.url(mallory_token))
        self.assertEqual(await browser.title(), "Switch to another user?")
        self.assertIn("Mallory Example", await browser.text("#incoming"))
        self.assertIn(store.authenticate(chain.token).user_uuid, await browser.text("#current"))
        await browser.screenshot("login-csrf-question")
        self.assertEqual(token_in_browser(await browser.cookies()), chain.token.encode())

        await browser.call(lambda d: d.find_element(By.ID, "stay").click())
        await browser.wait_for_text("#counter", lambda t: t.isdigit())
        self.assertEqual(await browser.current_url(), f"http://{chain.host}/")
        self.assertEqual(token_in_browser(await browser.cookies()), chain.token.encode())

        await browser.get(chain.url(mallory_token))
        await browser.call(lambda d: d.find_element(By.ID, "continue").click())
        await browser.wait_for_text("#counter", lambda t: t.isdigit())
        self.assertEqual(await browser.current_url(), f"http://{chain.host}/")
        self.assertEqual(token_in_browser(await browser.cookies()), mallory_token.encode())
