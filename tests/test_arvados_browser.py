"""
The services page on an Arvados cluster in a real headless Chromium (L{tests.browser}), through the
real twistd front door (C{Backend: arvados}) and gateway (the dispatcher's C{Env}), against the
fake Arvados API served over TLS: sign in, see one's own and shared container requests, Connect,
and land in a service that uses C{fetch} and a WebSocket.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from arvproxy import policy
from tests import e2e
from tests.browser import Browser
from tests.test_arvados_chain import ArvadosCluster
from tests.test_portal_browser import ServiceFactory, _history_urls, navigation_urls, sign_in


class ArvadosPortalBrowserTests(TestCase):
    timeout = 180

    def test_sign_in_and_connect(self) -> defer.Deferred[None]:
        """
        On Arvados, the page lists the user's own and shared requests, and Connect opens the
        service (fetch and WebSocket) with a token the user's own token made, used up on its
        first visit; the user's own token is in no URL.
        """
        return defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        service = ServiceFactory()
        listening = reactor.listenTCP(0, service, interface="127.0.0.1")
        self.addCleanup(lambda: defer.ensureDeferred(service.stop(listening)))
        service_port = listening.getHost().port
        cluster = ArvadosCluster(self, service_port)
        api = cluster.api
        bob = api.add_user("Bob")
        bobs = api.add_project(bob, "Bob's")
        api.grant(cluster.alice, bobs, "can_write")
        shared = api.add_container_request(
            bobs, api.add_container(state="Queued"), name="shared by Bob"
        )
        _, port, _ = await cluster.start_plugins(self)

        browser = await Browser.start(self)
        await sign_in(browser, f"http://{e2e.SUFFIX}:{port}/", cluster.token)
        listed = await browser.wait_for_text(
            "#list", lambda t: cluster.request in t and shared in t
        )
        self.assertIn("web (port", listed)
        await browser.screenshot("arvados-portal-page")

        def connect(driver: Any) -> None:
            before = set(driver.window_handles)
            driver.find_element(
                By.CSS_SELECTOR,
                f'li[data-uuid="{cluster.request}"] button.connect[data-port="{service_port}"]',
            ).click()
            WebDriverWait(driver, 20).until(lambda d: len(d.window_handles) > len(before))
            [tab] = set(driver.window_handles) - before
            driver.switch_to.window(tab)

        await browser.call(connect)
        fetched = await browser.wait_for_text("#fetch", lambda t: t.startswith("fetch ok"))
        echoed = await browser.wait_for_text("#ws", lambda t: t.startswith("echo"))
        self.assertEqual((fetched, echoed), ("fetch ok: pong", "echo: hello over the proxy"))
        self.assertEqual(
            await browser.current_url(),
            f"http://{cluster.request}-{service_port}.{e2e.SUFFIX}:{port}/",
        )
        await browser.screenshot("arvados-portal-service")

        urls = await browser.call(navigation_urls)
        profile = browser.driver.capabilities["chrome"]["userDataDir"]
        await deferToThread(browser.driver.quit)
        browser.driver.quit = lambda: None  # The cleanup's quit: already done.
        urls += await deferToThread(_history_urls, profile)
        links = [unquote(u) for u in urls if "arvados_api_token=" in u]
        self.assertTrue(links, urls)
        own_secret = cluster.token.split("/")[-1]
        self.assertFalse([u for u in urls if own_secret in unquote(u)])
        scope = policy.connect_scope(cluster.request, service_port)
        # The link's token was made with the user's own token, and is gone after its visit...
        made = [
            c.token_uuid
            for c in api.calls
            if c.method == "POST" and c.path.endswith("/api_client_authorizations")
        ]
        # The link's (with the user's token), then the session's (with the service token).
        self.assertEqual(made, [cluster.token.split("/")[1], "zzzzz-gj3su-000000000000000"])
        for link in links:
            link_uuid = link.split("arvados_api_token=")[1].split("/")[1]
            self.assertNotIn(link_uuid, api.tokens)
        # ...exchanged for a session token of the same narrow scope.
        sessions = [t for t in api.tokens.values() if t["scopes"] == [scope]]
        self.assertEqual(len(sessions), 1)
        self.assertEqual(sessions[0]["owner_uuid"], cluster.alice)
        # The connection marked the container (no reuse after a connection).
        self.assertTrue(cluster.record()["interactive_session_started"])
