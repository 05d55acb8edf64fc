"""
A service's cookies and Clear-Site-Data on a shared domain (issue 16, holes 2 and 3),
table-driven and as Hypothesis properties: a C{Set-Cookie} read as a browser reads it (RFC
6265bis section 5.6) keeps no C{Domain} and never passes for the front door's own cookies; a
C{Clear-Site-Data} reaches nothing beyond the service's origin.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy import policy

_WSP = b" \t"


def browser_parse(value: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    """
    A C{Set-Cookie} value as RFC 6265bis section 5.6 has a browser parse it, written here from
    the RFC, independently of the code under test: C{(name, value, [(lower-case attribute name,
    attribute value)])}, or C{None} for a cookie the browser ignores.
    """
    if any(b < 0x20 and b != 0x09 or b == 0x7F for b in value):
        return None
    pair, _, unparsed = value.partition(b";")
    if b"=" in pair:
        name, _, cookie_value = pair.partition(b"=")
    else:
        name, cookie_value = b"", pair
    name, cookie_value = name.strip(_WSP), cookie_value.strip(_WSP)
    attributes = []
    for av in unparsed.split(b";") if unparsed else []:
        attribute, _, attribute_value = av.partition(b"=")
        attributes.append((attribute.strip(_WSP).lower(), attribute_value.strip(_WSP)))
    return name, cookie_value, attributes


def served_name(name: bytes, value: bytes) -> bytes:
    """The name a server reads back from C{Cookie:} for a cookie (a nameless one: its value's)."""
    return name if name else value.partition(b"=")[0].strip()


class SetCookieTests(SynchronousTestCase):
    def test_domain_in_any_spelling_is_dropped(self) -> None:
        """Every Domain attribute goes, however spaced or cased; the rest stays as written."""
        rows = [
            (b"a=1; Domain=.containers.localhost", b"a=1"),
            (b"a=1; Domain =.containers.localhost", b"a=1"),
            (b"a=1; Domain\t=.containers.localhost; Path=/", b"a=1; Path=/"),
            (b"a=1;  dOmAiN  =  x ;Secure", b"a=1;Secure"),
            (b"a=1; domain=x; Domain=y; DOMAIN=z", b"a=1"),
            (b"a=1; Domain", b"a=1"),
            (b"a=1; Domain=", b"a=1"),
            (b"a=1; Path=/domain=x", b"a=1; Path=/domain=x"),
            (b"a=1; Domainx=y", b"a=1; Domainx=y"),
            (b"Domain=x; Path=/", b"Domain=x; Path=/"),
            (b"a=1; Path=/; HttpOnly; SameSite=Lax", b"a=1; Path=/; HttpOnly; SameSite=Lax"),
        ]
        for value, expected in rows:
            self.assertEqual(policy.scrub_set_cookie(value), expected, value)

    def test_proxy_names_in_any_spelling_are_dropped(self) -> None:
        """The front door's cookie names never pass: any case, spacing, prefix, or nameless."""
        refused = [
            b"arvados_api_token=x",
            b"ARVADOS_API_TOKEN=x",
            b" arvados_api_token =x; Path=/",
            b"\tArvados_Container_Uuid\t=x",
            b"__Host-arvados_api_token=x; Secure; Path=/",
            b"__HOST-arvados_container_uuid=x",
            b"__Secure-arvados_api_token=x",
            b"__secure-__host-arvados_api_token=x",
            b"=arvados_api_token=x",
            b" = arvados_container_uuid=x",
            b"arvados_api_token",
            b"a=1\x00; Domain=x",
            b"a=1; Path=/\x7f",
        ]
        for value in refused:
            self.assertIsNone(policy.scrub_set_cookie(value), value)
        for value in (b"arvados_api_token_x=1", b"my_arvados_api_token=1", b"=1", b"a=b=c"):
            self.assertEqual(policy.scrub_set_cookie(value), value)

    def test_is_proxy_cookie_name(self) -> None:
        """Names the front door reads or sets, and their spellings, are recognised."""
        for name in policy.PROXY_COOKIES:
            self.assertTrue(policy.is_proxy_cookie_name(name), name)
        for name in (b"arvados_api_tokens", b"arvados", b"__Host-x", b"", b"a"):
            self.assertFalse(policy.is_proxy_cookie_name(name), name)


# Set-Cookie values built from the pieces that matter, in any order and spelling.
_NAMES = st.sampled_from(
    [b"", b"a", b"arvados_api_token", b"ARVADOS_Container_UUID", b"__Host-arvados_api_token",
     b"__secure-arvados_container_uuid", b"__Host-", b"sid", b"arvados_api_token_x"]
)  # fmt: skip
_SPACE = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t"])
_ATTRIBUTE_NAMES = st.sampled_from(
    [b"Domain", b"domain", b"DOMAIN", b"dOmAiN", b"Path", b"Secure", b"HttpOnly", b"SameSite",
     b"Max-Age", b"Expires", b"Domainx", b"x"]
)  # fmt: skip
_VALUES = st.sampled_from(
    [b"", b"1", b".containers.localhost", b"containers.localhost", b"/", b"a=b", b"x y"]
)


@st.composite
def _set_cookies(draw: st.DrawFn) -> bytes:
    s1, s2, s3 = draw(_SPACE), draw(_SPACE), draw(_SPACE)
    value = draw(_NAMES) + s1 + (b"=" if draw(st.booleans()) else b"") + s2 + draw(_VALUES) + s3
    for _ in range(draw(st.integers(0, 5))):
        a, b, c = draw(_SPACE), draw(_SPACE), draw(_SPACE)
        attribute = a + draw(_ATTRIBUTE_NAMES) + b
        if draw(st.booleans()):
            attribute += b"=" + c + draw(_VALUES)
        value += b";" + attribute
    return value


class SetCookiePropertyTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.one_of(_set_cookies(), st.binary(max_size=60)))
    def test_no_domain_and_no_proxy_name_survives(self, value: bytes) -> None:
        """For any Set-Cookie, what is relayed has no Domain and no proxy name, as a browser
        parses it; a cookie without either is relayed unchanged."""
        scrubbed = policy.scrub_set_cookie(value)
        parsed = browser_parse(value)
        if scrubbed is None:
            return
        relayed = browser_parse(scrubbed)
        self.assertIsNotNone(relayed, scrubbed)
        assert relayed is not None and parsed is not None
        name, cookie_value, attributes = relayed
        self.assertNotIn(b"domain", [attribute for attribute, _ in attributes], scrubbed)
        self.assertFalse(policy.is_proxy_cookie_name(served_name(name, cookie_value)), scrubbed)
        # Nothing but Domain attributes was taken away.
        self.assertEqual((name, cookie_value), parsed[:2])
        self.assertEqual([a for a in parsed[2] if a[0] != b"domain"], attributes)


class ClearSiteDataTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Only types that clear the service's own origin pass, each once, spelt exactly."""
        rows = [
            ([b'"cookies"'], None),
            ([b'"*"'], None),
            ([b'"storage"'], None),
            ([b'"cache"'], b'"cache"'),
            ([b'"cookies", "cache"'], b'"cache"'),
            ([b' "cache" , "cache","prefetchCache"'], b'"cache", "prefetchCache"'),
            ([b'"Cookies"', b"cookies", b"cache", b"'cookies'"], None),
            ([b'"cache"', b'"storage", "executionContexts"'], b'"cache", "executionContexts"'),
            ([b'"clientHints", "prerenderCache"'], b'"clientHints", "prerenderCache"'),
            ([b""], None),
        ]
        for values, expected in rows:
            self.assertEqual(policy.scrub_clear_site_data(values), expected, values)

    def test_response_headers(self) -> None:
        """A relayed answer keeps an allowed Clear-Site-Data and loses a forbidden one."""
        upstream = Headers({b"clear-site-data": [b'"cookies", "cache"'], b"x": [b"1"]})
        relayed = policy.response_headers(upstream)
        self.assertEqual(relayed.getRawHeaders(b"clear-site-data"), [b'"cache"'])
        upstream = Headers({b"clear-site-data": [b'"*"'], b"x": [b"1"]})
        self.assertFalse(policy.response_headers(upstream).hasHeader(b"clear-site-data"))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=40), max_size=4))
    def test_property(self, values: list[bytes]) -> None:
        """For any fields, what passes is a list of allowed types, split as a browser splits."""
        result = policy.scrub_clear_site_data(values)
        if result is not None:
            items = [item.strip() for item in result.split(b",")]
            self.assertTrue(set(items) <= set(policy.ORIGIN_CLEAR_SITE_DATA), result)
            self.assertEqual(len(items), len(set(items)))
