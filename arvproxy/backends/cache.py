"""
A short-lived answer cache for cluster backends that ask a remote server.

L{AnswerCache.get} looks a key up, and on a miss calls a fetch function once: every caller that
asks for the same key while that call is running waits for it and gets the same answer
(request coalescing), so a page with a hundred assets costs one API call, not a hundred.
Answers are kept for C{ttl} seconds by the injected clock, never longer: a revoked token stops
working within C{ttl}.  Failures are not kept, except the definite ones (a L{ProxyError} other
than L{Unavailable}: unknown token, no such record) for C{failure_ttl} seconds, which is short
and may be zero; an outage (L{Unavailable}) is never kept, so the next request asks again and
the backend recovers as soon as the server does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from arvproxy.errors import ProxyError, Unavailable

_V = TypeVar("_V")

DEFAULT_MAX_ENTRIES = 10_000


class AnswerCache(Generic[_V]):
    """
    Answers by key, each kept for a while, with one fetch per key at a time.

    @ivar ttl: seconds an answer stays usable (zero: answers are shared between concurrent
        callers but never kept).
    @ivar failure_ttl: seconds a definite failure stays usable; never more than C{ttl}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float,
        failure_ttl: float = 0.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if ttl < 0 or failure_ttl < 0:
            raise ValueError("cache lifetimes cannot be negative")
        self._clock = clock
        self.ttl = ttl
        self.failure_ttl = min(failure_ttl, ttl)
        self._max_entries = max_entries
        # key -> (expires at, value or Failure)
        self._entries: dict[Hashable, tuple[float, _V | Failure]] = {}
        # key -> the Deferreds of callers waiting for the running fetch
        self._waiting: dict[Hashable, list[Deferred[_V]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, fetch: Callable[[], Deferred[_V] | _V]) -> Deferred[_V]:
        """
        The answer for C{key}: a fresh kept one, the one a running fetch is about to give, or
        the result of calling C{fetch()} now.

        Each caller gets its own Deferred: cancelling it stops that caller's wait, not the
        shared fetch.
        """
        now = self._clock.seconds()
        entry = self._entries.get(key)
        if entry is not None:
            expires, answer = entry
            if now < expires:
                return fail(answer) if isinstance(answer, Failure) else succeed(answer)
            del self._entries[key]
        waiter: Deferred[_V] = Deferred(lambda d: self._cancel(key, d))
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._waiting[key] = [waiter]
        fetched: Deferred[Any] = maybeDeferred(fetch)
        fetched.addBoth(self._fetched, key)
        return waiter

    def _cancel(self, key: Hashable, waiter: Deferred[_V]) -> None:
        waiting = self._waiting.get(key)
        if waiting is not None and waiter in waiting:
            waiting.remove(waiter)

    def _fetched(self, result: _V | Failure, key: Hashable) -> None:
        waiting = self._waiting.pop(key, [])
        lifetime = self.ttl
        if isinstance(result, Failure):
            definite = result.check(ProxyError) and not result.check(Unavailable)
            lifetime = self.failure_ttl if definite else 0.0
        if lifetime > 0:
            self._store(key, self._clock.seconds() + lifetime, result)
        for waiter in waiting:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _store(self, key: Hashable, expires: float, answer: _V | Failure) -> None:
        if len(self._entries) >= self._max_entries:
            self.prune()
            while len(self._entries) >= self._max_entries:
                # Oldest first: dicts keep insertion order.
                del self._entries[next(iter(self._entries))]
        self._entries[key] = (expires, answer)

    def prune(self) -> None:
        """Forget every answer that is no longer fresh."""
        now = self._clock.seconds()
        for key in [k for k, (expires, _) in self._entries.items() if now >= expires]:
            del self._entries[key]

    def forget(self, key: Hashable) -> None:
        """Forget the answer for C{key}, if one is kept (a running fetch is not affected)."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget every kept answer."""
        self._entries.clear()
