"""
Container runtimes: how a gateway starts, watches and reaches the container it serves.

A runtime provides L{IRuntime}.  The L{HostRuntime} serves a "container" that is just ports on the
node's loopback (for development, demos and tests); the Docker runtime reaches ports inside a
container's own network namespace.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from zope.interface import Interface, implementer


class IRuntime(Interface):
    """
    The container a gateway serves.
    """

    def start() -> Any:
        """
        Make sure the container is running.

        @return: a Deferred that fires when it is.
        """

    def exited() -> Any:
        """
        @return: a Deferred that fires with the container's exit code when it stops (C{None} when
            it was stopped without one).
        """

    def stop() -> Any:
        """
        Stop the container.

        @return: a Deferred that fires when it has stopped.
        """

    def detach() -> Any:
        """
        Stop watching the container but leave it running, for a gateway that hands its
        container over to the next one (a restart); L{exited} fires with C{None}.  A runtime
        whose container cannot outlive the gateway stops it instead.

        @return: a Deferred that fires once let go.
        """

    def endpoint(port: int) -> Any:
        """
        An C{IStreamClientEndpoint} that connects to C{port} inside the container.  Endpoints for
        different containers must never be interchangeable.
        """

    def listening_ports() -> Any:
        """
        @return: a Deferred firing with the sorted TCP ports a process in the container listens on.
        """


@implementer(IRuntime)
class HostRuntime:
    """
    A "container" that is the node itself: its ports are ports on C{host} (loopback by default).
    It runs until L{stop} is called.
    """

    def __init__(self, reactor: Any, host: str = "127.0.0.1", connect_timeout: float = 10.0):
        self._reactor = reactor
        self._host = host
        self._timeout = connect_timeout
        self._exited: defer.Deferred[int | None] = defer.Deferred()

    def start(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def exited(self) -> defer.Deferred[int | None]:
        return self._exited

    def stop(self) -> defer.Deferred[None]:
        if not self._exited.called:
            self._exited.callback(None)
        return defer.succeed(None)

    def detach(self) -> defer.Deferred[None]:
        # The node's own ports are not the gateway's to keep or stop.
        return self.stop()

    def endpoint(self, port: int) -> Any:
        endpoint_type = TCP6ClientEndpoint if ":" in self._host else TCP4ClientEndpoint
        return endpoint_type(self._reactor, self._host, port, timeout=self._timeout)

    def listening_ports(self) -> defer.Deferred[list[int]]:
        return defer.succeed([])
