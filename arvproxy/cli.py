"""
C{arvproxy}: the administrator's command for the embedded registry.

Each subcommand makes one change or look-up and prints the resulting record as JSON on standard
output.  A failure prints one line, C{arvproxy: error: ...}, on standard error and exits with 2
for a usage mistake (a missing option, a malformed UUID or value, no configuration) or 1 when
the action itself failed (an unknown user, a broken configuration, an unusable registry file).

The registry file and cluster id come from C{--registry} and C{--cluster-id} when both are
given; otherwise from the configuration file (C{--config}, else C{$ARVPROXY_CONFIG}, else
C{conf/local.yml} when it exists), with either option overriding the file.

Look-ups (C{list}, C{get}, C{ls}, C{logs}) only read: they open the registry read-only, and a
registry file that does not exist is an error, never created.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from arvproxy.backends import (
    CONTAINER_INFIX,
    CONTAINER_REQUEST_INFIX,
    LEVELS,
    USER_INFIX,
    UUID_RE,
)
from arvproxy.backends.registry import STATES, RegistryError, RegistryStore, to_json
from arvproxy.clinode import NodeCommandFailed
from arvproxy.clinode import add_commands as add_node_commands
from arvproxy.clirun import CommandFailed
from arvproxy.clirun import add_commands as add_run_commands
from arvproxy.config import ConfigError, load_config
from arvproxy.errors import ProxyError
from arvproxy.permissions import CONNECTIONS_PROPERTY, PROHIBITED

PROG = "arvproxy"
CONFIG_ENV = "ARVPROXY_CONFIG"
DEFAULT_CONFIG = os.path.join("conf", "local.yml")


class UsageError(Exception):
    """The command line is wrong: exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    """Report usage mistakes by raising L{UsageError} instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _uuid_of(*infixes: str) -> Callable[[str], str]:
    """An argparse type accepting Arvados UUIDs with one of C{infixes} (any, if none)."""

    def check(text: str) -> str:
        if not UUID_RE.match(text) or (infixes and text[6:11] not in infixes):
            kinds = " or ".join(f"xxxxx-{i}-..." for i in infixes) or "xxxxx-xxxxx-..."
            raise argparse.ArgumentTypeError(f"{text!r} is not a UUID like {kinds}")
        return text

    check.__name__ = "UUID"
    return check


def _port(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number between 1 and 65535")
    return int(text)


def _port_setting(text: str) -> tuple[int, str]:
    """C{PORT=VALUE}, as in C{--port-label 8888=Jupyter} or C{--initial-path 8888=/lab}."""
    port, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not PORT=VALUE")
    return _port(port), value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    """The command line of C{arvproxy}."""
    parser = _ArgumentParser(
        prog=PROG,
        description="Manage the arvproxy embedded registry: users, tokens, container "
        "requests and permissions.  Prints JSON.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"cluster configuration (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} if present)",
    )
    parser.add_argument("--registry", metavar="PATH", help="the registry's SQLite file")
    parser.add_argument("--cluster-id", metavar="ID", help="the five-character cluster id")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    user = commands.add_parser("user", help="users").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = user.add_parser("create", help="add a user")
    p.add_argument("--name", required=True, help="the user's full name")
    p.add_argument("--admin", action="store_true", help="make the user an administrator")
    p.set_defaults(run=_user_create)
    p = user.add_parser("list", help="list users")
    p.set_defaults(run=lambda store, args: [to_json(u) for u in store.list_users()], read_only=True)

    token = commands.add_parser("token", help="API tokens").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = token.add_parser("create", help="issue a v2 API token for a user")
    p.add_argument("--user", required=True, type=_uuid_of(USER_INFIX), help="user UUID")
    p.add_argument(
        "--scope",
        action="append",
        dest="scopes",
        metavar="SCOPE",
        help='an Arvados scope such as "all" (the default) or "GET /arvados/v1/users"; repeatable',
    )
    p.add_argument("--ttl", type=_seconds, metavar="SECONDS", help="expire after SECONDS")
    p.add_argument("--plain", action="store_true", help="print only the token")
    p.set_defaults(run=_token_create)
    p = token.add_parser("revoke", help="revoke a token at once")
    # Deliberately untyped: argparse would echo a malformed value, and this one is a secret.
    p.add_argument("token", metavar="TOKEN_OR_UUID", help="the v2 token or its UUID")
    p.set_defaults(run=lambda store, args: to_json(store.revoke_token(args.token)))
    p = token.add_parser("list", help="list tokens (never their secrets)")
    p.add_argument("--user", type=_uuid_of(USER_INFIX), help="only this user's tokens")
    p.set_defaults(
        run=lambda store, args: [to_json(t) for t in store.list_tokens(args.user)], read_only=True
    )

    request = commands.add_parser("container-request", help="container requests").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = request.add_parser(
        "create",
        help="commit a container request and queue its container",
        usage="%(prog)s --user UUID [options] [-- COMMAND...]",
    )
    p.add_argument("--user", required=True, type=_uuid_of(USER_INFIX), help="owner's UUID")
    p.add_argument("--name", default="", help="a name for the request")
    p.add_argument("--image", default="", help="the container image")
    add_port_options(p)
    p.add_argument(
        "--env", type=_env_pair, action="append", default=[], metavar="NAME=VALUE", help="env"
    )
    p.add_argument("--cwd", default="", help="the working directory in the container")
    p.add_argument("command", nargs="*", metavar="COMMAND", help="the command (after --)")
    p.set_defaults(run=_container_request_create)

    container = commands.add_parser("container", help="containers").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = container.add_parser("list", help="list containers")
    p.add_argument("--state", choices=STATES, help="only containers in this state")
    p.set_defaults(
        run=lambda store, args: [to_json(c) for c in store.list_containers(args.state)],
        read_only=True,
    )

    permission = commands.add_parser("permission", help="permission links").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = permission.add_parser("grant", help="give a user a permission on a record")
    p.add_argument("--user", required=True, type=_uuid_of(USER_INFIX), help="user UUID")
    p.add_argument(
        "--target",
        required=True,
        type=_uuid_of(CONTAINER_REQUEST_INFIX, CONTAINER_INFIX),
        help="container request or container UUID",
    )
    p.add_argument("--level", required=True, choices=LEVELS)
    p.set_defaults(
        run=lambda store, args: to_json(store.grant_permission(args.user, args.target, args.level))
    )

    p = commands.add_parser("get", help="show any record by UUID")
    p.add_argument("uuid", type=_uuid_of(), metavar="UUID")
    p.set_defaults(run=lambda store, args: store.get(args.uuid), read_only=True)

    add_run_commands(commands, add_port_options, _env_pair, _uuid_of)
    add_node_commands(commands)
    return parser


def _user_create(store: RegistryStore, args: argparse.Namespace) -> Any:
    return to_json(store.create_user(args.name, is_admin=args.admin))


def _token_create(store: RegistryStore, args: argparse.Namespace) -> Any:
    api_token, record = store.create_token(args.user, args.scopes or ["all"], args.ttl)
    if args.plain:
        return _Plain(api_token)
    return {**to_json(record), "api_token": api_token}


def add_port_options(parser: argparse.ArgumentParser) -> None:
    """The options that publish ports, shared by C{container-request create} and C{run}."""
    parser.add_argument(
        "--port", type=_port, action="append", default=[], help="publish a private port"
    )
    parser.add_argument(
        "--public-port",
        type=_port,
        action="append",
        default=[],
        metavar="PORT",
        help="publish a port anyone may reach without a token",
    )
    parser.add_argument(
        "--https-port",
        type=_port,
        action="append",
        default=[],
        metavar="PORT",
        help="a published port whose service speaks TLS (self-signed is fine)",
    )
    parser.add_argument(
        "--no-connections",
        action="store_true",
        help="nobody may connect to the container's services, admins included (the request's "
        f'property "{CONNECTIONS_PROPERTY}": "{PROHIBITED}")',
    )
    for option, metavar, what in (
        ("--port-label", "PORT=LABEL", "a label for a published port (shown on the services page)"),
        ("--initial-path", "PORT=PATH", "where a published port's link opens, e.g. 8888=/lab"),
    ):
        parser.add_argument(
            option, type=_port_setting, action="append", default=[], metavar=metavar, help=what
        )


def published_ports(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """
    C{published_ports} from the options of L{add_port_options}.

    @raise UsageError: a setting for a port that is not published.
    """
    ports: dict[str, dict[str, Any]] = {str(port): {"access": "private"} for port in args.port}
    ports.update({str(port): {"access": "public"} for port in args.public_port})
    for option, key, settings in (
        ("--port-label", "label", args.port_label),
        ("--initial-path", "initial_path", args.initial_path),
        ("--https-port", "protocol", [(port, "https") for port in args.https_port]),
    ):
        for port, value in settings:
            if str(port) not in ports:
                raise UsageError(f"{option} {port}: publish port {port} with --port first")
            ports[str(port)][key] = value
    return ports


def request_properties(args: argparse.Namespace) -> dict[str, Any]:
    """The request's C{properties} from the options of L{add_port_options}."""
    return {CONNECTIONS_PROPERTY: PROHIBITED} if getattr(args, "no_connections", False) else {}


def _container_request_create(store: RegistryStore, args: argparse.Namespace) -> Any:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    ports = published_ports(args)
    request = store.create_container_request(
        args.user,
        name=args.name,
        container_image=args.image,
        command=command,
        environment=dict(args.env),
        cwd=args.cwd,
        published_ports=ports,
        properties=request_properties(args),
    )
    return to_json(request)


class _Plain(str):
    """Output printed as is, not as JSON."""


def resolve_registry(args: argparse.Namespace) -> tuple[str, str]:
    """
    The registry file and cluster id the command line asks for.

    @raise UsageError: neither the options nor a configuration file say.
    @raise ConfigError: the configuration file is unusable or names no registry.
    """
    if args.registry and args.cluster_id:
        return args.registry, args.cluster_id
    path = args.config or os.environ.get(CONFIG_ENV)
    if not path and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if not path:
        raise UsageError(
            f"no configuration: pass --config FILE, set {CONFIG_ENV}, or pass "
            "--registry PATH and --cluster-id ID"
        )
    config = load_config(path, args.cluster_id)
    if config.backend != "embedded":
        raise ConfigError(
            f"{config.source}: the cluster uses the {config.backend} backend; this command "
            "manages only the embedded registry"
        )
    registry = args.registry or config.registry_path
    if not registry:
        raise ConfigError(f"{config.source}: no registry file is configured")
    return registry, config.cluster_id


def config_path(args: argparse.Namespace) -> str:
    """
    The configuration file the command line names (C{--config}, else C{$ARVPROXY_CONFIG}).

    @raise UsageError: neither.
    """
    path = args.config or os.environ.get(CONFIG_ENV)
    if not path:
        raise UsageError(f"no configuration: pass --config FILE or set {CONFIG_ENV}")
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the C{arvproxy} command with C{argv} (default: C{sys.argv[1:]}).

    @return: the exit status: 0 on success, 1 when the action failed, 2 for a usage mistake.
    """
    path = ""
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "node_run", None) is not None:  # arvproxy node: the Arvados API
            result = args.node_run(args, config_path(args))
        else:
            path, cluster_id = resolve_registry(args)
            try:
                # Read-only commands never create the file, a schema or a user, nor change
                # anything.
                store = RegistryStore(path, cluster_id, read_only=getattr(args, "read_only", False))
            except ValueError as e:
                raise UsageError(str(e)) from None
            try:
                result = args.run(store, args)
            finally:
                store.close()
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        return _fail(str(e), 2)
    except ValueError as e:
        return _fail(str(e), 2)
    except ProxyError as e:
        return _fail(e.message, 1)
    except ConfigError as e:
        return _fail(str(e), 1)
    except (CommandFailed, NodeCommandFailed) as e:
        return _fail(str(e), 1)
    except (RegistryError, sqlite3.Error, OSError) as e:
        return _fail(f"registry {path}: {e}", 1)
    if result is None:  # the command wrote its output itself
        pass
    elif isinstance(result, str):  # _Plain (also from modules that import it)
        sys.stdout.write(result + "\n")
    else:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()
    return 0


def _fail(message: str, status: int) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
