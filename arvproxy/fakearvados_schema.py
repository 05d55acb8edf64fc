"""
The records of the fake Arvados API server (L{arvproxy.fakearvados}): each table's columns and
their types (C{services/api/db/structure.sql}), the attributes the API shows (each model's
C{api_accessible :user} template, with C{CommonApiTemplate}'s), and a new record's defaults.
"""

from __future__ import annotations

from typing import Any

from arvproxy.fakearvados_lists import (
    BOOLEAN,
    DATETIME,
    FLOAT,
    INTEGER,
    JSONB,
    SERIALIZED,
    STRING,
    TEXT,
    Table,
)

_COMMON = (
    "kind",
    "etag",
    "uuid",
    "owner_uuid",
    "created_at",
    "modified_by_user_uuid",
    "modified_at",
)

CONTAINERS = Table(
    name="containers",
    model="Container",
    infix="dz642",
    columns={
        **dict.fromkeys(
            (
                "uuid owner_uuid modified_by_client_uuid modified_by_user_uuid state log cwd "
                "output_path output container_image auth_uuid locked_by_uuid secret_mounts_md5 "
                "gateway_address"
            ).split(),
            STRING,
        ),
        **dict.fromkeys("created_at modified_at started_at finished_at".split(), DATETIME),
        **dict.fromkeys(
            "environment command mounts runtime_constraints scheduling_parameters "
            "output_glob".split(),
            SERIALIZED,
        ),
        **dict.fromkeys("runtime_user_uuid runtime_token".split(), TEXT),
        **dict.fromkeys("priority exit_code lock_count".split(), INTEGER),
        **dict.fromkeys("progress cost subrequests_cost".split(), FLOAT),
        **dict.fromkeys("interactive_session_started service".split(), BOOLEAN),
        **dict.fromkeys(
            (
                "secret_mounts runtime_status runtime_auth_scopes output_storage_classes "
                "output_properties published_ports"
            ).split(),
            JSONB,
        ),
    },
    attributes=(
        *_COMMON,
        *(
            "command container_image cwd environment exit_code finished_at locked_by_uuid log "
            "mounts output output_path output_glob priority progress runtime_constraints "
            "runtime_status started_at state auth_uuid scheduling_parameters runtime_user_uuid "
            "runtime_auth_scopes lock_count gateway_address interactive_session_started "
            "output_storage_classes output_properties cost subrequests_cost service "
            "published_ports"
        ).split(),
    ),
)
CONTAINER_REQUESTS = Table(
    name="container_requests",
    model="ContainerRequest",
    infix="xvhdp",
    columns={
        **dict.fromkeys(
            (
                "uuid owner_uuid modified_by_client_uuid modified_by_user_uuid name state "
                "requesting_container_uuid container_uuid container_image cwd output_path "
                "output_uuid log_uuid output_name"
            ).split(),
            STRING,
        ),
        **dict.fromkeys("created_at modified_at expires_at".split(), DATETIME),
        **dict.fromkeys("description filters runtime_token".split(), TEXT),
        **dict.fromkeys(
            "mounts runtime_constraints environment command scheduling_parameters "
            "output_glob".split(),
            SERIALIZED,
        ),
        **dict.fromkeys("container_count_max priority container_count output_ttl".split(), INTEGER),
        **dict.fromkeys("use_existing service".split(), BOOLEAN),
        "cumulative_cost": FLOAT,
        **dict.fromkeys(
            (
                "properties secret_mounts output_storage_classes output_properties published_ports"
            ).split(),
            JSONB,
        ),
    },
    attributes=(
        *_COMMON,
        *(
            "command container_count container_count_max container_image container_uuid cwd "
            "description environment expires_at filters log_uuid mounts name output_name "
            "output_path output_glob output_uuid output_ttl priority properties "
            "requesting_container_uuid runtime_constraints scheduling_parameters state "
            "use_existing output_storage_classes output_properties cumulative_cost service "
            "published_ports"
        ).split(),
    ),
)
"""The container requests table; each fake binds the C{"container.<attr>"} join to its records."""
TOKENS = Table(
    name="api_client_authorizations",
    model="ApiClientAuthorization",
    infix="gj3su",
    columns={
        "uuid": STRING,
        "api_token": STRING,
        "created_at": DATETIME,
        "expires_at": DATETIME,
        "scopes": SERIALIZED,
    },
    attributes=(
        *_COMMON,
        *(
            "api_token created_by_ip_address expires_at last_used_at last_used_by_ip_address scopes"
        ).split(),
    ),
)


def new_container(uuid: str, state: str, system_user_uuid: str, now: str) -> dict[str, Any]:
    """A container record with the defaults of C{Container} (C{fill_field_defaults}, columns)."""
    return {
        "kind": "arvados#container",
        "etag": "",
        "uuid": uuid,
        "owner_uuid": system_user_uuid,
        "created_at": now,
        "modified_at": now,
        "modified_by_user_uuid": system_user_uuid,
        "state": state,
        "started_at": None,
        "finished_at": None,
        "log": None,
        "environment": {},
        "cwd": ".",
        "command": [],
        "output_path": "/out",
        "output_glob": [],
        "mounts": {},
        "runtime_constraints": {},
        "output": None,
        "container_image": "",
        "progress": None,
        "priority": 0,
        "exit_code": None,
        "auth_uuid": None,
        "locked_by_uuid": None,
        "scheduling_parameters": {},
        "secret_mounts": {},
        "runtime_status": {},
        "runtime_user_uuid": None,
        "runtime_auth_scopes": ["all"],
        "runtime_token": None,
        "lock_count": 0,
        "gateway_address": "",
        "interactive_session_started": False,
        "output_storage_classes": ["default"],
        "output_properties": {},
        "cost": 0.0,
        "subrequests_cost": 0.0,
        "service": False,
        "published_ports": {},
    }


def new_container_request(
    uuid: str,
    owner_uuid: str,
    submitter: str,
    container_uuid: str | None,
    now: str,
    created: float,
    container_count_max: int,
) -> dict[str, Any]:
    """
    A committed container request (C{ContainerRequest}'s defaults); C{_created} keeps
    C{created_at} as a number for C{container_priority()}.
    """
    return {
        "kind": "arvados#containerRequest",
        "etag": "",
        "uuid": uuid,
        "owner_uuid": owner_uuid,
        "created_at": now,
        "modified_at": now,
        "modified_by_user_uuid": submitter,
        "name": "",
        "description": None,
        "properties": {},
        "state": "Committed",
        "requesting_container_uuid": None,
        "container_uuid": container_uuid,
        "container_count_max": container_count_max,
        "container_count": 0 if container_uuid is None else 1,
        "mounts": {},
        "runtime_constraints": {},
        "container_image": "",
        "environment": {},
        "cwd": ".",
        "command": [],
        "output_path": "/out",
        "output_glob": [],
        "priority": 1,
        "expires_at": None,
        "filters": None,
        "use_existing": True,
        "scheduling_parameters": {},
        "output_uuid": None,
        "log_uuid": None,
        "output_name": None,
        "output_ttl": 0,
        "output_storage_classes": ["default"],
        "output_properties": {},
        "cumulative_cost": 0.0,
        "service": False,
        "published_ports": {},
        "_created": created,
    }
