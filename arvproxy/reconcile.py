"""
What a dispatcher does, when it starts, with the containers it owns (C{Locked} or C{Running})
that no gateway of its own serves: the containers a dispatcher that stopped or died left
behind.  Arvados' dispatchers do the same at start: C{sdk/go/dispatch/dispatch.go} (C{Run})
looks again at "containers I currently own (Locked/Running)"; crunch-dispatch-local starts a
crunch-run for a C{Locked} one and cancels a C{Running} one it has no crunch-run for
(C{services/crunch-dispatch-local}, C{run}); lib/dispatchcloud finds the crunch-run processes
still running on its workers (C{crunch-run --list}, C{lib/dispatchcloud/worker/worker.go},
C{probeRunning}) and keeps them.

Here, container by container (L{plan}, pure):

  - a gateway still runs for it (it holds the container's lock: a dispatcher that died alone
    leaves its gateways running): left alone; it records the container's end itself;
  - C{Locked}: a new gateway is started, as for a freshly locked container (it replaces
    whatever the old one had begun);
  - C{Running} and its runtime container still runs: a new gateway is attached to it (it
    takes the container over and writes its new C{gateway_address});
  - C{Running} and its runtime container has exited: recorded C{Complete} with its exit code
    (C{Cancelled} when it has none), and the runtime container removed;
  - C{Running} and no runtime container: recorded C{Cancelled}, saying why in
    C{runtime_status}.

Runtime containers of this cluster whose record has reached a final state are removed (no
gateway watched them stop).  The L{Reconciler} talks only to a cluster backend (C{ICluster}'s
C{get_container} and C{update_container}) and to an L{IInventory} of the runtime's containers,
so a node dispatcher for the Arvados backend can use it as the local dispatcher does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface, implementer

from arvproxy import backends
from arvproxy.errors import NotFound
from arvproxy.retry import describe

log = Logger()

LEAVE = "leave"
START = "start"
ATTACH = "attach"
FINISH = "finish"
CANCEL = "cancel"

GONE_REASON = (
    "its container was gone when the dispatcher restarted (the node or the dispatcher was "
    "stopped while it ran)"
)


@dataclass(frozen=True)
class Found:
    """
    A runtime container (a Docker container) of a record.

    @ivar id: the runtime's id for it.
    @ivar running: whether it runs.
    @ivar exit_code: how it ended, when it has (C{None}: still running, or not known).
    """

    id: str
    running: bool
    exit_code: int | None = None


class IInventory(Interface):
    """The runtime's side of reconciliation: the containers gateways made on this node."""

    def find(uuid: str) -> Any:
        """
        @return: a Deferred firing with the L{Found} runtime container of record C{uuid}, or
            C{None} when there is none.
        """

    def leftovers() -> Any:
        """
        @return: a Deferred firing with every runtime container of this cluster on this node,
            running or not, by record UUID (a mapping to L{Found}).
        """

    def remove(uuid: str, found: Found) -> Any:
        """
        Remove the runtime container C{found} of record C{uuid} (keeping what remains of its
        output first, where the runtime can).

        @return: a Deferred that fires once it is gone.
        """


@implementer(IInventory)
class NoInventory:
    """A runtime whose containers never outlive their gateway (the host runtime)."""

    def find(self, uuid: str) -> defer.Deferred[Found | None]:
        return defer.succeed(None)

    def leftovers(self) -> defer.Deferred[dict[str, Found]]:
        return defer.succeed({})

    def remove(self, uuid: str, found: Found) -> defer.Deferred[None]:
        return defer.succeed(None)


@dataclass(frozen=True)
class Step:
    """What to do with one container (see this module's docstring)."""

    action: str
    uuid: str
    found: Found | None = None
    reason: str = ""


def plan(container: backends.Container, found: Found | None, gateway_running: bool) -> Step:
    """
    What to do with C{container}, owned by this dispatcher, that none of its gateways serves.

    @param found: its runtime container, or C{None}.
    @param gateway_running: whether some gateway still runs for it on this node.
    """
    uuid = container.uuid
    if container.state not in (backends.LOCKED, backends.RUNNING):
        return Step(LEAVE, uuid, found, f"it is {container.state}")
    if gateway_running:
        return Step(LEAVE, uuid, found, "a gateway still serves it")
    if container.state == backends.LOCKED:
        return Step(START, uuid, found, "it was locked but never got running")
    if found is None:
        return Step(CANCEL, uuid, None, GONE_REASON)
    if found.running:
        return Step(ATTACH, uuid, found, "its container still runs")
    return Step(FINISH, uuid, found, "its container ended while no gateway watched it")


class Reconciler:
    """
    Carries out L{plan} for a dispatcher's containers.

    @param cluster: the backend (its calls should ride out transient failures: pass an
        L{arvproxy.retry.RetryingCluster}).
    @param gateway_running: whether a gateway runs for a container on this node right now.
    @param start_gateway: starts a gateway for a container: C{(uuid, None)} for a new
        container, C{(uuid, runtime id)} to attach to a running one.
    """

    def __init__(
        self,
        cluster: Any,
        inventory: IInventory,
        gateway_running: Callable[[str], bool],
        start_gateway: Callable[[str, str | None], Any],
    ) -> None:
        self._cluster = cluster
        self._inventory = inventory
        self._gateway_running = gateway_running
        self._start_gateway = start_gateway

    async def reconcile(self, containers: Iterable[backends.Container]) -> list[Step]:
        """
        Settle each of C{containers} (never fails: a container that cannot be settled is
        logged and left for the next look).

        @return: what was done, container by container.
        """
        steps = []
        for container in containers:
            try:
                found = await self._inventory.find(container.uuid)
                step = plan(container, found, self._gateway_running(container.uuid))
                await self._carry_out(step)
            except Exception as e:
                log.error("Cannot settle container {uuid}: {e}", uuid=container.uuid, e=describe(e))
                continue
            steps.append(step)
        return steps

    async def _carry_out(self, step: Step) -> None:
        log.info(
            "Container {uuid} (owned, no gateway of ours): {action}, as {reason}",
            uuid=step.uuid,
            action=step.action,
            reason=step.reason,
        )
        if step.action == START:
            await defer.maybeDeferred(self._start_gateway, step.uuid, None)
        elif step.action == ATTACH:
            assert step.found is not None
            await defer.maybeDeferred(self._start_gateway, step.uuid, step.found.id)
        elif step.action == FINISH:
            assert step.found is not None
            code = step.found.exit_code
            changes: dict[str, Any] = {"listening_ports": []}
            if code is None:
                changes.update(state=backends.CANCELLED, runtime_status={"error": step.reason})
            else:
                changes.update(state=backends.COMPLETE, exit_code=code)
            await self._cluster.update_container(step.uuid, **changes)
            await self._inventory.remove(step.uuid, step.found)
        elif step.action == CANCEL:
            await self._cluster.update_container(
                step.uuid,
                state=backends.CANCELLED,
                runtime_status={"error": step.reason},
                listening_ports=[],
            )

    async def remove_leftovers(self, settled: Mapping[str, Step] | None = None) -> list[str]:
        """
        Remove this node's runtime containers whose record is final (their gateway is gone),
        except those just settled.  Containers of records this cluster does not know are
        never touched.

        @return: the UUIDs of the records whose runtime containers were removed.
        """
        removed: list[str] = []
        try:
            leftovers = await self._inventory.leftovers()
        except Exception as e:
            log.error("Cannot list this node's containers: {e}", e=describe(e))
            return removed
        for uuid, found in leftovers.items():
            if settled and uuid in settled:
                continue
            try:
                container = await self._cluster.get_container(uuid)
            except NotFound:
                continue
            except Exception as e:
                log.error("Cannot look at container {uuid}: {e}", uuid=uuid, e=describe(e))
                continue
            if container.state in backends.FINAL_STATES and not self._gateway_running(uuid):
                log.info(
                    "Removing the leftover runtime container of {uuid} ({state})",
                    uuid=uuid,
                    state=container.state,
                )
                try:
                    await self._inventory.remove(uuid, found)
                except Exception as e:
                    log.error("Cannot remove it: {e}", e=describe(e))
                    continue
                removed.append(uuid)
        return removed
