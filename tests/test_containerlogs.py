"""
Tests for L{arvproxy.containerlogs}: a container's kept output (bounded, rotated, followed
across rotations) and the locks that say a gateway or a dispatcher runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial import unittest

from arvproxy.containerlogs import (
    ContainerLog,
    FileLock,
    Held,
    OutputFollower,
    container_directory,
    gateway_lock,
    gateway_running,
    read_output,
)

UUID = "zzzzz-dz642-0123456789abcde"


class ContainerLogTests(unittest.TestCase):
    """Output is kept in order, bounded, readable by its owner only."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())

    def test_kept_in_order(self) -> None:
        """Writes and notes come back in order; notes are marked and carry the time."""
        log = ContainerLog(self.directory, UUID, 1024 * 1024, clock=lambda: 0.0)
        self.addCleanup(log.close)
        log.write(b"hello\n")
        log.note("the container   exited\nwith code 3")
        log.write(b"")
        self.assertEqual(
            read_output(self.directory, UUID),
            b"hello\n[arvproxy 1970-01-01T00:00:00Z] the container exited with code 3\n",
        )
        mode = os.stat(os.path.join(self.directory, UUID, "output.log")).st_mode & 0o777
        self.assertEqual(mode, 0o600)
        self.assertEqual(os.stat(os.path.join(self.directory, UUID)).st_mode & 0o777, 0o700)

    def test_bounded_and_rotated(self) -> None:
        """However much is written, at most max_bytes are kept, the newest last."""
        log = ContainerLog(self.directory, UUID, 1000)
        self.addCleanup(log.close)
        lines = [b"%05d-----\n" % n for n in range(1000)]  # 11 bytes each, 11 kB in all
        for line in lines:
            log.write(line)
        kept = read_output(self.directory, UUID)
        self.assertLessEqual(len(kept), 1000)
        self.assertGreaterEqual(len(kept), 500)
        self.assertTrue(b"".join(lines).endswith(kept))
        names = sorted(os.listdir(os.path.join(self.directory, UUID)))
        self.assertEqual(names, ["output.log", "output.log.1"])
        self.assertEqual(read_output(self.directory, UUID, limit=22), b"00998-----\n00999-----\n")

    def test_huge_write(self) -> None:
        """One write larger than the bound keeps its end."""
        log = ContainerLog(self.directory, UUID, 1000)
        self.addCleanup(log.close)
        log.write(b"x" * 5000 + b"END\n")
        kept = read_output(self.directory, UUID)
        self.assertTrue(kept.endswith(b"END\n"))
        self.assertLessEqual(len(kept), 1000)

    def test_reopened_appends(self) -> None:
        """A second gateway (re-attached) appends to what the first kept."""
        first = ContainerLog(self.directory, UUID, 4096)
        first.write(b"one\n")
        first.close()
        second = ContainerLog(self.directory, UUID, 4096)
        self.addCleanup(second.close)
        second.write(b"two\n")
        self.assertEqual(read_output(self.directory, UUID), b"one\ntwo\n")
        self.assertIsNotNone(second.last_written())

    def test_nothing_kept(self) -> None:
        """A container with no output reads as empty."""
        self.assertEqual(read_output(self.directory, UUID), b"")

    def test_uuid_checked(self) -> None:
        """A name that is not a UUID never becomes a path."""
        for bad in ("../etc", "zzzzz-dz642-0123456789abcde/..", "", "a/b"):
            self.assertRaises(ValueError, container_directory, self.directory, bad)
            self.assertRaises(ValueError, read_output, self.directory, bad)


class FollowerTests(unittest.TestCase):
    """Following the output sees every byte once, across rotations."""

    def test_follow_across_rotation(self) -> None:
        """Everything written after the follower starts is read exactly once, in order."""
        directory = os.path.abspath(self.mktemp())
        log = ContainerLog(directory, UUID, 100)
        self.addCleanup(log.close)
        log.write(b"before\n")
        follower = OutputFollower(directory, UUID)
        follower.start_at_end()
        seen = b""
        written = b""
        for n in range(40):
            line = b"line %02d\n" % n
            log.write(line)
            written += line
            if n % 3 == 0:
                seen += follower.read()
        seen += follower.read()
        self.assertEqual(seen, written)
        self.assertEqual(follower.read(), b"")

    def test_follow_from_start(self) -> None:
        """A follower that does not skip reads what is there, then what comes."""
        directory = os.path.abspath(self.mktemp())
        follower = OutputFollower(directory, UUID)
        self.assertEqual(follower.read(), b"")
        log = ContainerLog(directory, UUID, 4096)
        self.addCleanup(log.close)
        log.write(b"a\n")
        self.assertEqual(follower.read(), b"a\n")
        log.write(b"b\n")
        self.assertEqual(follower.read(), b"b\n")


class LockTests(unittest.TestCase):
    """A gateway's lock says whether it runs, and goes when its process dies."""

    def test_held_in_process(self) -> None:
        """Held while acquired; a second holder is refused; released, it is free."""
        directory = os.path.abspath(self.mktemp())
        self.assertFalse(gateway_running(directory, UUID))
        lock = gateway_lock(directory, UUID)
        lock.acquire()
        self.assertTrue(gateway_running(directory, UUID))
        other = gateway_lock(directory, UUID)
        error = self.assertRaises(Held, other.acquire)
        self.assertIn(f"process {os.getpid()}", str(error))
        lock.release()
        self.assertFalse(gateway_running(directory, UUID))
        other.acquire()
        other.release()

    def test_dies_with_process(self) -> None:
        """A lock held by a process that was killed is free again."""
        directory = os.path.abspath(self.mktemp())
        path = os.path.join(directory, "dispatcher.lock")
        script = (
            "import sys, time; from arvproxy.containerlogs import FileLock; "
            f"FileLock({path!r}).acquire(); print('held', flush=True); time.sleep(60)"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        assert child.stdout is not None
        self.assertEqual(child.stdout.readline(), b"held\n")
        self.assertRaises(Held, FileLock(path).acquire)
        child.kill()
        child.wait()
        lock = FileLock(path)
        lock.acquire()
        lock.release()
