"""
Stale browser state on a container vhost: the rules, as pure functions.

One vhost (C{<container request uuid>-<port>.<suffix>}) can lead to a different container over
time: a retried container request gets a new container behind the same name.  The browser keeps
the old app's cookies, local storage and cache for that origin, and the new app would read them.
As Arvados does, the controller remembers which container a browser last saw in an
C{arvados_container_uuid} cookie; when the vhost now leads elsewhere, the first response is a
redirect that deletes the origin's other cookies and sends C{Clear-Site-Data: "cache",
"storage"} (not C{"cookies"}, which would clear the whole registrable domain, every other
container's origin included).
"""

from __future__ import annotations

import re

from twisted.web.http_headers import Headers

from arvproxy.policy import TOKEN_COOKIE

CONTAINER_COOKIE = b"arvados_container_uuid"
CLEAR_SITE_DATA = b'"cache", "storage"'

# RFC 6265 cookie names (RFC 9110 tokens): other names are never echoed back.
_COOKIE_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _pairs(headers: Headers) -> list[tuple[bytes, bytes]]:
    pairs = []
    for header in headers.getRawHeaders(b"cookie", []):
        for piece in header.split(b";"):
            name, sep, value = piece.strip().partition(b"=")
            if name.strip():
                pairs.append((name.strip(), value.strip().strip(b'"') if sep else b""))
    return pairs


def seen_container(headers: Headers) -> bytes | None:
    """
    The container the browser last saw on this origin (the first C{arvados_container_uuid}
    cookie), or C{None} when it has no such cookie.
    """
    for name, value in _pairs(headers):
        if name == CONTAINER_COOKIE:
            return value
    return None


def is_stale(headers: Headers, container_uuid: str) -> bool:
    """Whether the browser holds state from a container other than C{container_uuid}."""
    return any(
        name == CONTAINER_COOKIE and value != container_uuid.encode("ascii")
        for name, value in _pairs(headers)
    )


def container_set_cookie(container_uuid: str, secure: bool) -> bytes:
    """The C{Set-Cookie} value that remembers C{container_uuid} for this origin."""
    attributes = b"; Path=/; HttpOnly; SameSite=Lax" + (b"; Secure" if secure else b"")
    return CONTAINER_COOKIE + b"=" + container_uuid.encode("ascii") + attributes


def clearing_set_cookies(headers: Headers) -> list[bytes]:
    """
    C{Set-Cookie} values that delete every cookie the request carried, except the user's token
    (still valid for the new container) and the container cookie (set anew by the caller).
    Each name is deleted once, with C{Path=/} (where apps set cookies in practice: a cookie set
    under another path survives, as in Arvados).
    """
    names: list[bytes] = []
    for name, _ in _pairs(headers):
        if (
            name not in (TOKEN_COOKIE, CONTAINER_COOKIE)
            and name not in names
            and _COOKIE_NAME.fullmatch(name)
        ):
            names.append(name)
    return [name + b"=; Path=/; Max-Age=0" for name in names]
