"""
The controller's own page, at the bare suffix host of the ExternalURL (e.g.
C{http://containers.localhost:8900/}): people sign in, see their containers and every port they
can open, and open one with B{Connect}.

Routes (anything else is a 404):

  - C{GET /}: the page (C{static/index.html}); C{GET /static/app.js}, C{/static/app.css}.
    A C{?arvados_api_token=} on any URL becomes a cookie with a 303, as on container vhosts.
  - C{POST /sign-in} (a form field C{token}): checks the token and stores it in the
    C{arvados_api_token} cookie of this host only; 303 back to C{/}.  C{POST /sign-out}
    deletes the cookie.
  - C{GET /api/containers}: JSON, the signed-in user's container requests whose container is
    queued, running or finished recently, each with its ports (L{describe_ports}).
  - C{POST /api/connect} (JSON C{{"uuid": ..., "port": ...}}): a URL that opens that port with
    a fresh token scoped to exactly C{CONNECT /arvados/v1/container/<uuid>/<port>} that expires
    in L{CONNECT_TOKEN_TTL} seconds.  The user's own token never appears in any URL.
  - C{GET /logs/<uuid>}: a container's kept output and why it ended, for whoever may connect
    to it (L{arvproxy.controller.logpage}).

Every POST must come from this page: C{Sec-Fetch-Site: same-origin} or an C{Origin} equal to
the page's own; C{/api/connect} also needs C{X-Requested-With} (a header a cross-site form cannot
send, and a cross-origin C{fetch} cannot send without a preflight this server never answers).

The page's API needs a token with scope C{all} (a token scoped to one container port must not
list containers or mint tokens), and a backend that can list container requests and create
tokens: the embedded registry (the user's own requests), or Arvados (every request the user can
read, listed with their own token, whose Connect tokens are made with their own token too);
otherwise it answers 501.  A request the user may not connect to (read permission only,
connections prohibited, services turned off) is listed with a note saying why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote

from arvproxy import pages, permissions, policy
from arvproxy.backends import (
    CONTAINER_REQUEST_INFIX,
    FINAL_STATES,
    RUNNING,
    UUID_RE,
    Container,
    ContainerRequest,
    Credentials,
)
from arvproxy.config import ClusterConfig
from arvproxy.controller import logpage, signin
from arvproxy.controller.statecookies import StateCookies
from arvproxy.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ProxyError,
    Unauthorized,
    Unavailable,
)
from arvproxy.httpserver import StreamingRequest

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {
    b"/": ("index.html", b"text/html; charset=utf-8"),
    b"/static/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"/static/app.css": ("app.css", b"text/css; charset=utf-8"),
}

CONNECT_TOKEN_TTL = 90.0
"""Seconds a Connect link works: long enough to open, too short to be worth stealing."""

RECENT_SECONDS = 24 * 3600.0
"""A finished container stays on the page this long after it finished."""

MAX_BODY = 4096
"""The largest request body the page accepts (a token, or a uuid and a port)."""

POLL_SECONDS = 3
"""How often the page asks for the list again (told to the page in each answer)."""

# Everything the page loads comes from this host; nothing is inline, nothing is framed.
_SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
    b"img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    b"frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cache-control": b"no-store",
}


class PayloadTooLarge(ProxyError):
    status = 413
    title = "Request too large"


class _Collector:
    """An C{IConsumer} that keeps a request body up to a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.too_large = True
            self.chunks.clear()
        elif not self.too_large:
            self.chunks.append(data)


async def read_small_body(request: StreamingRequest, limit: int = MAX_BODY) -> bytes:
    """
    The whole body of C{request}, which must be at most C{limit} bytes.

    @raise PayloadTooLarge: the body is (or says it will be) longer; the connection closes
        after the answer, so the unread rest is never taken for a request.
    """
    body = request.body
    if body.empty:
        return b""
    if isinstance(body.length, int) and body.length > limit:
        request.finishEarly()
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    collector = _Collector(limit)
    await body.startProducing(collector)  # type: ignore[arg-type]
    if collector.too_large:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    return b"".join(collector.chunks)


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def port_url(config: ClusterConfig, uuid: str, port: int, initial_path: str = "") -> str:
    """The URL that opens C{port} of C{uuid}, at C{initial_path} when one is declared."""
    path = "/" + initial_path.lstrip("/") if initial_path else "/"
    return config.external_url.url_for(f"{uuid}-{port}", path)


def with_token(url: str, token: str) -> str:
    """C{url} with C{arvados_api_token=<token>} added to its query (before any fragment)."""
    base, hash_mark, fragment = url.partition("#")
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}arvados_api_token={quote(token, safe='')}{hash_mark}{fragment}"


def describe_ports(
    config: ClusterConfig, cr: ContainerRequest, container: Container | None
) -> list[dict[str, Any]]:
    """
    Every port of a request's container that the page offers: those the request declares in
    C{published_ports} and those the container was last seen listening on, in port order.
    Publicness and labels come from the request (its URL names the request); undeclared ports
    are private.
    """
    declared: Mapping[str, Any] = cr.published_ports or {}
    listening = set(container.listening_ports) if container is not None else set()
    numbers = sorted({int(p) for p in declared if str(p).isdigit()} | listening)
    ports = []
    for number in numbers:
        entry = declared.get(str(number))
        entry = entry if isinstance(entry, Mapping) else None
        initial_path = str(entry.get("initial_path") or "") if entry else ""
        ports.append(
            {
                "port": number,
                "label": str(entry.get("label") or "") if entry else "",
                "access": "public" if entry and entry.get("access") == "public" else "private",
                "declared": entry is not None,
                "listening": number in listening,
                "initial_path": initial_path,
                "url": port_url(config, cr.uuid, number, initial_path),
            }
        )
    return ports


def describe(
    config: ClusterConfig,
    cr: ContainerRequest,
    container: Container | None,
    refusal: str | None = None,
) -> dict[str, Any]:
    """
    What the page shows of one container request and its container.

    @param refusal: why the user may not connect to it even while it runs, or C{None}.
    """
    return {
        "uuid": cr.uuid,
        "name": cr.name,
        "request_state": cr.state,
        "container_uuid": cr.container_uuid,
        "state": container.state if container is not None else "Waiting",
        "image": (container.container_image if container is not None else "") or cr.container_image,
        "created_at": _time(cr.created_at),
        "started_at": _time(container.started_at) if container is not None else None,
        "finished_at": _time(container.finished_at) if container is not None else None,
        "exit_code": container.exit_code if container is not None else None,
        "reason": logpage.reason_of(container)[0],
        "reason_detail": logpage.reason_of(container)[1],
        "logs_url": logpage.logs_path(cr.uuid),
        "can_connect": container is not None
        and container.state == RUNNING
        and bool(container.gateway_address)
        and refusal is None,
        "note": refusal,
        "ports": describe_ports(config, cr, container),
    }


def is_shown(container: Container | None, now: float) -> bool:
    """Whether the page lists a request with this container: not finished, or recently."""
    if container is None or container.state not in FINAL_STATES:
        return True
    finished = container.finished_at
    return finished is not None and now - finished.timestamp() <= RECENT_SECONDS


class Portal:
    """
    The handler of the bare suffix host (see this module's docstring for its routes).

    @param cluster: an L{arvproxy.backends.ICluster}; the page's API also needs
        C{list_container_requests(owner_uuid)} and C{create_token(user_uuid, scopes, ttl)},
        both returning Deferreds, as L{arvproxy.backends.embedded.EmbeddedRegistry} has.
    """

    def __init__(
        self,
        reactor: Any,
        config: ClusterConfig,
        cluster: Any,
        static_dir: str = STATIC_DIR,
        connect_ttl: float = CONNECT_TOKEN_TTL,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._cluster = cluster
        self._static_dir = static_dir
        self.connect_ttl = connect_ttl
        self._origin = config.external_url.url_for().rstrip("/").lower().encode("ascii")
        self.cookies = StateCookies(config.system_root_token, config.external_url)
        self.logs = logpage.LogPage(reactor, cluster, config.container_logs, self._credentials)

    async def __call__(self, request: StreamingRequest) -> None:
        uri, query_token = policy.split_query_token(request.uri)
        uri, sealed = policy.split_query_token(uri, signin.SWITCH_PARAM)
        if query_token is not None or sealed is not None:
            # Never silently signed in as someone else (login CSRF): see signin.
            answer = await signin.link_token(
                request,
                self._cluster,
                self.cookies,
                self._config,
                request.getHeader(b"host") or b"",
                uri,
                query_token,
                sealed,
                self._reactor.seconds(),
            )
            if answer is not None:
                token = answer[0]
                pages.redirect(
                    request, uri, [self.cookies.token_set_cookie(token)] if token else []
                )
            return
        path, method = request.path, request.method
        if path in STATIC_FILES and method in (b"GET", b"HEAD"):
            self._static(request, *STATIC_FILES[path])
        elif path.startswith(logpage.PATH_PREFIX) and method in (b"GET", b"HEAD"):
            await self.logs.render(request, self._write)
        elif path == b"/api/containers" and method in (b"GET", b"HEAD"):
            self._json(request, await self._containers(request))
        elif path == b"/api/connect" and method == b"POST":
            self._check_same_origin(request, api=True)
            self._json(request, await self._connect(request))
        elif path == b"/sign-in" and method == b"POST":
            self._check_same_origin(request)
            await self._sign_in(request)
        elif path == b"/sign-out" and method == b"POST":
            self._check_same_origin(request)
            pages.redirect(request, b"/", [self._clear_token_cookie()])
        elif path in STATIC_FILES or path in (b"/api/containers", b"/api/connect"):
            request.finishEarly()
            raise _MethodNotAllowed(f"{method.decode('latin-1')} is not allowed here.")
        else:
            request.finishEarly()
            raise NotFound(
                "There is no such page here.",
                hint=f"Your containers are listed at {self._config.external_url.url_for()}",
            )

    # -- responses -----------------------------------------------------------------------------

    def _static(self, request: StreamingRequest, name: str, content_type: bytes) -> None:
        with open(os.path.join(self._static_dir, name), "rb") as f:
            body = f.read()
        self._write(request, 200, content_type, body)

    def _json(self, request: StreamingRequest, document: Any) -> None:
        body = json.dumps(document).encode("utf-8") + b"\n"
        self._write(request, 200, b"application/json", body)

    def _write(
        self, request: StreamingRequest, code: int, content_type: bytes, body: bytes
    ) -> None:
        request.finishEarly()
        request.setResponseCode(code)
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % (len(body),))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _clear_token_cookie(self) -> bytes:
        return self.cookies.token_clear_cookie()

    # -- rules ---------------------------------------------------------------------------------

    def _check_same_origin(self, request: StreamingRequest, api: bool = False) -> None:
        """
        @raise Forbidden: the request may come from another site's page (CSRF), or, for the
            JSON API, lacks C{X-Requested-With}.
        """
        site = request.getHeader(b"sec-fetch-site")
        origin = request.getHeader(b"origin")
        # With Referrer-Policy no-referrer, Chromium posts forms with "Origin: null": then the
        # browser's own Sec-Fetch-Site (which no page can forge) decides alone.
        if site is not None:
            same = site.lower() == b"same-origin" and origin in (None, b"null", self._origin)
        else:
            same = origin is not None and origin.lower() == self._origin
        if not same:
            request.finishEarly()
            raise Forbidden(
                "This request did not come from this site's own page, so it was refused.",
                hint=f"Use the page at {self._config.external_url.url_for()}",
            )
        if api and not request.getHeader(b"x-requested-with"):
            request.finishEarly()
            raise Forbidden("This API needs the X-Requested-With header.")

    def _require_backend(self, *names: str) -> None:
        if not all(callable(getattr(self._cluster, name, None)) for name in names):
            raise _NotSupported(
                "This cluster's backend cannot list containers here.",
                hint="Use the links your cluster's own pages give you.",
            )

    async def _credentials(self, request: StreamingRequest) -> Credentials:
        """
        @raise Unauthorized: no token cookie, or a token that is not valid.
        @raise Forbidden: a token scoped to less than everything.
        """
        tokens = self.cookies.tokens(request.requestHeaders)
        if not tokens:
            raise Unauthorized("Sign in to see your containers.")
        credentials = await signin.signed_in(self._cluster, self.cookies, request.requestHeaders)
        if credentials is None:
            # Every cookie failed: say why the first did.
            credentials = await self._cluster.authenticate(tokens[0].decode("ascii"))
        if "all" not in credentials.scopes:
            raise Forbidden(
                "This token is limited to a few actions; the page needs a token with scope all.",
                hint="Sign out, and sign in with your full API token.",
            )
        return credentials

    async def _sign_in(self, request: StreamingRequest) -> None:
        fields = dict(parse_qsl((await read_small_body(request)).decode("utf-8", "replace")))
        token = fields.get("token", "").strip()
        try:
            if not token:
                raise Unauthorized("No token")
            credentials = await self._cluster.authenticate(token)
            if "all" not in credentials.scopes:
                raise Unauthorized("Scoped token")
        except Unauthorized:
            pages.redirect(request, b"/?signin=failed", [self._clear_token_cookie()])
            return
        pages.redirect(request, b"/", [self.cookies.token_set_cookie(token.encode("utf-8"))])

    async def _containers(self, request: StreamingRequest) -> dict[str, Any]:
        credentials = await self._credentials(request)
        self._require_backend("list_container_requests")
        requests = await self._cluster.list_container_requests(
            credentials.user_uuid, credentials=credentials
        )
        now = self._reactor.seconds()
        containers = await self._containers_of(requests, credentials)
        levels = await self._levels(credentials, requests)
        items = []
        for cr in requests:
            container = containers.get(cr.container_uuid) if cr.container_uuid else None
            if is_shown(container, now):
                refusal = self._refusal(cr, levels.get(cr.uuid), credentials)
                items.append(describe(self._config, cr, container, refusal))
        items.sort(key=lambda item: item["created_at"] or "", reverse=True)
        return {
            "user": {"uuid": credentials.user_uuid, "is_admin": credentials.is_admin},
            "items": items,
            "poll_seconds": POLL_SECONDS,
        }

    async def _containers_of(
        self, requests: list[ContainerRequest], credentials: Credentials
    ) -> dict[str, Container]:
        """The containers of C{requests}: in one call when the backend can (Arvados)."""
        uuids = [cr.container_uuid for cr in requests if cr.container_uuid]
        batch = getattr(self._cluster, "get_containers", None)
        if batch is not None:
            found: dict[str, Container] = await batch(uuids, credentials)
            return found
        containers = {}
        for uuid in uuids:
            try:
                containers[uuid] = await self._cluster.get_container(uuid)
            except NotFound:
                pass
        return containers

    async def _levels(
        self, credentials: Credentials, requests: list[ContainerRequest]
    ) -> dict[str, str | None]:
        """The user's level on each request (all at once when the backend can; none: admin)."""
        if credentials.is_admin or not requests:
            return {}
        batch = getattr(self._cluster, "permission_levels", None)
        if batch is not None:
            levels: dict[str, str | None] = await batch(credentials.user_uuid, requests)
            return levels
        return {
            cr.uuid: await self._cluster.permission_level(
                credentials.user_uuid, cr.uuid, credentials=credentials
            )
            for cr in requests
        }

    def _refusal(
        self, cr: ContainerRequest, level: str | None, credentials: Credentials
    ) -> str | None:
        """Why the user may not connect to C{cr}'s container (as the front door would say)."""
        if not self._config.connections_enabled:
            return "Container web services are turned off on this cluster."
        if permissions.prohibits_connections(cr):
            return "Nobody may connect to this container: its request prohibits connections."
        if not credentials.is_admin and level not in permissions.WRITE_LEVELS:
            return "You can see this request, but connecting needs write permission on it."
        return None

    async def _connect(self, request: StreamingRequest) -> dict[str, Any]:
        if not self._config.connections_enabled:
            raise permissions.services_turned_off()
        credentials = await self._credentials(request)
        self._require_backend("create_token")
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise BadRequest("Send the target as JSON (Content-Type: application/json).")
        try:
            document = json.loads(await read_small_body(request))
        except ValueError:
            raise BadRequest("The request body is not valid JSON.") from None
        uuid = document.get("uuid") if isinstance(document, dict) else None
        port = document.get("port") if isinstance(document, dict) else None
        if (
            not isinstance(uuid, str)
            or not UUID_RE.match(uuid)
            or uuid[6:11] != CONTAINER_REQUEST_INFIX
        ):
            raise BadRequest('"uuid" must be a container request UUID.')
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise BadRequest('"port" must be a port number from 1 to 65535.')
        try:
            cr = await self._cluster.get_container_request(uuid)
        except NotFound:
            raise NotFound(f"There is no container request {uuid} that you can see.") from None
        levels = {}
        if not credentials.is_admin:
            levels[uuid] = await self._cluster.permission_level(
                credentials.user_uuid, uuid, credentials=credentials
            )
        permissions.check_access(credentials, uuid, [cr], levels)
        if not cr.container_uuid:
            raise Unavailable(f"Container request {uuid} has no container yet.")
        permissions.check_connections_allowed(
            [cr, *await self._cluster.container_requests_for(cr.container_uuid)]
        )
        permissions.check_running(await self._cluster.get_container(cr.container_uuid))
        entry = (cr.published_ports or {}).get(str(port))
        initial_path = str(entry.get("initial_path") or "") if isinstance(entry, Mapping) else ""
        url = port_url(self._config, uuid, port, initial_path)
        scoped, record = await self._cluster.create_token(
            credentials.user_uuid,
            [policy.connect_scope(uuid, port)],
            self.connect_ttl,
            credentials=credentials,
        )
        return {
            "url": with_token(url, scoped),
            "expires_at": _time(getattr(record, "expires_at", None)),
        }


class _MethodNotAllowed(ProxyError):
    status = 405
    title = "Method not allowed"


class _NotSupported(ProxyError):
    status = 501
    title = "Not supported"
