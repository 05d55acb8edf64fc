"""
Limits that protect a container's service from being swamped through the proxy, and that keep
anonymous visitors of its public ports from locking out the people with access to it.

Each container has a budget of requests and tunnels open at once (C{MaxConnectionsPerContainer}).
Anonymous ones (let through only because their port is public: no token, or a token whose user
has no access to the container) may take only a share of it
(C{MaxAnonymousConnectionsPerContainer}), and each client address only a part of that share
(C{MaxAnonymousConnectionsPerAddress}), so that:

  - however many anonymous visitors come, someone with access always has the rest;
  - one anonymous client cannot take the whole share from the others.

Among people with access there is no further split: each of them could stop the service
outright (write permission on a container request lets one cancel it, as in Arvados, and
whoever uses a notebook can run anything in it), and a notebook's owner may need many
connections at once (kernels, terminals, a tab per file).
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer

from arvproxy.config import Limits
from arvproxy.errors import Unavailable
from arvproxy.policy import is_trusted


class Slot:
    """
    One request's or tunnel's place among a container's connections, held by a C{with} block.

    It is given back when the block ends, or, after L{keep_until}, when a Deferred fires: a
    tunnel keeps its slot for as long as it is open, without keeping the handler (and the
    request it no longer needs) alive.
    """

    def __init__(self, slots: ConnectionSlots, container_uuid: str, anonymous: str | None) -> None:
        self._slots = slots
        self._uuid = container_uuid
        self._anonymous = anonymous
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
        self._slots._release(self._uuid, self._anonymous)


class ConnectionSlots:
    """
    Counts the requests and tunnels open to each container at once, and refuses with a 503 the
    client may retry one past C{cap}, an anonymous one past C{anonymous_cap}, and an anonymous
    one from a client that has C{per_client_cap} open already.

    C{anonymous_cap} and C{per_client_cap} default as C{Limits.anonymous_caps} works them out.
    """

    def __init__(
        self,
        cap: int,
        anonymous_cap: int | None = None,
        per_client_cap: int | None = None,
    ) -> None:
        self.cap = cap
        self.anonymous_cap, self.per_client_cap = Limits(
            max_connections_per_container=cap,
            max_anonymous_connections_per_container=anonymous_cap,
            max_anonymous_connections_per_address=per_client_cap,
        ).anonymous_caps()
        self._open: Counter[str] = Counter()
        self._anonymous: Counter[str] = Counter()
        self._per_client: Counter[tuple[str, str]] = Counter()

    @classmethod
    def from_limits(cls, limits: Limits) -> ConnectionSlots:
        """The slots C{limits} allow (C{ArvProxy.Limits})."""
        return cls(
            limits.max_connections_per_container,
            limits.max_anonymous_connections_per_container,
            limits.max_anonymous_connections_per_address,
        )

    def open(self, container_uuid: str) -> int:
        """How many requests and tunnels are open to C{container_uuid}."""
        return self._open[container_uuid]

    def open_anonymous(self, container_uuid: str, client: str | None = None) -> int:
        """How many anonymous ones are open to C{container_uuid} (from C{client}, if given)."""
        if client is None:
            return self._anonymous[container_uuid]
        return self._per_client[container_uuid, client]

    def hold(self, container_uuid: str, anonymous: str | None = None) -> Slot:
        """
        Take one slot for C{container_uuid}, to hold in a C{with} block (and longer:
        L{Slot.keep_until}).  A class, not a generator: this runs for every request.

        @param anonymous: C{None} for someone with access to the container; for an anonymous
            visitor, the client's key (L{client_key}).
        @raise Unavailable: there is no slot for this request.
        """
        if self._open[container_uuid] >= self.cap:
            raise Unavailable(
                f"Too many connections ({self.cap}) are open to container {container_uuid}; "
                "try again when some have finished.",
                retry_after=2,
            )
        if anonymous is not None:
            if self._anonymous[container_uuid] >= self.anonymous_cap:
                raise Unavailable(
                    f"Too many visitors without access to container {container_uuid} are "
                    "connected to it; try again when some have left.",
                    hint="People with access to the container can still sign in and connect.",
                    retry_after=2,
                )
            if self._per_client[container_uuid, anonymous] >= self.per_client_cap:
                raise Unavailable(
                    f"Your address has too many connections ({self.per_client_cap}) open to "
                    f"container {container_uuid}; close some (other tabs?) and try again.",
                    hint="People with access to the container can sign in to have more.",
                    retry_after=2,
                )
            self._anonymous[container_uuid] += 1
            self._per_client[container_uuid, anonymous] += 1
        self._open[container_uuid] += 1
        return Slot(self, container_uuid, anonymous)

    def _release(self, container_uuid: str, anonymous: str | None) -> None:
        self._open[container_uuid] -= 1
        if not self._open[container_uuid]:
            del self._open[container_uuid]
        if anonymous is not None:
            self._anonymous[container_uuid] -= 1
            if not self._anonymous[container_uuid]:
                del self._anonymous[container_uuid]
            key = (container_uuid, anonymous)
            self._per_client[key] -= 1
            if not self._per_client[key]:
                del self._per_client[key]


def client_key(
    peer: str | None,
    forwarded_for: Sequence[bytes] | None,
    trusted: tuple[ipaddress._BaseNetwork, ...],
) -> str:
    """
    What an anonymous client's connections are counted under: its address, or for IPv6 its
    /64 (one host commonly has a whole /64 to pick addresses from).

    The address is the peer's; when the peer is a trusted proxy, it is the last address in
    C{X-Forwarded-For} that is not a trusted proxy's (the one the outermost trusted proxy saw;
    those further left are the client's to write).  An entry there that is not an address (a
    proxy that writes something else) counts as the peer.

    @param forwarded_for: the request's C{X-Forwarded-For} values.
    """
    if peer is None:
        return "unknown"
    if forwarded_for and is_trusted(peer, trusted):
        for entry in reversed(b",".join(forwarded_for).split(b",")):
            address = _address(entry.strip())
            if address is None:
                break
            if not any(address in network for network in trusted):
                return _key(address)
    address = _address(peer.encode("ascii", "replace"))
    return _key(address) if address is not None else peer


def _address(text: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
