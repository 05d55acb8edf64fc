"""
Login CSRF (issue 16): a token in a link never silently replaces who a browser is signed in as
(L{arvproxy.controller.signin}), on a container's host and on the services page, in memory.
"""

from __future__ import annotations

import html
import re
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from arvproxy import policy
from arvproxy.backends import Credentials
from arvproxy.controller import signin
from arvproxy.controller.statecookies import StateCookies
from arvproxy.testing import ParsedResponse
from tests.test_controller import FETCH, NAVIGATE, ROOT_TOKEN, SUFFIX, ControllerTestCase, cookie

_ACTION = re.compile(rb'<form method="post" action="([^"]*)"')


def credentials(user: str) -> Credentials:
    return Credentials(token_uuid=None, user_uuid=user, is_admin=False)


class DecideTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Ask only when signed in as one user and the link's token works for another."""
        alice, bob = credentials("alice"), credentials("bob")
        rows = [
            (None, None, False, signin.Decision.SIGN_IN),
            (None, bob, False, signin.Decision.SIGN_IN),
            (alice, None, False, signin.Decision.KEEP),
            (alice, None, True, signin.Decision.KEEP),
            (alice, credentials("alice"), False, signin.Decision.SIGN_IN),
            (alice, bob, False, signin.Decision.ASK),
            (alice, bob, True, signin.Decision.SIGN_IN),
        ]
        for current, incoming, confirmed, expected in rows:
            self.assertEqual(signin.decide(current, incoming, confirmed), expected)


class LinkTokenTests(ControllerTestCase):
    """Alice is signed in; links carry Bob's (or her own, or a broken) token."""

    def link(self, token: str, target: bytes = b"/lab?x=1") -> bytes:
        joiner = b"&" if b"?" in target else b"?"
        return target + joiner + b"arvados_api_token=" + quote(token, safe="").encode()

    def same_origin(self, host: bytes) -> list[tuple[bytes, bytes]]:
        return [(b"Sec-Fetch-Site", b"same-origin"), (b"Origin", b"https://" + host)]

    def ask(self, host: bytes) -> tuple[ParsedResponse, bytes]:
        """Alice follows a link with Bob's token: the question, and its form's action."""
        first = self.send(host, self.link(self.tokens["bob"]), self.tokens["alice"], NAVIGATE)
        self.assertEqual((first.status, first.all(b"set-cookie")), (303, []))
        location = first.header(b"location")
        assert location is not None
        self.assertTrue(location.startswith(b"/lab?x=1&arvados_switch="), location)
        response = self.send(host, location, self.tokens["alice"], NAVIGATE)
        self.assertEqual(response.status, 200, response.body)
        match = _ACTION.search(response.body)
        assert match is not None, response.body
        action = html.unescape(match.group(1).decode()).encode()
        self.assertEqual(action, location)
        return response, action

    def test_question_names_both_and_changes_nothing(self) -> None:
        """The question names both users, sets no cookie, reaches no service, cannot be framed."""
        host = self.host(self.cr.uuid)
        response, action = self.ask(host)
        self.assertEqual(response.all(b"set-cookie"), [])
        self.assertIn(self.bob.uuid.encode(), response.body)
        self.assertIn(self.alice.uuid.encode(), response.body)
        policy_header = response.header(b"content-security-policy") or b""
        self.assertIn(b"frame-ancestors 'none'", policy_header)
        self.assertEqual(response.header(b"cache-control"), b"no-store")
        self.assertEqual(self.gateways.calls, [])
        # The "stay" link: the address without the sealed token.
        self.assertIn(b'href="/lab?x=1"', response.body)
        # Not a page navigation: a 409 in JSON, nothing set.
        fetched = self.send(host, action, self.tokens["alice"], FETCH)
        self.assertEqual((fetched.status, fetched.all(b"set-cookie")), (409, []))

    def test_confirmation(self) -> None:
        """Only the page's own POST switches, and lands on the address without the token."""
        host = self.host(self.cr.uuid)
        _, action = self.ask(host)
        alice = self.tokens["alice"]
        refused = [
            (b"GET", self.same_origin(host)),
            (b"POST", [(b"Sec-Fetch-Site", b"cross-site")]),
            (b"POST", [(b"Sec-Fetch-Site", b"same-site")]),
            (b"POST", [(b"Origin", b"https://evil.example")]),
            (b"POST", [(b"Sec-Fetch-Site", b"same-origin"), (b"Origin", b"https://x")]),
            (b"POST", []),
        ]
        for method, headers in refused:
            response = self.send(host, action, alice, [*headers, *NAVIGATE], method)
            self.assertEqual((response.status, response.all(b"set-cookie")), (200, []), headers)
        # The token itself, even POSTed from the page's origin, only leads to the question;
        # an altered sealed token to the address without it.
        link = self.link(self.tokens["bob"])
        asked = self.send(host, link, alice, self.same_origin(host), b"POST")
        self.assertEqual((asked.status, asked.all(b"set-cookie")), (303, []))
        self.assertIn(b"arvados_switch=", asked.header(b"location") or b"")
        altered = action[:-3] + (b"AAA" if not action.endswith(b"AAA") else b"BBB")
        response = self.send(host, altered, alice, self.same_origin(host), b"POST")
        self.assertEqual((response.status, response.all(b"set-cookie")), (303, []))
        self.assertEqual(response.header(b"location"), b"/lab?x=1")
        # Without Sec-Fetch-Site, the host's own Origin is enough; with it, "null" is too.
        for headers in (
            self.same_origin(host),
            [(b"Origin", b"https://" + host)],
            [(b"Sec-Fetch-Site", b"same-origin"), (b"Origin", b"null")],
            [(b"Sec-Fetch-Site", b"same-origin")],
        ):
            response = self.send(host, action, alice, headers, b"POST")
            self.assertEqual(response.status, 303, headers)
            self.assertEqual(response.header(b"location"), b"/lab?x=1")
            self.assertEqual(
                response.all(b"set-cookie"),
                [policy.token_set_cookie(self.tokens["bob"].encode(), True)],
            )
        self.assertEqual(self.gateways.calls, [])

    def test_sealed_token_is_bound(self) -> None:
        """A sealed token works only on its host, for its signed-in user, for ten minutes."""
        host = self.host(self.cr.uuid)
        _, action = self.ask(host)
        headers = [(b"Sec-Fetch-Site", b"same-origin")]
        for where, signed_in in (
            (self.host(self.cr.uuid, 9999), self.tokens["alice"]),  # another host
            (host, self.tokens["dave"]),  # another signed-in user
            (host, None),  # no one signed in
        ):
            response = self.send(where, action, signed_in, headers, b"POST")
            self.assertEqual((response.status, response.all(b"set-cookie")), (303, []), where)
            self.assertEqual(response.header(b"location"), b"/lab?x=1")
        self.clock.advance(signin.SWITCH_SECONDS)  # Still good at the last second.
        self.assertEqual(
            self.send(host, action, self.tokens["alice"], headers, b"POST").all(b"set-cookie"),
            [policy.token_set_cookie(self.tokens["bob"].encode(), True)],
        )
        self.clock.advance(1)  # Then no more.
        late = self.send(host, action, self.tokens["alice"], headers, b"POST")
        self.assertEqual((late.status, late.all(b"set-cookie")), (303, []))

    def test_when_no_question(self) -> None:
        """Not signed in, or the same user: signed in at once; a broken link token: kept."""
        host = self.host(self.cr.uuid)
        bob_link = self.link(self.tokens["bob"])
        fresh = self.send(host, bob_link, None, NAVIGATE)
        self.assertEqual((fresh.status, fresh.header(b"location")), (303, b"/lab?x=1"))
        self.assertEqual(
            fresh.all(b"set-cookie"), [policy.token_set_cookie(self.tokens["bob"].encode(), True)]
        )
        # A cookie that does not authenticate is no one signed in.
        revoked = self.cluster.add_token(self.alice.uuid)
        self.cluster.revoke_token(revoked)
        self.assertEqual(len(self.send(host, bob_link, revoked).all(b"set-cookie")), 1)
        alice_again = self.link(self.cluster.add_token(self.alice.uuid))
        own = self.send(host, alice_again, self.tokens["alice"])
        self.assertEqual((own.status, len(own.all(b"set-cookie"))), (303, 1))
        broken = self.link("v2/zzzzz-gj3su-000000000000999/nope")
        kept = self.send(host, broken, self.tokens["alice"], NAVIGATE)
        self.assertEqual((kept.status, kept.header(b"location")), (303, b"/lab?x=1"))
        self.assertEqual(kept.all(b"set-cookie"), [])

    def test_planted_token_cookie_is_not_who_is_signed_in(self) -> None:
        """Who is signed in is the first token cookie that works, not a planted broken one."""
        host = self.host(self.cr.uuid)
        planted = (b"Cookie", b"__Host-arvados_api_token=" + policy.encode_token_cookie(b"v2/x/y"))
        headers = [planted, cookie(self.tokens["alice"]), *NAVIGATE]
        response = self.send(host, self.link(self.tokens["bob"]), headers=headers)
        self.assertEqual((response.status, response.all(b"set-cookie")), (303, []))
        question = self.send(host, response.header(b"location"), headers=headers)
        self.assertEqual(question.status, 200)
        self.assertIn(self.alice.uuid.encode(), question.body)

    def test_services_page(self) -> None:
        """The services page asks the same question, and switches on its confirmation."""
        host = SUFFIX.encode()
        response, action = self.ask(host)
        self.assertEqual(response.all(b"set-cookie"), [])
        switched = self.send(host, action, self.tokens["alice"], self.same_origin(host), b"POST")
        self.assertEqual((switched.status, switched.header(b"location")), (303, b"/lab?x=1"))
        self.assertEqual(
            switched.all(b"set-cookie"),
            [policy.token_set_cookie(self.tokens["bob"].encode(), True)],
        )
        broken = self.link("v2/zzzzz-gj3su-000000000000999/nope")
        kept = self.send(host, broken, self.tokens["alice"])
        self.assertEqual((kept.status, kept.all(b"set-cookie")), (303, []))

    def test_seal(self) -> None:
        """A sealed token opens only with its key, host and user, until it expires."""
        key = StateCookies(ROOT_TOKEN, self.config.external_url).switch_key
        token = self.tokens["bob"].encode()
        sealed = signin.seal(key, b"h", self.alice.uuid, token, 1000.0)
        self.assertNotIn(token.split(b"/")[-1], sealed)
        self.assertTrue(re.fullmatch(rb"[A-Za-z0-9_-]+", sealed), sealed)
        self.assertEqual(signin.unseal(key, b"h", self.alice.uuid, sealed, 1000.0 + 600), token)
        other_key = StateCookies(ROOT_TOKEN + "x", self.config.external_url).switch_key
        for opened in (
            signin.unseal(key, b"h", self.alice.uuid, sealed, 1000.0 + 601),
            signin.unseal(key, b"h2", self.alice.uuid, sealed, 1000.0),
            signin.unseal(key, b"h", self.bob.uuid, sealed, 1000.0),
            signin.unseal(other_key, b"h", self.alice.uuid, sealed, 1000.0),
            signin.unseal(key, b"h", self.alice.uuid, sealed[:-2], 1000.0),
            signin.unseal(key, b"h", self.alice.uuid, b"%%%", 1000.0),
            signin.unseal(key, b"h", self.alice.uuid, b"", 1000.0),
        ):
            self.assertIsNone(opened)
        self.assertNotEqual(sealed, signin.seal(key, b"h", self.alice.uuid, token, 1000.0))
