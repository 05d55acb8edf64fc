"""
Signing in with a token in a link, without login CSRF.

Any link can carry C{?arvados_api_token=<token>}, and the front door moves that token into the
host's cookie.  A link made by someone else, with their own token, would silently sign the
visitor in as them on that host, and the visitor would then type into the other person's
notebook.  The rule (L{decide}):

  - a browser not signed in on the host (no token cookie that authenticates), or signed in as
    the same user the link's token belongs to: the link signs in at once, as before (this is
    how Workbench's and the services page's links work);
  - a browser signed in as one user, and a link whose token authenticates as another: nothing
    changes yet.  The front door answers C{303} to the same address without the token, with
    C{arvados_switch=<sealed>} instead (L{SWITCH_PARAM}): the link's token sealed (AES-GCM)
    under a key derived from the SystemRootToken, bound to the host, the signed-in user and
    ten minutes (L{seal}).  There, the page names both users and asks.  Its B{Continue} button
    POSTs back to that address; only such a POST from the page itself
    (C{Sec-Fetch-Site: same-origin}, or without it an C{Origin} of the host itself) switches.
    No other site can make a browser confirm, and a sealed token is worth nothing for another
    host, another signed-in user, or after ten minutes.  The token never shows in a page or
    an address, as for any link;
  - a browser signed in as someone, and a link whose token does not authenticate (revoked,
    used up, made up): the person stays signed in as they are, and the link's token is dropped.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import struct
from html import escape
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from arvproxy import pages, policy
from arvproxy.backends import Credentials
from arvproxy.config import ClusterConfig
from arvproxy.controller.statecookies import StateCookies
from arvproxy.errors import ProxyError
from arvproxy.redirects import same_origin_location

SWITCH_PARAM = b"arvados_switch"
"""The query parameter that carries a sealed token while the front door asks (L{seal})."""

SWITCH_SECONDS = 600
"""How long the question stays answerable."""


class Decision(enum.Enum):
    """What the front door does with a token that came in a link."""

    SIGN_IN = "sign in"
    """Move the token into the cookie (the usual 303)."""
    KEEP = "keep"
    """Keep the browser signed in as it is; redirect without the token."""
    ASK = "ask"
    """Ask before switching users."""


async def signed_in(cluster: Any, cookies: StateCookies, headers: Any) -> Credentials | None:
    """
    Who the browser is signed in as on this host: the credentials of the first token cookie
    that authenticates (see L{StateCookies.tokens}), or C{None}.
    """
    for token in cookies.tokens(headers):
        try:
            credentials: Credentials = await cluster.authenticate(token.decode("ascii"))
        except (ProxyError, UnicodeDecodeError):
            continue
        return credentials
    return None


async def authenticate_link(cluster: Any, token: bytes) -> Credentials | None:
    """The credentials of a link's token, or C{None} when it does not authenticate."""
    try:
        credentials: Credentials = await cluster.authenticate(token.decode("ascii"))
    except (ProxyError, UnicodeDecodeError):
        return None
    return credentials


def decide(current: Credentials | None, incoming: Credentials | None, confirmed: bool) -> Decision:
    """
    The rule (see the module's docstring): C{current} is who the browser is signed in as on
    the host, C{incoming} whom the link's token signs in, C{confirmed} whether the request is
    the page's own confirmation.
    """
    if current is None:
        return Decision.SIGN_IN
    if incoming is None:
        return Decision.KEEP
    if incoming.user_uuid == current.user_uuid or confirmed:
        return Decision.SIGN_IN
    return Decision.ASK


def _bound(host_name: bytes, current_user: str) -> bytes:
    return b"%d:%s%s" % (len(host_name), host_name, current_user.encode("ascii"))


def seal(
    key: bytes,
    host_name: bytes,
    current_user: str,
    token: bytes,
    now: float,
    nonce: bytes | None = None,
) -> bytes:
    """
    C{token} sealed for the question on C{host_name} to C{current_user}, until
    L{SWITCH_SECONDS} after C{now}: base64url (no padding) of a random 96-bit nonce and the
    AES-GCM ciphertext of the expiry and the token, with the host and user as associated data.
    """
    nonce = os.urandom(12) if nonce is None else nonce
    plain = struct.pack(">Q", int(now) + SWITCH_SECONDS) + token
    sealed = nonce + AESGCM(key).encrypt(nonce, plain, _bound(host_name, current_user))
    return base64.urlsafe_b64encode(sealed).rstrip(b"=")


def unseal(
    key: bytes, host_name: bytes, current_user: str, sealed: bytes, now: float
) -> bytes | None:
    """The token L{seal} sealed for this host and user, or C{None} (altered, other, expired)."""
    try:
        raw = base64.urlsafe_b64decode(sealed + b"=" * (-len(sealed) % 4))
        plain = AESGCM(key).decrypt(raw[:12], raw[12:], _bound(host_name, current_user))
    except (binascii.Error, ValueError, InvalidTag):
        return None
    if len(plain) < 8 or struct.unpack(">Q", plain[:8])[0] < now:
        return None
    return plain[8:]


async def link_token(
    request: Any,
    cluster: Any,
    cookies: StateCookies,
    config: ClusterConfig,
    host: bytes,
    uri: bytes,
    token: bytes | None,
    sealed: bytes | None,
    now: float,
) -> tuple[bytes | None, bool] | None:
    """
    Follow the rule for C{request}, on C{host} (its C{Host}) at C{now}, which carries a
    C{token} in its query (C{arvados_api_token}) or a C{sealed} one (L{SWITCH_PARAM}); C{uri}
    is its target without either.

    @return: the token to store in the cookie (C{None}: keep the one there), and whether
        C{request} is the page's confirmation (a POST that reaches no service); C{None} when
        C{request} has been answered: the C{303} to the question, or the question itself
        (L{render_switch_page}).
    """
    host_name = policy.split_host(host)[0]
    current = await signed_in(cluster, cookies, request.requestHeaders)
    if sealed is not None:
        if current is None:
            return None, False
        token = unseal(cookies.switch_key, host_name, current.user_uuid, sealed, now)
    if not token:
        return token, False
    if current is None:
        return token, False
    incoming = await authenticate_link(cluster, token)
    origin = f"{config.external_url.scheme}://".encode("ascii") + host.strip().lower()
    confirmed = sealed is not None and request.method == b"POST" and _same_origin(request, origin)
    decision = decide(current, incoming, confirmed)
    if decision is Decision.KEEP:
        return None, False
    if decision is Decision.SIGN_IN:
        return token, confirmed
    assert incoming is not None
    if sealed is None:
        code = seal(cookies.switch_key, host_name, current.user_uuid, token, now)
        joiner = b"&" if b"?" in uri else b"?"
        pages.redirect(request, uri + joiner + SWITCH_PARAM + b"=" + code)
        return None
    render_switch_page(
        request,
        current=describe_user(current, await user_name(cluster, current.user_uuid)),
        incoming=describe_user(incoming, await user_name(cluster, incoming.user_uuid)),
        action=request.uri,
        stay=uri,
    )
    return None


def _same_origin(request: Any, origin: bytes) -> bool:
    site = request.getHeader(b"sec-fetch-site")
    sent = request.getHeader(b"origin")
    if site is not None:
        return site.lower() == b"same-origin" and sent in (None, b"null", origin)
    return sent is not None and sent.lower() == origin


class SwitchRefused(ProxyError):
    """What a client that is not a browser page gets instead of the question."""

    status = 409
    title = "Signed in as someone else"


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Switch to another user?</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem;
       color: #1b1b1b; background: #fff; }}
h1 {{ font-size: 1.5rem; }}
.who {{ font-weight: 600; }}
.uuid {{ font-family: ui-monospace, monospace; color: #555; }}
.warning {{ background: #fff4e5; border-left: 4px solid #b35900; padding: .75rem 1rem; }}
form {{ display: inline; }}
button, a.stay {{ font: inherit; padding: .5rem 1rem; margin: .5rem .5rem 0 0; border-radius: 4px;
       display: inline-block; }}
button {{ background: #1a5fb4; color: #fff; border: 0; cursor: pointer; }}
a.stay {{ border: 1px solid #1a5fb4; color: #1a5fb4; text-decoration: none; }}
</style>
</head>
<body>
<main>
<h1>Switch to another user?</h1>
<p>This link signs you in as <span class="who" id="incoming">{incoming}</span>.</p>
<p>You are signed in here as <span class="who" id="current">{current}</span>.</p>
<p class="warning">Continue only if you meant to use this service as {incoming_short}: anything you
type there after switching is done as that user. If someone sent you this link
unexpectedly, stay signed in as you are.</p>
<form method="post" action="{action}"><button type="submit" id="continue">Continue as
{incoming_short}</button></form>
<a class="stay" id="stay" href="{stay}">Stay signed in as {current_short}</a>
</main>
</body>
</html>
"""

_SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'none'; style-src 'unsafe-inline'; "
    b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}


def describe_user(credentials: Credentials, name: str | None) -> tuple[str, str]:
    """How the page names a user: in full (name and UUID), and short (the name, or the UUID)."""
    if name:
        return f"{name} ({credentials.user_uuid})", name
    return credentials.user_uuid, credentials.user_uuid


async def user_name(cluster: Any, user_uuid: str) -> str | None:
    """A user's full name, when the backend can tell (the embedded registry); else C{None}."""
    get_record = getattr(cluster, "get_record", None)
    if get_record is None:
        return None
    try:
        record = await get_record(user_uuid)
    except Exception:
        return None
    name = record.get("full_name") if isinstance(record, dict) else None
    return name if isinstance(name, str) and name else None


def render_switch_page(
    request: Any,
    *,
    current: tuple[str, str],
    incoming: tuple[str, str],
    action: bytes,
    stay: bytes,
) -> None:
    """
    Answer C{request} with the question whether to switch users: for a browser navigation an
    HTML page (C{current} and C{incoming} as L{describe_user} gives them; the form POSTs to
    C{action}, the address with the sealed token; C{stay} is the address without it; both go
    through L{same_origin_location}); for anything else a 409 in JSON.  Never framed, cached
    or sent on as a referrer.
    """
    if not pages.wants_html(request):
        pages.render_error(
            request,
            SwitchRefused(
                "This link would sign you in as another user than the one signed in here.",
                hint="Open the link in a browser and confirm, or sign out first.",
            ),
        )
        return
    request.finishEarly()
    for name, value in _SECURITY_HEADERS.items():
        request.setHeader(name, value)
    request.setResponseCode(200)
    body = _PAGE.format(
        incoming=escape(incoming[0]),
        incoming_short=escape(incoming[1]),
        current=escape(current[0]),
        current_short=escape(current[1]),
        action=escape(same_origin_location(action).decode("ascii")),
        stay=escape(same_origin_location(stay).decode("ascii")),
    ).encode("utf-8")
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
