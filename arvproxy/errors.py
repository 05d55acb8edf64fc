"""
The handful of failures a request can meet, each carrying its HTTP status.

Raise one of these anywhere on the path of a request; L{arvproxy.pages.render_error} turns it
into a page for a browser or a short JSON body for an API client.  Messages are shown to the
person at the other end, so they must never contain a token or a secret.
"""

from __future__ import annotations

from collections.abc import Callable


class ProxyError(Exception):
    """
    A failure to serve a request, shown to the client with C{status}.

    @ivar status: the HTTP status code of the response.
    @ivar title: a short heading for the error page.
    @ivar message: what went wrong, in one or two sentences, safe to show.
    @ivar hint: what the person can do about it, or C{""}.
    @ivar retry_after: seconds for a C{Retry-After} header, or C{None} for none.
    @ivar headers: further response headers (lower-case names), e.g. to mark who refused.
    @ivar links: C{(label, URL)} pairs the page offers (e.g. the container's logs).
    """

    status = 500
    title = "Internal error"
    retry_after: int | None = None
    links: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        message: str,
        hint: str = "",
        retry_after: int | None = None,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.headers = headers or {}
        if retry_after is not None:
            self.retry_after = retry_after


class BadRequest(ProxyError):
    status = 400
    title = "Bad request"


class Unauthorized(ProxyError):
    """No token, or a token that is invalid, revoked or expired."""

    status = 401
    title = "Sign-in required"


class Forbidden(ProxyError):
    """A valid token that may not reach this target (scope or permission)."""

    status = 403
    title = "Permission denied"


class NotFound(ProxyError):
    status = 404
    title = "Not found"


class Gone(ProxyError):
    """The container has finished: it will never serve again."""

    status = 410
    title = "Container finished"


class RequestHeaderFieldsTooLarge(ProxyError):
    status = 431
    title = "Request headers too large"


class BadGateway(ProxyError):
    """The next hop could not be reached, failed its checks, or broke the protocol."""

    status = 502
    title = "Bad gateway"


class Unavailable(ProxyError):
    """
    Not yet: the container is not running, or its service is not listening yet, or the cluster
    cannot answer.

    @ivar transient: the cluster cannot answer for a moment: the same call may well succeed if
        made again (the API server timed out, refused or dropped the connection, or answered
        408, 429 or a 5xx other than 501; the registry's database stayed locked).
        L{arvproxy.retry} retries these.
    """

    status = 503
    title = "Not available yet"
    retry_after = 5

    def __init__(
        self,
        message: str,
        hint: str = "",
        retry_after: int | None = None,
        headers: dict[bytes, bytes] | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message, hint, retry_after, headers)
        self.transient = transient


class GatewayTimeout(ProxyError):
    status = 504
    title = "Gateway timeout"


class Translating:
    """
    A context manager that raises, from the exception that ended its block, whatever
    C{translate} makes of it (a L{ProxyError} the client should see); exceptions it returns
    C{None} for pass unchanged.  A class, not a C{@contextmanager} generator: one wraps every
    request each hop forwards.
    """

    def __init__(self, translate: Callable[[Exception], Exception | None]) -> None:
        self._translate = translate

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, Exception):
            translated = self._translate(error)
            if translated is not None:
                raise translated from error
