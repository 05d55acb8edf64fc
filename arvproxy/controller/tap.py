"""
C{twistd arv-controller-proxy}: the front door, from a configuration file.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from arvproxy.backends.cache import CachedCluster
from arvproxy.config import trusted_proxy_warnings
from arvproxy.controller.proxy import Controller, GatewayConnector
from arvproxy.controller.workers import WorkerPool, watch_parent
from arvproxy.httpserver import ProxySite, safe_keep_alive
from arvproxy.service import (
    ListeningService,
    check_registry,
    freeze_start_up,
    open_cluster,
    read_config,
)

log = Logger()


class Options(usage.Options):
    synopsis = "--config FILE [--listen ENDPOINT]"
    longdesc = (
        "Authorize browser and API requests to container web services and forward them to the "
        "containers' gateways."
    )
    optParameters = [
        ["config", "c", None, "The cluster configuration file (YAML)."],
        [
            "listen",
            "l",
            None,
            "Listen here instead of the configured InternalURLs (a Twisted endpoint, "
            'e.g. "tcp:8900:interface=127.0.0.1").',
        ],
    ]
    optFlags = [
        ["access-log", None, "Log every request (paths only, never query strings)."],
        ["worker", None, "Run as an extra process started by --workers (internal)."],
    ]

    def opt_workers(self, value: str) -> None:
        """
        Run this many controller processes sharing the listening port (SO_REUSEPORT), e.g.
        one per core.  Needs a "tcp:" listening endpoint.  [default: 1]
        """
        try:
            self["workers"] = int(value)
        except ValueError:
            raise usage.UsageError(f"--workers must be a whole number, got {value!r}") from None
        if self["workers"] < 1:
            raise usage.UsageError(f"--workers must be at least 1, got {value!r}")

    def postOptions(self) -> None:
        self.setdefault("workers", 1)
        self["cluster"] = read_config(self["config"])
        check_registry(self["cluster"])
        self["listen_on"] = self["listen"] or self["cluster"].controller_listen
        shared = self["workers"] > 1 or self["worker"]
        if shared and not self["listen_on"].startswith("tcp:"):
            raise usage.UsageError(
                f"--workers needs a tcp: endpoint to share, not {self['listen_on']!r}"
            )


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    freeze_start_up(reactor)
    config = options["cluster"]
    if not options["worker"]:  # Said once, by the first process.
        for warning in trusted_proxy_warnings(config):
            log.warn("{warning}", warning=warning)
    top = MultiService()
    cluster = open_cluster(reactor, config)
    cluster.setServiceParent(top)
    if config.backend == "arvados":
        from arvproxy.backends.apitls import check_at_start

        reactor.callWhenRunning(
            lambda: defer.ensureDeferred(check_at_start(reactor, cluster, "arv-controller-proxy"))
        )
    if config.backend == "embedded" and config.cache_ttl > 0:
        # The Arvados backend keeps its own answers; the registry's cost a thread hop each.
        # Kept answers go as soon as the registry file changes: a finished container or a
        # revoked token is refused at once.
        cluster = CachedCluster(reactor, cluster, config.cache_ttl, version=cluster.data_version)
    limits = config.limits
    gateways = GatewayConnector(
        reactor,
        tls_handshake=limits.tls_handshake,
        carrier_handshake=limits.carrier_handshake,
        response_headers=limits.response_headers,
        old_gateways=config.sign_for_old_gateways,
    )
    # A gateway closes a kept connection that brings no request in time (the header deadline).
    gateways.pool.idle_timeout = min(gateways.pool.idle_timeout, safe_keep_alive(config.limits))
    site = ProxySite(Controller(reactor, config, cluster, gateways), reactor, config.limits)
    site.access_log = bool(options["access-log"])
    on_listening = None
    if options["worker"]:
        watch_parent(reactor)
    elif options["workers"] > 1:
        workers = WorkerPool(reactor, options["workers"] - 1, worker_arguments(options))
        workers.setServiceParent(top)

        def on_listening(port: Any) -> None:
            address = port.getHost()
            workers.start_workers(f"tcp:{address.port}:interface={address.host}")

    ListeningService(
        reactor,
        options["listen_on"],
        site,
        on_listening=on_listening,
        on_stopping=gateways.close,
        reuse_port=options["workers"] > 1 or options["worker"],
    ).setServiceParent(top)
    return top


def worker_arguments(options: Options) -> list[str]:
    """The plugin options every worker gets (all but where to listen and how many)."""
    argv = ["--config", options["config"]]
    if options["access-log"]:
        argv.append("--access-log")
    return argv
