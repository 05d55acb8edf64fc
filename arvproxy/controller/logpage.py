"""
The page that shows a container's kept output and why it ended, at C{/logs/<uuid>} on the
services page host (the UUID of a container request or of a container).

Whoever may connect to the container may see it: the same rule as connecting (an admin, or
C{can_write}/C{can_manage} on every container request that uses the container;
L{arvproxy.permissions.check_access}), with the services page's own sign-in (a token with
scope C{all} in this host's cookie).  Someone who cannot read the request gets 404.  A port
being public opens nothing here: its visitors may not read the container's output.

A browser navigation gets an HTML page (refreshing itself while the container has not
finished); anything else gets the output as C{text/plain}.  The output shown is what the
node keeps (L{arvproxy.containerlogs}): the last L{SHOWN_BYTES} of it.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

from twisted.internet.threads import deferToThreadPool

from arvproxy import pages, permissions
from arvproxy.backends import (
    CONTAINER_INFIX,
    CONTAINER_REQUEST_INFIX,
    FINAL_STATES,
    UUID_RE,
    Container,
    ContainerRequest,
    Credentials,
)
from arvproxy.containerlogs import read_output
from arvproxy.errors import NotFound, Unauthorized

SHOWN_BYTES = 256 * 1024
"""The most output one page shows (its end)."""

REFRESH_SECONDS = 5

PATH_PREFIX = b"/logs/"


def logs_path(uuid: str) -> str:
    """The path of the logs page of a container request or container, on the services host."""
    return f"/logs/{uuid}"


def reason_of(container: Container | None) -> tuple[str, str]:
    """Why a container failed or ended (C{runtime_status.error}, C{errorDetail}), or C{""}s."""
    if container is None:
        return "", ""
    status = container.runtime_status or {}
    error, detail = status.get("error"), status.get("errorDetail")
    return (error if isinstance(error, str) else ""), (detail if isinstance(detail, str) else "")


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">{refresh}
<title>Logs: {title}</title>
<link rel="stylesheet" href="/static/app.css">
</head>
<body class="logs-page">
<header class="bar"><h1>Container services</h1></header>
<main id="main">
<p><a href="/">Your containers</a></p>
<h2>Logs of {title}</h2>
<dl class="meta">
<dt>State</dt><dd><span class="state state-{state}">{state}</span>{exit}</dd>
<dt>Request</dt><dd><code>{request}</code></dd>
<dt>Container</dt><dd><code>{container}</code></dd>
</dl>
{reason}
<h3>Output</h3>
<p class="help">{note}</p>
<pre id="output" class="output" tabindex="0">{output}</pre>
</main>
</body>
</html>
"""


class LogPage:
    """
    Serves C{/logs/<uuid>} for the services page (L{arvproxy.controller.portal.Portal}).

    @param credentials: the portal's check of the signed-in user (scope C{all}).
    @param directory: C{ArvProxy.ContainerLogs.Directory} (C{""}: nothing kept here).
    @param in_thread: runs a blocking function (the file reads) off the reactor thread,
        returning a Deferred (default: the reactor's thread pool).
    """

    def __init__(
        self,
        reactor: Any,
        cluster: Any,
        directory: str,
        credentials: Any,
        in_thread: Callable[..., Any] | None = None,
    ) -> None:
        self._reactor = reactor
        self._cluster = cluster
        self._directory = directory
        self._credentials = credentials
        self._in_thread = in_thread or (
            lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        )

    async def render(self, request: Any, write: Any) -> None:
        """
        Answer C{request} for C{/logs/<uuid>}; C{write(request, code, content_type, body)}
        sends the answer with the portal's headers.

        @raise ProxyError: 401 not signed in, 403 may not connect, 404 unknown or hidden.
        """
        uuid = request.path[len(PATH_PREFIX) :].decode("ascii", "replace")
        if not UUID_RE.match(uuid) or uuid[6:11] not in (CONTAINER_REQUEST_INFIX, CONTAINER_INFIX):
            raise NotFound("There is no such page here.")
        try:
            credentials: Credentials = await self._credentials(request)
        except Unauthorized as e:
            raise Unauthorized(
                e.message,
                hint="Sign in on this site's front page, then open the Logs link again.",
            ) from None
        requests, container = await self._resolve(uuid)
        levels = {}
        if not credentials.is_admin:
            for cr in requests:
                levels[cr.uuid] = await self._cluster.permission_level(
                    credentials.user_uuid, cr.uuid, credentials=credentials
                )
        permissions.check_access(credentials, uuid, requests, levels)
        output = b""
        if container is not None and self._directory:
            output = await self._in_thread(
                read_output, self._directory, container.uuid, SHOWN_BYTES
            )
        if not pages.wants_html(request):
            write(request, 200, b"text/plain; charset=utf-8", output)
            return
        body = self._html(uuid, requests, container, output).encode("utf-8")
        write(request, 200, b"text/html; charset=utf-8", body)

    async def _resolve(self, uuid: str) -> tuple[list[ContainerRequest], Container | None]:
        try:
            if uuid[6:11] == CONTAINER_REQUEST_INFIX:
                cr = await self._cluster.get_container_request(uuid)
                container = None
                if cr.container_uuid:
                    container = await self._cluster.get_container(cr.container_uuid)
                return [cr], container
            container = await self._cluster.get_container(uuid)
            return list(await self._cluster.container_requests_for(uuid)), container
        except NotFound:
            raise permissions.not_found(uuid) from None

    def _html(
        self,
        uuid: str,
        requests: list[ContainerRequest],
        container: Container | None,
        output: bytes,
    ) -> str:
        named = next((cr for cr in requests if cr.uuid == uuid), requests[0] if requests else None)
        title = (named.name if named is not None else "") or uuid
        state = container.state if container is not None else "Waiting"
        exit_code = container.exit_code if container is not None else None
        error, detail = reason_of(container)
        reason = ""
        finished = container is not None and container.state in FINAL_STATES
        if error or detail:
            label = "Why it ended:" if finished else "Problem:"
            reason = f'<div class="reason" role="note"><p><strong>{label}</strong> '
            reason += escape(error or detail) + "</p>"
            if error and detail:
                reason += f'<p class="detail">{escape(detail)}</p>'
            reason += "</div>"
        if not self._directory:
            note = "This cluster keeps no container output here."
        elif len(output) >= SHOWN_BYTES:
            note = f"The last {SHOWN_BYTES // 1024} KiB of what the container wrote."
        else:
            note = "What the container wrote (standard output and error), oldest first."
        if not finished:
            note += f" This page refreshes every {REFRESH_SECONDS} seconds."
        return _PAGE.format(
            refresh=""
            if finished
            else f'\n<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
            title=escape(title),
            state=escape(state),
            exit="" if exit_code is None else f" (exit code {exit_code})",
            request=escape(named.uuid if named is not None else "-"),
            container=escape(container.uuid if container is not None else "-"),
            reason=reason,
            note=escape(note),
            output=escape(output.decode("utf-8", "replace")) or "(nothing kept yet)",
        )
