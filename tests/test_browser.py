"""
The chain as a person meets it: a real headless Chromium opening a container's service through
the real twistd controller and gateway.  Screenshots go to test-artifacts/.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from arvproxy import policy
from tests.browser import Browser, start_browser_chain


class BrowserTests(unittest.TestCase):
    timeout = 120

    def test_sign_in_link(self) -> defer.Deferred[None]:
        """
        The link with ?arvados_api_token= lands on the service's page with the token gone from
        the address bar and kept only in an HttpOnly cookie of the service's own host; the
        service never sees the token, and the page's fetch works through the proxy.
        """
        return defer.ensureDeferred(self._sign_in_link())

    async def _sign_in_link(self) -> None:
        browser = await Browser.start(self)
        chain = await start_browser_chain(self)

        await browser.get(chain.url(chain.token))

        self.assertEqual(await browser.current_url(), f"http://{chain.host}/")
        self.assertEqual(await browser.title(), "arvproxy demo service")
        # The page's script fetches the counter through the proxy every second.
        count = await browser.wait_for_text("#counter", lambda t: t.isdigit() and int(t) >= 2)
        self.assertGreaterEqual(int(count), 2)
        checks = await browser.text(".checks")
        self.assertIn("No arvados_api_token cookie reached this service", checks)
        self.assertIn("X-Forwarded-* set by the proxy: For=127.0.0.1, Proto=http", checks)
        await browser.screenshot("browser-service-page")

        cookies = await browser.cookies()
        tokens = [c for c in cookies if c["name"] == "arvados_api_token"]
        self.assertEqual(len(tokens), 1, cookies)
        cookie: dict[str, Any] = tokens[0]
        self.assertTrue(cookie["httpOnly"])
        self.assertEqual(cookie["domain"], chain.host.rsplit(":", 1)[0])  # host-only
        self.assertEqual(cookie["sameSite"], "Lax")
        self.assertEqual(policy.decode_token_cookie(cookie["value"].encode()), chain.token.encode())

        seen = chain.service.requests
        self.assertEqual(seen[0].method, "GET")
        self.assertEqual(seen[0].path, "/")
        self.assertIn("/counter", [r.path for r in seen])
        secret = chain.token.rsplit("/", 1)[1]
        for request in seen:
            self.assertNotIn(secret, repr(request))
            self.assertNotIn("arvados_api_token", " ".join(request.header("cookie")))
            self.assertEqual(request.header("x-forwarded-host"), [chain.host])

    def test_no_token(self) -> defer.Deferred[None]:
        """Without a token, Chromium is shown the 401 page that says how to sign in."""
        return defer.ensureDeferred(self._no_token())

    async def _no_token(self) -> None:
        browser = await Browser.start(self)
        chain = await start_browser_chain(self)

        await browser.get(chain.url())

        self.assertEqual(await browser.current_url(), f"http://{chain.host}/")
        self.assertEqual(await browser.title(), "401 Sign-in required")
        self.assertIn("You need to sign in", await browser.text("main"))
        self.assertIn("?arvados_api_token=", await browser.text(".hint"))
        await browser.screenshot("browser-401-no-token")
        self.assertEqual(await browser.cookies(), [])
        self.assertEqual(chain.service.requests, [])
