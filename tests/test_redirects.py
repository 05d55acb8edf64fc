"""
The front door's redirects never leave the origin (issue 16, hole 1): L{same_origin_location},
table-driven and as Hypothesis properties checked with two URL parsers (Python's C{urljoin} and
ada, a WHATWG URL parser as browsers implement it), and L{pages.redirect}, which applies it.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import ada_url
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from arvproxy import pages
from arvproxy.redirects import same_origin_location
from tests.test_pages import PageRequest

BASE = "http://zzzzz-xvhdp-000000000000001-8888.containers.localhost:8900/here/page"
ORIGIN = "http://zzzzz-xvhdp-000000000000001-8888.containers.localhost:8900"


def browser_url(location: bytes) -> ada_url.URL:
    """Where a browser on L{BASE} goes for C{location}, by the WHATWG URL rules."""
    return ada_url.URL(location.decode("ascii"), BASE)


class SameOriginLocationTests(SynchronousTestCase):
    def test_attacks_table(self) -> None:
        """Every request target that once made an open redirect becomes a path on this origin."""
        rows = [
            (b"//evil.example/", b"/evil.example/"),
            (b"//evil.example/x?y=1", b"/evil.example/x?y=1"),
            (b"///evil.example/", b"/evil.example/"),
            (b"/\\evil.example/", b"/evil.example/"),
            (b"/\\\\evil.example", b"/evil.example"),
            (b"\\\\evil.example/", b"/"),
            (b"/%2F/evil.example/", b"/evil.example/"),
            (b"/%2f%2fevil.example/", b"/evil.example/"),
            (b"/%5C%5Cevil.example/", b"/evil.example/"),
            (b"/%5c/evil.example", b"/evil.example"),
            (b"/./evil.example", b"/evil.example"),
            (b"/.//evil.example/", b"/evil.example/"),
            (b"/..//evil.example/", b"/evil.example/"),
            (b"/a/..//evil.example/", b"/evil.example/"),
            (b"/%2e%2e//evil.example/", b"/evil.example/"),
            (b"/.%2E/%2e//evil.example", b"/evil.example"),
            (b"/%2F..//evil.example", b"/evil.example"),
            (b"/\t/evil.example/", b"/%09/evil.example/"),
            (b"/\n/evil.example/", b"/%0A/evil.example/"),
            (b"/\r\n//evil.example", b"/%0D%0A//evil.example"),
            (b"/ //evil.example", b"/%20//evil.example"),
            (b"http://evil.example/", b"/"),
            (b"http://evil.example//other.example/", b"/other.example/"),
            (b"https://evil.example", b"/"),
            (b"HTTP://evil.example?q=1", b"/?q=1"),
            (b"javascript:alert(1)", b"/"),
            (b"evil.example:443", b"/"),
            (b"*", b"/"),
            (b"", b"/"),
            (b"/p#//evil.example", b"/p"),
        ]
        for target, expected in rows:
            location = same_origin_location(target)
            self.assertEqual(location, expected, target)
            self.assertEqual(browser_url(location).origin, ORIGIN, target)

    def test_ordinary_paths_unchanged(self) -> None:
        """A path a browser itself would send comes back exactly, query and all."""
        for target in (
            b"/",
            b"/a/b?x=1&y=2&x=3",
            b"/lab/tree/notebook.ipynb",
            b"/a//b/",
            b"/%7Euser/%20space?q=%2F%2F",
            b"/api?next=//evil.example",
            b"/p?",
            b"/a.b/.c/..d/",
        ):
            self.assertEqual(same_origin_location(target), target, target)

    def test_dot_segments_resolved(self) -> None:
        """Dot segments in any spelling are resolved, as a browser would, above the root too."""
        rows = [
            (b"/a/b/../c/./d/.", b"/a/c/d/"),
            (b"/a/%2e%2E/b", b"/b"),
            (b"/../../..", b"/"),
            (b"/a/..", b"/"),
        ]
        for target, expected in rows:
            self.assertEqual(same_origin_location(target), expected, target)

    def test_encoding(self) -> None:
        """Bytes a browser would drop or re-read are percent-encoded; the fragment goes."""
        self.assertEqual(same_origin_location(b'/a"<>`{}b'), b"/a%22%3C%3E%60%7B%7Db")
        self.assertEqual(same_origin_location(b"/\xc3\xa9?q=\xff'\\"), b"/%C3%A9?q=%FF%27%5C")
        self.assertEqual(same_origin_location(b"/\x00\x7f"), b"/%00%7F")


# Request targets as an attacker would write them: the pieces that matter, in any order.
_PIECES = st.sampled_from(
    [
        "/", "//", "\\", "\\\\", "/\\", "\\/", ".", "..", "%2e", "%2E", ".%2e", "%2f", "%2F",
        "%5c", "%5C", "\t", "\n", "\r", " ", "?", "#", "&", "=", "@", ":", "evil.example",
        "http:", "https://", "a", "b", "%", "%0", "\x00", "\x7f", "é", ";", "*",
    ]
)  # fmt: skip
_TARGETS = st.one_of(
    st.lists(_PIECES, max_size=12).map(lambda pieces: "".join(pieces).encode("utf-8")),
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda text: ("/" + text).encode("utf-8", "surrogatepass")),
)


class SameOriginPropertyTests(SynchronousTestCase):
    @settings(max_examples=600, deadline=None)
    @given(_TARGETS)
    def test_any_target_stays_on_the_origin(self, target: bytes) -> None:
        """For any request target the Location is a path that every parser puts on the origin."""
        location = same_origin_location(target)
        # Our own reading: one slash, then neither a slash nor a backslash (encoded or not).
        self.assertTrue(location.startswith(b"/"), location)
        self.assertFalse(location[1:2] in (b"/", b"\\"), location)
        self.assertFalse(location[1:4].lower() in (b"%2f", b"%5c"), location)
        self.assertTrue(all(0x21 <= byte <= 0x7E for byte in location), location)
        self.assertNotIn(b"\\", location)
        self.assertNotIn(b"#", location)
        text = location.decode("ascii")
        # Python's RFC 3986 resolution.
        joined = urlsplit(urljoin(BASE, text))
        self.assertEqual((joined.scheme, joined.netloc), ("http", urlsplit(BASE).netloc), text)
        # The WHATWG rules browsers use: same origin, and exactly this path and query.
        url = browser_url(location)
        self.assertEqual(url.origin, ORIGIN, text)
        path, _, search = text.partition("?")
        self.assertEqual(url.pathname + url.search, path + ("?" + search if search else ""), text)

    @settings(max_examples=300, deadline=None)
    @given(_TARGETS)
    def test_idempotent(self, target: bytes) -> None:
        """A Location given once more comes back unchanged."""
        location = same_origin_location(target)
        self.assertEqual(same_origin_location(location), location)


class RedirectUsesTheRuleTests(SynchronousTestCase):
    def test_pages_redirect_cannot_leave_the_origin(self) -> None:
        """L{pages.redirect} sends the rule's Location whatever it is handed."""
        for given_location, sent in (
            (b"//evil.example/?x=1", b"/evil.example/?x=1"),
            (b"/\\evil.example", b"/evil.example"),
            (b"/ok?x=1", b"/ok?x=1"),
        ):
            request = PageRequest()
            pages.redirect(request, given_location, [b"a=1; Path=/"])
            self.assertEqual(request.responseCode, 303)
            self.assertEqual(request.header(b"location"), sent)
