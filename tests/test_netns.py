"""
Tests for L{arvproxy.gateway.netns}: connecting from inside network namespaces the tests create
(with C{unshare --net}); nothing is sent anywhere but into those namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

import arvproxy
from arvproxy.gateway.netns import (
    NamespaceEndpoint,
    NetworkNamespace,
    has_cap_sys_admin,
)

# A one-connection-at-a-time HTTP server naming itself in every body; prints "ready" once
# listening on 127.0.0.1:PORT of its namespace.
SERVER = r"""
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    body = name.encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    c.sendall(head + body)
    c.close()
"""

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(arvproxy.__file__)))
CAN_UNSHARE = shutil.which("unshare") is not None and shutil.which("ip") is not None


class _Server(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"namespace server died: {self.output!r}"))
        self.ended.callback(None)


async def start_namespace_server(case: unittest.TestCase, name: str, port: int = 8080) -> int:
    """Start an HTTP server in a new network namespace; return its pid (stopped at cleanup)."""
    server = _Server()
    argv = [
        "unshare",
        "--net",
        "sh",
        "-c",
        'ip link set lo up && exec "$0" -c "$1" "$2" "$3"',
        sys.executable,
        SERVER,
        name,
        str(port),
    ]
    transport = reactor.spawnProcess(server, "unshare", argv, env=dict(os.environ))  # type: ignore[attr-defined]

    async def stop() -> None:
        if transport.pid is not None:
            transport.signalProcess("KILL")
        await server.ended

    case.addCleanup(lambda: defer.ensureDeferred(stop()))
    await server.ready
    pid: int = transport.pid
    return pid


@implementer(IAgentEndpointFactory)
class _OneNamespace:
    def __init__(self, namespace: NetworkNamespace) -> None:
        self.namespace = namespace

    def endpointForURI(self, uri: Any) -> NamespaceEndpoint:
        return NamespaceEndpoint(reactor, self.namespace, uri.port, timeout=5)


class NamespaceEndpointTests(unittest.TestCase):
    """L{NamespaceEndpoint} reaches loopback services inside a namespace, and only there."""

    def setUp(self) -> None:
        if not CAN_UNSHARE:
            raise unittest.SkipTest("needs unshare and ip (util-linux, iproute2)")
        if not has_cap_sys_admin():
            raise unittest.SkipTest("needs root or CAP_SYS_ADMIN to create network namespaces")

    def open_namespace(self, pid: int) -> NetworkNamespace:
        namespace = NetworkNamespace.of_process(pid)
        self.addCleanup(namespace.close)
        return namespace

    def agent(self, namespace: NetworkNamespace) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        return Agent.usingEndpointFactory(reactor, _OneNamespace(namespace), pool=pool)

    async def get(self, agent: Agent, port: int = 8080) -> bytes:
        response = await agent.request(b"GET", b"http://container.invalid:%d/" % (port,))
        return await readBody(response)

    @defer.inlineCallbacks
    def test_reaches_loopback_inside(self) -> Any:
        """A request reaches a server listening on 127.0.0.1 inside a --network none namespace."""
        pid = yield defer.ensureDeferred(start_namespace_server(self, "alpha"))
        body = yield defer.ensureDeferred(self.get(self.agent(self.open_namespace(pid))))
        self.assertEqual(body, b"alpha")

    @defer.inlineCallbacks
    def test_namespaces_not_interchangeable(self) -> Any:
        """The same 127.0.0.1:8080 in two namespaces are two services, each reached separately."""
        pid_a = yield defer.ensureDeferred(start_namespace_server(self, "alpha"))
        pid_b = yield defer.ensureDeferred(start_namespace_server(self, "bravo"))
        agent_a = self.agent(self.open_namespace(pid_a))
        agent_b = self.agent(self.open_namespace(pid_b))
        bodies = []
        for agent in (agent_a, agent_b, agent_a, agent_b):
            bodies.append((yield defer.ensureDeferred(self.get(agent))))
        self.assertEqual(bodies, [b"alpha", b"bravo", b"alpha", b"bravo"])

    @defer.inlineCallbacks
    def test_refused(self) -> Any:
        """A port nothing listens on inside the namespace fails with ConnectionRefusedError."""
        pid = yield defer.ensureDeferred(start_namespace_server(self, "alpha"))
        endpoint = NamespaceEndpoint(reactor, self.open_namespace(pid), 8081, timeout=5)
        yield self.assertFailure(endpoint.connect(protocol.Factory()), error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_closed_namespace(self) -> Any:
        """A closed namespace handle fails the connect with ConnectError saying so."""
        pid = yield defer.ensureDeferred(start_namespace_server(self, "alpha"))
        namespace = self.open_namespace(pid)
        namespace.close()
        endpoint = NamespaceEndpoint(reactor, namespace, 8080, timeout=5)
        e = yield self.assertFailure(endpoint.connect(protocol.Factory()), error.ConnectError)
        self.assertIn("closed", str(e))

    def test_missing_process(self) -> None:
        """Opening the namespace of a process that does not exist says which file is missing."""
        from arvproxy.gateway.netns import NamespaceError

        e = self.assertRaises(NamespaceError, NetworkNamespace, "/proc/0/ns/net")
        self.assertIn("/proc/0/ns/net", str(e))

    def test_without_cap_sys_admin(self) -> None:
        """Without CAP_SYS_ADMIN, opening and entering fail with a message naming the fix."""
        if shutil.which("setpriv") is None:
            raise unittest.SkipTest("needs setpriv (util-linux) to drop CAP_SYS_ADMIN")
        script = (
            "from twisted.internet import defer, task\n"
            "from arvproxy.gateway.netns import NetworkNamespace, has_cap_sys_admin\n"
            "assert not has_cap_sys_admin()\n"
            "@defer.inlineCallbacks\n"
            "def main(reactor):\n"
            "    for path in ('/proc/1/ns/net', '/proc/self/ns/net'):\n"
            "        try:\n"
            "            yield NetworkNamespace(path).check(reactor)\n"
            "            print('entered', path)\n"
            "        except Exception as e:\n"
            "            print(e)\n"
            "task.react(main)\n"
        )
        result = subprocess.run(
            [
                "setpriv",
                "--inh-caps=-sys_admin",
                "--bounding-set=-sys_admin",
                sys.executable,
                "-c",
                script,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": SOURCE_ROOT},
        )
        lines = result.stdout.splitlines()
        self.assertEqual(len(lines), 2, result.stdout + result.stderr)
        for line in lines:  # another process's namespace, then this one's own
            self.assertIn("needs root or CAP_SYS_ADMIN", line)


class CapabilityTests(unittest.TestCase):
    """L{has_cap_sys_admin} reads the effective capability set."""

    cases = [
        ("root's full set", "CapEff:\t000001ffffffffff\n", True),
        ("only CAP_SYS_ADMIN", "CapEff:\t0000000000200000\n", True),
        ("everything but CAP_SYS_ADMIN", "CapEff:\t000001ffffdfffff\n", False),
        ("none", "CapEff:\t0000000000000000\n", False),
        ("no CapEff line", "Name:\tpython\n", False),
    ]

    def test_table(self) -> None:
        """Bit 21 of CapEff decides."""
        for name, text, expected in self.cases:
            path = self.mktemp()
            with open(path, "w") as f:
                f.write("Name:\tx\n" + text)
            self.assertEqual(has_cap_sys_admin(path), expected, name)
