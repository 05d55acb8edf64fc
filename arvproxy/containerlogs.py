"""
What a node keeps of each container it runs, in C{ArvProxy.ContainerLogs.Directory}, one
directory per container (C{<Directory>/<container uuid>/}):

  - C{output.log} (and C{output.log.1}, the one before): the container's standard output and
    error as they came, with the gateway's own notes (C{[arvproxy <time>] ...}: started, why it
    could not start, how it ended).  Bounded: when the current file would pass half of
    C{MaxBytes} it becomes C{output.log.1}, replacing the older one, so at most C{MaxBytes}
    are kept.  Files are readable by their owner only (the output may hold anything).
  - C{gateway.lock}: held (C{flock}) by the gateway serving the container while it runs, as
    crunch-run holds C{/var/lock/crunch-run-<uuid>.lock} (C{lib/crunchrun/background.go}), so
    a dispatcher that restarts can tell a container whose gateway still runs from an orphan.

The same directory holds C{dispatcher.lock}, held by the one C{arv-local-dispatcher} of the
registry.  Everything here is blocking file work: the gateway writes from the thread that
reads the container's output; readers (the CLI, the front door) call it in a thread.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from arvproxy.backends import UUID_RE

LOG_NAME = "output.log"
OLD_LOG_NAME = LOG_NAME + ".1"
LOCK_NAME = "gateway.lock"
DISPATCHER_LOCK_NAME = "dispatcher.lock"


class Held(Exception):
    """Someone else holds the lock (the message says who, when it can)."""


def container_directory(directory: str, uuid: str) -> str:
    """
    The directory of container C{uuid}'s files.

    @raise ValueError: C{uuid} is not an Arvados UUID (so it can never name another path).
    """
    if not UUID_RE.match(uuid):
        raise ValueError(f"not an Arvados UUID: {uuid!r}")
    return os.path.join(directory, uuid)


def _make_directory(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


class ContainerLog:
    """
    Appends to one container's C{output.log}, rotating it (see the module's docstring).  Safe
    to use from several threads.

    @param max_bytes: the most kept, both files together.
    @param clock: the time of notes.
    """

    def __init__(
        self,
        directory: str,
        uuid: str,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.path.join(container_directory(directory, uuid), LOG_NAME)
        self._limit = max(1, max_bytes // 2)
        self._clock = clock
        self._lock = threading.Lock()
        self._file: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._file is None:
            _make_directory(os.path.dirname(self.path))
            self._file = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._size = os.fstat(self._file).st_size
        return self._file

    def write(self, data: bytes) -> None:
        """Keep C{data} (rotating first if the current file would grow past its share)."""
        if not data:
            return
        with self._lock:
            fd = self._open()
            if self._size and self._size + len(data) > self._limit:
                os.close(fd)
                self._file = None
                os.replace(self.path, os.path.join(os.path.dirname(self.path), OLD_LOG_NAME))
                fd = self._open()
            data = data[-self._limit :]
            os.write(fd, data)
            self._size += len(data)

    def note(self, text: str) -> None:
        """Keep one line from the gateway, marked as such and with the time."""
        moment = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = " ".join(text.split())
        self.write(f"[arvproxy {moment}] {line}\n".encode("utf-8", "replace"))

    def last_written(self) -> float | None:
        """When the output was last written to (its file's mtime), or C{None} if never."""
        try:
            return os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                os.close(self._file)
                self._file = None


def read_output(directory: str, uuid: str, limit: int | None = None) -> bytes:
    """
    What is kept of container C{uuid}'s output, oldest first (C{b""} when nothing is): at most
    its last C{limit} bytes.

    @raise ValueError: C{uuid} is not an Arvados UUID.
    """
    base = container_directory(directory, uuid)
    chunks = []
    for name in (OLD_LOG_NAME, LOG_NAME):
        try:
            with open(os.path.join(base, name), "rb") as f:
                chunks.append(f.read())
        except FileNotFoundError:
            continue
    data = b"".join(chunks)
    return data if limit is None else data[-limit:]


class OutputFollower:
    """
    Reads what is added to a container's output, across rotations: each L{read} returns what
    was written since the previous one (C{tail -F}).
    """

    def __init__(self, directory: str, uuid: str) -> None:
        base = container_directory(directory, uuid)
        self._current = os.path.join(base, LOG_NAME)
        self._old = os.path.join(base, OLD_LOG_NAME)
        self._inode: int | None = None
        self._offset = 0

    def start_at_end(self) -> None:
        """Skip what is there now (L{read} returns only what comes later)."""
        try:
            stat = os.stat(self._current)
        except FileNotFoundError:
            return
        self._inode, self._offset = stat.st_ino, stat.st_size

    def read_all(self) -> bytes:
        """Everything kept now, oldest first; L{read} then returns what comes after it."""
        return _read_from(self._old, 0) + self.read()

    def read(self) -> bytes:
        out = b""
        try:
            stat = os.stat(self._current)
        except FileNotFoundError:
            return out
        if self._inode is not None and stat.st_ino != self._inode:
            # Rotated: the rest of the file being read is now the old one.
            try:
                if os.stat(self._old).st_ino == self._inode:
                    out += _read_from(self._old, self._offset)
            except FileNotFoundError:
                pass
            self._offset = 0
        self._inode = stat.st_ino
        if stat.st_size < self._offset:
            self._offset = 0
        more = _read_from(self._current, self._offset)
        self._offset += len(more)
        return out + more


def _read_from(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


class FileLock:
    """
    An exclusive C{flock} on a file, held from L{acquire} until L{release} (or the process
    ends: the kernel lets go of it then, however the process died).  The file holds the
    holder's process id, for messages.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """
        @raise Held: another process holds it.
        """
        _make_directory(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" by process {holder}" if holder else ""
            raise Held(f"{self.path} is held{who}") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def is_held(path: str) -> bool:
    """Whether some process holds the C{flock} of L{FileLock} C{path} right now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def gateway_lock(directory: str, uuid: str) -> FileLock:
    """The lock the gateway of container C{uuid} holds while it runs."""
    return FileLock(os.path.join(container_directory(directory, uuid), LOCK_NAME))


def gateway_running(directory: str, uuid: str) -> bool:
    """Whether a gateway of container C{uuid} runs on this node right now."""
    return is_held(os.path.join(container_directory(directory, uuid), LOCK_NAME))
