"""
The seed's two phase-2 policies, in the front door and the embedded registry: no reuse after a
connection (the first connection marks the container C{interactive_session_started}), and
prohibited connections (C{ArvProxy.ConnectionsEnabled: false} for the whole cluster, or a
container request's property C{"arvproxy:connections": "prohibited"}), admins included.
The same through the Arvados backend is in L{tests.test_arvados_front_door}, and through the
real plugins in L{tests.test_arvados_chain}.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
from dataclasses import replace
from typing import Any, cast

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from arvproxy import cli, permissions
from arvproxy.backends import RUNNING, ContainerRequest
from arvproxy.backends.registry import _SCHEMA, RegistryError, RegistryStore
from arvproxy.controller.proxy import Controller
from arvproxy.errors import Forbidden, Unavailable
from arvproxy.httpserver import ProxySite
from arvproxy.testing import MemoryClient, request_bytes
from tests.test_controller import NAVIGATE, ControllerTestCase, cookie

PROHIBITED = {permissions.CONNECTIONS_PROPERTY: permissions.PROHIBITED}


class RuleTests(SynchronousTestCase):
    def test_prohibits_connections(self) -> None:
        """Only the property's exact value prohibits; any request of the container can."""
        table: list[tuple[dict[str, Any], bool]] = [
            ({}, False),
            (PROHIBITED, True),
            ({permissions.CONNECTIONS_PROPERTY: "allowed"}, False),
            ({permissions.CONNECTIONS_PROPERTY: True}, False),
            ({"other": "prohibited"}, False),
        ]
        for properties, prohibited in table:
            cr = ContainerRequest("zzzzz-xvhdp-000000000000001", "o", "o", properties=properties)
            self.assertEqual(permissions.prohibits_connections(cr), prohibited, properties)
        free = ContainerRequest("zzzzz-xvhdp-000000000000001", "o", "o")
        closed = replace(free, uuid="zzzzz-xvhdp-000000000000002", properties=PROHIBITED)
        permissions.check_connections_allowed([free])
        with self.assertRaises(Forbidden) as caught:
            permissions.check_connections_allowed([free, closed])
        self.assertIn(closed.uuid, caught.exception.message)


class ProhibitedRequestTests(ControllerTestCase):
    def setUp(self) -> None:
        super().setUp()
        c = self.cluster
        self.closed_container = c.add_container(
            gateway_address="127.0.0.1:9002",
            published_ports={"8888": {"access": "public", "label": "web", "initial_path": ""}},
        )
        self.closed = c.add_container_request(
            self.alice.uuid,
            self.closed_container.uuid,
            properties=PROHIBITED,
            published_ports={"8888": {"access": "public", "label": "web", "initial_path": ""}},
        )
        # Carol's own request, reusing the same container, says nothing.
        self.reused = c.add_container_request(self.carol.uuid, self.closed_container.uuid)

    def test_nobody_connects(self) -> None:
        """
        Nobody reaches a container one of its requests prohibits connections to, by any of its
        URLs: owner, admin, SystemRootToken, another request's owner, anyone on a public port
        (403); on a private port, someone who cannot see it still gets 404.
        """
        table = [
            ("alice", self.tokens["alice"], self.closed.uuid, 403),
            ("alice, by container", self.tokens["alice"], self.closed_container.uuid, 403),
            ("admin", self.tokens["admin"], self.closed.uuid, 403),
            ("root", "RootTokenForTheseTests0123456789abcdefgh", self.closed.uuid, 403),
            ("carol, her own request", self.tokens["carol"], self.reused.uuid, 403),
            ("anonymous, public port", None, self.closed.uuid, 403),
            ("dave, public port", self.tokens["dave"], self.closed.uuid, 403),
        ]
        got = [
            (name, self.send(self.host(uuid), b"/", token, NAVIGATE).status)
            for name, token, uuid, _ in table
        ]
        hidden = self.send(self.host(self.closed.uuid, 9999), b"/", self.tokens["dave"])
        got.append(("dave, private port", hidden.status))
        table.append(("dave, private port", None, "", 404))
        self.assertEqual(got, [(name, status) for name, _, _, status in table])
        self.assertEqual(self.gateways.calls, [])
        page = self.send(self.host(self.closed.uuid), b"/", self.tokens["alice"], NAVIGATE)
        self.assertIn(b"prohibited", page.body)
        self.assertIn(self.closed.uuid.encode(), page.body)

    def test_others_still_connect(self) -> None:
        """Containers whose requests say nothing are served as before."""
        self.get_ok(self.cr.uuid, self.tokens["alice"])


class ServicesOffTests(ControllerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config = replace(self.config, connections_enabled=False)
        self.site = ProxySite(
            Controller(self.clock, self.config, self.cluster, cast(Any, self.gateways)), self.clock
        )

    def test_every_service_refused(self) -> None:
        """With ConnectionsEnabled false every container host answers 403, admins included."""
        for name in ("alice", "admin"):
            for uuid in (self.cr.uuid, self.container.uuid):
                response = self.send(self.host(uuid), b"/", self.tokens[name], NAVIGATE)
                self.assertError(response, 403)
                self.assertIn(b"turned off", response.body)
        response = self.send(self.host(self.cr.uuid), b"/")
        self.assertError(response, 403)
        self.assertEqual(self.gateways.calls, [])
        self.assertEqual(self.cluster.calls, [])

    def test_page_says_so(self) -> None:
        """The services page still loads, and its Connect answers 403."""
        self.assertEqual(self.send(b"containers.example.com", b"/").status, 200)
        response = self.send(
            b"containers.example.com",
            b"/api/connect",
            self.tokens["alice"],
            [
                (b"Sec-Fetch-Site", b"same-origin"),
                (b"X-Requested-With", b"arvproxy"),
                (b"Content-Type", b"application/json"),
            ],
            method=b"POST",
            body=json.dumps({"uuid": self.cr.uuid, "port": 8888}).encode(),
        )
        self.assertError(response, 403)
        self.assertIn(b"turned off", response.body)


class SessionMarkTests(ControllerTestCase):
    def test_first_connection_marks_the_container(self) -> None:
        """The first request that reaches a container marks it, once; later ones write nothing."""
        self.assertFalse(self.container.interactive_session_started)
        self.get_ok(self.cr.uuid, self.tokens["alice"])
        self.assertEqual(
            self.cluster.called("update_container"),
            [(self.container.uuid, {"interactive_session_started": True})],
        )
        self.assertTrue(self.cluster.containers[self.container.uuid].interactive_session_started)
        for name in ("alice", "carol", "admin"):
            self.get_ok(self.cr.uuid, self.tokens[name])
        self.assertEqual(len(self.cluster.called("update_container")), 1)

    def test_refused_requests_mark_nothing(self) -> None:
        """Requests that are refused (401, 403, 404) never mark the container."""
        for token, status in [(None, 401), (self.tokens["bob"], 403), (self.tokens["dave"], 404)]:
            self.assertEqual(self.send(self.host(self.cr.uuid), b"/", token).status, status)
        self.assertEqual(self.cluster.called("update_container"), [])

    def test_unrecorded_connection_refused(self) -> None:
        """When the mark cannot be written, the request is refused (503), and nothing is sent."""
        self.cluster.update_container = lambda uuid, **changes: defer.fail(  # type: ignore[method-assign]
            Unavailable("down")
        )
        self.assertError(self.send(self.host(self.cr.uuid), b"/", self.tokens["alice"]), 503)
        self.assertEqual(self.gateways.calls, [])

    def test_concurrent_first_requests_share_one_write(self) -> None:
        """Requests that arrive while the mark is written wait for that one write."""
        pending: list[defer.Deferred[Any]] = []
        real = self.cluster.update_container

        def slow(uuid: str, **changes: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            pending.append(d)
            d.addCallback(lambda _: real(uuid, **changes))
            return d

        self.cluster.update_container = slow  # type: ignore[method-assign]
        clients = []
        for _ in range(3):
            client = MemoryClient(self.site)
            client.send(
                request_bytes(
                    b"GET", b"/", [cookie(self.tokens["alice"])], host=self.host(self.cr.uuid)
                )
            )
            clients.append(client)
        self.assertEqual(len(pending), 1)
        self.assertEqual(self.gateways.calls, [])
        pending[0].callback(None)
        self.assertEqual([c.response().status for c in clients], [200, 200, 200])
        self.assertEqual(len(self.gateways.calls), 3)


class RegistryRulesTests(TestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "registry.sqlite")
        self.store = RegistryStore(self.path, "zzzzz")
        self.addCleanup(self.store.close)

    def test_session_flag_rules(self) -> None:
        """The flag is set only while Running, once; it can never be cleared (as in Arvados)."""
        user = self.store.create_user("U").uuid
        cr = self.store.create_container_request(user)
        uuid = cr.container_uuid
        assert uuid is not None
        with self.assertRaises(ValueError):
            self.store.update_container(uuid, interactive_session_started=True)
        self.store.update_container(uuid, state=RUNNING)
        marked = self.store.update_container(uuid, interactive_session_started=True)
        self.assertTrue(marked.interactive_session_started)
        self.store.update_container(uuid, interactive_session_started=True)
        for bad in (False, 1, "yes"):
            with self.assertRaises(ValueError):
                self.store.update_container(uuid, interactive_session_started=bad)
        self.assertTrue(self.store.get_container(uuid).interactive_session_started)

    def test_properties_stored(self) -> None:
        """A request's properties are kept; a request gets a container of its own (no reuse)."""
        user = self.store.create_user("U").uuid
        one = self.store.create_container_request(user, properties=PROHIBITED)
        two = self.store.create_container_request(user)
        self.assertEqual(self.store.get_container_request(one.uuid).properties, PROHIBITED)
        self.assertEqual(self.store.get_container_request(two.uuid).properties, {})
        self.assertNotEqual(one.container_uuid, two.container_uuid)
        with self.assertRaises(ValueError):
            self.store.create_container_request(user, properties={1: "x"})  # type: ignore[dict-item]

    def test_upgrade_from_version_1(self) -> None:
        """A registry written before the two new fields is upgraded when opened; nothing is lost."""
        self.store.close()
        v1 = _SCHEMA.replace(
            ",\n    interactive_session_started INTEGER NOT NULL DEFAULT 0", ""
        ).replace(",\n    properties TEXT NOT NULL DEFAULT '{}'", "")
        self.assertNotIn("properties", v1)
        conn = sqlite3.connect(self.path)
        conn.executescript(v1)
        conn.execute(
            "INSERT INTO users VALUES ('zzzzz-tpzed-000000000000001', 'Old', 0, 1, "
            "'2024-01-01T00:00:00.000000Z', '2024-01-01T00:00:00.000000Z')"
        )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
        conn.close()
        # A read-only look-up (arvproxy ls) cannot upgrade it, and says what will.
        reader = RegistryStore(self.path, "zzzzz", read_only=True)
        self.addCleanup(reader.close)
        with self.assertRaisesRegex(RegistryError, "older arvproxy.*start the front door"):
            reader.list_users()
        store = RegistryStore(self.path, "zzzzz")
        self.addCleanup(store.close)
        self.assertEqual(store.get_user("zzzzz-tpzed-000000000000001").full_name, "Old")
        cr = store.create_container_request("zzzzz-tpzed-000000000000001", properties=PROHIBITED)
        assert cr.container_uuid is not None
        self.assertFalse(store.get_container(cr.container_uuid).interactive_session_started)
        self.assertEqual(store.get_container_request(cr.uuid).properties, PROHIBITED)
        conn = sqlite3.connect(self.path)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 2)
        conn.close()


class CommandTests(TestCase):
    def test_no_connections_option(self) -> None:
        """container-request create --no-connections writes the property that prohibits them."""
        directory = self.mktemp()
        os.makedirs(directory)
        registry = os.path.join(directory, "registry.sqlite")
        store = RegistryStore(registry, "zzzzz")
        self.addCleanup(store.close)
        user = store.create_user("U").uuid
        base = ["--registry", registry, "--cluster-id", "zzzzz"]
        for extra, want in [(["--no-connections"], PROHIBITED), ([], {})]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = cli.main(
                    [*base, "container-request", "create", "--user", user, "--port", "80", *extra]
                )
            self.assertEqual(code, 0)
            record = json.loads(out.getvalue())
            self.assertEqual(record["properties"], want)
            self.assertEqual(store.get_container_request(record["uuid"]).properties, want)


class SettingTests(SynchronousTestCase):
    def test_connections_enabled(self) -> None:
        """ConnectionsEnabled is true by default, may be false, and anything else names the key."""
        from arvproxy.config import ConfigError, parse_config

        def parse(**arvproxy: Any) -> Any:
            document = {
                "Clusters": {
                    "zzzzz": {
                        "SystemRootToken": "x" * 40,
                        "Services": {
                            "ContainerWebServices": {"ExternalURL": "https://*.c.example.com"}
                        },
                        "ArvProxy": arvproxy,
                    }
                }
            }
            return parse_config(document, "/etc/arvados/config.yml")

        self.assertTrue(parse().connections_enabled)
        self.assertFalse(parse(ConnectionsEnabled=False).connections_enabled)
        with self.assertRaises(ConfigError) as caught:
            parse(ConnectionsEnabled="no")
        self.assertIn("Clusters.zzzzz.ArvProxy.ConnectionsEnabled", str(caught.exception))
