"""
Read-only commands of C{arvproxy} (C{ls}, C{get}, the C{list}s) never create or write the
registry: a missing file is an error saying so, and an existing one is left exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3

from arvproxy.backends.registry import RegistryStore
from arvproxy.clirun import LOCAL_USER_NAME
from tests.test_cli import CONFIG, CommandTestCase

READ_ONLY = [
    ("ls",),
    ("ls", "--json"),
    ("user", "list"),
    ("token", "list"),
    ("container", "list"),
    ("get", "zzzzz-tpzed-000000000000000"),
]
TOKEN = "ReadOnlyTestRootToken00000000000000000000000"


def digest(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class ReadOnlyCommandTests(CommandTestCase):
    """Look-ups only look."""

    def setUp(self) -> None:
        super().setUp()
        self.config = os.path.join(self.dir, "config.yml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(token=TOKEN))
        self.path = os.path.join(self.dir, "var", "registry.sqlite")

    def test_missing_registry_is_an_error(self) -> None:
        """With no registry file, each read-only command fails saying so, and creates nothing."""
        for argv in READ_ONLY:
            status, out, err = self.run_raw("--config", self.config, *argv)
            self.assertEqual((status, out), (1, ""), argv)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertIn(self.path, err, argv)
            self.assertIn("no such file", err, argv)
            self.assertFalse(os.path.exists(os.path.join(self.dir, "var")), argv)

    def test_existing_registry_unchanged(self) -> None:
        """With a registry, read-only commands change nothing: no local user, no new bytes."""
        store = RegistryStore(self.path, "zzzzz")
        owner = store.create_user("Somebody")
        store.create_container_request(owner.uuid, published_ports={"8080": {}})
        store.close()
        before = digest(self.path)
        for argv in READ_ONLY:
            status, out, err = self.run_raw("--config", self.config, *argv)
            if argv[0] == "get":
                self.assertEqual(status, 1, (argv, err))  # no such user: a look-up that failed
            else:
                self.assertEqual((status, err), (0, ""), argv)
        self.assertIn("No containers", self.run_raw("--config", self.config, "ls")[1])
        # The file is as it was, and no change waits in the write-ahead log either (SQLite
        # may make an empty one for a reader).
        self.assertEqual(digest(self.path), before)
        wal = self.path + "-wal"
        self.assertEqual(os.path.getsize(wal) if os.path.exists(wal) else 0, 0)
        store = RegistryStore(self.path, "zzzzz", read_only=True)
        self.addCleanup(store.close)
        self.assertEqual([u.full_name for u in store.list_users()], ["Somebody"])
        self.assertNotIn(LOCAL_USER_NAME, [u.full_name for u in store.list_users()])

    def test_read_only_store_refuses_writes(self) -> None:
        """A read-only store cannot change anything, even when asked to."""
        RegistryStore(self.path, "zzzzz").create_user("Existing")
        store = RegistryStore(self.path, "zzzzz", read_only=True)
        self.addCleanup(store.close)
        with self.assertRaises(sqlite3.OperationalError):
            store.create_user("Intruder")
        self.assertEqual([u.full_name for u in store.list_users()], ["Existing"])

    def test_writing_commands_still_create(self) -> None:
        """Commands that change the registry still create it when it does not exist yet."""
        status, out, err = self.run_raw("--config", self.config, "user", "create", "--name", "A")
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(os.path.exists(self.path))
