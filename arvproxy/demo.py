"""
C{make run}: the whole chain on one machine, in the foreground, until Ctrl-C.

With a Docker engine (and root, to enter the container's network namespace):

  1. the controller, C{twistd arv-controller-proxy}, as configured (conf/local.yml: port 8900);
  2. a container request in the embedded registry for a real Docker container (the image
     C{scripts/build-test-image} builds; see L{arvproxy.demo_docker}) publishing port 8080,
     owned by a demo user whose token is kept in C{var/demo.json} and reused from run to run;
  3. the local dispatcher, C{twistd arv-local-dispatcher}, which locks that container and starts
     its gateway (C{crunch-run-gateway --runtime docker}); the gateway creates the container
     with no network, and serves its port from inside the container's network namespace.

Without one, the demo says so (with the fix) and falls back to what it did before real
containers: the demo page on a free loopback port, served by this process
(L{start_host_container}), and a gateway with the C{host} runtime that this process starts,
given the dispatcher's JSON on its standard input as Arvados' dispatcher does.

Once the container is Running, the URL that opens the page through the proxy is printed.  The
children's output goes to C{var/log/*.log} (the dispatcher's holds its gateways' too).  A child
that fails to start ends the demo with status 1 and says where to look; Ctrl-C cancels the
container (its gateway stops and removes it) and stops everything.

L{Child}, L{start_controller} and L{start_gateway} are also what the browser tests use to run
the real twistd plugins.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import IO, Any

from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import IReactorProcess, IReactorTCP
from twisted.internet.threads import deferToThread
from twisted.protocols import policies
from twisted.python.failure import Failure
from twisted.web import resource, server

from arvproxy import backends, demo_docker, policy
from arvproxy.backends.embedded import EmbeddedRegistry
from arvproxy.config import ClusterConfig, ConfigError, load_config
from arvproxy.errors import ProxyError
from arvproxy.gateway.docker_runtime import docker_name

DEFAULT_CONFIG = os.path.join("conf", "local.yml")
STATE_FILE = "demo.json"
DEMO_USER = "arvproxy demo user"

# What the plugins log once they are ready (arvproxy.service and arvproxy.gateway.tap).
LISTENING = b"Listening on "
RUNNING = b" is Running; gateway at "
# What twistd logs once it has made the service (its options, engine checks included, passed).
STARTED = b"reactor class: "

# The source tree holding this package, so the children's twistd finds its plugins there.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Child processes ------------------------------------------------------------------------


class ChildFailed(Exception):
    """A child process ended before it said it was ready."""

    def __init__(self, name: str, status: str, log_path: str, tail: str) -> None:
        super().__init__(f"{name} {status} before it was ready; see {log_path}")
        self.name = name
        self.log_path = log_path
        self.tail = tail


class Child(protocol.ProcessProtocol):
    """
    A child process whose output (stdout and stderr) goes to a log file, and which is ready once
    a line of its output contains C{marker}.

    @ivar ready: fires with the first line containing C{marker}; fails with L{ChildFailed} if the
        process ends first.
    @ivar exit_code: the exit code once ended (C{None} while running or when a signal ended it).
    @ivar stdin_data: written to the child's standard input at start, which is then closed.
    """

    def __init__(self, name: str, log_path: str, marker: bytes, stdin_data: bytes = b"") -> None:
        self.name = name
        self.log_path = log_path
        self.marker = marker
        self.stdin_data = stdin_data
        self.ready: defer.Deferred[str] = defer.Deferred()
        self.exit_code: int | None = None
        self.running = False
        self.has_ended = False
        self._waiters: list[defer.Deferred[Child]] = []
        self._line_waiters: list[tuple[bytes, defer.Deferred[str]]] = []
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in processEnded
        self._partial = b""
        self._tail: list[bytes] = []

    def connectionMade(self) -> None:
        self.running = True
        assert self.transport is not None
        if self.stdin_data:
            self.transport.write(self.stdin_data)
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._log.write(data)
        self._log.flush()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._tail = (self._tail + [line])[-20:]
            if not self.ready.called and self.marker in line:
                self.ready.callback(line.decode("utf-8", "replace"))
            for waiter in [w for w in self._line_waiters if w[0] in line]:
                self._line_waiters.remove(waiter)
                waiter[1].callback(line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        self._log.close()
        value = reason.value
        self.exit_code = getattr(value, "exitCode", None)
        signal = getattr(value, "signal", None)
        status = (
            f"was killed by signal {signal}" if signal else f"exited with status {self.exit_code}"
        )
        if not self.ready.called:
            tail = b"\n".join(self._tail + [self._partial]).decode("utf-8", "replace")
            self.ready.errback(ChildFailed(self.name, status, self.log_path, tail))
        self.has_ended = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self)

    def when_ended(self) -> defer.Deferred[Child]:
        """A new Deferred that fires with this child once its process has ended."""
        if self.has_ended:
            return defer.succeed(self)
        waiter: defer.Deferred[Child] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def wait_for_line(self, text: bytes) -> defer.Deferred[str]:
        """
        A new Deferred that fires with the next line of output containing C{text}; it never
        fires if the process ends first.
        """
        waiter: defer.Deferred[str] = defer.Deferred()
        self._line_waiters.append((text, waiter))
        return waiter

    def stop(self, reactor: Any, grace: float = 10.0) -> defer.Deferred[None]:
        """
        Ask the process to stop (SIGTERM), kill it if it is still there after C{grace} seconds.

        @return: fires once it has ended.
        """
        done = self.when_ended()
        if self.running:
            self._signal("TERM")
            killer = reactor.callLater(grace, self._signal, "KILL")
            done.addBoth(lambda result: killer.active() and killer.cancel())
        return done.addCallback(lambda _: None)

    def _signal(self, name: str) -> None:
        assert self.transport is not None
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


def twistd_command() -> list[str]:
    """How to run the twistd of this Python environment."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def child_environment() -> dict[str, str]:
    """Our environment, with this source tree first on C{PYTHONPATH} (twistd finds the plugins)."""
    env = dict(os.environ)
    paths = [SOURCE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def spawn_twistd(
    reactor: IReactorProcess, child: Child, plugin: str, arguments: Sequence[str]
) -> Child:
    """Start C{twistd -n <plugin> <arguments>} in the foreground, logging to C{child}."""
    command = [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile=-", plugin, *arguments]
    reactor.spawnProcess(
        child,
        command[0],
        command,
        env=child_environment(),
        path=SOURCE_ROOT,
        childFDs={0: "w", 1: "r", 2: "r"},
    )
    return child


def start_controller(
    reactor: IReactorProcess, config_path: str, log_path: str, listen: str | None = None
) -> Child:
    """Start C{twistd arv-controller-proxy}; it is ready once it listens."""
    arguments = ["--config", config_path, "--access-log"]
    if listen is not None:
        arguments += ["--listen", listen]
    return spawn_twistd(
        reactor, Child("controller", log_path, LISTENING), "arv-controller-proxy", arguments
    )


def start_dispatcher(
    reactor: IReactorProcess, config_path: str, log_path: str, poll_interval: float = 0.5
) -> Child:
    """
    Start C{twistd arv-local-dispatcher} (Docker runtime); it is ready once twistd has made its
    service, that is once its options and its engine checks have passed.
    """
    arguments = ["--config", config_path, "--runtime", "docker"]
    arguments += ["--poll-interval", str(poll_interval)]
    return spawn_twistd(
        reactor, Child("dispatcher", log_path, STARTED), "arv-local-dispatcher", arguments
    )


def start_gateway(
    reactor: IReactorProcess,
    config: ClusterConfig,
    config_path: str,
    container_uuid: str,
    log_path: str,
    runtime_arguments: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> Child:
    """
    Start C{twistd crunch-run-gateway} for a container, handing it the dispatcher's JSON (a
    random port on C{host} and the container's secret) on standard input.  It is ready once it
    has marked the container Running.
    """
    dispatch = {
        "Env": {
            "GatewayAddress": f"{host}:0",
            "GatewayAuthSecret": policy.gateway_secret(config.system_root_token, container_uuid),
        }
    }
    child = Child("gateway", log_path, RUNNING, json.dumps(dispatch).encode("ascii") + b"\n")
    arguments = ["--config", config_path, "--container-uuid", container_uuid, *runtime_arguments]
    return spawn_twistd(reactor, child, "crunch-run-gateway", arguments)


# --- The demo web service -------------------------------------------------------------------


@dataclass(frozen=True)
class SeenRequest:
    """A request as the service received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class DemoService:
    """
    What the demo page's server remembers: every request it received, and the counter that the
    page's script fetches.
    """

    requests: list[SeenRequest] = field(default_factory=list)
    count: int = 0


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>arvproxy demo service</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem;
       color: #1b1b1b; }}
h1 {{ font-size: 1.5rem; margin-bottom: .25rem; }}
.sub {{ color: #555; margin-top: 0; }}
.checks {{ list-style: none; padding: 0; }}
.checks li {{ padding: .35rem .75rem; margin: .3rem 0; border-left: 4px solid; }}
.ok {{ border-color: #2e7d32; background: #edf7ee; }}
.bad {{ border-color: #c62828; background: #fdecea; }}
.counter {{ font-size: 1.2rem; padding: .75rem 1rem; background: #f3f6fa;
           border-left: 4px solid #1a5fb4; }}
#counter {{ font-weight: bold; font-variant-numeric: tabular-nums; }}
table {{ border-collapse: collapse; width: 100%; font-size: 13px; }}
th, td {{ text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #ddd;
          vertical-align: top; }}
td {{ font-family: ui-monospace, monospace; word-break: break-all; }}
</style>
</head>
<body>
<h1>Hello from inside the container</h1>
<p class="sub">This page is served by a web service in a container, reached through
arvproxy: controller &rarr; node gateway &rarr; this service.</p>
<p><strong>{method}</strong> <code>{path}</code> for host <code>{host}</code></p>
<ul class="checks">
{checks}
</ul>
<p class="counter">Live counter, fetched through the proxy every second:
<span id="counter">not yet</span> <span id="counter-status"></span></p>
<h2>Headers this service received</h2>
<table>
<tr><th>Name</th><th>Value</th></tr>
{rows}
</table>
<script>
const counter = document.getElementById("counter");
const counterStatus = document.getElementById("counter-status");
async function tick() {{
  try {{
    const response = await fetch("counter", {{cache: "no-store"}});
    const data = await response.json();
    counter.textContent = String(data.count);
    counterStatus.textContent = "(HTTP " + response.status + ")";
  }} catch (e) {{
    counterStatus.textContent = "(fetch failed: " + e + ")";
  }}
}}
tick();
setInterval(tick, 1000);
</script>
</body>
</html>
"""


def _checks(seen: SeenRequest) -> list[tuple[bool, str]]:
    cookies = "; ".join(seen.header("cookie"))
    token_leaked = policy.TOKEN_COOKIE.decode() in cookies
    forwarded = {
        name: seen.header(name)
        for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
    }
    arvados = sorted({k.lower() for k, _ in seen.headers if k.lower().startswith("x-arvados-")})
    return [
        (
            not token_leaked,
            "No arvados_api_token cookie reached this service"
            if not token_leaked
            else "The arvados_api_token cookie reached this service!",
        ),
        (
            all(forwarded.values()),
            "X-Forwarded-* set by the proxy: "
            + ", ".join(
                f"{k[12:].title()}={', '.join(v) or '(missing)'}" for k, v in forwarded.items()
            ),
        ),
        (
            not arvados,
            "No x-arvados-* header reached this service"
            if not arvados
            else "x-arvados-* headers reached this service: " + ", ".join(arvados),
        ),
    ]


def render_page(seen: SeenRequest) -> bytes:
    """The demo page for a request: what the service received."""
    checks = "\n".join(
        f'<li class="{"ok" if ok else "bad"}">{"&#10004;" if ok else "&#10008;"} {escape(t)}</li>'
        for ok, t in _checks(seen)
    )
    rows = "\n".join(
        f"<tr><th>{escape(name)}</th><td>{escape(_redact(name, value))}</td></tr>"
        for name, value in sorted(seen.headers, key=lambda item: item[0].lower())
    )
    host = (seen.header("host") or ["(none)"])[0]
    return _PAGE.format(
        method=escape(seen.method),
        path=escape(seen.path),
        host=escape(host),
        checks=checks,
        rows=rows,
    ).encode("utf-8")


def _redact(name: str, value: str) -> str:
    """A header value to show: a token that should never have arrived is not shown either."""
    if name.lower() == "cookie" and policy.TOKEN_COOKIE.decode() in value:
        return "(contains arvados_api_token: redacted)"
    return value


class DemoResource(resource.Resource):
    """C{/counter} answers the script's fetches with JSON; every other path gets the page."""

    isLeaf = True

    def __init__(self, service: DemoService) -> None:
        super().__init__()
        self.service = service

    def render(self, request: server.Request) -> bytes:
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        seen = SeenRequest(request.method.decode("latin-1"), request.uri.decode("latin-1"), headers)
        self.service.requests.append(seen)
        request.setHeader(b"cache-control", b"no-store")
        if request.path.rstrip(b"/").endswith(b"/counter"):
            self.service.count += 1
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"count": self.service.count}).encode("ascii")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return render_page(seen)


# --- The "container" ------------------------------------------------------------------------


@dataclass
class RunningContainer:
    """
    A started container, as the rest of the demo needs it.

    @ivar port: the port of its web service (inside the container).
    @ivar gateway_arguments: the options that tell the gateway how to reach it.
    @ivar service: what the service has seen, when it runs in this process (else C{None}).
    @ivar stop: stops it; may return a Deferred.
    """

    port: int
    gateway_arguments: list[str]
    service: DemoService | None
    stop: Callable[[], Any]


def start_host_container(reactor: IReactorTCP) -> RunningContainer:
    """
    The demo page on a free loopback port of this machine, served by this process: the "host"
    runtime's idea of a container.  Stopping it closes its port and its open connections.
    """
    service = DemoService()
    site = server.Site(DemoResource(service), reactor=reactor)
    site.displayTracebacks = False
    connections = _Connections(site)
    port = reactor.listenTCP(0, connections, interface="127.0.0.1")  # type: ignore[arg-type]

    async def stop() -> None:
        await defer.maybeDeferred(port.stopListening)
        await connections.close_all()

    return RunningContainer(
        port=port.getHost().port,  # type: ignore[attr-defined]
        gateway_arguments=["--runtime", "host"],
        service=service,
        stop=lambda: defer.ensureDeferred(stop()),
    )


class _Connections(policies.WrappingFactory):
    """Keeps the open connections, so that they can all be closed and waited for."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._closed: dict[Any, defer.Deferred[None]] = {}

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self._closed[p] = defer.Deferred()

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        closed = self._closed.pop(p, None)
        if closed is not None:
            closed.callback(None)

    async def close_all(self) -> None:
        waiting = list(self._closed.values())
        for p in list(self.protocols):
            p.transport.loseConnection()
        await defer.gatherResults(waiting)


# --- The demo itself ------------------------------------------------------------------------


async def demo_credentials(registry: EmbeddedRegistry, state_path: str) -> tuple[str, str]:
    """
    The demo user's UUID and token: those saved in C{state_path} while the token still works,
    else a new user and token, saved there (readable only by its owner).
    """
    try:
        with open(state_path) as f:
            state = json.load(f)
        credentials = await registry.authenticate(state["token"])
        if credentials.user_uuid == state["user_uuid"]:
            return state["user_uuid"], state["token"]
    except (OSError, ValueError, KeyError, TypeError, ProxyError):
        pass
    user = await registry.create_user(DEMO_USER)
    token, _ = await registry.create_token(user.uuid)
    fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"user_uuid": user.uuid, "token": token}, f, indent=2)
    return user.uuid, token


def service_url(
    config: ClusterConfig, request_uuid: str, port: int, token: str | None = None
) -> str:
    """The URL of port C{port} of a container request, with a token to sign in when given."""
    url = config.external_url.url_for(f"{request_uuid}-{port}")
    if not url.endswith("/"):
        url += "/"
    return url + (f"?arvados_api_token={token}" if token else "")


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class DemoFailed(Exception):
    """The demo's container could not be started; the message says why and where to look."""


@dataclass
class DemoContainer:
    """What the demo started, for the summary it prints."""

    request_uuid: str
    container_uuid: str
    port: int
    logs: str
    description: str


async def choose_runtime(reactor: Any, wanted: str) -> str:
    """
    C{"docker"} when C{wanted} is C{"docker"} or C{"auto"} and this machine can run the demo's
    Docker container (building its image if needed), else C{"host"}, saying why and how to fix
    it.

    @raise SystemExit: C{wanted} is C{"docker"} and Docker cannot be used.
    """
    if wanted == "host":
        return "host"
    problem = await deferToThread(demo_docker.runtime_problem)
    if problem is None and not await deferToThread(demo_docker.image_exists):
        _say(f"Building the demo's image {demo_docker.DEMO_IMAGE} (once; scripts/build-test-image)")
        problem = await deferToThread(demo_docker.build_image)
    if problem is None:
        return "docker"
    what, fix = problem
    if wanted == "docker":
        raise SystemExit(f"arvproxy demo: cannot run a Docker container here: {what}.\n  {fix}.")
    _say(
        f"""
arvproxy demo: NO DOCKER CONTAINER this time: {what}.
  To get one: {fix}.
Meanwhile the demo page is served by this process on a loopback port (the gateway's "host"
runtime), and no dispatcher is started.
"""
    )
    return "host"


async def run_demo(reactor: Any, config_path: str, runtime: str = "auto") -> None:
    try:
        config = load_config(config_path)
    except ConfigError as e:
        raise SystemExit(f"arvproxy demo: {e}") from None
    var = os.path.dirname(config.registry_path)
    logs = os.path.join(var, "log")
    os.makedirs(logs, exist_ok=True)

    stoppers: list[Callable[[], Any]] = []  # run in reverse order at shutdown
    stopping = False

    async def stop_all() -> None:
        nonlocal stopping
        stopping = True
        while stoppers:
            try:
                await defer.maybeDeferred(stoppers.pop())
            except Exception as e:  # keep stopping the rest
                _say(f"arvproxy demo: while stopping: {e}")

    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(stop_all()))
    reactor.callWhenRunning(_stop_on_signals, reactor)

    runtime = await choose_runtime(reactor, runtime)
    registry = EmbeddedRegistry.from_config(reactor, config)
    registry.start()
    stoppers.append(registry.stop)
    user_uuid, token = await demo_credentials(registry, os.path.join(var, STATE_FILE))

    children: list[Child] = []
    try:
        if runtime == "docker":
            _say(
                "Starting the controller and the local dispatcher (it starts the gateway, which "
                f"starts the Docker container); their logs are in {logs}/"
            )
        else:
            _say(f"Starting the controller and the gateway; their logs are in {logs}/")
        controller = start_controller(
            reactor, os.path.abspath(config_path), os.path.join(logs, "controller.log")
        )
        children.append(controller)
        stoppers.append(lambda: controller.stop(reactor))
        await controller.ready
        start = _start_docker_container if runtime == "docker" else _start_host_container
        started = await start(
            reactor,
            config,
            os.path.abspath(config_path),
            registry,
            user_uuid,
            logs,
            children,
            stoppers,
            lambda: stopping,
        )
    except ChildFailed as e:
        if stopping:  # Ctrl-C while starting
            return
        _say(f"\narvproxy demo: the {e.name} failed to start: {e}\n--- last lines of {e.log_path}:")
        _say(e.tail.rstrip())
        if "Address already in use" in e.tail:
            _say("--- (is another program, maybe another `make run`, already listening there?)")
        raise SystemExit(1) from None
    except DemoFailed as e:
        if stopping:
            return
        _say(f"\narvproxy demo: {e}")
        raise SystemExit(1) from None
    if started is None:  # Ctrl-C while starting
        return

    url = service_url(config, started.request_uuid, started.port, token)
    plain = service_url(config, started.request_uuid, started.port)
    _say(
        f"""
arvproxy demo is running (Ctrl-C stops it).

  Demo user     {user_uuid}   (token saved in {os.path.join(var, STATE_FILE)})
  Container     {started.container_uuid}   Running, gateway logs in {started.logs}
  Request       {started.request_uuid}   publishes port {started.port}
  Runs as       {started.description}

Open the demo page in Chromium or Firefox (both send *.localhost to this machine):

  {url}

The token moves into a cookie and leaves the address bar.  The same from a terminal:

  curl -sSL -c /tmp/arvproxy-cookies '{url}'

Without a token the page answers 401:   curl -i '{plain}'
"""
    )

    # Until Ctrl-C (the shutdown trigger stops everything), or until a child dies.
    child = await defer.DeferredList(
        [c.when_ended() for c in children], fireOnOneCallback=True, consumeErrors=True
    )
    if not stopping:
        first: Child = child[0]
        status = first.exit_code
        _say(f"arvproxy demo: the {first.name} stopped (status {status}); see {first.log_path}")
        raise SystemExit(1)


async def _start_host_container(
    reactor: Any,
    config: ClusterConfig,
    config_path: str,
    registry: EmbeddedRegistry,
    user_uuid: str,
    logs: str,
    children: list[Child],
    stoppers: list[Callable[[], Any]],
    is_stopping: Callable[[], bool],
) -> DemoContainer:
    """The page served by this process, and a gateway (host runtime) that this process starts."""
    container = start_host_container(reactor)
    stoppers.insert(1, container.stop)  # after the controller and the gateway have stopped
    request = await registry.create_container_request(
        user_uuid,
        name="arvproxy demo",
        published_ports={str(container.port): {"access": "private", "label": "demo page"}},
    )
    assert request.container_uuid is not None
    gateway_log = os.path.join(logs, "gateway.log")
    gateway = start_gateway(
        reactor,
        config,
        config_path,
        request.container_uuid,
        gateway_log,
        container.gateway_arguments,
    )
    children.append(gateway)
    stoppers.append(lambda: gateway.stop(reactor))
    await gateway.ready
    return DemoContainer(
        request.uuid,
        request.container_uuid,
        container.port,
        gateway_log,
        "a page served by this process on 127.0.0.1 (no Docker: the gateway's host runtime)",
    )


async def _start_docker_container(
    reactor: Any,
    config: ClusterConfig,
    config_path: str,
    registry: EmbeddedRegistry,
    user_uuid: str,
    logs: str,
    children: list[Child],
    stoppers: list[Callable[[], Any]],
    is_stopping: Callable[[], bool],
) -> DemoContainer | None:
    """
    A container request for the demo site in a Docker container, and the local dispatcher that
    runs it; fires once the container is Running (C{None} if Ctrl-C came first).  At shutdown
    the container is cancelled first (its gateway stops and removes it), then the dispatcher
    stops, then whatever Docker container is still there is removed.

    @raise DemoFailed: the container ended, or was not Running in time.
    """
    port = demo_docker.DEMO_PORT
    request = await registry.create_container_request(
        user_uuid,
        name="arvproxy demo",
        container_image=demo_docker.DEMO_IMAGE,
        command=demo_docker.container_command(port),
        published_ports={str(port): {"access": "private", "label": "demo page"}},
    )
    uuid = request.container_uuid
    assert uuid is not None
    dispatcher_log = os.path.join(logs, "dispatcher.log")
    stoppers.append(lambda: deferToThread(_remove_docker_leftover, uuid))
    dispatcher = start_dispatcher(reactor, config_path, dispatcher_log)
    gateway_ended = dispatcher.wait_for_line(f"The gateway of {uuid} ended".encode("ascii"))
    children.append(dispatcher)
    stoppers.append(lambda: dispatcher.stop(reactor, grace=45.0))
    stoppers.append(
        lambda: defer.ensureDeferred(
            _cancel_container(reactor, registry, uuid, dispatcher, gateway_ended)
        )
    )
    await dispatcher.ready
    _say(f"Container {uuid}: waiting until it is Running")
    running = await _wait_running(reactor, registry, uuid, dispatcher, is_stopping)
    if running is None:
        return None
    return DemoContainer(
        request.uuid,
        uuid,
        port,
        dispatcher_log,
        f"Docker container {docker_name(uuid)} ({demo_docker.DEMO_IMAGE}, --network none)",
    )


RUNNING_TIMEOUT = 180.0
"""Seconds the demo waits for its Docker container to be Running."""

_PROGRESS = {
    backends.QUEUED: "Queued: waiting for the dispatcher to lock it",
    backends.LOCKED: "Locked: its gateway is creating and starting the Docker container",
}


async def _wait_running(
    reactor: Any,
    registry: EmbeddedRegistry,
    uuid: str,
    dispatcher: Child,
    is_stopping: Callable[[], bool],
    timeout: float = RUNNING_TIMEOUT,
) -> backends.Container | None:
    """
    Poll the container record until it is Running with a gateway, saying each new state.

    @return: the container; C{None} if the demo is stopping meanwhile.
    @raise DemoFailed: it reached a final state, the dispatcher exited, or C{timeout} passed.
    """
    started = reactor.seconds()
    said: tuple[str, int] | None = None
    while not is_stopping():
        container = await registry.get_container(uuid)
        if container.state == backends.RUNNING and container.gateway_address:
            return container
        waited = reactor.seconds() - started
        if container.state in backends.FINAL_STATES:
            why = container.runtime_status.get("error") or f"exit code {container.exit_code}"
            raise DemoFailed(
                f"container {uuid} is {container.state}: {why}\n"
                f"  (the gateway's output is in {dispatcher.log_path})"
            )
        if dispatcher.has_ended:
            raise DemoFailed(
                f"the dispatcher exited (status {dispatcher.exit_code}); see {dispatcher.log_path}"
            )
        if waited > timeout:
            raise DemoFailed(
                f"container {uuid} was still {container.state} after {timeout:.0f}s; "
                f"see {dispatcher.log_path}"
            )
        now = (container.state, int(waited) // 10)
        if said != now:
            _say(
                f"  {_PROGRESS.get(container.state, container.state)}"
                + (f" ({int(waited)}s)" if waited >= 10 else "")
            )
            said = now
        await task.deferLater(reactor, 0.25, lambda: None)
    return None


async def _cancel_container(
    reactor: Any,
    registry: EmbeddedRegistry,
    uuid: str,
    dispatcher: Child,
    gateway_ended: defer.Deferred[str],
    timeout: float = 30.0,
) -> None:
    """
    Cancel the container in the record, as C{arvproxy cancel} does, and wait (at most
    C{timeout} seconds) until its gateway has stopped, removed the Docker container and exited,
    so that stopping the dispatcher next does not interrupt it.

    @param gateway_ended: fires when the dispatcher says the container's gateway ended.
    """
    container = await registry.get_container(uuid)
    if container.state not in backends.FINAL_STATES:
        _say(f"Cancelling container {uuid}; its gateway stops the Docker container")
        try:
            await registry.update_container(
                uuid,
                state=backends.CANCELLED,
                runtime_status={**container.runtime_status, "cancelled": "the demo stopped"},
            )
        except ValueError:
            pass  # it has just finished by itself
    if not gateway_ended.called and not dispatcher.has_ended and container.gateway_address:
        timer = task.deferLater(reactor, timeout, lambda: None)
        waits: list[defer.Deferred[Any]] = [gateway_ended, dispatcher.when_ended(), timer]
        _, which = await defer.DeferredList(waits, fireOnOneCallback=True, consumeErrors=True)
        if which == 2:
            _say(f"The gateway of {uuid} has not exited after {timeout:.0f}s")
        else:
            timer.cancel()
    deadline = reactor.seconds() + timeout
    while await deferToThread(_docker_containers, uuid):
        if reactor.seconds() > deadline:
            _say(f"The Docker container of {uuid} is still there after {timeout:.0f}s")
            return
        await task.deferLater(reactor, 0.5, lambda: None)


def _docker_containers(uuid: str) -> list[Any]:
    """The Docker containers (running or not) of arvproxy container C{uuid} (blocking)."""
    from arvproxy.gateway.docker_runtime import LABEL, default_client

    return list(default_client().containers.list(all=True, filters={"label": f"{LABEL}={uuid}"}))


def _remove_docker_leftover(uuid: str) -> None:
    """Remove what is left of container C{uuid} in Docker once nothing else will (blocking)."""
    for container in _docker_containers(uuid):
        sys.stdout.write(f"Removing leftover Docker container {container.name}\n")
        container.remove(force=True)


def _stop_on_signals(reactor: Any) -> None:
    """
    Stop the reactor on Ctrl-C or SIGTERM, once: a second Ctrl-C while the children are stopping
    (or the copy of it that reaches us through a wrapper like C{timeout}) changes nothing.
    """

    def stop() -> None:
        try:
            reactor.stop()
        except error.ReactorNotRunning:
            pass

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m arvproxy.demo",
        description="Run the controller, a gateway and a demo web service on this machine.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"default: {DEFAULT_CONFIG}")
    parser.add_argument(
        "--container",
        choices=("auto", "docker", "host"),
        default="auto",
        help=(
            "where the demo page runs: a Docker container (docker), a page served by this "
            "process (host), or Docker when it can be used, else host (auto, the default)"
        ),
    )
    args = parser.parse_args(argv)
    from twisted.internet.task import react

    react(lambda reactor: defer.ensureDeferred(run_demo(reactor, args.config, args.container)))


if __name__ == "__main__":
    main()
