"""
What a gateway does while its container runs, besides proxying: keep the record's
C{listening_ports} current, notice a cancellation made elsewhere (C{arvproxy cancel}), and, once
the container has exited, let the requests still open finish before the process exits.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from arvproxy import backends
from arvproxy.gateway.runtime import IRuntime

log = Logger()

PORT_SYNC_INTERVAL = 3.0
"""Seconds between two looks at the container's listening ports and its record."""

DRAIN_TIMEOUT = 10.0
"""Seconds open requests may take to finish after the container has exited."""


class ContainerWatch:
    """
    Every C{interval} seconds while running: list the container's listening ports and write
    them to the record when they changed; if the record reached a final state (someone cancelled
    the container), stop the runtime.  A failed look is logged and the next one tried.

    @ivar ports: the ports last written to the record, or C{None} before the first write.
    """

    def __init__(
        self,
        reactor: Any,
        cluster: Any,
        uuid: str,
        runtime: IRuntime,
        interval: float = PORT_SYNC_INTERVAL,
    ) -> None:
        self._cluster = cluster
        self._uuid = uuid
        self._runtime = runtime
        self._interval = interval
        self._loop = task.LoopingCall(lambda: defer.ensureDeferred(self.look()))
        self._loop.clock = reactor
        self._done: defer.Deferred[Any] | None = None
        self.ports: list[int] | None = None
        self.cancelled = False

    def start(self) -> None:
        if self._done is None:
            self._done = self._loop.start(self._interval, now=True)

    def stop(self) -> defer.Deferred[None]:
        """Stop looking; fires once a look in progress has finished."""
        if self._done is None:
            return defer.succeed(None)
        if self._loop.running:
            self._loop.stop()
        done, self._done = self._done, None
        return done.addCallback(lambda _: None)

    async def look(self) -> None:
        """One look at the ports and the record (never fails)."""
        try:
            ports = list(await self._runtime.listening_ports())
            if ports != self.ports:
                container = await self._cluster.update_container(self._uuid, listening_ports=ports)
                log.info("Container {uuid} listens on {ports}", uuid=self._uuid, ports=ports)
                self.ports = ports
            else:
                container = await self._cluster.get_container(self._uuid)
        except Exception:
            log.failure("Cannot sync the listening ports of container {uuid}", uuid=self._uuid)
            return
        if container.state in backends.FINAL_STATES and not self.cancelled:
            self.cancelled = True
            log.info(
                "Container {uuid} is {state} in the record: stopping it",
                uuid=self._uuid,
                state=container.state,
            )
            if self._loop.running:
                self._loop.stop()
            self._runtime.stop()


async def drain(reactor: Any, open_requests: Any, timeout: float = DRAIN_TIMEOUT) -> bool:
    """
    Wait until C{open_requests()} is 0, checking every 0.1 s, at most C{timeout} seconds.

    @return: whether every request finished in time.
    """
    waited = 0.0
    while open_requests() > 0:
        if waited >= timeout:
            log.warn(
                "{n} request(s) still open after {t}s: exiting anyway", n=open_requests(), t=timeout
            )
            return False
        await task.deferLater(reactor, 0.1, lambda: None)
        waited += 0.1
    return True
