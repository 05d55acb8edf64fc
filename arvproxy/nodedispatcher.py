"""
C{twistd arv-node-dispatcher}: runs one compute node's share of an Arvados cluster's containers,
one C{crunch-run-gateway} each, as C{crunch-dispatch-local} runs C{crunch-run} on its node.

Every C{ArvProxy.NodeDispatcher.PollInterval} (L{arvproxy.nodeconfig}) it does what
C{sdk/go/dispatch} (C{Dispatcher.Run}, C{checkForUpdates}) does, through the Arvados API with
its own token (L{arvproxy.nodeapi}):

  1. I{the containers it holds} (C{locked_by_uuid} = its token's UUID): each one that none of
     its gateways serves is settled as the local dispatcher settles what an earlier one left
     (L{arvproxy.reconcile}: a new gateway for a C{Locked} one, a gateway attached to a Docker
     container that still runs, a final state for one that is gone); one whose priority fell
     to 0 (its request was cancelled) has its gateway stopped (SIGTERM: the gateway records
     C{Cancelled}), as C{crunch-dispatch-local} interrupts C{crunch-run};
  2. I{the queue} (C{Queued}, C{priority > 0}, highest priority first, page after page): each
     container this node takes (L{arvproxy.nodepolicy.judge}) and has room for is locked with
     C{POST containers/<uuid>/lock} -- another node that locked it first makes that fail,
     which is normal and logged quietly -- and its gateway started with the dispatcher JSON on
     its standard input: C{GatewayAddress} (this node's address as the front door reaches it,
     C{host:0} or a port from C{host:FIRST-LAST}), C{GatewayAuthSecret} (C{HMAC-SHA256} of the
     container UUID keyed with the SystemRootToken, as C{crunch-dispatch-local} computes it),
     and C{ARVADOS_API_HOST} (C{host:port}), C{ARVADOS_API_TOKEN} and
     C{ARVADOS_API_HOST_INSECURE}, as Arvados' dispatchers hand them to C{crunch-run}.

The gateway gets I{this dispatcher's} token, not the container's own (C{auth_uuid}) token: the
API server lets only an admin move a container C{Locked -> Running}, and of admins only the
token that holds the lock change its progress fields (C{Container#validate_change}); the
container's own token may act only once it is C{Running}.  The gateway reads the container's
own token with it (C{GET containers/<uuid>/auth}) as C{crunch-run} does.

A container whose gateway cannot be started, or ends before the container runs, is unlocked
(C{POST containers/<uuid>/unlock}) for any node to try again; the API server cancels it after
C{Containers.MaxDispatchAttempts} locks, saying so in C{runtime_status}.  A C{Running} one whose
gateway ends is cancelled with the reason in C{runtime_status}, as C{crunch-dispatch-local}
cancels one whose C{crunch-run} ended early.  Unlocking writes no reason: the API server clears
C{runtime_status} on the way back to C{Queued} (C{clear_runtime_status_when_queued}).

When it starts, it first asks which token it is, then settles the containers it holds (step 1
above): a node dispatcher that restarts, or was killed, finds its containers by
C{locked_by_uuid} and its Docker containers by their labels.  One dispatcher runs per node (it
holds C{dispatcher.lock} in C{ArvProxy.ContainerLogs.Directory}).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from arvproxy import backends, policy
from arvproxy.containerlogs import (
    container_directory,
    gateway_running,
)
from arvproxy.dispatcher import (
    HAND_BACK_FLAG,
    RUNTIME_PARAMETER,
    START_TIMEOUT_PARAMETER,
    LocalDispatcher,
    _hold_dispatcher_lock,
    check_runtime,
    gateway_argv,
    remove_docker_leftover,
    runtime_inventory,
)
from arvproxy.nodeapi import DispatchAPI, LockLost
from arvproxy.nodeconfig import (
    GatewayAddress,
    NodeConfigError,
    NodeDispatcherConfig,
    dispatcher_token,
    parse_gateway_address,
)
from arvproxy.nodepolicy import (
    SKIP,
    TAKE,
    Capacity,
    Resources,
    free_port,
    judge,
    ours,
)
from arvproxy.reconcile import Found, IInventory
from arvproxy.retry import DEADLINE, describe
from arvproxy.service import StopInTurn, fatal, read_config

log = Logger()

PROG = "arv-node-dispatcher"


def api_host(api_url: str) -> str:
    """
    C{ARVADOS_API_HOST} for C{Services.Controller.ExternalURL}: its C{host:port}, as
    C{crunch-dispatch-local} passes C{ExternalURL.Host} (the port made explicit).
    """
    parts = urlsplit(api_url)
    host = parts.hostname or ""
    return f"{f'[{host}]' if ':' in host else host}:{parts.port or 443}"


def port_bindable(host: str, port: int) -> bool:
    """Whether a gateway could listen on C{host:port} now (something else may hold it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@implementer(IInventory)
class NodeInventory:
    """
    This node's runtime containers, as far as this dispatcher may judge them: only those whose
    output its gateways kept here (a directory in C{ContainerLogs.Directory}) count as
    leftovers, so a Docker engine that other nodes share (a test's, one machine with several
    node dispatchers) never has another node's containers removed.
    """

    def __init__(self, inventory: IInventory, ours: Callable[[str], bool]) -> None:
        self._inventory = inventory
        self._ours = ours

    def find(self, uuid: str) -> Any:
        return self._inventory.find(uuid)

    def leftovers(self) -> Any:
        d = self._inventory.leftovers()
        return d.addCallback(lambda found: {u: f for u, f in found.items() if self._ours(u)})

    def remove(self, uuid: str, found: Found) -> Any:
        return self._inventory.remove(uuid, found)


class NodeDispatcher(LocalDispatcher):
    """
    The node dispatcher (see this module's docstring): L{LocalDispatcher}'s gateways,
    watching and settling, with the Arvados queue, locks and capacity of one node.

    @param api: the API, asked with this dispatcher's token (a L{DispatchAPI}).
    @param token: that token, handed to each gateway.
    @param address: where gateways listen (this node's address as the front door reaches it).
    @param port_free: whether a port of C{address}'s range can be listened on now.
    @param on_fatal: called with a line saying why the dispatcher cannot work (by default:
        the process exits with status 1, saying it).
    @ivar needs: what each container this node runs needs (for L{Capacity.fits}).
    @ivar ports: the port each gateway was given, when C{address} has a range.
    """

    def __init__(
        self,
        reactor: Any,
        api: Any,
        config_path: str,
        system_root_token: str,
        *,
        node: NodeDispatcherConfig,
        token: str,
        api_host: str,
        insecure: bool,
        address: GatewayAddress,
        capacity: Capacity,
        port_free: Callable[[str, int], bool] = port_bindable,
        on_fatal: Callable[[str], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            reactor,
            api,
            config_path,
            system_root_token,
            poll_interval=node.poll_interval,
            **kwargs,
        )
        self._api = api
        self._node = node
        self._token = token
        self._api_host = api_host
        self._insecure = insecure
        self._address = address
        self.capacity = capacity
        self._port_free = port_free
        self._on_fatal = on_fatal or (lambda what: fatal(None, reactor, what, plain=True))
        self.needs: dict[str, Resources] = {}
        self.ports: dict[str, int] = {}
        self._last_port: int | None = None
        self._settling: set[str] = set()
        self._interrupted: set[str] = set()
        self._noted: dict[str, str] = {}
        self._portless: set[str] = set()

    # -- what gateways get -------------------------------------------------------------------

    def dispatch_document(self, uuid: str) -> bytes:
        port = 0
        if self._address.ports is not None:
            port = self.ports.get(uuid) or self._take_port(uuid) or 0
            if not port:
                raise RuntimeError(f"no free port left for the gateway of {uuid}")
        env = {
            "GatewayAddress": self._address.with_port(port),
            "GatewayAuthSecret": policy.gateway_secret(self._root_token, uuid),
            "ARVADOS_API_HOST": self._api_host,
            "ARVADOS_API_TOKEN": self._token,
            "ARVADOS_API_HOST_INSECURE": "1" if self._insecure else "",
        }
        return json.dumps({"Env": env}).encode("ascii") + b"\n"

    def _take_port(self, uuid: str) -> int | None:
        """A free port of the range for C{uuid}'s gateway, now its own; C{None}: none is free."""
        assert self._address.ports is not None
        taken = set(self.ports.values())
        after = self._last_port
        for _ in range(self._address.ports[1] - self._address.ports[0] + 1):
            port = free_port(self._address.ports, taken, after)
            if port is None:
                break
            if self._port_free(self._address.host, port):
                self.ports[uuid] = self._last_port = port
                return port
            taken.add(port)
            after = port
        return None

    # -- the loop ----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Learn which token this is, then settle what it holds and remove leftovers."""
        try:
            me = await self._cluster.identify()
        except Exception as e:
            self._stopping = True
            self._on_fatal(
                f"the Arvados API does not accept this node dispatcher's token: {describe(e)}"
            )
            return
        log.info("Node dispatcher with token {uuid}", uuid=me)
        try:
            await self._settle_held()
        except Exception as e:
            log.error("Cannot settle the containers this node holds: {e}", e=describe(e))
        await self._reconciler.remove_leftovers()

    async def poll(self) -> None:
        """Settle what this node holds, then take what it can from the queue (never fails)."""
        try:
            if self.orphans:
                await self._settle_orphans()
            await self._settle_held()
            await self._take_from_queue()
        except Exception as e:
            log.error("Cannot dispatch queued containers: {e}", e=describe(e))

    def _running_here(self) -> list[Resources]:
        uuids = set(self.gateways) | self.orphans | self._settling
        return [self.needs.get(uuid, Resources()) for uuid in uuids]

    async def _settle_held(self) -> None:
        """Step 1 of this module's docstring."""
        held = await self._cluster.held()
        live = set(self.gateways) | self.orphans | self._settling | {e.uuid for e in held}
        for uuid in set(self.needs) - live:
            del self.needs[uuid]
        for entry in held:
            if self._stopping:
                return
            uuid = entry.uuid
            if entry.state not in (backends.LOCKED, backends.RUNNING):
                continue
            self.needs.setdefault(uuid, entry.needs)
            process = self.gateways.get(uuid)
            if process is not None:
                if entry.priority == 0 and uuid not in self._interrupted:
                    # crunch-dispatch-local: "sending SIGINT ... to cancel container".
                    log.info("Container {uuid} has priority 0: stopping its gateway", uuid=uuid)
                    self._interrupted.add(uuid)
                    process.signal("TERM")
                continue
            if uuid in self._settling or uuid in self.orphans:
                continue
            self._settling.add(uuid)
            try:
                if entry.state == backends.LOCKED and entry.priority == 0:
                    # lib/dispatchcloud (scheduler/sync.go): "requeue ... priority=0".
                    await self._not_started(uuid, "its priority is 0 (its request was cancelled)")
                    continue
                container = backends.Container(uuid=uuid, state=entry.state)
                await self._reconciler.reconcile([container])
            finally:
                self._settling.discard(uuid)

    async def _take_from_queue(self) -> None:
        """Step 2 of this module's docstring."""
        queue = await self._cluster.queue()
        seen = set()
        for entry in queue:
            if self._stopping:
                return
            uuid = entry.uuid
            seen.add(uuid)
            if uuid in self.gateways or uuid in self._settling:
                continue
            if uuid in self._portless:
                continue  # neither it nor its requests publish ports (they cannot start to)
            requests = None
            if self._node.properties or ours(entry, self._node) is not None:
                requests = await self._cluster.requests_of(uuid)
                if ours(entry, self._node, requests) is not None:
                    self._portless.add(uuid)
            verdict = judge(entry, self._node, self.capacity, requests)
            if verdict.action == SKIP:
                self._note(uuid, f"Leaving container {uuid}: {verdict.reason}")
                continue
            if verdict.action != TAKE:
                if verdict.cancel:
                    await self._refuse(uuid, verdict.reason)
                else:
                    self._note(uuid, f"Leaving {uuid} to other dispatchers: {verdict.reason}")
                continue
            room = self.capacity.fits(self._running_here(), entry.needs)
            if room and self._address.ports is not None and self._take_port(uuid) is None:
                room = False
            if not room:
                self._note(uuid, f"Container {uuid} waits for room on this node")
                break  # nothing of lower priority goes first
            try:
                await self._api.lock(uuid)
            except Exception as e:
                self.ports.pop(uuid, None)
                if isinstance(e, LockLost):
                    log.debug("Container {uuid} was taken first: {e}", uuid=uuid, e=e)
                else:
                    log.warn("Cannot lock container {uuid}: {e}", uuid=uuid, e=describe(e))
                continue
            log.info("Locked container {uuid}", uuid=uuid)
            self.needs[uuid] = entry.needs
            self._noted.pop(uuid, None)
            await self.start_gateway(uuid)
        for uuid in set(self._noted) - seen:
            del self._noted[uuid]
        self._portless &= seen

    def _note(self, uuid: str, text: str) -> None:
        """Log C{text} once for C{uuid} (again only when it changes)."""
        if self._noted.get(uuid) != text:
            self._noted[uuid] = text
            log.info("{text}", text=text)

    async def _refuse(self, uuid: str, reason: str) -> None:
        """
        Cancel a container no node can run, saying why, as C{lib/dispatchcloud} does
        (C{cancelUnsatisfiableContainer}: lock, then C{Cancelled} with C{runtime_status.error}).
        """
        try:
            await self._api.lock(uuid)
        except LockLost:
            return
        except Exception as e:
            log.warn("Cannot lock container {uuid} to cancel it: {e}", uuid=uuid, e=describe(e))
            return
        log.warn("Cancelling container {uuid}: {reason}", uuid=uuid, reason=reason)
        await self._cancel(uuid, reason)

    # -- gateways that end -------------------------------------------------------------------

    async def _gateway_ended(self, uuid: str, reason: Any) -> None:
        self._settling.add(uuid)
        try:
            await super()._gateway_ended(uuid, reason)
        finally:
            self._settling.discard(uuid)
            self._interrupted.discard(uuid)
            if uuid not in self.gateways:
                self.ports.pop(uuid, None)
                self.needs.pop(uuid, None)

    async def _not_started(self, uuid: str, reason: str) -> None:
        """Unlock it, for any node to try again (the API server counts the attempts)."""
        self.ports.pop(uuid, None)
        self.needs.pop(uuid, None)
        log.warn("Unlocking container {uuid}: {reason}", uuid=uuid, reason=reason)
        try:
            await self._cluster.unlock(uuid)
        except Exception as e:
            log.error("Cannot unlock container {uuid}: {e}", uuid=uuid, e=describe(e))

    async def _gateway_lost(self, container: backends.Container, how: str) -> None:
        if container.state != backends.LOCKED:
            await super()._gateway_lost(container, how)
            return
        await self._not_started(container.uuid, f"its gateway ended ({how}) before it ran")
        if self._cleanup is not None:
            from twisted.internet.threads import deferToThread

            try:
                await deferToThread(self._cleanup, container.uuid)
            except Exception:
                log.failure("Cannot clean up after the gateway of {uuid}", uuid=container.uuid)


class Options(usage.Options):
    synopsis = "--config FILE [--gateway-address HOST:0|HOST:FIRST-LAST] [--runtime docker|host]"
    longdesc = (
        "Run this compute node's share of an Arvados cluster's containers: take queued "
        "containers through the API (ArvProxy.NodeDispatcher) and start a crunch-run-gateway "
        "for each."
    )
    optFlags = [HAND_BACK_FLAG]
    optParameters = [
        ["config", "c", None, "The cluster configuration file (YAML)."],
        [
            "gateway-address",
            None,
            None,
            "Where this node's gateways listen, as the front door reaches them (overrides "
            "ArvProxy.NodeDispatcher.GatewayAddress).",
        ],
        RUNTIME_PARAMETER,
        START_TIMEOUT_PARAMETER,
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required (see docs/deploy-arvados.md)")
        config = self["cluster"] = read_config(self["config"])
        self["config"] = os.path.abspath(self["config"])
        at = f"{config.source}: Clusters.{config.cluster_id}"
        if config.backend != "arvados":
            raise usage.UsageError(
                f"{at}.ArvProxy.Backend: the node dispatcher takes containers from an Arvados "
                f"API server: set it to arvados (it is {config.backend}; with the embedded "
                "registry, run arv-local-dispatcher)"
            )
        if urlsplit(config.api_url).scheme != "https":
            raise usage.UsageError(
                f"{at}.Services.Controller.ExternalURL: gateways reach the API over https only "
                "(as crunch-run does): give the https URL"
            )
        try:
            self["token"] = dispatcher_token(config)
        except NodeConfigError as e:
            raise usage.UsageError(str(e)) from None
        node = config.node_dispatcher
        assert node is not None
        if self["gateway-address"]:
            try:
                self["address"] = parse_gateway_address(self["gateway-address"])
            except ValueError as e:
                raise usage.UsageError(f"--gateway-address: {e}") from None
        elif node.gateway_address is not None:
            self["address"] = node.gateway_address
        else:
            raise usage.UsageError(
                f"{at}.ArvProxy.NodeDispatcher.GatewayAddress: missing: this node's address as "
                'the front door reaches it, like "10.0.0.5:0" (or pass --gateway-address)'
            )
        if not config.container_logs:
            raise usage.UsageError(f"{at}.ArvProxy.ContainerLogs.Directory: missing")
        check_runtime(self["runtime"])
        if not self["start-timeout"] > 0:
            raise usage.UsageError("--start-timeout must be positive")


def machine_resources() -> Resources:
    """This machine's memory and cores (as C{crunch-dispatch-local}'s C{throttle} counts them)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Resources(ram=ram, vcpus=os.cpu_count() or 1)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options["cluster"]
    node = config.node_dispatcher
    _hold_node_lock(config.container_logs)
    inventory = runtime_inventory(config, options["runtime"])
    logs = config.container_logs

    def ours(uuid: str) -> bool:
        return os.path.isdir(container_directory(logs, uuid))

    machine = machine_resources()
    top = StopInTurn()
    api = DispatchAPI.for_node(reactor, config, options["token"])
    api.setServiceParent(top)
    NodeDispatcher(
        reactor,
        api,
        options["config"],
        config.system_root_token,
        node=node,
        token=options["token"],
        api_host=api_host(config.api_url),
        insecure=config.tls_insecure,
        address=options["address"],
        capacity=Capacity.from_settings(node, machine.ram, machine.vcpus),
        runtime=options["runtime"],
        start_timeout=options["start-timeout"],
        cleanup=remove_docker_leftover if options["runtime"] == "docker" else None,
        inventory=NodeInventory(inventory, ours),
        gateway_running=functools.partial(gateway_running, logs),
        hand_back=bool(options["hand-back"]),
        retry_deadline=config.limits.cluster_retry or DEADLINE,
        argv=gateway_argv,
    ).setServiceParent(top)
    return top


def _hold_node_lock(directory: str) -> None:
    """Hold this node's dispatcher lock until the process exits; exit 1 if it is held."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: cannot use {directory}: {e.strerror}\n")
        raise SystemExit(1) from None
    _hold_dispatcher_lock(directory, PROG, "on this node")
