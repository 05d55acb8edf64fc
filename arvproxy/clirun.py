"""
The person-facing subcommands of C{arvproxy}: start a container and get its URLs, list one's
containers, cancel one.

  - C{arvproxy run [--port P]... IMAGE [-- COMMAND...]} commits a container request, waits until
    the local dispatcher has the container Running, and prints each port's URL with a token for
    the browser's first visit (scoped to that container's ports, valid for a day).
  - C{arvproxy ls} lists the caller's containers: state, image, listening ports, URLs.
  - C{arvproxy cancel UUID} cancels a container (by its UUID or its request's); its gateway
    notices within seconds, stops it and exits.
  - C{arvproxy logs UUID [-f]} prints what is kept of a container's output on this machine
    (L{arvproxy.containerlogs}), following it with C{-f} until the container has finished,
    then why it ended (on standard error).

The caller is C{--user UUID}, or else the machine's local user (created on first use).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from arvproxy import backends, policy
from arvproxy.backends.registry import RegistryStore, to_json
from arvproxy.config import ClusterConfig, load_config
from arvproxy.containerlogs import OutputFollower

LOCAL_USER_NAME = "Local user (arvproxy run)"
TOKEN_TTL = 24 * 3600.0
DISPATCH_PATIENCE = 15.0
"""Seconds a container may stay Queued before C{run} says no dispatcher seems to be running."""

NO_DISPATCHER = (
    "no dispatcher has picked up container {uuid} after {t:.0f}s: is `make run` (or "
    "`twistd -n arv-local-dispatcher --config FILE`) running?  The request stays queued"
)


class CommandFailed(Exception):
    """The action could not be done: exit status 1, with this message."""


def add_commands(
    commands: Any,
    port_options: Callable[[argparse.ArgumentParser], None],
    env_type: Callable[[str], tuple[str, str]],
    uuid_type: Callable[..., Callable[[str], str]],
) -> None:
    """Add C{run}, C{ls} and C{cancel} to the C{arvproxy} subcommands."""
    p = commands.add_parser(
        "run",
        help="start a container and print the URLs of its web services",
        usage="%(prog)s [--port P]... IMAGE [-- COMMAND...]",
    )
    port_options(p)
    p.add_argument(
        "--env", type=env_type, action="append", default=[], metavar="NAME=VALUE", help="env"
    )
    p.add_argument("--cwd", default="", help="the working directory in the container")
    p.add_argument("--name", default="", help="a name for the request")
    p.add_argument("--user", type=uuid_type(backends.USER_INFIX), help="owner (default: you)")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for Running (default 300)"
    )
    p.add_argument("image", metavar="IMAGE", help="the Docker image")
    p.add_argument("command", nargs="*", metavar="COMMAND", help="the command (after --)")
    p.set_defaults(run=run_container)

    p = commands.add_parser("ls", help="list your containers, their ports and URLs")
    p.add_argument("--user", type=uuid_type(backends.USER_INFIX), help="whose (default: you)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=list_containers, read_only=True)

    p = commands.add_parser("cancel", help="stop a container")
    p.add_argument(
        "uuid",
        type=uuid_type(backends.CONTAINER_REQUEST_INFIX, backends.CONTAINER_INFIX),
        metavar="UUID",
        help="the container or its request",
    )
    p.set_defaults(run=cancel_container)

    p = commands.add_parser("logs", help="print a container's output and why it ended")
    p.add_argument(
        "uuid",
        type=uuid_type(backends.CONTAINER_REQUEST_INFIX, backends.CONTAINER_INFIX),
        metavar="UUID",
        help="the container or its request",
    )
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing what it writes until it has finished",
    )
    p.set_defaults(run=show_logs, read_only=True)


def local_user(store: RegistryStore, uuid: str | None) -> str:
    """C{uuid}, or the local user's UUID (created the first time)."""
    return find_user(store, uuid) or store.create_user(LOCAL_USER_NAME).uuid


def find_user(store: RegistryStore, uuid: str | None) -> str | None:
    """
    C{uuid}, or the local user's UUID; C{None} when there is no local user yet (nothing is
    created: read-only commands use this).

    @raise NotFound: no user C{uuid}.
    """
    if uuid:
        return store.get_user(uuid).uuid
    for user in store.list_users():
        if user.full_name == LOCAL_USER_NAME:
            return user.uuid
    return None


def load_cli_config(args: argparse.Namespace) -> ClusterConfig:
    """The configuration the command line names (as L{arvproxy.cli.resolve_registry} finds it)."""
    from arvproxy.cli import CONFIG_ENV, DEFAULT_CONFIG

    path = args.config or os.environ.get(CONFIG_ENV)
    if not path and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if not path:
        raise CommandFailed(
            f"this command needs the cluster configuration: pass --config FILE or set {CONFIG_ENV}"
        )
    return load_config(path, args.cluster_id)


def service_urls(config: ClusterConfig, request: backends.ContainerRequest) -> dict[int, str]:
    """Each published port's base URL."""
    return {
        int(port): config.external_url.url_for(f"{request.uuid}-{port}")
        for port in sorted(request.published_ports, key=int)
    }


def engine_problem() -> str | None:
    from arvproxy.gateway.docker_runtime import engine_status

    return engine_status()


def run_container(
    store: RegistryStore,
    args: argparse.Namespace,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    from arvproxy.cli import _Plain, published_ports, request_properties

    problem = engine_problem()
    if problem is not None:
        raise CommandFailed(f"cannot run containers here: {problem}")
    config = load_cli_config(args)
    user = local_user(store, args.user)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    request = store.create_container_request(
        user,
        name=args.name,
        container_image=args.image,
        command=command,
        environment=dict(args.env),
        cwd=args.cwd,
        published_ports=published_ports(args),
        properties=request_properties(args),
    )
    assert request.container_uuid is not None
    container = wait_running(store, request.container_uuid, args.timeout, sleep, clock)
    lines = [f"{request.uuid}: container {container.uuid} is Running ({args.image})"]
    urls = service_urls(config, request)
    if getattr(args, "no_connections", False):
        lines.append("  (nobody may connect to it: it was started with --no-connections)")
        urls = {}
    if urls:
        scopes = [policy.connect_scope(request.uuid, port) for port in urls]
        token, _ = store.create_token(user, scopes, TOKEN_TTL)
        for port, url in urls.items():
            spec = request.published_ports[str(port)]
            if spec.get("access") == "public":
                lines.append(f"  port {port} (public): {url}{spec.get('initial_path', '')}")
                continue
            path = spec.get("initial_path", "") or ""
            lines.append(f"  port {port}: {url.rstrip('/')}{path or '/'}?arvados_api_token={token}")
        lines.append("  (the token in these links works for a day, for these ports only)")
    else:
        lines.append("  no ports published (use --port P)")
    lines.append(f"Stop it with: arvproxy cancel {request.uuid}")
    return _Plain("\n".join(lines))


def wait_running(
    store: RegistryStore,
    uuid: str,
    timeout: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> backends.Container:
    """
    Poll the container until it is Running with a gateway.

    @raise CommandFailed: it ended first (with its reason), or C{timeout} passed.
    """
    started = clock()
    warned = False
    while True:
        container = store.get_container(uuid)
        if container.state == backends.RUNNING and container.gateway_address:
            return container
        if container.state in backends.FINAL_STATES:
            why = container.runtime_status.get("error") or f"exit code {container.exit_code}"
            raise CommandFailed(f"container {uuid} is {container.state}: {why}")
        waited = clock() - started
        if container.state == backends.QUEUED and waited >= DISPATCH_PATIENCE and not warned:
            import sys

            sys.stderr.write(f"arvproxy: {NO_DISPATCHER.format(uuid=uuid, t=waited)}\n")
            warned = True
        if waited >= timeout:
            hint = NO_DISPATCHER if container.state == backends.QUEUED else "still {state}"
            raise CommandFailed(
                f"gave up waiting after {timeout:.0f}s: "
                + hint.format(uuid=uuid, t=waited, state=container.state)
            )
        sleep(0.5)


def list_containers(store: RegistryStore, args: argparse.Namespace) -> Any:
    from arvproxy.cli import _Plain

    config = load_cli_config(args)
    user = find_user(store, args.user)
    rows: list[dict[str, Any]] = []
    for request in store.list_container_requests(user) if user is not None else []:
        if request.container_uuid is None:
            continue
        container = store.get_container(request.container_uuid)
        rows.append(
            {
                "uuid": request.uuid,
                "container_uuid": container.uuid,
                "state": container.state,
                "image": container.container_image,
                "exit_code": container.exit_code,
                "listening_ports": list(container.listening_ports),
                "urls": {str(p): u for p, u in service_urls(config, request).items()},
                "runtime_status": container.runtime_status,
            }
        )
    if args.json:
        return rows
    if not rows:
        return _Plain("No containers.  Start one with: arvproxy run --port 8080 IMAGE -- COMMAND")
    lines = []
    for row in rows:
        state = row["state"]
        if row["exit_code"] is not None:
            state += f" (exit {row['exit_code']})"
        listening = ",".join(map(str, row["listening_ports"])) or "-"
        lines.append(f"{row['uuid']}  {state:<16} {row['image']}  listening: {listening}")
        for port, url in row["urls"].items():
            lines.append(f"    {port}: {url}")
        if row["runtime_status"].get("error"):
            lines.append(f"    {row['runtime_status']['error']}")
    return _Plain("\n".join(lines))


def container_of(store: RegistryStore, uuid: str) -> str:
    """
    The container C{uuid} names: itself, or a container request's container.

    @raise CommandFailed: a request without a container.
    """
    if backends.uuid_infix(uuid) == backends.CONTAINER_REQUEST_INFIX:
        request = store.get_container_request(uuid)
        if request.container_uuid is None:
            raise CommandFailed(f"container request {uuid} has no container")
        uuid = request.container_uuid
    return uuid


def cancel_container(store: RegistryStore, args: argparse.Namespace) -> Any:
    uuid = container_of(store, args.uuid)
    container = store.get_container(uuid)
    if container.state in backends.FINAL_STATES:
        raise CommandFailed(f"container {uuid} has already finished ({container.state})")
    container = store.update_container(
        uuid,
        state=backends.CANCELLED,
        runtime_status={**container.runtime_status, "cancelled": "by arvproxy cancel"},
    )
    return to_json(container)


FOLLOW_INTERVAL = 0.5
"""Seconds between two looks at a followed container's output."""


def logs_directory(args: argparse.Namespace, registry_path: str) -> str:
    """Where the container logs are: the configuration's C{ContainerLogs.Directory}, else
    beside the registry (its default)."""
    from arvproxy.cli import CONFIG_ENV, DEFAULT_CONFIG

    if args.config or os.environ.get(CONFIG_ENV) or os.path.exists(DEFAULT_CONFIG):
        directory = load_cli_config(args).container_logs
        if directory:
            return directory
    return os.path.join(os.path.dirname(os.path.abspath(registry_path)), "container-logs")


def show_logs(
    store: RegistryStore,
    args: argparse.Namespace,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """
    Print a container's kept output on standard output (following it with C{--follow} until
    the container has finished and its gateway has written its last words), then how it
    ended on standard error.
    """
    import sys

    uuid = container_of(store, args.uuid)
    container = store.get_container(uuid)
    directory = logs_directory(args, store.path)
    follower = OutputFollower(directory, uuid)
    out = sys.stdout.buffer
    kept = follower.read_all()
    out.write(kept)
    out.flush()
    quiet = 0
    while args.follow and quiet < 3:
        # Once finished, a few more looks: the gateway writes its last note just after.
        if container.state not in backends.FINAL_STATES or quiet:
            sleep(FOLLOW_INTERVAL)
        if container.state not in backends.FINAL_STATES:
            container = store.get_container(uuid)
        more = follower.read()
        kept += more
        out.write(more)
        out.flush()
        quiet = quiet + 1 if container.state in backends.FINAL_STATES and not more else 0
    if not kept:
        sys.stderr.write(f"arvproxy: no output of container {uuid} is kept in {directory}\n")
    if container.state in backends.FINAL_STATES:
        sys.stderr.write(f"arvproxy: {describe_end(container)}\n")
    return None


def describe_end(container: backends.Container) -> str:
    """How a finished container ended, in a line: its state, exit code and reason."""
    text = f"container {container.uuid} is {container.state}"
    if container.exit_code is not None:
        text += f" (exit code {container.exit_code})"
    status = container.runtime_status or {}
    reason = ": ".join(
        str(status[key]) for key in ("error", "errorDetail") if isinstance(status.get(key), str)
    )
    return f"{text}: {reason}" if reason else text
