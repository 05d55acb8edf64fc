"""
The front door's own state cookies (issue 16, hole 4): C{__Host-} names over https, the
container marker signed for its host, token cookies tried in order, staleness.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.config import ExternalURL
from arvproxy.controller import sitedata
from arvproxy.controller.statecookies import MAX_TOKEN_CANDIDATES, StateCookies, cookie_key
from tests.test_service_cookies import browser_parse

ROOT = "CookieRulesTestOnlyRootToken0123456789abcdefghijklm"
HTTP = ExternalURL("http", "containers.localhost", 8900)
HTTPS = ExternalURL("https", "containers.example.com")
HOST_A = b"zzzzz-xvhdp-000000000000001-8888.containers.example.com"
HOST_B = b"zzzzz-xvhdp-000000000000002-8888.containers.example.com"
UUID_A = "zzzzz-dz642-000000000000001"


class StateCookieTests(SynchronousTestCase):
    def test_names_and_attributes(self) -> None:
        """Over https both cookies are __Host- and Secure; over http plain names, no Secure."""
        secure, plain = StateCookies(ROOT, HTTPS), StateCookies(ROOT, HTTP)
        self.assertEqual(secure.token_name, b"__Host-arvados_api_token")
        self.assertEqual(secure.container_name, b"__Host-arvados_container_uuid")
        self.assertEqual(plain.token_name, b"arvados_api_token")
        self.assertEqual(plain.container_name, b"arvados_container_uuid")
        for cookie in (
            secure.token_set_cookie(b"t"),
            secure.container_set_cookie(HOST_A, UUID_A),
            secure.token_clear_cookie(),
        ):
            self.assertTrue(cookie.startswith(b"__Host-"), cookie)
            parsed = browser_parse(cookie)
            assert parsed is not None
            attributes = dict(parsed[2])
            # What browsers demand of a __Host- cookie: Secure, Path=/, no Domain.
            self.assertEqual((attributes[b"path"], b"secure" in attributes), (b"/", True))
            self.assertNotIn(b"domain", attributes)
            self.assertIn(b"httponly", attributes)
        for cookie in (plain.token_set_cookie(b"t"), plain.container_set_cookie(HOST_A, UUID_A)):
            self.assertNotIn(b"Secure", cookie)

    def marker(self, cookies: StateCookies, host: bytes, uuid: str) -> Headers:
        value = cookies.container_set_cookie(host, uuid).split(b";")[0]
        return Headers({b"cookie": [value]})

    def test_marker_signed_for_its_host(self) -> None:
        """A marker counts only on the host it was set for, unaltered, under this cluster's key."""
        cookies = StateCookies(ROOT, HTTPS)
        own = self.marker(cookies, HOST_A, UUID_A)
        self.assertEqual(cookies.seen_containers(own, HOST_A), [UUID_A.encode()])
        # Set for a sibling host (the attacker's own, genuine marker), tossed here: ignored.
        self.assertEqual(cookies.seen_containers(own, HOST_B), [])
        # Another cluster's key, or the http names: ignored.
        other = StateCookies(ROOT + "x", HTTPS)
        self.assertEqual(other.seen_containers(own, HOST_A), [])
        plain = StateCookies(ROOT, HTTP)
        self.assertEqual(plain.seen_containers(own, HOST_A), [])
        name = cookies.container_name
        sealed = own.getRawHeaders(b"cookie")[0].split(b"=", 1)[1]
        uuid, _, mac = sealed.rpartition(b".")
        forged = [
            uuid,
            uuid + b".",
            b"zzzzz-dz642-000000000000002." + mac,
            uuid + b"." + mac[:-1],
            uuid + b"." + mac[:-1] + (b"A" if mac[-1:] != b"A" else b"B"),
            uuid + b"x." + mac,
            b"." + mac,
        ]
        for value in forged:
            headers = Headers({b"cookie": [name + b"=" + value]})
            self.assertEqual(cookies.seen_containers(headers, HOST_A), [], value)
        # Among planted ones, the genuine marker still counts.
        mixed = Headers({b"cookie": [name + b"=" + forged[2], name + b"=" + sealed]})
        self.assertEqual(cookies.seen_containers(mixed, HOST_A), [UUID_A.encode()])

    def test_mac(self) -> None:
        """MACs are 128 bits of base64url, keyed from the root token, and separate parts."""
        cookies = StateCookies(ROOT, HTTP)
        mac = cookies.mac(b"a", b"bc")
        self.assertEqual(len(mac), 22)
        self.assertFalse(set(mac) & set(b'.;,= "'))
        self.assertNotEqual(mac, cookies.mac(b"ab", b"c"))
        self.assertNotEqual(cookie_key(ROOT), cookie_key(ROOT + "x"))
        self.assertEqual(StateCookies(ROOT, HTTPS).mac(b"a", b"bc"), mac)

    def test_token_candidates(self) -> None:
        """Every token cookie that could hold a token is a candidate, once, in order, a few."""
        cookies = StateCookies(ROOT, HTTP)

        def cookie(token: bytes) -> bytes:
            return b"arvados_api_token=" + policy.encode_token_cookie(token)

        headers = Headers(
            {
                b"cookie": [
                    cookie(b"planted") + b"; other=1; " + cookie(b"\xff\xfe"),
                    b"arvados_api_token=%%%; " + cookie(b"mine") + b"; " + cookie(b"planted"),
                    b"__Host-arvados_api_token=" + policy.encode_token_cookie(b"https-one"),
                ]
            }
        )
        self.assertEqual(cookies.tokens(headers), [b"planted", b"mine"])
        many = Headers({b"cookie": [b"; ".join(cookie(b"t%d" % i) for i in range(10))]})
        self.assertEqual(len(cookies.tokens(many)), MAX_TOKEN_CANDIDATES)
        self.assertEqual(StateCookies(ROOT, HTTPS).tokens(headers), [b"https-one"])


class StaleTests(SynchronousTestCase):
    def test_is_stale(self) -> None:
        """Stale only when valid markers were sent and none names the current container."""
        self.assertFalse(sitedata.is_stale([], "c1"))
        self.assertFalse(sitedata.is_stale([b"c1"], "c1"))
        self.assertFalse(sitedata.is_stale([b"c0", b"c1"], "c1"))
        self.assertTrue(sitedata.is_stale([b"c0"], "c1"))
