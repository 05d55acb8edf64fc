"""
The container rules of the fake Arvados API server (L{arvproxy.fakearvados}): which update of a
container record the API server accepts from whom, and what it changes on its own when it does.
Pure: the old record, the changes and the caller in; the record to save, or an L{APIError}, out.

Source: C{services/api/app/models/container.rb} (Arvados 913e363), in the order Rails runs it:

  1. C{before_validation}: C{set_timestamps} (C{started_at} on entering Running, C{finished_at}
     on entering a final state), C{check_lock} (Queued to Locked needs C{priority > 0}, else
     C{LockFailedError}, 422; it counts C{lock_count}), C{check_unlock} (Locked to Queued only by
     the token holding the lock, else C{PermissionDeniedError}, 403; at
     C{Containers.MaxDispatchAttempts} locks the container is Cancelled instead, with a
     C{runtime_status.error}).
  2. C{validate}: C{validate_runtime_status} (well-known keys hold strings),
     C{validate_state_change} (C{State_transitions}), C{validate_change} (what may change in the
     new state, and by whom: see L{permitted_attributes}), C{validate_lock} (C{locked_by_uuid} is
     the lock holder's token while Locked or Running, and nothing otherwise).
  3. Errors found make a 422 whose messages are Rails' C{full_messages}; a
     C{PermissionDeniedError} raised on the way is a 403 (C{render_error} in
     C{application_controller.rb}).

What follows a successful save (a new C{auth_uuid} token, expiring the old one, finishing or
retrying the container requests) touches other records and is done by the server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from arvproxy.fakearvados_lists import APIError, ruby_inspect

QUEUED, LOCKED, RUNNING, COMPLETE, CANCELLED = (
    "Queued",
    "Locked",
    "Running",
    "Complete",
    "Cancelled",
)
STATES = (QUEUED, LOCKED, RUNNING, COMPLETE, CANCELLED)
FINAL_STATES = (COMPLETE, CANCELLED)

# Container::State_transitions
TRANSITIONS: Mapping[str, tuple[str, ...]] = {
    QUEUED: (LOCKED, CANCELLED),
    LOCKED: (QUEUED, RUNNING, CANCELLED),
    RUNNING: (COMPLETE, CANCELLED),
    COMPLETE: (CANCELLED,),
    CANCELLED: (),
}

# validate_change's lists.
FINAL_ATTRS = frozenset({"finished_at"})
PROGRESS_ATTRS = frozenset(
    {
        "progress",
        "runtime_status",
        "subrequests_cost",
        "cost",
        "log",
        "output",
        "output_properties",
        "exit_code",
    }
)
RUNTIME_STATUS_STRING_KEYS = (
    "error",
    "errorDetail",
    "warning",
    "warningDetail",
    "activity",
    "preemptionNotice",
)


@dataclass(frozen=True)
class Caller:
    """Who makes a call: their token's UUID (and secret), their user, and whether an admin."""

    token_uuid: str
    user_uuid: str
    is_admin: bool
    token: str = ""


def permission_denied(message: str | None = None) -> APIError:
    """C{ArvadosModel::PermissionDeniedError} as C{render_error} shows it (403)."""
    name = "ArvadosModel::PermissionDeniedError"
    return APIError(403, f"#<{name}: {message or name}>")


def lock_failed(message: str) -> APIError:
    return APIError(422, f"#<ArvadosModel::LockFailedError: {message}>")


def invalid_transition(message: str) -> APIError:
    return APIError(422, f"#<ArvadosModel::InvalidStateTransitionError: {message}>")


def humanize(attribute: str) -> str:
    """Rails' C{human_attribute_name}: C{gateway_address} is C{"Gateway address"}."""
    text = attribute.removesuffix("_id").replace("_", " ")
    return text[:1].upper() + text[1:]


def really_changed(old: Any, new: Any) -> bool:
    """C{WhitelistUpdate#really_changed}: nil, [] and {} are all "empty"."""
    if old in (None, [], {}) and new in (None, [], {}):
        return False
    return bool(old != new)


def permitted_attributes(
    old: Mapping[str, Any], new: Mapping[str, Any], caller: Caller
) -> set[str] | None:
    """
    C{Container#validate_change}: the attributes that may change in this update.

    By the new state: Queued, the priority; Locked, also C{runtime_status}, C{log},
    C{lock_count}; Running, also C{gateway_address}, C{output_properties}, the progress
    attributes, C{started_at} on entering, and C{interactive_session_started} while it is still
    false; Complete (from Running), C{finished_at} and the progress attributes; Cancelled, from
    Running C{finished_at} and the progress attributes, from Queued or Locked C{finished_at},
    C{log}, C{runtime_status}, C{cost}.  C{state} itself may always change (subject to
    C{State_transitions}).

    By the caller: while the container I{was} Running, its own token (C{auth_uuid}) may also set
    C{finished_at} but not C{log} nor C{priority}; otherwise only an admin may change anything
    (else C{PermissionDeniedError}); and an admin whose token does not hold the lock
    (C{locked_by_uuid}) may not change the progress attributes.

    @return: the permitted attribute names, or C{None} when the new state is unknown (the
        state check reports it, and the server checks nothing else).
    @raise APIError: 403, when the caller may change nothing.
    """
    permitted = {"state"}
    state, state_was = new.get("state"), old.get("state")
    if state == LOCKED:
        permitted |= {"priority", "runtime_status", "log", "lock_count"}
    elif state == QUEUED:
        permitted |= {"priority"}
    elif state == RUNNING:
        permitted |= {"priority", "output_properties", "gateway_address", *PROGRESS_ATTRS}
        if state != state_was:
            permitted.add("started_at")
        if not old.get("interactive_session_started"):
            permitted.add("interactive_session_started")
    elif state == COMPLETE:
        if state_was == RUNNING:
            permitted |= FINAL_ATTRS | PROGRESS_ATTRS
    elif state == CANCELLED:
        if state_was == RUNNING:
            permitted |= FINAL_ATTRS | PROGRESS_ATTRS
        elif state_was in (QUEUED, LOCKED):
            permitted |= {"finished_at", "log", "runtime_status", "cost"}
    else:
        return None
    own_token = caller.token_uuid == new.get("auth_uuid") or (
        bool(caller.token) and caller.token == new.get("runtime_token")
    )
    if state_was == RUNNING and own_token:
        # "The contained process itself can write final attrs but can't change priority or log."
        permitted |= FINAL_ATTRS
        permitted -= {"log", "priority"}
    elif not caller.is_admin:
        raise permission_denied()
    elif new.get("locked_by_uuid") and new.get("locked_by_uuid") != caller.token_uuid:
        # "When locked, progress fields cannot be updated by the wrong dispatcher, even though
        # it has admin privileges."
        permitted -= PROGRESS_ATTRS
    return permitted


def check_update(
    old: Mapping[str, Any],
    changes: Mapping[str, Any],
    caller: Caller,
    *,
    now: str,
    max_dispatch_attempts: int,
    attributes: frozenset[str],
    output_readable: Callable[[str], bool] = lambda pdh: False,
) -> dict[str, Any]:
    """
    An update of a container record, as the model validates it.

    @param old: the record as stored.
    @param changes: the attributes the client sent (C{resource_attrs}).
    @param now: the server's time, formatted, for C{started_at}/C{finished_at}.
    @param attributes: the model's attribute (column) names; others are unknown attributes.
    @param output_readable: whether the caller may read the collection a new C{output} names.
    @return: the record to save (C{locked_by_uuid} set; C{auth_uuid} left to the server).
    @raise APIError: what the API server answers instead (403 or 422, its messages).
    """
    unknown = [name for name in changes if name not in attributes]
    if unknown:
        raise APIError(
            422,
            f"#<ActiveModel::UnknownAttributeError: unknown attribute '{unknown[0]}' for "
            "Container.>",
        )
    new = {**old, **changes}
    state, state_was = new.get("state"), old.get("state")

    # before_validation: set_timestamps, check_lock, check_unlock
    if state != state_was and state == RUNNING:
        new["started_at"] = new.get("started_at") or now
    if state != state_was and state in FINAL_STATES:
        new["finished_at"] = new.get("finished_at") or now
    if state_was == QUEUED and state == LOCKED:
        if not isinstance(new.get("priority"), int) or new["priority"] <= 0:
            raise lock_failed("cannot lock when priority<=0")
        new["lock_count"] = int(new.get("lock_count") or 0) + 1
    if state_was == LOCKED and state == QUEUED:
        if new.get("locked_by_uuid") != caller.token_uuid:
            raise permission_denied("locked by a different token")
        if int(new.get("lock_count") or 0) >= max_dispatch_attempts:
            # (set_timestamps ran before this: finished_at stays unset, as on the server.)
            new["state"] = state = CANCELLED
            new["runtime_status"] = {
                "error": "Failed to start container.  Cancelled after exceeding "
                f"'Containers.MaxDispatchAttempts' (lock_count={new['lock_count']})"
            }

    errors: list[str] = []
    # validate_runtime_status
    status = new.get("runtime_status")
    if status is not None and not isinstance(status, dict):
        errors.append("Runtime status must be a hash")
    elif isinstance(status, dict):
        for key in RUNTIME_STATUS_STRING_KEYS:
            if key in status and not isinstance(status[key], str):
                errors.append(f"Runtime status '{key}' value must be a string")
    # validate_state_change
    if state != state_was and state not in TRANSITIONS.get(str(state_was), ()):
        errors.append(f"State cannot change from {state_was} to {state}")
    # validate_change
    try:
        permitted = permitted_attributes(old, new, caller)
    except APIError as denied:
        if errors:
            raise APIError(denied.status, *errors) from None
        raise
    if permitted is not None:
        for name in sorted(attributes):
            if name not in permitted and really_changed(old.get(name), new.get(name)):
                errors.append(
                    f"{humanize(name)} cannot be modified in state '{state}' "
                    f"({ruby_inspect(old.get(name))}, {ruby_inspect(new.get(name))})"
                )
    # validate_lock
    holder = caller.token_uuid
    need_lock = (old.get("locked_by_uuid") or holder) if state in (LOCKED, RUNNING) else None
    if "locked_by_uuid" in changes and changes["locked_by_uuid"] != old.get("locked_by_uuid"):
        if changes["locked_by_uuid"] != need_lock:
            errors.append(f"Locked by uuid can only change to {need_lock or ''}")
    new["locked_by_uuid"] = need_lock
    # validate_output
    output = new.get("output")
    if output != old.get("output") and not (isinstance(output, str) and output_readable(output)):
        errors.append("Output collection must exist and be readable by current user.")
    if errors:
        raise APIError(422, *errors)
    if state_was == LOCKED and state == QUEUED:
        # clear_runtime_status_when_queued: "Avoid leaking status messages between different
        # dispatch attempts".
        new["runtime_status"] = {}
    return new
