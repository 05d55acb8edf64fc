"""
Tests for how the embedded registry treats its file when several processes share it (issue 16,
hole 0): no process may drop its own SQLite locks, and none may stay on a copy of the registry
that the others no longer use (a file replaced or removed under it).
"""

from __future__ import annotations

import glob
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IReactorFromThreads
from twisted.trial import unittest

from arvproxy.backends.embedded import EmbeddedRegistry
from arvproxy.backends.registry import RegistryError, RegistryStore
from arvproxy.config import parse_config
from arvproxy.errors import Unauthorized, Unavailable
from arvproxy.service import check_registry

reactor = cast(IReactorFromThreads, _reactor)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def admin(path: str, *args: str) -> str:
    """Run the real C{arvproxy} command on the registry at C{path}, in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "arvproxy.cli", "--registry", path, "--cluster-id", "zzzzz", *args],
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"arvproxy {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


def in_thread(f: Any) -> Any:
    """
    Call C{f} in a new thread (a new connection of the store) and return its result, or raise
    its exception.
    """
    results: list[Any] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(f())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


class RegistryFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.path = os.path.join(self.directory, "registry.sqlite")

    def open_store(self) -> RegistryStore:
        store = RegistryStore(self.path, "zzzzz")
        self.addCleanup(store.close)
        return store

    def move_away(self) -> None:
        """Rename the registry and its -wal and -shm, as an operator moving it aside would."""
        for name in glob.glob(self.path + "*"):
            os.rename(name, name.replace("registry.sqlite", "old.sqlite"))

    def test_other_threads_keep_the_locks(self) -> None:
        """A connection in a new thread keeps the process's locks: later changes are still seen."""
        store = self.open_store()
        user = store.create_user("A")
        token, _ = store.create_token(user.uuid)
        self.assertEqual(in_thread(lambda: store.authenticate(token)).user_uuid, user.uuid)
        admin(self.path, "user", "list")
        admin(self.path, "token", "revoke", token)
        self.assertRaises(Unauthorized, store.authenticate, token)
        self.assertRaises(Unauthorized, in_thread, lambda: store.authenticate(token))
        self.assertTrue(os.path.exists(self.path + "-wal"))

    def test_journal_mode_cannot_change_under_a_running_process(self) -> None:
        """No other process can take a registry in use out of WAL mode (deleting its -wal)."""
        store = self.open_store()
        store.create_user("A")
        in_thread(store.list_users)
        switch = (
            "import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], timeout=0.1, isolation_level=None)\n"
            "try:\n"
            "    print(c.execute('PRAGMA journal_mode = DELETE').fetchone()[0])\n"
            "except sqlite3.OperationalError as e:\n"
            "    print('refused:', e)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", switch, self.path], capture_output=True, text=True, check=True
        )
        self.assertNotEqual(done.stdout.strip(), "delete")
        self.assertTrue(os.path.exists(self.path + "-wal"))

    def test_data_version_after_other_processes(self) -> None:
        """The front door's data_version moves on a change made after another process left."""
        store = self.open_store()
        user = store.create_user("A")
        token, _ = store.create_token(user.uuid)
        registry = EmbeddedRegistry(reactor, store)
        registry.start()
        self.addCleanup(registry.stop)
        before = registry.data_version()
        in_thread(lambda: store.authenticate(token))
        admin(self.path, "user", "list")
        settled = registry.data_version()
        admin(self.path, "token", "revoke", token)
        self.assertNotEqual(registry.data_version(), settled)
        self.assertIsNotNone(before)

    def test_replaced_file_is_followed(self) -> None:
        """A store whose file is replaced uses the new one, in every thread; data_version too."""
        store = self.open_store()
        old_user = store.create_user("Old")
        registry = EmbeddedRegistry(reactor, store)
        registry.start()
        self.addCleanup(registry.stop)
        self.assertIsNotNone(registry.data_version())
        self.move_away()
        new_user = self.open_store().create_user("New")
        self.assertEqual([u.uuid for u in store.list_users()], [new_user.uuid])
        self.assertEqual([u.uuid for u in in_thread(store.list_users)], [new_user.uuid])
        self.assertIsNone(registry.data_version())
        self.assertIsInstance(registry.data_version(), int)
        # The moved file kept what was written to it, and nothing more.
        moved = RegistryStore(os.path.join(self.directory, "old.sqlite"), "zzzzz")
        self.addCleanup(moved.close)
        self.assertEqual([u.uuid for u in moved.list_users()], [old_user.uuid])

    def test_written_after_replacement_lands_in_new_file(self) -> None:
        """A write made after the file was replaced goes to the new file, not the old copy."""
        store = self.open_store()
        store.create_user("Old")
        self.move_away()
        self.open_store().create_user("New")
        written = store.create_user("Written")
        self.assertIn(written.uuid, admin(self.path, "user", "list"))

    def test_removed_file_is_refused_until_replaced(self) -> None:
        """A removed registry file is an error (no orphan, no empty one) until one is back."""
        store = self.open_store()
        store.create_user("Old")
        registry = EmbeddedRegistry(reactor, store)
        registry.start()
        self.addCleanup(registry.stop)
        self.assertIsNotNone(registry.data_version())
        for name in glob.glob(self.path + "*"):
            os.unlink(name)
        self.assertRaises(RegistryError, store.list_users)
        self.assertFalse(os.path.exists(self.path))
        self.assertIsNone(registry.data_version())
        user = self.open_store().create_user("New")
        self.assertEqual([u.uuid for u in store.list_users()], [user.uuid])

    def test_removed_file_is_unavailable_in_the_reactor(self) -> Any:
        """Through EmbeddedRegistry a removed registry file is Unavailable (503)."""
        store = self.open_store()
        store.create_user("Old")
        registry = EmbeddedRegistry(reactor, store)
        registry.start()
        self.addCleanup(registry.stop)
        for name in glob.glob(self.path + "*"):
            os.unlink(name)
        d = self.assertFailure(registry.list_containers(), Unavailable)
        return d.addCallback(lambda _: self.assertTrue(self.flushLoggedErrors(RegistryError)))

    def test_created_private(self) -> None:
        """A new registry file is made owner-only, and with it its -wal and -shm."""
        self.open_store().create_user("A")
        for name in (self.path, self.path + "-wal", self.path + "-shm"):
            self.assertEqual(stat.S_IMODE(os.stat(name).st_mode), 0o600, name)

    def test_created_private_without_mknod(self) -> None:
        """Where mknod is refused the file is still made owner-only, with no stray file left."""

        def refuse(*args: Any) -> None:
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "mknod", refuse)
        self.open_store().create_user("A")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(
            sorted(os.listdir(self.directory)),
            ["registry.sqlite", "registry.sqlite-shm", "registry.sqlite-wal"],
        )

    def test_existing_file_kept(self) -> None:
        """Opening an existing registry neither recreates it nor changes its mode."""
        store = self.open_store()
        user = store.create_user("A")
        store.close()
        os.chmod(self.path, 0o640)
        identity = os.stat(self.path).st_ino
        self.assertEqual(self.open_store().get_user(user.uuid), user)
        self.assertEqual(os.stat(self.path).st_ino, identity)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)

    def test_check(self) -> None:
        """check() opens (and creates) the registry now, and raises when it cannot."""
        self.open_store().check()
        self.assertTrue(os.path.exists(self.path))
        blocked = os.path.join(self.directory, "a-file")
        with open(blocked, "w"):
            pass
        bad = RegistryStore(os.path.join(blocked, "registry.sqlite"), "zzzzz")
        self.assertRaises(OSError, bad.check)
        garbage = os.path.join(self.directory, "garbage.sqlite")
        with open(garbage, "wb") as f:
            f.write(b"this is not a database" * 100)
        self.assertRaises(sqlite3.DatabaseError, RegistryStore(garbage, "zzzzz").check)


class CheckRegistryTests(unittest.TestCase):
    """L{service.check_registry}: the start-up check of the front door's registry."""

    def config(self, registry: str, backend: str = "embedded") -> Any:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        document = {
            "Clusters": {
                "zzzzz": {
                    "SystemRootToken": "x" * 40,
                    "Services": {
                        "ContainerWebServices": {"ExternalURL": "https://*.containers.example"},
                        "Controller": {"ExternalURL": "https://zzzzz.example.com"},
                    },
                    "ArvProxy": {"Backend": backend, "Registry": registry},
                }
            }
        }
        with open(os.path.join(directory, "a-file"), "w"):
            pass
        return parse_config(document, os.path.join(directory, "config.yml"))

    def test_usable_registry_passes(self) -> None:
        """A registry that can be opened (here, created) passes the check."""
        config = self.config("registry.sqlite")
        check_registry(config)
        self.assertTrue(os.path.exists(config.registry_path))

    def test_unusable_registry_exits_naming_the_key(self) -> None:
        """One that cannot be opened raises SystemExit with one line: file, key and reason."""
        config = self.config("a-file/registry.sqlite")
        error = self.assertRaises(SystemExit, check_registry, config)
        self.assertEqual(
            str(error.code),
            f"{config.source}: Clusters.zzzzz.ArvProxy.Registry: cannot use the registry: "
            f"{os.path.dirname(config.registry_path)}: Not a directory",
        )

    def test_arvados_backend_not_checked(self) -> None:
        """With the Arvados backend there is no registry file to check."""
        check_registry(self.config("a-file/registry.sqlite", backend="arvados"))
