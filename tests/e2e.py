"""
A harness for end-to-end tests: the real twistd plugins as subprocesses on loopback, a registry
set up directly with L{RegistryStore}, and the web service "inside the container" as a Twisted
site in the test process.

Nothing here dials anything but 127.0.0.1.  Every helper that opens a connection or a port hands
back something that waits for it to be closed, so trial's reactor is clean after each test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import yaml
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, iweb, resource, server
from twisted.web.client import URI, Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from arvproxy import policy
from arvproxy.backends import RUNNING, ContainerRequest, User
from arvproxy.backends.registry import RegistryStore
from arvproxy.tlsidentity import client_creator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
CLUSTER_ID = "zzzzz"
# 50 characters, like the value the config comments suggest; only ever used by these tests.
ROOT_TOKEN = "e2eTestOnlySystemRootToken" + "0123456789abcdefghijklmn"
SUFFIX = "containers.localhost"

MiB = 1024 * 1024
GiB = 1024 * MiB


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: str, port: int, **arvproxy: Any) -> str:
    """
    Write a cluster configuration for a controller on 127.0.0.1:C{port} and a registry in
    C{directory}; keyword arguments are extra keys of the C{ArvProxy} section.

    @return: the file's path.
    """
    document = {
        "Clusters": {
            CLUSTER_ID: {
                "SystemRootToken": ROOT_TOKEN,
                "Services": {
                    "ContainerWebServices": {
                        "ExternalURL": f"http://*.{SUFFIX}:{port}",
                        "InternalURLs": {f"http://127.0.0.1:{port}": {}},
                    }
                },
                "ArvProxy": {"Backend": "embedded", "Registry": "registry.sqlite", **arvproxy},
            }
        }
    }
    path = os.path.join(directory, "config.yml")
    with open(path, "w") as f:
        yaml.safe_dump(document, f)
    return path


# --- Processes -----------------------------------------------------------------------------------


class Twistd(protocol.ProcessProtocol):
    """
    One C{twistd -n} subprocess, logging to its own file.

    @ivar ended: fires with the exit code (negative: killed by that signal) when it has exited.
    @ivar output: everything it wrote to stdout and stderr.
    """

    transport: Any

    def __init__(self, name: str, log_path: str) -> None:
        self.name = name
        self.log_path = log_path
        self.output = bytearray()
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.pid: int | None = None

    @classmethod
    def spawn(
        cls,
        reactor: Any,
        directory: str,
        name: str,
        plugin_args: list[str],
        stdin: bytes | None = None,
    ) -> Twistd:
        """
        Start C{twistd -n --pidfile= -l <directory>/<name>.log <plugin_args>} with this checkout
        on C{PYTHONPATH} and C{TMPDIR} set to an empty C{<directory>/<name>-tmp}.
        """
        log_path = os.path.join(directory, f"{name}.log")
        tmp = os.path.join(directory, f"{name}-tmp")
        os.makedirs(tmp, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=REPO_ROOT, TMPDIR=tmp, PYTHONUNBUFFERED="1")
        process = cls(name, log_path)
        process.tmpdir = tmp
        args = [sys.executable, TWISTD, "-n", "--pidfile=", "-l", log_path, *plugin_args]
        transport = reactor.spawnProcess(process, sys.executable, args, env=env, path=directory)
        process.pid = transport.pid
        if stdin is not None:
            transport.write(stdin)
        transport.closeStdin()
        return process

    tmpdir: str = ""

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            code = 0
        elif isinstance(value, ProcessTerminated):
            code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        else:
            code = -1
        self.ended.callback(code)

    @property
    def running(self) -> bool:
        return not self.ended.called

    def log_text(self) -> str:
        """The log file's contents (empty if there is none)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        """What the process said, for a failure message."""
        return (
            f"--- {self.name} output ---\n{self.output.decode(errors='replace')}\n"
            f"--- {self.name} log ---\n{self.log_text()[-4000:]}"
        )

    async def stop(self, reactor: Any, signal: str = "TERM", grace: float = 15.0) -> int:
        """Send C{signal} (then KILL after C{grace} seconds) and wait for the exit."""
        if self.running:
            self.transport.signalProcess(signal)
            killer = reactor.callLater(grace, self._kill)
            code = await self.ended
            if killer.active():
                killer.cancel()
            return code
        return await self.ended

    def _kill(self) -> None:
        if self.running:
            self.transport.signalProcess("KILL")

    def rss(self) -> int:
        """The process's resident set size in bytes (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for {self.name}")

    def open_files(self) -> set[str]:
        """What the process's file descriptors point at (paths, C{socket:[...]}, ...)."""
        targets = set()
        directory = f"/proc/{self.pid}/fd"
        for fd in os.listdir(directory):
            try:
                targets.add(os.readlink(os.path.join(directory, fd)))
            except OSError:
                pass
        return targets

    def temporary_files(self) -> set[str]:
        """Open files that are deleted or live in the process's TMPDIR: spooled bodies."""
        return {
            t
            for t in self.open_files()
            if t.endswith("(deleted)") or (self.tmpdir and t.startswith(self.tmpdir))
        }


async def wait_for(
    reactor: Any,
    check: Callable[[], Any],
    what: str,
    watch: Iterable[Twistd] = (),
    timeout: float = 20.0,
    interval: float = 0.05,
) -> Any:
    """
    Poll C{check} until it returns something true, and return that.

    @raise AssertionError: C{timeout} passed, or a watched process exited first.
    """
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if result:
            return result
        for process in watch:
            if not process.running:
                raise AssertionError(
                    f"{process.name} exited while waiting for {what}\n" + process.describe()
                )
        if reactor.seconds() > deadline:
            details = "\n".join(p.describe() for p in watch)
            raise AssertionError(f"timed out waiting for {what}\n{details}")
        await task.deferLater(reactor, interval, lambda: None)


def accepting(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:C{port}."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


# --- The cluster ---------------------------------------------------------------------------------


@dataclass
class Cluster:
    """
    A registry with one user, their token, and a container request for C{service_port}.
    """

    store: RegistryStore
    user: User
    token: str
    request: ContainerRequest
    port: int

    @property
    def container_uuid(self) -> str:
        assert self.request.container_uuid is not None
        return self.request.container_uuid

    @property
    def secret(self) -> str:
        return policy.gateway_secret(ROOT_TOKEN, self.container_uuid)

    @property
    def token_secret(self) -> str:
        return self.token.rsplit("/", 1)[1]

    def cookie(self) -> bytes:
        """A C{Cookie} header value that carries the token."""
        return policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(self.token.encode())

    def gateway_address(self) -> str:
        """The container's gateway address once it is Running with one, else C{""}."""
        container = self.store.get_container(self.container_uuid)
        return container.gateway_address if container.state == RUNNING else ""


def make_cluster(directory: str, service_port: int) -> Cluster:
    store = RegistryStore(
        os.path.join(directory, "registry.sqlite"), CLUSTER_ID, system_root_token=ROOT_TOKEN
    )
    user = store.create_user("E2E Tester")
    token, _ = store.create_token(user.uuid)
    request = store.create_container_request(
        user.uuid, name="e2e", published_ports={service_port: {"access": "private"}}
    )
    return Cluster(store, user, token, request, service_port)


def dispatch_json(secret: str | None, address: str = "127.0.0.1:0") -> bytes:
    """The dispatcher's JSON a gateway reads on stdin (without a secret when C{None})."""
    env: dict[str, str] = {"GatewayAddress": address}
    if secret is not None:
        env["GatewayAuthSecret"] = secret
    return json.dumps({"Env": env}).encode() + b"\n"


# --- Connection bookkeeping ----------------------------------------------------------------------


class ConnectionTracker:
    """
    Remembers the protocols a factory builds, so a test can wait until every one of them has
    seen its connection close.
    """

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def wrap(self, factory: Any) -> Any:
        return _TrackingFactory(factory, self)

    async def disconnected(self, reactor: Any) -> None:
        """Fires once every tracked connection has closed."""
        await wait_for(
            reactor,
            lambda: (
                not any(p.transport is not None and p.transport.connected for p in self.protocols)
            ),
            "connections to close",
            timeout=15.0,
            interval=0.01,
        )


class _TrackingFactory:
    def __init__(self, factory: Any, tracker: ConnectionTracker) -> None:
        self._factory = factory
        self._tracker = tracker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)

    def buildProtocol(self, addr: Any) -> Any:
        built = self._factory.buildProtocol(addr)
        if built is not None:
            self._tracker.protocols.append(built)
        return built


@implementer(iweb.IAgentEndpointFactory)
class TrackingEndpoints:
    """
    An Agent endpoint factory for loopback: plain TCP, or TLS pinned to C{secret}'s key; every
    connection tracked.
    """

    def __init__(self, reactor: Any, secret: str | None = None) -> None:
        self._reactor = reactor
        self._secret = secret
        self.tracker = ConnectionTracker()

    def endpointForURI(self, uri: URI) -> Any:
        assert uri.host == b"127.0.0.1", uri.host
        endpoint: Any = TCP4ClientEndpoint(self._reactor, "127.0.0.1", uri.port, timeout=10)
        if uri.scheme == b"https":
            assert self._secret is not None
            endpoint = wrapClientTLS(client_creator(self._secret), endpoint)
        return _TrackingEndpoint(endpoint, self.tracker)


class _TrackingEndpoint:
    def __init__(self, endpoint: Any, tracker: ConnectionTracker) -> None:
        self._endpoint = endpoint
        self._tracker = tracker

    def connect(self, factory: Any) -> Any:
        return self._endpoint.connect(self._tracker.wrap(factory))


class Client:
    """
    An HTTP client for loopback with its own connection pool and no cookie jar, no redirects.
    """

    def __init__(self, reactor: Any, secret: str | None = None) -> None:
        self._reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.endpoints = TrackingEndpoints(reactor, secret)
        self.agent = Agent.usingEndpointFactory(reactor, self.endpoints, pool=self.pool)

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers | dict[bytes, list[bytes]] | None = None,
        body: iweb.IBodyProducer | None = None,
    ) -> defer.Deferred[iweb.IResponse]:
        if isinstance(headers, dict):
            headers = Headers(headers)
        return self.agent.request(method, url, headers, body)

    async def fetch(
        self,
        method: bytes,
        url: bytes,
        headers: Headers | dict[bytes, list[bytes]] | None = None,
        body: bytes | None = None,
    ) -> tuple[iweb.IResponse, bytes]:
        """Send a request (with a small in-memory body) and read the whole response."""
        producer = BytesProducer(body) if body is not None else None
        response = await self.request(method, url, headers, producer)
        received = Collect()
        response.deliverBody(received)
        return response, await received.done

    async def close(self) -> None:
        await self.pool.closeCachedConnections()
        await self.endpoints.tracker.disconnected(self._reactor)


# --- Bodies --------------------------------------------------------------------------------------

PATTERN_CHUNK = 256 * 1024
_PATTERN = hashlib.shake_256(b"arvproxy end-to-end pattern").digest(PATTERN_CHUNK)


def pattern_chunks(size: int, chunk: int = PATTERN_CHUNK) -> Iterator[bytes]:
    """
    C{size} bytes of a pattern in which every chunk differs (its index is in its first 8
    bytes), so a lost, repeated or reordered chunk changes the SHA-256.
    """
    index = 0
    sent = 0
    while sent < size:
        piece = (struct.pack(">Q", index) + _PATTERN[8:chunk])[: size - sent]
        yield piece
        sent += len(piece)
        index += 1


@implementer(iweb.IBodyProducer)
class BytesProducer:
    """A small request body, written at once."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(iweb.IBodyProducer, IPushProducer)
class PatternBodyProducer:
    """
    A request body of C{size} pattern bytes, generated as the connection takes them (with
    C{Content-Length}, or chunked when C{chunked}), hashing what it sends.
    """

    def __init__(self, size: int, chunked: bool = False) -> None:
        self.size = size
        self.length: Any = iweb.UNKNOWN_LENGTH if chunked else size
        self.sent = 0
        self.sha256 = hashlib.sha256()
        self._task: task.CooperativeTask | None = None

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        def produce() -> Iterator[None]:
            for piece in pattern_chunks(self.size):
                self.sha256.update(piece)
                self.sent += len(piece)
                consumer.write(piece)
                yield None

        self._task = task.cooperate(produce())
        d = self._task.whenDone()
        d.addCallback(lambda _: None)
        return d

    def pauseProducing(self) -> None:
        if self._task is not None:
            self._task.pause()

    def resumeProducing(self) -> None:
        if self._task is not None:
            self._task.resume()

    def stopProducing(self) -> None:
        if self._task is not None:
            try:
                self._task.stop()
            except task.TaskDone:
                pass


class Collect(protocol.Protocol):
    """Collects a response body; C{done} fires with it, or fails if the body was cut short."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(bytes(self.data))
        else:
            self.done.errback(reason)


class HashBody(protocol.Protocol):
    """
    Counts and hashes a response body as it arrives.  With C{pause_after}, it stops reading
    once that many bytes have arrived, until L{resume} (or L{abort}).

    @ivar done: fires with C{(count, hex sha256)} at a clean end, fails otherwise.
    @ivar paused: fires when reading has been paused.
    """

    transport: Any

    def __init__(self, pause_after: int | None = None) -> None:
        self.count = 0
        self.sha256 = hashlib.sha256()
        self.done: defer.Deferred[tuple[int, str]] = defer.Deferred()
        self.paused: defer.Deferred[None] = defer.Deferred()
        self._pause_after = pause_after

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.sha256.update(data)
        if self._pause_after is not None and self.count >= self._pause_after:
            self._pause_after = None
            self.transport.pauseProducing()
            self.paused.callback(None)

    def resume(self) -> None:
        self.transport.resumeProducing()

    def abort(self) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback((self.count, self.sha256.hexdigest()))
        else:
            self.done.errback(reason)


# --- The service inside the "container" ----------------------------------------------------------


@dataclass
class Received:
    """One request as the service saw it."""

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, list[bytes]]]
    body_length: int
    body_sha256: str
    body_prefix: bytes

    def header(self, name: bytes) -> list[bytes]:
        for key, values in self.headers:
            if key == name.lower():
                return values
        return []

    def names(self) -> set[bytes]:
        return {key for key, _ in self.headers}

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method.decode("latin-1"),
            "uri": self.uri.decode("latin-1"),
            "headers": [
                [k.decode("latin-1"), [v.decode("latin-1") for v in vs]] for k, vs in self.headers
            ],
            "body_length": self.body_length,
            "body_sha256": self.body_sha256,
        }


BODY_PREFIX = 64 * 1024


class _SinkRequest(server.Request):
    """A request whose body is counted and hashed as it arrives, never spooled to disk."""

    content: Any

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        self.body_length = 0
        self.body_sha256 = hashlib.sha256()

    def handleContentChunk(self, data: bytes) -> None:
        self.body_length += len(data)
        self.body_sha256.update(data)
        room = BODY_PREFIX - self.content.tell()
        if room > 0:
            self.content.write(data[:room])


class _TrackingChannel(http.HTTPChannel):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.append(self)


class ServiceSite(server.Site):
    """
    The web service inside the container:

      - C{/download/<n>}: C{n} pattern bytes with C{Content-Length}, produced as the connection
        drains (L{downloads} records each one);
      - anything else: a JSON echo of the method, URI, headers and body size and SHA-256.

    Every request is recorded in L{received}.
    """

    protocol = _TrackingChannel  # type: ignore[assignment]

    def __init__(self, reactor: Any) -> None:
        super().__init__(_ServiceResource(self), reactor=reactor)
        self.requestFactory = _SinkRequest
        self.received: list[Received] = []
        self.downloads: list[PatternDownload] = []
        self.connections: list[Any] = []
        self.port: Any = None

    def log(self, request: Any) -> None:
        pass

    def listen(self, reactor: Any, tls: Any = None) -> int:
        """Listen on 127.0.0.1 (with TLS when C{tls} is a context factory); return the port."""
        if tls is None:
            self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        else:
            self.port = reactor.listenSSL(0, self, tls, interface="127.0.0.1")
        return int(self.port.getHost().port)

    async def stop(self, reactor: Any) -> None:
        if self.port is not None:
            await self.port.stopListening()
        for channel in self.connections:
            if channel.transport is not None and channel.transport.connected:
                channel.transport.loseConnection()
        await wait_for(
            reactor,
            lambda: not any(c.transport.connected for c in self.connections),
            "service connections to close",
            timeout=15.0,
            interval=0.01,
        )

    def uris(self) -> list[bytes]:
        return [r.uri for r in self.received]


class _ServiceResource(resource.Resource):
    isLeaf = True

    def __init__(self, site: ServiceSite) -> None:
        super().__init__()
        self._site = site

    def render(self, request: Any) -> Any:
        record = Received(
            method=request.method,
            uri=request.uri,
            headers=[(k.lower(), list(v)) for k, v in request.requestHeaders.getAllRawHeaders()],
            body_length=request.body_length,
            body_sha256=request.body_sha256.hexdigest(),
            body_prefix=request.content.getvalue(),
        )
        self._site.received.append(record)
        if request.path.startswith(b"/download/"):
            size = int(request.path.rsplit(b"/", 1)[1])
            download = PatternDownload(request, size)
            self._site.downloads.append(download)
            return server.NOT_DONE_YET
        body = json.dumps(record.as_json()).encode()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % (len(body),))
        return body


@implementer(IPullProducer)
class PatternDownload:
    """
    Writes C{size} pattern bytes to a request, one chunk each time the connection asks.

    @ivar finished: fires with C{True} when the whole body was written, C{False} when the
        connection was lost first.
    """

    def __init__(self, request: Any, size: int) -> None:
        self.request = request
        self.size = size
        self.sent = 0
        self.sha256 = hashlib.sha256()
        self.finished: defer.Deferred[bool] = defer.Deferred()
        self._chunks = pattern_chunks(size)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % (size,))
        request.notifyFinish().addBoth(self._ended)
        request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.finished.called:
            return
        piece = next(self._chunks, None)
        if piece is None:
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.sent += len(piece)
        self.sha256.update(piece)
        self.request.write(piece)

    def stopProducing(self) -> None:
        pass

    def _ended(self, result: Any) -> None:
        if not self.finished.called:
            self.finished.callback(not isinstance(result, Failure))


# --- Memory and file watching --------------------------------------------------------------------


@dataclass
class Watch:
    """
    Samples processes' RSS and open temporary files while something runs.

    @ivar peak: the largest RSS seen per process name.
    @ivar temporary: temporary files seen open per process name.
    """

    processes: list[Twistd]
    baseline: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    temporary: dict[str, set[str]] = field(default_factory=dict)
    samples: int = 0

    def sample(self) -> None:
        self.samples += 1
        for p in self.processes:
            if p.running:
                self.peak[p.name] = max(self.peak.get(p.name, 0), p.rss())
                self.temporary.setdefault(p.name, set()).update(p.temporary_files())

    def growth(self) -> dict[str, int]:
        """Peak minus baseline, per process, in bytes."""
        return {name: self.peak[name] - self.baseline[name] for name in self.baseline}

    async def during(self, reactor: Any, work: Awaitable[Any], interval: float = 0.1) -> Any:
        """Record the baseline, then sample every C{interval} seconds until C{work} is done."""
        self.baseline = {p.name: p.rss() for p in self.processes}
        self.peak = dict(self.baseline)
        loop = task.LoopingCall(self.sample)
        loop.clock = reactor
        loop.start(interval, now=True)
        try:
            return await work
        finally:
            loop.stop()
            self.sample()


# --- Raw bytes ----------------------------------------------------------------------------------


class _RawCollector(protocol.Protocol):
    transport: Any

    def __init__(self, data: bytes, then: bytes) -> None:
        self._data = data
        self._then = then
        self.received = bytearray()
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._then and b"\r\n\r\n" in self.received:
            then, self._then = self._then, b""
            self.transport.write(then)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(bytes(self.received))


async def raw_exchange(
    reactor: Any,
    port: int,
    data: bytes,
    then: bytes = b"",
    timeout: float = 15.0,
    secret: str | None = None,
) -> bytes:
    """
    Send C{data} as is to 127.0.0.1:C{port} (and C{then} once the head of a response has
    arrived) and return everything received until the server closes the connection.

    @param secret: speak TLS pinned to this container secret's key (to a gateway).
    @raise AssertionError: the server kept the connection open for C{timeout} seconds.
    """
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    if secret is not None:
        endpoint = wrapClientTLS(client_creator(secret), endpoint)
    collector = _RawCollector(data, then)
    await endpoint.connect(protocol.Factory.forProtocol(lambda: collector))
    timer = reactor.callLater(timeout, collector.transport.abortConnection)
    received = await collector.closed
    if not timer.active():
        raise AssertionError(f"the server kept the connection open; it sent {received!r}")
    timer.cancel()
    return received


def status_codes(raw: bytes) -> list[int]:
    """
    The status codes of the responses in C{raw}: every line that starts like a status line
    (C{HTTP/1.1 <code>}), after CRLF or a bare LF (a body may end with either).
    """
    return [int(code) for code in re.findall(rb"(?:^|\n)HTTP/1\.[01] ([0-9]{3})", raw)]


# --- The whole chain -----------------------------------------------------------------------------


@dataclass
class Chain:
    """
    A running system: the service site in this process, the registry, the controller and the
    container's gateway as twistd subprocesses, and a client.
    """

    directory: str
    service: ServiceSite
    cluster: Cluster
    config: str
    controller_port: int
    controller: Twistd
    gateway: Twistd
    client: Client

    @property
    def vhost(self) -> bytes:
        """The Host of the container request's service, as a browser sends it."""
        label = f"{self.cluster.request.uuid}-{self.cluster.port}"
        return f"{label}.{SUFFIX}:{self.controller_port}".encode()

    @property
    def gateway_port(self) -> int:
        return int(self.cluster.gateway_address().rsplit(":", 1)[1])

    def url(self, path: bytes = b"/") -> bytes:
        return b"http://127.0.0.1:%d%s" % (self.controller_port, path)

    def headers(self, cookie: bool = True, **extra: Any) -> Headers:
        """
        Headers for a request to the service: its Host, the token cookie (unless not
        C{cookie}) and C{extra} (C{x_forwarded_for=[...]}; C{cookie_=[...]} for C{Cookie}).
        """
        headers = Headers({b"host": [self.vhost]})
        if cookie:
            headers.setRawHeaders(b"cookie", [self.cluster.cookie()])
        for name, values in extra.items():
            headers.setRawHeaders(name.rstrip("_").replace("_", "-").encode(), values)
        return headers

    async def get(self, path: bytes = b"/", **extra: Any) -> tuple[Any, bytes]:
        """GET C{path} from the service through the controller, with the token cookie."""
        return await self.client.fetch(b"GET", self.url(path), self.headers(**extra))


async def start_chain(
    testcase: Any, reactor: Any, controller_args: Iterable[str] = (), **arvproxy: Any
) -> Chain:
    """
    Start everything for C{testcase} (in a fresh temporary directory), registering cleanups that
    stop it all and wait for every connection to close; keyword arguments are extra keys of the
    configuration's C{ArvProxy} section.
    """
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    service = ServiceSite(reactor)
    service_port = service.listen(reactor)
    testcase.addCleanup(service.stop, reactor)
    cluster = make_cluster(directory, service_port)
    testcase.addCleanup(cluster.store.close)
    controller_port = free_port()
    config = write_config(directory, controller_port, **arvproxy)

    client = Client(reactor)
    testcase.addCleanup(client.close)
    controller, gateway = await start_plugins(
        reactor, testcase, directory, config, cluster, controller_port, controller_args
    )
    return Chain(directory, service, cluster, config, controller_port, controller, gateway, client)


async def start_plugins(
    reactor: Any,
    testcase: Any,
    directory: str,
    config: str,
    cluster: Cluster,
    controller_port: int,
    controller_args: Iterable[str] = (),
) -> tuple[Twistd, Twistd]:
    """
    Start the controller (on C{controller_port}, with C{controller_args}) and the gateway of
    C{cluster}'s container, stopped by the test's cleanups; return once both serve.
    """
    controller = Twistd.spawn(
        reactor,
        directory,
        "controller",
        ["arv-controller-proxy", "--config", config, *controller_args],
    )
    testcase.addCleanup(controller.stop, reactor)
    gateway = start_gateway(reactor, testcase, directory, config, cluster)
    await wait_for(reactor, lambda: accepting(controller_port), "the controller", [controller])
    await wait_for(reactor, cluster.gateway_address, "the gateway", [gateway])
    return controller, gateway


def start_gateway(
    reactor: Any, testcase: Any, directory: str, config: str, cluster: Cluster
) -> Twistd:
    gateway = Twistd.spawn(
        reactor,
        directory,
        "gateway",
        ["crunch-run-gateway", "--config", config, "--container-uuid", cluster.container_uuid],
        stdin=dispatch_json(cluster.secret),
    )
    testcase.addCleanup(gateway.stop, reactor)
    return gateway


def listen_tracked(testcase: Any, reactor: Any, factory: Any) -> int:
    """
    Listen on 127.0.0.1 with C{factory} for C{testcase}, and return the port; the cleanup
    stops listening, aborts every connection the factory served and waits until all are gone.
    """
    tracker = ConnectionTracker()
    port = reactor.listenTCP(0, tracker.wrap(factory), interface="127.0.0.1")

    async def stop() -> None:
        await port.stopListening()
        for p in tracker.protocols:
            if p.transport is not None and p.transport.connected:
                p.transport.abortConnection()
        await tracker.disconnected(reactor)

    testcase.addCleanup(lambda: defer.ensureDeferred(stop()))
    return int(port.getHost().port)
