"""
Limits that protect a container's service from being swamped through the proxy.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet import defer

from arvproxy.errors import Unavailable


class Slot:
    """
    One request's or tunnel's place among a container's connections, held by a C{with} block.

    It is given back when the block ends, or, after L{keep_until}, when a Deferred fires: a
    tunnel keeps its slot for as long as it is open, without keeping the handler (and the
    request it no longer needs) alive.
    """

    def __init__(self, slots: ConnectionSlots, container_uuid: str) -> None:
        self._slots = slots
        self._uuid = container_uuid
        self.kept = False

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.kept:
            self.give_back()

    def keep_until(self, done: defer.Deferred[Any]) -> None:
        """Hold on past the block, until C{done} fires (with a result or a failure)."""
        self.kept = True
        done.addBoth(self._give_back_after)

    def _give_back_after(self, result: object) -> object:
        self.give_back()
        return result

    def give_back(self) -> None:
        self._slots._release(self._uuid)


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

    def hold(self, container_uuid: str) -> Slot:
        """
        Take one slot for C{container_uuid}, to hold in a C{with} block (and longer:
        L{Slot.keep_until}).  A class, not a generator: this runs for every request.

        @raise Unavailable: all C{cap} slots are taken.
        """
        if self._open[container_uuid] >= self.cap:
            raise Unavailable(
                f"Too many connections ({self.cap}) are open to container {container_uuid}; "
                "try again when some have finished.",
                retry_after=2,
            )
        self._open[container_uuid] += 1
        return Slot(self, container_uuid)

    def _release(self, container_uuid: str) -> None:
        self._open[container_uuid] -= 1
        if not self._open[container_uuid]:
            del self._open[container_uuid]
