"""
C{arvproxy logs UUID [-f]}: a container's kept output, followed until it has finished, and
why it ended.
"""

from __future__ import annotations

import os
from typing import Any

from arvproxy import backends, cli, clirun
from arvproxy.backends.registry import RegistryStore
from arvproxy.containerlogs import ContainerLog
from tests.test_cli import CONFIG, CommandTestCase

TOKEN = "LogsTestRootToken000000000000000000000000000"


class LogsCommandTests(CommandTestCase):
    """The logs command reads what the node keeps, never writes, and says how it ended."""

    def setUp(self) -> None:
        super().setUp()
        self.config = os.path.join(self.dir, "config.yml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(token=TOKEN))
        self.store = RegistryStore(os.path.join(self.dir, "var", "registry.sqlite"), "zzzzz")
        self.addCleanup(self.store.close)
        user = self.store.create_user("Logs Tester")
        self.request = self.store.create_container_request(
            user.uuid, name="job", published_ports={"8080": {}}
        )
        assert self.request.container_uuid is not None
        self.uuid = self.request.container_uuid
        self.directory = os.path.join(self.dir, "var", "container-logs")
        self.output = ContainerLog(self.directory, self.uuid, 1024 * 1024)
        self.addCleanup(self.output.close)

    def logs(self, *argv: str) -> tuple[int, bytes, str]:
        import io
        import sys

        class Out(io.StringIO):
            buffer = io.BytesIO()

        out = Out()
        err = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        try:
            status = cli.main(["--config", self.config, "logs", *argv])
        finally:
            self.patch(sys, "stdout", sys.__stdout__)
            self.patch(sys, "stderr", sys.__stderr__)
        return status, out.buffer.getvalue() + out.getvalue().encode(), err.getvalue()

    def test_prints_kept_output_and_reason(self) -> None:
        """The kept output comes out as it is; a finished container's end goes to stderr."""
        self.output.write(b"starting\n\xffbinary\n")
        self.output.note("The gateway could not start the container: cannot pull image x")
        self.store.update_container(
            self.uuid,
            state=backends.CANCELLED,
            runtime_status={
                "error": "the gateway could not start the container",
                "errorDetail": "cannot pull image x: not found",
            },
        )
        for name in (self.request.uuid, self.uuid):
            status, out, err = self.logs(name)
            self.assertEqual(status, 0, err)
            self.assertTrue(out.startswith(b"starting\n\xffbinary\n[arvproxy "), out)
            self.assertIn(b"cannot pull image x\n", out)
            self.assertEqual(
                err,
                f"arvproxy: container {self.uuid} is Cancelled: the gateway could not start "
                "the container: cannot pull image x: not found\n",
            )

    def test_running_no_output(self) -> None:
        """A running container with nothing kept yet says so, and no end."""
        self.store.lock_container(self.uuid)
        self.store.update_container(self.uuid, state=backends.RUNNING)
        status, out, err = self.logs(self.uuid)
        self.assertEqual((status, out), (0, b""))
        self.assertIn("no output", err)
        self.assertNotIn("is Running", err)

    def test_follow(self) -> None:
        """-f prints what comes, until the container has finished and its last note is in."""
        self.store.lock_container(self.uuid)
        self.store.update_container(self.uuid, state=backends.RUNNING)
        self.output.write(b"one\n")
        steps: list[Any] = [
            lambda: self.output.write(b"two\n"),
            lambda: None,
            lambda: self.output.write(b"three\n" * 1000),  # past a rotation, too
            lambda: self.store.update_container(self.uuid, state=backends.COMPLETE, exit_code=3),
            lambda: self.output.note("The container is Complete (exit code 3)."),
        ]
        sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if steps:
                steps.pop(0)()

        self.patch(clirun, "show_logs", _with_sleep(clirun.show_logs, sleep))
        self.output = ContainerLog(self.directory, self.uuid, 4096)  # rotates as it goes
        status, out, err = self.logs("-f", self.request.uuid)
        self.assertEqual(status, 0, err)
        self.assertTrue(out.startswith(b"one\ntwo\n"), out[:40])
        self.assertIn(b"three\nthree\n", out)
        self.assertTrue(out.endswith(b"The container is Complete (exit code 3).\n"), out[-80:])
        self.assertEqual(err, f"arvproxy: container {self.uuid} is Complete (exit code 3)\n")
        self.assertEqual(steps, [])
        self.assertTrue(all(s == clirun.FOLLOW_INTERVAL for s in sleeps))

    def test_no_container_yet(self) -> None:
        """A request without a container is an error, not an empty log."""
        self.store.update_container(self.uuid, state=backends.CANCELLED)
        status, _, err = self.run_raw(
            "--config", self.config, "logs", "zzzzz-xvhdp-000000000000000"
        )
        self.assertEqual(status, 1)
        self.assertIn("zzzzz-xvhdp-000000000000000", err)


def _with_sleep(show_logs: Any, sleep: Any) -> Any:
    def run(store: Any, args: Any) -> Any:
        return show_logs(store, args, sleep=sleep)

    return run
