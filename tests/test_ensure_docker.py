"""Tests for scripts/ensure-docker: how it starts a Docker engine, with stand-in programs.

Each test puts its own C{docker}, C{dockerd} and C{pgrep} first on C{PATH}, so the script starts
a stand-in and never the machine's engine. C{pgrep} finds nothing, as on a machine where no engine
runs yet (or where C{nohup} has not yet become C{dockerd}).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ensure-docker"

# docker info answers once the stand-in engine has written its "ready" file.
DOCKER = '#!/bin/sh\n[ "$1" = info ] && [ -e "$FAKE_DIR/ready" ]\n'
PGREP = "#!/bin/sh\nexit 1\n"

# The stand-ins record their process id, so the test can stop what is still running.
SLOW_ENGINE = (
    '#!/bin/sh\necho $$ > "$FAKE_DIR/pid"\nsleep 2\ntouch "$FAKE_DIR/ready"\nexec sleep 60\n'
)
FAILING_ENGINE = '#!/bin/sh\necho "failed to start daemon: disk on fire"\nexit 1\n'
SILENT_ENGINE = "#!/bin/sh\nexit 1\n"
HANGING_ENGINE = '#!/bin/sh\necho $$ > "$FAKE_DIR/pid"\necho "still thinking"\nexec sleep 60\n'


class EnsureDockerTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        (self.dir / "bin").mkdir(parents=True)
        self.log = self.dir / "dockerd.log"
        self.log.write_text("an old run's last words\n")
        self.install("docker", DOCKER)
        self.install("pgrep", PGREP)
        self.addCleanup(self.stop_engine)

    def install(self, name: str, text: str) -> None:
        path = self.dir / "bin" / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def stop_engine(self) -> None:
        pid = self.dir / "pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def ensure(self, engine: str | None, wait: int = 20) -> subprocess.CompletedProcess[str]:
        if engine is not None:
            self.install("dockerd", engine)
        env = dict(
            os.environ,
            PATH=f"{self.dir / 'bin'}:{os.environ['PATH']}",
            FAKE_DIR=str(self.dir),
            DOCKERD_LOG=str(self.log),
            DOCKER_WAIT=str(wait),
            DOCKERD_PIDFILE=str(self.dir / "docker.pid"),
            CONTAINERD_PIDFILE=str(self.dir / "containerd.pid"),
        )
        return subprocess.run(
            ["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60
        )

    def test_engine_answers(self) -> None:
        """An engine that answers already is left alone: nothing starts."""
        (self.dir / "ready").touch()
        done = self.ensure(engine=None)
        self.assertEqual((done.returncode, done.stderr), (0, ""))

    def test_slow_start(self) -> None:
        """An engine that takes a while to answer is waited for, though pgrep cannot see it."""
        done = self.ensure(SLOW_ENGINE)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("the Docker engine is ready", done.stderr)

    def test_stale_pid_files(self) -> None:
        """Pid files naming live processes that are not the engine are dropped before it starts.

        dockerd refuses to start beside such a file, as on a machine restored from a snapshot.
        """
        for name in ("docker.pid", "containerd.pid"):
            (self.dir / name).write_text(f"{os.getpid()}\n")
        done = self.ensure(SLOW_ENGINE)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertFalse((self.dir / "docker.pid").exists())
        self.assertFalse((self.dir / "containerd.pid").exists())

    def test_live_pid_files_kept(self) -> None:
        """A pid file that names the running program is left for it."""
        # A shell script runs under its own name until it execs something else.
        self.install("containerd", "#!/bin/sh\nwhile sleep 1; do :; done\n")
        containerd = subprocess.Popen([str(self.dir / "bin" / "containerd")])
        self.addCleanup(containerd.wait)
        self.addCleanup(containerd.kill)
        (self.dir / "containerd.pid").write_text(f"{containerd.pid}\n")
        done = self.ensure(SLOW_ENGINE)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual((self.dir / "containerd.pid").read_text(), f"{containerd.pid}\n")

    def test_exits_at_start_up(self) -> None:
        """An engine that exits is reported with what it wrote this time, not an old run's log."""
        done = self.ensure(FAILING_ENGINE)
        self.assertEqual(done.returncode, 1)
        self.assertIn("dockerd exited at start-up", done.stderr)
        self.assertIn("disk on fire", done.stderr)
        self.assertNotIn("old run", done.stderr)

    def test_exits_silently(self) -> None:
        """An engine that exits without a word is reported as such."""
        done = self.ensure(SILENT_ENGINE)
        self.assertEqual(done.returncode, 1)
        self.assertIn(f"dockerd exited at start-up; it wrote nothing to {self.log}", done.stderr)

    def test_never_answers(self) -> None:
        """An engine that never answers is given up on after DOCKER_WAIT seconds, with its log."""
        done = self.ensure(HANGING_ENGINE, wait=2)
        self.assertEqual(done.returncode, 1)
        self.assertIn("did not answer within 2s", done.stderr)
        self.assertIn("still thinking", done.stderr)
