"""
The front door's own cookies in a browser: the user's token, and the marker that remembers which
container a browser last saw on a vhost (L{arvproxy.controller.sitedata}).  Pure: values in,
values out; the key comes from the cluster's secret.

Every container's vhost is a sibling under one domain (C{<uuid>-<port>.containers.<domain>}), and
a script on any of them may set a cookie for the whole domain (C{document.cookie = "...;
domain=.containers.<domain>"}), which the browser then sends to every other vhost too (cookie
tossing).  So:

  - with an https ExternalURL both cookies carry the C{__Host-} prefix
    (C{__Host-arvados_api_token}, C{__Host-arvados_container_uuid}): browsers accept such a
    cookie only from the host itself, with C{Secure}, C{Path=/} and no C{Domain}, so no sibling
    can plant one at all.  Over plain http (a laptop, C{*.containers.localhost}) the prefix
    cannot be used, and only what follows protects;
  - the container marker is signed: C{<container uuid>.<MAC>}, the MAC (HMAC-SHA256, 128 bits)
    binding the cookie's name, the host name it was set for and the value, under a key derived
    from the SystemRootToken (L{cookie_key}).  A marker that fails (planted, from another host,
    unsigned from an older version) is ignored, so a planted marker can no longer send a vhost
    into a redirect loop;
  - the token cookie is not signed: a MAC could not tell the person's cookie from one the front
    door issued to the attacker for the same host (anyone with a token gets one by following a
    link), and would sign everyone out at an upgrade for no gain.  Instead every token cookie
    the browser sends is a candidate (L{StateCookies.tokens}); the front door uses the first
    that authenticates, so a planted cookie with a made-up token locks no one out.  A planted
    cookie holding a real token of the attacker's can still be read on plain http; the
    README's security model says why the container suffix belongs on the Public Suffix List or
    on a registrable domain of its own, and why production uses https.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.config import ExternalURL

KEY_LABEL = b"arvproxy front door state cookies v1"
"""What the cookie key is derived for (see L{cookie_key})."""

SWITCH_KEY_LABEL = b"arvproxy switch user v1"
"""What the key that seals tokens while the front door asks is derived for."""

MAX_TOKEN_CANDIDATES = 4
"""The most token cookies of one request that are tried (each costs a lookup, cached)."""

MAC_BYTES = 16


def cookie_key(system_root_token: str, label: bytes = KEY_LABEL) -> bytes:
    """
    The key that signs the front door's state cookies: C{HMAC-SHA256(SystemRootToken, label)}.
    Deterministic, so every front-door process (C{--workers}) and every restart agrees; a new
    SystemRootToken makes every signed cookie fail (browsers then get new ones).
    """
    return hmac.new(system_root_token.encode("utf-8"), label, hashlib.sha256).digest()


def cookie_pairs(headers: Headers) -> list[tuple[bytes, bytes]]:
    """
    Every cookie in C{headers}' C{Cookie} fields as C{(name, value)}, in order: names and
    values trimmed of whitespace, a value's double quotes removed.
    """
    pairs = []
    for header in headers.getRawHeaders(b"cookie", []):
        for piece in header.split(b";"):
            name, sep, value = piece.strip().partition(b"=")
            name = name.strip()
            if name:
                pairs.append((name, value.strip().strip(b'"') if sep else b""))
    return pairs


class StateCookies:
    """
    The names, values and attributes of the front door's cookies, for one ExternalURL and one
    cluster secret.

    @ivar token_name: the token cookie's name.
    @ivar container_name: the container marker's name.
    """

    def __init__(self, system_root_token: str, external: ExternalURL) -> None:
        self._key = cookie_key(system_root_token)
        # The key of another browser state: tokens sealed while the front door asks whether to
        # switch users (arvproxy.controller.signin).
        self.switch_key = cookie_key(system_root_token, SWITCH_KEY_LABEL)
        self.secure = external.secure
        self.token_name = policy.token_cookie_name(self.secure)
        prefix = policy.HOST_PREFIX if self.secure else b""
        self.container_name = prefix + policy.CONTAINER_COOKIE
        self._attributes = b"; Path=/; HttpOnly; SameSite=Lax" + (
            b"; Secure" if self.secure else b""
        )

    # -- signing -------------------------------------------------------------------------------

    def mac(self, *parts: bytes) -> bytes:
        """
        A MAC of C{parts} (unambiguously joined) under the cookie key, base64url without
        padding: 22 characters, none of them C{.}, C{;}, C{,} or C{=}.
        """
        message = b"".join(b"%d:%s" % (len(part), part) for part in parts)
        digest = hmac.new(self._key, message, hashlib.sha256).digest()[:MAC_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=")

    def _sealed(self, name: bytes, host_name: bytes, value: bytes) -> bytes:
        return value + b"." + self.mac(name, host_name, value)

    def _opened(self, name: bytes, host_name: bytes, sealed: bytes) -> bytes | None:
        value, dot, mac = sealed.rpartition(b".")
        if not dot or not hmac.compare_digest(mac, self.mac(name, host_name, value)):
            return None
        return value

    # -- the token -----------------------------------------------------------------------------

    def token_set_cookie(self, token: bytes) -> bytes:
        """A C{Set-Cookie} value that stores C{token} for this host only."""
        return policy.token_set_cookie(token, self.secure)

    def token_clear_cookie(self) -> bytes:
        """A C{Set-Cookie} value that deletes the token cookie."""
        return self.token_name + b"=" + self._attributes + b"; Max-Age=0"

    def tokens(self, headers: Headers) -> list[bytes]:
        """
        The tokens in C{headers}' token cookies that could be tokens (valid base64url of
        visible ASCII), each once, in the order sent, at most L{MAX_TOKEN_CANDIDATES}.  The
        caller uses the first that authenticates: a browser sends a cookie planted from a
        sibling host alongside (and maybe before) the person's own.
        """
        found: list[bytes] = []
        for name, value in cookie_pairs(headers):
            if name != self.token_name:
                continue
            token = policy.decode_token_cookie(value)
            if token and token not in found and _printable(token):
                found.append(token)
                if len(found) == MAX_TOKEN_CANDIDATES:
                    break
        return found

    # -- the container marker ------------------------------------------------------------------

    def container_set_cookie(self, host_name: bytes, container_uuid: str) -> bytes:
        """
        The C{Set-Cookie} value that remembers C{container_uuid} on the host C{host_name}
        (lower case, no port: cookies do not tell ports apart), signed for that host.
        """
        sealed = self._sealed(self.container_name, host_name, container_uuid.encode("ascii"))
        return self.container_name + b"=" + sealed + self._attributes

    def seen_containers(self, headers: Headers, host_name: bytes) -> list[bytes]:
        """
        The containers that the markers in C{headers} say this browser saw on C{host_name}:
        only markers signed for this host count; any other (planted from a sibling, set for
        another host, unsigned) is ignored.
        """
        seen = []
        for name, value in cookie_pairs(headers):
            if name == self.container_name:
                uuid = self._opened(name, host_name, value)
                if uuid is not None and uuid not in seen:
                    seen.append(uuid)
        return seen


def _printable(token: bytes) -> bool:
    return all(0x21 <= byte <= 0x7E for byte in token)
