"""
Stale browser state on a container vhost: the rules, as pure functions.

One vhost (C{<container request uuid>-<port>.<suffix>}) can lead to a different container over
time: a retried container request gets a new container behind the same name.  The browser keeps
the old app's cookies, local storage and cache for that origin, and the new app would read them.
As Arvados does, the controller remembers which container a browser last saw in an
C{arvados_container_uuid} cookie (C{__Host-arvados_container_uuid} over https, signed for its
host: see L{arvproxy.controller.statecookies}); when the vhost now leads elsewhere, the first
response is a redirect that deletes the origin's other cookies and sends C{Clear-Site-Data:
"cache", "storage"} (not C{"cookies"}, which would clear the whole registrable domain, every
other container's origin included).
"""

from __future__ import annotations

import re

from twisted.web.http_headers import Headers

from arvproxy.controller.statecookies import cookie_pairs
from arvproxy.policy import is_proxy_cookie_name

CLEAR_SITE_DATA = b'"cache", "storage"'

# RFC 6265 cookie names (RFC 9110 tokens): other names are never echoed back.
_COOKIE_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_stale(seen: list[bytes], container_uuid: str) -> bool:
    """
    Whether a browser that saw the containers C{seen} on a vhost (the valid markers it sent,
    L{StateCookies.seen_containers}) holds state from another container than
    C{container_uuid}, the one the vhost leads to now: it saw some, and none is this one.  A
    marker of this container among others (a planted one) is enough: no redirect loop.

    @see: L{arvproxy.controller.statecookies.StateCookies.seen_containers}
    """
    return bool(seen) and container_uuid.encode("ascii") not in seen


def clearing_set_cookies(headers: Headers, secure: bool = False) -> list[bytes]:
    """
    C{Set-Cookie} values that delete every cookie the request carried, except the front door's
    own (the user's token, still valid for the new container, and the container marker, set
    anew by the caller).  Each name is deleted once, with C{Path=/} (where apps set cookies in
    practice: a cookie set under another path survives, as in Arvados), and C{Secure} when
    C{secure} (an app's C{__Host-} or C{__Secure-} cookie is only deleted so).
    """
    names: list[bytes] = []
    for name, _ in cookie_pairs(headers):
        if not is_proxy_cookie_name(name) and name not in names and _COOKIE_NAME.fullmatch(name):
            names.append(name)
    attributes = b"=; Path=/; Max-Age=0" + (b"; Secure" if secure else b"")
    return [name + attributes for name in names]
