"""
C{arvproxy node}: an operator's look at a node dispatcher's containers on an Arvados cluster,
and the way to recover those of a node that is gone.

  - C{arvproxy --config FILE node status}: which token the node dispatcher uses (its UUID is
    what C{locked_by_uuid} says of the containers it holds) and the containers it holds, with
    their state and gateway address.  Only reads.
  - C{arvproxy --config FILE node release}: for a node that is gone (the machine died, or its
    dispatcher and gateways were stopped for good): every container its token holds is let go,
    as Arvados' own dispatchers let go of what they cannot run -- a C{Locked} one is unlocked
    (C{Queued} again, for any node to take), a C{Running} one is cancelled with the reason in
    C{runtime_status} (C{lib/dispatchcloud}, C{scheduler/sync.go}: "not running on any
    worker"), and Arvados retries its request with a new container while the request's
    C{container_count_max} allows.

Arvados has no lock expiry: only the token that holds a container's lock may unlock it or write
its C{runtime_status} (C{Container#check_unlock}, C{validate_change}), so C{release} acts with
the gone node's own token: the node's C{ArvProxy.NodeDispatcher} settings in C{--config}, or
C{--token-file}.  Another admin token could only cancel, with no reason and no second chance
for C{Locked} containers.

Calls are plain blocking HTTPS (this is a one-shot command), with C{TLS.Insecure} honoured.
"""

from __future__ import annotations

import argparse
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from arvproxy.config import ConfigError, load_config
from arvproxy.nodeconfig import NodeConfigError, dispatcher_token, read_token_file
from arvproxy.nodepolicy import QUEUE_FIELDS

TIMEOUT = 30.0
PAGE = 1000


class NodeCommandFailed(Exception):
    """The command could not do its job; the message says why (never a token)."""


def add_commands(commands: Any) -> None:
    """Add C{node status} and C{node release} to the C{arvproxy} subcommands."""
    node = commands.add_parser(
        "node", help="a node dispatcher's containers on an Arvados cluster"
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, run, text in (
        ("status", status, "show the node dispatcher's token and the containers it holds"),
        (
            "release",
            release,
            "let go of every container a gone node holds: unlock the Locked, cancel the Running",
        ),
    ):
        p = node.add_parser(name, help=text)
        p.add_argument(
            "--token-file",
            metavar="FILE",
            help="the node dispatcher's token (default: ArvProxy.NodeDispatcher in --config)",
        )
        p.set_defaults(node_run=run)


class API:
    """A few blocking calls to the Arvados API with one token."""

    def __init__(self, base_url: str, token: str, insecure: bool) -> None:
        self._base = base_url.rstrip("/") + "/arvados/v1/"
        self._token = token
        self._context = ssl.create_default_context()
        if insecure:
            self._context.check_hostname = False
            self._context.verify_mode = ssl.CERT_NONE

    def call(
        self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None
    ) -> dict[str, Any]:
        url = self._base + path
        if params:
            url += "?" + urllib.parse.urlencode(
                {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
            )
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=self._context) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                errors = json.loads(e.read()).get("errors") or []
            except (ValueError, AttributeError):
                errors = []
            why = "; ".join(str(x) for x in errors)[:300] or e.reason
            raise NodeCommandFailed(
                f"{method} {path}: the API server answered {e.code}: {why}"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise NodeCommandFailed(
                f"{method} {path}: cannot reach the API server: {reason}"
            ) from None
        if not isinstance(answer, dict):
            raise NodeCommandFailed(f"{method} {path}: the answer is not a JSON object")
        return answer

    def held(self, token_uuid: str) -> list[dict[str, Any]]:
        """Every container C{token_uuid} holds the lock on."""
        found: dict[str, dict[str, Any]] = {}
        while True:
            page = self.call(
                "GET",
                "containers",
                {
                    "filters": [["locked_by_uuid", "=", token_uuid]],
                    "order": ["uuid asc"],
                    "select": [*QUEUE_FIELDS, "gateway_address"],
                    "limit": str(PAGE),
                    "offset": str(len(found)),
                    "count": "none",
                },
            )
            items = page.get("items")
            if not isinstance(items, list):
                raise NodeCommandFailed("GET containers: the answer has no items")
            if not items:
                return list(found.values())
            before = len(found)
            found.update((item["uuid"], item) for item in items if isinstance(item, dict))
            if len(found) == before:
                return list(found.values())


def _connect(args: argparse.Namespace, config_path: str) -> tuple[API, str]:
    config = load_config(config_path, getattr(args, "cluster_id", None))
    if config.backend != "arvados" or not config.api_url:
        raise ConfigError(
            f"{config.source}: Clusters.{config.cluster_id}.ArvProxy.Backend: "
            "arvproxy node needs the arvados backend (and Services.Controller.ExternalURL)"
        )
    if args.token_file:
        try:
            token = read_token_file(args.token_file)
        except ValueError as e:
            raise NodeCommandFailed(f"--token-file: {e}") from None
    else:
        try:
            token = dispatcher_token(config)
        except NodeConfigError as e:
            raise ConfigError(str(e)) from None
    api = API(config.api_url, token, config.tls_insecure)
    me = api.call("GET", "api_client_authorizations/current").get("uuid")
    if not isinstance(me, str):
        raise NodeCommandFailed("GET api_client_authorizations/current: no uuid in the answer")
    return api, me


def status(args: argparse.Namespace, config_path: str) -> Any:
    api, me = _connect(args, config_path)
    return {
        "token_uuid": me,
        "containers": [
            {k: c.get(k) for k in ("uuid", "state", "priority", "gateway_address")}
            for c in api.held(me)
        ],
    }


def release_reason(token_uuid: str) -> str:
    """What a released Running container's C{runtime_status.error} says."""
    return (
        f"its node was released by an operator (arvproxy node release): the node dispatcher "
        f"holding it (token {token_uuid}) is gone, and the container with it"
    )


def release(args: argparse.Namespace, config_path: str) -> Any:
    api, me = _connect(args, config_path)
    done = []
    for container in api.held(me):
        uuid, state = container["uuid"], container.get("state")
        if state == "Locked":
            answer = api.call("POST", f"containers/{uuid}/unlock")
        elif state == "Running":
            answer = api.call(
                "PUT",
                f"containers/{uuid}",
                body={
                    "container": {
                        "state": "Cancelled",
                        "runtime_status": {"error": release_reason(me)},
                    }
                },
            )
        else:
            continue
        done.append({"uuid": uuid, "was": state, "now": answer.get("state")})
    return {"token_uuid": me, "released": done}
