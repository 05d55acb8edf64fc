"""
The rules both hops obey: which vhost names which target, how the user's token moves from the
query to a cookie and never further, which headers cross a hop, and how the controller signs a
request so that the gateway can believe it.

Everything here is pure: bytes and values in, values or exceptions out, the clock passed in.
Secrets are compared with L{hmac.compare_digest}.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import os
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from twisted.web.http_headers import Headers, _nameEncoder

from arvproxy.config import ExternalURL
from arvproxy.errors import BadRequest

TOKEN_COOKIE = b"arvados_api_token"
TOKEN_PARAM = b"arvados_api_token"

ARVADOS_HEADER_PREFIX = b"x-arvados-"
TARGET_UUID = b"x-arvados-target-uuid"
TARGET_PORT = b"x-arvados-target-port"
REQUEST_HOST = b"x-arvados-request-host"
SIGNATURE = b"x-arvados-signature"
# The signature of the format before signatures were bound to their requests (see sign): sent
# only with ArvProxy.Gateway.SignForOldGateways, for gateways started before the change.
AUTHORIZATION = b"x-arvados-authorization"
# Set by a gateway on the errors it produces itself (not on the service's own answers); the
# controller turns such a refusal into a 502 for the client.
GATEWAY_ERROR = b"x-arvados-gateway-error"

# RFC 9110 section 7.6.1, plus the de-facto ones every proxy strips.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Set by the controller from what it knows; never taken from a client unless trusted.
FORWARDED_HEADERS = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")

REAL_IP = b"x-real-ip"
"""The client's address (see L{client_address}), set by the controller as Nginx sets it: Tornado
and Jupyter (C{xheaders}), among others, believe it over C{X-Forwarded-For}."""

CLIENT_CLAIMS = frozenset(
    {
        REAL_IP,
        b"forwarded",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-cluster-client-ip",
        b"x-original-forwarded-for",
        b"forwarded-for",
        b"x-forwarded",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-forwarded-server",
        b"x-scheme",
        b"x-url-scheme",
        b"front-end-https",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-host",
        b"x-host",
    }
)
"""
Headers that servers and frameworks behind proxies take for the client's address or for the
original request's scheme, host, port or path (Tornado, Rack, Werkzeug's ProxyFix, Express,
Symfony, CDNs' own), besides C{X-Forwarded-For}/C{-Proto}/C{-Host}.  The controller drops every
one a client sends, also through a trusted proxy (Nginx passes a client's on as they are), and
sets only C{X-Real-IP} itself; RFC 7239 C{Forwarded} is among them (Rack believes it first).
"""

# A hop's headers are read and written a dozen times per request, so the rules below use a
# L{Headers}' fields directly (C{_rawHeaders}: canonical name to list of values) under these
# names, put in Twisted's canonical form once, here.  Every value they read came through
# llhttp (which refuses CR, LF and NUL) or through L{Headers}' own scrubbing, and every value
# they write is made of such values or of the proxy's own ASCII, so none can end a field early.
_canonical = _nameEncoder.encode
_CONNECTION = _canonical(b"connection")
_COOKIE = _canonical(b"cookie")
_REFERER = _canonical(b"referer")
_HOST_FIELD = _canonical(b"host")
_UPGRADE = _canonical(b"upgrade")
_SET_COOKIE = _canonical(b"set-cookie")
_X_FORWARDED_FOR = _canonical(b"x-forwarded-for")
_X_FORWARDED_PROTO = _canonical(b"x-forwarded-proto")
_X_FORWARDED_HOST = _canonical(b"x-forwarded-host")
_X_REAL_IP = _canonical(REAL_IP)
_TARGET_UUID = _canonical(TARGET_UUID)
_TARGET_PORT = _canonical(TARGET_PORT)
_REQUEST_HOST = _canonical(REQUEST_HOST)
_AUTHORIZATION = _canonical(AUTHORIZATION)
_SIGNATURE_FIELD = _canonical(SIGNATURE)

UUID_PATTERN = rb"[a-z0-9]{5}-[a-z0-9]{5}-[a-z0-9]{15}"
_VHOST_LABEL = re.compile(rb"^(" + UUID_PATTERN + rb")-([0-9]{1,5})\Z")
_HOST = re.compile(rb"^(?P<name>\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?\Z")


# --- Hosts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """
    What a container vhost names: a container or container request UUID and a port in it.
    """

    uuid: str
    port: int

    @property
    def label(self) -> str:
        return f"{self.uuid}-{self.port}"


def split_host(host: bytes) -> tuple[bytes, int | None]:
    """
    Split a C{Host} header value into a lower-case name and a port.

    @raise BadRequest: the value is not a host name with an optional numeric port.
    """
    match = _HOST.match(host.strip().lower())
    if match is None:
        raise BadRequest("The Host header is not a valid host name.")
    port = match.group("port")
    return match.group("name"), (int(port) if port is not None else None)


def is_service_host(host: bytes, external: ExternalURL) -> bool:
    """
    Whether C{host} is the bare suffix of the ExternalURL (where the controller's own pages live).
    """
    try:
        name, port = split_host(host)
    except BadRequest:
        return False
    return name == external.suffix.encode("ascii") and _port_matches(port, external)


def _port_matches(port: int | None, external: ExternalURL) -> bool:
    return port is None or port == external.default_port


@functools.lru_cache(maxsize=4096)
def parse_vhost(host: bytes, external: ExternalURL) -> Target | None:
    """
    Find the target named by a request's C{Host}: C{<uuid>-<port>.<suffix>}, case-insensitive,
    with or without the ExternalURL's port.  Answers are kept for the hosts seen last (never a
    refusal), as every request asks again.

    @return: the L{Target}, or C{None} when C{host} is not under the ExternalURL's suffix at all
        (some other site, or the bare suffix).
    @raise BadRequest: the host is under the suffix but does not name a UUID and a port from 1
        to 65535, or it names a port other than the ExternalURL's.
    """
    name, port = split_host(host)
    suffix = b"." + external.suffix.encode("ascii")
    if not name.endswith(suffix) or len(name) == len(suffix):
        return None
    if not _port_matches(port, external):
        raise BadRequest(
            f"This address uses port {port}, but container services are served on port "
            f"{external.default_port}."
        )
    label = name[: -len(suffix)]
    match = _VHOST_LABEL.match(label)
    if match is None:
        raise BadRequest(
            "The address does not name a container service. It should look like "
            f"{external.url_for('<container-uuid>-<port>')}",
            hint="Check the link you followed, or open the list of your containers.",
        )
    target_port = int(match.group(2))
    if not 1 <= target_port <= 65535:
        raise BadRequest(f"Port {target_port} is not a valid TCP port (1 to 65535).")
    return Target(match.group(1).decode("ascii"), target_port)


_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?]*)(.*)\Z", re.DOTALL)


def origin_form(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """
    A request's target in origin-form (C{/path?query}), and the host named in an absolute-form
    target, which a server uses instead of C{Host} (RFC 9112 section 3.2.2): what both hops
    serve, and send on, whatever form the request line had.

    @return: C{(target, None)} for an origin-form target; for an absolute-form one
        (C{http://host[:port]/path?query}, C{http} or C{https} in any case), its path and
        query (C{/} for none) and its authority.
    @raise BadRequest: any other target: C{*} (C{OPTIONS *}), an authority alone (or
        C{CONNECT}: the proxy is not a forward proxy), another scheme, user information or no
        host in the authority, or a fragment.
    """
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not served here: this is not a forward proxy.")
    if target[:1] == b"/":
        if b"#" in target:
            raise BadRequest("A request target cannot have a fragment (#).")
        return target, None
    if target == b"*":
        raise BadRequest(f"{method.decode('latin-1')} * is not served here; name a path.")
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        raise BadRequest("The request target must be a path (or an absolute http URL).")
    scheme, authority, rest = match.groups()
    if scheme.lower() not in (b"http", b"https"):
        raise BadRequest("An absolute request target must be an http or https URL.")
    if b"@" in authority:
        raise BadRequest("A request target cannot carry user information (user@host).")
    if not authority:
        raise BadRequest("An absolute request target must name a host.")
    try:
        split_host(authority)
    except BadRequest:
        raise BadRequest("An absolute request target must name a valid host.") from None
    if b"#" in rest:
        raise BadRequest("A request target cannot have a fragment (#).")
    return (rest if rest[:1] == b"/" else b"/" + rest), authority


def connect_scope(uuid: str, port: int) -> str:
    """The token scope that allows exactly this target (phase 2 of the story)."""
    return f"CONNECT /arvados/v1/container/{uuid}/{port}"


# --- The user's token ---------------------------------------------------------------------------


def split_query_token(uri: bytes, key: bytes = TOKEN_PARAM) -> tuple[bytes, bytes | None]:
    """
    Take C{arvados_api_token} (or the parameter C{key}) out of a request URI.

    @return: the URI without any C{arvados_api_token} parameter (other parameters kept exactly
        as written, in order; no C{?} left when none remain) and the decoded token, or
        C{(uri, None)} when there is none.  When the parameter appears more than once, the
        first non-empty value wins; every copy is removed.
    """
    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri, None
    kept: list[bytes] = []
    token: bytes | None = None
    found = False
    for param in query.split(b"&"):
        name, _, value = param.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) == key:
            found = True
            if token is None and value:
                token = unquote_to_bytes(value.replace(b"+", b" "))
        else:
            kept.append(param)
    if not found:
        return uri, None
    rest = b"&".join(kept)
    return (path + b"?" + rest if rest else path), (token if token is not None else b"")


def encode_token_cookie(token: bytes) -> bytes:
    """The cookie value that carries C{token}: base64url, as Arvados does."""
    return base64.urlsafe_b64encode(token)


def decode_token_cookie(value: bytes) -> bytes | None:
    """The token in a cookie value, or C{None} when the value is not valid base64url."""
    try:
        token = base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    return token or None


def token_cookie_name(secure: bool) -> bytes:
    """
    The token cookie's name: C{__Host-arvados_api_token} when the ExternalURL is https (no
    other host can plant such a cookie, see L{arvproxy.controller.statecookies}), else
    C{arvados_api_token}.
    """
    return HOST_PREFIX + TOKEN_COOKIE if secure else TOKEN_COOKIE


def token_set_cookie(token: bytes, secure: bool) -> bytes:
    """A C{Set-Cookie} value that stores C{token} for this origin only."""
    attributes = b"; Path=/; HttpOnly; SameSite=Lax" + (b"; Secure" if secure else b"")
    return token_cookie_name(secure) + b"=" + encode_token_cookie(token) + attributes


def _cookie_pairs(header: bytes) -> Iterable[tuple[bytes, bytes]]:
    for piece in header.split(b";"):
        pair = piece.strip()
        if pair:
            name, _, value = pair.partition(b"=")
            yield name.strip(), pair


def token_from_cookies(headers: Headers) -> bytes | None:
    """The token in the first C{arvados_api_token} cookie that decodes, or C{None}."""
    for header in headers._rawHeaders.get(_COOKIE, ()):
        for name, pair in _cookie_pairs(header):
            if name == TOKEN_COOKIE:
                token = decode_token_cookie(pair.partition(b"=")[2].strip().strip(b'"'))
                if token:
                    return token
    return None


def cookie_values(headers: Headers) -> list[bytes] | None:
    """The values of C{headers}' C{Cookie} fields, as they hold them, or C{None}."""
    return headers._rawHeaders.get(_COOKIE)


def strip_token_cookie(
    cookies: Sequence[bytes], names: frozenset[bytes] = frozenset({TOKEN_COOKIE})
) -> list[bytes]:
    """
    Remove every C{arvados_api_token} cookie (or every cookie named in C{names}) from C{Cookie}
    header values, keeping the other cookies as written and in order, and dropping headers
    left empty.
    """
    result = []
    for header in cookies:
        kept = [pair for name, pair in _cookie_pairs(header) if name not in names]
        if kept:
            result.append(b"; ".join(kept))
    return result


# --- Headers across a hop -----------------------------------------------------------------------


def connection_listed(headers: Headers) -> frozenset[bytes]:
    """The lower-case header names listed in every C{Connection} header."""
    names = set()
    for value in headers._rawHeaders.get(_CONNECTION, ()):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return frozenset(names)


def _forwardable(headers: Headers, dropped: frozenset[bytes], listed: frozenset[bytes]) -> Headers:
    """
    A copy of C{headers} without the lower-case names in C{dropped} (which always holds
    L{HOP_BY_HOP}: the callers' sets are module constants, built once), the names in C{listed}
    (L{connection_listed} of C{headers}, which each caller needs itself) and every
    C{x-arvados-*} header, and, when C{dropped} holds L{UNDERSCORE_NAMES}, every name with an
    underscore in it; repeated headers and their order are kept.

    This runs before anything is added for the next hop, so a client can never use
    C{Connection} to remove a header the proxy sets.
    """
    decisions: dict[bytes, bool] | None = None
    if listed and not listed <= dropped:
        # Names the client listed: decided afresh, as they are the client's to choose.
        dropped = dropped | listed
    else:
        decisions = _decisions.get(dropped)
        if decisions is None and len(_decisions) < _MAX_DROPPED_SETS:
            decisions = _decisions[dropped] = {}
    result = Headers()
    # Copied as they are: a Headers' names are canonical and its values scrubbed already.
    fields = result._rawHeaders
    for name, values in headers._rawHeaders.items():
        keep = decisions.get(name) if decisions is not None else None
        if keep is None:
            lower = name.lower()
            keep = (
                lower not in dropped
                and not lower.startswith(ARVADOS_HEADER_PREFIX)
                and not (b"_" in lower and UNDERSCORE_NAMES in dropped)
            )
            if decisions is not None and len(decisions) < _MAX_DECISIONS:
                decisions[name] = keep
        if keep:
            fields[name] = list(values)
    return result


UNDERSCORE_NAMES = b"_"
"""
In a set of dropped names (see L{_forwardable}): drop every name with an underscore in it too.
CGI, WSGI and Rack servers turn C{-} and C{_} alike into C{_} (C{X_Forwarded_For} and
C{X-Forwarded-For} both become C{HTTP_X_FORWARDED_FOR}), so a client could forge, under another
spelling, a header the proxy sets or removes.  Requests lose such names at both hops, as Nginx
drops them by default (C{underscores_in_headers off}); responses keep them.
"""

# Whether each (canonical) name passes, per set of dropped names (the callers' module constants):
# the same names come back with nearly every request.  The names are the clients' to choose, so
# at most _MAX_DECISIONS are kept per set; the others are decided each time.
_MAX_DECISIONS = 1000
_MAX_DROPPED_SETS = 16
_decisions: dict[frozenset[bytes], dict[bytes, bool]] = {}


def upgrade_requested(headers: Headers) -> bytes | None:
    """
    The protocol a request asks to switch to (C{Upgrade}, with C{upgrade} listed in
    C{Connection}), or C{None}.
    """
    values = headers._rawHeaders.get(_UPGRADE)
    if not values or b"upgrade" not in connection_listed(headers):
        return None
    return b", ".join(values)


_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"/[\x21\x22\x24-\x7e]*\Z")


def is_forwardable_request_line(method: bytes, target: bytes) -> bool:
    """
    Whether a request's method is a token and its target visible ASCII in origin-form, with no
    fragment (RFC 9110, RFC 9112): only such a request line is passed to the next hop, so none
    can split or smuggle a request, nor name a host of its own (see L{origin_form}).
    """
    return bool(_METHOD.match(method) and _TARGET.match(target))


CARRIER_UPGRADE = b"arvproxy-tunnels/1"
"""The upgrade that opens a carrier between the proxy's hops (see L{arvproxy.carrier})."""

CARRIER_WINDOW = b"arvproxy-carrier-window"
"""The header in which each end of a carrier's handshake announces its window (see
L{arvproxy.carrier}); the front door's own, never a client's."""
_CARRIER_WINDOW = _canonical(CARRIER_WINDOW)

ANONYMOUS_CLIENT = b"x-arvados-anonymous-client"
"""Set by the front door on a request it forwards for an anonymous visitor, to the client's key
(L{arvproxy.limits.client_key}), so that the gateway keeps the same share of its container for
everyone else, however many front-door processes send it requests.  Bound by the signature
(L{request_binding}); like every C{x-arvados-*} header, one a client sends is dropped, and the
gateway removes it before the service."""
_ANONYMOUS_CLIENT = _canonical(ANONYMOUS_CLIENT)


def is_reserved_upgrade(upgrade: bytes) -> bool:
    """
    Whether an C{Upgrade} value (as L{upgrade_requested} returns it) names a protocol only the
    proxy's own hops may ask for: a client must never open a carrier to a gateway.
    """
    tokens = {token.strip().lower() for token in upgrade.split(b",")}
    return CARRIER_UPGRADE in tokens


def with_upgrade(headers: Headers, protocol: bytes) -> Headers:
    """C{headers} with the hop-by-hop headers that ask the next hop to switch to C{protocol}."""
    headers.setRawHeaders(b"connection", [b"upgrade"])
    headers.setRawHeaders(b"upgrade", [protocol])
    return headers


def client_address(
    peer: str | None,
    forwarded_for: Sequence[bytes],
    trusted: tuple[ipaddress._BaseNetwork, ...],
) -> str | None:
    """
    The client's address as the controller believes it, for a request from C{peer}, a trusted
    proxy, that came with the addresses C{forwarded_for} (its C{X-Forwarded-For}, split, in
    order): the rightmost of them that is not itself inside a C{trusted} network, the client
    the outermost trusted proxy saw (as Nginx's C{real_ip_recursive} finds it).  A value that
    is not an IP address ends the search: the address of the proxy that sent it is the answer.
    """
    address = peer
    for entry in reversed(forwarded_for):
        try:
            candidate = str(ipaddress.ip_address(entry.decode("latin-1")))
        except ValueError:
            break
        address = candidate
        if not is_trusted(candidate, trusted):
            break
    return address


@functools.lru_cache(maxsize=4096)
def is_trusted(address: str | None, trusted: tuple[ipaddress._BaseNetwork, ...]) -> bool:
    """
    Whether C{address} (the peer's IP) is inside one of the C{trusted} networks.  Answers are
    kept for the addresses seen last, as every request asks again.
    """
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def scrub_referer(value: bytes) -> bytes:
    """
    A C{Referer} value without any C{arvados_api_token} in its query (the page a browser came
    from may have had the token in its address), other parameters kept as written.  A value
    with a token also loses its fragment (browsers never send one anyway).
    """
    url = value.partition(b"#")[0]
    scrubbed, token = split_query_token(url)
    return value if token is None else scrubbed


# Content-Length frames one hop only: the next hop's is set from the streaming body (a copy
# would make two, which the gateway rightly refuses with 400).  The client's Host, cookies,
# X-Forwarded-* and X-Real-IP are replaced by the proxy's own, and the other claims about the
# client or the request it could make (CLIENT_CLAIMS) are dropped, from anyone.
_TO_GATEWAY_DROP = HOP_BY_HOP | {
    b"host",
    b"cookie",
    b"content-length",
    CARRIER_WINDOW,
    *FORWARDED_HEADERS,
    *CLIENT_CLAIMS,
    UNDERSCORE_NAMES,
}
_TO_CONTAINER_DROP = HOP_BY_HOP | {b"host", b"content-length", UNDERSCORE_NAMES}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}


def gateway_request_headers(
    client: Headers,
    *,
    target_uuid: str,
    target_port: int,
    request_host: bytes,
    client_ip: str | None,
    proto: str,
    trusted_peer: bool,
    trusted_proxies: tuple[ipaddress._BaseNetwork, ...] = (),
) -> Headers:
    """
    The headers the controller sends to a gateway for a client's request, but for their
    signature (L{sign_request}, once every header it binds is set).

    Hop-by-hop headers, the headers named in C{Connection}, every client-supplied C{x-arvados-*}
    header, every name with an underscore (L{UNDERSCORE_NAMES}), every L{CLIENT_CLAIMS} header,
    C{Host}, the C{arvados_api_token} cookie and any C{arvados_api_token} in a C{Referer}'s
    query are removed; C{Authorization} passes unchanged.  C{X-Forwarded-*} and C{X-Real-IP}
    are set from what the controller knows: C{X-Forwarded-Host} is always the host the request
    was routed by; when the peer (C{client_ip}) is a trusted proxy its C{X-Forwarded-For} is
    extended, its last C{X-Forwarded-Proto} kept, and C{X-Real-IP} is the client it reports
    (L{client_address}, with C{trusted_proxies}); otherwise C{X-Real-IP} is the peer.
    """
    listed = connection_listed(client)
    headers = _forwardable(client, _TO_GATEWAY_DROP, listed)
    given = client._rawHeaders
    fields = headers._rawHeaders
    # The proxy's own cookies (the token, the container marker) are the proxy's business only.
    if b"cookie" not in listed:
        cookies = strip_token_cookie(given.get(_COOKIE, ()), PROXY_COOKIES)
        if cookies:
            fields[_COOKIE] = cookies
    referers = fields.get(_REFERER)
    if referers:
        fields[_REFERER] = [scrub_referer(value) for value in referers]

    prior_for = given.get(_X_FORWARDED_FOR, ()) if trusted_peer else ()
    chain = [v.strip() for v in b", ".join(prior_for).split(b",") if v.strip()]
    real_ip = client_address(client_ip, chain, trusted_proxies) if chain else client_ip
    if client_ip:
        chain.append(client_ip.encode("ascii"))
    if chain:
        fields[_X_FORWARDED_FOR] = [b", ".join(chain)]
    if real_ip:
        fields[_X_REAL_IP] = [real_ip.encode("ascii")]
    forwarded_proto = given.get(_X_FORWARDED_PROTO) if trusted_peer else None
    fields[_X_FORWARDED_PROTO] = [forwarded_proto[-1] if forwarded_proto else proto.encode("ascii")]
    # The host the request was routed by: a trusted proxy that named another would have sent
    # it elsewhere, and Nginx passes a client's X-Forwarded-Host on as it is.
    fields[_X_FORWARDED_HOST] = [request_host]

    fields[_TARGET_UUID] = [target_uuid.encode("ascii")]
    fields[_TARGET_PORT] = [b"%d" % (target_port,)]
    fields[_REQUEST_HOST] = [request_host]
    return headers


def container_request_headers(gateway: Headers, request_host: bytes) -> Headers:
    """
    The headers the gateway sends to the service in the container: the controller's, without
    hop-by-hop and C{x-arvados-*} headers and names with an underscore (L{UNDERSCORE_NAMES}),
    with C{Host} set to the original request's host.
    """
    headers = _forwardable(gateway, _TO_CONTAINER_DROP, connection_listed(gateway))
    headers._rawHeaders[_HOST_FIELD] = [request_host]
    return headers


# Cookies that only the proxy may set: a service must never plant them (cookie tossing).  The
# front door's state cookies carry the __Host- prefix when the ExternalURL is https (see
# arvproxy.controller.statecookies); both spellings are its own.
CONTAINER_COOKIE = b"arvados_container_uuid"
HOST_PREFIX = b"__Host-"
PROXY_COOKIES = frozenset(
    {TOKEN_COOKIE, CONTAINER_COOKIE, HOST_PREFIX + TOKEN_COOKIE, HOST_PREFIX + CONTAINER_COOKIE}
)
_PROXY_COOKIE_BASES = frozenset({TOKEN_COOKIE, CONTAINER_COOKIE})
# Cookie name prefixes with a meaning to browsers (RFC 6265bis section 4.1.3), lower case.
_COOKIE_PREFIXES = (b"__host-", b"__secure-")
# RFC 6265bis section 5.6: a Set-Cookie value with a control character other than HTAB is
# ignored by the browser; such a value is never relayed.
_COOKIE_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def is_proxy_cookie_name(name: bytes) -> bool:
    """
    Whether a cookie called C{name} could be taken for one of the front door's own: one of
    L{PROXY_COOKIES}' names in any letter case, behind any number of C{__Host-} or
    C{__Secure-} prefixes (in any case), with any whitespace around it.
    """
    name = name.strip().lower()
    stripped = True
    while stripped:
        stripped = False
        for prefix in _COOKIE_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :].strip()
                stripped = True
    return name in _PROXY_COOKIE_BASES


def set_cookie_name(value: bytes) -> bytes:
    """
    The name a browser gives the cookie a C{Set-Cookie} value sets (RFC 6265bis section 5.6:
    the name-value pair ends at the first C{;}, the name at its first C{=}, both trimmed of
    whitespace; without C{=} the name is empty).  A nameless cookie goes back to servers as
    its value alone (C{=a=b} comes back as C{Cookie: a=b}), so for one the name is what a
    server will read from that value.
    """
    pair = value.partition(b";")[0]
    name, sep, rest = pair.partition(b"=")
    if not sep:
        name, rest = b"", pair
    name = name.strip()
    if not name:
        name = rest.strip().partition(b"=")[0].strip()
    return name


def scrub_set_cookie(value: bytes) -> bytes | None:
    """
    A service's C{Set-Cookie} made safe for a shared domain, parsed as browsers parse it
    (RFC 6265bis section 5.6: attributes split at C{;}, each name before its first C{=},
    whitespace around names and values ignored, names in any case, the last of a repeated
    attribute winning).

    @return: C{None} for a cookie the front door's own names could be read from
        (L{is_proxy_cookie_name} of L{set_cookie_name}) or that a browser would refuse (a
        control character); otherwise the same value, as written, without any C{Domain}
        attribute in any spelling, so the cookie stays on the service's own vhost and cannot
        reach other containers' services (or be tossed at them).
    """
    if _COOKIE_CTL.search(value) or is_proxy_cookie_name(set_cookie_name(value)):
        return None
    pair, *attributes = value.split(b";")
    kept = [pair]
    kept += [a for a in attributes if a.partition(b"=")[0].strip().lower() != b"domain"]
    return b";".join(kept)


_CLEAR_SITE_DATA = _canonical(b"clear-site-data")
# The Clear-Site-Data types whose effect stays on the answering origin.  "cookies" reaches the
# whole registrable domain (every container's vhost and the services page), "*" includes it,
# and "storage" is refused as well: a service clears only what is its own.  Anything else
# (another spelling, a type browsers may add) is dropped, so a browser never reads more.
ORIGIN_CLEAR_SITE_DATA = (
    b'"cache"',
    b'"clientHints"',
    b'"executionContexts"',
    b'"prefetchCache"',
    b'"prerenderCache"',
)


def scrub_clear_site_data(values: Sequence[bytes]) -> bytes | None:
    """
    A service's C{Clear-Site-Data} fields as one value holding only the types in
    L{ORIGIN_CLEAR_SITE_DATA}, each once, spelt exactly so; C{None} when none is left.
    """
    kept: list[bytes] = []
    for value in values:
        for item in value.split(b","):
            item = item.strip()
            if item in ORIGIN_CLEAR_SITE_DATA and item not in kept:
                kept.append(item)
    return b", ".join(kept) if kept else None


def response_headers(upstream: Headers) -> Headers:
    """
    The headers of an upstream response that may cross a hop back towards the client:
    end-to-end headers only, the service's cookies scrubbed (L{scrub_set_cookie}), and its
    C{Clear-Site-Data} limited to its own origin (L{scrub_clear_site_data}).
    """
    headers = _forwardable(upstream, _RESPONSE_DROP, connection_listed(upstream))
    cookies = headers._rawHeaders.get(_SET_COOKIE)
    if cookies:
        kept = [c for c in (scrub_set_cookie(value) for value in cookies) if c is not None]
        if kept:
            headers.setRawHeaders(b"set-cookie", kept)
        else:
            headers.removeHeader(b"set-cookie")
    clear = headers._rawHeaders.get(_CLEAR_SITE_DATA)
    if clear:
        allowed = scrub_clear_site_data(clear)
        if allowed is not None:
            headers._rawHeaders[_CLEAR_SITE_DATA] = [allowed]
        else:
            del headers._rawHeaders[_CLEAR_SITE_DATA]
    return headers


def parse_target_port(values: Sequence[bytes] | None) -> int:
    """
    The port in C{x-arvados-target-port}.

    @raise ValueError: missing, repeated, or not a decimal from 1 to 65535.
    """
    if not values or len(values) != 1:
        raise ValueError("x-arvados-target-port must appear exactly once")
    value = values[0].strip()
    if not value.isdigit() or len(value) > 5 or not 1 <= int(value) <= 65535:
        raise ValueError("x-arvados-target-port must be a port number from 1 to 65535")
    return int(value)


# --- Signing between the hops -------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def gateway_secret(system_root_token: str, container_uuid: str) -> str:
    """
    The per-container secret the dispatcher hands the gateway as C{GatewayAuthSecret}:
    C{hex(HMAC-SHA256(key=SystemRootToken, msg=container UUID))}.  A worker node never sees the
    SystemRootToken.  Kept for the containers used last, as every request needs it.
    """
    return hmac.new(
        system_root_token.encode("utf-8"), container_uuid.encode("ascii"), hashlib.sha256
    ).hexdigest()


NONCE_BYTES = 16


@functools.lru_cache(maxsize=1024)
def _keyed(secret: str) -> hmac.HMAC:
    """
    HMAC-SHA256 keyed with C{secret}, before any message: the key's two hashed blocks are the
    same for every request to a container, so each MAC starts from a copy of this one.
    """
    return hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha256)


def _mac(secret: str, message: bytes) -> str:
    mac = _keyed(secret).copy()
    mac.update(message)
    return mac.hexdigest()


def sign(secret: str, now: float, nonce: bytes | None = None, binding: bytes | None = None) -> str:
    """
    A signature: C{<nonce>+<timestamp> <hex HMAC-SHA256(secret, message)>}, where the message
    is C{arvproxy-v2 <nonce>+<timestamp>}, a line feed and C{binding}, what the signature is
    bound to (L{request_binding}).  Without a C{binding}, the format from before signatures
    were bound to requests: the message is C{<nonce>+<timestamp>} alone, and the signature
    fits any request to the container (only for old gateways: see L{sign_request}).

    @param nonce: random bytes (at least 16); fresh ones from L{os.urandom} when C{None}.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    stamp = f"{nonce.hex()}+{int(now)}"
    return f"{stamp} {_mac(secret, _signed_message(stamp, binding))}"


def _signed_message(stamp: str, binding: bytes | None) -> bytes:
    if binding is None:
        return stamp.encode("ascii")
    return b"arvproxy-v2 %s\n%s" % (stamp.encode("ascii"), binding)


def _field(values: Sequence[bytes] | None) -> bytes:
    """One part of a binding: C{-} for none, else the count and each value with its length."""
    if values is None:
        return b"-"
    if len(values) == 1:
        value = values[0]
        return b"#1:%d:%s" % (len(value), value)
    return b"#%d:%s" % (len(values), b"".join([b"%d:%s" % (len(v), v) for v in values]))


def request_binding(method: bytes, target: bytes, headers: Headers) -> bytes:
    """
    What a request's signature binds it to, so that a valid signature cannot be moved to any
    other request: everything the gateway acts on.  Its method, its target (path and query),
    the values of C{x-arvados-target-uuid}, C{x-arvados-target-port} and
    C{x-arvados-request-host}, the protocol it asks to switch to (L{upgrade_requested}, as the
    gateway reads it), the window of a carrier's handshake (L{CARRIER_WINDOW}) and the
    anonymous client's key the gateway counts the request under (L{ANONYMOUS_CLIENT}), each part
    written with its length (L{_field}) so that no two requests give the same bytes.  Both hops
    compute it from the request as it is sent and as it is received.
    """
    get = headers._rawHeaders.get
    upgrade = upgrade_requested(headers)
    # Formatted at once: this runs for every request in both hops.
    return b"#1:%d:%s#1:%d:%s%s%s%s%s%s%s" % (
        len(method),
        method,
        len(target),
        target,
        _field(get(_TARGET_UUID)),
        _field(get(_TARGET_PORT)),
        _field(get(_REQUEST_HOST)),
        b"-" if upgrade is None else b"#1:%d:%s" % (len(upgrade), upgrade),
        _field(get(_CARRIER_WINDOW)),
        _field(get(_ANONYMOUS_CLIENT)),
    )


def sign_request(
    headers: Headers,
    secret: str,
    now: float,
    method: bytes,
    target: bytes,
    old_gateways: bool = False,
) -> None:
    """
    Sign a request to a gateway: set its C{x-arvados-signature}, bound to the request
    (L{request_binding}); C{headers} must already hold every header the binding covers, as
    they will be sent.  Any earlier signature is replaced (a request sent again).

    @param old_gateways: also send an C{x-arvados-authorization} of the old, unbound format
        (C{ArvProxy.Gateway.SignForOldGateways}), which gateways started before signatures
        were bound still require, and which newer gateways ignore.
    """
    fields = headers._rawHeaders
    binding = request_binding(method, target, headers)
    fields[_SIGNATURE_FIELD] = [sign(secret, now, binding=binding).encode("ascii")]
    if old_gateways:
        fields[_AUTHORIZATION] = [sign(secret, now).encode("ascii")]
    else:
        fields.pop(_AUTHORIZATION, None)


class SignatureError(Exception):
    """A request's C{x-arvados-signature} is missing, malformed, wrong, stale or replayed."""


_SIGNATURE = re.compile(r"^([0-9a-f]{32,128})\+([0-9]{1,12}) ([0-9a-f]{64})\Z")


class NonceCache:
    """
    The nonces a gateway has accepted, kept for as long as their timestamps could still pass the
    clock check, so that a captured request cannot be replayed.  Memory is bounded by the
    request rate times the window; forgetting costs O(1) per nonce, oldest first.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._seen: set[str] = set()
        # (expiry, nonce) in the order accepted: expiries nearly ascend, so the expired ones
        # are found at the left end.
        self._order: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, nonce: str, timestamp: int, now: float) -> bool:
        """
        Record C{nonce}; C{False} when it was already recorded (a replay).
        """
        order = self._order
        while order and order[0][0] < now:
            self._seen.discard(order.popleft()[1])
        if nonce in self._seen:
            return False
        self._seen.add(nonce)
        order.append((timestamp + self.window, nonce))
        return True


def verify(
    values: Sequence[bytes] | None, secret: str, now: float, nonces: NonceCache, binding: bytes
) -> None:
    """
    Check a request's C{x-arvados-signature} (C{values}): one value, well formed, a MAC made
    with C{secret} over the request's C{binding} (L{request_binding} of the request as it
    arrived), a timestamp within C{nonces.window} seconds of C{now}, and a nonce not seen
    before.  The unbound format of old front doors is never accepted.

    @raise SignatureError: saying which check failed.
    """
    if not values:
        raise SignatureError("missing x-arvados-signature")
    if len(values) != 1:
        raise SignatureError("repeated x-arvados-signature")
    match = _SIGNATURE.match(values[0].decode("latin-1"))
    if match is None:
        raise SignatureError("malformed x-arvados-signature")
    nonce, timestamp, mac = match.groups()
    expected = _mac(secret, _signed_message(f"{nonce}+{timestamp}", binding))
    if not hmac.compare_digest(mac, expected):
        raise SignatureError("bad signature")
    if abs(now - int(timestamp)) > nonces.window:
        raise SignatureError("stale signature: the timestamp is too far from this node's clock")
    if not nonces.add(nonce, int(timestamp), now):
        raise SignatureError("replayed signature")
