"""
Limits that protect a container's service from being swamped through the proxy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from arvproxy.errors import Unavailable


class ConnectionSlots:
    """
    Counts the requests and tunnels open to each container at once, and refuses more than
    C{cap} with a 503 the client may retry.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: Counter[str] = Counter()

    def open(self, container_uuid: str) -> int:
        """How many requests and tunnels are open to C{container_uuid}."""
        return self._open[container_uuid]

    @contextmanager
    def hold(self, container_uuid: str) -> Iterator[None]:
        """
        Hold one slot for C{container_uuid} while the block runs.

        @raise Unavailable: all C{cap} slots are taken.
        """
        if self._open[container_uuid] >= self.cap:
            raise Unavailable(
                f"Too many connections ({self.cap}) are open to container {container_uuid}; "
                "try again when some have finished.",
                retry_after=2,
            )
        self._open[container_uuid] += 1
        try:
            yield
        finally:
            self._open[container_uuid] -= 1
            if not self._open[container_uuid]:
                del self._open[container_uuid]
