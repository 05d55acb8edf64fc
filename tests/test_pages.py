"""
Tests for L{arvproxy.pages}: an error becomes an HTML page only for a browser navigation and a
small JSON body for everything else, never a redirect, never with a token or unescaped markup in
it; and the same holds for the pages the real controller produces.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from arvproxy import pages, policy
from arvproxy.backends import CAN_READ, COMPLETE, QUEUED
from arvproxy.config import ClusterConfig, ExternalURL
from arvproxy.controller.proxy import Controller
from arvproxy.errors import (
    BadGateway,
    BadRequest,
    Forbidden,
    Gone,
    NotFound,
    ProxyError,
    Unauthorized,
    Unavailable,
)
from arvproxy.httpserver import ProxySite
from arvproxy.testing import FakeCluster, FakeGatewayConnector, MemoryClient, request_bytes

NAVIGATE = ((b"Sec-Fetch-Mode", b"navigate"), (b"Accept", b"text/html,*/*;q=0.8"))
FETCH = ((b"Sec-Fetch-Mode", b"cors"), (b"Accept", b"*/*"))
XSS = "<script>alert(1)</script>"


class PageRequest(DummyRequest):
    """A L{DummyRequest} with the streaming request's C{finishEarly}, recording the call order."""

    def __init__(self, headers: tuple[tuple[bytes, bytes], ...] = (), method: bytes = b"GET"):
        super().__init__([b""])
        self.method = method
        self.events: list[str] = []
        for name, value in headers:
            self.requestHeaders.addRawHeader(name, value)

    def finishEarly(self) -> None:
        self.events.append("finishEarly")

    def setHeader(self, name: bytes, value: bytes) -> None:
        """Replace, as L{twisted.web.http.Request.setHeader} does (DummyRequest appends)."""
        self.responseHeaders.setRawHeaders(name, [value])

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.events.append("code")
        super().setResponseCode(code, message)

    def write(self, data: bytes) -> None:
        self.events.append("write")
        super().write(data)

    def finish(self) -> None:
        self.events.append("finish")
        super().finish()

    def header(self, name: bytes) -> bytes | None:
        values = self.responseHeaders.getRawHeaders(name)
        if values is None:
            return None
        assert len(values) == 1, (name, values)
        return values[0]

    @property
    def body(self) -> bytes:
        return b"".join(self.written)


def render(
    error: ProxyError, headers: tuple[tuple[bytes, bytes], ...] = NAVIGATE, method: bytes = b"GET"
) -> PageRequest:
    request = PageRequest(headers, method)
    pages.render_error(request, error)
    return request


class WantsHtmlTests(SynchronousTestCase):
    """L{pages.wants_html}."""

    def test_table(self) -> None:
        """HTML only for a navigation; fetch, XHR, curl and API clients get JSON."""
        rows: list[tuple[tuple[tuple[bytes, bytes], ...], bool]] = [
            ((), False),
            (((b"Sec-Fetch-Mode", b"navigate"),), True),
            (((b"Sec-Fetch-Mode", b"Navigate"),), True),
            (NAVIGATE, True),
            # A navigation cannot carry X-Requested-With; Sec-Fetch-Mode decides.
            (NAVIGATE + ((b"X-Requested-With", b"XMLHttpRequest"),), True),
            (((b"Sec-Fetch-Mode", b"cors"), (b"Accept", b"text/html")), False),
            (((b"Sec-Fetch-Mode", b"no-cors"), (b"Accept", b"text/html")), False),
            (((b"Sec-Fetch-Mode", b"same-origin"), (b"Accept", b"text/html")), False),
            (((b"Sec-Fetch-Mode", b"websocket"), (b"Accept", b"text/html")), False),
            (((b"Sec-Fetch-Mode", b"navigatex"),), False),
            (((b"Sec-Fetch-Mode", b""), (b"Accept", b"text/html")), False),
            # Older browsers: Accept decides, unless it is an XHR.
            (((b"Accept", b"text/html"),), True),
            (((b"Accept", b"TEXT/HTML"),), True),
            (((b"Accept", b"application/xhtml+xml,text/html;q=0.9,*/*;q=0.8"),), True),
            (((b"Accept", b"text/html"), (b"X-Requested-With", b"XMLHttpRequest")), False),
            (((b"X-Requested-With", b"XMLHttpRequest"),), False),
            (((b"Accept", b"*/*"),), False),
            (((b"Accept", b"application/json"),), False),
            (((b"Accept", b"text/plain"),), False),
        ]
        problems = []
        for headers, expected in rows:
            actual = pages.wants_html(PageRequest(headers))
            if actual != expected:
                problems.append(f"{headers!r}: expected {expected}, got {actual}")
        self.assertEqual(problems, [])


class RenderErrorTests(SynchronousTestCase):
    """L{pages.render_error}."""

    def test_html_for_navigation(self) -> None:
        """A navigation gets a complete HTML page with the status, title, message and hint."""
        request = render(Forbidden("You may not.", hint="Ask the owner."))
        self.assertEqual(request.responseCode, 403)
        self.assertEqual(request.header(b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(request.header(b"cache-control"), b"no-store")
        self.assertEqual(request.header(b"x-content-type-options"), b"nosniff")
        self.assertEqual(
            request.header(b"content-security-policy"),
            b"default-src 'none'; style-src 'unsafe-inline'",
        )
        body = request.body.decode("utf-8")
        self.assertTrue(body.startswith("<!doctype html>"))
        self.assertIn("<title>403 Permission denied</title>", body)
        self.assertIn("<p>You may not.</p>", body)
        self.assertIn('<p class="hint">Ask the owner.</p>', body)
        self.assertEqual(request.header(b"content-length"), b"%d" % len(request.body))

    def test_json_for_everything_else(self) -> None:
        """fetch, XHR and API clients get a small JSON document."""
        for headers in [
            FETCH,
            ((b"Sec-Fetch-Mode", b"no-cors"),),
            ((b"Sec-Fetch-Mode", b"same-origin"), (b"Accept", b"text/html")),
            ((b"X-Requested-With", b"XMLHttpRequest"), (b"Accept", b"text/html")),
            (),
        ]:
            request = render(NotFound("Nothing here.", hint="Check it."), headers)
            self.assertEqual(request.responseCode, 404)
            self.assertEqual(request.header(b"content-type"), b"application/json")
            self.assertEqual(request.header(b"cache-control"), b"no-store")
            self.assertEqual(request.header(b"x-content-type-options"), b"nosniff")
            self.assertEqual(
                json.loads(request.body),
                {"errors": ["Nothing here."], "status": 404, "hint": "Check it."},
            )
            self.assertEqual(request.header(b"content-length"), b"%d" % len(request.body))

    def test_json_without_hint(self) -> None:
        """An error without a hint has no hint key."""
        request = render(BadRequest("Bad."), FETCH)
        self.assertEqual(json.loads(request.body), {"errors": ["Bad."], "status": 400})

    def test_401_is_never_a_redirect(self) -> None:
        """A missing sign-in is a 401 page in both modes, with no Location and no refresh."""
        for headers in (NAVIGATE, FETCH, ()):
            request = render(Unauthorized("Sign in.", hint="Use ?arvados_api_token=..."), headers)
            self.assertEqual(request.responseCode, 401)
            self.assertIsNone(request.header(b"location"))
            self.assertIsNone(request.header(b"refresh"))
            self.assertIsNone(request.header(b"retry-after"))
            self.assertNotIn(b"http-equiv", request.body)

    def test_retry_after(self) -> None:
        """503s carry Retry-After (and a page that refreshes itself); other errors do not."""
        rows: list[tuple[ProxyError, bytes | None]] = [
            (Unavailable("Not yet."), b"5"),
            (Unavailable("Not yet.", retry_after=30), b"30"),
            (Unauthorized("No."), None),
            (Forbidden("No."), None),
            (NotFound("No."), None),
            (Gone("Finished."), None),
            (BadGateway("Broken."), None),
        ]
        for error, retry_after in rows:
            html = render(error, NAVIGATE)
            fetch = render(error, FETCH)
            self.assertEqual(html.header(b"retry-after"), retry_after, error)
            self.assertEqual(fetch.header(b"retry-after"), retry_after, error)
            if retry_after is None:
                self.assertNotIn(b"http-equiv", html.body)
            else:
                refresh = b'<meta http-equiv="refresh" content="%s">' % (retry_after,)
                self.assertIn(refresh, html.body)

    def test_html_escapes_everything_shown(self) -> None:
        """Markup in a message, hint or title is shown as text, never run."""

        class Evil(ProxyError):
            status = 400
            title = XSS

        request = render(
            Evil(f"Bad {XSS} & more", hint=f'"><img src=x onerror=alert(1)>{XSS}'), NAVIGATE
        )
        body = request.body.decode("utf-8")
        self.assertNotIn("<script", body)
        self.assertNotIn("<img", body)
        self.assertNotIn('"><', body)
        self.assertIn("Bad &lt;script&gt;alert(1)&lt;/script&gt; &amp; more", body)
        self.assertIn("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;", body)
        self.assertIn("<title>400 &lt;script&gt;", body)

    def test_json_carries_markup_as_data(self) -> None:
        """In JSON the message is data, sent as application/json with nosniff."""
        request = render(BadRequest(XSS, hint=XSS), FETCH)
        self.assertEqual(json.loads(request.body)["errors"], [XSS])
        self.assertEqual(request.header(b"content-type"), b"application/json")
        self.assertEqual(request.header(b"x-content-type-options"), b"nosniff")

    def test_head_has_no_body(self) -> None:
        """A HEAD gets the same status and headers, with the GET's Content-Length, no body."""
        error = NotFound("Nothing here.")
        for headers in (NAVIGATE, FETCH):
            get = render(error, headers)
            head = render(error, headers, method=b"HEAD")
            self.assertEqual(head.responseCode, 404)
            self.assertEqual(head.written, [])
            self.assertEqual(head.header(b"content-length"), get.header(b"content-length"))
            self.assertEqual(head.header(b"content-type"), get.header(b"content-type"))
            self.assertEqual(head.finished, 1)

    def test_order_of_calls(self) -> None:
        """The request is released early, then answered in full and finished exactly once."""
        request = render(NotFound("x"))
        self.assertEqual(request.events, ["finishEarly", "code", "write", "finish"])
        self.assertEqual(request.finished, 1)

    def test_error_headers(self) -> None:
        """An error's own headers are sent, but cannot change the content type."""
        error = BadGateway(
            "Refused.",
            headers={b"x-arvados-gateway-error": b"yes", b"content-type": b"text/html"},
        )
        request = render(error, FETCH)
        self.assertEqual(request.header(b"x-arvados-gateway-error"), b"yes")
        self.assertEqual(request.header(b"content-type"), b"application/json")

    def test_non_ascii_message(self) -> None:
        """Messages in any language are sent as UTF-8 in both modes."""
        message = "Le conteneur n’est pas prêt — 容器"
        html = render(Unavailable(message), NAVIGATE)
        self.assertIn(message.encode("utf-8"), html.body)
        fetch = render(Unavailable(message), FETCH)
        self.assertEqual(json.loads(fetch.body)["errors"], [message])


class RedirectTests(SynchronousTestCase):
    """L{pages.redirect}."""

    def test_redirect(self) -> None:
        """A 303 to the given location, setting each cookie, leaking no referrer, cached nowhere."""
        request = PageRequest()
        pages.redirect(request, b"/p?a=1", [b"a=1; Path=/", b"b=2; Path=/"])
        self.assertEqual(request.responseCode, 303)
        self.assertEqual(request.header(b"location"), b"/p?a=1")
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"set-cookie"), [b"a=1; Path=/", b"b=2; Path=/"]
        )
        self.assertEqual(request.header(b"cache-control"), b"no-store")
        self.assertEqual(request.header(b"referrer-policy"), b"no-referrer")
        self.assertEqual(request.header(b"content-length"), b"0")
        self.assertEqual(request.written, [])
        self.assertEqual(request.events, ["finishEarly", "code", "finish"])


# --- The pages the real controller produces -----------------------------------------------------

ROOT_TOKEN = "RootTokenForPageTests0123456789abcdefghij"
SUFFIX = "containers.example.com"
PORT = 8888


class ControllerPageTests(SynchronousTestCase):
    """Errors from the real L{Controller}, through a L{ProxySite}: right mode, no token shown."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        config = ClusterConfig(
            source="test",
            cluster_id="zzzzz",
            system_root_token=ROOT_TOKEN,
            external_url=ExternalURL("https", SUFFIX),
            trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),),
        )
        self.cluster = FakeCluster("zzzzz", ROOT_TOKEN, clock=self.clock.seconds)
        self.gateways = FakeGatewayConnector()
        controller = Controller(self.clock, config, self.cluster, cast(Any, self.gateways))
        self.site = ProxySite(controller, self.clock)

    def shown(self, host: bytes, target: bytes, headers: tuple[tuple[bytes, bytes], ...]) -> Any:
        client = MemoryClient(self.site, IPv4Address("TCP", "127.0.0.1", 40000))
        client.send(request_bytes(b"GET", target, list(headers), host=host))
        response = client.response()
        self.assertTrue(response.complete)
        return response

    def test_no_token_in_any_error_page(self) -> None:
        """Each failure is a page in the requested mode, and the token appears nowhere in it."""
        c = self.cluster
        alice = c.add_user("Alice")
        bob = c.add_user("Bob")
        dave = c.add_user("Dave")
        running = c.add_container(gateway_address="127.0.0.1:9001")
        queued = c.add_container(state=QUEUED, gateway_address="")
        finished = c.add_container(state=COMPLETE)
        cr = c.add_container_request(alice.uuid, running.uuid)
        cr_queued = c.add_container_request(alice.uuid, queued.uuid)
        cr_finished = c.add_container_request(alice.uuid, finished.uuid)
        cr_none = c.add_container_request(alice.uuid, None)
        c.grant(bob.uuid, cr.uuid, CAN_READ)
        alice_token = c.add_token(alice.uuid)
        bob_token = c.add_token(bob.uuid)
        dave_token = c.add_token(dave.uuid)
        scoped = c.add_token(alice.uuid, scopes=[policy.connect_scope(cr.uuid, PORT + 1)])
        revoked = c.add_token(alice.uuid)
        c.revoke_token(revoked)
        unknown = "v2/zzzzz-gj3su-000000000000999/UnknownSecretValue0123456789"

        def host(uuid: str, suffix: str = "") -> bytes:
            return f"{uuid}-{PORT}.{SUFFIX}{suffix}".encode()

        def query(token: str) -> bytes:
            return b"/p?arvados_api_token=" + token.replace("/", "%2F").encode()

        # (host, target, token in the cookie or None, expected status, tokens that must not show)
        rows: list[tuple[bytes, bytes, str | None, int]] = [
            (host(cr.uuid), b"/p", None, 401),
            (host(cr.uuid), b"/p", unknown, 401),
            (host(cr.uuid), b"/p", revoked, 401),
            (host(cr.uuid), b"/p", dave_token, 404),
            (host(cr.uuid), b"/p", bob_token, 403),
            (host(cr.uuid), b"/p", scoped, 403),
            (host(cr_queued.uuid), b"/p", alice_token, 503),
            (host(cr_none.uuid), b"/p", alice_token, 503),
            (host(cr_finished.uuid), b"/p", alice_token, 410),
            # A query token on a host that is not served is refused before any redirect, and the
            # page does not repeat the URL.
            (host(cr.uuid, ":8443"), query(alice_token), None, 400),
            (b"example.org", query(alice_token), None, 400),
            (b"x." + host(cr.uuid), query(alice_token), None, 400),
        ]
        secrets = [ROOT_TOKEN, alice_token, bob_token, dave_token, scoped, revoked, unknown]
        problems = []
        for server, target, token, status in rows:
            for mode, headers in (("navigate", NAVIGATE), ("fetch", FETCH)):
                sent: tuple[tuple[bytes, bytes], ...] = headers
                if token is not None:
                    encoded = policy.encode_token_cookie(token.encode())
                    name = policy.token_cookie_name(secure=True)
                    sent = headers + ((b"Cookie", name + b"=" + encoded),)
                response = self.shown(server, target, sent)
                where = f"{server!r} {target!r} {mode}"
                if response.status != status:
                    problems.append(f"{where}: status {response.status}, expected {status}")
                kind = response.header(b"content-type") or b""
                wanted = b"text/html" if mode == "navigate" else b"application/json"
                if not kind.startswith(wanted):
                    problems.append(f"{where}: content-type {kind!r}")
                if response.header(b"location") is not None or response.header(b"set-cookie"):
                    problems.append(f"{where}: redirect or cookie on an error")
                for secret in secrets:
                    for form in self.forms(secret):
                        if form in response.raw:
                            problems.append(f"{where}: shows {form!r}")
        self.assertEqual(problems, [])

    def test_redirect_moves_token_out_of_the_url(self) -> None:
        """The 303 for a query token sends it only in the Set-Cookie, never in Location."""
        alice = self.cluster.add_user("Alice")
        token = self.cluster.add_token(alice.uuid)
        ctr = self.cluster.add_container()
        cr = self.cluster.add_container_request(alice.uuid, ctr.uuid)
        target = b"/p?x=1&arvados_api_token=" + token.replace("/", "%2F").encode() + b"&y=2"
        response = self.shown(f"{cr.uuid}-{PORT}.{SUFFIX}".encode(), target, NAVIGATE)
        self.assertEqual(response.status, 303)
        self.assertEqual(response.header(b"location"), b"/p?x=1&y=2")
        self.assertEqual(response.body, b"")
        cookies = response.all(b"set-cookie")
        self.assertEqual(len(cookies), 1)
        self.assertEqual(cookies[0], policy.token_set_cookie(token.encode(), secure=True))
        rest = [(n, v) for n, v in response.headers if n != b"set-cookie"]
        shown = b"".join(n + b": " + v for n, v in rest)
        for form in self.forms(token):
            self.assertNotIn(form, shown)

    @staticmethod
    def forms(secret: str) -> list[bytes]:
        """The ways a token could appear: whole, its secret part, URL-encoded, base64url."""
        raw = secret.encode()
        forms = [
            raw,
            raw.split(b"/")[-1],
            raw.replace(b"/", b"%2F"),
            policy.encode_token_cookie(raw),
            policy.encode_token_cookie(raw).rstrip(b"="),
        ]
        return [form for form in forms if len(form) >= 16 and re.search(rb"[A-Za-z]", form)]
