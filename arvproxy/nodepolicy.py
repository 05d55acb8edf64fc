"""
Which queued containers a node dispatcher takes, and whether this node has room for them: pure
rules, records and settings in, a decision out (L{arvproxy.nodedispatcher} acts on them).

A queued container is, for this node (L{judge}):

  - I{not ours} (L{SKIP}): it does not match C{ArvProxy.NodeDispatcher.Take} (no published
    ports, or no request carrying the properties named there).  Left in the queue, for
    Arvados' own dispatchers or another node; never touched.
  - I{unsuitable} (L{UNSUITABLE}): ours, but this node can never run it: a mount of a kind it
    does not provide (a Keep collection...), or more RAM or cores than the node has in all.
    With C{Unsuitable: Leave} (the default) it is left like the others, for a dispatcher that
    can (Arvados' own, or a bigger node); with C{Unsuitable: Cancel} it is cancelled with
    the reason in C{runtime_status.error}, as C{lib/dispatchcloud} cancels a container no
    instance type fits (C{container/queue.go}, C{cancelUnsatisfiableContainer}).
  - I{takeable} (L{TAKE}): the dispatcher locks it when the node has room for it now
    (L{Capacity.fits}), and otherwise waits for room, taking nothing of lower priority
    meanwhile (as C{crunch-dispatch-local}'s C{throttle} waits: "we don't want to schedule
    something lower-priority").

What a container needs is read from its C{runtime_constraints} as C{crunch-dispatch-local}
reads it (C{LocalRun.run}): C{vcpus}, and C{ram} plus C{keep_cache_ram}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from arvproxy.nodeconfig import CANCEL, NodeDispatcherConfig

TAKE = "take"
SKIP = "skip"
UNSUITABLE = "unsuitable"


@dataclass(frozen=True)
class QueueEntry:
    """
    The fields of a container record a node dispatcher decides by (what it selects in its
    list calls; see L{QUEUE_FIELDS}).
    """

    uuid: str
    state: str
    priority: int = 0
    locked_by_uuid: str | None = None
    runtime_constraints: Mapping[str, Any] = field(default_factory=dict)
    mounts: Mapping[str, Any] = field(default_factory=dict)
    published_ports: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> QueueEntry:
        """
        @raise ValueError: the record lacks a field or has one of the wrong type.
        """
        try:
            priority = record.get("priority") or 0
            entry = cls(
                uuid=str(record["uuid"]),
                state=str(record["state"]),
                priority=int(priority),
                locked_by_uuid=record.get("locked_by_uuid") or None,
                runtime_constraints=dict(record.get("runtime_constraints") or {}),
                mounts=dict(record.get("mounts") or {}),
                published_ports=dict(record.get("published_ports") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a container record: {e}") from None
        return entry

    @property
    def needs(self) -> Resources:
        """What it needs from the node (L{Resources.of})."""
        return Resources.of(self.runtime_constraints)


QUEUE_FIELDS = (
    "uuid",
    "state",
    "priority",
    "locked_by_uuid",
    "runtime_constraints",
    "mounts",
    "published_ports",
)
"""The fields a node dispatcher selects when it lists containers."""


@dataclass(frozen=True)
class Resources:
    """RAM (bytes) and cores; what a container needs, or what a node has."""

    ram: int = 0
    vcpus: int = 0

    @classmethod
    def of(cls, constraints: Mapping[str, Any]) -> Resources:
        """From C{runtime_constraints}: C{ram + keep_cache_ram}, C{vcpus} (missing: 0)."""

        def number(name: str) -> int:
            value = constraints.get(name) or 0
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                return 0
            return int(value)

        return cls(ram=number("ram") + number("keep_cache_ram"), vcpus=number("vcpus"))

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.ram + other.ram, self.vcpus + other.vcpus)


@dataclass(frozen=True)
class Capacity:
    """
    What one node may run at once.

    @ivar total: the RAM and cores it has for containers.
    @ivar max_containers: how many at once (0: no limit of its own).
    """

    total: Resources
    max_containers: int = 0

    @classmethod
    def from_settings(
        cls, node: NodeDispatcherConfig, machine_ram: int, machine_vcpus: int
    ) -> Capacity:
        """C{MaxRAM}, C{MaxVCPUs} and C{MaxContainers}, 0 meaning the machine's own."""
        return cls(
            Resources(node.max_ram or machine_ram, node.max_vcpus or machine_vcpus),
            node.max_containers,
        )

    def too_big(self, needs: Resources) -> str | None:
        """Why a container needing C{needs} can never run here, or C{None}."""
        if needs.ram > self.total.ram:
            return (
                f"it needs {needs.ram} bytes of RAM (ram + keep_cache_ram) and this node has "
                f"{self.total.ram} for containers"
            )
        if needs.vcpus > self.total.vcpus:
            return f"it needs {needs.vcpus} cores and this node has {self.total.vcpus}"
        return None

    def fits(self, running: Iterable[Resources], needs: Resources) -> bool:
        """Whether one more container needing C{needs} fits beside C{running} now."""
        used = Resources()
        count = 0
        for r in running:
            used += r
            count += 1
        if self.max_containers and count + 1 > self.max_containers:
            return False
        both = used + needs
        return both.ram <= self.total.ram and both.vcpus <= self.total.vcpus


@dataclass(frozen=True)
class Verdict:
    """
    L{TAKE}, L{SKIP} or L{UNSUITABLE}, and why (for logs and C{runtime_status}).

    @ivar cancel: an unsuitable container is to be cancelled (C{Unsuitable: Cancel}), not left.
    """

    action: str
    reason: str = ""
    cancel: bool = False


def ours(
    entry: QueueEntry,
    node: NodeDispatcherConfig,
    requests: Iterable[Mapping[str, Any]] | None = None,
) -> str | None:
    """
    Why C{entry} is not one this node takes by its ports (C{None}: it may be, the request
    properties still to be checked with L{has_properties}).

    A container publishes ports when its record does, or one of its committed requests does:
    Arvados gives a request that it retries a new container without its C{published_ports}
    (C{Container#handle_completed} copies neither them nor C{service}), so a retried service
    shows its ports on its request only.

    @param requests: the records of its container requests, or C{None} when not read (then
        only the container's own record counts).
    """
    if not node.published_ports_only or entry.published_ports:
        return None
    if any(
        request.get("state") in (None, "Committed") and request.get("published_ports")
        for request in requests or ()
    ):
        return None
    return "it publishes no ports"


def has_properties(requests: Iterable[Mapping[str, Any]], wanted: Mapping[str, Any]) -> bool:
    """
    Whether one of the committed container requests (their records) that use a container
    carries every property in C{wanted} with that value.
    """
    if not wanted:
        return True
    for request in requests:
        if request.get("state") not in (None, "Committed"):
            continue
        properties = request.get("properties") or {}
        if isinstance(properties, Mapping) and all(
            k in properties and properties[k] == v for k, v in wanted.items()
        ):
            return True
    return False


def unsupported_mounts(entry: QueueEntry, kinds: Iterable[str]) -> list[str]:
    """The mount points of C{entry} whose kind is not among C{kinds}, sorted."""
    allowed = set(kinds)
    return sorted(
        path
        for path, mount in entry.mounts.items()
        if not isinstance(mount, Mapping) or mount.get("kind") not in allowed
    )


def judge(
    entry: QueueEntry,
    node: NodeDispatcherConfig,
    capacity: Capacity,
    requests: Iterable[Mapping[str, Any]] | None = None,
) -> Verdict:
    """
    What this node does with queued container C{entry} (see this module's docstring).

    @param requests: the records of the container requests that use it (C{None}: not read;
        then it is not ours if properties are wanted, or if only its requests publish ports).
    """
    reason = ours(entry, node, requests)
    if reason is None and node.properties and not has_properties(requests or (), node.properties):
        wanted = ", ".join(f"{k}={v!r}" for k, v in sorted(node.properties.items()))
        reason = f"no committed request carries the properties {wanted}"
    if reason is not None:
        return Verdict(SKIP, reason)
    cancel = node.unsuitable == CANCEL
    mounts = unsupported_mounts(entry, node.mount_kinds)
    if mounts:
        kinds = sorted(
            {
                str(m.get("kind")) if isinstance(m, Mapping) else "?"
                for p, m in entry.mounts.items()
                if p in mounts
            }
        )
        return Verdict(
            UNSUITABLE,
            f"arvproxy's node dispatcher cannot provide mounts of kind {', '.join(kinds)} "
            f"({', '.join(mounts)}); it provides {', '.join(node.mount_kinds) or 'none'}",
            cancel,
        )
    big = capacity.too_big(entry.needs)
    if big is not None:
        return Verdict(UNSUITABLE, f"no arvproxy node can run it: {big}", cancel)
    return Verdict(TAKE)


def free_port(ports: tuple[int, int], taken: Iterable[int], after: int | None = None) -> int | None:
    """
    The next port of the range C{ports} not in C{taken}, going round from just after
    C{after} (so a port just given up is the last to be reused); C{None} when all are taken.
    """
    first, last = ports
    size = last - first + 1
    busy = set(taken)
    start = 0 if after is None or not first <= after <= last else after - first + 1
    for i in range(size):
        port = first + (start + i) % size
        if port not in busy:
            return port
    return None
