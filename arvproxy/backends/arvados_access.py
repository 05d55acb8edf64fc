"""
Who may connect on an Arvados cluster: a user's permission level on a container request, from
the rows of the API server's permission graph (C{GET /arvados/v1/computed_permissions}), as the
API server itself decides C{can_write} (C{User#can?}, C{services/api/app/models/user.rb}).

Pure: the rows in, a level out.  The rule (the README's, in one place):

    A user may connect to a container request's container when they are an admin (decided by
    the caller), or when Arvados gives them C{can_write} or C{can_manage} on the container
    request: by owning it, or what owns it (their projects, and projects inside them); through
    a project shared with them, or with a group they belong to; or through a permission link
    on the request itself.

Arvados keeps one row per (user, target) in its permission graph, the user's strongest level on
that target by every path (ownership, projects, role groups, permission links).
C{User#can?(write: request)} acts as the user and as every user whose account they manage, and
looks for a row of level 2 or more on the request itself, or on its owner when that row lets
permission on the owner reach what the owner owns (C{traverse_owned}: always for a group, and
for a user only through C{can_manage}).

Narrower than C{User#can?} in two corners, so that arvproxy may refuse what Arvados would
allow: a row on a user counts only at C{can_manage} (the API does not list C{traverse_owned},
which a C{can_manage} row always has, but a weaker one may have too), and only this cluster's
users are looked at as managed accounts.  Frozen projects are not looked
at (C{can?} refuses writes inside one): Arvados never lets a project that holds a committed
container request be frozen (C{Group#update_frozen}), so a running container's requests are not
in one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from arvproxy.backends import CAN_MANAGE, LEVELS, USER_INFIX, UUID_RE, uuid_infix

GROUP_INFIX = "j7d0g"


def _rank(level: object) -> int:
    return LEVELS.index(level) + 1 if level in LEVELS else 0


def acting_users(user_uuid: str, user_rows: Mapping[str, str]) -> list[str]:
    """
    Whom the user acts as (C{USER_UUIDS_SUBQUERY_TEMPLATE}): themselves, and every user whose
    account they manage.

    @param user_rows: the user's rows on users: C{target_uuid} to C{perm_level}.
    """
    managed = {
        uuid
        for uuid, level in user_rows.items()
        if uuid != user_uuid
        and UUID_RE.match(uuid)
        and uuid_infix(uuid) == USER_INFIX
        and level == CAN_MANAGE
    }
    return [user_uuid, *sorted(managed)]


def request_level(
    user_uuid: str, request_uuid: str, owner_uuid: str, rows: Mapping[str, str]
) -> str | None:
    """
    One user's own level on a container request, from their rows on it and on its owner.

    @param owner_uuid: the request's C{owner_uuid} (a user or a project).
    @param rows: the user's rows of the permission graph, C{target_uuid} to C{perm_level}
        (C{can_read}...), for the targets C{request_uuid} and C{owner_uuid}; missing means none.
    @return: one of L{LEVELS}, or C{None}.
    """
    if owner_uuid == user_uuid:
        return CAN_MANAGE  # every user's row on itself: can_manage, traverse_owned
    best = _rank(rows.get(request_uuid))
    owner_rank = _rank(rows.get(owner_uuid))
    kind = uuid_infix(owner_uuid) if UUID_RE.match(owner_uuid) else ""
    if kind == GROUP_INFIX:
        best = max(best, owner_rank)
    elif kind == USER_INFIX and owner_rank == _rank(CAN_MANAGE):
        best = owner_rank
    return LEVELS[best - 1] if best else None


def best_level(
    acting: Sequence[str],
    request_uuid: str,
    owner_uuid: str,
    rows_by_user: Mapping[str, Mapping[str, str]],
) -> str | None:
    """
    The strongest level any of the C{acting} users (L{acting_users}) holds on the request: the
    level of the user who acts as them.
    """
    ranks = [
        _rank(request_level(uuid, request_uuid, owner_uuid, rows_by_user.get(uuid, {})))
        for uuid in acting
    ]
    best = max(ranks, default=0)
    return LEVELS[best - 1] if best else None
