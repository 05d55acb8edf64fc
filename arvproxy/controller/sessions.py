"""
The first connection to a container's service marks the container
C{interactive_session_started: true}, as Arvados' controller does for a shell
(C{ContainerSSH} in C{lib/controller/localdb/container_gateway.go}): whatever ran in it since
may have been changed by hand, so it must not be taken for a clean run and reused.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from arvproxy.backends import Container
from arvproxy.backends.cache import AnswerCache
from arvproxy.errors import ProxyError, Unavailable

log = Logger()

MAX_REMEMBERED = 10_000
"""Containers remembered as marked; past that the oldest are forgotten (and read again)."""


class SessionMarks:
    """
    Marks each container once, before the first request reaches it.

    A container whose record already says so is never written; one this front door marked is
    remembered, so the requests that follow cost nothing until the record it reads says so too.
    Requests that arrive while the mark is being written wait for that one write.

    @param cluster: an L{arvproxy.backends.ICluster} (its C{update_container}).
    """

    def __init__(self, clock: Any, cluster: Any, max_remembered: int = MAX_REMEMBERED) -> None:
        self._cluster = cluster
        self._max = max_remembered
        self._marked: dict[str, None] = {}
        # Shares a write among the requests waiting for it; keeps nothing.
        self._writes: AnswerCache[None] = AnswerCache(clock, 0)

    def mark(self, container: Container) -> defer.Deferred[None] | None:
        """
        C{None} when C{container} is marked already; otherwise a Deferred that fires once it
        is, or fails with L{Unavailable} when the record cannot be written (the request is
        refused: nothing may reach a container that is not marked).
        """
        uuid = container.uuid
        if container.interactive_session_started or uuid in self._marked:
            return None
        return self._writes.get(uuid, lambda: defer.ensureDeferred(self._write(uuid)))

    async def _write(self, uuid: str) -> None:
        try:
            await self._cluster.update_container(uuid, interactive_session_started=True)
        except (ProxyError, ValueError) as e:
            log.warn(
                "Cannot record that container {uuid} had a connection: {error}",
                uuid=uuid,
                error=getattr(e, "message", None) or str(e),
            )
            raise Unavailable(
                "The cluster cannot record this connection right now. "
                "This page will retry by itself."
            ) from None
        log.info("Container {uuid} had its first connection", uuid=uuid)
        self._marked[uuid] = None
        while len(self._marked) > self._max:
            del self._marked[next(iter(self._marked))]
