"""
An in-process fake of the Arvados API server, for testing the Arvados cluster backend over real
HTTP without a Rails server and a PostgreSQL database.

L{FakeArvadosAPI} is a C{twisted.web} resource serving the part of the Arvados REST API
(C{/arvados/v1/...}) that arvproxy uses, in the shapes the published API documentation gives:

  - C{GET api_client_authorizations/current}, C{GET users/current}, C{GET users/<uuid>},
    C{GET groups/<uuid>} (with C{can_write} and C{can_manage} for the caller),
    C{GET container_requests/<uuid>}, C{GET container_requests} (C{filters}, C{order}, C{limit},
    C{offset}, C{items_available}), C{GET containers/<uuid>}, C{PUT|PATCH containers/<uuid>}.
  - Tokens in C{Authorization: Bearer ...} (or C{OAuth2 ...}); expired or unknown tokens get
    401.  Scopes are enforced on every call except C{GET api_client_authorizations/current}, as
    the API server does: C{"all"}, an exact C{"METHOD /path"} (C{GET} also allows C{HEAD}), or a
    prefix ending in C{/}; a call outside the scopes gets 403.
  - Permissions, simplified from Arvados: admins may do anything; a user has C{can_manage} on
    itself and on what it owns, directly or through projects it owns; a permission link
    (C{tail_uuid} user, C{head_uuid} a user, project or record) grants its level on the head
    and on everything the head owns.  A record the caller cannot read is 404, as in Arvados.
    A container is readable by whoever can read a container request that uses it.
  - Errors are JSON: C{{"errors": ["..."], "error_token": "<time>+<hex>"}}.

Switches for tests: L{FakeArvadosAPI.outage} (answer every call with that status),
L{FakeArvadosAPI.stall} (hold every call until L{release}), L{FakeArvadosAPI.max_page} (the
server's page size limit), and L{FakeArvadosAPI.calls} (every call, for counting).
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

LEVELS = ("can_read", "can_write", "can_manage")
CONTAINER_STATES = ("Queued", "Locked", "Running", "Complete", "Cancelled")
FINAL_STATES = ("Complete", "Cancelled")
TRANSITIONS = {
    "Queued": {"Locked", "Cancelled"},
    "Locked": {"Queued", "Running", "Cancelled"},
    "Running": {"Complete", "Cancelled"},
    "Complete": set(),
    "Cancelled": set(),
}
UPDATABLE_CONTAINER_FIELDS = frozenset(
    {"state", "gateway_address", "exit_code", "runtime_status", "progress", "log", "output"}
)
DEFAULT_LIMIT = 100
_PREFIX = "/arvados/v1/"


@dataclass(frozen=True)
class Call:
    """One API call the fake received: method, path (no query), arguments, token UUID."""

    method: str
    path: str
    args: dict[str, str]
    token_uuid: str | None


class APIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def format_time(moment: float) -> str:
    """Arvados' timestamp format: UTC, nanoseconds, C{Z}."""
    dt = datetime.fromtimestamp(moment, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}000Z"


def scope_permits(scopes: Iterable[str], method: str, path: str) -> bool:
    """Whether a token with C{scopes} may make this call (the API server's rule)."""
    for scope in scopes:
        if scope == "all":
            return True
        scope_method, _, scope_path = scope.partition(" ")
        methods = {scope_method, "HEAD"} if scope_method == "GET" else {scope_method}
        if method not in methods:
            continue
        if path == scope_path or (scope_path.endswith("/") and path.startswith(scope_path)):
            return True
    return False


class FakeArvadosAPI(Resource):
    """
    A fake Arvados API server for one cluster.  Serve it with C{Site(FakeArvadosAPI(...))}.

    @ivar outage: C{None}, or an HTTP status (like 503) that every call gets.
    @ivar garbage: while true, every call gets a 200 whose body is not JSON.
    @ivar stall: while true, calls are held unanswered until L{release} (or the client gives up).
    @ivar max_page: the most items one list response holds, whatever C{limit} asks.
    @ivar calls: every call received, in order.
    """

    isLeaf = True

    def __init__(
        self,
        cluster_id: str = "zzzzz",
        system_root_token: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.cluster_id = cluster_id
        self.clock = clock
        self.outage: int | None = None
        self.garbage = False
        self.stall = False
        self.max_page = 1000
        self.calls: list[Call] = []
        self._held: list[tuple[IRequest, Call]] = []
        self._watchers: list[defer.Deferred[Call]] = []
        self._serial = itertools.count(1)
        self.users: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.container_requests: dict[str, dict[str, Any]] = {}
        self.containers: dict[str, dict[str, Any]] = {}
        self.links: list[dict[str, Any]] = []
        self.system_user_uuid = f"{cluster_id}-tpzed-000000000000000"
        self._add_user_record(self.system_user_uuid, "root", is_admin=True)
        if system_root_token:
            self.tokens[f"{cluster_id}-gj3su-000000000000000"] = {
                "uuid": f"{cluster_id}-gj3su-000000000000000",
                "owner_uuid": self.system_user_uuid,
                "api_token": system_root_token,
                "scopes": ["all"],
                "expires_at": None,
                "created_at": format_time(clock()),
            }

    # -- setting up --------------------------------------------------------------------------

    def new_uuid(self, infix: str) -> str:
        return f"{self.cluster_id}-{infix}-{next(self._serial):015d}"

    def _add_user_record(self, uuid: str, full_name: str, **fields: Any) -> None:
        self.users[uuid] = {
            "kind": "arvados#user",
            "uuid": uuid,
            "owner_uuid": self.system_user_uuid,
            "full_name": full_name,
            "first_name": full_name,
            "last_name": "",
            "username": full_name.lower().replace(" ", "") or None,
            "is_admin": fields.get("is_admin", False),
            "is_active": fields.get("is_active", True),
            "created_at": format_time(self.clock()),
        }

    def add_user(self, full_name: str = "", is_admin: bool = False, is_active: bool = True) -> str:
        uuid = self.new_uuid("tpzed")
        self._add_user_record(uuid, full_name, is_admin=is_admin, is_active=is_active)
        return uuid

    def add_token(
        self, user_uuid: str, scopes: Iterable[str] = ("all",), expires_at: float | None = None
    ) -> str:
        """A v2 token for C{user_uuid}, expiring at C{expires_at} (by the clock) or never."""
        uuid = self.new_uuid("gj3su")
        secret = secrets.token_hex(20)
        self.tokens[uuid] = {
            "uuid": uuid,
            "owner_uuid": user_uuid,
            "api_token": secret,
            "scopes": list(scopes),
            "expires_at": None if expires_at is None else format_time(expires_at),
            "_expires": expires_at,
            "created_at": format_time(self.clock()),
        }
        return f"v2/{uuid}/{secret}"

    def revoke(self, token: str) -> None:
        """Delete the token (given whole, or its UUID)."""
        uuid = token.split("/")[1] if token.startswith("v2/") else token
        del self.tokens[uuid]

    def add_project(self, owner_uuid: str, name: str = "") -> str:
        uuid = self.new_uuid("j7d0g")
        self.groups[uuid] = {
            "kind": "arvados#group",
            "uuid": uuid,
            "owner_uuid": owner_uuid,
            "name": name or uuid,
            "group_class": "project",
            "created_at": format_time(self.clock()),
        }
        return uuid

    def add_container(self, state: str = "Queued", **fields: Any) -> str:
        uuid = fields.pop("uuid", None) or self.new_uuid("dz642")
        record: dict[str, Any] = {
            "kind": "arvados#container",
            "uuid": uuid,
            "owner_uuid": self.system_user_uuid,
            "state": state,
            "gateway_address": "",
            "exit_code": None,
            "started_at": None,
            "finished_at": None,
            "container_image": "",
            "command": [],
            "environment": {},
            "cwd": ".",
            "published_ports": {},
            "runtime_status": {},
            "auth_uuid": None,
            "interactive_session_started": False,
            "created_at": format_time(self.clock()),
            "modified_at": format_time(self.clock()),
        }
        record.update(fields)
        self.containers[uuid] = record
        return uuid

    def add_container_request(
        self,
        owner_uuid: str,
        container_uuid: str | None = None,
        modified_by_user_uuid: str | None = None,
        **fields: Any,
    ) -> str:
        """A committed container request in C{owner_uuid} (a user or a project)."""
        uuid = fields.pop("uuid", None) or self.new_uuid("xvhdp")
        submitter = modified_by_user_uuid or self._owning_user(owner_uuid)
        now = format_time(self.clock())
        record: dict[str, Any] = {
            "kind": "arvados#containerRequest",
            "uuid": uuid,
            "owner_uuid": owner_uuid,
            "modified_by_user_uuid": submitter,
            "name": "",
            "state": "Committed",
            "container_uuid": container_uuid,
            "container_image": "",
            "command": [],
            "environment": {},
            "cwd": ".",
            "published_ports": {},
            "priority": 1,
            "created_at": now,
            "modified_at": now,
        }
        record.update(fields)
        self.container_requests[uuid] = record
        return uuid

    def grant(self, user_uuid: str, head_uuid: str, level: str) -> str:
        """A permission link giving C{user_uuid} C{level} on C{head_uuid}."""
        if level not in LEVELS:
            raise ValueError(level)
        uuid = self.new_uuid("o0j2j")
        self.links.append(
            {
                "uuid": uuid,
                "link_class": "permission",
                "name": level,
                "tail_uuid": user_uuid,
                "head_uuid": head_uuid,
            }
        )
        return uuid

    def count(self, path_prefix: str = "", method: str | None = None) -> int:
        """How many calls were made to paths starting with C{/arvados/v1/<path_prefix>}."""
        return sum(
            1
            for c in self.calls
            if c.path.startswith(_PREFIX + path_prefix) and method in (None, c.method)
        )

    def next_call(self) -> defer.Deferred[Call]:
        """A Deferred that fires with the next call that arrives."""
        d: defer.Deferred[Call] = defer.Deferred()
        self._watchers.append(d)
        return d

    def release(self) -> None:
        """Stop stalling, and answer every held call."""
        self.stall = False
        held, self._held = self._held, []
        for request, call in held:
            if not getattr(request, "_disconnected", False) and not getattr(request, "finished", 0):
                self._answer(request, call)

    # -- permissions --------------------------------------------------------------------------

    def _owning_user(self, uuid: str) -> str:
        seen = set()
        while uuid in self.groups and uuid not in seen:
            seen.add(uuid)
            uuid = self.groups[uuid]["owner_uuid"]
        return uuid

    def _owner_of(self, uuid: str) -> str | None:
        for table in (self.groups, self.container_requests, self.users):
            if uuid in table:
                owner = table[uuid]["owner_uuid"]
                return None if owner == uuid else owner
        return None

    def level(self, user_uuid: str, uuid: str) -> str | None:
        """The strongest permission C{user_uuid} holds on C{uuid}, or C{None}."""
        user = self.users.get(user_uuid)
        if user is None or not user["is_active"]:
            return None
        if user["is_admin"]:
            return "can_manage"
        best = -1
        chain: list[str] = []
        current: str | None = uuid
        while current is not None and current not in chain:
            chain.append(current)
            current = self._owner_of(current)
        for node in chain:
            if node == user_uuid:
                return "can_manage"
            for link in self.links:
                if link["tail_uuid"] == user_uuid and link["head_uuid"] == node:
                    best = max(best, LEVELS.index(link["name"]))
        return LEVELS[best] if best >= 0 else None

    def _container_readable(self, user_uuid: str, uuid: str) -> bool:
        if self.users[user_uuid]["is_admin"]:
            return True
        return any(
            cr["container_uuid"] == uuid and self.level(user_uuid, cr["uuid"]) is not None
            for cr in self.container_requests.values()
        )

    # -- serving ------------------------------------------------------------------------------

    def render(self, request: IRequest) -> Any:
        method = request.method.decode("ascii")
        path = request.path.decode("utf-8", "replace")
        args = {k.decode(): v[-1].decode() for k, v in (request.args or {}).items()}
        token_record = self._token(request)
        call = Call(method, path, args, token_record["uuid"] if token_record else None)
        self.calls.append(call)
        watchers, self._watchers = self._watchers, []
        for d in watchers:
            d.callback(call)
        if self.stall:
            self._held.append((request, call))
            return server.NOT_DONE_YET
        self._answer(request, call)
        return server.NOT_DONE_YET

    def _token(self, request: IRequest) -> dict[str, Any] | None:
        header = request.getHeader(b"authorization")
        if header is None:
            return None
        scheme, _, value = header.decode("latin-1").partition(" ")
        if scheme not in ("Bearer", "OAuth2") or not value:
            return None
        if value.startswith("v2/"):
            parts = value.split("/")
            record = self.tokens.get(parts[1]) if len(parts) == 3 else None
            if record is None or not secrets.compare_digest(record["api_token"], parts[2]):
                return None
            return record
        for record in self.tokens.values():
            if secrets.compare_digest(record["api_token"], value):
                return record
        return None

    def _answer(self, request: IRequest, call: Call) -> None:
        if self.garbage:
            request.write(b"<html>Welcome to nginx!</html>")
            request.finish()
            return
        try:
            if self.outage is not None:
                raise APIError(self.outage, "Service unavailable (simulated outage)")
            body = self._dispatch(request, call)
            status = 200
        except APIError as e:
            status = e.status
            body = {
                "errors": [e.message],
                "error_token": f"{int(self.clock())}+{secrets.token_hex(4)}",
            }
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(body).encode("utf-8"))
        request.finish()

    def _dispatch(self, request: IRequest, call: Call) -> dict[str, Any]:
        if not call.path.startswith(_PREFIX):
            raise APIError(404, "Path not found")
        parts = call.path[len(_PREFIX) :].split("/")
        token = self.tokens.get(call.token_uuid) if call.token_uuid else None
        if token is None:
            raise APIError(401, "Not logged in")
        expires = token.get("_expires")
        if expires is not None and expires <= self.clock():
            raise APIError(401, "Not logged in")
        user_uuid = token["owner_uuid"]
        user = self.users[user_uuid]
        current_token = call.method == "GET" and parts == ["api_client_authorizations", "current"]
        if not current_token and not scope_permits(token["scopes"], call.method, call.path):
            raise APIError(
                403, "Valid API token is required but scope does not permit this request"
            )
        if current_token:
            return {
                "kind": "arvados#apiClientAuthorization",
                **{k: v for k, v in token.items() if not k.startswith("_")},
            }
        if not user["is_active"] and parts != ["users", "current"]:
            raise APIError(403, "Access denied: user is inactive")
        if call.method == "GET":
            return self._get(user_uuid, parts, call.args)
        if call.method in ("PUT", "PATCH") and len(parts) == 2 and parts[0] == "containers":
            return self._update_container(user_uuid, token["uuid"], parts[1], request)
        raise APIError(404, "Path not found")

    def _get(self, user_uuid: str, parts: list[str], args: dict[str, str]) -> dict[str, Any]:
        if parts == ["users", "current"]:
            return {**self.users[user_uuid], "can_write": True, "can_manage": True}
        if parts == ["container_requests"]:
            return self._list_container_requests(user_uuid, args)
        if len(parts) != 2:
            raise APIError(404, "Path not found")
        kind, uuid = parts
        if kind == "users" and uuid in self.users:
            level = self.level(user_uuid, uuid)
            if level is not None:
                return self._with_access(self.users[uuid], level)
        elif kind == "groups" and uuid in self.groups:
            level = self.level(user_uuid, uuid)
            if level is not None:
                return self._with_access(self.groups[uuid], level)
        elif kind == "container_requests" and uuid in self.container_requests:
            if self.level(user_uuid, uuid) is not None:
                return dict(self.container_requests[uuid])
        elif kind == "containers" and uuid in self.containers:
            if self._container_readable(user_uuid, uuid):
                return dict(self.containers[uuid])
        elif kind not in ("users", "groups", "container_requests", "containers"):
            raise APIError(404, "Path not found")
        raise APIError(404, f"Path not found: {kind} {uuid} not found")

    @staticmethod
    def _with_access(record: dict[str, Any], level: str) -> dict[str, Any]:
        return {
            **record,
            "can_write": level in ("can_write", "can_manage"),
            "can_manage": level == "can_manage",
        }

    def _list_container_requests(self, user_uuid: str, args: dict[str, str]) -> dict[str, Any]:
        try:
            filters = json.loads(args.get("filters", "[]"))
            order = json.loads(args["order"]) if "order" in args else ["modified_at desc"]
            limit = int(args.get("limit", DEFAULT_LIMIT))
            offset = int(args.get("offset", 0))
        except ValueError as e:
            raise APIError(422, f"Invalid parameter: {e}") from None
        if isinstance(order, str):
            order = [order]
        if limit < 0 or offset < 0:
            raise APIError(422, "Invalid limit or offset")
        items = [
            cr
            for cr in self.container_requests.values()
            if self.level(user_uuid, cr["uuid"]) is not None and _matches(cr, filters)
        ]
        for spec in reversed(order):
            attr, _, direction = str(spec).partition(" ")
            if attr not in ("uuid", "created_at", "modified_at", "name"):
                raise APIError(422, f"Invalid order {spec!r}")
            items.sort(key=lambda r: r[attr] or "", reverse=direction.lower() == "desc")
        page = items[offset : offset + min(limit, self.max_page)]
        return {
            "kind": "arvados#containerRequestList",
            "offset": offset,
            "limit": limit,
            "items_available": len(items),
            "items": [dict(cr) for cr in page],
        }

    def _update_container(
        self, user_uuid: str, token_uuid: str, uuid: str, request: IRequest
    ) -> dict[str, Any]:
        record = self.containers.get(uuid)
        own_token = record is not None and record["auth_uuid"] == token_uuid
        if record is None or not (own_token or self._container_readable(user_uuid, uuid)):
            raise APIError(404, f"Path not found: containers {uuid} not found")
        if not self.users[user_uuid]["is_admin"] and not own_token:
            raise APIError(403, "Forbidden: only the dispatcher may update a container")
        try:
            raw = request.content.read() if request.content is not None else b""
            if (request.getHeader(b"content-type") or b"").startswith(b"application/json"):
                body = json.loads(raw)
            else:
                body = {"container": json.loads(parse_qs(raw.decode())["container"][-1])}
            changes = body["container"]
            if not isinstance(changes, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise APIError(422, "Expected a container object") from None
        unknown = set(changes) - UPDATABLE_CONTAINER_FIELDS
        if unknown:
            raise APIError(422, f"unknown attribute(s) {', '.join(sorted(unknown))} for Container")
        old_state = record["state"]
        new_state = changes.get("state", old_state)
        if new_state not in CONTAINER_STATES:
            raise APIError(422, f"State is not included in the list: {new_state!r}")
        if new_state != old_state and new_state not in TRANSITIONS[old_state]:
            raise APIError(422, f"Invalid state transition from {old_state} to {new_state}")
        now = format_time(self.clock())
        record.update(changes)
        if new_state != old_state:
            if new_state == "Running" and record["started_at"] is None:
                record["started_at"] = now
            if new_state in FINAL_STATES:
                record["finished_at"] = record["finished_at"] or now
                for cr in self.container_requests.values():
                    if cr["container_uuid"] == uuid:
                        cr["state"] = "Final"
        record["modified_at"] = now
        return dict(record)


def _matches(record: dict[str, Any], filters: Any) -> bool:
    if not isinstance(filters, list):
        raise APIError(422, "Invalid filters: expected a list")
    for f in filters:
        if not isinstance(f, list) or len(f) != 3:
            raise APIError(422, f"Invalid filter {f!r}")
        attr, op, value = f
        if attr not in record:
            raise APIError(422, f"Invalid attribute '{attr}' in filter")
        have = record[attr]
        if op == "=":
            ok = have == value
        elif op == "!=":
            ok = have != value
        elif op == "in":
            ok = isinstance(value, list) and have in value
        else:
            raise APIError(422, f"Invalid operator '{op}' in filter")
        if not ok:
            return False
    return True


# --- Serving it on loopback ----------------------------------------------------------------------


class OpenConnections:
    """
    Keeps track of a Site's open connections, so a test can close them and wait until every one
    has gone (a clean reactor: no idle-timeout timers left behind).
    """

    def __init__(self, site: server.Site) -> None:
        self.open: set[Any] = set()
        self._all_closed: list[defer.Deferred[None]] = []
        build = site.buildProtocol

        def build_protocol(addr: Any) -> Any:
            protocol = build(addr)
            if protocol is not None:
                self._watch(protocol)
            return protocol

        site.buildProtocol = build_protocol  # type: ignore[method-assign]

    def _watch(self, protocol: Any) -> None:
        self.open.add(protocol)
        lost = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            lost(reason)
            self.open.discard(protocol)
            if not self.open:
                waiting, self._all_closed = self._all_closed, []
                for d in waiting:
                    d.callback(None)

        protocol.connectionLost = connection_lost

    def close_all(self) -> defer.Deferred[None]:
        """Close every connection; the Deferred fires once each has gone."""
        if not self.open:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._all_closed.append(d)
        for protocol in list(self.open):
            # Site builds a wrapper that picks HTTP/1.1 or HTTP/2; the channel has the transport.
            getattr(protocol, "_channel", protocol).transport.loseConnection()
        return d


class FakeAPIServer:
    """
    A L{FakeArvadosAPI} listening on a random loopback port, over HTTP or (with C{tls}, server
    options such as L{self_signed}'s) HTTPS.

    @ivar url: C{http(s)://127.0.0.1:<port>}, once L{start} has fired.
    """

    def __init__(self, reactor: Any, api: FakeArvadosAPI, tls: Any = None) -> None:
        self._reactor = reactor
        self.api = api
        self._tls = tls
        self.site = server.Site(api, reactor=reactor)
        self.connections = OpenConnections(self.site)
        self._port: Any = None
        self.url = ""

    def start(self, port: int = 0) -> None:
        """Listen (on C{port}, or a random one)."""
        if self._tls is None:
            self._port = self._reactor.listenTCP(port, self.site, interface="127.0.0.1")
        else:
            self._port = self._reactor.listenSSL(port, self.site, self._tls, interface="127.0.0.1")
        scheme = "https" if self._tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._port.getHost().port}"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop listening, close every connection, and wait until they have all closed."""
        if self._port is not None:
            yield self._port.stopListening()
            self._port = None
        yield self.connections.close_all()


def self_signed(hostnames: Iterable[str] = ("127.0.0.1", "localhost")) -> tuple[Any, Any]:
    """
    A fresh self-signed certificate naming C{hostnames}.

    @return: C{(server options for listenSSL, the certificate as a trust root)}.
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from OpenSSL import crypto
    from twisted.internet.ssl import Certificate, CertificateOptions

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake arvados api")])
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
    )
    return options, Certificate(crypto.X509.from_cryptography(cert))
