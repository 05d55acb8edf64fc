"""
Tests for L{arvproxy.controller.logpage} (C{/logs/<uuid>} on the services page host) and the
Logs link of the 410/502/503 pages, in memory: who may see a container's output (the rule for
connecting, as a table), what the page and the card say, and the links.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer

from arvproxy import backends
from arvproxy.containerlogs import ContainerLog
from arvproxy.controller.logpage import LogPage
from arvproxy.testing import FakeResponse
from tests.test_portal import GATEWAY, SUFFIX, PortalTestCase, cookie

OUTPUT = b"line one\n<script>alert(1)</script>\n"
NAVIGATE = [(b"Sec-Fetch-Mode", b"navigate"), (b"Accept", b"text/html")]


class LogPageTests(PortalTestCase):
    """alice owns the request; carol can write it; bob can only read it; dave cannot see it."""

    def setUp(self) -> None:
        super().setUp()
        self.directory = os.path.abspath(self.mktemp())
        output = ContainerLog(self.directory, self.container.uuid, 65536)
        output.write(OUTPUT)
        output.close()
        portal = self.controller.portal
        portal.logs = LogPage(
            self.clock,
            self.cluster,
            self.directory,
            portal._credentials,
            in_thread=lambda f, *args: defer.succeed(f(*args)),
        )
        self.dave = self.cluster.add_user("Dave")
        self.tokens["dave"] = self.cluster.add_token(self.dave.uuid)
        self.tokens["alice-scoped"] = self.cluster.add_token(
            self.alice.uuid, [f"CONNECT /arvados/v1/container/{self.cr.uuid}/8888"]
        )

    def logs(self, uuid: str, who: str | None, html: bool = False) -> Any:
        headers = [cookie(self.tokens[who])] if who else []
        return self.send(f"/logs/{uuid}".encode(), headers=[*headers, *(NAVIGATE if html else [])])

    def test_who_may_see(self) -> None:
        """Exactly those who may connect see the output; others get 401, 403 or 404."""
        cases = [
            ("owner", "alice", 200),
            ("writer by a permission link", "carol", 200),
            ("admin", "admin", 200),
            ("reader only", "bob", 403),
            ("stranger", "dave", 404),
            ("no token", None, 401),
            ("token scoped to one port", "alice-scoped", 403),
        ]
        for name, who, status in cases:
            for uuid in (self.cr.uuid, self.container.uuid):
                response = self.logs(uuid, who)
                self.assertEqual(response.status, status, (name, uuid, response.body))
                if status == 200:
                    self.assertEqual(response.body, OUTPUT, name)
                    self.assertEqual(response.header(b"content-type"), b"text/plain; charset=utf-8")
                else:
                    self.assertNotIn(b"line one", response.body, name)

    def test_unknown_and_malformed(self) -> None:
        """Unknown UUIDs and paths that are not a request's or container's are 404."""
        for path in (
            b"/logs/zzzzz-xvhdp-000000000000000",
            b"/logs/zzzzz-dz642-000000000000000",
            b"/logs/zzzzz-tpzed-000000000000000",
            b"/logs/../../etc/passwd",
            b"/logs/",
        ):
            response = self.send(path, headers=[cookie(self.tokens["admin"])])
            self.assertEqual(response.status, 404, path)

    def test_html_page(self) -> None:
        """A browser gets a page: state, reason, the output escaped; it refreshes while running."""
        response = self.logs(self.cr.uuid, "alice", html=True)
        self.assertEqual(response.status, 200)
        self.assertIn(b"&lt;script&gt;alert(1)&lt;/script&gt;", response.body)
        self.assertNotIn(b"<script>", response.body)
        self.assertIn(b'http-equiv="refresh"', response.body)
        self.assertIn(b"default-src 'none'", response.header(b"content-security-policy") or b"")
        self.cluster.update_container(
            self.container.uuid,
            state=backends.CANCELLED,
            runtime_status={"error": "its gateway was stopped", "errorDetail": "by <SIGTERM>"},
        )
        response = self.logs(self.cr.uuid, "alice", html=True)
        self.assertIn(b"Why it ended:</strong> its gateway was stopped", response.body)
        self.assertIn(b"by &lt;SIGTERM&gt;", response.body)
        self.assertNotIn(b'http-equiv="refresh"', response.body)

    def test_card(self) -> None:
        """The card has the reason, its detail and the Logs path."""
        self.cluster.update_container(
            self.container.uuid,
            state=backends.CANCELLED,
            runtime_status={"error": "cannot start", "errorDetail": "cannot pull image x"},
        )
        response = self.send(
            b"/api/containers",
            headers=[cookie(self.tokens["alice"]), (b"X-Requested-With", b"arvproxy")],
        )
        [item] = json.loads(response.body)["items"]
        self.assertEqual(item["reason"], "cannot start")
        self.assertEqual(item["reason_detail"], "cannot pull image x")
        self.assertEqual(item["logs_url"], f"/logs/{self.cr.uuid}")


class ErrorLinkTests(PortalTestCase):
    """410, 502 and 503 on a container's host link to its logs; other errors do not."""

    def service_host(self) -> bytes:
        return f"{self.cr.uuid}-8888.{SUFFIX}".encode()

    def test_links(self) -> None:
        """Each failure gets the Logs link in its JSON and its HTML page."""
        url = f"https://{SUFFIX}/logs/{self.cr.uuid}"

        def finished() -> None:
            self.cluster.update_container(self.container.uuid, state=backends.COMPLETE)

        def starting() -> None:
            self.cluster.update_container(self.container.uuid, gateway_address="")

        def broken() -> None:
            self.gateways.responder = lambda call: FakeResponse(
                502, b"Bad", [(b"X-Arvados-Gateway-Error", b"refused")], b""
            )

        for name, change, status in [
            ("finished", finished, 410),
            ("no gateway yet", starting, 503),
            ("gateway refused", broken, 502),
        ]:
            self.setUp()
            change()
            response = self.send(b"/", self.tokens["alice"], host=self.service_host())
            self.assertEqual(response.status, status, (name, response.body))
            self.assertEqual(json.loads(response.body)["links"], {"logs": url}, name)
            page = self.send(b"/", self.tokens["alice"], host=self.service_host(), headers=NAVIGATE)
            self.assertIn(f'<a href="{url}">Logs</a>'.encode(), page.body, name)

    def test_no_link_elsewhere(self) -> None:
        """A refusal (403) or an unknown container (404) links nowhere."""
        response = self.send(b"/", self.tokens["bob"], host=self.service_host())
        self.assertEqual(response.status, 403)
        self.assertNotIn("links", json.loads(response.body))
        other = f"zzzzz-xvhdp-000000000000000-8888.{SUFFIX}".encode()
        response = self.send(b"/", self.tokens["alice"], host=other)
        self.assertEqual(response.status, 404)
        self.assertNotIn("links", json.loads(response.body))
        self.assertEqual(GATEWAY, self.container.gateway_address)
