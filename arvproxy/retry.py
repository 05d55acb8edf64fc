"""
Calls to the cluster that may fail for a moment, retried the way crunch-run retries its API
calls; the one retry rule the gateways and the local dispatcher follow.

crunch-run sets C{api.Retries = 10} (C{lib/crunchrun/crunchrun.go}, C{main}), which the Go SDK
turns into a deadline of C{30 * RetryDelay (2 s) * 10} = 10 minutes
(C{sdk/go/arvadosclient/arvadosclient.go}, C{CallRaw}).  Within it,
C{sdk/go/arvados/client.go} (C{Client.Do}) retries whatever go-retryablehttp's
C{DefaultRetryPolicy} calls recoverable (every transport failure but a TLS certificate one,
C{429}, every C{5xx} but C{501}) and waits C{exponentialBackoff}: C{min + (2^attempt * min -
min) * jitter}, C{jitter} uniform in [0, 1), C{min} 1 s, at most a tenth of the deadline.

arvproxy follows that rule with one addition the API's own documentation of C{408 Request
Timeout} invites: a C{408} is tried again too.  Everything else is permanent: C{4xx} (a wrong
token, a record that is gone, an update the server refuses), C{501}, a certificate the client
does not trust, an answer that cannot be read.  The embedded registry's "database is locked" is
transient (another process held the write lock longer than the busy timeout).
"""

from __future__ import annotations

import random as _random
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from OpenSSL import SSL
from twisted.internet import defer, task
from twisted.internet import error as net_error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from arvproxy.errors import ProxyError, Unavailable

log = Logger()

_T = TypeVar("_T")

DEADLINE = 600.0
"""Seconds from a call's first failure after which it is given up (crunch-run's 10 minutes)."""

MIN_WAIT = 1.0
"""The shortest wait before trying again (the Go SDK's C{minExponentialBackoffBase})."""


def transient_status(status: int) -> bool:
    """Whether an HTTP status from the API server means "try again": 408, 429, 5xx but 501."""
    return status in (408, 429) or (500 <= status <= 599 and status != 501)


def busy_database(error: BaseException | None) -> bool:
    """Whether C{error} is SQLite giving up on a lock another connection held too long."""
    if not isinstance(error, sqlite3.OperationalError):
        return False
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _certificate_failure(error: BaseException) -> bool:
    reasons = getattr(error, "reasons", None) or []
    return isinstance(error, SSL.Error) or any(r.check(SSL.Error) for r in reasons)


def is_transient(error: BaseException) -> bool:
    """
    Whether a call that failed with C{error} may well succeed if made again in a moment.

    A backend's L{ProxyError} says so itself (an L{Unavailable} marked C{transient}; nothing else);
    below the backends, a refused, reset or timed-out connection is, and so is a busy SQLite
    database.  A TLS failure never is: no retry makes an untrusted certificate trusted.
    """
    if isinstance(error, ProxyError):
        return isinstance(error, Unavailable) and error.transient
    if _certificate_failure(error):
        return False
    if isinstance(
        error,
        (
            net_error.ConnectError,  # refused, no route, connect timeout
            net_error.DNSLookupError,
            net_error.ConnectionLost,
            net_error.TimeoutError,
            defer.TimeoutError,
            ResponseNeverReceived,
            ResponseFailed,
            ConnectionError,  # refused, reset, aborted, broken pipe
            TimeoutError,
        ),
    ):
        return True
    return busy_database(error)


def backoff(attempt: int, jitter: float, deadline: float = DEADLINE) -> float:
    """
    Seconds to wait before attempt C{attempt + 1} (C{attempt} counts from 1), with C{jitter}
    in [0, 1): the Go SDK's C{exponentialBackoff}, between L{MIN_WAIT} and a tenth of
    C{deadline}.
    """
    wait = MIN_WAIT + (2.0**attempt * MIN_WAIT - MIN_WAIT) * jitter
    return max(MIN_WAIT, min(wait, deadline / 10.0))


def describe(error: BaseException) -> str:
    """An error in a few plain words (never a token: backends keep those out of messages)."""
    if isinstance(error, ProxyError):
        return error.message
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Retrier:
    """
    Runs calls, trying each again after a transient failure (L{is_transient}) until it
    succeeds, fails for good, or L{deadline} seconds have passed since its first failure.
    Each retry is logged once, in plain words.

    @param clock: decides the waits and the deadline.
    @param random: the jitter source, a function returning floats in [0, 1).
    """

    def __init__(
        self,
        clock: IReactorTime,
        deadline: float = DEADLINE,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self._clock = clock
        self.deadline = deadline
        self._random = random
        self._waits: set[defer.Deferred[None]] = set()
        self.stopped = False

    async def call(self, what: str, f: Callable[[], Awaitable[_T]]) -> _T:
        """
        C{await f()}, tried again as this class says.

        @param what: the call in plain words, for the log ("update container zzzzz-...").
        @raise Exception: what the last attempt raised, once the failure is permanent, the
            deadline has passed, or L{stop} was called.
        """
        attempt = 0
        first_failure: float | None = None
        while True:
            attempt += 1
            try:
                return await f()
            except Exception as e:
                now = self._clock.seconds()
                if first_failure is None:
                    first_failure = now
                if not is_transient(e) or self.stopped:
                    raise
                elapsed = now - first_failure
                if elapsed >= self.deadline:
                    log.error(
                        "Giving up: cannot {what} after {n} attempts in {elapsed:.0f} s: {error}",
                        what=what,
                        n=attempt,
                        elapsed=elapsed,
                        error=describe(e),
                    )
                    raise
                wait = min(backoff(attempt, self._random(), self.deadline), self.deadline - elapsed)
                log.warn(
                    "Cannot {what} ({error}); trying again in {wait:.1f} s "
                    "(attempt {n}; giving up {deadline:.0f} s after the first failure)",
                    what=what,
                    error=describe(e),
                    wait=wait,
                    n=attempt,
                    deadline=self.deadline,
                )
                try:
                    await self._sleep(wait)
                except defer.CancelledError:
                    raise e from None

    def _sleep(self, seconds: float) -> defer.Deferred[None]:
        """A wait that L{stop} can cut short (it then fails with C{CancelledError})."""
        wait: defer.Deferred[None] = task.deferLater(self._clock, seconds, lambda: None)
        self._waits.add(wait)
        return wait.addBoth(self._forget, wait)

    def _forget(self, result: Any, wait: defer.Deferred[None]) -> Any:
        self._waits.discard(wait)
        return result

    def stop(self) -> None:
        """Stop waiting: calls now waiting to try again fail with their last error, at once."""
        self.stopped = True
        for wait in list(self._waits):
            wait.cancel()


_PHRASES = {
    "get_container": "read container {0}",
    "update_container": "update container {0}",
    "get_container_request": "read container request {0}",
    "container_requests_for": "list the requests of container {0}",
    "list_containers": "list the containers",
    "lock_container": "lock container {0}",
}


class RetryingCluster:
    """
    A cluster backend whose every call goes through a L{Retrier}: the same methods, each
    returning a Deferred that fires with the first success or the last failure.  Anything
    that is not a method (attributes, services) is the wrapped backend's.
    """

    def __init__(self, cluster: Any, retrier: Retrier) -> None:
        self.cluster = cluster
        self.retrier = retrier

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.cluster, name)
        if not callable(method) or name.startswith("_"):
            return method

        def call(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            phrase = _PHRASES.get(name, name.replace("_", " "))
            what = phrase.format(*args) if args else phrase.replace(" {0}", "")
            if kwargs.get("state"):
                what += f" (to {kwargs['state']})"
            return defer.Deferred.fromCoroutine(
                self.retrier.call(what, lambda: _awaitable(method(*args, **kwargs)))
            )

        return call


async def _awaitable(result: Any) -> Any:
    return await result if isinstance(result, defer.Deferred) else result
