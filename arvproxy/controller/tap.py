"""
C{twistd arv-controller-proxy}: the front door, from a configuration file.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.python import usage

from arvproxy.controller.proxy import Controller, GatewayConnector
from arvproxy.service import ListeningService, open_cluster, read_config
from arvproxy.streaming import ProxySite


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
    optFlags = [["access-log", None, "Log every request (paths only, never query strings)."]]

    def postOptions(self) -> None:
        self["cluster"] = read_config(self["config"])


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options["cluster"]
    top = MultiService()
    cluster = open_cluster(reactor, config)
    cluster.setServiceParent(top)
    gateways = GatewayConnector(reactor)
    site = ProxySite(Controller(reactor, config, cluster, gateways), reactor, config.limits)
    site.access_log = bool(options["access-log"])
    ListeningService(
        reactor,
        options["listen"] or config.controller_listen,
        site,
        on_stopping=gateways.pool.closeCachedConnections,
    ).setServiceParent(top)
    return top
