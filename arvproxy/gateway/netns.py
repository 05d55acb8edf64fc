"""
Connecting from inside another process's network namespace.

A container started with C{--network none} has only its own loopback interface, and a service may
listen on 127.0.0.1 inside it: nothing outside the container can dial it.  L{NamespaceEndpoint}
connects the way a process in the container would: a short-lived thread enters the namespace with
C{setns(2)}, makes a blocking connect, and hands the connected socket to the reactor with
C{adoptStreamConnection}.  Only the connect happens inside; the thread ends afterwards, so no
thread ever runs anything else in a foreign namespace.

Entering a namespace needs root or C{CAP_SYS_ADMIN}.

Connections to C{127.0.0.1:port} in two namespaces are different services: keep one endpoint
(and one connection pool) per namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from typing import Any

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

CLONE_NEWNET = 0x40000000
CAP_SYS_ADMIN = 21

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(Exception):
    """A network namespace cannot be opened or entered; the message says what to do."""


class ProcessGone(NamespaceError):
    """The process whose namespace was asked for does not exist (any more)."""


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace open at C{fd} (C{os.setns} is Python 3.12+)."""
    if _libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def has_cap_sys_admin(status_path: str = "/proc/self/status") -> bool:
    """Whether this process holds C{CAP_SYS_ADMIN} in its effective set (root normally does)."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


PERMISSION_HINT = (
    "entering a container's network namespace needs root or CAP_SYS_ADMIN: run the gateway "
    "(and the dispatcher that starts it) as root, e.g. with sudo"
)


class NetworkNamespace:
    """
    An open handle on one network namespace.

    Holding the namespace file open keeps the namespace itself, so a recycled process id can
    never redirect connections to another container.  L{close} releases it.
    """

    def __init__(self, path: str) -> None:
        """
        @param path: e.g. C{/proc/<pid>/ns/net}.
        @raise NamespaceError: it cannot be opened.
        """
        self.path = path
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise NamespaceError(f"cannot open {path}: {PERMISSION_HINT}") from e
            if e.errno in (errno.ENOENT, errno.ESRCH):
                raise ProcessGone(f"cannot open {path}: the process has exited") from e
            raise NamespaceError(f"cannot open the network namespace {path}: {e.strerror}") from e

    @classmethod
    def of_process(cls, pid: int) -> NetworkNamespace:
        return cls(f"/proc/{pid}/ns/net")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _enter(self) -> None:
        if self.fd is None:
            raise NamespaceError(f"the network namespace {self.path} is closed")
        try:
            setns(self.fd)
        except OSError as e:
            if e.errno == errno.EPERM:
                raise NamespaceError(PERMISSION_HINT) from e
            raise NamespaceError(f"cannot enter the network namespace {self.path}: {e}") from e

    def run_inside(self, reactor: Any, f: Any, *args: Any) -> defer.Deferred[Any]:
        """
        Call C{f(*args)} in a new thread that has entered this namespace; the thread ends when
        C{f} returns, so it never runs anything else inside.

        @return: a Deferred (fired in the reactor thread) with C{f}'s result or exception.  If
            it was cancelled meanwhile, a socket result is closed.
        """
        d: defer.Deferred[Any] = defer.Deferred()

        def inside() -> None:
            try:
                self._enter()
                result = f(*args)
            except Exception as e:
                reactor.callFromThread(_deliver, d, Failure(e))
            else:
                reactor.callFromThread(_deliver, d, result)

        threading.Thread(target=inside, name=f"netns-{self.path}", daemon=True).start()
        return d

    def check(self, reactor: Any) -> defer.Deferred[None]:
        """
        Make sure this process can enter the namespace.

        @return: a Deferred failing with L{NamespaceError} (saying why) if it cannot.
        """
        return self.run_inside(reactor, lambda: None)


def _deliver(d: defer.Deferred[Any], result: Any) -> None:
    if d.called:  # cancelled meanwhile: nobody wants the socket
        if isinstance(result, socket.socket):
            result.close()
        return
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def connect_inside(hosts: tuple[str, ...], port: int, timeout: float) -> socket.socket:
    """
    Connect to the first of C{hosts} that accepts on C{port} (blocking; run in a thread that
    has entered the namespace).

    @return: a connected, non-blocking socket.
    @raise OSError: C{ConnectionRefusedError} when some host refused and none accepted (an
        address missing from the namespace, like ::1 without IPv6, does not count), else the
        failure.
    """
    refused: OSError | None = None
    unusable: OSError | None = None
    for host in hosts:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError as e:
            refused = e
            continue
        except OSError as e:
            if e.errno in (errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EAFNOSUPPORT):
                unusable = e  # e.g. no ::1 in a namespace without IPv6
                continue
            raise
        sock.setblocking(False)
        return sock
    raise refused or unusable or ConnectionRefusedError(errno.ECONNREFUSED, "no address to try")


class _Capture(Factory):
    """Wraps a factory to learn the protocol C{adoptStreamConnection} builds."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.built: Protocol | None = None

    def buildProtocol(self, addr: Any) -> Any:
        self.built = self.factory.buildProtocol(addr)
        return self.built


@implementer(IStreamClientEndpoint)
class NamespaceEndpoint:
    """
    Connects to C{port} on the loopback address of a network namespace (127.0.0.1, then ::1).

    Failures are Twisted's: C{ConnectionRefusedError} when nothing listens, C{TimeoutError}, or
    C{ConnectError} (with the reason) when the namespace cannot be entered.
    """

    def __init__(
        self,
        reactor: Any,
        namespace: NetworkNamespace,
        port: int,
        timeout: float = 10.0,
        hosts: tuple[str, ...] = ("127.0.0.1", "::1"),
    ) -> None:
        self._reactor = reactor
        self.namespace = namespace
        self.port = port
        self._timeout = timeout
        self._hosts = hosts

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        d = self.namespace.run_inside(
            self._reactor, connect_inside, self._hosts, self.port, self._timeout
        )
        d.addCallbacks(self._adopt, self._translate, callbackArgs=(factory,))
        return d

    def _adopt(self, sock: socket.socket, factory: Any) -> Any:
        capture = _Capture(factory)
        try:
            self._reactor.adoptStreamConnection(sock.fileno(), sock.family, capture)
        finally:
            sock.close()  # adoptStreamConnection made its own copy
        if capture.built is None:
            raise net_error.ConnectError(string="the connected socket could not be adopted")
        return capture.built

    def _translate(self, failure: Any) -> Any:
        e = failure.value
        where = f"port {self.port} in {self.namespace.path}"
        if isinstance(e, ConnectionRefusedError):
            raise net_error.ConnectionRefusedError(string=where)
        if isinstance(e, (socket.timeout, TimeoutError)):
            raise net_error.TimeoutError(string=where)
        if isinstance(e, NamespaceError):
            raise net_error.ConnectError(string=str(e))
        if isinstance(e, OSError):
            raise net_error.ConnectError(string=f"{where}: {e.strerror or e}")
        return failure
