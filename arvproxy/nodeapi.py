"""
The Arvados API calls of a node dispatcher (L{arvproxy.nodedispatcher}) and of
C{arvproxy node}, made with the dispatcher's own token, as C{sdk/go/dispatch} and
C{lib/dispatchcloud/container/queue.go} make them:

  - C{GET api_client_authorizations/current}: which token this dispatcher is (its UUID is
    what C{locked_by_uuid} says of the containers it holds);
  - C{GET containers} with C{filters}, C{order}, C{select}, C{limit} and C{offset}: the
    queue (C{state = Queued}, C{priority > 0}, highest priority first) and the containers
    this token holds (C{locked_by_uuid = <its UUID>}), page after page;
  - C{GET container_requests} (C{container_uuid = ...}): the requests of a container, when
    C{Take.Properties} names properties;
  - C{POST containers/<uuid>/lock} and C{POST containers/<uuid>/unlock};
  - C{PUT containers/<uuid>} (L{ArvadosCluster.update_container}): C{Cancelled} with a
    C{runtime_status} reason.

The API server lets only an admin lock a container or move it on, and only the token holding
the lock unlock it or change its progress fields (C{Container#validate_change},
C{check_unlock}): the dispatcher's token must be an admin's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from arvproxy.backends.arvados import PAGE_SIZE, ArvadosCluster, _Rejected
from arvproxy.config import ClusterConfig
from arvproxy.nodepolicy import QUEUE_FIELDS, QueueEntry

DISPATCHER_SCOPES = (
    "GET /arvados/v1/api_client_authorizations/current",
    "GET /arvados/v1/containers",
    "GET /arvados/v1/containers/",
    "POST /arvados/v1/containers/",
    "PUT /arvados/v1/containers/",
    "GET /arvados/v1/container_requests",
)
"""
The scopes a node dispatcher's token needs, for its own calls (above), its gateways' (read and
update their container, read its own token with C{containers/<uuid>/auth}, list its requests)
and C{arvproxy node}'s: nothing but containers, and reading container requests.
"""

MAX_QUEUE_PAGES = 100
"""The most pages of the queue read in one look (C{PAGE_SIZE} each)."""


class LockLost(Exception):
    """A lock or unlock the API server refused: someone else was first, or the state moved on."""


class DispatchAPI(ArvadosCluster):
    """
    L{ArvadosCluster} with the dispatcher's token as its service token, and the calls above.

    @ivar token_uuid: this token's UUID, once L{identify} has fired.
    """

    token_uuid: str = ""

    @classmethod
    def for_node(cls, reactor: Any, config: ClusterConfig, token: str, **kwargs: Any) -> Any:
        """The API at C{Services.Controller.ExternalURL}, asked with C{token}."""
        return cls(
            reactor,
            config.api_url,
            token,
            cluster_id=config.cluster_id,
            service_token_is_root=token == config.system_root_token,
            insecure=config.tls_insecure,
            cache_ttl=0,
            **kwargs,
        )

    def identify(self) -> Any:
        """
        C{api_client_authorizations/current}: a Deferred firing with this token's UUID (also
        kept in L{token_uuid}).
        """
        return self._deferred(self._identify())

    async def _identify(self) -> str:
        record = await self._api(
            "GET", "api_client_authorizations/current", self._service_token, as_user=False
        )
        uuid = record.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            raise self._malformed("GET", "api_client_authorizations/current")
        self.token_uuid = uuid
        return uuid

    async def list_entries(
        self, filters: list[list[Any]], order: str, max_pages: int = MAX_QUEUE_PAGES
    ) -> list[QueueEntry]:
        """
        Every container matching C{filters}, in C{order}, page after page (at most
        C{max_pages}), as L{QueueEntry}s.  A page shorter than asked does not end the list
        (the server may cap pages: C{API.MaxItemsPerResponse}); an empty one does.
        """
        entries: dict[str, QueueEntry] = {}
        offset = 0
        for _ in range(max_pages):
            page = await self._api(
                "GET",
                "containers",
                self._service_token,
                as_user=False,
                params={
                    "filters": json.dumps(filters),
                    "order": json.dumps([order, "uuid asc"]),
                    "select": json.dumps(list(QUEUE_FIELDS)),
                    "limit": str(PAGE_SIZE),
                    "offset": str(offset),
                    "count": "none",
                },
            )
            items = page.get("items")
            if not isinstance(items, list):
                raise self._malformed("GET", "containers")
            if not items:
                break
            for item in items:
                if not isinstance(item, Mapping):
                    raise self._malformed("GET", "containers")
                try:
                    entry = QueueEntry.from_record(item)
                except ValueError:
                    raise self._malformed("GET", "containers") from None
                entries.setdefault(entry.uuid, entry)
            offset += len(items)
        return list(entries.values())

    def queue(self) -> Any:
        """The queue: C{Queued} containers with a priority, the highest first."""
        return self._deferred(
            self.list_entries([["state", "=", "Queued"], ["priority", ">", 0]], "priority desc")
        )

    def held(self) -> Any:
        """The containers this token holds the lock on (C{Locked} or C{Running})."""
        return self._deferred(self.list_entries([["locked_by_uuid", "=", self.token_uuid]], "uuid"))

    def requests_of(self, container_uuid: str) -> Any:
        """The records (mappings) of the container requests that use a container."""
        return self._deferred(self._requests_of(container_uuid))

    async def _requests_of(self, container_uuid: str) -> list[Mapping[str, Any]]:
        found: list[Mapping[str, Any]] = []
        for _ in range(MAX_QUEUE_PAGES):
            page = await self._api(
                "GET",
                "container_requests",
                self._service_token,
                as_user=False,
                params={
                    "filters": json.dumps([["container_uuid", "=", container_uuid]]),
                    "select": json.dumps(["uuid", "state", "properties", "published_ports"]),
                    "order": json.dumps(["uuid asc"]),
                    "limit": str(PAGE_SIZE),
                    "offset": str(len(found)),
                    "count": "none",
                },
            )
            items = page.get("items")
            if not isinstance(items, list):
                raise self._malformed("GET", "container_requests")
            if not items:
                break
            found += [item for item in items if isinstance(item, Mapping)]
        return found

    def lock(self, uuid: str) -> Any:
        """
        C{POST containers/<uuid>/lock}.

        @return: a Deferred failing with L{LockLost} when the API server refuses (422:
            another dispatcher locked it first, or it is no longer Queued).
        """
        return self._deferred(self._lock_call(uuid, "lock"))

    def unlock(self, uuid: str) -> Any:
        """C{POST containers/<uuid>/unlock} (back to Queued); L{LockLost} when refused."""
        return self._deferred(self._lock_call(uuid, "unlock"))

    async def _lock_call(self, uuid: str, action: str) -> Mapping[str, Any]:
        self._containers.forget(uuid)
        try:
            return await self._api(
                "POST", f"containers/{uuid}/{action}", self._service_token, as_user=False
            )
        except _Rejected as e:
            raise LockLost(e.api_message) from None

    @staticmethod
    def _deferred(coroutine: Any) -> Any:
        from twisted.internet import defer

        return defer.ensureDeferred(coroutine)
