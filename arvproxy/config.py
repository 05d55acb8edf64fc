"""
The cluster configuration: YAML in the shape of an Arvados cluster config, parsed once, at
start-up, into typed values ("parse, don't validate").

L{load_config} reads a file; L{parse_config} does the work on an already-loaded document and
touches nothing but the path arithmetic for C{Registry} and reading C{ArvProxy.TLS.CAFile}.
The keys we read::

    Clusters:
      zzzzz:                                  # exactly 5 characters, a-z and 0-9
        SystemRootToken: "..."                # required, at least 32 characters
        Services:
          ContainerWebServices:
            ExternalURL: "https://*.containers.zzzzz.example.com"   # required
            InternalURLs:                     # optional; one entry: where the controller listens
              "http://127.0.0.1:8900": {}     # or {ListenURL: "http://0.0.0.0:8900"}
        ArvProxy:                             # our own section; every key optional
          Backend: embedded
          Registry: arvproxy-registry.sqlite  # relative to the configuration file's directory
          TrustedProxies: ["127.0.0.1/32"]
          Gateway:
            MaxClockSkew: 300s                # Arvados duration: "300s", "5m", "1h30m", 300
            SignForOldGateways: false         # true while gateways from before bound signatures run
          CacheTTL: 10s                       # how long the front door keeps answers about tokens
          ContainerLogs:                      # each container's output, kept on its node
            Directory: container-logs         # default: beside the registry file
            MaxBytes: 4194304                 # per container: the current file and one rotated
          ConnectionsEnabled: true            # false: every container web service is off (403)
          TLS:
            CAFile: /etc/arvados/ca.pem       # CA certificates (PEM) to trust for the API server

    With C{Backend: arvados}, two more Arvados keys are read::

        Services:
          Controller:
            ExternalURL: "https://zzzzz.example.com"   # required: the Arvados API server
        TLS:
          Insecure: false                     # true: do not check the API server's certificate

Every other key, anywhere, is Arvados' business and is ignored, so a real Arvados C{config.yml}
loads.  Under C{ArvProxy} an unknown key is an error, to catch typos.  Every problem raises one
L{ConfigError} naming the file, the key by its full dotted name, what was expected and what was
found; the SystemRootToken's value never appears in a message.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import urlsplit

import yaml

from arvproxy.nodeconfig import NodeDispatcherConfig, parse_node_dispatcher


class ConfigError(Exception):
    """
    The configuration cannot be used.  The message names the file, the key by its full name
    (C{Clusters.zzzzz.Services.ContainerWebServices.ExternalURL}) and what was expected.
    """


@dataclass(frozen=True)
class ExternalURL:
    """
    C{Services.ContainerWebServices.ExternalURL}: a wildcard URL such as
    C{https://*.containers.zzzzz.example.com} or C{http://*.containers.localhost:8900}.

    @ivar scheme: C{"http"} or C{"https"}.
    @ivar suffix: the host after C{"*."}, lower case, e.g. C{"containers.localhost"}.
    @ivar port: the port written in the URL, or C{None} when it uses the scheme's default
        (L{parse_config} turns an explicit C{:443} on C{https}, or C{:80} on C{http}, into
        C{None}, as browsers leave it out of the C{Host} header).
    """

    scheme: str
    suffix: str
    port: int | None = None

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    @property
    def default_port(self) -> int:
        return self.port if self.port is not None else (443 if self.secure else 80)

    def netloc(self, label: str | None = None) -> str:
        """The host (and port, when not the default) for C{label}, or the bare suffix."""
        host = f"{label}.{self.suffix}" if label else self.suffix
        return host if self.port is None else f"{host}:{self.port}"

    def url_for(self, label: str | None = None, path: str = "/") -> str:
        """C{url_for("zzzzz-xvhdp-...-8888")} is that service's base URL."""
        return f"{self.scheme}://{self.netloc(label)}{path}"


@dataclass(frozen=True)
class ClusterConfig:
    """
    Everything arvproxy reads from the configuration file.

    @ivar source: the file this came from, for messages.
    @ivar system_root_token: the cluster's SystemRootToken; left out of C{repr} so that logging
        the configuration does not log the secret.
    @ivar controller_listen: a Twisted server endpoint description.
    @ivar trusted_proxies: networks whose X-Forwarded-* headers the controller believes.
    @ivar registry_path: the embedded registry's SQLite file (absolute).
    @ivar max_clock_skew: seconds a signed request's timestamp may differ from the gateway's clock.
    @ivar sign_for_old_gateways: the front door also signs each request to a gateway in the old,
        unbound format (C{ArvProxy.Gateway.SignForOldGateways}), for gateways started before
        signatures were bound to requests; newer gateways never accept that format.
    @ivar limits: timeouts and size limits that protect the proxies and the services.
    @ivar api_url: the Arvados API server (C{Services.Controller.ExternalURL}), or C{""} when
        the backend is not C{arvados}.
    @ivar tls_insecure: C{TLS.Insecure}: do not verify the API server's certificate.
    @ivar api_ca_file: C{ArvProxy.TLS.CAFile}: a PEM file of the CA certificates to trust for
        the API server's certificate instead of the system's (absolute; C{""}: not set).
    @ivar connections_enabled: C{ArvProxy.ConnectionsEnabled}: C{False} turns every container
        web service off (403), for everyone, admins included.
    @ivar cache_ttl: seconds the front door keeps answers about tokens, container requests and
        permissions (0: not at all); a revoked token keeps working this long at most (with the
        embedded registry, not at all: its answers go as soon as the file changes).
    @ivar container_logs: the directory of each container's kept output (absolute), or C{""}
        to keep none (L{arvproxy.containerlogs}).
    @ivar container_log_bytes: the most output kept per container.
    @ivar node_dispatcher: C{ArvProxy.NodeDispatcher} (L{arvproxy.nodeconfig}), or C{None}.
    """

    source: str
    cluster_id: str
    system_root_token: str = field(repr=False)
    external_url: ExternalURL
    controller_listen: str = "tcp:8900:interface=127.0.0.1"
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=tuple
    )
    backend: str = "embedded"
    registry_path: str = ""
    max_clock_skew: float = 300.0
    sign_for_old_gateways: bool = False
    limits: Limits = field(default_factory=lambda: Limits())
    api_url: str = ""
    tls_insecure: bool = False
    cache_ttl: float = 10.0
    container_logs: str = ""
    container_log_bytes: int = 4 * 1024 * 1024
    api_ca_file: str = ""
    connections_enabled: bool = True
    node_dispatcher: NodeDispatcherConfig | None = None


@dataclass(frozen=True)
class Limits:
    """
    C{ArvProxy.Timeouts} and C{ArvProxy.Limits}: the same for the controller and the gateways.

    The defaults suit long-lived notebooks: no limit on how long a request, a streamed response
    or a WebSocket may run while it is active.

    @ivar client_idle: seconds a client connection may stall while sending a request body (or
        sit idle between requests, when shorter than C{request_headers}) before it is closed.
    @ivar request_headers: seconds a client has to send a request's line and headers, from the
        connection's accept and, on a kept connection, from the end of the answer before
        (slowloris protection; idle connections too): 408 when a request had begun, else the
        connection is closed without a word.
    @ivar tunnel_idle: seconds a WebSocket (or other upgraded connection) may carry no bytes in
        either direction before it is closed.
    @ivar connect_session: seconds a session opened with a short-lived, single-target link
        (the services page's "Connect") lasts: the link's token is exchanged for one that lasts
        this long.
    @ivar tls_handshake: seconds the front door gives a gateway to complete the TLS handshake,
        from the moment TCP connects; 504 after that.
    @ivar carrier_handshake: seconds the front door gives a gateway to answer a new carrier's
        handshake (its C{101}), once TLS is up; 504 after that.
    @ivar response_headers: seconds the front door waits for the head of an answer (or of a
        WebSocket's C{101}) once the whole request has gone to the gateway; 504 after that.
        The body that follows, and a WebSocket, may then take as long as they like.
    @ivar cluster_retry: seconds a gateway or the local dispatcher keeps trying a call to the
        cluster that fails for a moment (L{arvproxy.retry}), from its first failure.
    @ivar max_header_bytes: the largest request line plus headers accepted; larger gets 431.
    @ivar max_connections_per_container: requests and tunnels open at once to one container;
        more get 503 with Retry-After.
    @ivar max_anonymous_connections_per_container: how many of those may be anonymous: let
        through only because the port is public (no token, or one whose user has no access to
        the container), so that people with access always have the rest.  C{None}: half of
        C{max_connections_per_container} (see L{anonymous_caps}).
    @ivar max_anonymous_connections_per_address: how many anonymous requests and tunnels one
        client address (an IPv6 client's /64) may have open to one container.  C{None}: a fifth
        of the anonymous share, at least 1.
    """

    client_idle: float = 300.0
    request_headers: float = 30.0
    tunnel_idle: float = 24 * 3600.0
    connect_session: float = 12 * 3600.0
    tls_handshake: float = 10.0
    carrier_handshake: float = 10.0
    response_headers: float = 300.0
    cluster_retry: float = 600.0
    max_header_bytes: int = 32 * 1024
    max_connections_per_container: int = 1000
    max_anonymous_connections_per_container: int | None = None
    max_anonymous_connections_per_address: int | None = None

    def anonymous_caps(self) -> tuple[int, int]:
        """
        The anonymous requests and tunnels allowed open to one container, and from one client
        address to it, with the defaults worked out.
        """
        share = self.max_anonymous_connections_per_container
        if share is None:
            share = self.max_connections_per_container // 2
        per_address = self.max_anonymous_connections_per_address
        if per_address is None:
            per_address = max(1, share // 5)
        return share, per_address


BACKENDS = ("embedded", "arvados")
"""The values C{ArvProxy.Backend} may take."""

ARVPROXY_KEYS = (
    "Backend",
    "Registry",
    "TrustedProxies",
    "Gateway",
    "Timeouts",
    "Limits",
    "CacheTTL",
    "ContainerLogs",
    "ConnectionsEnabled",
    "TLS",
    "NodeDispatcher",
)
TLS_KEYS = ("CAFile",)
TIMEOUT_KEYS = (
    "ClientIdle",
    "RequestHeaders",
    "TunnelIdle",
    "ConnectSession",
    "ClusterRetry",
    "TLSHandshake",
    "CarrierHandshake",
    "ResponseHeaders",
)
LIMIT_KEYS = (
    "MaxRequestHeaderBytes",
    "MaxConnectionsPerContainer",
    "MaxAnonymousConnectionsPerContainer",
    "MaxAnonymousConnectionsPerAddress",
)
GATEWAY_KEYS = ("MaxClockSkew", "SignForOldGateways")
CONTAINER_LOG_KEYS = ("Directory", "MaxBytes")
MIN_CONTAINER_LOG_BYTES = 64 * 1024
DEFAULT_LISTEN_PORT = 8900
DEFAULT_REGISTRY = "arvproxy-registry.sqlite"
MIN_TOKEN_LENGTH = 32

_CLUSTER_ID = re.compile(r"[a-z0-9]{5}")
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_DURATION = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_WILDCARD_EXAMPLE = '"https://*.containers.example.com"'
_WILDCARD_EXPECTED = f"a wildcard URL like {_WILDCARD_EXAMPLE}"
_API_URL_EXPECTED = 'the API server\'s URL, like "https://zzzzz.example.com"'
_TOKEN_EXPECTED = f"a secret of at least {MIN_TOKEN_LENGTH} characters"


def load_config(path: str, cluster_id: str | None = None) -> ClusterConfig:
    """
    Read the YAML file at C{path} and parse it with L{parse_config}.

    @param cluster_id: which cluster to use when the file describes several; C{None} means
        the only one.
    @raise ConfigError: the file cannot be read, is not YAML, or describes no usable cluster.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_describe_yaml_error(e)}") from None
    return parse_config(document, path, cluster_id)


def parse_config(document: object, source: str, cluster_id: str | None = None) -> ClusterConfig:
    """
    Turn a loaded YAML document into a L{ClusterConfig}.

    @param document: what C{yaml.safe_load} returned.
    @param source: the file it came from: named in messages, and a relative C{Registry} is
        resolved against its directory.
    @param cluster_id: which cluster to use when there are several; C{None} means the only one.
    @raise ConfigError: anything is missing, malformed or of the wrong type.
    """
    p = _Parser(source)
    if document is None:
        p.fail("", "expected a mapping with a Clusters key, got an empty document")
    top = p.mapping(document, "", what="the top level")
    clusters = p.mapping(
        p.require(top, "", "Clusters", "a mapping of cluster ids to settings"), "Clusters"
    )
    cid, cluster = p.pick_cluster(clusters, cluster_id)
    at = f"Clusters.{cid}"

    token = p.token(
        p.require(cluster, at, "SystemRootToken", _TOKEN_EXPECTED), f"{at}.SystemRootToken"
    )

    services = p.mapping(p.require(cluster, at, "Services", "a mapping"), f"{at}.Services")
    at_cws = f"{at}.Services.ContainerWebServices"
    cws = p.mapping(
        p.require(services, f"{at}.Services", "ContainerWebServices", "a mapping"), at_cws
    )
    external_url = p.external_url(
        p.require(cws, at_cws, "ExternalURL", _WILDCARD_EXPECTED), f"{at_cws}.ExternalURL"
    )
    listen = p.internal_urls(cws.get("InternalURLs"), f"{at_cws}.InternalURLs", external_url)

    at_ap = f"{at}.ArvProxy"
    own = p.mapping(cluster.get("ArvProxy"), at_ap, optional=True)
    p.known_keys(own, at_ap, ARVPROXY_KEYS)
    backend = p.backend(own.get("Backend", "embedded"), f"{at_ap}.Backend")
    registry = p.registry(own.get("Registry", DEFAULT_REGISTRY), f"{at_ap}.Registry")
    trusted = p.networks(own.get("TrustedProxies"), f"{at_ap}.TrustedProxies")
    gateway = p.mapping(own.get("Gateway"), f"{at_ap}.Gateway", optional=True)
    p.known_keys(gateway, f"{at_ap}.Gateway", GATEWAY_KEYS)
    skew = p.duration(gateway.get("MaxClockSkew", 300), f"{at_ap}.Gateway.MaxClockSkew")
    old_gateways = gateway.get("SignForOldGateways", False)
    if not isinstance(old_gateways, bool):
        p.fail(
            f"{at_ap}.Gateway.SignForOldGateways",
            f"expected true or false, got {_show(old_gateways)}",
        )
    limits = p.limits(own, at_ap)
    cache_ttl = p.duration(own.get("CacheTTL", 10), f"{at_ap}.CacheTTL", zero_ok=True)
    log_dir, log_bytes = p.container_logs(own, f"{at_ap}.ContainerLogs", registry)
    own_tls = p.mapping(own.get("TLS"), f"{at_ap}.TLS", optional=True)
    p.known_keys(own_tls, f"{at_ap}.TLS", TLS_KEYS)
    ca_file = p.ca_file(own_tls.get("CAFile"), f"{at_ap}.TLS.CAFile")
    enabled = own.get("ConnectionsEnabled", True)
    if not isinstance(enabled, bool):
        p.fail(f"{at_ap}.ConnectionsEnabled", f"expected true or false, got {_show(enabled)}")
    node = parse_node_dispatcher(p, own.get("NodeDispatcher"), f"{at_ap}.NodeDispatcher")
    tls = p.mapping(cluster.get("TLS"), f"{at}.TLS", optional=True)
    insecure = tls.get("Insecure", False)
    if not isinstance(insecure, bool):
        p.fail(f"{at}.TLS.Insecure", f"expected true or false, got {_show(insecure)}")
    api_url = ""
    if backend == "arvados":
        at_ctl = f"{at}.Services.Controller"
        controller = p.mapping(
            p.require(
                services, f"{at}.Services", "Controller", "a mapping (the backend is arvados)"
            ),
            at_ctl,
        )
        api_url = p.api_url(
            p.require(controller, at_ctl, "ExternalURL", _API_URL_EXPECTED), f"{at_ctl}.ExternalURL"
        )

    return ClusterConfig(
        source=source,
        cluster_id=cid,
        system_root_token=token,
        external_url=external_url,
        controller_listen=listen,
        trusted_proxies=trusted,
        backend=backend,
        registry_path=registry,
        max_clock_skew=skew,
        sign_for_old_gateways=old_gateways,
        limits=limits,
        api_url=api_url,
        tls_insecure=insecure,
        cache_ttl=cache_ttl,
        container_logs=log_dir,
        container_log_bytes=log_bytes,
        api_ca_file=ca_file,
        connections_enabled=enabled,
        node_dispatcher=node,
    )


WIDEST_TRUSTED_PREFIX = 8
"""A C{TrustedProxies} network wider than this (a /8 of its family's addresses, or of the
IPv4 addresses mapped into IPv6) is almost certainly a mistake: L{trusted_proxy_warnings}."""

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def trusted_proxy_warnings(config: ClusterConfig) -> list[str]:
    """
    One line for each C{TrustedProxies} network so wide that it is almost certainly a mistake
    (C{0.0.0.0/0}, C{::/0}, anything wider than L{WIDEST_TRUSTED_PREFIX}), naming the file and
    the key: every client inside one can set the address and scheme the services see.
    """
    key = f"Clusters.{config.cluster_id}.ArvProxy.TrustedProxies"
    warnings = []
    for network in config.trusted_proxies:
        prefix = network.prefixlen
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
            prefix -= 96
        if prefix < WIDEST_TRUSTED_PREFIX:
            warnings.append(
                f"{config.source}: {key}: {network} is wider than a /{WIDEST_TRUSTED_PREFIX}, "
                "so every client in it can set X-Forwarded-For and X-Forwarded-Proto (the "
                "address and scheme services see); list only your own proxies' addresses"
            )
    return warnings


def parse_duration(value: object) -> float:
    """
    Seconds in an Arvados duration: C{"300s"}, C{"5m"}, C{"1h30m"}, C{"250ms"}, or a bare
    number of seconds (C{300}, C{"1.5"}).

    @raise ValueError: C{value} is none of those.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            return float(text)
        if _DURATION.fullmatch(text):
            return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    raise ValueError(value)


def listen_endpoint(url: str) -> str:
    """
    The Twisted server endpoint description for an C{http://host:port} listen URL, e.g.
    C{"tcp:8900:interface=127.0.0.1"}.  The host must be an IP address or C{localhost}.

    @raise ValueError: with a reason, when C{url} is not such a URL.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError('expected a URL like "http://127.0.0.1:8900"') from None
    if parts.scheme.lower() == "https":
        raise ValueError(
            "expected an http:// URL (the controller speaks plain HTTP: terminate TLS in front "
            "of it, in Nginx)"
        )
    if parts.scheme.lower() != "http" or not parts.netloc:
        raise ValueError('expected a URL like "http://127.0.0.1:8900"')
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError('expected only a scheme, a host and a port, like "http://127.0.0.1:8900"')
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise ValueError("expected a port between 0 and 65535") from None
    if host == "localhost":
        host = "127.0.0.1"
    try:
        interface = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            "expected localhost or an IP address (like 127.0.0.1, 0.0.0.0 or [::1]) as the host"
        ) from None
    escaped = interface.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
    return f"tcp:{80 if port is None else port}:interface={escaped}"


class _Parser:
    """Checks one value at a time, and fails with messages that name C{source} and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> NoReturn:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        raise ConfigError(where + message)

    def mapping(
        self, value: object, key: str, optional: bool = False, what: str = ""
    ) -> Mapping[object, object]:
        if value is None and optional:
            return {}
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a mapping{' at ' + what if what else ''}, got {_show(value)}")
        return value

    def require(
        self, mapping: Mapping[object, object], at: str, name: str, expected: str
    ) -> object:
        full = f"{at}.{name}" if at else name
        value = mapping.get(name)
        if value is None:
            hint = ""
            near = [k for k in mapping if isinstance(k, str) and k.lower() == name.lower()]
            if near and near[0] != name:
                hint = f" (found {_show(near[0])}; keys are case-sensitive)"
            self.fail(full, f"missing{hint}: expected {expected}")
        return value

    def known_keys(self, mapping: Mapping[object, object], at: str, known: tuple[str, ...]) -> None:
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                self.fail(
                    f"{at}.{key}",
                    f"unknown key (the keys arvproxy knows here are {', '.join(known)}){hint}",
                )

    def pick_cluster(
        self, clusters: Mapping[object, object], wanted: str | None
    ) -> tuple[str, Mapping[object, object]]:
        choices = ", ".join(str(k) for k in clusters)
        if not clusters:
            self.fail("Clusters", "expected one cluster (like zzzzz: {...}), got none")
        if wanted is not None:
            if wanted not in clusters:
                self.fail("Clusters", f"no cluster {_show(wanted)}; the file has {choices}")
            cid: object = wanted
        elif len(clusters) > 1:
            self.fail(
                "Clusters",
                f"the file describes several clusters ({choices}); say which one to use",
            )
        else:
            cid = next(iter(clusters))
        if not isinstance(cid, str) or not _CLUSTER_ID.fullmatch(cid):
            self.fail(
                f"Clusters.{cid}",
                "expected a cluster id of exactly 5 characters, a-z and 0-9 (quote it if it "
                f"is all digits), got {_show(cid)}",
            )
        at = f"Clusters.{cid}"
        return cid, self.mapping(clusters[cid], at)

    def token(self, value: object, key: str) -> str:
        # Never show the value: describe it.
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_kind(value)}")
        if not value:
            self.fail(key, f"expected {_TOKEN_EXPECTED}, got an empty string")
        if len(value) < MIN_TOKEN_LENGTH:
            self.fail(
                key,
                f"expected {_TOKEN_EXPECTED}, got {len(value)} characters",
            )
        if not _TOKEN.fullmatch(value):
            self.fail(
                key,
                "expected only letters, digits and ._~+/=- (no spaces or line breaks), got a "
                f"{len(value)}-character value with other characters",
            )
        return value

    def external_url(self, value: object, key: str) -> ExternalURL:
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected {_WILDCARD_EXPECTED}, got {_show(value)}")
        try:
            parts = urlsplit(value)
        except ValueError:
            self.fail(key, f"expected {_WILDCARD_EXPECTED}, got {_show(value)}")
        scheme = parts.scheme.lower()
        if not scheme or not parts.netloc:
            self.fail(key, f"expected {_WILDCARD_EXPECTED}, got {_show(value)}")
        if scheme not in ("http", "https"):
            self.fail(key, f"expected the scheme http or https, got {_show(value)}")
        if parts.path not in ("", "/") or "?" in value or "#" in value:
            self.fail(
                key,
                f"expected no path, query or fragment (the service is at the root of its own "
                f"host), got {_show(value)}",
            )
        if "@" in parts.netloc:
            self.fail(key, f"expected no user name or password, got {_show(value)}")
        host, colon, port_text = parts.netloc.rpartition(":")
        if not colon:
            host, port_text = parts.netloc, ""
        host = host.lower()
        if not host.startswith("*."):
            self.fail(key, f"expected {_WILDCARD_EXPECTED}, got {_show(value)}")
        suffix = host[2:]
        labels = suffix.split(".")
        if (
            len(suffix) > 253
            or not all(_DNS_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()
        ):
            self.fail(
                key,
                f'expected a DNS name after "*." (like containers.example.com), got {_show(value)}',
            )
        port: int | None = None
        if colon:
            if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
                self.fail(key, f"expected a port between 1 and 65535, got {_show(value)}")
            port = int(port_text)
            if port == (443 if scheme == "https" else 80):
                port = None
        return ExternalURL(scheme=scheme, suffix=suffix, port=port)

    def internal_urls(self, value: object, key: str, external: ExternalURL) -> str:
        urls = self.mapping(value, key, optional=True)
        if not urls:
            return f"tcp:{external.port or DEFAULT_LISTEN_PORT}:interface=127.0.0.1"
        if len(urls) > 1:
            self.fail(
                key,
                "expected one URL (the controller listens on one address), got "
                f"{len(urls)}: {', '.join(_show(k) for k in urls)}",
            )
        url, settings = next(iter(urls.items()))
        at = f"{key}[{_show(url)}]"
        if not isinstance(url, str):
            self.fail(at, f'expected a URL like "http://127.0.0.1:8900", got {_show(url)}')
        settings = self.mapping(settings, at, optional=True)
        listen_url = settings.get("ListenURL")
        if listen_url not in (None, ""):
            at = f"{at}.ListenURL"
            if not isinstance(listen_url, str):
                self.fail(at, f'expected a URL like "http://0.0.0.0:8900", got {_show(listen_url)}')
            url = listen_url
        try:
            return listen_endpoint(url)
        except ValueError as e:
            self.fail(at, f"{e}, got {_show(url)}")

    def backend(self, value: object, key: str) -> str:
        if value not in BACKENDS:
            self.fail(key, f"expected one of {', '.join(BACKENDS)}, got {_show(value)}")
        return value

    def registry(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"expected the path of a SQLite file, got {_show(value)}")
        base = os.path.dirname(os.path.abspath(self.source))
        return os.path.normpath(os.path.join(base, value))

    def container_logs(
        self, own: Mapping[object, object], at: str, registry: str
    ) -> tuple[str, int]:
        """C{ArvProxy.ContainerLogs}: the directory (default: beside the registry), the bytes."""
        logs = self.mapping(own.get("ContainerLogs"), at, optional=True)
        self.known_keys(logs, at, CONTAINER_LOG_KEYS)
        directory = logs.get("Directory")
        if directory is None:
            path = os.path.join(os.path.dirname(registry), "container-logs")
        elif isinstance(directory, str) and directory.strip():
            base = os.path.dirname(os.path.abspath(self.source))
            path = os.path.normpath(os.path.join(base, directory))
        else:
            self.fail(f"{at}.Directory", f"expected a directory's path, got {_show(directory)}")
        size = logs.get("MaxBytes", 4 * 1024 * 1024)
        if isinstance(size, bool) or not isinstance(size, int) or size < MIN_CONTAINER_LOG_BYTES:
            self.fail(
                f"{at}.MaxBytes",
                f"expected a whole number of at least {MIN_CONTAINER_LOG_BYTES}, got {_show(size)}",
            )
        return path, size

    def ca_file(self, value: object, key: str) -> str:
        """A readable PEM file holding at least one certificate (relative: to the file's dir)."""
        if value is None or value == "":
            return ""
        if not isinstance(value, str):
            self.fail(
                key, f"expected the path of a PEM file of CA certificates, got {_show(value)}"
            )
        path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(self.source)), value))
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as e:
            self.fail(key, f"cannot read {path}: {e.strerror}")
        if b"-----BEGIN CERTIFICATE-----" not in text:
            self.fail(key, f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        return path

    def networks(
        self, value: object, key: str
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(key, f'expected a list of networks like ["127.0.0.1/32"], got {_show(value)}')
        networks = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(
                    f"{key}[{i}]", f'expected a string like "127.0.0.1/32", got {_show(item)}'
                )
            try:
                networks.append(ipaddress.ip_network(item, strict=True))
            except ValueError:
                hint = ""
                try:
                    loose = ipaddress.ip_network(item, strict=False)
                    hint = f" (it has host bits set; did you mean {loose}?)"
                except ValueError:
                    pass
                self.fail(
                    f"{key}[{i}]",
                    f'expected a network like "127.0.0.1/32" or "::1/128", got {_show(item)}{hint}',
                )
        return tuple(networks)

    def limits(self, own: Mapping[object, object], at: str) -> Limits:
        defaults = Limits()
        timeouts = self.mapping(own.get("Timeouts"), f"{at}.Timeouts", optional=True)
        self.known_keys(timeouts, f"{at}.Timeouts", TIMEOUT_KEYS)
        limits = self.mapping(own.get("Limits"), f"{at}.Limits", optional=True)
        self.known_keys(limits, f"{at}.Limits", LIMIT_KEYS)

        def duration(name: str, default: float) -> float:
            return self.duration(timeouts.get(name, default), f"{at}.Timeouts.{name}")

        def count(name: str, default: int, minimum: int) -> int:
            value = limits.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                self.fail(
                    f"{at}.Limits.{name}",
                    f"expected a whole number of at least {minimum}, got {_show(value)}",
                )
            return value

        cap = count("MaxConnectionsPerContainer", defaults.max_connections_per_container, 1)
        # People with access to a container always have room: anonymous visitors of its public
        # ports get a share of its connections, and each client address a part of that share.
        anonymous = Limits(max_connections_per_container=cap).anonymous_caps()[0]
        if "MaxAnonymousConnectionsPerContainer" in limits:
            anonymous = count("MaxAnonymousConnectionsPerContainer", anonymous, 0)
            if anonymous >= cap:
                self.fail(
                    f"{at}.Limits.MaxAnonymousConnectionsPerContainer",
                    f"expected fewer than MaxConnectionsPerContainer ({cap}), so that people "
                    f"with access to a container always have room, got {anonymous}",
                )
        per_address = Limits(max_anonymous_connections_per_container=anonymous).anonymous_caps()[1]
        if "MaxAnonymousConnectionsPerAddress" in limits:
            per_address = count("MaxAnonymousConnectionsPerAddress", per_address, 1)
            if anonymous and per_address > anonymous:
                self.fail(
                    f"{at}.Limits.MaxAnonymousConnectionsPerAddress",
                    "expected at most MaxAnonymousConnectionsPerContainer "
                    f"({anonymous}), got {per_address}",
                )
        return Limits(
            client_idle=duration("ClientIdle", defaults.client_idle),
            request_headers=duration("RequestHeaders", defaults.request_headers),
            tunnel_idle=duration("TunnelIdle", defaults.tunnel_idle),
            connect_session=duration("ConnectSession", defaults.connect_session),
            tls_handshake=duration("TLSHandshake", defaults.tls_handshake),
            carrier_handshake=duration("CarrierHandshake", defaults.carrier_handshake),
            response_headers=duration("ResponseHeaders", defaults.response_headers),
            cluster_retry=duration("ClusterRetry", defaults.cluster_retry),
            max_header_bytes=count("MaxRequestHeaderBytes", defaults.max_header_bytes, 1024),
            max_connections_per_container=cap,
            max_anonymous_connections_per_container=anonymous,
            max_anonymous_connections_per_address=per_address,
        )

    def api_url(self, value: object, key: str) -> str:
        if isinstance(value, str):
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 - raises ValueError for a malformed port
            except ValueError:
                parts = urlsplit("")
            if (
                parts.scheme in ("http", "https")
                and parts.hostname
                and parts.path in ("", "/")
                and not parts.query
                and "*" not in value
            ):
                return f"{parts.scheme}://{parts.netloc}/"
        self.fail(key, f"expected {_API_URL_EXPECTED}, got {_show(value)}")

    def duration(self, value: object, key: str, zero_ok: bool = False) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.fail(
                key,
                'expected a duration like "300s", "5m", "1h30m", "250ms" or a number of '
                f"seconds, got {_show(value)}",
            )
        if zero_ok and seconds == 0:
            return seconds
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(key, f"expected a duration greater than zero, got {_show(value)}")
        return seconds


def _kind(value: object) -> str:
    """What sort of value this is, without showing it."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _show(value: object) -> str:
    """A short rendering of a configuration value for a message."""
    if value is None:
        return "nothing"
    if isinstance(value, Mapping | list):
        return _kind(value)
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 100 else text[:96] + '..."'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """
    Where and what the problem is, without the excerpt of the file that PyYAML's own message
    quotes: that excerpt may be the SystemRootToken's line.
    """
    problem = getattr(error, "problem", None)
    if problem is None:
        lines = str(error).splitlines()
        return lines[0] if lines else type(error).__name__
    text = str(problem)
    context = getattr(error, "context", None)
    context_mark = getattr(error, "context_mark", None)
    if context:
        text += f" {context}"
        if context_mark is not None:
            text += f" that starts at line {context_mark.line + 1}"
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    return text
