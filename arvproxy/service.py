"""
What both twistd plugins share: reading the configuration with clear errors, opening the cluster
backend, and a listening service that says where it listens.
"""

from __future__ import annotations

import gc
import re
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger
from twisted.python import usage

from arvproxy.config import ClusterConfig, ConfigError, load_config

log = Logger()


def freeze_start_up(reactor: Any) -> None:
    """
    Once the reactor's first turn is done (the services have started), put everything made so
    far (modules, classes, the service tree: hundreds of thousands of objects that live as long
    as the process) out of the garbage collector's way.  Its full collections walked all of
    them, about 30 ms each, a few times a minute under load.
    """
    reactor.callWhenRunning(reactor.callLater, 0, gc.freeze)


def read_config(path: str | None) -> ClusterConfig:
    """
    Load the configuration for a plugin, turning every problem into a usage error that twistd
    prints at start-up.
    """
    if not path:
        raise usage.UsageError("--config FILE is required (see conf/local.yml for an example)")
    try:
        return load_config(path)
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None


def check_registry(config: ClusterConfig) -> None:
    """
    Refuse to start on an embedded registry that cannot be used: open it once now (creating
    it if there is none), so that a wrong C{Registry} path stops the process at start-up with
    one plain line rather than with a 503 for every request once it listens.

    @raise SystemExit: with that line (the process exits with status 1), naming the key.
    """
    if config.backend != "embedded":
        return
    from arvproxy.backends.registry import RegistryError, RegistryStore

    path = config.registry_path
    store = RegistryStore(path, config.cluster_id)
    try:
        store.check()
    except RegistryError as e:
        reason = str(e)
    except sqlite3.Error as e:
        reason = f"{path}: {e}"
    except OSError as e:
        reason = f"{e.filename or path}: {e.strerror or e}"
    else:
        return
    finally:
        store.close()
    key = f"Clusters.{config.cluster_id}.ArvProxy.Registry"
    raise SystemExit(f"{config.source}: {key}: cannot use the registry: {reason}")


def open_cluster(
    reactor: Any, config: ClusterConfig, dispatch_env: Mapping[str, Any] | None = None
) -> Any:
    """
    The cluster backend, as a service that must be started: the Arvados API when the
    dispatcher's C{Env} (a gateway's stdin) names one with C{ARVADOS_API_HOST} and
    C{ARVADOS_API_TOKEN}, else the one C{ArvProxy.Backend} names (C{embedded} by default).

    @raise ValueError: the C{Env} names an API server wrongly (see
        L{arvproxy.backends.arvados.parse_dispatch_api}).
    """
    env = dispatch_env or {}
    if env.get("ARVADOS_API_HOST") or env.get("ARVADOS_API_TOKEN"):
        from arvproxy.backends.arvados import ArvadosCluster

        return ArvadosCluster.from_dispatch_env(reactor, config, env)
    if config.backend == "arvados":
        from arvproxy.backends.arvados import ArvadosCluster

        return ArvadosCluster.from_config(reactor, config)
    from arvproxy.backends.embedded import EmbeddedRegistry

    return EmbeddedRegistry.from_config(reactor, config)


class ListeningService(Service):
    """
    Listens on a server endpoint description while running, and reports the port it got.

    @ivar port: the C{IListeningPort} while listening, else C{None}.
    @ivar listening: a Deferred that fires with the port once listening.
    """

    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: Any,
        on_listening: Callable[[Any], Any] | None = None,
        on_stopping: Callable[[], Any] | None = None,
        reuse_port: bool = False,
    ) -> None:
        """
        @param reuse_port: share the port with other processes (C{SO_REUSEPORT}); needs a
            C{tcp:PORT[:interface=ADDRESS]} description.
        """
        self._reactor = reactor
        self._reuse_port = reuse_port
        self._description = description
        self._factory = factory
        self._on_listening = on_listening
        self._on_stopping = on_stopping
        self.port: Any = None
        self.listening: defer.Deferred[Any] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        if self._reuse_port:
            d = defer.maybeDeferred(self._listen_shared)
        else:
            d = endpoints.serverFromString(self._reactor, self._description).listen(self._factory)
        d.addCallback(self._listening)
        d.addErrback(self._failed)

    def _listen_shared(self) -> Any:
        match = re.match(r"^tcp:(\d+)(?::interface=(.*))?$", self._description)
        if match is None:
            raise ValueError(f"cannot share {self._description!r}: use tcp:PORT:interface=ADDR")
        interface = (match.group(2) or "").replace("\\:", ":")
        binding = makeBinding(interface, int(match.group(1)), reuseAddress=True, reusePort=True)
        return self._reactor.listenTCP(binding, self._factory)

    def _listening(self, port: Any) -> Any:
        self.port = port
        address = port.getHost()
        log.info("Listening on {host}:{port}", host=address.host, port=address.port)
        result = self._on_listening(port) if self._on_listening else None
        d = defer.maybeDeferred(lambda: result)
        d.addCallback(lambda _: self.listening.callback(port))
        return d

    def _failed(self, failure: Any) -> None:
        if not self.listening.called:
            self.listening.errback(failure)
        # Exit non-zero, also when listening failed at once, before the reactor ran.
        if failure.check(CannotListenError):
            # A plain mistake (the address is taken, or not this machine's): no traceback.
            reason = failure.value.socketError
            fatal(failure, self._reactor, f"cannot listen on {self._description}: {reason}", True)
        else:
            fatal(failure, self._reactor, f"cannot start listening on {self._description}")

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            # Taken before waiting, so that nobody stops the same port a second time meanwhile.
            port, self.port = self.port, None
            yield port.stopListening()
        if self._on_stopping is not None:
            yield self._on_stopping()


def fatal(failure: Any, reactor: Any, what: str, plain: bool = False) -> None:
    """
    Stop the process because it cannot do its job: log why, stop the reactor, and exit with
    status 1 once the reactor has shut down cleanly (so supervisors and dispatchers notice).

    @param plain: C{what} says it all: log it without a traceback, and write it as one line
        on standard error too.
    """
    if plain:
        log.error("Fatal: {what}", what=what)
        import os

        os.write(2, f"error: {what}\n".encode("utf-8", "replace"))
    else:
        log.failure("Fatal: {what}", failure, what=what)
    exit_when_stopped(reactor)


def exit_when_stopped(reactor: Any) -> None:
    """Stop the reactor, and exit with status 1 once it has shut down cleanly."""

    def exit_now() -> None:
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", exit_now)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


class StopInTurn(MultiService):
    """
    A C{MultiService} whose children stop one at a time, the last added first, each once the
    one before has finished stopping (C{MultiService} stops them all at once).  A gateway
    needs its cluster backend until it has recorded how its container ended.
    """

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for service in reversed(list(self)):
            try:
                yield defer.maybeDeferred(service.stopService)
            except Exception:
                log.failure("Cannot stop {service}", service=service)
