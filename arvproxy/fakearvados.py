"""
An in-process fake of the Arvados API server, for testing the Arvados cluster backend, the gateway
and dispatchers over real HTTP without a Rails server and a PostgreSQL database.

L{FakeArvadosAPI} is a C{twisted.web} resource serving the part of the Arvados REST API
(C{/arvados/v1/...}) that arvproxy and a dispatcher use, following the rules of the Rails API
server's source (Arvados 913e363, C{services/api/}; each rule below cites where it comes from):

  - Tokens (C{Authorization: Bearer ...} or C{OAuth2 ...}): the SystemRootToken, C{v2/uuid/secret},
    C{v2/uuid/secret/<container uuid>} (a container's token, valid only while that container is
    Locked or Running and only if it is that container's C{auth_uuid}), or a bare secret
    (C{ApiClientAuthorization.validate}).  Unknown or expired: 401 C{Not logged in}.  Scopes are
    enforced on every call except C{GET api_client_authorizations/current}: 403 C{Forbidden}
    (C{ApplicationController#require_auth_scope}, C{ApiClientAuthorization#scopes_allow_request?}).
  - C{api_client_authorizations}: C{current}; C{create} (a user makes tokens for themselves only,
    an admin for anyone; L{issue_trusted_tokens} and L{max_token_lifetime} as in the
    configuration); C{get} and C{delete} of the caller's own tokens (the SystemRootToken: any).
  - C{users/current}, C{users/<uuid>}, C{groups/<uuid>} (with C{can_write}/C{can_manage}).
  - C{container_requests}: list, get, update (C{priority}, C{name}, C{description},
    C{properties}, C{state: Final}; needs C{can_write}); a request's priority sets its
    container's (C{container_priority()} in C{db/structure.sql}).
  - C{containers}: list, get, update, C{lock}, C{unlock}, C{auth}, C{current}, with the state
    machine and its permissions (L{arvproxy.fakearvados_containers}); on a final state the
    requests are finished, or, for C{Cancelled}, retried with a new container while
    C{container_count < container_count_max} (C{Container#handle_completed}).
  - Lists take C{filters}, C{order}, C{limit}, C{offset}, C{count} and C{select} as the server
    does (L{arvproxy.fakearvados_lists}).
  - Permissions, by the graph the API server materializes (L{arvproxy.fakearvados_permissions}:
    ownership, projects, role groups, permission links on any record, C{can_manage} on a
    user), and C{User#can?} on it; admins may do anything.  A record the caller cannot read is
    404, as in Arvados.  A container is readable by admins and by whoever can read a container
    request that uses it (C{Container.readable_by}).  C{computed_permissions} lists the graph's
    rows to admins.
  - Errors are the Rails server's: C{{"errors": ["<message> (req-...)"], "error_token":
    "<time>+<hex>"}} (C{ApplicationController#send_error}).  Clients that talk to the real
    cluster through its controller (C{lib/controller}) may get the same messages wrapped as
    C{"request failed: <url>: <status>: ..."} and no C{error_token}; rely on C{errors} only.

Not imitated: collections, logs, links' API, creating containers or container requests through
the API (tests make them with L{FakeArvadosAPI.add_container} and
L{FakeArvadosAPI.add_container_request}), C{published_ports} URLs, federation, and the
controller's own endpoints.

Switches for tests: L{FakeArvadosAPI.outage} (answer every call with that status),
L{FakeArvadosAPI.fail_next} (fail a few matching calls), L{FakeArvadosAPI.stall} (hold every
call until L{FakeArvadosAPI.release}), L{FakeArvadosAPI.max_page} (C{API.MaxItemsPerResponse}),
and L{FakeArvadosAPI.calls} (every call, for counting).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import secrets
import string
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from arvproxy.fakearvados_containers import (
    CANCELLED,
    FINAL_STATES,
    LOCKED,
    QUEUED,
    RUNNING,
    Caller,
    check_update,
    humanize,
    invalid_transition,
    lock_failed,
    permission_denied,
    really_changed,
)
from arvproxy.fakearvados_lists import (
    APIError,
    Table,
    argument_error,
    parse_list,
    parse_select,
    parse_time,
    rendered,
    ruby_inspect,
    run_list,
)
from arvproxy.fakearvados_permissions import (
    MANAGE,
    READ,
    WRITE,
    can,
    graph_edges,
    level_name,
    list_computed_permissions,
    materialized,
)
from arvproxy.fakearvados_schema import (
    CONTAINER_REQUESTS,
    CONTAINERS,
    TOKENS,
    new_container,
    new_container_request,
)

__all__ = ["APIError", "Call", "FakeAPIServer", "FakeArvadosAPI", "self_signed"]

LEVELS = ("can_read", "can_write", "can_manage")
CONTAINER_STATES = (QUEUED, LOCKED, RUNNING, "Complete", CANCELLED)
_PREFIX = "/arvados/v1/"

# ContainerRequest: AttrsPermittedAlways, and what check_update_whitelist adds for a committed
# request (container_count and container_uuid are the server's own business).
_CR_UPDATABLE = ("owner_uuid", "state", "name", "description", "properties", "priority")
_CR_ENGINE_FIELDS = ("container_count", "container_uuid", "cumulative_cost", "log_uuid")


@dataclass(frozen=True)
class Call:
    """
    One API call the fake received: method, path (no query), the query's arguments (last value
    of each), the caller's token UUID, and every parameter (query and body, decoded).
    """

    method: str
    path: str
    args: dict[str, str]
    token_uuid: str | None
    params: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class _Fault:
    status: int
    remaining: int
    method: str | None
    path: str | None

    def matches(self, call: Call) -> bool:
        return self.remaining > 0 and (
            (self.method is None or self.method == call.method)
            and (self.path is None or call.path.startswith(_PREFIX + self.path))
        )


def format_time(moment: float) -> str:
    """Arvados' timestamp format: UTC, nanoseconds, C{Z}."""
    dt = datetime.fromtimestamp(moment, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}000Z"


def scope_permits(scopes: Iterable[str], method: str, path: str) -> bool:
    """
    Whether a token with C{scopes} may make this call: C{ApiClientAuthorization#scopes_allow?}
    on C{"METHOD /path"}: C{"all"}, the exact string, or a scope ending in C{/} that it starts
    with; a C{HEAD} is allowed by its C{HEAD} or its C{GET} form.
    """
    methods = ("HEAD", "GET") if method == "HEAD" else (method,)
    for m in methods:
        wanted = f"{m} {path}"
        for scope in scopes:
            if (
                scope == "all"
                or scope == wanted
                or (scope.endswith("/") and wanted.startswith(scope))
            ):
                return True
    return False


def _request_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "req-" + "".join(secrets.choice(alphabet) for _ in range(20))


class FakeArvadosAPI(Resource):
    """
    A fake Arvados API server for one cluster.  Serve it with C{Site(FakeArvadosAPI(...))}, or
    with L{FakeAPIServer}.

    @ivar outage: C{None}, or an HTTP status (like 503) that every call gets.
    @ivar garbage: while true, every call gets a 200 whose body is not JSON.
    @ivar stall: while true, calls are held unanswered until L{release} (or the client gives up).
    @ivar max_page: the most items one list response holds, whatever C{limit} asks
        (C{API.MaxItemsPerResponse}).
    @ivar max_dispatch_attempts: C{Containers.MaxDispatchAttempts} (an unlock at this many locks
        cancels the container).
    @ivar max_retry_attempts: C{Containers.MaxRetryAttempts}, the default C{container_count_max}.
    @ivar issue_trusted_tokens: C{Login.IssueTrustedTokens} (may tokens create tokens).
    @ivar max_token_lifetime: C{API.MaxTokenLifetime} in seconds (0: no limit) for tokens users
        create.
    @ivar collections: portable data hashes that exist and that everyone may read (what a
        container's C{output} may name).
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
        self.system_root_token = system_root_token
        self.outage: int | None = None
        self.garbage = False
        self.stall = False
        self.max_page = 1000
        self.max_dispatch_attempts = 10
        self.max_retry_attempts = 3
        self.issue_trusted_tokens = True
        self.max_token_lifetime = 0.0
        self.collections: set[str] = set()
        self.calls: list[Call] = []
        self._faults: list[_Fault] = []
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
        self.root_token_uuid = f"{cluster_id}-gj3su-000000000000000"
        self._add_user_record(self.system_user_uuid, "root", is_admin=True)
        if system_root_token:
            # ApiClientAuthorization.check_system_root_token: not a stored token, so only the
            # bare form works (v2/<this uuid>/<root token> is not found).
            self.tokens[self.root_token_uuid] = self._token_record(
                self.root_token_uuid, self.system_user_uuid, system_root_token, ["all"], None
            )
            self.tokens[self.root_token_uuid]["_config"] = True
        self._cr_table = dataclasses.replace(
            CONTAINER_REQUESTS, joins={"container": (CONTAINERS, self._container_of)}
        )

    # -- setting up --------------------------------------------------------------------------

    def new_uuid(self, infix: str) -> str:
        return f"{self.cluster_id}-{infix}-{next(self._serial):015d}"

    def _now(self) -> str:
        return format_time(self.clock())

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
            "created_at": self._now(),
        }

    def add_user(self, full_name: str = "", is_admin: bool = False, is_active: bool = True) -> str:
        uuid = self.new_uuid("tpzed")
        self._add_user_record(uuid, full_name, is_admin=is_admin, is_active=is_active)
        return uuid

    def _token_record(
        self,
        uuid: str,
        user_uuid: str,
        secret: str,
        scopes: list[Any],
        expires_at: float | None,
    ) -> dict[str, Any]:
        return {
            "kind": "arvados#apiClientAuthorization",
            "etag": "",
            "uuid": uuid,
            "owner_uuid": user_uuid,
            "created_at": self._now(),
            "modified_by_user_uuid": None,
            "modified_at": None,
            "api_token": secret,
            "created_by_ip_address": None,
            "expires_at": None if expires_at is None else format_time(expires_at),
            "last_used_at": None,
            "last_used_by_ip_address": None,
            "scopes": list(scopes),
            "_expires": expires_at,
        }

    def _mint_token(
        self, user_uuid: str, scopes: Iterable[Any] = ("all",), expires_at: float | None = None
    ) -> dict[str, Any]:
        uuid = self.new_uuid("gj3su")
        # ApiClientAuthorization#assign_random_api_token: rand(2**256).to_s(36)
        secret = _base36(secrets.randbits(256))
        self.tokens[uuid] = self._token_record(uuid, user_uuid, secret, list(scopes), expires_at)
        return self.tokens[uuid]

    def add_token(
        self, user_uuid: str, scopes: Iterable[str] = ("all",), expires_at: float | None = None
    ) -> str:
        """A v2 token for C{user_uuid}, expiring at C{expires_at} (by the clock) or never."""
        record = self._mint_token(user_uuid, scopes, expires_at)
        return f"v2/{record['uuid']}/{record['api_token']}"

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
            "created_at": self._now(),
        }
        return uuid

    def add_role_group(self, name: str = "") -> str:
        """A role group (owned by the system user): members join it with L{grant}."""
        uuid = self.add_project(self.system_user_uuid, name)
        self.groups[uuid]["group_class"] = "role"
        return uuid

    def add_container(self, state: str = QUEUED, **fields: Any) -> str:
        """
        A container record, as the API server would hold it in C{state}.

        A Locked or Running container is locked by C{locked_by_uuid} (a token UUID; default:
        the SystemRootToken's) and has a token of its own (C{auth_uuid}) for
        C{runtime_user_uuid}, as C{Container#assign_auth} makes it.  The runtime user is, unless
        given, the submitter of the first container request added for it (C{Container.resolve});
        until then a Locked or Running container has no token.  Its C{priority} is 0 until a
        committed container request with a priority uses it (unless given).
        """
        uuid = fields.pop("uuid", None) or self.new_uuid("dz642")
        now = self._now()
        record = new_container(uuid, state, self.system_user_uuid, now)
        record.update(fields)
        if state in (LOCKED, RUNNING):
            record["locked_by_uuid"] = record["locked_by_uuid"] or self.root_token_uuid
            record["lock_count"] = record["lock_count"] or 1
            if state == RUNNING and record["started_at"] is None:
                record["started_at"] = now
        if state in FINAL_STATES and record["finished_at"] is None:
            record["finished_at"] = now
        if record["runtime_user_uuid"] is not None or state not in (LOCKED, RUNNING):
            self._assign_auth(record)
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
        now = self._now()
        record = new_container_request(
            uuid,
            owner_uuid,
            submitter,
            container_uuid,
            now,
            self.clock(),
            self.max_retry_attempts,
        )
        record.update(fields)
        self.container_requests[uuid] = record
        container = self.containers.get(container_uuid or "")
        if container is not None:
            if container["runtime_user_uuid"] is None:
                container["runtime_user_uuid"] = submitter
            if container["state"] in (LOCKED, RUNNING) and container["auth_uuid"] is None:
                self._assign_auth(container)
            self._update_priority(container["uuid"])
        return uuid

    def grant(self, user_uuid: str, head_uuid: str, level: str) -> str:
        """
        A permission link giving C{user_uuid} (a user, or a group: then its members) C{level}
        on C{head_uuid} (a user, a group, or any record).
        """
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

    def container_token(self, container_uuid: str) -> str:
        """The container's own token (C{auth_uuid}), as crunch-run gets it from C{auth}."""
        auth = self.containers[container_uuid]["auth_uuid"]
        if auth is None:
            raise KeyError(f"container {container_uuid} has no token (it is not Locked/Running)")
        return f"v2/{auth}/{self.tokens[auth]['api_token']}"

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

    def fail_next(
        self, status: int, count: int = 1, method: str | None = None, path: str | None = None
    ) -> None:
        """
        Answer the next C{count} calls that match (C{method}, and a path starting with
        C{/arvados/v1/<path>}) with C{status}, as an overloaded or restarting server would.
        """
        self._faults.append(_Fault(status, count, method, path))

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
        """
        The strongest permission C{user_uuid} holds on C{uuid}, or C{None}: the highest level
        at which C{User#can?} says yes (L{arvproxy.fakearvados_permissions}).
        """
        user = self.users.get(user_uuid)
        if user is None or not user["is_active"]:
            return None
        owner = self._owner_of(uuid)
        edges = self._permission_edges()
        memo: dict[str, dict[str, tuple[int, bool]]] = {}

        def rows_of(uuid: str) -> dict[str, tuple[int, bool]]:
            if uuid not in memo:
                memo[uuid] = materialized(uuid, edges)
            return memo[uuid]

        best = 0
        for needed in (READ, WRITE, MANAGE):
            if not can(user_uuid, bool(user["is_admin"]), needed, uuid, owner, rows_of):
                break
            best = needed
        return level_name(best)

    def _permission_edges(self) -> dict[str, list[tuple[str, int]]]:
        return graph_edges(self.users.values(), self.groups.values(), self.links)

    def _container_readable(self, user_uuid: str, uuid: str) -> bool:
        """C{Container.readable_by}: admins, and readers of a request that uses it."""
        if self.users[user_uuid]["is_admin"]:
            return True
        return any(
            cr["container_uuid"] == uuid and self.level(user_uuid, cr["uuid"]) is not None
            for cr in self.container_requests.values()
        )

    def _container_of(self, row: Any) -> dict[str, Any] | None:
        uuid = row.get("container_uuid")
        return self.containers.get(uuid) if uuid else None

    # -- serving ------------------------------------------------------------------------------

    def render(self, request: IRequest) -> Any:
        method = request.method.decode("ascii")
        path = request.path.decode("utf-8", "replace")
        args = {k.decode(): v[-1].decode() for k, v in (request.args or {}).items()}
        params = dict(args)
        try:
            params.update(_body_params(request))
        except ValueError:
            params["_unreadable_body"] = True
        token_record = self._token(request)
        call = Call(method, path, args, token_record["uuid"] if token_record else None, params)
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
        """C{ArvadosApiToken} and C{ApiClientAuthorization.validate} (without remote clusters)."""
        header = request.getHeader(b"authorization")
        if header is None:
            return None
        match = re.match(r"(OAuth2|Bearer) ([!-~]+)", header.decode("latin-1"))
        if match is None:
            return None
        value = match.group(2)
        if self.system_root_token and secrets.compare_digest(
            value.encode(), self.system_root_token.encode()
        ):
            return self.tokens.get(self.root_token_uuid)
        record: dict[str, Any] | None = None
        if value.startswith("v2/"):
            parts = value.split("/")
            if len(parts) not in (3, 4) or len(parts[1]) != 27 or not parts[2]:
                return None
            if len(parts) == 4:
                container = self.containers.get(parts[3])
                if container is not None and (
                    (container["auth_uuid"] is not None and container["auth_uuid"] != parts[1])
                    or container["state"] not in (LOCKED, RUNNING)
                ):
                    return None
            record = self.tokens.get(parts[1])
            if record is None or record.get("_config"):
                return None
            if not secrets.compare_digest(record["api_token"].encode(), parts[2].encode()):
                return None
        else:
            for candidate in self.tokens.values():
                if not candidate.get("_config") and secrets.compare_digest(
                    candidate["api_token"].encode(), value.encode()
                ):
                    record = candidate
                    break
        if record is None or record["owner_uuid"] not in self.users:
            return None
        return record

    def _answer(self, request: IRequest, call: Call) -> None:
        if self.garbage:
            request.write(b"<html>Welcome to nginx!</html>")
            request.finish()
            return
        request_id = _request_id()
        try:
            if self.outage is not None:
                raise APIError(self.outage, "Service unavailable (simulated outage)")
            for fault in self._faults:
                if fault.matches(call):
                    fault.remaining -= 1
                    raise APIError(fault.status, f"simulated failure ({fault.status})")
            self._faults = [f for f in self._faults if f.remaining > 0]
            if call.params.get("_unreadable_body"):
                raise APIError(400, "the request body cannot be parsed")
            body = self._dispatch(call)
            status = 200
        except APIError as e:
            status = e.status
            body = {
                "errors": [f"{m} ({request_id})" for m in e.messages],
                "error_token": f"{int(self.clock())}+{secrets.randbits(32):08x}",
            }
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-request-id", request_id.encode())
        request.write(json.dumps(body).encode("utf-8"))
        request.finish()

    def _caller(self, call: Call) -> Caller:
        token = self.tokens.get(call.token_uuid) if call.token_uuid else None
        if token is None:
            raise APIError(401, "Not logged in")
        expires = token.get("_expires")
        if expires is not None and expires <= self.clock():
            raise APIError(401, "Not logged in")
        user = self.users[token["owner_uuid"]]
        return Caller(
            token_uuid=token["uuid"],
            user_uuid=user["uuid"],
            is_admin=bool(user["is_admin"]),
            token=f"v2/{token['uuid']}/{token['api_token']}",
        )

    def _dispatch(self, call: Call) -> dict[str, Any]:
        if not call.path.startswith(_PREFIX):
            raise APIError(404, "Path not found")
        parts = call.path[len(_PREFIX) :].rstrip("/").split("/")
        method = "GET" if call.method == "HEAD" else call.method
        current_token = method == "GET" and parts == ["api_client_authorizations", "current"]
        # Rails routes first: a path no route matches is 404 whoever asks.
        handler = self._route(method, parts)
        if handler is None and not current_token:
            raise APIError(404, "Path not found")
        caller = self._caller(call)
        token = self.tokens[caller.token_uuid]
        if current_token:
            return self._render_token(token)
        if not scope_permits(token["scopes"], call.method, call.path):
            raise APIError(403, "Forbidden")
        user = self.users[caller.user_uuid]
        if not user["is_active"] and parts != ["users", "current"]:
            raise APIError(403, "Access denied: user is inactive")
        assert handler is not None
        return handler(caller, parts, call.params)

    def _route(
        self, method: str, parts: list[str]
    ) -> Callable[[Caller, list[str], dict[str, Any]], dict[str, Any]] | None:
        kind, rest = parts[0], parts[1:]
        routes: dict[tuple[str, str, int, str], Any] = {
            ("GET", "users", 1, ""): self._get_user,
            ("GET", "groups", 1, ""): self._get_group,
            ("GET", "computed_permissions", 0, ""): self._computed_permissions,
            ("POST", "api_client_authorizations", 0, ""): self._create_token,
            ("GET", "api_client_authorizations", 1, ""): self._get_token,
            ("DELETE", "api_client_authorizations", 1, ""): self._delete_token,
            ("GET", "container_requests", 0, ""): self._index_container_requests,
            ("GET", "container_requests", 1, ""): self._get_container_request,
            ("PUT", "container_requests", 1, ""): self._update_container_request,
            ("GET", "containers", 0, ""): self._index_containers,
            ("GET", "containers", 1, ""): self._get_container,
            ("PUT", "containers", 1, ""): self._update_container,
            ("GET", "containers", 2, "auth"): self._container_auth,
            ("POST", "containers", 2, "lock"): self._lock,
            ("POST", "containers", 2, "unlock"): self._unlock,
        }
        if method == "PATCH":
            method = "PUT"
        if kind == "containers" and rest == ["current"] and method == "GET":
            return self._current_container
        if kind == "users" and rest == ["current"] and method == "GET":
            return self._current_user
        action = rest[1] if len(rest) == 2 else ""
        handler: Any = routes.get((method, kind, len(rest), action))
        return handler

    # -- users, groups -----------------------------------------------------------------------

    def _current_user(self, caller: Caller, parts: list[str], params: dict[str, Any]) -> Any:
        return {**self.users[caller.user_uuid], "can_write": True, "can_manage": True}

    def _get_user(self, caller: Caller, parts: list[str], params: dict[str, Any]) -> Any:
        uuid = parts[1]
        level = self.level(caller.user_uuid, uuid) if uuid in self.users else None
        if level is None:
            raise APIError(404, "Path not found")
        return _with_access(self.users[uuid], level)

    def _get_group(self, caller: Caller, parts: list[str], params: dict[str, Any]) -> Any:
        uuid = parts[1]
        level = self.level(caller.user_uuid, uuid) if uuid in self.groups else None
        if level is None:
            raise APIError(404, "Path not found")
        return _with_access(self.groups[uuid], level)

    def _computed_permissions(
        self, caller: Caller, parts: list[str], params: dict[str, Any]
    ) -> Any:
        """C{ComputedPermissionsController#index}: C{admin_required}, then the list."""
        if not caller.is_admin:
            raise APIError(403, "Forbidden")
        edges = self._permission_edges()
        rows = {uuid: materialized(uuid, edges) for uuid in self.users}
        return list_computed_permissions(rows, params, self.max_page)

    # -- api_client_authorizations ------------------------------------------------------------

    @staticmethod
    def _render_token(record: dict[str, Any]) -> dict[str, Any]:
        return rendered(TOKENS, record, None)

    def _check_issue_trusted_tokens(self, caller: Caller) -> None:
        """C{ApiClientAuthorizationsController#check_issue_trusted_tokens}."""
        if caller.token_uuid == self.root_token_uuid:
            return
        if not self.issue_trusted_tokens:
            raise APIError(403, "Action prohibited by IssueTrustedTokens configuration.")

    def _create_token(self, caller: Caller, parts: list[str], params: dict[str, Any]) -> Any:
        """
        C{ApiClientAuthorizationsController#create} and the model's rules: a token for the
        caller (or, for an admin, for C{owner_uuid}); C{scopes} an array; C{expires_at} clamped
        to C{API.MaxTokenLifetime} for non-admins (C{clamp_token_expiration}).
        """
        self._check_issue_trusted_tokens(caller)
        attrs = _resource_attrs(params, "api_client_authorization")
        allowed = {"owner_uuid", "scopes", "expires_at", "api_token"}
        unknown = sorted(set(attrs) - allowed - {"kind", "etag", "href"})
        if unknown:
            raise APIError(
                422, f"the fake Arvados API does not implement setting {unknown[0]!r} on a token"
            )
        owner = attrs.get("owner_uuid") or caller.user_uuid
        scopes = attrs.get("scopes", ["all"])
        if isinstance(scopes, str):
            try:
                scopes = json.loads(scopes)
            except ValueError:
                scopes = None
        if not isinstance(scopes, list):
            raise APIError(422, "#<TypeError: parameter scopes must be a Array>")
        if not all(isinstance(s, str) for s in scopes):
            raise APIError(422, "the fake Arvados API only takes scopes that are strings")
        expires: float | None = None
        if attrs.get("expires_at") not in (None, ""):
            try:
                expires = parse_time(str(attrs["expires_at"])).timestamp()
            except APIError:
                raise APIError(
                    422, f"Expires at is not a time: {ruby_inspect(attrs['expires_at'])}"
                ) from None
        if self.max_token_lifetime > 0 and not caller.is_admin:
            latest = self.clock() + self.max_token_lifetime
            if expires is None or expires > latest:
                expires = latest
        # permission_to_create: "current_user.is_admin or current_user.id == self.user_id"
        if owner != caller.user_uuid and not caller.is_admin:
            raise permission_denied()
        if owner not in self.users:
            # Rails would store a token with no user, which no call accepts.
            raise APIError(422, f"the fake Arvados API has no user {owner!r}")
        record = self._mint_token(owner, scopes, expires)
        if isinstance(attrs.get("api_token"), str) and attrs["api_token"]:
            record["api_token"] = attrs["api_token"]
        return self._render_token(record)

    def _find_token(self, caller: Caller, uuid: str) -> dict[str, Any]:
        """The controller's C{find_object_by_uuid}: one's own tokens (the root token: any)."""
        if uuid != caller.token_uuid:
            self._check_issue_trusted_tokens(caller)
        record = self.tokens.get(uuid)
        if record is None or record.get("_config"):
            raise APIError(404, "Path not found")
        if caller.token_uuid != self.root_token_uuid and record["owner_uuid"] != caller.user_uuid:
            raise APIError(404, "Path not found")
        return record

    def _get_token(self, caller: Caller, parts: list[str], params: dict[str, Any]) -> Any:
        return self._render_token(self._find_token(caller, parts[1]))

    def _delete_token(self, caller: Caller, parts: list[str], params: dict[str, Any]) -> Any:
        record = self._find_token(caller, parts[1])
        if record["owner_uuid"] != caller.user_uuid and not caller.is_admin:
            raise permission_denied()
        del self.tokens[record["uuid"]]
        return self._render_token(record)

    # -- container requests ------------------------------------------------------------------

    def _readable_request(self, caller: Caller, uuid: str) -> dict[str, Any]:
        record = self.container_requests.get(uuid)
        if record is None or self.level(caller.user_uuid, uuid) is None:
            raise APIError(404, "Path not found")
        return record

    def _get_container_request(self, caller: Caller, parts: list[str], params: Any) -> Any:
        record = self._readable_request(caller, parts[1])
        return rendered(self._cr_table, record, parse_select(self._cr_table, params))

    def _index_container_requests(self, caller: Caller, parts: list[str], params: Any) -> Any:
        return self._list_container_requests(caller.user_uuid, params)

    def _list_container_requests(self, user_uuid: str, args: dict[str, Any]) -> dict[str, Any]:
        readable = (
            cr
            for cr in self.container_requests.values()
            if self.level(user_uuid, cr["uuid"]) is not None
        )
        return self._list(self._cr_table, readable, args, "arvados#containerRequestList")

    def _list(
        self, table: Table, rows: Iterable[dict[str, Any]], params: dict[str, Any], kind: str
    ) -> dict[str, Any]:
        """C{ApplicationController#index} and C{object_list}."""
        query = parse_list(table, params, self.max_page)
        page, available = run_list(table, list(rows), query)
        answer: dict[str, Any] = {
            "kind": kind,
            "etag": "",
            "self_link": "",
            "offset": query.offset,
            "limit": query.limit,
            "items": [rendered(table, row, query.select) for row in page],
        }
        if query.count:
            answer["items_available"] = available
        return answer

    def _update_container_request(self, caller: Caller, parts: list[str], params: Any) -> Any:
        """
        C{ContainerRequest#check_update_whitelist} for a committed request: C{priority}
        (0..1000), C{name}, C{description}, C{properties}, C{owner_uuid} and C{state: Final};
        the caller needs C{can_write} (C{ensure_owner_uuid_is_permitted}), and becomes
        C{modified_by_user_uuid}.
        """
        record = self._readable_request(caller, parts[1])
        attrs = _resource_attrs(params, "container_request")
        unknown = [a for a in attrs if a not in CONTAINER_REQUESTS.columns]
        if unknown:
            raise APIError(
                422,
                f"#<ActiveModel::UnknownAttributeError: unknown attribute '{unknown[0]}' for "
                "ContainerRequest.>",
            )
        new = {**record, **attrs}
        errors = []
        if new["state"] != record["state"] and (record["state"], new["state"]) != (
            "Committed",
            "Final",
        ):
            errors.append(f"State cannot change from {record['state']} to {new['state']}")
        priority = new.get("priority")
        if not isinstance(priority, int) or isinstance(priority, bool):
            errors.append("Priority is not a number")
        elif not 0 <= priority <= 1000:
            errors.append(
                "Priority must be greater than or equal to 0"
                if priority < 0
                else "Priority must be less than or equal to 1000"
            )
        if record["state"] == "Committed":
            permitted = set(_CR_UPDATABLE)
            if new["state"] == "Committed":
                permitted |= {"container_count_max"}
        else:
            permitted = {"owner_uuid", "state", "name", "description", "properties"}
        for name, value in attrs.items():
            if not really_changed(record.get(name), value):
                continue
            if name == "container_count":
                errors.append("Container count cannot be updated directly.")
            elif name in _CR_ENGINE_FIELDS:
                errors.append(f"the fake Arvados API does not implement changing {name}")
            elif name not in permitted:
                errors.append(
                    f"{humanize(name)} cannot be modified in state '{new['state']}' "
                    f"({ruby_inspect(record.get(name))}, {ruby_inspect(value)})"
                )
        if new["owner_uuid"] != record["owner_uuid"]:
            errors.append("the fake Arvados API does not implement moving container requests")
        if errors:
            raise APIError(422, *errors)
        if self.level(caller.user_uuid, record["uuid"]) not in ("can_write", "can_manage"):
            raise APIError(403, f"Uuid  {record['uuid']} is not writable by {caller.user_uuid}")
        new["modified_by_user_uuid"] = caller.user_uuid
        new["modified_at"] = self._now()
        self.container_requests[record["uuid"]] = new
        if new["container_uuid"]:
            self._update_priority(new["container_uuid"])
        return rendered(self._cr_table, new, parse_select(self._cr_table, params))

    # -- containers ---------------------------------------------------------------------------

    def _readable_container(self, caller: Caller, uuid: str) -> dict[str, Any]:
        record = self.containers.get(uuid)
        if record is None or not self._container_readable(caller.user_uuid, uuid):
            raise APIError(404, "Path not found")
        return record

    def _get_container(self, caller: Caller, parts: list[str], params: Any) -> Any:
        record = self._readable_container(caller, parts[1])
        return rendered(CONTAINERS, record, parse_select(CONTAINERS, params))

    def _index_containers(self, caller: Caller, parts: list[str], params: Any) -> Any:
        readable = (
            c
            for c in self.containers.values()
            if self._container_readable(caller.user_uuid, c["uuid"])
        )
        return self._list(CONTAINERS, readable, params, "arvados#containerList")

    def _current_container(self, caller: Caller, parts: list[str], params: Any) -> Any:
        """C{ContainersController#current}: the container whose token this is."""
        for record in self.containers.values():
            if record["auth_uuid"] == caller.token_uuid:
                return rendered(CONTAINERS, record, parse_select(CONTAINERS, params))
        raise APIError(404, "Token is not associated with a container.")

    def _container_auth(self, caller: Caller, parts: list[str], params: Any) -> Any:
        """C{ContainersController#auth}: the container's token, for the lock holder only."""
        record = self._readable_container(caller, parts[1])
        if record["locked_by_uuid"] != caller.token_uuid:
            raise permission_denied("Not locked by your token")
        if record["runtime_token"] is not None:
            raise APIError(422, "the fake Arvados API does not implement runtime_token")
        return self._render_token(self.tokens[record["auth_uuid"]])

    def _lock(self, caller: Caller, parts: list[str], params: Any) -> Any:
        """C{Container#lock}: only a Queued container, and then as any update to Locked."""
        record = self._readable_container(caller, parts[1])
        if record["state"] != QUEUED:
            raise lock_failed(f"cannot lock when {record['state']}")
        saved = self._save_container(caller, record, {"state": LOCKED})
        return _lock_answer(saved)

    def _unlock(self, caller: Caller, parts: list[str], params: Any) -> Any:
        """C{Container#unlock}: only a Locked container, by the token that locked it."""
        record = self._readable_container(caller, parts[1])
        if record["state"] != LOCKED:
            raise invalid_transition(f"cannot unlock when {record['state']}")
        saved = self._save_container(caller, record, {"state": QUEUED})
        return _lock_answer(saved)

    def _update_container(self, caller: Caller, parts: list[str], params: Any) -> Any:
        record = self._readable_container(caller, parts[1])
        attrs = _resource_attrs(params, "container")
        saved = self._save_container(caller, record, attrs)
        return rendered(CONTAINERS, saved, parse_select(CONTAINERS, params))

    def _save_container(
        self, caller: Caller, record: dict[str, Any], attrs: dict[str, Any]
    ) -> dict[str, Any]:
        """Validate (L{check_update}), then save with what the model's callbacks do after."""
        new = check_update(
            record,
            attrs,
            caller,
            now=self._now(),
            max_dispatch_attempts=self.max_dispatch_attempts,
            attributes=frozenset(CONTAINERS.columns),
            output_readable=self.collections.__contains__,
        )
        if not self.users[caller.user_uuid]["is_active"]:
            raise permission_denied()
        old_state = record["state"]
        self._assign_auth(new)
        if new["state"] != old_state and new["state"] in FINAL_STATES:
            # scrub_secrets
            new["secret_mounts"] = {}
            new["runtime_token"] = None
        new["modified_at"] = self._now()
        new["modified_by_user_uuid"] = caller.user_uuid
        self.containers[new["uuid"]] = new
        if new["state"] != old_state and new["state"] in FINAL_STATES:
            self._handle_completed(new)
        return self.containers[new["uuid"]]

    def _assign_auth(self, record: dict[str, Any]) -> None:
        """
        C{Container#assign_auth}: a container that is Locked or Running has a token of its own,
        for its runtime user with its runtime scopes; leaving those states expires it.
        """
        if record["state"] not in (LOCKED, RUNNING):
            token = self.tokens.get(record.get("auth_uuid") or "")
            if token is not None:
                token["_expires"] = self.clock()
                token["expires_at"] = self._now()
            record["auth_uuid"] = None
            return
        if record.get("auth_uuid") or record.get("runtime_token"):
            return
        runtime_user = record.get("runtime_user_uuid")
        if runtime_user is None:
            committed = [
                cr
                for cr in self.container_requests.values()
                if cr["container_uuid"] == record["uuid"] and cr["priority"] > 0
            ]
            if not committed:
                raise APIError(422, "Auth uuid cannot be assigned because priority <= 0")
            runtime_user = max(committed, key=lambda cr: cr["priority"])["modified_by_user_uuid"]
            record["runtime_user_uuid"] = runtime_user
            record["runtime_auth_scopes"] = ["all"]
        token = self._mint_token(runtime_user, record.get("runtime_auth_scopes") or ["all"])
        record["auth_uuid"] = token["uuid"]

    def _update_priority(self, container_uuid: str) -> None:
        """
        C{update_priorities}: a live container's priority is the highest of its committed
        requests' C{priority * 2**50 - created_at in ms} (C{container_priority()}), or 0.
        """
        container = self.containers.get(container_uuid)
        if container is None or container["state"] not in (QUEUED, LOCKED, RUNNING):
            return
        priorities = [
            cr["priority"] * 1125899906842624 - int(cr.get("_created", 0) * 1000)
            for cr in self.container_requests.values()
            if cr["container_uuid"] == container_uuid
            and cr["state"] == "Committed"
            and cr["priority"] > 0
        ]
        container["priority"] = max(priorities, default=0)

    def _handle_completed(self, container: dict[str, Any]) -> None:
        """
        C{Container#handle_completed}: a Cancelled container is retried, with a new container,
        for each committed request with a priority whose C{container_count} is below its
        C{container_count_max}; every other committed request on it becomes Final.
        """
        uuid = container["uuid"]
        retryable = []
        if container["state"] == CANCELLED:
            retryable = sorted(
                (
                    cr
                    for cr in self.container_requests.values()
                    if cr["container_uuid"] == uuid
                    and cr["priority"] > 0
                    and cr["state"] == "Committed"
                    and cr["container_count"] < cr["container_count_max"]
                ),
                key=lambda cr: cr["uuid"],
            )
        if retryable:
            # c_attrs in handle_completed copies these (and not service or published_ports).
            copied = (
                "command cwd environment output_path output_glob container_image mounts "
                "runtime_constraints scheduling_parameters runtime_user_uuid runtime_auth_scopes"
            ).split()
            retry = self.add_container(
                QUEUED,
                **{k: container[k] for k in copied},
                secret_mounts=dict(container["secret_mounts"]),
                runtime_token=container["runtime_token"],
            )
            for cr in retryable:
                cr["container_uuid"] = retry
                cr["container_count"] += 1
            self._update_priority(retry)
        for cr in self.container_requests.values():
            if cr["container_uuid"] == uuid and cr["state"] == "Committed":
                cr["state"] = "Final"


def _base36(number: int) -> str:
    digits = string.digits + string.ascii_lowercase
    out = ""
    while number:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
    return out or "0"


def _with_access(record: dict[str, Any], level: str) -> dict[str, Any]:
    return {
        **record,
        "can_write": level in ("can_write", "can_manage"),
        "can_manage": level == "can_manage",
    }


def _lock_answer(record: dict[str, Any]) -> dict[str, Any]:
    """What C{lock} and C{unlock} show: only the fields C{find_objects_for_index} selected."""
    return {k: record[k] for k in ("uuid", "state", "priority", "auth_uuid", "locked_by_uuid")}


def _resource_attrs(params: dict[str, Any], name: str) -> dict[str, Any]:
    """
    C{ApplicationController#resource_attrs}: C{params[name]}, a hash or its JSON text, without
    the fields clients may not set (C{created_at}, C{modified_*}) or that are ignored.
    """
    attrs = params.get(name)
    if isinstance(attrs, str):
        try:
            attrs = json.loads(attrs)
        except ValueError:
            attrs = None
    if not isinstance(attrs, dict):
        camel = re.sub(r"_(.)", lambda m: m.group(1).upper(), name)
        message = f"No {name}"
        if "_" in name:
            message += f" (or {camel})"
        raise argument_error(message + " hash provided with request")
    return {
        k: v
        for k, v in attrs.items()
        if k
        not in (
            "created_at",
            "modified_by_client_uuid",
            "modified_by_user_uuid",
            "modified_at",
            "kind",
            "etag",
            "href",
        )
    }


def _body_params(request: IRequest) -> dict[str, Any]:
    """The request body's parameters: a JSON object, or a form (as Rails' params merge them)."""
    content = request.content
    raw = content.read() if content is not None else b""
    if not raw:
        return {}
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if kind == b"application/json":
        document = json.loads(raw)
        # Rails merges an object's keys into params, and ignores any other JSON value.
        return document if isinstance(document, dict) else {}
    return {k: v[-1] for k, v in parse_qs(raw.decode("utf-8"), keep_blank_values=True).items()}


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

    @property
    def api_host(self) -> str:
        """C{ARVADOS_API_HOST} for this server, as dispatchers pass it: C{127.0.0.1:<port>}."""
        return f"127.0.0.1:{self.port}"

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
