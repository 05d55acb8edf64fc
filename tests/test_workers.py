"""
Several controller processes sharing one port (twistd arv-controller-proxy --workers N).
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.e2e import Twistd, accepting, free_port, wait_for, write_config


def _children(pid: int) -> list[int]:
    """The processes whose parent is C{pid}."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _get(port: int, host: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /probe HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


class WorkersTests(unittest.TestCase):
    timeout = 90

    def test_workers_share_the_port_and_die_with_the_first(self):
        """Connections are served by every process; killing the first stops the others."""

        async def go():
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            port = free_port()
            config = write_config(directory, port)
            controller = Twistd.spawn(
                reactor,
                directory,
                "controller",
                ["arv-controller-proxy", "--config", config, "--workers", "2", "--access-log"],
            )
            self.addCleanup(lambda: defer.ensureDeferred(controller.stop(reactor, "KILL")))
            await wait_for(reactor, lambda: accepting(port), "the controller", [controller])
            [worker] = await wait_for(
                reactor, lambda: _children(controller.pid), "a worker", [controller]
            )

            def served_by_both() -> bool:
                probes = [line for line in controller.log_text().splitlines() if "/probe" in line]
                by_worker = [line for line in probes if "worker 1|" in line]
                return 0 < len(by_worker) < len(probes)

            await wait_for(
                reactor,
                lambda: (
                    "worker 1| " in controller.log_text()
                    and f"starting on {port}" in controller.log_text().split("worker 1|", 1)[1]
                ),
                "the worker to listen",
                [controller],
            )
            for _ in range(40):
                reply = await deferToThread(_get, port, b"elsewhere.example")
                self.assertTrue(reply.startswith(b"HTTP/1.1 400 "), reply)
            await wait_for(reactor, served_by_both, "requests in both processes' logs", [])

            controller.transport.signalProcess("KILL")
            await controller.ended
            await wait_for(reactor, lambda: not _alive(worker), "the worker to exit", [])

        return defer.ensureDeferred(go())
