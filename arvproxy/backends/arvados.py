"""
The Arvados cluster backend: L{ICluster} over the Arvados REST API (C{/arvados/v1/...}), with
treq, for clusters whose state lives in the Arvados API server.

Which token asks what:

  - L{ArvadosCluster.authenticate}: C{GET api_client_authorizations/current} with the user's
    token (validity, expiry, scopes; the API server answers it whatever the token's scopes),
    then C{GET users/current} with the same token (who, C{is_admin}, C{is_active}) -- or, for a
    token whose scopes do not allow that call, C{GET users/<owner_uuid>} with the service token.
  - Container requests and containers by UUID, and the container requests that use a container
    (C{container_requests} listed with C{filters=[["container_uuid","=",...]]}, every page):
    the service token (the SystemRootToken in the controller).
  - L{ArvadosCluster.permission_level}: the user's rows of the API server's permission graph
    for the request and its owner (C{GET computed_permissions}, admins only: the service
    token), read as the API server reads them (L{arvproxy.backends.arvados_access}).  The same
    question, asked the same way, for every token of the user, full or scoped: a scoped token
    never grants more than its user's full token, and stops working as soon as its user loses
    access.  Admins are decided by the caller from L{Credentials.is_admin}.
  - The first connection's mark (C{interactive_session_started}), and a Connect link's
    exchange for a session token (make the new one, delete the used one): the service token.
  - The services page: the user's readable container requests and their containers, and the
    Connect link's token (C{POST api_client_authorizations}): the user's own token.

Answers are kept for C{cache_ttl} seconds (L{arvproxy.backends.cache}): tokens, permission
levels, container requests and container-request lists.  Containers are never kept: each
request reads its container's state afresh (one call, shared by the requests that arrive in the
same turn of the reactor), so a container that has finished, or has not started yet, is seen
so at once.  Concurrent identical lookups share one API call.  When the API server is down,
slow (C{timeout}) or answers 5xx, calls fail with L{Unavailable} (503 with C{Retry-After}), while
fresh cached answers keep working; nothing failed is kept, so recovery is immediate.  API answers
401, 403, 404 and 422 become L{Unauthorized}, L{Forbidden}, L{NotFound} and L{BadRequest}, and a
401/403 to the service token (a wrong SystemRootToken) becomes L{Unavailable}, logged.  Tokens
never appear in logs or messages.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import treq
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from arvproxy.backends import (
    CONTAINER_REQUEST_INFIX,
    UPDATABLE_CONTAINER_FIELDS,
    USER_INFIX,
    UUID_RE,
    Container,
    ContainerRequest,
    Credentials,
    ICluster,
    uuid_infix,
)
from arvproxy.backends.apitls import (
    UntrustedAPI,
    ca_file_for,
    certificate_problem,
    explain,
    trust_root_from_file,
)
from arvproxy.backends.arvados_access import acting_users, best_level
from arvproxy.backends.cache import AnswerCache
from arvproxy.backends.cache import token_key as _digest
from arvproxy.config import ClusterConfig
from arvproxy.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ProxyError,
    Unauthorized,
    Unavailable,
)
from arvproxy.retry import is_transient, transient_status

log = Logger()


UNSTORED_CONTAINER_FIELDS = frozenset({"listening_ports"})
"""Accepted but not sent: an Arvados container record has no field that can carry them."""

PAGE_SIZE = 1000
MAX_PAGES = 1000
DEFAULT_CACHE_TTL = 10.0
DEFAULT_FAILURE_TTL = 1.0
DEFAULT_TIMEOUT = 10.0
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")


def scope_permits(scopes: Iterable[str], method: str, path: str) -> bool:
    """
    Whether a token with C{scopes} may call C{method path}, by the API server's rule: scope
    C{all}, an exact C{"METHOD /path"} (C{GET} also allows C{HEAD}), or a C{"METHOD /prefix/"}.
    """
    for scope in scopes:
        if scope == "all":
            return True
        scope_method, _, scope_path = scope.partition(" ")
        if method != scope_method and not (method == "HEAD" and scope_method == "GET"):
            continue
        if path == scope_path or (scope_path.endswith("/") and path.startswith(scope_path)):
            return True
    return False


def parse_api_time(value: object) -> datetime | None:
    """
    An Arvados timestamp (C{2025-01-02T03:04:05.123456789Z}) as an aware datetime.

    @raise ValueError: not a timestamp (C{None} and C{""} give C{None}).
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(value)
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)", value)
    if match is None:
        raise ValueError(value)
    whole, fraction, zone = match.groups()
    text = whole + "." + (fraction or "0")[:6].ljust(6, "0") + ("+00:00" if zone == "Z" else zone)
    return datetime.fromisoformat(text).astimezone(UTC)


def api_base_url(host_or_url: str) -> str:
    """
    The API's base URL, ending in C{/}, from C{Services.Controller.ExternalURL}
    (C{https://zzzzz.example.com}) or C{ARVADOS_API_HOST} (C{zzzzz.example.com:443}; https).

    @raise ValueError: neither.
    """
    text = host_or_url.strip()
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(f"not an API server address: {host_or_url!r}")
    return f"{parts.scheme}://{parts.netloc}/"


@dataclass(frozen=True)
class DispatchAPI:
    """
    The API server a dispatcher names in a gateway's C{Env}, as Arvados' dispatchers hand it
    to crunch-run (C{services/crunch-dispatch-local}: C{ARVADOS_API_HOST} is
    C{Services.Controller.ExternalURL.Host}, C{ARVADOS_API_TOKEN} the dispatcher's own token,
    C{ARVADOS_API_HOST_INSECURE} C{"1"} or C{""}).

    @ivar url: the API's base URL (always https, as the Go SDK's C{apiURL} makes it).
    @ivar token: the dispatcher's token: it holds the container's lock.
    @ivar insecure: do not verify the server's certificate.
    """

    url: str
    token: str = field(repr=False)
    insecure: bool


def parse_dispatch_api(env: Mapping[str, Any]) -> DispatchAPI | None:
    """
    The API server in a gateway's C{Env}, or C{None} when it names none.

    C{ARVADOS_API_HOST} is C{host}, C{host:port} or C{[v6]:port} (one trailing C{/} is
    tolerated, as by the Go SDK); C{ARVADOS_API_HOST_INSECURE} is true for C{1}, C{yes} or
    C{true} in any case, false otherwise (the Go SDK's C{StringBool}).

    @raise ValueError: only one of C{ARVADOS_API_HOST} and C{ARVADOS_API_TOKEN} is set, or the
        host is a URL or not a host at all.  A URL is refused rather than guessed at: crunch-run
        would prefix it with C{https://} and fail, so a dispatcher that passes one is
        misconfigured for Arvados' own programs too.
    """
    host, token = env.get("ARVADOS_API_HOST") or "", env.get("ARVADOS_API_TOKEN") or ""
    if not host and not token:
        return None
    if not isinstance(host, str) or not host:
        raise ValueError(
            "Env.ARVADOS_API_TOKEN is set but Env.ARVADOS_API_HOST is not: expected the API "
            'server as host:port, like "zzzzz.example.com:443"'
        )
    if not isinstance(token, str) or not token:
        raise ValueError(
            "Env.ARVADOS_API_HOST is set but Env.ARVADOS_API_TOKEN is not: expected the token "
            "of the dispatcher that locked the container"
        )
    if "://" in host:
        raise ValueError(
            f"Env.ARVADOS_API_HOST must be host:port, as Arvados' dispatchers pass it, not a "
            f"URL: got {host!r}; drop the scheme (the API is always https; set "
            f'Env.ARVADOS_API_HOST_INSECURE to "1" for a self-signed certificate)'
        )
    bare = host.strip().removesuffix("/")
    parts = urlsplit("https://" + bare)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or parts.path or parts.query or parts.fragment:
        raise ValueError(f"Env.ARVADOS_API_HOST must be host:port, got {host!r}")
    if parts.username is not None or not _TOKEN_RE.fullmatch(token):
        raise ValueError("Env.ARVADOS_API_HOST or Env.ARVADOS_API_TOKEN is malformed")
    insecure = str(env.get("ARVADOS_API_HOST_INSECURE") or "").lower() in ("1", "yes", "true")
    return DispatchAPI(url=f"https://{parts.netloc}/", token=token, insecure=insecure)


LISTED_RECENT_SECONDS = 24 * 3600.0
"""The services page lists a finished container this long after it finished."""

LISTED_MAX = 200
"""The most container requests of each kind (live, recently finished) the page lists."""


@dataclass(frozen=True)
class IssuedToken:
    """A token the backend made: its UUID and when it expires (C{None}: never)."""

    uuid: str
    expires_at: datetime | None


class NotLockHolder(Exception):
    """
    The gateway's token does not hold its container's lock: the API server will not let it
    move the container on (C{Container#validate_change}), so it must not serve it.
    """


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    def __init__(self, context: SSL.Context, hostname: bytes) -> None:
        self._context = context
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not re.fullmatch(rb"[0-9.]+|.*:.*", self._hostname):
            connection.set_tlsext_host_name(self._hostname)
        return connection


@implementer(IPolicyForHTTPS)
class InsecureTLSPolicy:
    """C{TLS.Insecure: true}: TLS without checking the server's certificate (test clusters)."""

    def __init__(self) -> None:
        self._context = CertificateOptions(verify=False).getContext()

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return _UnverifiedCreator(self._context, hostname)


def _trust(config: ClusterConfig, insecure_setting: str) -> dict[str, Any]:
    """The trust root and the settings' names for a backend built from C{config}."""
    ca_setting = f"Clusters.{config.cluster_id}.ArvProxy.TLS.CAFile"
    ca_file = ca_file_for(config.api_ca_file)
    trust_root = None
    if ca_file:
        try:
            trust_root = trust_root_from_file(ca_file)
        except (OSError, ValueError) as e:
            if config.api_ca_file:
                raise  # checked when the configuration was read: it changed since
            log.warn("Not using {file}: {error}", file=ca_file, error=e)
    return {"trust_root": trust_root, "tls_settings": (insecure_setting, ca_setting)}


class _Rejected(BadRequest):
    """A 422 from the API: what arvproxy sent was refused.  C{api_message} says why."""

    def __init__(self, api_message: str) -> None:
        super().__init__("The cluster's API server refused a request arvproxy made for you.")
        self.api_message = api_message


@implementer(ICluster)
class ArvadosCluster(Service):
    """
    L{ICluster} over an Arvados API server.  Start it (or its service parent) before use; stopping
    it closes its connections.

    @param service_token: the token for lookups made for the cluster rather than for a user:
        the SystemRootToken in the controller, the dispatcher's C{ARVADOS_API_TOKEN} in a
        gateway.
    @param service_token_is_root: whether C{service_token} is the SystemRootToken, so
        L{authenticate} may accept it as the system user without asking the API.
    @param clock: the time source for cache lifetimes, token expiry and call timeouts
        (default: C{reactor}).
    @param trust_root: CA certificates to trust instead of the system's: a C{Certificate} or
        any trust root (L{arvproxy.backends.apitls.trust_root_from_file}).
    @param tls_settings: the names of the settings that skip the certificate check and that
        name a CA file, for the message when the check fails.
    """

    def __init__(
        self,
        reactor: Any,
        api_url: str,
        service_token: str,
        *,
        cluster_id: str,
        service_token_is_root: bool = True,
        insecure: bool = False,
        trust_root: Any = None,
        tls_settings: tuple[str, str] = ("TLS.Insecure", "ArvProxy.TLS.CAFile"),
        cache_ttl: float = DEFAULT_CACHE_TTL,
        failure_ttl: float = DEFAULT_FAILURE_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        clock: IReactorTime | None = None,
    ) -> None:
        self._base = api_base_url(api_url)
        self._service_token = service_token
        self._service_is_root = service_token_is_root
        self.cluster_id = cluster_id
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._timeout = timeout
        self._tls_settings = tls_settings
        self._explained = False
        self._probing = False
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self.pool.retryAutomatically = False
        policy: IPolicyForHTTPS = (
            InsecureTLSPolicy() if insecure else BrowserLikePolicyForHTTPS(trustRoot=trust_root)
        )
        agent = Agent(reactor, contextFactory=policy, pool=self.pool, connectTimeout=timeout)
        self._http = HTTPClient(agent)
        self._credentials: AnswerCache[Credentials] = AnswerCache(
            self._clock, cache_ttl, failure_ttl
        )
        self._levels: AnswerCache[str | None] = AnswerCache(self._clock, cache_ttl, failure_ttl)
        self._acting: AnswerCache[list[str]] = AnswerCache(self._clock, cache_ttl, failure_ttl)
        self._requests: AnswerCache[ContainerRequest] = AnswerCache(
            self._clock, cache_ttl, failure_ttl
        )
        self._request_lists: AnswerCache[list[ContainerRequest]] = AnswerCache(
            self._clock, cache_ttl
        )
        # Never kept: shared only by the lookups of one turn of the reactor (see get_container).
        self._containers: AnswerCache[Container] = AnswerCache(self._clock, 0)
        self._reactor = reactor
        self._turn = 0
        self._in_turn = False

    @classmethod
    def from_config(cls, reactor: Any, config: ClusterConfig, **kwargs: Any) -> ArvadosCluster:
        """The controller's backend: C{Services.Controller.ExternalURL} and the SystemRootToken."""
        return cls(
            reactor,
            config.api_url,
            config.system_root_token,
            cluster_id=config.cluster_id,
            insecure=config.tls_insecure,
            cache_ttl=config.cache_ttl,
            **_trust(config, f"Clusters.{config.cluster_id}.TLS.Insecure"),
            **kwargs,
        )

    @classmethod
    def from_dispatch_env(
        cls, reactor: Any, config: ClusterConfig, env: Mapping[str, Any], **kwargs: Any
    ) -> ArvadosCluster:
        """
        A gateway's backend, from the dispatcher's C{Env} (L{parse_dispatch_api}): the API at
        C{ARVADOS_API_HOST}, asked with the dispatcher's C{ARVADOS_API_TOKEN}, the token that
        holds the container's lock, as crunch-run asks (C{lib/crunchrun}: every update of the
        container record goes through C{DispatcherArvClient}).

        @raise ValueError: the C{Env} names no API server, or names it wrongly.
        """
        api = parse_dispatch_api(env)
        if api is None:
            raise ValueError("Env.ARVADOS_API_HOST and Env.ARVADOS_API_TOKEN are not set")
        return cls(
            reactor,
            api.url,
            api.token,
            cluster_id=config.cluster_id,
            service_token_is_root=False,
            insecure=api.insecure or config.tls_insecure,
            cache_ttl=config.cache_ttl,
            **_trust(config, "Env.ARVADOS_API_HOST_INSECURE"),
            **kwargs,
        )

    def stopService(self) -> Any:
        super().stopService()
        return self.pool.closeCachedConnections()

    def probe(self) -> defer.Deferred[None]:
        """
        Ask the API server who the service token is, to learn at start-up whether it can be
        reached and trusted.

        @raise UntrustedAPI: the server's certificate fails the check (said once, in the log).
        @raise ProxyError: the server cannot answer, or refuses the token.
        """

        async def ask() -> None:
            # Whoever probes says what failed (check_at_start): not logged here too.
            self._probing = True
            try:
                await self._api(
                    "GET", "api_client_authorizations/current", self._service_token, as_user=False
                )
            finally:
                self._probing = False

        return defer.ensureDeferred(ask())

    def _untrusted(self, error: Exception) -> UntrustedAPI | None:
        """An explained L{UntrustedAPI} when C{error} is a failed certificate check."""
        problem = certificate_problem(error)
        if problem is None:
            return None
        insecure, ca_file = self._tls_settings
        message = explain(problem, urlsplit(self._base).netloc, insecure, ca_file)
        if not self._explained and not self._probing:
            self._explained = True
            log.error("Arvados API: {explanation}", explanation=message)
        return UntrustedAPI(
            message,
            hint="Tell the cluster's administrator; the proxy's configuration needs fixing.",
        )

    # -- talking to the API --------------------------------------------------------------------

    async def _api(
        self,
        method: str,
        path: str,
        token: str,
        *,
        as_user: bool,
        what: str = "",
        params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> dict[str, Any]:
        """
        One API call: C{method /arvados/v1/<path>} with C{token}, returning the JSON object.

        @param as_user: C{token} is the user's (a 401/403 is their problem) rather than the
            service token (a 401/403 is a configuration problem, shown as L{Unavailable}).
        @param what: the record asked for, for a L{NotFound} message.
        """
        d = defer.ensureDeferred(self._exchange(method, path, token, params, body))
        d.addTimeout(self._timeout, self._clock)
        try:
            status, answer = await d
        except defer.TimeoutError:
            log.warn(
                "Arvados API {method} {path}: no answer within {timeout}s",
                method=method,
                path=path,
                timeout=self._timeout,
            )
            raise Unavailable(
                "The cluster's API server is not answering right now. "
                "This page will retry by itself.",
                transient=True,
            ) from None
        except ProxyError:
            raise
        except Exception as e:
            untrusted = self._untrusted(e)
            if untrusted is not None:
                raise untrusted from None
            log.warn(
                "Arvados API {method} {path} failed: {error}",
                method=method,
                path=path,
                error=type(e).__name__,
            )
            raise Unavailable(
                "The cluster's API server cannot be reached right now. "
                "This page will retry by itself.",
                # Refused, reset, unreachable: worth another try; an untrusted certificate is not.
                transient=is_transient(e),
            ) from None
        if status == 200:
            if not isinstance(answer, dict):
                raise self._malformed(method, path)
            return answer
        raise self._error(method, path, status, answer, as_user, what)

    async def _exchange(
        self,
        method: str,
        path: str,
        token: str,
        params: Mapping[str, str] | None,
        body: Any,
    ) -> tuple[int, Any]:
        headers = Headers(
            {
                b"Authorization": [b"Bearer " + token.encode("ascii")],
                b"Accept": [b"application/json"],
            }
        )
        response = await self._http.request(
            method,
            self._base + "arvados/v1/" + path,
            headers=headers,
            params=dict(params or {}),
            json=body,
        )
        raw = await treq.content(response)
        try:
            answer = json.loads(raw)
        except ValueError:
            if response.code == 200:
                raise self._malformed(method, path) from None
            answer = None
        return response.code, answer

    def _malformed(self, method: str, path: str) -> Unavailable:
        log.error(
            "Arvados API {method} {path}: the answer is not what the API documents",
            method=method,
            path=path,
        )
        return Unavailable("The cluster's API server gave an answer arvproxy cannot read.")

    def _error(
        self, method: str, path: str, status: int, answer: Any, as_user: bool, what: str
    ) -> ProxyError:
        errors = answer.get("errors") if isinstance(answer, dict) else None
        message = "; ".join(str(e) for e in errors)[:500] if isinstance(errors, list) else ""
        error_token = answer.get("error_token", "") if isinstance(answer, dict) else ""
        log.info(
            "Arvados API {method} {path} answered {status}: {message} (error token {error_token})",
            method=method,
            path=path,
            status=status,
            message=message,
            error_token=error_token,
        )
        if status in (401, 403) and not as_user:
            log.error(
                "The Arvados API server refused arvproxy's own token ({status}); "
                "check SystemRootToken (or the dispatcher's ARVADOS_API_TOKEN)",
                status=status,
            )
            return Unavailable(
                "The cluster's API server refused the proxy's credentials.",
                hint="Tell the cluster's administrator; the proxy's configuration needs fixing.",
            )
        if status == 401:
            return Unauthorized(
                "Your token is not valid: it is unknown, has expired, or has been revoked.",
                hint="Get a new token, and open the link with it again.",
            )
        if status == 403:
            return Forbidden("The cluster's API server does not allow your token to do this.")
        if status == 404:
            return NotFound(f"There is no {what or 'such record'} that you can see.")
        if status == 422:
            return _Rejected(message)
        return Unavailable(
            "The cluster's API server is having trouble right now. This page will retry by itself.",
            transient=transient_status(status),
        )

    # -- ICluster -------------------------------------------------------------------------------

    def authenticate(self, token: str) -> defer.Deferred[Credentials]:
        if self._service_is_root and hmac.compare_digest(
            token.encode("utf-8", "surrogateescape"),
            self._service_token.encode("utf-8", "surrogateescape"),
        ):
            return defer.succeed(
                Credentials(
                    token_uuid=None,
                    user_uuid=f"{self.cluster_id}-{USER_INFIX}-000000000000000",
                    is_admin=True,
                    scopes=("all",),
                    token=token,
                )
            )
        if not _TOKEN_RE.fullmatch(token):
            return defer.fail(Unauthorized("Your token is not valid."))
        d = self._credentials.get(
            ("token", _digest(token)), lambda: defer.ensureDeferred(self._authenticate(token))
        )
        return d.addCallback(self._unexpired)

    def _unexpired(self, credentials: Credentials) -> Credentials:
        expires = credentials.expires_at
        if expires is not None and expires.timestamp() <= self._clock.seconds():
            raise Unauthorized("Your token has expired.", hint="Get a new token.")
        return credentials

    async def _authenticate(self, token: str) -> Credentials:
        auth = await self._api("GET", "api_client_authorizations/current", token, as_user=True)
        try:
            scopes = tuple(str(s) for s in auth.get("scopes") or ("all",))
            expires_at = parse_api_time(auth.get("expires_at"))
            owner = str(auth["owner_uuid"])
            token_uuid = str(auth["uuid"])
        except (KeyError, ValueError, TypeError):
            raise self._malformed("GET", "api_client_authorizations/current") from None
        self._unexpired(Credentials(token_uuid, owner, False, scopes, expires_at))
        if scope_permits(scopes, "GET", "/arvados/v1/users/current"):
            user = await self._api("GET", "users/current", token, as_user=True, what="user")
        else:
            user = await self._api(
                "GET", f"users/{owner}", self._service_token, as_user=False, what="user"
            )
        if not user.get("is_active", False):
            raise Unauthorized(
                "The account this token belongs to is not active.",
                hint="Ask the cluster administrator to activate it.",
            )
        return Credentials(
            token_uuid=token_uuid,
            user_uuid=str(user.get("uuid", owner)),
            is_admin=bool(user.get("is_admin", False)),
            scopes=scopes,
            expires_at=expires_at,
            token=token,
        )

    def get_container_request(self, uuid: str) -> defer.Deferred[ContainerRequest]:
        return self._requests.get(uuid, lambda: defer.ensureDeferred(self._get_request(uuid)))

    async def _get_request(self, uuid: str) -> ContainerRequest:
        if not UUID_RE.match(uuid):
            raise NotFound(f"There is no container request {uuid}.")
        record = await self._api(
            "GET",
            f"container_requests/{uuid}",
            self._service_token,
            as_user=False,
            what=f"container request {uuid}",
        )
        return self._container_request(record)

    def get_container(self, uuid: str) -> defer.Deferred[Container]:
        """
        The container as the API server has it now: a container that has finished is refused
        by the very next request.  Lookups made in the same turn of the reactor (requests that
        arrived together) share one API call; a lookup never joins a call that was made before
        it began, so no answer predates the request it decides.
        """
        return self._containers.get(
            (uuid, self._this_turn()), lambda: defer.ensureDeferred(self._get_container(uuid))
        )

    def _this_turn(self) -> int:
        """A number for the current turn of the reactor."""
        if not self._in_turn:
            self._in_turn = True
            self._turn += 1
            self._reactor.callLater(0, self._turn_over)
        return self._turn

    def _turn_over(self) -> None:
        self._in_turn = False

    async def _get_container(self, uuid: str) -> Container:
        if not UUID_RE.match(uuid):
            raise NotFound(f"There is no container {uuid}.")
        record = await self._api(
            "GET",
            f"containers/{uuid}",
            self._service_token,
            as_user=False,
            what=f"container {uuid}",
        )
        return self._container(record)

    def container_requests_for(self, container_uuid: str) -> defer.Deferred[list[ContainerRequest]]:
        d = self._request_lists.get(
            container_uuid, lambda: defer.ensureDeferred(self._requests_for(container_uuid))
        )
        return d.addCallback(list)

    async def _requests_for(self, container_uuid: str) -> list[ContainerRequest]:
        found: dict[str, ContainerRequest] = {}
        available = 0
        offset = 0
        for _ in range(MAX_PAGES):
            page = await self._api(
                "GET",
                "container_requests",
                self._service_token,
                as_user=False,
                params={
                    "filters": json.dumps([["container_uuid", "=", container_uuid]]),
                    "order": json.dumps(["created_at asc", "uuid asc"]),
                    "limit": str(PAGE_SIZE),
                    "offset": str(offset),
                    "count": "exact",
                },
            )
            items, total = page.get("items"), page.get("items_available")
            if not isinstance(items, list) or not isinstance(total, int):
                raise self._malformed("GET", "container_requests")
            available = total
            for item in items:
                cr = self._container_request(item)
                found[cr.uuid] = cr
            offset += len(items)
            if offset >= available or not items:
                break
        if len(found) != available:
            # Requests came or went while we read the pages: a partial list must not decide
            # who may connect.
            log.warn(
                "Arvados API: container requests for {uuid} changed while listed "
                "({found} of {available})",
                uuid=container_uuid,
                found=len(found),
                available=available,
            )
            raise Unavailable(
                "The cluster's API server gave an incomplete answer. "
                "This page will retry by itself."
            )
        return sorted(
            found.values(),
            key=lambda cr: (cr.created_at or datetime.min.replace(tzinfo=UTC), cr.uuid),
        )

    def permission_level(
        self, user_uuid: str, target_uuid: str, credentials: Credentials | None = None
    ) -> defer.Deferred[str | None]:
        """
        See L{ICluster.permission_level}; only container requests are answered (anything else:
        C{None}).  The answer depends on the user, never on their token (C{credentials} are
        not used): see L{arvproxy.backends.arvados_access}.
        """
        if not UUID_RE.match(target_uuid) or uuid_infix(target_uuid) != CONTAINER_REQUEST_INFIX:
            return defer.succeed(None)
        return self._levels.get(
            (user_uuid, target_uuid),
            lambda: defer.ensureDeferred(self._request_level(user_uuid, target_uuid)),
        )

    async def _request_level(self, user_uuid: str, target_uuid: str) -> str | None:
        try:
            cr = await self.get_container_request(target_uuid)
        except NotFound:
            return None
        return (await self._levels_of(user_uuid, [cr]))[cr.uuid]

    def _acting_users(self, user_uuid: str) -> defer.Deferred[list[str]]:
        """The user, and the users of this cluster whose accounts they manage (kept a while)."""
        return self._acting.get(
            user_uuid, lambda: defer.ensureDeferred(self._read_acting_users(user_uuid))
        )

    async def _read_acting_users(self, user_uuid: str) -> list[str]:
        prefix = f"{self.cluster_id}-{USER_INFIX}-"
        rows = await self._computed_permissions(
            [
                ["user_uuid", "=", user_uuid],
                ["target_uuid", ">=", prefix + "0" * 15],
                ["target_uuid", "<=", prefix + "z" * 15],
            ]
        )
        return acting_users(user_uuid, rows.get(user_uuid, {}))

    async def _permission_rows(
        self, users: list[str], targets: list[str]
    ) -> dict[str, dict[str, str]]:
        """The rows of the permission graph of C{users} on C{targets}, by user and target."""
        wanted = sorted({t for t in targets if UUID_RE.match(t)})
        who = sorted({u for u in users if UUID_RE.match(u)})
        rows: dict[str, dict[str, str]] = {}
        # The API takes no offset here: ask for as many rows as can be, a few targets at a time.
        step = max(1, PAGE_SIZE // max(1, len(who)))
        for start in range(0, len(wanted), step):
            chunk = wanted[start : start + step]
            found = await self._computed_permissions(
                [["user_uuid", "in", who], ["target_uuid", "in", chunk]],
                limit=len(chunk) * len(who),
            )
            for user, targets_of in found.items():
                rows.setdefault(user, {}).update(targets_of)
        return rows

    async def _computed_permissions(
        self, filters: list[list[Any]], limit: int = PAGE_SIZE
    ) -> dict[str, dict[str, str]]:
        """
        One page of C{GET computed_permissions} (admins only: the service token), as
        C{user_uuid} to C{target_uuid} to C{perm_level}.

        @raise Unavailable: the page is full (the API takes no offset to read on).
        """
        page = await self._api(
            "GET",
            "computed_permissions",
            self._service_token,
            as_user=False,
            params={
                "filters": json.dumps(filters),
                "select": json.dumps(["user_uuid", "target_uuid", "perm_level"]),
                "limit": str(limit),
                "count": "none",
            },
        )
        items = page.get("items")
        if not isinstance(items, list) or len(items) > limit:
            raise self._malformed("GET", "computed_permissions")
        if len(items) == limit and limit >= PAGE_SIZE:
            log.warn("Arvados API: computed_permissions answered a full page; refusing to guess")
            raise Unavailable("The cluster's API server gave an incomplete answer.")
        rows: dict[str, dict[str, str]] = {}
        for item in items:
            if not isinstance(item, dict):
                raise self._malformed("GET", "computed_permissions")
            user, target = str(item.get("user_uuid")), str(item.get("target_uuid"))
            rows.setdefault(user, {})[target] = str(item.get("perm_level"))
        return rows

    def container_auth(self, uuid: str) -> defer.Deferred[str]:
        """
        The container's own token, read with the service token as crunch-run reads it
        (C{ContainerRunner#ContainerToken}: C{GET containers/<uuid>/auth}, which only the token
        holding the container's lock may call), in crunch-run's form
        C{v2/<uuid>/<secret>/<container uuid>}.

        @raise NotLockHolder: the service token does not hold the lock (or cannot see the
            container at all).
        """
        return defer.ensureDeferred(self._container_auth(uuid))

    async def _container_auth(self, uuid: str) -> str:
        if not UUID_RE.match(uuid):
            raise NotFound(f"There is no container {uuid}.")
        # as_user: a refusal is this token's problem, said below, not a configuration error.
        try:
            answer = await self._api(
                "GET", f"containers/{uuid}/auth", self._service_token, as_user=True
            )
        except Unauthorized:
            raise NotLockHolder(
                "the API server does not accept the dispatcher's token (Env.ARVADOS_API_TOKEN)"
            ) from None
        except (Forbidden, NotFound):
            raise NotLockHolder(
                f"the dispatcher's token (Env.ARVADOS_API_TOKEN) does not hold the lock on "
                f"container {uuid} (GET containers/{uuid}/auth was refused): a gateway must be "
                f"given the token of the dispatcher that locked its container"
            ) from None
        try:
            return f"v2/{answer['uuid']}/{answer['api_token']}/{uuid}"
        except (KeyError, TypeError):
            raise self._malformed("GET", "containers/auth") from None

    def update_container(self, uuid: str, **changes: Any) -> defer.Deferred[Container]:
        return defer.ensureDeferred(self._update_container(uuid, changes))

    async def _update_container(self, uuid: str, changes: dict[str, Any]) -> Container:
        unknown = set(changes) - UPDATABLE_CONTAINER_FIELDS
        if unknown:
            raise ValueError(f"cannot change container field(s): {', '.join(sorted(unknown))}")
        body = {k: v for k, v in changes.items() if k not in UNSTORED_CONTAINER_FIELDS}
        if not body:
            return await self._get_container(uuid)
        try:
            record = await self._api(
                "PUT",
                f"containers/{uuid}",
                self._service_token,
                as_user=False,
                what=f"container {uuid}",
                body={"container": body},
            )
        except _Rejected as e:
            raise ValueError(
                f"the API server refused to update container {uuid}: {e.api_message}"
            ) from None
        return self._container(record)

    # -- the services page, and its Connect links --------------------------------------------

    def list_container_requests(
        self, owner_uuid: str | None = None, credentials: Credentials | None = None
    ) -> defer.Deferred[list[ContainerRequest]]:
        """
        The container requests the user can read (their own, and those shared with them) whose
        container is queued, running or finished in the last C{LISTED_RECENT_SECONDS}, newest
        first, at most C{LISTED_MAX} of each: read with the user's own token.

        @param owner_uuid: ignored (the user is the one C{credentials} prove).
        @param credentials: the signed-in user's, with their token.
        """
        return defer.ensureDeferred(self._list_requests(credentials))

    async def _list_requests(self, credentials: Credentials | None) -> list[ContainerRequest]:
        if credentials is None or not credentials.token:
            raise Unauthorized("Sign in to see your containers.")
        since = datetime.fromtimestamp(self._clock.seconds() - LISTED_RECENT_SECONDS, UTC)
        found: dict[str, ContainerRequest] = {}
        for filters in (
            [["container.state", "in", ["Queued", "Locked", "Running"]]],
            [
                ["container.state", "in", ["Complete", "Cancelled"]],
                ["container.finished_at", ">=", since.isoformat().replace("+00:00", "Z")],
            ],
        ):
            page = await self._api(
                "GET",
                "container_requests",
                credentials.token,
                as_user=True,
                params={
                    "filters": json.dumps(filters),
                    "order": json.dumps(["created_at desc"]),
                    "limit": str(LISTED_MAX),
                    "count": "none",
                },
            )
            items = page.get("items")
            if not isinstance(items, list):
                raise self._malformed("GET", "container_requests")
            for item in items:
                cr = self._container_request(item)
                found[cr.uuid] = cr
        return sorted(
            found.values(),
            key=lambda cr: (cr.created_at or datetime.min.replace(tzinfo=UTC), cr.uuid),
            reverse=True,
        )

    def get_containers(
        self, uuids: Iterable[str], credentials: Credentials
    ) -> defer.Deferred[dict[str, Container]]:
        """The containers of C{uuids} the user can read, in one call with their token."""
        return defer.ensureDeferred(self._get_containers(sorted(set(uuids)), credentials))

    async def _get_containers(
        self, uuids: list[str], credentials: Credentials
    ) -> dict[str, Container]:
        wanted = [u for u in uuids if UUID_RE.match(u)]
        if not wanted:
            return {}
        page = await self._api(
            "GET",
            "containers",
            credentials.token,
            as_user=True,
            params={
                "filters": json.dumps([["uuid", "in", wanted]]),
                "limit": str(len(wanted)),
                "count": "none",
            },
        )
        items = page.get("items")
        if not isinstance(items, list):
            raise self._malformed("GET", "containers")
        containers = [self._container(item) for item in items]
        return {c.uuid: c for c in containers}

    def permission_levels(
        self, user_uuid: str, requests: Iterable[ContainerRequest]
    ) -> defer.Deferred[dict[str, str | None]]:
        """L{permission_level} for many container requests at once (two API calls)."""
        return defer.ensureDeferred(self._levels_of(user_uuid, list(requests)))

    async def _levels_of(
        self, user_uuid: str, requests: list[ContainerRequest]
    ) -> dict[str, str | None]:
        if not requests:
            return {}
        acting = await self._acting_users(user_uuid)
        targets = [t for cr in requests for t in (cr.uuid, cr.owner_uuid)]
        rows = await self._permission_rows(acting, targets)
        return {cr.uuid: best_level(acting, cr.uuid, cr.owner_uuid, rows) for cr in requests}

    def create_token(
        self,
        user_uuid: str,
        scopes: Iterable[str] = ("all",),
        ttl: float | None = None,
        credentials: Credentials | None = None,
    ) -> defer.Deferred[tuple[str, IssuedToken]]:
        """
        A new token for the signed-in user, with narrower C{scopes} and an expiry, made with
        their own token (C{POST api_client_authorizations}: a user may make tokens for
        themselves; the cluster's C{API.MaxTokenLifetime} may shorten it).

        @raise Unauthorized: C{credentials} are not C{user_uuid}'s.
        """
        return defer.ensureDeferred(self._create_token(user_uuid, list(scopes), ttl, credentials))

    async def _create_token(
        self,
        user_uuid: str,
        scopes: list[str],
        ttl: float | None,
        credentials: Credentials | None,
        *,
        owner: bool = False,
    ) -> tuple[str, IssuedToken]:
        attrs: dict[str, Any]
        if owner:
            token, attrs = self._service_token, {"owner_uuid": user_uuid}
        elif credentials is None or not credentials.token or credentials.user_uuid != user_uuid:
            raise Unauthorized("Sign in to open a container's service.")
        else:
            token, attrs = credentials.token, {}
        attrs["scopes"] = scopes
        if ttl is not None:
            expires = datetime.fromtimestamp(self._clock.seconds() + ttl, UTC)
            attrs["expires_at"] = expires.isoformat().replace("+00:00", "Z")
        try:
            record = await self._api(
                "POST",
                "api_client_authorizations",
                token,
                as_user=not owner,
                body={"api_client_authorization": attrs},
            )
        except _Rejected as e:
            raise Unavailable(
                f"The cluster's API server refused a new token: {e.api_message}"
            ) from None
        try:
            issued = IssuedToken(str(record["uuid"]), parse_api_time(record.get("expires_at")))
            return f"v2/{issued.uuid}/{record['api_token']}", issued
        except (KeyError, ValueError, TypeError):
            raise self._malformed("POST", "api_client_authorizations") from None

    def exchange_token(self, token: str, ttl: float) -> defer.Deferred[str]:
        """
        Use up a token (the services page's Connect link) and issue another for the same user
        with the same scopes, valid for C{ttl} seconds; see
        L{arvproxy.backends.registry.RegistryStore.exchange_token}.  Made and revoked with the
        service token: the link's token, scoped to one port, can do neither.

        @raise Unauthorized: C{token} is not valid, or was used up meanwhile.
        """
        return defer.ensureDeferred(self._exchange_token(token, ttl))

    async def _exchange_token(self, token: str, ttl: float) -> str:
        credentials = await self.authenticate(token)
        if credentials.token_uuid is None:
            raise Unauthorized("The SystemRootToken cannot be exchanged.")
        self._credentials.forget(("token", _digest(token)))
        new, issued = await self._create_token(
            credentials.user_uuid, list(credentials.scopes), ttl, None, owner=True
        )
        try:
            await self._api(
                "DELETE",
                f"api_client_authorizations/{credentials.token_uuid}",
                self._service_token,
                as_user=False,
            )
        except NotFound:
            # Used up at the same moment elsewhere: only one of the two exchanges may win.
            await self._api(
                "DELETE",
                f"api_client_authorizations/{issued.uuid}",
                self._service_token,
                as_user=False,
            )
            raise Unauthorized("This link has already been used.") from None
        finally:
            # Whatever was kept of the used-up token meanwhile goes too.
            self._credentials.forget(("token", _digest(token)))
        return new

    # -- records --------------------------------------------------------------------------------

    def _container_request(self, record: Mapping[str, Any]) -> ContainerRequest:
        try:
            return ContainerRequest(
                uuid=str(record["uuid"]),
                owner_uuid=str(record["owner_uuid"]),
                modified_by_user_uuid=str(record.get("modified_by_user_uuid") or ""),
                name=str(record.get("name") or ""),
                state=str(record.get("state") or ""),
                container_uuid=record.get("container_uuid") or None,
                container_image=str(record.get("container_image") or ""),
                command=tuple(record.get("command") or ()),
                environment=dict(record.get("environment") or {}),
                cwd=str(record.get("cwd") or ""),
                published_ports=dict(record.get("published_ports") or {}),
                created_at=parse_api_time(record.get("created_at")),
                properties=dict(record.get("properties") or {}),
            )
        except (KeyError, ValueError, TypeError):
            raise self._malformed("GET", "container_requests") from None

    def _container(self, record: Mapping[str, Any]) -> Container:
        try:
            exit_code = record.get("exit_code")
            return Container(
                uuid=str(record["uuid"]),
                state=str(record["state"]),
                gateway_address=str(record.get("gateway_address") or ""),
                exit_code=None if exit_code is None else int(exit_code),
                started_at=parse_api_time(record.get("started_at")),
                finished_at=parse_api_time(record.get("finished_at")),
                container_image=str(record.get("container_image") or ""),
                command=tuple(record.get("command") or ()),
                environment=dict(record.get("environment") or {}),
                cwd=str(record.get("cwd") or ""),
                published_ports=dict(record.get("published_ports") or {}),
                runtime_status=dict(record.get("runtime_status") or {}),
                interactive_session_started=record.get("interactive_session_started") is True,
            )
        except (KeyError, ValueError, TypeError):
            raise self._malformed("GET", "containers") from None
