"""
The services page on Arvados, through the real front door with the Arvados backend and the fake
API server (loopback): the list is the user's readable container requests, read with their own
token; a Connect link's token is made with their own token, narrower and short-lived, and used up
on its first visit.  The same in a real browser through the real plugins is in
L{tests.test_arvados_browser}.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import defer
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.fakearvados import format_time
from tests.test_arvados_access import PORT, SUFFIX, T0, FrontDoorTestCase

SAME_ORIGIN = {
    b"Sec-Fetch-Site": [b"same-origin"],
    b"X-Requested-With": [b"arvproxy"],
    b"Content-Type": [b"application/json"],
}


class ArvadosPortalTests(FrontDoorTestCase):
    def setUp(self) -> None:
        super().setUp()
        api = self.api
        self.alice, self.bob = api.add_user("Alice"), api.add_user("Bob")
        self.token = api.add_token(self.alice)
        self.token_uuid = self.token.split("/")[1]
        ports = {str(PORT): {"access": "private", "label": "web", "initial_path": "/lab"}}
        self.own, self.own_container = self.running_request(
            self.alice, name="alice's", published_ports=ports
        )
        bobs = api.add_project(self.bob)
        api.grant(self.alice, bobs, "can_write")
        self.shared, _ = self.running_request(bobs, name="shared to write")
        readable = api.add_project(self.bob)
        api.grant(self.alice, readable, "can_read")
        self.read_only, _ = self.running_request(readable, name="shared to read")
        self.closed, _ = self.running_request(
            self.alice, name="closed", properties={"arvproxy:connections": "prohibited"}
        )
        self.strangers, _ = self.running_request(self.bob, name="bob's own")
        old = api.add_container(state="Complete", finished_at=format_time(T0 - 2 * 86400))
        self.old = api.add_container_request(self.alice, old, name="long finished")
        self.queued = api.add_container_request(
            self.alice, api.add_container(state="Queued"), name="queued"
        )

    async def portal(
        self, method: bytes, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        headers = Headers({b"Host": [f"{SUFFIX}".encode()], **SAME_ORIGIN})
        cookie = (
            policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie((token or self.token).encode())
        )
        headers.addRawHeader(b"Cookie", cookie)
        response = await treq.request(
            method.decode(),
            f"http://127.0.0.1:{self.port.getHost().port}{path}",
            headers=headers,
            data=None if body is None else json.dumps(body).encode(),
            pool=self.pool,
        )
        return response.code, json.loads(await response.content())

    def test_list(self) -> defer.Deferred[None]:
        """
        The page lists what the user can read (own and shared), live or recently finished,
        each saying whether they may connect and why not; it is read with their own token.
        """

        async def run() -> None:
            status, document = await self.portal(b"GET", "/api/containers")
            self.assertEqual(status, 200, document)
            items = {item["uuid"]: item for item in document["items"]}
            self.assertEqual(
                set(items), {self.own, self.shared, self.read_only, self.closed, self.queued}
            )
            connectable = {uuid for uuid, item in items.items() if item["can_connect"]}
            self.assertEqual(connectable, {self.own, self.shared})
            self.assertIn("write permission", items[self.read_only]["note"])
            self.assertIn("prohibits connections", items[self.closed]["note"])
            self.assertIsNone(items[self.own]["note"])
            self.assertEqual(items[self.queued]["state"], "Queued")
            [port] = items[self.own]["ports"]
            self.assertEqual(
                (port["port"], port["label"], port["url"]),
                (PORT, "web", f"http://{self.own}-{PORT}.{SUFFIX}/lab"),
            )
            listed = [c for c in self.api.calls if c.path.endswith("/container_requests")]
            self.assertTrue(listed)
            self.assertEqual({c.token_uuid for c in listed}, {self.token_uuid})

        return defer.ensureDeferred(run())

    def test_connect_link(self) -> defer.Deferred[None]:
        """
        Connect gives a link whose token the user made with their own token: scoped to the one
        port, expiring in 90 seconds.  Its first visit exchanges it for a session token with
        the same scope and revokes it, so the link in the history opens nothing.
        """

        async def run() -> None:
            status, answer = await self.portal(
                b"POST", "/api/connect", {"uuid": self.own, "port": PORT}
            )
            self.assertEqual(status, 200, answer)
            url = answer["url"]
            self.assertTrue(url.startswith(f"http://{self.own}-{PORT}.{SUFFIX}/lab?"), url)
            link = url.split("arvados_api_token=")[1]
            link = link.replace("%2F", "/")
            link_uuid = link.split("/")[1]
            record = self.api.tokens[link_uuid]
            scope = policy.connect_scope(self.own, PORT)
            self.assertEqual((record["owner_uuid"], record["scopes"]), (self.alice, [scope]))
            self.assertAlmostEqual(record["_expires"], self.clock.seconds() + 90, delta=1)
            [made] = [c for c in self.api.calls if c.method == "POST"]
            self.assertEqual(made.token_uuid, self.token_uuid)
            self.assertNotIn(self.token.split("/")[-1], url)

            # The first visit: 303 with a session cookie; the link's token is gone.
            response = await treq.get(
                f"http://127.0.0.1:{self.port.getHost().port}/lab?arvados_api_token={link}",
                headers=Headers({b"Host": [f"{self.own}-{PORT}.{SUFFIX}".encode()]}),
                pool=self.pool,
                allow_redirects=False,
            )
            await response.content()
            self.assertEqual(response.code, 303)
            self.assertNotIn(link_uuid, self.api.tokens)
            sessions = [
                t
                for t in self.api.tokens.values()
                if t["scopes"] == [scope] and t["owner_uuid"] == self.alice
            ]
            self.assertEqual(len(sessions), 1)
            self.assertGreater(sessions[0]["_expires"], self.clock.seconds() + 11 * 3600)
            cookie = response.headers.getRawHeaders(b"set-cookie")[0].split(b";")[0]
            session = policy.decode_token_cookie(cookie.split(b"=", 1)[1])
            assert session is not None
            self.assertEqual(await self.status(session.decode(), self.own), 200)
            self.assertEqual(await self.status(link, self.own), 401)

        return defer.ensureDeferred(run())

    def test_connect_refusals(self) -> defer.Deferred[None]:
        """Connect refuses what the front door would: read-only (403), prohibited (403),
        someone else's request (404), a token scoped to less than everything (403)."""
        scoped = self.api.add_token(self.alice, [policy.connect_scope(self.own, PORT)])
        table = [
            (self.read_only, None, 403),
            (self.closed, None, 403),
            (self.strangers, None, 404),
            (self.own, scoped, 403),
        ]

        async def run() -> None:
            got = [
                (await self.portal(b"POST", "/api/connect", {"uuid": u, "port": PORT}, t))[0]
                for u, t, _ in table
            ]
            self.assertEqual(got, [want for _, _, want in table])
            self.assertFalse([c for c in self.api.calls if c.method == "POST"])

        return defer.ensureDeferred(run())
