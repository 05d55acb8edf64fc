"""
The real plugins on an Arvados cluster: C{twistd arv-controller-proxy} with C{Backend: arvados}
and C{twistd crunch-run-gateway} given the dispatcher's C{Env} as Arvados' dispatchers give it to
crunch-run (C{ARVADOS_API_HOST} as C{host:port}, C{ARVADOS_API_HOST_INSECURE=1}, the
dispatcher's token), against the fake Arvados API served over TLS with a self-signed certificate
on loopback, which follows the API server's lock and state rules.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.backends.arvados import InsecureTLSPolicy
from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI, self_signed
from tests import e2e

reactor: Any = _reactor


def run(coroutine: Any) -> defer.Deferred[Any]:
    return defer.ensureDeferred(coroutine)


class ArvadosCluster:
    """
    The fake API over TLS, Alice's container request for a service on loopback, and a
    dispatcher (an admin, with its own token) that has locked the request's container through
    the API, as C{sdk/go/dispatch} does.
    """

    def __init__(self, testcase: unittest.TestCase, service_port: int) -> None:
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self.api = FakeArvadosAPI(e2e.CLUSTER_ID, e2e.ROOT_TOKEN)
        self.server = FakeAPIServer(reactor, self.api, tls=self_signed()[0])
        self.server.start()
        testcase.addCleanup(self.server.stop)
        self.alice = self.api.add_user("Alice")
        self.token = self.api.add_token(self.alice)
        project = self.api.add_project(self.alice)
        ports = {str(service_port): {"access": "private", "label": "web", "initial_path": ""}}
        self.container = self.api.add_container(published_ports=ports)
        self.request = self.api.add_container_request(
            project, self.container, published_ports=ports, name="arvados e2e"
        )
        self.dispatcher_token = self.api.add_token(self.api.add_user("Dispatcher", is_admin=True))
        self.service_port = service_port

    @property
    def api_host(self) -> str:
        """C{ARVADOS_API_HOST}, as dispatchers pass it: C{host:port}."""
        return self.server.api_host

    async def lock(self) -> None:
        """POST containers/<uuid>/lock with the dispatcher's token, over TLS."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, contextFactory=InsecureTLSPolicy(), pool=pool))
        response = await client.post(
            f"https://{self.api_host}/arvados/v1/containers/{self.container}/lock",
            headers=Headers({b"authorization": [f"Bearer {self.dispatcher_token}".encode()]}),
        )
        body = json.loads(await response.content())
        await pool.closeCachedConnections()
        assert response.code == 200 and body["state"] == "Locked", body

    def dispatch_json(self, api_host: str, token: str) -> bytes:
        """The JSON a dispatcher hands the gateway (crunch-dispatch-local's environment)."""
        env = {
            "GatewayAddress": "127.0.0.1:0",
            "GatewayAuthSecret": policy.gateway_secret(e2e.ROOT_TOKEN, self.container),
            "ARVADOS_API_HOST": api_host,
            "ARVADOS_API_TOKEN": token,
            "ARVADOS_API_HOST_INSECURE": "1",
        }
        return json.dumps({"Env": env}).encode() + b"\n"

    def write_config(self, controller_port: int) -> str:
        document = {
            "Clusters": {
                e2e.CLUSTER_ID: {
                    "SystemRootToken": e2e.ROOT_TOKEN,
                    "Services": {
                        "ContainerWebServices": {
                            "ExternalURL": f"http://*.{e2e.SUFFIX}:{controller_port}",
                            "InternalURLs": {f"http://127.0.0.1:{controller_port}": {}},
                        },
                        "Controller": {"ExternalURL": f"https://{self.api_host}"},
                    },
                    "TLS": {"Insecure": True},
                    "ArvProxy": {"Backend": "arvados"},
                }
            }
        }
        path = os.path.join(self.directory, "config.yml")
        with open(path, "w") as f:
            yaml.safe_dump(document, f)
        return path

    def gateway(
        self, testcase: unittest.TestCase, config: str, stdin: bytes, name: str = "gateway"
    ) -> e2e.Twistd:
        process = e2e.Twistd.spawn(
            reactor,
            self.directory,
            name,
            ["crunch-run-gateway", "--config", config, "--container-uuid", self.container],
            stdin=stdin,
        )
        testcase.addCleanup(process.stop, reactor)
        return process

    def record(self) -> dict[str, Any]:
        return self.api.containers[self.container]

    async def start_plugins(self, testcase: unittest.TestCase) -> tuple[e2e.Twistd, int, str]:
        """
        Lock the container, then start the front door and the container's gateway; return
        once the container is Running and the front door accepts connections.

        @return: the front door, its port, and the configuration file both use.
        """
        await self.lock()
        port = e2e.free_port()
        config = self.write_config(port)
        controller = e2e.Twistd.spawn(
            reactor, self.directory, "controller", ["arv-controller-proxy", "--config", config]
        )
        testcase.addCleanup(controller.stop, reactor)
        gateway = self.gateway(
            testcase, config, self.dispatch_json(self.api_host, self.dispatcher_token)
        )
        await e2e.wait_for(
            reactor,
            lambda: self.record()["state"] == "Running" and self.record()["gateway_address"],
            "the gateway to mark its container Running",
            [gateway],
            timeout=60,
        )
        await e2e.wait_for(reactor, lambda: e2e.accepting(port), "the controller", [controller])
        return controller, port, config


class ArvadosChainTests(unittest.TestCase):
    def test_front_door_to_gateway(self) -> defer.Deferred[None]:
        """A request through the front door reaches a service in a container a dispatcher locked."""
        return run(self._front_door_to_gateway())

    async def _front_door_to_gateway(self) -> None:
        service = e2e.ServiceSite(reactor)
        service_port = service.listen(reactor)
        self.addCleanup(service.stop, reactor)
        cluster = ArvadosCluster(self, service_port)
        controller, controller_port, _ = await cluster.start_plugins(self)
        client = e2e.Client(reactor)
        self.addCleanup(client.close)
        vhost = f"{cluster.request}-{service_port}.{e2e.SUFFIX}:{controller_port}".encode()
        cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(cluster.token.encode())
        response, body = await client.fetch(
            b"GET",
            b"http://127.0.0.1:%d/hello?x=1" % controller_port,
            Headers({b"host": [vhost], b"cookie": [cookie]}),
        )
        self.assertEqual(response.code, 200, body + controller.describe().encode())
        self.assertEqual(json.loads(body)["uri"], "/hello?x=1")
        self.assertEqual([r.uri for r in service.received], [b"/hello?x=1"])
        # The gateway did as crunch-run does: the dispatcher's token read the container's own
        # token (proving it holds the lock) and moved the container on.
        dispatcher = cluster.dispatcher_token.split("/")[1]
        [auth] = [c for c in cluster.api.calls if c.path.endswith("/auth")]
        self.assertEqual(auth.token_uuid, dispatcher)
        [running] = [
            c
            for c in cluster.api.calls
            if c.method == "PUT" and c.params.get("container", {}).get("state") == "Running"
        ]
        self.assertEqual(running.token_uuid, dispatcher)
        self.assertEqual(cluster.record()["locked_by_uuid"], dispatcher)

    def test_gateway_refusals(self) -> defer.Deferred[None]:
        """A gateway given the container's own token, or a URL for the API, stops at start."""
        return run(self._gateway_refusals())

    async def _gateway_refusals(self) -> None:
        cluster = ArvadosCluster(self, e2e.free_port())
        await cluster.lock()
        config = cluster.write_config(e2e.free_port())
        own_token = cluster.api.container_token(cluster.container)
        cases = [
            (
                "own-token",
                cluster.dispatch_json(cluster.api_host, own_token),
                "does not hold the lock",
            ),
            (
                "url",
                cluster.dispatch_json(f"https://{cluster.api_host}", cluster.dispatcher_token),
                "Env.ARVADOS_API_HOST must be host:port",
            ),
        ]
        for name, stdin, said in cases:
            calls = len(cluster.api.calls)
            gateway = cluster.gateway(self, config, stdin, name)
            code = await gateway.ended
            output = gateway.output.decode(errors="replace") + gateway.log_text()
            self.assertEqual(code, 1, output)
            self.assertIn(said, output, name)
            for secret in (own_token, cluster.dispatcher_token, e2e.ROOT_TOKEN):
                self.assertNotIn(secret.rsplit("/", 1)[-1], output)
            # The container is left to the dispatcher that holds it: not moved, not cancelled.
            self.assertEqual(cluster.record()["state"], "Locked")
            self.assertFalse([c for c in cluster.api.calls[calls:] if c.method == "PUT"])


class ArvadosRulesChainTests(unittest.TestCase):
    """The Arvados backend's rules and the two policies, through the real plugins over TLS."""

    def test_rules_and_policies(self) -> defer.Deferred[None]:
        """
        Through twistd arv-controller-proxy and crunch-run-gateway on Arvados: a can_write link
        on the container request itself, and a project share, open the port with a full token
        and with a token scoped to the port alike; a reader gets 403, a stranger 404; the
        first connection marks the container; a request whose property prohibits connections
        keeps even its owner and an admin out (403); and with ConnectionsEnabled false every
        service is turned off (403).
        """
        return run(self._rules_and_policies())

    async def _rules_and_policies(self) -> None:
        service = e2e.ServiceSite(reactor)
        service_port = service.listen(reactor)
        self.addCleanup(service.stop, reactor)
        cluster = ArvadosCluster(self, service_port)
        api = cluster.api
        project = api.container_requests[cluster.request]["owner_uuid"]
        linked, sharer, reader, stranger = (
            api.add_user(name) for name in ("Linked", "Sharer", "Reader", "Stranger")
        )
        api.grant(linked, cluster.request, "can_write")
        api.grant(sharer, project, "can_write")
        api.grant(reader, project, "can_read")
        admin = api.add_user("Admin", is_admin=True)
        controller, controller_port, _ = await cluster.start_plugins(self)
        client = e2e.Client(reactor)
        self.addCleanup(client.close)

        async def status(token: str, target: str, port: int = controller_port) -> int:
            vhost = f"{target}-{service_port}.{e2e.SUFFIX}:{port}".encode()
            cookie = policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(token.encode())
            response, _ = await client.fetch(
                b"GET",
                b"http://127.0.0.1:%d/" % port,
                Headers({b"host": [vhost], b"cookie": [cookie]}),
            )
            return int(response.code)

        def scoped(user: str) -> str:
            return api.add_token(user, [policy.connect_scope(cluster.request, service_port)])

        self.assertFalse(cluster.record()["interactive_session_started"])
        table = [
            ("a can_write link on the request", linked, 200),
            ("a project share to write", sharer, 200),
            ("a project share to read", reader, 403),
            ("a stranger", stranger, 404),
        ]
        got = [
            (
                name,
                await status(api.add_token(user), cluster.request),
                await status(scoped(user), cluster.request),
            )
            for name, user, _ in table
        ]
        self.assertEqual(
            got, [(name, want, want) for name, _, want in table], controller.describe()
        )
        self.assertTrue(cluster.record()["interactive_session_started"])
        marks = [
            c
            for c in api.calls
            if c.method == "PUT" and "interactive_session_started" in str(c.params)
        ]
        self.assertEqual(len(marks), 1)

        # A request whose property prohibits connections: nobody gets in, by either URL.
        closed_container = api.add_container(state="Running", gateway_address="127.0.0.1:1")
        closed = api.add_container_request(
            project, closed_container, properties={"arvproxy:connections": "prohibited"}
        )
        for token in (cluster.token, api.add_token(admin)):
            for target in (closed, closed_container):
                self.assertEqual(await status(token, target), 403, target)

        # With ConnectionsEnabled false, every service is off.
        off_port = e2e.free_port()
        off_config = cluster.write_config(off_port)
        with open(off_config) as f:
            document = yaml.safe_load(f)
        document["Clusters"][e2e.CLUSTER_ID]["ArvProxy"]["ConnectionsEnabled"] = False
        off_config = off_config.replace("config.yml", "off.yml")
        with open(off_config, "w") as f:
            yaml.safe_dump(document, f)
        off = e2e.Twistd.spawn(
            reactor, cluster.directory, "off", ["arv-controller-proxy", "--config", off_config]
        )
        self.addCleanup(off.stop, reactor)
        await e2e.wait_for(reactor, lambda: e2e.accepting(off_port), "the second controller", [off])
        self.assertEqual(await status(api.add_token(admin), cluster.container, off_port), 403)
