"""
Tests for L{arvproxy.permissions}: who may connect to which container port, as tables of
credentials, container requests and permission levels, including the ways a token scoped to
one target might be stretched to reach another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from arvproxy import permissions
from arvproxy.backends import (
    CAN_MANAGE,
    CAN_READ,
    CAN_WRITE,
    CANCELLED,
    COMPLETE,
    LOCKED,
    QUEUED,
    RUNNING,
    Container,
    ContainerRequest,
    Credentials,
)
from arvproxy.errors import Forbidden, Gone, NotFound, ProxyError, Unavailable

USER = "zzzzz-tpzed-000000000000001"
OTHER_USER = "zzzzz-tpzed-000000000000002"
CTR = "zzzzz-dz642-0123456789abcde"
OTHER_CTR = "zzzzz-dz642-zzzzzzzzzzzzzzz"
CR = "zzzzz-xvhdp-000000000000001"
CR2 = "zzzzz-xvhdp-000000000000002"
CR3 = "zzzzz-xvhdp-000000000000003"


def creds(*scopes: str, admin: bool = False) -> Credentials:
    return Credentials(
        token_uuid="zzzzz-gj3su-000000000000001",
        user_uuid=USER,
        is_admin=admin,
        scopes=scopes or ("all",),
    )


def request(uuid: str, owner: str = OTHER_USER) -> ContainerRequest:
    return ContainerRequest(
        uuid=uuid, owner_uuid=owner, modified_by_user_uuid=owner, container_uuid=CTR
    )


def outcome(call: Any, *args: Any) -> type[ProxyError] | None:
    """The class of L{ProxyError} C{call} raises, or C{None} when it returns."""
    try:
        call(*args)
    except ProxyError as e:
        return type(e)
    return None


class TableMixin:
    def assertRows(self, rows: list[tuple[Any, Any]], function: Any) -> None:
        """Fail listing every row whose result differs from the expected one."""
        problems = []
        for given, expected in rows:
            actual = function(given)
            if actual != expected:
                problems.append(f"{given!r}: expected {expected!r}, got {actual!r}")
        if problems:
            self.fail(f"{len(problems)} rows failed:\n" + "\n".join(problems))  # type: ignore[attr-defined]


def connect(uuid: str, port: int) -> str:
    return f"CONNECT /arvados/v1/container/{uuid}/{port}"


class ScopeTests(TableMixin, SynchronousTestCase):
    """L{permissions.scope_allows} and L{permissions.check_scope}."""

    def test_scope_table(self) -> None:
        """Scope "all", or CONNECT to exactly this UUID and port; no prefix or method trick."""
        url_and_container = {CR, CTR}
        rows: list[tuple[tuple[tuple[str, ...], set[str], int], bool]] = [
            ((("all",), url_and_container, 80), True),
            ((("GET /arvados/v1/users/current", "all"), url_and_container, 80), True),
            # Exactly the URL's UUID, or the resolved container's.
            (((connect(CR, 80),), url_and_container, 80), True),
            (((connect(CTR, 80),), url_and_container, 80), True),
            (((connect(CTR, 80),), {CTR}, 80), True),
            (((connect(OTHER_CTR, 80), connect(CTR, 80)), url_and_container, 80), True),
            # Wrong port: prefixes and extensions of the number.
            (((connect(CTR, 80),), url_and_container, 8080), False),
            (((connect(CTR, 80),), url_and_container, 8), False),
            (((connect(CTR, 80),), url_and_container, 800), False),
            (((connect(CTR, 8080),), url_and_container, 80), False),
            (((connect(CTR, 8080),), url_and_container, 808), False),
            # Wrong UUID.
            (((connect(OTHER_CTR, 80),), url_and_container, 80), False),
            (((connect(CR2, 80),), url_and_container, 80), False),
            (((connect(CTR[:-1], 80),), url_and_container, 80), False),
            (((connect(CTR.upper(), 80),), url_and_container, 80), False),
            # The CR's scope does not reach the container by its own UUID.
            (((connect(CR, 80),), {CTR}, 80), False),
            # Prefix tricks on the scope text.
            (((connect(CTR, 80) + "/",), url_and_container, 80), False),
            (((connect(CTR, 80) + "80",), url_and_container, 80), False),
            (((connect(CTR, 80) + "/8080",), url_and_container, 8080), False),
            (((connect(CTR, 80) + " ",), url_and_container, 80), False),
            ((("CONNECT /arvados/v1/container/",), url_and_container, 80), False),
            ((("CONNECT /arvados/v1/container",), url_and_container, 80), False),
            ((("CONNECT /arvados/v1/container/" + CTR,), url_and_container, 80), False),
            ((("CONNECT /arvados/v1/container/" + CTR + "/",), url_and_container, 80), False),
            ((("CONNECT /arvados/v1/container/*/80",), url_and_container, 80), False),
            ((("CONNECT /",), url_and_container, 80), False),
            ((("CONNECT /arvados/v1/containers/" + CTR + "/80",), url_and_container, 80), False),
            ((("connect /arvados/v1/container/" + CTR + "/80",), url_and_container, 80), False),
            ((("CONNECT  /arvados/v1/container/" + CTR + "/80",), url_and_container, 80), False),
            # Other methods on the same path.
            ((("GET /arvados/v1/container/" + CTR + "/80",), url_and_container, 80), False),
            ((("POST /arvados/v1/container/" + CTR + "/80",), url_and_container, 80), False),
            ((("GET /arvados/v1/containers/" + CTR,), url_and_container, 80), False),
            # Not "all".
            ((("ALL",), url_and_container, 80), False),
            ((("all ",), url_and_container, 80), False),
            ((("al",), url_and_container, 80), False),
            ((("",), url_and_container, 80), False),
            # No scopes at all.
            (((), url_and_container, 80), False),
            # No UUIDs to match.
            (((connect(CTR, 80),), set(), 80), False),
        ]

        def allowed(row: tuple[tuple[str, ...], set[str], int]) -> bool:
            scopes, uuids, port = row
            credentials = Credentials(
                token_uuid=None, user_uuid=USER, is_admin=False, scopes=scopes
            )
            allows = permissions.scope_allows(credentials, uuids, port)
            raised = outcome(permissions.check_scope, credentials, uuids, port)
            # check_scope and scope_allows always agree.
            assert raised is (None if allows else Forbidden), (allows, raised)
            return allows

        self.assertRows(rows, allowed)

    def test_scope_applies_to_admins(self) -> None:
        """An admin's narrowly scoped token is narrow too."""
        self.assertIs(
            outcome(permissions.check_scope, creds(connect(CTR, 80), admin=True), {CTR}, 8080),
            Forbidden,
        )


class AccessTests(TableMixin, SynchronousTestCase):
    """L{permissions.check_access}."""

    def test_access_table(self) -> None:
        """Admins always; others need write on every request that uses the container."""
        one = [request(CR)]
        two = [request(CR), request(CR2)]
        three = [request(CR), request(CR2), request(CR3)]
        rows: list[tuple[tuple[Any, ...], type[ProxyError] | None]] = [
            # Admins need no permission at all.
            ((True, CR, one, {}), None),
            ((True, CTR, [], {}), None),
            ((True, CTR, two, {CR: None, CR2: CAN_READ}), None),
            # Owner (can_manage) or a can_write link.
            ((False, CR, one, {CR: CAN_MANAGE}), None),
            ((False, CR, one, {CR: CAN_WRITE}), None),
            ((False, CTR, two, {CR: CAN_WRITE, CR2: CAN_MANAGE}), None),
            # Read only: the user may know it exists, but may not connect.
            ((False, CR, one, {CR: CAN_READ}), Forbidden),
            # No permission: its existence stays hidden.
            ((False, CR, one, {CR: None}), NotFound),
            ((False, CR, one, {}), NotFound),
            # Levels for other records do not count.
            ((False, CR, one, {CR2: CAN_MANAGE, CTR: CAN_MANAGE}), NotFound),
            # Unknown level names are not write.
            ((False, CR, one, {CR: "can_login"}), Forbidden),
            ((False, CR, one, {CR: "CAN_WRITE"}), Forbidden),
            ((False, CR, one, {CR: ""}), Forbidden),
            # A container used by several requests: write on every one of them.
            ((False, CTR, two, {CR: CAN_WRITE}), Forbidden),
            ((False, CTR, two, {CR: CAN_WRITE, CR2: None}), Forbidden),
            ((False, CTR, two, {CR: CAN_WRITE, CR2: CAN_READ}), Forbidden),
            ((False, CTR, two, {CR: CAN_MANAGE, CR2: CAN_READ}), Forbidden),
            ((False, CTR, three, {CR: CAN_WRITE, CR2: CAN_WRITE}), Forbidden),
            ((False, CTR, two, {CR: CAN_READ, CR2: CAN_READ}), Forbidden),
            ((False, CTR, two, {CR: None, CR2: None}), NotFound),
            ((False, CTR, two, {}), NotFound),
            # No request uses the container: nothing the user can see.
            ((False, CTR, [], {}), NotFound),
            ((False, CTR, [], {CTR: CAN_MANAGE}), NotFound),
        ]

        def result(row: tuple[Any, ...]) -> type[ProxyError] | None:
            admin, named, requests, levels = row
            credentials = creds(admin=admin)
            return outcome(permissions.check_access, credentials, named, requests, levels)

        self.assertRows(rows, result)

    def test_not_found_reveals_nothing_more(self) -> None:
        """The 404 for an invisible target says the same as for one that does not exist."""
        hidden = self._error(CR, [request(CR)], {CR: None})
        missing = self._error(CR, [], {})
        self.assertIsInstance(hidden, NotFound)
        self.assertEqual((hidden.message, hidden.hint), (missing.message, missing.hint))
        self.assertNotIn(OTHER_USER, hidden.message + hidden.hint)

    def test_forbidden_says_what_is_needed(self) -> None:
        """The 403 tells the person they need write permission, and when another request blocks."""
        alone = self._error(CR, [request(CR)], {CR: CAN_READ})
        shared = self._error(CTR, [request(CR), request(CR2)], {CR: CAN_WRITE})
        self.assertIn("write permission", alone.message)
        self.assertNotIn("also used", alone.message)
        self.assertIn("also used by requests you cannot write", shared.message)
        self.assertNotIn(CR2, shared.message)

    def _error(
        self, named: str, requests: list[ContainerRequest], levels: Mapping[str, str | None]
    ) -> ProxyError:
        try:
            permissions.check_access(creds(), named, requests, levels)
        except ProxyError as e:
            return e
        self.fail("check_access allowed the request")


class RunningTests(TableMixin, SynchronousTestCase):
    """L{permissions.check_running}."""

    def test_state_table(self) -> None:
        """Not yet running or no gateway: 503 with Retry-After; finished: 410; else allowed."""
        rows = [
            ((QUEUED, ""), (Unavailable, 503, 5)),
            ((LOCKED, ""), (Unavailable, 503, 5)),
            ((QUEUED, "10.0.0.5:4000"), (Unavailable, 503, 5)),
            ((RUNNING, ""), (Unavailable, 503, 5)),
            ((COMPLETE, ""), (Gone, 410, None)),
            ((COMPLETE, "10.0.0.5:4000"), (Gone, 410, None)),
            ((CANCELLED, "10.0.0.5:4000"), (Gone, 410, None)),
            (("Weird", "10.0.0.5:4000"), (Unavailable, 503, 5)),
            ((RUNNING, "10.0.0.5:4000"), None),
        ]

        def result(row: tuple[str, str]) -> tuple[type[ProxyError], int, int | None] | None:
            state, gateway = row
            try:
                permissions.check_running(Container(CTR, state=state, gateway_address=gateway))
            except ProxyError as e:
                return type(e), e.status, e.retry_after
            return None

        self.assertRows(rows, result)

    def test_messages_name_the_container(self) -> None:
        """The page says which container and what state it is in."""
        for state in (QUEUED, COMPLETE):
            try:
                permissions.check_running(Container(CTR, state=state))
            except ProxyError as e:
                self.assertIn(CTR, e.message)
                self.assertIn(state, e.message)
            else:
                self.fail(f"{state} was allowed")
