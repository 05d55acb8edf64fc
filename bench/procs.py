"""
The processes a benchmark starts: each in a session of its own (so a Ctrl-C in the terminal
reaches only the benchmark, which then stops them in order), with its output in a log file, and
read through /proc for memory (VmRSS), CPU time and open regular files.

Everything started through L{Processes} is stopped by L{Processes.stop_all}: SIGTERM to the
process group it leads (an nginx master and its worker together), then SIGKILL after a grace
period.  Nothing else is ever signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NOT_FILES = ("socket:", "pipe:", "anon_inode:", "/dev/")


def rss_of(pid: int) -> int:
    """The resident set size of C{pid} in bytes (0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_of(pid: int) -> float:
    """User plus system CPU seconds that C{pid} has used (0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def regular_files_of(pid: int) -> set[str]:
    """What C{pid}'s descriptors that are regular files (or deleted ones) point at."""
    found = set()
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for fd in names:
        try:
            target = os.readlink(os.path.join(directory, fd))
        except OSError:
            continue
        if not target.startswith(NOT_FILES):
            found.add(target)
    return found


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@dataclass
class Proc:
    """
    One started process.

    @ivar name: what the tables call it (e.g. C{"arvproxy controller"}).
    @ivar watched: the pid whose memory and CPU count: the process itself, or for nginx its
        (single) worker, which does all the proxying.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log_path: str
    watched: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss(self) -> int:
        return rss_of(self.watched or self.pid)

    def cpu(self) -> float:
        return cpu_of(self.watched or self.pid)

    def regular_files(self) -> set[str]:
        """The regular files (and deleted ones) the process has open now."""
        return regular_files_of(self.watched or self.pid)

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class ProcessFailed(RuntimeError):
    pass


class Processes:
    """Starts processes and stops every one of them at the end."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.started: list[Proc] = []

    def start(
        self,
        name: str,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
    ) -> Proc:
        log_path = os.path.join(self.directory, name.replace(" ", "-") + ".out")
        log = open(log_path, "wb")
        popen = subprocess.Popen(
            list(args),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd or self.directory,
            start_new_session=True,
        )
        log.close()
        if stdin is not None:
            assert popen.stdin is not None
            popen.stdin.write(stdin)
            popen.stdin.close()
        proc = Proc(name, popen, log_path)
        self.started.append(proc)
        return proc

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every started process group, wait, then SIGKILL whatever is left."""
        for proc in reversed(self.started):
            if proc.alive():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.started:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                proc.popen.wait(remaining)
            except subprocess.TimeoutExpired:
                pass
        for proc in self.started:
            # The group too: an nginx worker may outlive its master by a moment.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            if proc.popen.poll() is None:
                proc.popen.wait(5)


def wait_until_accepting(
    port: int, procs: Sequence[Proc], what: str, timeout: float = 30.0
) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:C{port}."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        for proc in procs:
            if not proc.alive():
                raise ProcessFailed(f"{proc.name} exited while starting {what}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in procs)
            raise ProcessFailed(f"{what} did not accept connections in {timeout:.0f}s\n{tails}")
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settle(proc: Proc) -> None:
    """Once a process listens, note which pid to watch: an nginx master's worker."""
    if os.path.basename(proc.popen.args[0]) == "nginx":  # type: ignore[index]
        deadline = time.monotonic() + 10
        while not children_of(proc.pid):
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{proc.name} started no worker:\n{proc.log_tail()}")
            time.sleep(0.05)
        workers = children_of(proc.pid)
        proc.watched = workers[0]
