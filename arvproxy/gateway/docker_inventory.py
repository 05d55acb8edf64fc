"""
The Docker containers gateways made on this node, for a dispatcher that restarts
(L{arvproxy.reconcile.IInventory}): found by the labels every gateway puts on the containers
it creates (C{org.arvados.container_uuid}, C{org.arvados.cluster_id}; see
L{arvproxy.gateway.docker_runtime.spec_from_record}).

Every Docker call runs in a thread (the reactor's pool), never in the reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from arvproxy.backends import UUID_RE
from arvproxy.containerlogs import ContainerLog
from arvproxy.gateway.docker_runtime import CLUSTER_LABEL, LABEL, default_client
from arvproxy.reconcile import Found, IInventory


def _found(container: Any) -> Found:
    state = container.attrs.get("State", {})
    running = container.status in ("running", "restarting", "paused")
    code = None if running or container.status == "created" else state.get("ExitCode")
    return Found(id=container.id, running=running, exit_code=code)


@implementer(IInventory)
class DockerInventory:
    """
    This node's Docker containers of one cluster.

    @param output_directory: C{ArvProxy.ContainerLogs.Directory}: before a container is
        removed, what it wrote since its gateway last kept its output is kept there too
        (C{""}: not kept).
    """

    def __init__(
        self,
        cluster_id: str,
        client_factory: Callable[[], Any] = default_client,
        output_directory: str = "",
        output_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._cluster_id = cluster_id
        self._client_factory = client_factory
        self._client: Any = None
        self._output_directory = output_directory
        self._output_bytes = output_bytes

    def _containers(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client.containers

    def find(self, uuid: str) -> defer.Deferred[Found | None]:
        def find() -> Found | None:
            matches = self._containers().list(all=True, filters={"label": f"{LABEL}={uuid}"})
            # A running one first (there should be at most one of each record).
            matches.sort(key=lambda c: c.status != "running")
            return _found(matches[0]) if matches else None

        return deferToThread(find)

    def leftovers(self) -> defer.Deferred[dict[str, Found]]:
        def leftovers() -> dict[str, Found]:
            found = {}
            label = f"{CLUSTER_LABEL}={self._cluster_id}"
            for container in self._containers().list(all=True, filters={"label": label}):
                uuid = container.labels.get(LABEL, "")
                if UUID_RE.match(uuid):
                    found[uuid] = _found(container)
            return found

        return deferToThread(leftovers)

    def remove(self, uuid: str, found: Found) -> defer.Deferred[None]:
        return deferToThread(self._remove, uuid, found)

    def _remove(self, uuid: str, found: Found) -> None:
        import docker.errors

        try:
            container = self._containers().get(found.id)
        except docker.errors.NotFound:
            return
        if self._output_directory:
            output = ContainerLog(self._output_directory, uuid, self._output_bytes)
            try:
                since = output.last_written()
                options: dict[str, Any] = {"stdout": True, "stderr": True}
                if since:
                    options["since"] = since
                output.write(container.logs(**options))
                output.note(
                    "The container ended while no gateway watched it (exit code "
                    f"{found.exit_code}); its last output was kept when it was removed."
                )
            except (docker.errors.APIError, OSError):
                pass
            finally:
                output.close()
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
