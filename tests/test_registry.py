"""
Tests for L{arvproxy.backends.registry}: the SQLite store, and the thread-pooled L{ICluster}
provider over it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sqlite3
import stat
import threading
from datetime import UTC, datetime
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorFromThreads
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from arvproxy.backends import (
    CANCELLED,
    COMPLETE,
    LOCKED,
    QUEUED,
    RUNNING,
    Container,
    Credentials,
    ICluster,
    User,
)
from arvproxy.backends.embedded import EmbeddedRegistry
from arvproxy.backends.registry import (
    SCHEMA_VERSION,
    RegistryError,
    RegistryStore,
    format_time,
    hash_secret,
    normalize_published_ports,
    parse_time,
    parse_v2_token,
    to_json,
)
from arvproxy.errors import NotFound, Unauthorized, Unavailable

T0 = 1_700_000_000.0
ROOT_TOKEN = "r" * 40
reactor = cast(IReactorFromThreads, _reactor)


class FakeClock:
    """A settable clock: call it for the current Unix time."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StoreTestCase(unittest.TestCase):
    """Helpers: stores on a fresh file per test, closed afterwards."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "registry.sqlite")
        self.clock = FakeClock()

    def open_store(self, path: str | None = None, **kwargs: Any) -> RegistryStore:
        kwargs.setdefault("clock", self.clock)
        store = RegistryStore(path or self.path, "zzzzz", **kwargs)
        self.addCleanup(store.close)
        return store

    def raw(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        return conn


class SchemaTests(StoreTestCase):
    def test_schema_created_on_first_use(self) -> None:
        """The first call creates the tables, sets user_version and turns on WAL."""
        self.open_store().create_user("A")
        conn = self.raw()
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self.assertTrue(
            {"users", "api_client_authorizations", "container_requests", "containers", "links"}
            <= tables
        )

    def test_reopening_keeps_data(self) -> None:
        """Opening an existing registry again keeps its records (schema creation is idempotent)."""
        user = self.open_store().create_user("A")
        self.assertEqual(self.open_store().get_user(user.uuid), user)

    def test_newer_schema_refused(self) -> None:
        """A file with an unknown schema version raises RegistryError rather than guessing."""
        os.makedirs(os.path.dirname(self.path))
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA user_version = 99")
        conn.close()
        self.assertRaises(RegistryError, self.open_store().list_users)

    def test_file_private(self) -> None:
        """The registry file is created readable by its owner only."""
        self.open_store().create_user("A")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_bad_cluster_id(self) -> None:
        """A cluster id that is not five characters a-z 0-9 is a ValueError."""
        for bad in ["", "zzzz", "zzzzzz", "ZZZZZ", "zz-zz"]:
            self.assertRaises(ValueError, RegistryStore, self.path, bad)

    def test_uuid_shapes(self) -> None:
        """New records get Arvados UUIDs with the cluster id and their type's infix."""
        store = self.open_store()
        user = store.create_user("A")
        _, token = store.create_token(user.uuid)
        request = store.create_container_request(user.uuid)
        link = store.grant_permission(user.uuid, request.uuid, "can_read")
        assert request.container_uuid is not None
        for uuid, infix in [
            (user.uuid, "tpzed"),
            (token.uuid, "gj3su"),
            (request.uuid, "xvhdp"),
            (request.container_uuid, "dz642"),
            (link.uuid, "o0j2j"),
        ]:
            self.assertRegex(uuid, f"^zzzzz-{infix}-[a-z0-9]{{15}}$")


class TimeAndJsonTests(unittest.TestCase):
    def test_time_round_trip(self) -> None:
        """format_time writes UTC ISO 8601 with a Z, and parse_time reads it back."""
        moment = datetime.fromtimestamp(T0 + 0.25, UTC)
        text = format_time(moment)
        self.assertEqual(text, "2023-11-14T22:13:20.250000Z")
        self.assertEqual(parse_time(text), moment)

    def test_to_json(self) -> None:
        """to_json gives Arvados kinds, ISO times and lists, and json.dumps accepts it."""
        container = Container(
            uuid="zzzzz-dz642-000000000000001",
            started_at=datetime.fromtimestamp(T0, UTC),
            listening_ports=(80,),
        )
        out = to_json(container)
        self.assertEqual(out["kind"], "arvados#container")
        self.assertEqual(out["started_at"], "2023-11-14T22:13:20.000000Z")
        self.assertEqual(out["listening_ports"], [80])
        self.assertEqual(json.loads(json.dumps(out)), out)
        self.assertEqual(to_json(User(uuid="u", full_name="A"))["kind"], "arvados#user")
        self.assertNotIn("kind", to_json(Credentials(None, "u", True)))

    def test_to_json_rejects_non_records(self) -> None:
        """to_json raises TypeError for anything that is not a record instance."""
        self.assertRaises(TypeError, to_json, {"a": 1})
        self.assertRaises(TypeError, to_json, User)


class TokenTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = self.open_store(system_root_token=ROOT_TOKEN)
        self.user = self.store.create_user("Alice")

    def test_token_shape(self) -> None:
        """A new token is v2/<token uuid>/<secret> with a long random alphanumeric secret."""
        api_token, record = self.store.create_token(self.user.uuid)
        prefix, uuid, secret = api_token.split("/")
        self.assertEqual((prefix, uuid), ("v2", record.uuid))
        self.assertRegex(secret, r"^[A-Za-z0-9]{49,}$")
        self.assertNotEqual(api_token, self.store.create_token(self.user.uuid)[0])

    def test_only_hash_stored(self) -> None:
        """The secret appears nowhere in the database files; only its SHA-256 does."""
        api_token, _ = self.store.create_token(self.user.uuid)
        secret = api_token.split("/")[2]
        stored = b"".join(open(p, "rb").read() for p in glob.glob(self.path + "*"))
        self.assertNotIn(secret.encode(), stored)
        self.assertIn(hash_secret(secret).encode(), stored)

    def test_authenticate(self) -> None:
        """A valid token proves its user, with the token's uuid, scopes and expiry."""
        api_token, record = self.store.create_token(
            self.user.uuid, scopes=["GET /arvados/v1/users/current"], ttl=60
        )
        self.assertEqual(
            self.store.authenticate(api_token),
            Credentials(
                token_uuid=record.uuid,
                user_uuid=self.user.uuid,
                is_admin=False,
                scopes=("GET /arvados/v1/users/current",),
                expires_at=datetime.fromtimestamp(T0 + 60, UTC),
            ),
        )

    def test_default_scope_all(self) -> None:
        """Tokens have scope "all" and no expiry unless asked otherwise."""
        api_token, record = self.store.create_token(self.user.uuid)
        self.assertEqual((record.scopes, record.expires_at), (("all",), None))
        self.assertEqual(self.store.authenticate(api_token).scopes, ("all",))

    def test_admin_flag(self) -> None:
        """An admin user's token proves an admin."""
        admin = self.store.create_user("Root", is_admin=True)
        api_token, _ = self.store.create_token(admin.uuid)
        self.assertTrue(self.store.authenticate(api_token).is_admin)

    def test_malformed_and_wrong_tokens(self) -> None:
        """Every malformed, unknown or wrong token is Unauthorized, never echoing the token."""
        api_token, record = self.store.create_token(self.user.uuid)
        secret = api_token.split("/")[2]
        cases = {
            "empty": "",
            "wrong prefix": f"v1/{record.uuid}/{secret}",
            "no prefix": f"{record.uuid}/{secret}",
            "missing secret": f"v2/{record.uuid}",
            "empty secret": f"v2/{record.uuid}/",
            "extra part": f"{api_token}/x",
            "user uuid": f"v2/{self.user.uuid}/{secret}",
            "malformed uuid": f"v2/zzzzz-gj3su-short/{secret}",
            "bad secret characters": f"v2/{record.uuid}/{secret[:-1]}!",
            "wrong secret": f"v2/{record.uuid}/{secret[:-1]}{'a' if secret[-1] != 'a' else 'b'}",
            "unknown uuid": f"v2/zzzzz-gj3su-000000000000000/{secret}",
            "huge": "v2/" + "a" * 10000,
            "spaces": f" {api_token}",
            "wrong root token": ROOT_TOKEN + "x",
        }
        for case, token in cases.items():
            with self.subTest(case=case):
                e = self.assertRaises(Unauthorized, self.store.authenticate, token)
                self.assertEqual(e.status, 401)
                self.assertNotIn(secret, e.message)
                if token:
                    self.assertNotIn(token, e.message + e.hint)

    def test_parse_v2_token(self) -> None:
        """parse_v2_token splits a well-formed token into its uuid and secret."""
        self.assertEqual(
            parse_v2_token("v2/zzzzz-gj3su-000000000000000/abc123"),
            ("zzzzz-gj3su-000000000000000", "abc123"),
        )

    def test_expired_by_clock(self) -> None:
        """A token works until its expiry by the injected clock, and not from then on."""
        api_token, _ = self.store.create_token(self.user.uuid, ttl=60)
        self.clock.now = T0 + 59.9
        self.store.authenticate(api_token)
        self.clock.now = T0 + 60
        e = self.assertRaises(Unauthorized, self.store.authenticate, api_token)
        self.assertIn("expired", e.message)

    def test_revoke_by_uuid_and_by_token(self) -> None:
        """A revoked token, by uuid or by the whole token, is Unauthorized at once."""
        first, first_record = self.store.create_token(self.user.uuid)
        second, _ = self.store.create_token(self.user.uuid)
        self.assertEqual(self.store.revoke_token(first_record.uuid), first_record)
        self.store.revoke_token(second)
        for token in (first, second):
            self.assertRaises(Unauthorized, self.store.authenticate, token)
        self.assertRaises(NotFound, self.store.get_token, first_record.uuid)

    def test_revoke_unknown_or_malformed(self) -> None:
        """Revoking an unknown token is NotFound; revoking something else is ValueError."""
        self.assertRaises(NotFound, self.store.revoke_token, "zzzzz-gj3su-000000000000000")
        for bad in ["", "garbage", self.user.uuid, "v2/nonsense", "v2/zzzzz-gj3su-0/x"]:
            self.assertRaises(ValueError, self.store.revoke_token, bad)

    def test_inactive_user(self) -> None:
        """The tokens of a deactivated user stop working, and work again on reactivation."""
        api_token, _ = self.store.create_token(self.user.uuid)
        self.store.set_user_active(self.user.uuid, False)
        e = self.assertRaises(Unauthorized, self.store.authenticate, api_token)
        self.assertIn("not active", e.message)
        self.store.set_user_active(self.user.uuid, True)
        self.store.authenticate(api_token)

    def test_system_root_token(self) -> None:
        """The SystemRootToken proves the system user, an admin with scope all and no token uuid."""
        self.assertEqual(
            self.store.authenticate(ROOT_TOKEN),
            Credentials(
                token_uuid=None,
                user_uuid="zzzzz-tpzed-000000000000000",
                is_admin=True,
                scopes=("all",),
            ),
        )

    def test_empty_system_root_token_disabled(self) -> None:
        """With no SystemRootToken configured, no token (not even "") is taken as root."""
        store = self.open_store(system_root_token="")
        for token in ["", ROOT_TOKEN]:
            self.assertRaises(Unauthorized, store.authenticate, token)

    def test_create_token_checks(self) -> None:
        """Tokens need an existing user, at least one scope and a positive ttl."""
        self.assertRaises(NotFound, self.store.create_token, "zzzzz-tpzed-000000000000009")
        self.assertRaises(ValueError, self.store.create_token, self.user.uuid, scopes=[])
        self.assertRaises(ValueError, self.store.create_token, self.user.uuid, scopes=[""])
        for ttl in (0, -1):
            self.assertRaises(ValueError, self.store.create_token, self.user.uuid, ttl=ttl)

    def test_list_tokens(self) -> None:
        """list_tokens lists all tokens or one user's, without secrets."""
        other = self.store.create_user("Bob")
        _, mine = self.store.create_token(self.user.uuid)
        _, theirs = self.store.create_token(other.uuid)
        self.assertEqual(self.store.list_tokens(self.user.uuid), [mine])
        self.assertEqual({t.uuid for t in self.store.list_tokens()}, {mine.uuid, theirs.uuid})


class ContainerRequestTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = self.open_store()
        self.user = self.store.create_user("Alice")

    def test_create_also_queues_container(self) -> None:
        """A new request is Committed, owned by the user, with a Queued container copying it."""
        request = self.store.create_container_request(
            self.user.uuid,
            name="notebook",
            container_image="jupyter",
            command=["jupyter", "lab"],
            environment={"A": "1"},
            cwd="/work",
            published_ports={8888: {"access": "private"}},
        )
        ports = {"8888": {"access": "private", "label": "", "initial_path": ""}}
        self.assertEqual(
            (request.owner_uuid, request.modified_by_user_uuid, request.state, request.name),
            (self.user.uuid, self.user.uuid, "Committed", "notebook"),
        )
        self.assertEqual(request.created_at, datetime.fromtimestamp(T0, UTC))
        self.assertEqual(self.store.get_container_request(request.uuid), request)
        assert request.container_uuid is not None
        container = self.store.get_container(request.container_uuid)
        self.assertEqual(
            container,
            Container(
                uuid=request.container_uuid,
                state=QUEUED,
                container_image="jupyter",
                command=("jupyter", "lab"),
                environment={"A": "1"},
                cwd="/work",
                published_ports=ports,
            ),
        )
        self.assertEqual(request.published_ports, ports)

    def test_unknown_owner(self) -> None:
        """A request for an unknown user is NotFound and creates nothing."""
        self.assertRaises(
            NotFound, self.store.create_container_request, "zzzzz-tpzed-000000000000009"
        )
        self.assertEqual(self.store.list_containers(), [])

    def test_published_ports_normalized(self) -> None:
        """Published ports get the full Arvados shape, with string keys."""
        self.assertEqual(
            normalize_published_ports({"80": {"access": "public", "label": "web"}, 81: None}),
            {
                "80": {"access": "public", "label": "web", "initial_path": ""},
                "81": {"access": "private", "label": "", "initial_path": ""},
            },
        )

    def test_bad_published_ports(self) -> None:
        """Malformed published ports are a ValueError."""
        for bad in [
            {"0": {}},
            {"65536": {}},
            {"http": {}},
            {" 80": {}},
            {True: {}},
            {"80": {"access": "secret"}},
            {"80": {"label": 3}},
            {"80": "private"},
        ]:
            with self.subTest(ports=bad):
                self.assertRaises(ValueError, normalize_published_ports, bad)

    def test_bad_command_or_environment(self) -> None:
        """A command must be strings, and the environment must map strings to strings."""
        self.assertRaises(
            ValueError, self.store.create_container_request, self.user.uuid, command=["a", 1]
        )
        self.assertRaises(
            ValueError, self.store.create_container_request, self.user.uuid, environment={"A": 1}
        )

    def test_container_requests_for(self) -> None:
        """container_requests_for lists the requests using a container, or none."""
        request = self.store.create_container_request(self.user.uuid)
        assert request.container_uuid is not None
        self.assertEqual(self.store.container_requests_for(request.container_uuid), [request])
        self.assertEqual(self.store.container_requests_for("zzzzz-dz642-000000000000000"), [])
        self.assertEqual(self.store.list_container_requests(self.user.uuid), [request])

    def test_get_any_record(self) -> None:
        """get() returns any record type as an Arvados-style dict."""
        request = self.store.create_container_request(self.user.uuid, name="x")
        _, token = self.store.create_token(self.user.uuid)
        link = self.store.grant_permission(self.user.uuid, request.uuid, "can_read")
        assert request.container_uuid is not None
        for uuid, kind in [
            (self.user.uuid, "arvados#user"),
            (token.uuid, "arvados#apiClientAuthorization"),
            (request.uuid, "arvados#containerRequest"),
            (request.container_uuid, "arvados#container"),
            (link.uuid, "arvados#link"),
        ]:
            record = self.store.get(uuid)
            self.assertEqual((record["uuid"], record["kind"]), (uuid, kind))
            json.dumps(record)
        self.assertNotIn("secret_sha256", self.store.get(token.uuid))

    def test_get_unknown(self) -> None:
        """get() of an unknown record is NotFound; of a malformed uuid, ValueError."""
        for uuid in [
            "zzzzz-tpzed-000000000000009",
            "zzzzz-gj3su-000000000000009",
            "zzzzz-xvhdp-000000000000009",
            "zzzzz-dz642-000000000000009",
            "zzzzz-o0j2j-000000000000009",
            "zzzzz-4zz18-000000000000009",
        ]:
            self.assertRaises(NotFound, self.store.get, uuid)
        self.assertRaises(ValueError, self.store.get, "nope")


class UpdateContainerTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = self.open_store()
        user = self.store.create_user("Alice")
        self.request = self.store.create_container_request(user.uuid)
        assert self.request.container_uuid is not None
        self.uuid = self.request.container_uuid

    def test_running_sets_started_at_once(self) -> None:
        """Moving to Running sets started_at from the clock; later updates keep it."""
        self.clock.now = T0 + 10
        container = self.store.update_container(
            self.uuid, state=RUNNING, gateway_address="10.0.0.2:9000"
        )
        started = datetime.fromtimestamp(T0 + 10, UTC)
        self.assertEqual(
            (container.state, container.started_at, container.finished_at),
            (RUNNING, started, None),
        )
        self.assertEqual(container.gateway_address, "10.0.0.2:9000")
        self.clock.now = T0 + 20
        container = self.store.update_container(self.uuid, state=RUNNING, listening_ports=[81, 80])
        self.assertEqual(container.started_at, started)
        self.assertEqual(container.listening_ports, (80, 81))

    def test_complete_sets_finished_at_and_final_request(self) -> None:
        """Moving to Complete sets finished_at and exit_code, and makes its requests Final."""
        self.store.update_container(self.uuid, state=RUNNING)
        self.clock.now = T0 + 30
        container = self.store.update_container(self.uuid, state=COMPLETE, exit_code=0)
        self.assertEqual(
            (container.exit_code, container.finished_at),
            (0, datetime.fromtimestamp(T0 + 30, UTC)),
        )
        self.assertEqual(self.store.get_container_request(self.request.uuid).state, "Final")

    def test_cancel_from_queued(self) -> None:
        """Cancelling a queued container sets finished_at but not started_at."""
        container = self.store.update_container(self.uuid, state=CANCELLED)
        self.assertEqual(container.started_at, None)
        self.assertEqual(container.finished_at, datetime.fromtimestamp(T0, UTC))

    def test_final_state_is_final(self) -> None:
        """A container in a final state cannot change state, but other fields may change."""
        self.store.update_container(self.uuid, state=CANCELLED)
        self.assertRaises(ValueError, self.store.update_container, self.uuid, state=RUNNING)
        container = self.store.update_container(self.uuid, state=CANCELLED, gateway_address="")
        self.assertEqual(container.state, CANCELLED)

    def test_runtime_status(self) -> None:
        """runtime_status is stored as given."""
        container = self.store.update_container(self.uuid, runtime_status={"warning": "slow"})
        self.assertEqual(container.runtime_status, {"warning": "slow"})

    def test_bad_updates(self) -> None:
        """Unknown fields and malformed values are ValueError, and change nothing."""
        bad: list[dict[str, Any]] = [
            {"uuid": "x"},
            {"started_at": "x"},
            {"state": "Sleeping"},
            {"exit_code": "0"},
            {"exit_code": True},
            {"gateway_address": 1},
            {"listening_ports": [0]},
            {"listening_ports": ["80"]},
            {"runtime_status": []},
        ]
        for changes in bad:
            with self.subTest(changes=changes):
                self.assertRaises(ValueError, self.store.update_container, self.uuid, **changes)
        self.assertEqual(self.store.get_container(self.uuid).state, QUEUED)

    def test_unknown_container(self) -> None:
        """Updating or locking an unknown container is NotFound."""
        unknown = "zzzzz-dz642-000000000000009"
        self.assertRaises(NotFound, self.store.update_container, unknown, state=RUNNING)
        self.assertRaises(NotFound, self.store.lock_container, unknown)
        self.assertRaises(NotFound, self.store.get_container, unknown)

    def test_lock_container(self) -> None:
        """lock_container moves Queued to Locked once; later calls return False."""
        self.assertTrue(self.store.lock_container(self.uuid))
        self.assertFalse(self.store.lock_container(self.uuid))
        self.assertEqual(self.store.get_container(self.uuid).state, LOCKED)

    def test_list_containers_by_state(self) -> None:
        """list_containers filters by state."""
        self.assertEqual([c.uuid for c in self.store.list_containers(QUEUED)], [self.uuid])
        self.assertEqual(self.store.list_containers(RUNNING), [])
        self.assertEqual(len(self.store.list_containers()), 1)


class PermissionTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = self.open_store()
        self.owner = self.store.create_user("Owner")
        self.other = self.store.create_user("Other")
        self.request = self.store.create_container_request(self.owner.uuid)
        assert self.request.container_uuid is not None
        self.container_uuid = self.request.container_uuid

    def test_levels(self) -> None:
        """Ownership gives can_manage; otherwise the strongest link; otherwise None."""
        store = self.store
        self.assertEqual(store.permission_level(self.owner.uuid, self.request.uuid), "can_manage")
        self.assertIsNone(store.permission_level(self.other.uuid, self.request.uuid))
        for level, expected in [
            ("can_write", "can_write"),
            ("can_read", "can_write"),
            ("can_manage", "can_manage"),
        ]:
            store.grant_permission(self.other.uuid, self.request.uuid, level)
            self.assertEqual(store.permission_level(self.other.uuid, self.request.uuid), expected)

    def test_container_not_owned(self) -> None:
        """Owning the request does not count for its container; only links do."""
        self.assertIsNone(self.store.permission_level(self.owner.uuid, self.container_uuid))
        self.store.grant_permission(self.other.uuid, self.container_uuid, "can_read")
        self.assertEqual(
            self.store.permission_level(self.other.uuid, self.container_uuid), "can_read"
        )

    def test_link_record(self) -> None:
        """A grant is an Arvados permission link: name is the level, tail user, head target."""
        link = self.store.grant_permission(self.other.uuid, self.request.uuid, "can_read")
        self.assertEqual(
            (link.link_class, link.name, link.tail_uuid, link.head_uuid),
            ("permission", "can_read", self.other.uuid, self.request.uuid),
        )
        self.assertEqual(self.store.get_link(link.uuid), link)
        again = self.store.grant_permission(self.other.uuid, self.request.uuid, "can_read")
        self.assertEqual(again, link)

    def test_grant_checks(self) -> None:
        """Granting needs a real level, user and target."""
        store = self.store
        req = self.request.uuid
        self.assertRaises(ValueError, store.grant_permission, self.other.uuid, req, "can_fly")
        self.assertRaises(
            NotFound, store.grant_permission, "zzzzz-tpzed-000000000000009", req, "can_read"
        )
        self.assertRaises(
            NotFound,
            store.grant_permission,
            self.other.uuid,
            "zzzzz-xvhdp-000000000000009",
            "can_read",
        )
        self.assertRaises(ValueError, store.grant_permission, self.other.uuid, "x", "can_read")

    def test_malformed_target(self) -> None:
        """A malformed target uuid means no permission."""
        self.assertIsNone(self.store.permission_level(self.owner.uuid, "not-a-uuid"))


class SharingTests(StoreTestCase):
    def test_two_connections_see_each_other(self) -> None:
        """Two stores on one file (two processes, in effect) see each other's writes."""
        first, second = self.open_store(), self.open_store()
        user = first.create_user("A")
        self.assertEqual(second.get_user(user.uuid), user)
        request = second.create_container_request(user.uuid)
        assert request.container_uuid is not None
        first.update_container(request.container_uuid, state=RUNNING)
        self.assertEqual(second.get_container(request.container_uuid).state, RUNNING)

    def test_concurrent_writers(self) -> None:
        """Many threads writing at once, on shared and separate stores, never hit a lock error."""
        shared = self.open_store()
        user = shared.create_user("A")
        errors: list[BaseException] = []
        per_thread = 20

        def work(store: RegistryStore) -> None:
            try:
                for _ in range(per_thread):
                    request = store.create_container_request(user.uuid)
                    assert request.container_uuid is not None
                    store.update_container(request.container_uuid, state=RUNNING)
                    store.create_token(user.uuid)
            except BaseException as e:
                errors.append(e)
            finally:
                store.close()

        stores = [shared] * 4 + [RegistryStore(self.path, "zzzzz") for _ in range(4)]
        threads = [threading.Thread(target=work, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(shared.list_containers(RUNNING)), per_thread * len(stores))
        self.assertEqual(len(shared.list_tokens()), per_thread * len(stores))

    def test_lock_race(self) -> None:
        """When many threads race to lock one container, exactly one wins."""
        store = self.open_store()
        request = store.create_container_request(store.create_user("A").uuid)
        results: list[bool] = []

        def lock() -> None:
            own = RegistryStore(self.path, "zzzzz")
            try:
                results.append(own.lock_container(str(request.container_uuid)))
            finally:
                own.close()

        threads = [threading.Thread(target=lock) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), [False] * 7 + [True])


class RecordingStore(RegistryStore):
    """A store that records the thread each authenticate call runs in."""

    threads: list[threading.Thread]

    def authenticate(self, token: str) -> Credentials:
        self.threads.append(threading.current_thread())
        return super().authenticate(token)


class EmbeddedRegistryTests(StoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.store = RecordingStore(self.path, "zzzzz", system_root_token=ROOT_TOKEN)
        self.store.threads = []
        self.registry = EmbeddedRegistry(reactor, self.store)
        self.registry.start()
        self.addCleanup(self.registry.stop)
        self.user = self.store.create_user("Alice")

    def test_provides_icluster(self) -> None:
        """EmbeddedRegistry provides ICluster."""
        self.assertTrue(verifyObject(ICluster, self.registry))

    @inlineCallbacks
    def test_authenticate_in_pool(self) -> Any:
        """authenticate answers through a Deferred, having run outside the reactor thread."""
        api_token, record = self.store.create_token(self.user.uuid)
        d = self.registry.authenticate(api_token)
        self.assertIsInstance(d, Deferred)
        credentials = yield d
        self.assertEqual(credentials.token_uuid, record.uuid)
        self.assertEqual(len(self.store.threads), 1)
        self.assertIsNot(self.store.threads[0], threading.current_thread())

    def test_unauthorized_fails_deferred(self) -> Deferred[Any]:
        """A bad token fails the Deferred with Unauthorized."""
        return self.assertFailure(self.registry.authenticate("v2/x/y"), Unauthorized)

    @inlineCallbacks
    def test_container_calls(self) -> Any:
        """The container methods of ICluster answer through the pool."""
        request = yield self.registry.create_container_request(self.user.uuid, name="n")
        self.assertEqual((yield self.registry.get_container_request(request.uuid)), request)
        self.assertEqual(
            (yield self.registry.container_requests_for(request.container_uuid)), [request]
        )
        self.assertEqual(
            (yield self.registry.list_containers(QUEUED))[0].uuid, request.container_uuid
        )
        self.assertTrue((yield self.registry.lock_container(request.container_uuid)))
        container = yield self.registry.update_container(request.container_uuid, state=RUNNING)
        self.assertEqual(container, (yield self.registry.get_container(request.container_uuid)))
        self.assertEqual(
            (yield self.registry.permission_level(self.user.uuid, request.uuid)), "can_manage"
        )
        record = yield self.registry.get_record(request.container_uuid)
        self.assertEqual(record["state"], RUNNING)
        yield self.assertFailure(
            self.registry.get_container("zzzzz-dz642-000000000000009"), NotFound
        )

    @inlineCallbacks
    def test_admin_calls(self) -> Any:
        """Users, tokens and permissions can be managed through the pool too."""
        user = yield self.registry.create_user("Bob")
        api_token, record = yield self.registry.create_token(user.uuid, ["all"], 60)
        self.assertEqual((yield self.registry.authenticate(api_token)).user_uuid, user.uuid)
        request = self.store.create_container_request(self.user.uuid)
        link = yield self.registry.grant_permission(user.uuid, request.uuid, "can_read")
        self.assertEqual(link.name, "can_read")
        yield self.registry.revoke_token(record.uuid)
        yield self.assertFailure(self.registry.authenticate(api_token), Unauthorized)

    def test_database_error_is_unavailable(self) -> Deferred[Any]:
        """A database failure becomes Unavailable (and is logged)."""

        def broken(uuid: str) -> Container:
            raise sqlite3.OperationalError("database is locked")

        self.patch(self.store, "get_container", broken)
        d = self.assertFailure(
            self.registry.get_container("zzzzz-dz642-000000000000009"), Unavailable
        )
        d.addCallback(
            lambda _: self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        )
        return d

    def test_stopped_is_unavailable(self) -> Deferred[Any]:
        """After stop (which is safe to repeat), calls fail with Unavailable."""
        self.registry.stop()
        self.registry.stop()
        return self.assertFailure(self.registry.authenticate(ROOT_TOKEN), Unavailable)

    def test_not_started_is_unavailable(self) -> Deferred[Any]:
        """Before start, calls fail with Unavailable; stopping an unstarted registry is fine."""
        registry = EmbeddedRegistry(reactor, self.store)
        self.addCleanup(registry.stop)
        return self.assertFailure(registry.authenticate(ROOT_TOKEN), Unavailable)

    @inlineCallbacks
    def test_service_lifecycle(self) -> Any:
        """As a service, the registry starts and stops its pool with startService/stopService."""
        registry = EmbeddedRegistry(
            reactor, self.path, cluster_id="zzzzz", system_root_token=ROOT_TOKEN
        )
        registry.startService()
        try:
            credentials = yield registry.authenticate(ROOT_TOKEN)
            self.assertTrue(credentials.is_admin)
        finally:
            yield registry.stopService()
        yield self.assertFailure(registry.authenticate(ROOT_TOKEN), Unavailable)

    @inlineCallbacks
    def test_data_version(self) -> Any:
        """
        data_version stays put while nothing is written, and moves after any commit: through
        the registry's own pool, or from another store (another process, the admin command).
        """
        first = self.registry.data_version()
        self.assertIsInstance(first, int)
        yield self.registry.get_container_request(
            self.store.create_container_request(self.user.uuid).uuid
        )
        settled = self.registry.data_version()
        self.assertEqual(self.registry.data_version(), settled)
        yield self.registry.create_user("Bob")
        after_pool = self.registry.data_version()
        self.assertNotEqual(after_pool, settled)
        other = self.open_store()
        token, _ = other.create_token(self.user.uuid)
        after_other = self.registry.data_version()
        self.assertNotEqual(after_other, after_pool)
        other.revoke_token(token)
        self.assertNotEqual(self.registry.data_version(), after_other)
        self.registry.stop()
        self.assertIsNone(self.registry.data_version())

    def test_data_version_never_creates_the_file(self) -> None:
        """Without a registry file there is no version (None), and no file is made."""
        path = os.path.join(self.mktemp(), "missing.sqlite")
        registry = EmbeddedRegistry(reactor, path, cluster_id="zzzzz")
        self.addCleanup(registry.stop)
        self.assertIsNone(registry.data_version())
        self.assertFalse(os.path.exists(path))

    def test_path_needs_cluster_id(self) -> None:
        """Opening by path without a cluster id is a ValueError."""
        self.assertRaises(ValueError, EmbeddedRegistry, reactor, self.path)

    def test_uuid_pattern_helper(self) -> None:
        """Sanity: the system user uuid used by root credentials is a well-formed tpzed UUID."""
        self.assertTrue(
            re.fullmatch(r"zzzzz-tpzed-0{15}", self.store.authenticate(ROOT_TOKEN).user_uuid)
        )
