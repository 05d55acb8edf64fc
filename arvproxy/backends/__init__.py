"""
Cluster backends answer three questions for the proxy: who is this token, may they connect, and
where is the container's gateway.  They also let a gateway record what it knows about its
container.

Two providers of L{ICluster} exist: the embedded registry (L{arvproxy.backends.registry}, the
default: one SQLite file on one machine) and, later, the Arvados REST API.  Both hand out the
immutable records defined here, in the shapes Arvados uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from zope.interface import Interface

# Container states, as in Arvados.
QUEUED = "Queued"
LOCKED = "Locked"
RUNNING = "Running"
COMPLETE = "Complete"
CANCELLED = "Cancelled"
FINAL_STATES = frozenset({COMPLETE, CANCELLED})

# The container fields ICluster.update_container may change, in every backend.
UPDATABLE_CONTAINER_FIELDS = frozenset(
    {
        "state",
        "gateway_address",
        "exit_code",
        "listening_ports",
        "runtime_status",
        "interactive_session_started",
    }
)

# Permission levels, weakest first.
CAN_READ = "can_read"
CAN_WRITE = "can_write"
CAN_MANAGE = "can_manage"
LEVELS = (CAN_READ, CAN_WRITE, CAN_MANAGE)

# UUID infixes of the record types we deal with.
USER_INFIX = "tpzed"
TOKEN_INFIX = "gj3su"
CONTAINER_REQUEST_INFIX = "xvhdp"
CONTAINER_INFIX = "dz642"
LINK_INFIX = "o0j2j"

UUID_RE = re.compile(r"^[a-z0-9]{5}-[a-z0-9]{5}-[a-z0-9]{15}$")


def uuid_infix(uuid: str) -> str:
    """
    The record-type part of an Arvados UUID (C{"xvhdp"} for a container request).

    @raise ValueError: C{uuid} is not shaped like an Arvados UUID.
    """
    if not UUID_RE.match(uuid):
        raise ValueError(f"not an Arvados UUID: {uuid!r}")
    return uuid[6:11]


@dataclass(frozen=True)
class User:
    uuid: str
    full_name: str
    is_admin: bool = False
    is_active: bool = True


@dataclass(frozen=True)
class Credentials:
    """
    What a valid token proves.

    @ivar token_uuid: the API client authorization's UUID, or C{None} for the SystemRootToken.
    @ivar scopes: Arvados scopes: C{"all"}, or C{"METHOD /path"} entries.
    @ivar expires_at: when the token stops working, or C{None} if it never does.
    @ivar token: the token itself, for backends that ask on the user's behalf (Arvados: the
        services page lists requests and makes Connect tokens with it); C{""} when a backend
        does not need it.  Left out of C{repr} and comparisons, so it is never logged by
        accident.
    """

    token_uuid: str | None
    user_uuid: str
    is_admin: bool
    scopes: tuple[str, ...] = ("all",)
    expires_at: datetime | None = None
    token: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True)
class ContainerRequest:
    uuid: str
    owner_uuid: str
    modified_by_user_uuid: str
    name: str = ""
    state: str = "Committed"
    container_uuid: str | None = None
    container_image: str = ""
    command: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    published_ports: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: datetime | None = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Container:
    """
    @ivar gateway_address: C{"host:port"} of the container's gateway, or C{""} before it has one.
    @ivar listening_ports: TCP ports a process in the container listens on, as last reported.
    @ivar interactive_session_started: someone has connected to one of its services (or a
        shell); set once, never cleared (Arvados' field).
    """

    uuid: str
    state: str = QUEUED
    gateway_address: str = ""
    exit_code: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    container_image: str = ""
    command: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    published_ports: dict[str, dict[str, Any]] = field(default_factory=dict)
    listening_ports: tuple[int, ...] = ()
    runtime_status: dict[str, Any] = field(default_factory=dict)
    interactive_session_started: bool = False


class ICluster(Interface):
    """
    The cluster state the controller and the gateways rely on.

    Every method returns a L{twisted.internet.defer.Deferred}; none blocks the reactor.  Failures
    are L{arvproxy.errors.ProxyError}s: C{Unauthorized} for a bad token, C{NotFound} for an unknown
    UUID, C{Unavailable} when the backend itself cannot answer right now.
    """

    def authenticate(token: str) -> Any:
        """
        Check C{token} (C{v2/<uuid>/<secret>}, or the cluster's SystemRootToken).

        @return: a Deferred firing with L{Credentials}; fails with C{Unauthorized} when the
            token is unknown, revoked, expired, or belongs to an inactive user.
        """

    def get_container_request(uuid: str) -> Any:
        """
        @return: a Deferred firing with the L{ContainerRequest}; fails with C{NotFound}.
        """

    def get_container(uuid: str) -> Any:
        """
        @return: a Deferred firing with the L{Container}; fails with C{NotFound}.
        """

    def container_requests_for(container_uuid: str) -> Any:
        """
        @return: a Deferred firing with a list of every L{ContainerRequest} that uses the
            container (all pages), possibly empty.
        """

    def permission_level(
        user_uuid: str, target_uuid: str, credentials: Credentials | None = None
    ) -> Any:
        """
        The strongest permission C{user_uuid} holds on record C{target_uuid}: by ownership
        (C{can_manage}) or by a permission link, and on Arvados by any path of its permission
        graph (projects, groups, managed accounts).

        @param credentials: what L{authenticate} returned for the request being decided, when
            there is one.  The answer must not depend on them: it is the user's permission,
            whichever token they use (the README's rule), and both backends ignore them.
        @return: a Deferred firing with one of L{LEVELS}, or C{None} for no permission.
        """

    def update_container(uuid: str, **changes: Any) -> Any:
        """
        Change fields of a container record (C{state}, C{gateway_address}, C{exit_code},
        C{listening_ports}, C{runtime_status}, C{interactive_session_started}...).  Moving to
        C{Running} sets C{started_at}; moving to a final state sets C{finished_at}.

        @return: a Deferred firing with the updated L{Container}; fails with C{NotFound}.
        """
