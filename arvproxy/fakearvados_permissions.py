"""
The permission rules of the fake Arvados API server (L{arvproxy.fakearvados}): the permission
graph the API server materializes, who may read or write a record by it, and the
C{computed_permissions} list.  Pure: records (dicts) in, answers out.

Sources (Arvados 913e363, C{services/api/}):

  - C{db/structure.sql}: the view C{permission_graph_edges} (every group's and user's owner
    holds C{can_manage} on it, every user on itself, and every permission link gives its
    C{tail_uuid} the link's level on its C{head_uuid}: C{can_read} and C{can_login} 1,
    C{can_write} 2, C{can_manage} 3, anything else 0) and C{should_traverse_owned} (a
    permission on a group reaches what the group owns; one on a user only when it is
    C{can_manage}).
  - C{lib/20200501150153_permission_table_constants.rb}: C{PERM_QUERY_TEMPLATE}, the
    recursive query that fills C{materialized_permissions} from each user: an edge is followed
    from a group, or from the user the walk started at (never from another user), the level of
    a path is its weakest edge, and each (user, target) keeps its strongest level and whether
    any path reaches it with C{traverse_owned}.
  - C{app/models/user.rb}: C{can?} (an admin may do anything; anyone may act on themselves;
    otherwise some user in C{USER_UUIDS_SUBQUERY_TEMPLATE} -- the caller, and every user the
    caller holds the level on with C{traverse_owned} (C{lib/update_permissions.rb}) -- must
    hold the level on the record itself, or on its owner with C{traverse_owned}).
    C{ArvadosModel.readable_by} reads by the same two clauses.
  - C{app/models/computed_permission.rb} and
    C{app/controllers/arvados/v1/computed_permissions_controller.rb}: the
    C{computed_permissions} list: admins only, the rows of C{materialized_permissions} as
    C{user_uuid}, C{target_uuid} and C{perm_level} (C{can_read}...), filters on C{user_uuid}
    and C{target_uuid} only and with comparison or C{in} operators only, C{count} C{none}
    only, no C{offset}, ordered by C{user_uuid} then C{target_uuid}.

Not imitated: frozen and trashed projects, C{Users.RoleGroupsVisibleToAll}, the anonymous
group, and federation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from arvproxy.fakearvados_lists import (
    STRING,
    APIError,
    Table,
    argument_error,
    compile_filter,
    json_param,
    parse_select,
    ruby_inspect,
)

PERM_LEVEL_S = ("none", "can_read", "can_write", "can_manage")
"""C{ComputedPermission::PERM_LEVEL_S}: a level's name by its value."""

_LINK_LEVELS = {"can_read": 1, "can_login": 1, "can_write": 2, "can_manage": 3}
READ, WRITE, MANAGE = 1, 2, 3

COMPUTED_PERMISSIONS = Table(
    name="materialized_permissions",
    model="ComputedPermission",
    infix="",
    columns={"user_uuid": STRING, "target_uuid": STRING, "perm_level": STRING},
    attributes=("user_uuid", "target_uuid", "perm_level"),
)

Edge = tuple[str, str, int]
"""(tail, head, level) of C{permission_graph_edges}."""


def _is_group(uuid: str) -> bool:
    return uuid[6:11] == "j7d0g"


def _is_user(uuid: str) -> bool:
    return uuid[6:11] == "tpzed"


def should_traverse_owned(head: str, level: int) -> bool:
    """C{should_traverse_owned}: always through a group, through a user only at can_manage."""
    return _is_group(head) or (_is_user(head) and level >= MANAGE)


def graph_edges(
    users: Iterable[Mapping[str, Any]],
    groups: Iterable[Mapping[str, Any]],
    links: Iterable[Mapping[str, Any]],
) -> dict[str, list[tuple[str, int]]]:
    """C{permission_graph_edges}, as each tail's list of (head, level)."""
    edges: dict[str, list[tuple[str, int]]] = {}

    def add(tail: str | None, head: str, level: int) -> None:
        if tail:
            edges.setdefault(tail, []).append((head, level))

    for group in groups:
        add(group.get("owner_uuid"), group["uuid"], MANAGE)
    for user in users:
        add(user.get("owner_uuid"), user["uuid"], MANAGE)
        add(user["uuid"], user["uuid"], MANAGE)
    for link in links:
        if link.get("link_class") == "permission":
            add(link["tail_uuid"], link["head_uuid"], _LINK_LEVELS.get(link.get("name", ""), 0))
    return edges


def materialized(
    user_uuid: str, edges: Mapping[str, list[tuple[str, int]]]
) -> dict[str, tuple[int, bool]]:
    """
    The rows of C{materialized_permissions} for C{user_uuid}: each target's strongest level
    and whether some path reaches it with C{traverse_owned} (C{PERM_QUERY_TEMPLATE} from the
    base case C{(uuid, uuid, 3, true, true)}).
    """
    start = (user_uuid, MANAGE, True, True)
    seen = {start}
    pending = [start]
    while pending:
        target, level, _, starting = pending.pop()
        if not (_is_group(target) or starting):
            continue
        for head, edge_level in edges.get(target, ()):
            row = (head, min(edge_level, level), should_traverse_owned(head, edge_level), False)
            if row not in seen:
                seen.add(row)
                pending.append(row)
    rows: dict[str, tuple[int, bool]] = {}
    for target, level, traverse, _ in seen:
        best, any_traverse = rows.get(target, (0, False))
        rows[target] = (max(best, level), any_traverse or traverse)
    return rows


def can(
    user_uuid: str,
    is_admin: bool,
    needed: int,
    target_uuid: str,
    owner_uuid: str | None,
    rows_of: Callable[[str], Mapping[str, tuple[int, bool]]],
) -> bool:
    """
    C{User#can?}: may C{user_uuid} act at level C{needed} (1 read, 2 write, 3 manage) on the
    record C{target_uuid} owned by C{owner_uuid}?

    @param rows_of: L{materialized} rows of a user.
    """
    if is_admin or target_uuid == user_uuid:
        return True
    mine = rows_of(user_uuid)
    # USER_UUIDS_SUBQUERY_TEMPLATE: the user, and the users it holds the level on, traversing.
    acting = [
        uuid
        for uuid, (level, traverse) in mine.items()
        if _is_user(uuid) and level >= needed and traverse
    ]
    for uuid in acting:
        rows = rows_of(uuid)
        level, _ = rows.get(target_uuid, (0, False))
        if level >= needed:
            return True
        if owner_uuid is not None:
            level, traverse = rows.get(owner_uuid, (0, False))
            if level >= needed and traverse:
                return True
    return False


def level_name(value: int) -> str | None:
    """C{can_read}, C{can_write}, C{can_manage}, or C{None} below reading."""
    return PERM_LEVEL_S[value] if value > 0 else None


def list_computed_permissions(
    rows_by_user: Mapping[str, Mapping[str, tuple[int, bool]]],
    params: Mapping[str, Any],
    max_items: int,
) -> dict[str, Any]:
    """
    C{GET computed_permissions} (the caller is an admin): C{ComputedPermissionsController}.

    @raise APIError: 422, for what the server refuses.
    """
    if params.get("count") not in (None, "", "none"):
        raise argument_error("count parameter must be 'none'")
    if params.get("offset") not in (None, "", "0", 0):
        raise argument_error(
            f"non-zero offset parameter {ruby_inspect(params['offset'])} is not supported"
        )
    limit_text = params.get("limit")
    if limit_text is not None and not str(limit_text).isdigit():
        raise argument_error("Invalid value for limit parameter")
    limit = min(int(limit_text), max_items) if limit_text is not None else 100
    if params.get("order") not in (None, "", "[]"):
        raise APIError(422, "the fake Arvados API does not implement 'order' here")
    filters = json_param(params, "filters", "an array") or []
    if not isinstance(filters, list):
        raise argument_error('Could not parse "filters" param as an array')
    predicates = []
    for f in filters:
        attr = f[0] if isinstance(f, list) and f else None
        operator = f[1] if isinstance(f, list) and len(f) > 1 else None
        textonly = isinstance(operator, str) and (
            not any(c in operator for c in "<=>") and operator.lower() not in ("in", "not in")
        )
        if attr not in ("user_uuid", "target_uuid") or textonly:
            raise argument_error(f"Invalid attribute '{attr}' in filter")
        predicates.append(compile_filter(COMPUTED_PERMISSIONS, f))
    select = parse_select(COMPUTED_PERMISSIONS, params)
    names = list(COMPUTED_PERMISSIONS.attributes if select is None else select)
    items = []
    for user_uuid in sorted(rows_by_user):
        for target_uuid, (level, _) in sorted(rows_by_user[user_uuid].items()):
            row = {
                "user_uuid": user_uuid,
                "target_uuid": target_uuid,
                "perm_level": PERM_LEVEL_S[level],
            }
            if all(p(row) for p in predicates):
                items.append({k: row[k] for k in names})
    return {
        "kind": "arvados#computedPermissionList",
        "etag": "",
        "self_link": "",
        "offset": 0,
        "limit": limit,
        "items": items[:limit],
    }
