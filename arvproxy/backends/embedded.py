"""
The embedded registry as a cluster backend: L{ICluster} over a L{RegistryStore} for code running
in the reactor.  Every store call runs in the registry's own thread pool and answers through a
Deferred, so no database work ever blocks the reactor.
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from arvproxy.backends import Container, ContainerRequest, Credentials, ICluster, User
from arvproxy.backends.registry import Link, RegistryError, RegistryStore, Token, file_identity
from arvproxy.errors import Unavailable
from arvproxy.retry import busy_database

if TYPE_CHECKING:
    from arvproxy.config import ClusterConfig

_T = TypeVar("_T")


@implementer(ICluster)
class EmbeddedRegistry(Service):
    """
    L{ICluster} over a L{RegistryStore}, for code running in the reactor.

    Every call runs the store method in this object's own thread pool and returns a Deferred
    with its result, so the reactor never waits for SQLite (L{data_version}, which never waits
    either, is the one synchronous call).  Start the pool with L{start} (or
    as a service, with C{startService}) before calling anything, and stop it with L{stop}
    (safe to call more than once).  Calls made while the pool is not running fail with
    L{Unavailable}; so do database failures (a lock held too long, a disk error), which are
    logged.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        store: RegistryStore | str,
        *,
        cluster_id: str | None = None,
        system_root_token: str = "",
        clock: Callable[[], float] = time.time,
        max_threads: int = 4,
    ) -> None:
        """
        @param store: a store, or the path of the SQLite file to open one on; with a path,
            C{cluster_id} is required and C{system_root_token} and C{clock} are passed on.
        @param max_threads: the size of the thread pool (concurrent database calls).
        @raise ValueError: a path without C{cluster_id}.
        """
        if isinstance(store, str):
            if cluster_id is None:
                raise ValueError("EmbeddedRegistry needs a cluster_id to open a registry file")
            store = RegistryStore(store, cluster_id, clock, system_root_token=system_root_token)
        self.store = store
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="arvproxy-registry")
        self._version_db: sqlite3.Connection | None = None
        self._version_identity: tuple[int, int] | None = None
        self._started = False
        self._stopped = False

    @classmethod
    def from_config(cls, reactor: IReactorFromThreads, config: ClusterConfig) -> EmbeddedRegistry:
        """The registry a parsed configuration describes (not started)."""
        return cls(
            reactor,
            config.registry_path,
            cluster_id=config.cluster_id,
            system_root_token=config.system_root_token,
        )

    def start(self) -> None:
        """Start the thread pool.  Does nothing if already started."""
        if not self._started and not self._stopped:
            self._started = True
            self._pool.start()

    def stop(self) -> None:
        """Stop the thread pool, waiting for running calls.  Safe to call twice; final."""
        if not self._stopped:
            self._stopped = True
            if self._started:
                self._pool.stop()
            if self._version_db is not None:
                self._version_db.close()
                self._version_db = None

    def data_version(self) -> int | None:
        """
        A number that changes whenever anything (this registry's pool, another process, the
        admin command) has committed a change to the registry file since the previous call;
        C{None} when SQLite cannot say right now, so that no kept answer may be trusted.  Also
        C{None} once when the path has come to name another file (the registry was replaced):
        the numbers of two files cannot be compared.

        Unlike every other method this runs in the calling (reactor) thread, on a connection
        of its own that never writes: SQLite answers from its shared-memory WAL index, in a few
        microseconds, and is told never to wait for a lock.
        """
        if self._stopped:
            return None
        try:
            identity = file_identity(self.store.path)
            if self._version_db is not None and identity != self._version_identity:
                # Closing is safe: SQLite leaves alone the -wal and -shm of a moved file.
                self._version_db.close()
                self._version_db = None
                return None
            if self._version_db is None:
                if identity is None:
                    return None
                # mode=rw: never create the file (the store creates it, owner-only).
                uri = "file:" + urllib.parse.quote(os.path.abspath(self.store.path)) + "?mode=rw"
                db = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None)
                try:
                    version = int(db.execute("PRAGMA data_version").fetchone()[0])
                except sqlite3.Error:
                    db.close()
                    raise
                if file_identity(self.store.path) != identity:
                    db.close()  # Replaced while being opened: try again next time.
                    return None
                self._version_db, self._version_identity = db, identity
                return version
            return int(self._version_db.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return None

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> Deferred[None] | None:
        self.stop()
        return super().stopService()

    def _call(self, f: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:
        """Run C{f} in the pool; database failures become L{Unavailable}, logged here."""
        if not self._started or self._stopped:
            return fail(Unavailable("The registry is not running."))
        d = deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

        def unavailable(failure: Failure) -> NoReturn:
            failure.trap(sqlite3.Error, RegistryError, OSError)
            self.log.failure("registry call {name} failed", failure, name=f.__name__)
            raise Unavailable(
                "The cluster registry cannot answer right now.",
                hint="Try again shortly.",
                # A lock held past the busy timeout passes; a broken file does not.
                transient=busy_database(failure.value),
            )

        return d.addErrback(unavailable)

    # ICluster

    def authenticate(self, token: str) -> Deferred[Credentials]:
        return self._call(self.store.authenticate, token)

    def get_container_request(self, uuid: str) -> Deferred[ContainerRequest]:
        return self._call(self.store.get_container_request, uuid)

    def get_container(self, uuid: str) -> Deferred[Container]:
        return self._call(self.store.get_container, uuid)

    def container_requests_for(self, container_uuid: str) -> Deferred[list[ContainerRequest]]:
        return self._call(self.store.container_requests_for, container_uuid)

    def permission_level(
        self, user_uuid: str, target_uuid: str, credentials: Credentials | None = None
    ) -> Deferred[str | None]:
        # The registry decides from its own records: the credentials add nothing.
        return self._call(self.store.permission_level, user_uuid, target_uuid)

    def update_container(self, uuid: str, **changes: Any) -> Deferred[Container]:
        return self._call(self.store.update_container, uuid, **changes)

    # Beyond ICluster: administration and dispatching.

    def get_record(self, uuid: str) -> Deferred[dict[str, Any]]:
        """Any record as a JSON-able dict; see L{RegistryStore.get}."""
        return self._call(self.store.get, uuid)

    def create_user(self, full_name: str, is_admin: bool = False) -> Deferred[User]:
        return self._call(self.store.create_user, full_name, is_admin)

    def create_token(
        self,
        user_uuid: str,
        scopes: Iterable[str] = ("all",),
        ttl: float | None = None,
        credentials: Credentials | None = None,
    ) -> Deferred[tuple[str, Token]]:
        # The registry makes tokens itself: the signed-in user's credentials add nothing.
        return self._call(self.store.create_token, user_uuid, tuple(scopes), ttl)

    def list_container_requests(
        self, owner_uuid: str | None = None, credentials: Credentials | None = None
    ) -> Deferred[list[ContainerRequest]]:
        return self._call(self.store.list_container_requests, owner_uuid)

    def revoke_token(self, token_or_uuid: str) -> Deferred[Token]:
        return self._call(self.store.revoke_token, token_or_uuid)

    def exchange_token(self, token: str, ttl: float) -> Deferred[str]:
        """See L{RegistryStore.exchange_token}."""
        return self._call(self.store.exchange_token, token, ttl)

    def create_container_request(
        self, owner_uuid: str, **fields: Any
    ) -> Deferred[ContainerRequest]:
        """See L{RegistryStore.create_container_request} for the keyword arguments."""
        return self._call(self.store.create_container_request, owner_uuid, **fields)

    def grant_permission(self, user_uuid: str, target_uuid: str, level: str) -> Deferred[Link]:
        return self._call(self.store.grant_permission, user_uuid, target_uuid, level)

    def list_containers(self, state: str | None = None) -> Deferred[list[Container]]:
        return self._call(self.store.list_containers, state)

    def lock_container(self, uuid: str) -> Deferred[bool]:
        return self._call(self.store.lock_container, uuid)
