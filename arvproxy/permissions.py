"""
Who may connect to which container port: the rules of the story, as pure functions.

The controller gathers the facts (credentials, the container, the container requests that use it,
the user's permission level on each) from a cluster backend and asks these functions; each
raises the L{ProxyError} the person should see, or returns.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from arvproxy.backends import (
    CAN_MANAGE,
    CAN_WRITE,
    FINAL_STATES,
    RUNNING,
    Container,
    ContainerRequest,
    Credentials,
)
from arvproxy.errors import Forbidden, Gone, NotFound, Unavailable
from arvproxy.policy import connect_scope

WRITE_LEVELS = frozenset({CAN_WRITE, CAN_MANAGE})


def scope_allows(credentials: Credentials, uuids: Collection[str], port: int) -> bool:
    """
    Whether the token's scopes allow connecting to C{port} of the target: scope C{all}, or
    C{CONNECT /arvados/v1/container/<uuid>/<port>} for one of C{uuids} (the UUID in the URL or the
    container it resolves to) and exactly this port.
    """
    if "all" in credentials.scopes:
        return True
    allowed = {connect_scope(uuid, port) for uuid in uuids}
    return any(scope in allowed for scope in credentials.scopes)


def check_scope(credentials: Credentials, uuids: Collection[str], port: int) -> None:
    """
    @raise Forbidden: the token is scoped to something else.
    """
    if not scope_allows(credentials, uuids, port):
        raise Forbidden(
            "Your token's scope does not allow connecting to this container port.",
            hint='Use a token with scope "all", or one made for exactly this container and port.',
        )


def check_access(
    credentials: Credentials,
    named_uuid: str,
    requests: Sequence[ContainerRequest],
    levels: Mapping[str, str | None],
) -> None:
    """
    The user must be an admin, or hold C{can_write} or C{can_manage} on every container request
    in C{requests} (those that use the container; just one when the URL named a request).

    @param named_uuid: the UUID in the URL.
    @param levels: the user's permission level on each request's UUID (C{None}: none at all).
    @raise NotFound: the user cannot even read what the URL names (so its existence stays hidden).
    @raise Forbidden: the user can see it but may not connect.
    """
    if credentials.is_admin:
        return
    readable = [cr for cr in requests if levels.get(cr.uuid) is not None]
    if not readable:
        raise not_found(named_uuid)
    if len(readable) < len(requests) or any(
        levels.get(cr.uuid) not in WRITE_LEVELS for cr in requests
    ):
        raise Forbidden(
            "You need write permission on the container request to connect to its container"
            + (
                ", and this container is also used by requests you cannot write."
                if len(requests) > 1
                else "."
            ),
            hint="Ask the request's owner to share it with you with write (or manage) permission.",
        )


def not_found(named_uuid: str) -> NotFound:
    """
    The one answer for a UUID that does not exist and one the user may not see, so that the two
    cannot be told apart.
    """
    return NotFound(
        f"There is no container or container request {named_uuid} that you can see.",
        hint="Check the address, or sign in as the user who started the container.",
    )


def check_running(container: Container | None, named_uuid: str = "") -> None:
    """
    @param container: the container, or C{None} when the request named by C{named_uuid} has
        none yet.
    @raise Unavailable: the container is not running yet, or has no gateway yet.
    @raise Gone: the container has finished.
    """
    if container is None:
        raise Unavailable(
            f"Container request {named_uuid} has no container yet. This page will retry by itself."
        )
    if container.state in FINAL_STATES:
        raise Gone(
            f"Container {container.uuid} has finished ({container.state}); "
            "its web services are no longer available.",
            hint="Start a new container to use the service again.",
        )
    if container.state != RUNNING:
        raise Unavailable(
            f"Container {container.uuid} is {container.state}, not running yet. "
            "This page will retry by itself.",
        )
    if not container.gateway_address:
        raise Unavailable(
            f"Container {container.uuid} is starting: its gateway is not ready yet. "
            "This page will retry by itself.",
        )


def is_public(
    named_uuid: str,
    port: int,
    container: Container | None,
    requests: Sequence[ContainerRequest],
) -> bool:
    """
    Whether anyone with the URL may reach C{port}, with no token: its C{published_ports} entry
    says C{"access": "public"}.  As in Arvados, the entry comes from the container request when
    the URL names one, and from the container when the URL names the container.  Undeclared
    ports are private.
    """
    if container is not None and named_uuid == container.uuid:
        ports = container.published_ports
    else:
        ports = next((cr.published_ports for cr in requests if cr.uuid == named_uuid), {})
    entry = ports.get(str(port))
    return isinstance(entry, Mapping) and entry.get("access") == "public"


CONNECTIONS_PROPERTY = "arvproxy:connections"
"""The container request property that can prohibit connections to its container."""

PROHIBITED = "prohibited"
"""The value of L{CONNECTIONS_PROPERTY} that does: nobody may connect, admins included."""


def prohibits_connections(request: ContainerRequest) -> bool:
    """Whether a container request says that nobody may connect to its container."""
    return request.properties.get(CONNECTIONS_PROPERTY) == PROHIBITED


def check_connections_allowed(requests: Sequence[ContainerRequest]) -> None:
    """
    Nobody may connect to a container that any of its container requests (C{requests}: every
    request that uses it) prohibits connections to, admins included; the person learns which
    request says so.

    @raise Forbidden: one of them does.
    """
    for cr in requests:
        if prohibits_connections(cr):
            raise Forbidden(
                f"Connections to this container are prohibited: its container request {cr.uuid} "
                f'says so (property "{CONNECTIONS_PROPERTY}": "{PROHIBITED}").',
                hint="Its owner can allow them by removing that property from the request.",
            )


def services_turned_off() -> Forbidden:
    """The answer to every request for a container's service when the cluster turned them off."""
    return Forbidden(
        "Container web services are turned off on this cluster.",
        hint="The cluster's administrator has turned them off (ArvProxy.ConnectionsEnabled).",
    )
