"""
Where the front door's own redirects may send a browser: back to the same origin, always.

The front door answers C{303 See Other} to the URL a person asked for (without the token that
moved into a cookie, or after clearing a previous container's state).  Built naively from the
request target, such a C{Location} is an open redirect: C{GET //evil.example/?arvados_api_token=}
would answer C{Location: //evil.example/}, which a browser reads as another site.  Browsers
parse a C{Location} by the WHATWG URL rules: they drop tabs and newlines anywhere, read a
backslash as a slash in C{http(s)} URLs, take a leading C{//} (or C{\\\\}, C{/\\}, C{\\/}) as the
start of a host name, and resolve dot segments (C{.}, C{..}, C{%2e}) before anything else.

L{same_origin_location} is the one rule every redirect goes through (L{arvproxy.pages.redirect}
applies it to whatever location it is given).  Pure: bytes in, bytes out.
"""

from __future__ import annotations

import re

# RFC 3986 scheme, then "://": an absolute-form request target (RFC 9112 section 3.2.2).
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")

# Bytes a location never carries as they are: everything but visible ASCII, the backslash
# (a slash to browsers, in http URLs), and what WHATWG's path and query percent-encode sets
# would encode themselves (so a browser reads exactly the path and query given).
_PATH_ENCODED = frozenset(b' "<>^`{}\\') | frozenset(range(0x21)) | frozenset(range(0x7F, 0x100))
_QUERY_ENCODED = frozenset(b" \"<>'\\") | frozenset(range(0x21)) | frozenset(range(0x7F, 0x100))

# WHATWG URL's single-dot and double-dot path segments (ASCII case-insensitive).
_SINGLE_DOT = frozenset({b".", b"%2e"})
_DOUBLE_DOT = frozenset({b"..", b".%2e", b"%2e.", b"%2e%2e"})

# A slash or backslash, as it is or percent-encoded, at the start of the first segment.
_LEADING_SLASHES = re.compile(rb"\A(?:%2f|%5c)+", re.IGNORECASE)


def _encode(data: bytes, encoded: frozenset[int]) -> bytes:
    if not any(byte in encoded for byte in data):
        return data
    return b"".join(b"%%%02X" % (byte,) if byte in encoded else bytes((byte,)) for byte in data)


def _path_and_query(target: bytes) -> tuple[bytes, bytes | None]:
    """
    The path (starting with C{/}) and query (C{None} when there is none) of a request target in
    any form: origin-form as it is; absolute-form without its scheme and authority; anything
    else (asterisk-form, authority-form, garbage) as the root.  A fragment is dropped.
    """
    target = target.partition(b"#")[0]
    if not target.startswith(b"/"):
        scheme = _ABSOLUTE_FORM.match(target)
        if scheme is None:
            return b"/", None
        rest = target[scheme.end() :]
        # The authority ends where the path or query begins (a backslash too, for browsers).
        end = min((i for i in (rest.find(c) for c in (b"/", b"?", b"\\")) if i >= 0), default=-1)
        target = b"/" + rest[end:] if end >= 0 else b"/"
    path, sep, query = target.partition(b"?")
    return path or b"/", (query if sep else None)


def _clean_segments(path: bytes) -> list[bytes]:
    """
    C{path}'s segments as a browser resolves them (WHATWG URL's path state, with the
    backslash already encoded), then without any empty or slash-like segment at the start.
    """
    segments: list[bytes] = []
    pieces = path.split(b"/")[1:]
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        lower = piece.lower()
        if lower in _DOUBLE_DOT:
            if segments:
                segments.pop()
            if last:
                segments.append(b"")
        elif lower in _SINGLE_DOT:
            if last:
                segments.append(b"")
        else:
            segments.append(piece)
    # "//host", "/%2F/host", "/%5Chost": never let the first segment begin like an authority.
    while segments:
        first = _LEADING_SLASHES.sub(b"", segments[0])
        if first:
            segments[0] = first
            break
        if len(segments) == 1:
            segments[0] = b""
            break
        segments.pop(0)
    return segments or [b""]


def same_origin_location(target: bytes) -> bytes:
    """
    A C{Location} that takes a browser to C{target}'s path and query on the same origin.

    C{target} is a request target (usually the one the browser sent, less the token) or a
    path the front door chose.  The result:

      - starts with exactly one C{/}, and its first segment never begins with a slash or a
        backslash, as they are or percent-encoded (C{%2F}, C{%5C}): leading slashes are
        removed, so C{//evil.example/x} becomes C{/evil.example/x};
      - has no dot segments (C{.}, C{..}, C{%2e} spellings), resolved as a browser would;
      - has no byte a browser would drop or re-read (controls, tabs, newlines, spaces,
        non-ASCII, backslashes, and what the WHATWG percent-encode sets name): each is
        percent-encoded;
      - keeps the query (encoded the same way) and drops any fragment; an absolute-form
        target keeps only its path and query, and anything else becomes C{/}.

    It is idempotent: a location it returned comes back unchanged.
    """
    path, query = _path_and_query(target)
    location = _encode(path, _PATH_ENCODED)
    # Removing a leading "%2F" can leave a dot segment ("/%2F.."), and resolving dot segments
    # can leave an empty first segment ("/a/..//x"): again until nothing changes (each round
    # that changes something shortens the path).
    while True:
        cleaned = b"/" + b"/".join(_clean_segments(location))
        if cleaned == location:
            break
        location = cleaned
    if query is not None:
        location += b"?" + _encode(query, _QUERY_ENCODED)
    return location
