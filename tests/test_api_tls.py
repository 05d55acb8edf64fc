"""
TLS to the Arvados API server (L{arvproxy.backends.apitls}): a certificate the proxy cannot trust
is explained (which host, what to set) once, at start-up, and a file of CA certificates
(C{ArvProxy.TLS.CAFile}) makes it trusted.  Against the fake API served over real TLS, in process
and through the real twistd plugins.
"""

from __future__ import annotations

import json
import os
from typing import Any, cast

import yaml
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial import unittest

from arvproxy import policy
from arvproxy.backends.apitls import UntrustedAPI, certificate_problem, trust_root_from_file
from arvproxy.backends.arvados import ArvadosCluster
from arvproxy.config import ConfigError, load_config
from arvproxy.fakearvados import FakeAPIServer, FakeArvadosAPI, self_signed
from arvproxy.service import open_cluster
from tests import e2e

reactor: Any = _reactor
ROOT_TOKEN = e2e.ROOT_TOKEN


def write_config(directory: str, api_host: str, port: int, **arvproxy: Any) -> str:
    """A configuration for the Arvados backend at C{api_host}, with C{arvproxy} settings."""
    document = {
        "Clusters": {
            e2e.CLUSTER_ID: {
                "SystemRootToken": ROOT_TOKEN,
                "Services": {
                    "ContainerWebServices": {
                        "ExternalURL": f"http://*.{e2e.SUFFIX}:{port}",
                        "InternalURLs": {f"http://127.0.0.1:{port}": {}},
                    },
                    "Controller": {"ExternalURL": f"https://{api_host}"},
                },
                "ArvProxy": {"Backend": "arvados", **arvproxy},
            }
        }
    }
    path = os.path.join(directory, "config.yml")
    with open(path, "w") as f:
        yaml.safe_dump(document, f)
    return path


class TLSTestCase(unittest.TestCase):
    """The fake API over TLS with a fresh self-signed certificate, and its CA file."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        options, self.certificate = self_signed()
        self.api = FakeArvadosAPI(e2e.CLUSTER_ID, ROOT_TOKEN)
        self.server = FakeAPIServer(reactor, self.api, tls=options)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.ca_file = os.path.join(self.directory, "ca.pem")
        with open(self.ca_file, "wb") as f:
            f.write(b"# the fake API's certificate\n" + self.certificate.dumpPEM())

    def config(self, **arvproxy: Any) -> Any:
        return load_config(
            write_config(self.directory, self.server.api_host, e2e.free_port(), **arvproxy)
        )

    def backend(self, cluster: ArvadosCluster) -> ArvadosCluster:
        cluster.startService()
        self.addCleanup(cluster.stopService)
        return cluster

    def logged(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events


class ExplainedTests(TLSTestCase):
    def test_untrusted_certificate_explained_once(self) -> defer.Deferred[None]:
        """
        Without TLS.Insecure or a CA file, a self-signed API certificate fails every call with
        a message naming the host and the settings to change, logged once.
        """
        events = self.logged()
        config = self.config()
        cluster = self.backend(ArvadosCluster.from_config(reactor, config))
        host = self.server.api_host

        async def run() -> None:
            for _ in range(3):
                with self.assertRaises(UntrustedAPI) as caught:
                    await cluster.get_container("zzzzz-dz642-000000000000001")
            message = caught.exception.message
            self.assertEqual(
                message,
                f"certificate verify failed for {host}: set Clusters.{e2e.CLUSTER_ID}.TLS."
                f"Insecure (test clusters only) or install the CA (Clusters.{e2e.CLUSTER_ID}."
                "ArvProxy.TLS.CAFile, or the system's CA certificates)",
            )
            self.assertEqual(caught.exception.status, 503)
            said = [e for e in events if "certificate verify failed" in str(formatEvent(e))]
            self.assertEqual(len(said), 1, said)
            self.assertNotIn("retry by itself", message)
            self.assertFalse(self.api.calls)

        return defer.ensureDeferred(run())

    def test_gateway_names_its_settings(self) -> defer.Deferred[None]:
        """A gateway's backend (the dispatcher's Env) names ARVADOS_API_HOST_INSECURE."""
        config = self.config()
        env = {"ARVADOS_API_HOST": self.server.api_host, "ARVADOS_API_TOKEN": ROOT_TOKEN}
        cluster = self.backend(open_cluster(reactor, config, env))

        async def run() -> None:
            with self.assertRaises(UntrustedAPI) as caught:
                await cluster.get_container("zzzzz-dz642-000000000000001")
            self.assertIn("set Env.ARVADOS_API_HOST_INSECURE", caught.exception.message)

        return defer.ensureDeferred(run())

    def test_wrong_name(self) -> defer.Deferred[None]:
        """A trusted certificate for another host is refused too, and said so."""
        options, certificate = self_signed(["api.elsewhere.example"])
        server = FakeAPIServer(reactor, self.api, tls=options)
        server.start()
        self.addCleanup(server.stop)
        cluster = self.backend(
            ArvadosCluster(
                reactor, server.url, ROOT_TOKEN, cluster_id="zzzzz", trust_root=certificate
            )
        )

        async def run() -> None:
            with self.assertRaises(UntrustedAPI) as caught:
                await cluster.probe()
            self.assertIn("it does not name this host", caught.exception.message)

        return defer.ensureDeferred(run())

    def test_other_failures_are_not_certificates(self) -> None:
        """Only a failed certificate check is called one."""
        self.assertIsNone(certificate_problem(ConnectionRefusedError()))
        self.assertIsNone(certificate_problem(ValueError("certificate verify failed")))


class CAFileTests(TLSTestCase):
    def test_ca_file_trusted(self) -> defer.Deferred[None]:
        """With ArvProxy.TLS.CAFile naming the certificate, the API is trusted and answers."""
        config = self.config(TLS={"CAFile": "ca.pem"})
        self.assertEqual(config.api_ca_file, self.ca_file)
        cluster = self.backend(ArvadosCluster.from_config(reactor, config))

        async def run() -> None:
            await cluster.probe()
            alice = self.api.add_user("Alice")
            credentials = await cluster.authenticate(self.api.add_token(alice))
            self.assertEqual(credentials.user_uuid, alice)

        return defer.ensureDeferred(run())

    def test_ca_file_mistakes(self) -> None:
        """A missing CA file, or one without a certificate, is a start-up error naming the key."""
        with open(os.path.join(self.directory, "empty.pem"), "w") as f:
            f.write("nothing here\n")
        key = f"Clusters.{e2e.CLUSTER_ID}.ArvProxy.TLS.CAFile"
        for value, said in [
            ("missing.pem", "cannot read"),
            ("empty.pem", "holds no PEM certificate"),
            (42, "expected the path of a PEM file"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.config(TLS={"CAFile": value})
            self.assertIn(key, str(caught.exception))
            self.assertIn(said, str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.config(TLS={"CAfile": "ca.pem"})
        self.assertIn("did you mean CAFile", str(caught.exception))

    def test_trust_root_from_file(self) -> None:
        """Every certificate of a PEM file is read; a file without one is refused."""
        self.assertIsNotNone(trust_root_from_file(self.ca_file))
        path = os.path.join(self.directory, "none.pem")
        with open(path, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        self.assertRaises(ValueError, trust_root_from_file, path)


class RealPluginTests(TLSTestCase):
    def test_controller_stops_at_start(self) -> defer.Deferred[None]:
        """
        twistd arv-controller-proxy against an API whose certificate it cannot trust exits 1 at
        start-up, saying which host and what to set in one line, with no traceback; with the
        CA file it starts and serves.
        """
        return defer.ensureDeferred(self._controller_stops_at_start())

    async def _controller_stops_at_start(self) -> None:
        port = e2e.free_port()
        config = write_config(self.directory, self.server.api_host, port)
        controller = e2e.Twistd.spawn(
            reactor, self.directory, "untrusting", ["arv-controller-proxy", "--config", config]
        )
        self.addCleanup(controller.stop, reactor)
        code = await controller.ended
        output = controller.output.decode(errors="replace") + controller.log_text()
        self.assertEqual(code, 1, controller.describe())
        line = (
            f"arv-controller-proxy: error: certificate verify failed for {self.server.api_host}: "
            f"set Clusters.{e2e.CLUSTER_ID}.TLS.Insecure"
        )
        self.assertIn(line, output)
        self.assertEqual(output.count("certificate verify failed"), 1, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn(ROOT_TOKEN, output + controller.log_text())

        port = e2e.free_port()
        config = write_config(self.directory, self.server.api_host, port, TLS={"CAFile": "ca.pem"})
        trusting = e2e.Twistd.spawn(
            reactor, self.directory, "trusting", ["arv-controller-proxy", "--config", config]
        )
        self.addCleanup(trusting.stop, reactor)
        await e2e.wait_for(
            reactor,
            lambda: any(c.path.endswith("/current") for c in self.api.calls),
            "the controller to ask the API at start-up",
            [trusting],
        )
        await e2e.wait_for(reactor, lambda: e2e.accepting(port), "the controller", [trusting])
        self.assertTrue(trusting.running)
        self.assertNotIn("certificate verify failed", trusting.log_text())

    def test_gateway_says_why(self) -> defer.Deferred[None]:
        """
        A gateway whose dispatcher names a self-signed API server without
        ARVADOS_API_HOST_INSECURE exits 1 saying the certificate failed and what to set, not
        that it will retry.
        """
        return defer.ensureDeferred(self._gateway_says_why())

    async def _gateway_says_why(self) -> None:
        container = self.api.add_container(state="Locked")
        config = write_config(self.directory, self.server.api_host, e2e.free_port())
        env = {
            "GatewayAddress": "127.0.0.1:0",
            "GatewayAuthSecret": policy.gateway_secret(ROOT_TOKEN, container),
            "ARVADOS_API_HOST": self.server.api_host,
            "ARVADOS_API_TOKEN": ROOT_TOKEN,
        }
        gateway = e2e.Twistd.spawn(
            reactor,
            self.directory,
            "gateway",
            ["crunch-run-gateway", "--config", config, "--container-uuid", container],
            stdin=json.dumps({"Env": env}).encode() + b"\n",
        )
        self.addCleanup(gateway.stop, reactor)
        code = await gateway.ended
        said = gateway.output.decode(errors="replace") + gateway.log_text()
        self.assertEqual(code, 1, gateway.describe())
        self.assertIn(
            f"certificate verify failed for {self.server.api_host}: set "
            "Env.ARVADOS_API_HOST_INSECURE",
            said,
        )
        self.assertNotIn("retry by itself", said)
        self.assertNotIn(ROOT_TOKEN, said)
        self.assertEqual(self.api.containers[container]["state"], "Locked")
