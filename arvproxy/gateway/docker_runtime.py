"""
The Docker runtime: the gateway creates, starts and watches a Docker container, the way Arvados'
crunch-run does, and reaches its ports from inside the container's own network namespace.

Every Docker SDK call runs in this runtime's own thread pool, so the reactor never waits for the
engine.  The container is created with C{network_mode="none"} by default: it has only its own
loopback interface, and L{arvproxy.gateway.netns} connects there; nothing is ever sent to a
bridge address.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet import error as net_error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from arvproxy.config import ExternalURL
from arvproxy.gateway.netns import NamespaceEndpoint, NetworkNamespace, ProcessGone
from arvproxy.gateway.ports import read_listening_ports
from arvproxy.gateway.runtime import IRuntime

log = Logger()

WEB_URL_VARIABLE = "ARVADOS_CONTAINER_WEB_URL_{port}"
"""The variable telling the container the public base URL of one of its published ports."""

NAME_PREFIX = "arvproxy-"
LABEL = "org.arvados.container_uuid"
CLUSTER_LABEL = "org.arvados.cluster_id"
"""Docker labels on every container a gateway creates: its container's UUID and cluster, so a
dispatcher that restarts finds the containers it had running (L{arvproxy.reconcile})."""


class DockerUnavailable(Exception):
    """No Docker engine answers; the message says how to start one."""


ENGINE_HINT = (
    "no Docker engine answers (is dockerd running? run scripts/ensure-docker, or "
    "'sudo dockerd &', or set DOCKER_HOST)"
)


@dataclass(frozen=True)
class ContainerSpec:
    """What to run: the fields of a container record the runtime uses, and its Docker name."""

    image: str
    command: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    network_mode: str = "none"
    init: bool = True


def docker_name(container_uuid: str) -> str:
    """The Docker container name of an arvproxy container (so dispatchers can find leftovers)."""
    return NAME_PREFIX + container_uuid


def web_url_environment(external: ExternalURL, label_uuid: str, ports: Any) -> dict[str, str]:
    """
    C{ARVADOS_CONTAINER_WEB_URL_<port>} for each published port: the base URL browsers use.

    @param label_uuid: the UUID in the URLs (the container request's, when there is one).
    """
    return {
        WEB_URL_VARIABLE.format(port=port): external.url_for(f"{label_uuid}-{port}")
        for port in sorted(int(p) for p in ports)
    }


async def spec_from_record(cluster: Any, uuid: str, external: ExternalURL) -> ContainerSpec:
    """
    The L{ContainerSpec} for container C{uuid}, from its record and its first request.

    @raise ValueError: the record names no image.
    """
    container = await cluster.get_container(uuid)
    if not container.container_image:
        raise ValueError(f"container {uuid} has no container_image to run")
    requests = await cluster.container_requests_for(uuid)
    label = requests[0].uuid if requests else uuid
    environment = dict(container.environment)
    environment.update(web_url_environment(external, label, container.published_ports))
    environment.setdefault("ARVADOS_CONTAINER_UUID", uuid)
    return ContainerSpec(
        image=container.container_image,
        command=tuple(container.command),
        environment=environment,
        cwd=container.cwd,
        name=docker_name(uuid),
        labels={LABEL: uuid, CLUSTER_LABEL: uuid[:5]},
    )


def default_client() -> Any:
    """A Docker SDK client for the engine the environment names (blocking: call in a thread)."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        raise DockerUnavailable(f"{ENGINE_HINT}: {e}") from None
    return client


@implementer(IStreamClientEndpoint)
class _ContainerEndpoint:
    """An endpoint for one port that uses the runtime's namespace as it is at connect time."""

    def __init__(self, runtime: DockerRuntime, port: int) -> None:
        self._runtime = runtime
        self.port = port

    def connect(self, factory: Any) -> Any:
        namespace = self._runtime.namespace
        if namespace is None:
            return defer.fail(net_error.ConnectError(string="the container is not running"))
        endpoint = NamespaceEndpoint(
            self._runtime.reactor, namespace, self.port, timeout=self._runtime.connect_timeout
        )
        return endpoint.connect(factory)


@implementer(IRuntime)
class DockerRuntime:
    """
    One Docker container: created from a L{ContainerSpec} and removed when it has exited, or
    (with C{container_id}) one started by someone else, which L{stop} leaves running, or (with
    C{container_id} and C{adopt}) one an earlier gateway created for the same record, which
    this one then owns as if it had created it.  L{detach} lets go of an owned container
    without stopping it, for the next gateway to adopt.

    L{exited} fires with the container's exit code when it exits by itself, or C{None} when
    L{stop} stopped it (or the engine lost track of it).
    """

    def __init__(
        self,
        reactor: Any,
        spec: Callable[[], Awaitable[ContainerSpec]] | None = None,
        container_id: str | None = None,
        adopt: bool = False,
        output: Callable[[bytes], None] | None = None,
        output_since: float | None = None,
        client_factory: Callable[[], Any] = default_client,
        connect_timeout: float = 10.0,
        stop_timeout: int = 10,
        wait_slice: float = 5.0,
    ) -> None:
        """
        @param spec: what to create (called once, by L{start}); or
        @param container_id: the running container to attach to.
        @param adopt: own the container C{container_id} names: stop it when stopped, remove it
            once it has exited.
        @param output: called (in a thread of this runtime) with the container's standard
            output and error as they come, until it exits or is let go.
        @param output_since: only output from this Unix time on (an adopted container's
            earlier output was kept by the gateway before).
        @param client_factory: makes the Docker SDK client (called in a thread).
        @param wait_slice: seconds each blocking wait for the container lasts, so stopping
            never waits longer for a pool thread.
        """
        if (spec is None) == (container_id is None):
            raise ValueError("DockerRuntime needs exactly one of spec and container_id")
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self._spec = spec
        self._container_id = container_id
        # Whether the container is this runtime's to stop and remove.
        self._owned = container_id is None or adopt
        self._client_factory = client_factory
        self._output = output
        self._output_since = output_since
        self._output_stream: Any = None
        self._output_done: defer.Deferred[None] | None = None
        self._output_closing = False
        self._stop_timeout = stop_timeout
        self._wait_slice = wait_slice
        self._pool = ThreadPool(minthreads=0, maxthreads=4, name="arvproxy-docker")
        self._client: Any = None
        self.container: Any = None
        self.pid: int | None = None
        self.namespace: NetworkNamespace | None = None
        self._stopping = False
        self._started: defer.Deferred[None] | None = None
        self._exited: defer.Deferred[int | None] = defer.Deferred()
        self._watching: defer.Deferred[Any] | None = None
        self._closed = False

    def _call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self.reactor, self._pool, f, *args, **kwargs)

    # IRuntime

    def start(self) -> defer.Deferred[None]:
        if self._started is None:
            self._pool.start()
            self._started = defer.ensureDeferred(self._start())
        return self._started

    async def _start(self) -> None:
        import docker.errors

        self._client = await self._call(self._client_factory)
        containers = self._client.containers
        if self._container_id is not None:
            try:
                self.container = await self._call(containers.get, self._container_id)
            except docker.errors.NotFound:
                raise ValueError(f"there is no Docker container {self._container_id}") from None
            if self.container.status != "running":
                raise ValueError(
                    f"Docker container {self._container_id} is {self.container.status}, not running"
                )
        else:
            assert self._spec is not None
            spec = await self._spec()
            await self._ensure_image(spec.image)
            if spec.name:
                await self._remove_leftover(spec.name)
            self.container = await self._call(
                containers.create,
                spec.image,
                command=list(spec.command) or None,
                environment=spec.environment,
                # crunch-run: 'both "" and "." mean default' (lib/crunchrun/crunchrun.go);
                # Docker refuses a working directory that is not absolute.
                working_dir=None if spec.cwd in ("", ".") else spec.cwd,
                network_mode=spec.network_mode,
                init=spec.init,
                name=spec.name or None,
                labels=spec.labels,
                detach=True,
            )
            log.info(
                "Created Docker container {id} ({name}) from {image}",
                id=self.container.short_id,
                name=spec.name,
                image=spec.image,
            )
            await self._call(self.container.start)
            await self._call(self.container.reload)
        pid = self.container.attrs.get("State", {}).get("Pid") or 0
        if pid:
            try:
                self.namespace = NetworkNamespace.of_process(pid)
            except ProcessGone:
                pass  # it has exited already: the watch below reports how
            else:
                self.pid = pid
                await self.namespace.check(self.reactor)
        if self._output is not None:
            self._output_done = self._call(self._copy_output)
            self._output_done.addErrback(
                lambda f: log.warn("Cannot read the container's output: {e}", e=f.value)
            )
        self._watching = defer.ensureDeferred(self._watch())

    def _copy_output(self) -> None:
        """Hand the container's output to C{output} until it ends (blocking: in a thread)."""
        assert self._output is not None
        options: dict[str, Any] = {"stream": True, "follow": True, "stdout": True, "stderr": True}
        if self._output_since:
            options["since"] = self._output_since
        stream = self.container.logs(**options)
        self._output_stream = stream
        try:
            if not self._output_closing:
                for chunk in stream:
                    self._output(chunk)
        finally:
            stream.close()

    async def _output_copied(self, let_go: bool) -> None:
        """Wait until the output has all been handed on; C{let_go}: stop following it now."""
        if self._output_done is None:
            return
        if let_go:
            self._output_closing = True
            if self._output_stream is not None:
                await self._call(self._output_stream.close)
        await self._output_done

    async def _ensure_image(self, image: str) -> None:
        import docker.errors

        try:
            await self._call(self._client.images.get, image)
        except docker.errors.ImageNotFound:
            log.info("Image {image} is not on this node: pulling it", image=image)
            try:
                await self._call(self._client.images.pull, image)
            except docker.errors.APIError as e:
                raise ValueError(f"cannot pull image {image}: {e.explanation or e}") from None

    async def _remove_leftover(self, name: str) -> None:
        """Remove a container of the same name left by an earlier gateway for this container."""
        import docker.errors

        try:
            old = await self._call(self._client.containers.get, name)
        except docker.errors.NotFound:
            return
        log.warn("Removing leftover Docker container {name}", name=name)
        await self._call(old.remove, force=True)

    async def _watch(self) -> None:
        """Wait for the container to exit (in slices), then report and clean up."""
        import docker.errors
        import requests

        code: int | None = None
        failures = 0
        while not (self._stopping and not self._owned):
            try:
                result = await self._call(self.container.wait, timeout=self._wait_slice)
                code = result.get("StatusCode")
                break
            except requests.exceptions.RequestException:
                pass  # the slice ended (or the engine hiccuped): look again
            except docker.errors.NotFound:
                break
            try:
                await self._call(self.container.reload)
                failures = 0
            except docker.errors.NotFound:
                break
            except (docker.errors.APIError, requests.exceptions.RequestException) as e:
                failures += 1
                log.warn("Cannot inspect the container ({error})", error=e)
                if failures >= 5:
                    break
                await task.deferLater(self.reactor, 1.0, lambda: None)
                continue
            if self.container.status in ("exited", "dead"):
                code = self.container.attrs.get("State", {}).get("ExitCode")
                break
        await self._finished(code)

    async def _finished(self, code: int | None) -> None:
        self.pid = None
        if self.namespace is not None:
            self.namespace.close()
            self.namespace = None
        if self._stopping:
            code = None
        # An exited container's output ends by itself; one let go must be let go of.
        await self._output_copied(let_go=not self._owned)
        if self._owned:
            await self._log_tail()
            try:
                await self._call(self.container.remove, force=True)
            except Exception as e:
                log.warn("Cannot remove the Docker container: {error}", error=e)
        if not self._exited.called:
            self._exited.callback(code)

    async def _log_tail(self, lines: int = 20) -> None:
        try:
            output = await self._call(self.container.logs, tail=lines)
        except Exception:
            return
        for line in output.decode("utf-8", "replace").splitlines():
            log.info("container: {line}", line=line)

    def exited(self) -> defer.Deferred[int | None]:
        return self._exited

    def stop(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._closed:
            return
        self._stopping = True
        if self._started is not None:
            try:
                await self._started
            except Exception:
                pass  # start() reported its own failure
        if self._watching is not None:
            if self._owned and not self._exited.called:
                try:
                    await self._call(self.container.stop, timeout=self._stop_timeout)
                except Exception as e:
                    log.warn("Cannot stop the Docker container: {error}", error=e)
            await self._watching
        elif self.container is not None and self._owned:
            try:  # created but never watched: start() failed after creating it
                await self._call(self.container.remove, force=True)
            except Exception as e:
                log.warn("Cannot remove the Docker container: {error}", error=e)
        if self.namespace is not None:
            self.namespace.close()
            self.namespace = None
        if not self._exited.called:
            self._exited.callback(None)
        self._closed = True
        if self._started is not None:
            from twisted.internet.threads import deferToThread

            await deferToThread(self._pool.stop)

    def detach(self) -> defer.Deferred[None]:
        """Let go of the container, leaving it running (see L{IRuntime.detach})."""
        self._owned = False
        return self.stop()

    def endpoint(self, port: int) -> Any:
        return _ContainerEndpoint(self, port)

    def listening_ports(self) -> defer.Deferred[list[int]]:
        pid = self.pid
        if pid is None or self._closed:
            return defer.succeed([])

        def read() -> list[int]:
            try:
                return read_listening_ports(pid)
            except OSError:
                return []  # it has just exited

        return self._call(read)


def engine_status() -> str | None:
    """
    C{None} when a Docker engine answers, else what is wrong and how to fix it (blocking).
    """
    try:
        default_client()
    except DockerUnavailable as e:
        return str(e)
    return None
