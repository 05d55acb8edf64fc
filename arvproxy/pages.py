"""
What a person sees when a request cannot be served: a short HTML page for a browser navigation,
a small JSON body for anything else (C{fetch}, XHR, curl, API clients).

Pages never contain a token: they are built only from an error's own message, which the code
that raises it keeps free of secrets.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from arvproxy.errors import ProxyError
from arvproxy.redirects import same_origin_location

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">{refresh}
<title>{status} {title}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem;
       color: #1b1b1b; background: #fff; }}
h1 {{ font-size: 1.5rem; }}
.status {{ color: #555; }}
.hint {{ background: #f3f6fa; border-left: 4px solid #1a5fb4; padding: .75rem 1rem; }}
</style>
</head>
<body>
<main>
<h1>{title} <span class="status">({status})</span></h1>
<p>{message}</p>
{hint}{links}
</main>
</body>
</html>
"""


def wants_html(request: Any) -> bool:
    """
    Whether the client is a browser navigating to a page (as opposed to C{fetch}, XHR or an API
    client), judged from C{Sec-Fetch-Mode} and, for older clients, C{Accept}.
    """
    mode = request.getHeader(b"sec-fetch-mode")
    if mode is not None:
        return mode.lower() == b"navigate"
    if request.getHeader(b"x-requested-with") is not None:
        return False
    accept = request.getHeader(b"accept") or b""
    return b"text/html" in accept.lower()


def render_error(request: Any, error: ProxyError) -> None:
    """
    Write C{error} as the whole response to C{request} and finish it.
    """
    request.finishEarly()
    request.setResponseCode(error.status)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    if error.retry_after is not None:
        request.setHeader(b"retry-after", b"%d" % (error.retry_after,))
    for name, value in error.headers.items():
        request.setHeader(name, value)
    if wants_html(request):
        refresh = ""
        if error.retry_after is not None:
            refresh = f'\n<meta http-equiv="refresh" content="{error.retry_after}">'
        hint = f'<p class="hint">{escape(error.hint)}</p>' if error.hint else ""
        links = "".join(
            f'\n<p class="links"><a href="{escape(url)}">{escape(label)}</a></p>'
            for label, url in error.links
        )
        body = _PAGE.format(
            status=error.status,
            title=escape(error.title),
            message=escape(error.message),
            hint=hint,
            links=links,
            refresh=refresh,
        ).encode("utf-8")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(
            b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'"
        )
    else:
        document: dict[str, Any] = {"errors": [error.message], "status": error.status}
        if error.hint:
            document["hint"] = error.hint
        if error.links:
            document["links"] = {label.lower(): url for label, url in error.links}
        body = json.dumps(document).encode("utf-8") + b"\n"
        request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % (len(body),))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def redirect(request: Any, location: bytes, set_cookies: list[bytes] = ()) -> None:  # type: ignore[assignment]
    """
    Answer with C{303 See Other} to C{location} (a path and query on this origin), setting the
    given C{Set-Cookie} values.  Whatever C{location} holds (a request target may hold
    C{//other.example/}), the C{Location} sent is L{same_origin_location}'s: a path that no
    browser reads as another origin.
    """
    request.finishEarly()
    request.setResponseCode(303)
    request.setHeader(b"location", same_origin_location(location))
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"referrer-policy", b"no-referrer")
    for cookie in set_cookies:
        request.responseHeaders.addRawHeader(b"set-cookie", cookie)
    request.setHeader(b"content-length", b"0")
    request.finish()
