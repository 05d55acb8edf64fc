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

import hashlib
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from arvproxy.backends import Container, ContainerRequest, Credentials, ICluster
from arvproxy.errors import ProxyError, Unauthorized, Unavailable

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
        # Bumped by clear(): answers of fetches started before it are not kept.
        self._generation = 0

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
        waiting = self._waiting.get(key)
        if waiting is None:
            waiting = self._waiting[key] = []
            start = True
        else:
            start = False
        waiter: Deferred[_V] = Deferred(lambda d: self._cancel(waiting, d))
        waiting.append(waiter)
        if start:
            fetched: Deferred[Any] = maybeDeferred(fetch)
            fetched.addBoth(self._fetched, key, waiting, self._generation)
        return waiter

    def _cancel(self, waiting: list[Deferred[_V]], waiter: Deferred[_V]) -> None:
        if waiter in waiting:
            waiting.remove(waiter)

    def _fetched(
        self, result: _V | Failure, key: Hashable, waiting: list[Deferred[_V]], generation: int
    ) -> None:
        if self._waiting.get(key) is waiting:
            del self._waiting[key]
        lifetime = self.ttl
        if isinstance(result, Failure):
            definite = result.check(ProxyError) and not result.check(Unavailable)
            lifetime = self.failure_ttl if definite else 0.0
        # A fetch that began before a clear() may hold an answer from before the change.
        if lifetime > 0 and generation == self._generation:
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
        """
        Forget every kept answer.  Fetches already running still answer the callers waiting
        for them, but what they bring is not kept, and a new caller starts a fresh fetch.
        """
        self._entries.clear()
        self._waiting.clear()
        self._generation += 1


@implementer(ICluster)
class CachedCluster:
    """
    Any L{ICluster}, with its answers about tokens, container requests and permissions kept for
    C{ttl} seconds, so that a page with a hundred assets does not cost four hundred lookups.

    Without C{version}, containers are never kept: their state (Running, finished) is read fresh
    for every request, so a finished container is refused at once; and a revoked token may keep
    working for up to C{ttl} seconds.  An expired one never does (its expiry is checked on every
    use).  Everything else (C{update_container}, the portal's listing and token calls) passes
    straight through.

    With C{version} (a cheap call that returns something different whenever the backend's data
    may have changed, or C{None} when it cannot tell), the first call of each reactor turn asks
    it, and everything kept is forgotten as soon as it changes.  Containers are then kept too:
    nothing is ever answered from before a change, so a finished container and a revoked token
    are refused at once, and the steady state costs no lookup at all.
    """

    def __init__(
        self,
        clock: IReactorTime,
        cluster: Any,
        ttl: float,
        version: Callable[[], object | None] | None = None,
    ) -> None:
        self._clock = clock
        self._cluster = cluster
        self._credentials: AnswerCache[Credentials] = AnswerCache(clock, ttl)
        self._requests: AnswerCache[ContainerRequest] = AnswerCache(clock, ttl)
        self._request_lists: AnswerCache[list[ContainerRequest]] = AnswerCache(clock, ttl)
        self._levels: AnswerCache[str | None] = AnswerCache(clock, ttl)
        self._version = version
        self._seen: object | None = None
        self._checked = False
        self._generation = 0
        self._containers: AnswerCache[Container] | None = None
        self._caches: list[AnswerCache[Any]] = [
            self._credentials,
            self._requests,
            self._request_lists,
            self._levels,
        ]
        if version is not None:
            self._containers = AnswerCache(clock, ttl)
            self._caches.append(self._containers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cluster, name)

    def _revalidate(self) -> None:
        """
        Forget everything kept if the backend's data has changed (or may have).

        Asked once per reactor turn: the requests served in one turn (one request makes
        several calls) share an answer that is fresh for all of them.
        """
        if self._version is None or self._checked:
            return
        current = self._version()
        if current is None or current != self._seen:
            self._seen = current
            self._forget_all()
        if current is not None:
            self._checked = True
            self._clock.callLater(0, self._next_turn)

    def _next_turn(self) -> None:
        self._checked = False

    def _forget_all(self) -> None:
        self._generation += 1
        for cache in self._caches:
            cache.clear()

    def generation(self) -> int | None:
        """
        A number that stays the same only while every answer this cluster gives stays the same
        (checked as L{_revalidate} does: once per reactor turn); C{None} without C{version},
        when answers may change unseen (for up to C{ttl}), so no decision may outlive a request.
        """
        if self._version is None:
            return None
        self._revalidate()
        return self._generation

    def authenticate(self, token: str) -> Deferred[Credentials]:
        self._revalidate()
        key = token_key(token)
        d = self._credentials.get(key, lambda: self._cluster.authenticate(token))
        return d.addCallback(self._unexpired, key)

    def _unexpired(self, credentials: Credentials, key: str) -> Credentials:
        expires = credentials.expires_at
        if expires is not None and expires.timestamp() <= self._clock.seconds():
            self._credentials.forget(key)
            raise Unauthorized("Your token has expired.")
        return credentials

    def get_container_request(self, uuid: str) -> Deferred[ContainerRequest]:
        self._revalidate()
        return self._requests.get(uuid, lambda: self._cluster.get_container_request(uuid))

    def get_container(self, uuid: str) -> Deferred[Container]:
        if self._containers is None:
            return self._cluster.get_container(uuid)  # type: ignore[no-any-return]
        self._revalidate()
        return self._containers.get(uuid, lambda: self._cluster.get_container(uuid))

    def container_requests_for(self, container_uuid: str) -> Deferred[list[ContainerRequest]]:
        self._revalidate()
        return self._request_lists.get(
            container_uuid, lambda: self._cluster.container_requests_for(container_uuid)
        )

    def permission_level(
        self, user_uuid: str, target_uuid: str, credentials: Credentials | None = None
    ) -> Deferred[str | None]:
        self._revalidate()
        return self._levels.get(
            (user_uuid, target_uuid),
            lambda: self._cluster.permission_level(user_uuid, target_uuid, credentials=credentials),
        )

    def update_container(self, uuid: str, **changes: Any) -> Deferred[Container]:
        return self._cluster.update_container(uuid, **changes)  # type: ignore[no-any-return]

    def exchange_token(self, token: str, ttl: float) -> Deferred[str]:
        """Exchange, and forget the used-up token at once (see L{RegistryStore.exchange_token})."""
        self._generation += 1  # Decisions made with the used-up token no longer hold.
        self._credentials.forget(token_key(token))
        d: Deferred[str] = self._cluster.exchange_token(token, ttl)
        return d.addBoth(self._forgetting, token_key(token))

    def _forgetting(self, result: Any, key: str) -> Any:
        self._generation += 1
        self._credentials.forget(key)
        return result


def token_key(token: str) -> str:
    """What a cache keys a token by: never the token itself."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
