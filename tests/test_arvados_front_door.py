"""
The real front door with the Arvados backend (on loopback, against the fake API server): what it
does with the container's state and the cluster's policies, as a browser would see it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from arvproxy.backends import RUNNING
from tests.test_arvados_access import FrontDoorTestCase


class FreshStateTests(FrontDoorTestCase):
    def test_finished_container_refused_at_once(self) -> defer.Deferred[None]:
        """
        A container that went Running to Complete (or Cancelled) is refused (410) by the very
        next request, with no time passing: its state is never served from a cache.
        """
        alice = self.api.add_user("Alice")
        token = self.api.add_token(alice)
        cases: list[tuple[str, dict[str, Any]]] = [
            ("Complete", {"exit_code": 0}),
            ("Cancelled", {}),
        ]

        async def run() -> None:
            for state, fields in cases:
                cr, container = self.running_request(alice)
                self.assertEqual(await self.status(token, cr), 200)
                self.assertEqual(await self.status(token, container), 200)
                forwarded = len(self.gateways.calls)
                self.api.containers[container].update(state=state, **fields)
                self.assertEqual(await self.status(token, cr), 410, state)
                self.assertEqual(await self.status(token, container), 410, state)
                self.assertEqual(len(self.gateways.calls), forwarded, state)

        return defer.ensureDeferred(run())

    def test_started_container_served_at_once(self) -> defer.Deferred[None]:
        """A container that was Locked is served by the first request after it runs."""
        alice = self.api.add_user("Alice")
        token = self.api.add_token(alice)
        container = self.api.add_container(state="Locked")
        cr = self.api.add_container_request(alice, container)

        async def run() -> None:
            self.assertEqual(await self.status(token, cr), 503)
            self.api.containers[container].update(state=RUNNING, gateway_address="127.0.0.1:1")
            self.assertEqual(await self.status(token, cr), 200)

        return defer.ensureDeferred(run())


class PolicyTests(FrontDoorTestCase):
    def test_first_connection_marks_the_record(self) -> defer.Deferred[None]:
        """
        The first request that reaches a container sets interactive_session_started on its
        Arvados record, once, with the SystemRootToken (as ContainerSSH does); later requests
        write nothing.
        """
        alice = self.api.add_user("Alice")
        token = self.api.add_token(alice)
        cr, container = self.running_request(alice)

        async def run() -> None:
            self.assertFalse(self.api.containers[container]["interactive_session_started"])
            for _ in range(5):
                self.assertEqual(await self.status(token, cr), 200)
            self.assertTrue(self.api.containers[container]["interactive_session_started"])
            puts = [c for c in self.api.calls if c.method == "PUT"]
            self.assertEqual(len(puts), 1)
            self.assertEqual(puts[0].token_uuid, "zzzzz-gj3su-000000000000000")
            self.assertEqual(puts[0].params["container"], {"interactive_session_started": True})

        return defer.ensureDeferred(run())

    def test_prohibited_by_a_property(self) -> defer.Deferred[None]:
        """
        A container request whose properties prohibit connections keeps everyone out of its
        container (403), admins too, by the request's URL, the container's, or another
        request's that uses the container; nothing is forwarded or marked.
        """
        alice = self.api.add_user("Alice")
        admin = self.api.add_user("Admin", is_admin=True)
        cr, container = self.running_request(
            alice, properties={"arvproxy:connections": "prohibited"}
        )
        other = self.api.add_container_request(alice, container)
        tokens = [self.api.add_token(alice), self.api.add_token(admin)]

        async def run() -> None:
            got = [
                await self.status(t, target) for t in tokens for target in (cr, container, other)
            ]
            self.assertEqual(got, [403] * 6)
            self.assertEqual(self.gateways.calls, [])
            self.assertFalse(self.api.containers[container]["interactive_session_started"])

        return defer.ensureDeferred(run())
