"""
Tests for L{arvproxy.config.trusted_proxy_warnings}: a C{TrustedProxies} network so wide that
it is almost certainly a mistake is accepted, but said at start-up, naming the key (issue 16).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from arvproxy.config import parse_config, trusted_proxy_warnings
from tests import e2e
from tests.test_config import minimal
from tests.test_policy import TableMixin

reactor: Any = _reactor
KEY = "Clusters.zzzzz.ArvProxy.TrustedProxies"


def warnings_for(networks: list[str]) -> list[str]:
    document = minimal()
    document["Clusters"]["zzzzz"]["ArvProxy"] = {"TrustedProxies": networks}
    return trusted_proxy_warnings(parse_config(document, "/etc/arvados/config.yml"))


class TrustedProxyWarningTests(TableMixin, SynchronousTestCase):
    def test_table(self) -> None:
        """Networks wider than a /8 (of IPv4, IPv6, or IPv4 mapped into IPv6) are warned about."""
        rows = [
            ("0.0.0.0/0", True),
            ("::/0", True),
            ("0.0.0.0/1", True),
            ("128.0.0.0/7", True),
            ("2000::/3", True),
            ("::ffff:0:0/96", True),
            ("::ffff:0.0.0.0/100", True),
            ("10.0.0.0/8", False),
            ("172.16.0.0/12", False),
            ("127.0.0.1/32", False),
            ("192.0.2.0/24", False),
            ("fd00::/8", False),
            ("::1/128", False),
            ("::ffff:10.0.0.0/104", False),
        ]
        self.assertRows(rows, lambda network: bool(warnings_for([network])))

    def test_message(self) -> None:
        """Each warning is one line naming the file, the full key and the network."""
        [first, second] = warnings_for(["127.0.0.1/32", "0.0.0.0/0", "::/0"])
        self.assertTrue(first.startswith(f"/etc/arvados/config.yml: {KEY}: 0.0.0.0/0 "), first)
        self.assertIn("X-Forwarded-For", first)
        self.assertIn(f"{KEY}: ::/0 ", second)
        self.assertNotIn("\n", first + second)
        self.assertEqual(warnings_for([]), [])


class StartUpWarningTests(unittest.TestCase):
    def test_front_door_warns(self) -> defer.Deferred[None]:
        """The real front door, configured to trust 0.0.0.0/0, starts and logs the warning."""
        return defer.ensureDeferred(self._front_door_warns())

    async def _front_door_warns(self) -> None:
        chain = await e2e.start_chain(self, reactor, TrustedProxies=["0.0.0.0/0"])
        text = await e2e.wait_for(
            reactor,
            lambda: KEY in chain.controller.log_text() and chain.controller.log_text(),
            "the warning in the front door's log",
            [chain.controller],
        )
        [line] = [line for line in text.splitlines() if KEY in line]
        self.assertIn(f"{chain.config}: {KEY}: 0.0.0.0/0 is wider than a /8", line)
        self.assertNotIn(KEY, chain.gateway.log_text())
        response, _ = await chain.get(b"/still-serving")
        self.assertEqual(response.code, 200)
