"""
The two phase-2 policies with the embedded registry, through the real twistd front door and
gateway (L{tests.e2e}): the first connection marks the container in the registry file, and a
container request made with C{arvproxy container-request create --no-connections} keeps everyone
out.  (The same on Arvados: L{tests.test_arvados_chain}.)
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from arvproxy import cli, policy
from tests import e2e

reactor: Any = _reactor


class EmbeddedPoliciesTests(unittest.TestCase):
    def test_mark_and_prohibit(self) -> defer.Deferred[None]:
        """
        The first request through the real plugins marks the container (once, in the registry
        file); a request created with --no-connections on the same running chain answers 403
        to its owner and to an admin, and nothing reaches its gateway.
        """
        return defer.ensureDeferred(self._mark_and_prohibit())

    async def _mark_and_prohibit(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        store = chain.cluster.store
        uuid = chain.cluster.container_uuid
        self.assertFalse(store.get_container(uuid).interactive_session_started)
        for _ in range(3):
            response, _ = await chain.get(b"/hello")
            self.assertEqual(response.code, 200, chain.controller.describe())
        self.assertTrue(store.get_container(uuid).interactive_session_started)
        self.assertEqual(chain.controller.log_text().count("had its first connection"), 1)

        registry = store.path
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(
                [
                    "--registry",
                    registry,
                    "--cluster-id",
                    e2e.CLUSTER_ID,
                    "container-request",
                    "create",
                    "--user",
                    chain.cluster.user.uuid,
                    "--port",
                    str(chain.cluster.port),
                    "--no-connections",
                ]
            )
        self.assertEqual(code, 0)
        [closed] = [
            cr for cr in store.list_container_requests() if cr.uuid != chain.cluster.request.uuid
        ]
        assert closed.container_uuid is not None
        store.update_container(
            closed.container_uuid, state="Running", gateway_address="127.0.0.1:1"
        )
        admin = store.create_user("Admin", is_admin=True)
        admin_token, _ = store.create_token(admin.uuid)
        for token in (chain.cluster.token, admin_token):
            vhost = f"{closed.uuid}-{chain.cluster.port}.{e2e.SUFFIX}:{chain.controller_port}"
            cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(token.encode())
            response, body = await chain.client.fetch(
                b"GET", chain.url(), Headers({b"host": [vhost.encode()], b"cookie": [cookie]})
            )
            self.assertEqual(response.code, 403, body)
            self.assertIn(b"prohibited", body)
        self.assertFalse(store.get_container(closed.container_uuid).interactive_session_started)
