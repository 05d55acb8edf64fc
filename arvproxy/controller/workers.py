"""
Several controller processes sharing one listening port (C{SO_REUSEPORT}): the kernel spreads
new connections across them, so the front door uses every core.

The first process listens, then starts the others with the same configuration and the port it
got; each worker watches its standard input, a pipe from the first process, and stops when that
closes, so no worker outlives the process that started it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, protocol, stdio
from twisted.logger import Logger

log = Logger()


class _Worker(protocol.ProcessProtocol):
    def __init__(self, number: int) -> None:
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.info("worker {n}| {line}", n=self.number, line=line)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        log.info("Controller worker {n} ended: {reason}", n=self.number, reason=reason.value)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Starts C{count} extra controller processes once the first one listens, and stops them with
    it.
    """

    def __init__(self, reactor: Any, count: int, argv: list[str]) -> None:
        self._reactor = reactor
        self._count = count
        self._argv = argv
        self._workers: list[_Worker] = []

    def start_workers(self, listen: str) -> None:
        """Start the workers, listening on C{listen} (the port the first process got)."""
        for number in range(1, self._count + 1):
            worker = _Worker(number)
            args = [sys.executable, "-m", "arvproxy.controller.workers", *self._argv]
            args += ["--listen", listen, "--worker"]
            self._reactor.spawnProcess(
                worker,
                sys.executable,
                args,
                env=os.environ.copy(),
                childFDs={0: "w", 1: "r", 2: "r"},
            )
            self._workers.append(worker)
        log.info("Started {n} more controller processes on {listen}", n=self._count, listen=listen)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        for worker in self._workers:
            if worker.transport is not None and worker.transport.pid is not None:
                worker.transport.signalProcess(signal.SIGTERM)
        return defer.gatherResults([w.ended for w in self._workers])


class _ParentWatch(protocol.Protocol):
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectionLost(self, reason: Any = None) -> None:
        if self._reactor.running:
            log.info("The first controller process is gone; stopping this worker")
            self._reactor.stop()


def watch_parent(reactor: Any) -> None:
    """Stop this worker when its standard input (a pipe from the first process) closes."""
    stdio.StandardIO(_ParentWatch(reactor), reactor=reactor)


def main() -> None:
    """Run one worker: C{twistd -n arv-controller-proxy ...}, logging to standard output."""
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", "--pidfile=", "-l", "-", "arv-controller-proxy", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
