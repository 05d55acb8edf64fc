"""
The container services page in a real headless Chromium (L{tests.browser}), through the real
twistd controller and gateway: sign in, watch a port appear as the container starts listening,
Connect, and land in a service that uses both C{fetch} and a WebSocket, without the user's own
token ever being in a URL.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from arvproxy.backends.registry import RegistryStore
from arvproxy.errors import NotFound
from tests.browser import Browser, sign_in, start_browser_chain
from tests.wsservice import EchoFactory

SERVICE_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Echo service</title>
<style>body{font:18px system-ui;margin:2rem} .ok{color:#1f6f2b}</style></head>
<body><h1>Echo service</h1>
<p>fetch: <span id="fetch">waiting</span></p>
<p>WebSocket: <span id="ws">waiting</span></p>
<script>
fetch("/api/ping", {cache: "no-store"}).then(r => r.text()).then(t => {
  const e = document.getElementById("fetch"); e.textContent = "fetch ok: " + t; e.className = "ok";
});
const scheme = location.protocol === "https:" ? "wss://" : "ws://";
const socket = new WebSocket(scheme + location.host + "/ws");
socket.onopen = () => socket.send("hello over the proxy");
socket.onmessage = (m) => {
  const e = document.getElementById("ws"); e.textContent = "echo: " + m.data; e.className = "ok";
};
socket.onerror = () => { document.getElementById("ws").textContent = "websocket failed"; };
</script></body></html>
"""


class _Ping(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"pong"


class _Page(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return SERVICE_PAGE


class _Sniffer(Protocol):
    """
    One port, two servers: a connection whose first request asks for a WebSocket goes to the
    wsproto echo server, any other to a twisted.web site.
    """

    def __init__(self, site: server.Site, echo: EchoFactory) -> None:
        self.site = site
        self.echo = echo
        self.buffer = b""
        self.inner: Protocol | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head = self.buffer.split(b"\r\n\r\n", 1)[0].lower()
        factory = self.echo if b"upgrade: websocket" in head else self.site
        self.inner = factory.buildProtocol(self.transport.getPeer())
        self.inner.makeConnection(self.transport)
        self.inner.dataReceived(self.buffer)

    def connectionLost(self, reason: Any = None) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
        self.factory.closed(self)


class ServiceFactory(Factory):
    """The service "inside the container": a page that uses fetch and a WebSocket."""

    def __init__(self) -> None:
        root = resource.Resource()
        root.putChild(b"", _Page())
        api = resource.Resource()
        api.putChild(b"ping", _Ping())
        root.putChild(b"api", api)
        self.site = server.Site(root, reactor=reactor)
        self.echo = EchoFactory()
        self.open: dict[_Sniffer, defer.Deferred[None]] = {}

    def buildProtocol(self, addr: Any) -> _Sniffer:
        protocol = _Sniffer(self.site, self.echo)
        protocol.factory = self
        self.open[protocol] = defer.Deferred()
        return protocol

    def closed(self, protocol: _Sniffer) -> None:
        done = self.open.pop(protocol, None)
        if done is not None:
            done.callback(None)

    async def stop(self, port: Any) -> None:
        await port.stopListening()
        waiting = list(self.open.values())
        for protocol in list(self.open):
            protocol.transport.loseConnection()
        await defer.gatherResults(waiting)


def navigation_urls(driver: Any) -> list[str]:
    """Every URL in the navigation history of every tab of a driver's browser."""
    urls = []
    for handle in driver.window_handles:
        driver.switch_to.window(handle)
        history = driver.execute_cdp_cmd("Page.getNavigationHistory", {})
        urls += [entry["url"] for entry in history["entries"]]
    return urls


def _history_urls(profile: str) -> list[str]:
    """Every URL in the History database of a Chromium profile (after Chromium has quit)."""
    path = os.path.join(profile, "Default", "History")
    copy = path + ".copy"
    shutil.copyfile(path, copy)
    with sqlite3.connect(copy) as db:
        return [row[0] for row in db.execute("SELECT url FROM urls")]


class PortalBrowserTests(TestCase):
    timeout = 180

    async def _start(self) -> tuple[Any, Browser, int, RegistryStore]:
        chain = await start_browser_chain(self)
        service = ServiceFactory()
        port = reactor.listenTCP(0, service, interface="127.0.0.1")
        self.addCleanup(lambda: defer.ensureDeferred(service.stop(port)))
        self.service = service
        store = RegistryStore(chain.config.registry_path, "zzzzz")
        self.addCleanup(store.close)
        browser = await Browser.start(self)
        return chain, browser, port.getHost().port, store

    def test_sign_in_connect_and_no_token_in_urls(self) -> defer.Deferred[None]:
        """Sign in, see a discovered port appear, Connect, land in the service (fetch and
        WebSocket), and no URL the browser visited holds the user's own token."""
        return defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        from selenium.webdriver.common.by import By

        chain, browser, service_port, store = await self._start()
        page = chain.config.external_url.url_for()
        await sign_in(browser, page, chain.token)
        await browser.wait_for_text("#list", lambda t: chain.request_uuid in t)
        listed = await browser.text("#list")
        self.assertIn(f"Port {chain.container.port}", listed)
        self.assertNotIn(f"Port {service_port}", listed)

        # The container starts listening on another port: it appears without a reload.
        await deferToThread(
            store.update_container, chain.container_uuid, listening_ports=[service_port]
        )
        await browser.wait_for_text("#list", lambda t: f"Port {service_port}" in t)
        status = await browser.text("#status")
        self.assertIn("2 ports", status)
        await browser.screenshot("portal-page")
        # At phone width every port's Connect button is still there, full width.
        await browser.call(lambda driver: driver.set_window_size(390, 844))
        await browser.screenshot("portal-page-phone")
        await browser.call(lambda driver: driver.set_window_size(1200, 1000))

        def connect(driver: Any) -> str:
            before = set(driver.window_handles)
            driver.find_element(
                By.CSS_SELECTOR, f'button.connect[data-port="{service_port}"]'
            ).click()
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 20).until(lambda d: len(d.window_handles) > len(before))
            [tab] = set(driver.window_handles) - before
            driver.switch_to.window(tab)
            return tab

        await browser.call(connect)
        fetched = await browser.wait_for_text("#fetch", lambda t: t.startswith("fetch ok"))
        echoed = await browser.wait_for_text("#ws", lambda t: t.startswith("echo"))
        self.assertEqual(fetched, "fetch ok: pong")
        self.assertEqual(echoed, "echo: hello over the proxy")
        url = await browser.current_url()
        self.assertEqual(
            url, f"http://{chain.request_uuid}-{service_port}.containers.localhost:{chain.port}/"
        )
        await browser.screenshot("portal-service")
        self.assertEqual(self.service.echo.frames, [("TextMessage", 20)])

        # Every URL of every tab's history, then the profile's History database.
        urls = await browser.call(navigation_urls)
        profile = browser.driver.capabilities["chrome"]["userDataDir"]
        await deferToThread(browser.driver.quit)
        browser.driver.quit = lambda: None  # The cleanup's quit: already done.
        urls += await deferToThread(_history_urls, profile)
        self.assertIn(page, urls)
        # The Connect link did carry a token (so this check looks at the right place)...
        connect_urls = [u for u in urls if "arvados_api_token=" in u]
        self.assertTrue(connect_urls, urls)
        own = chain.token.split("/")[-1]
        for visited in urls:
            # ...but never the user's own: only the short-lived scoped one.
            self.assertNotIn(own, unquote(visited))
        scope = f"CONNECT /arvados/v1/container/{chain.request_uuid}/{service_port}"
        for visited in connect_urls:
            # The link's token was used up on the first visit: the history entry is dead...
            scoped = unquote(visited.split("arvados_api_token=")[1].split("&")[0])
            self.assertRaises(NotFound, store.get_token, scoped.split("/")[1])
        # ...and the session it was exchanged for carries the same narrow scope.
        sessions = [t for t in store.list_tokens() if t.scopes == (scope,)]
        self.assertEqual(len(sessions), len(set(connect_urls)), store.list_tokens())
