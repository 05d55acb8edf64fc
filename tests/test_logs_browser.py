"""
Why a container died, in a real headless Chromium through the real twistd controller: the
services page's card shows the failure reason and a Logs link; the link opens the logs page;
a finished container's 410 page links to the same page.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from arvproxy import backends
from arvproxy.backends.registry import RegistryStore
from arvproxy.containerlogs import ContainerLog
from tests.browser import Browser, sign_in, start_browser_chain

REASON = "the gateway could not start the container"
DETAIL = "cannot pull image example/broken:1: manifest unknown"
OUTPUT = "fetching data...\nTraceback (most recent call last):\nValueError: <b>not html</b>\n"


class LogsBrowserTests(TestCase):
    timeout = 180

    def test_card_reason_and_logs_link(self) -> defer.Deferred[None]:
        """The card says why the container ended and links to its logs; so does its 410."""
        return defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        from selenium.webdriver.common.by import By

        chain = await start_browser_chain(self)
        store = RegistryStore(chain.config.registry_path, "zzzzz")
        self.addCleanup(store.close)
        [user] = [u for u in store.list_users() if u.full_name == "Browser Test User"]
        failed = store.create_container_request(
            user.uuid, name="broken job", published_ports={"8080": {}}
        )
        uuid = failed.container_uuid
        assert uuid is not None

        def fail() -> None:
            output = ContainerLog(chain.config.container_logs, uuid, 1024 * 1024)
            output.write(OUTPUT.encode())
            output.note(f"The gateway could not start the container: {DETAIL}")
            output.close()
            store.lock_container(uuid)
            store.update_container(
                uuid,
                state=backends.CANCELLED,
                runtime_status={"error": REASON, "errorDetail": DETAIL},
            )

        await deferToThread(fail)
        browser = await Browser.start(self)
        page = chain.config.external_url.url_for()
        await sign_in(browser, page, chain.token)
        card = f'.card[data-uuid="{failed.uuid}"]'
        text = await browser.wait_for_text(card, lambda t: "Why it ended" in t)
        self.assertIn(f"Why it ended: {REASON}", text)
        self.assertIn(DETAIL, text)
        self.assertIn("Cancelled", text)
        await browser.screenshot("logs-card")

        def open_logs(driver: Any) -> None:
            driver.find_element(By.CSS_SELECTOR, f"{card} .logs a").click()

        await browser.call(open_logs)
        output = await browser.wait_for_text("#output", lambda t: "fetching data" in t)
        self.assertEqual(await browser.current_url(), f"{page}logs/{failed.uuid}")
        self.assertIn("ValueError: <b>not html</b>", output)  # shown as text, not markup
        self.assertIn(DETAIL, output)
        reason = await browser.text(".reason")
        self.assertIn(REASON, reason)
        await browser.screenshot("logs-page")

        # The finished container's own address: a 410 page with the same Logs link.
        vhost = chain.config.external_url.url_for(f"{failed.uuid}-8080")
        await browser.get(f"{vhost}?arvados_api_token={chain.token}")
        gone = await browser.wait_for_text("h1", lambda t: "(410)" in t)
        self.assertIn("finished", gone)

        def follow_link(driver: Any) -> None:
            driver.find_element(By.LINK_TEXT, "Logs").click()

        await browser.call(follow_link)
        await browser.wait_for_text("#output", lambda t: "fetching data" in t)
        self.assertEqual(await browser.current_url(), f"{page}logs/{failed.uuid}")
