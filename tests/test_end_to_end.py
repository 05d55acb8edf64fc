"""
End-to-end tests: the real C{twistd arv-controller-proxy} and C{twistd crunch-run-gateway} on
loopback, a registry file, and a web service in this process standing in for the container.

They cover the browser flow, what the service receives, the attacks the design must resist
(header forgery, token leaks, replayed or forged signatures, a gateway impostor, request
smuggling), streaming 1 GiB each way with flat memory, slow clients, the container finishing,
and refusals at start-up.  See L{tests.e2e} for the harness.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import quote

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial import unittest
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from arvproxy import policy
from arvproxy.backends import CANCELLED, COMPLETE, RUNNING
from arvproxy.tlsidentity import server_context_factory
from tests import e2e
from tests.e2e import GiB, MiB

reactor: Any = _reactor


def run(coroutine: Any) -> defer.Deferred[Any]:
    """A coroutine as the Deferred trial waits for."""
    return defer.ensureDeferred(coroutine)


class BrowserFlowTests(unittest.TestCase):
    """The token's way from the query string to a cookie, and what the service then receives."""

    def test_query_token_becomes_cookie(self) -> defer.Deferred[None]:
        """A query token is answered with 303 and a cookie, and the cookie reaches the service."""
        return run(self._query_token_becomes_cookie())

    async def _query_token_becomes_cookie(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        token = chain.cluster.token
        path = b"/app/page?x=1&arvados_api_token=" + quote(token, safe="").encode() + b"&y=2"
        response, _ = await chain.client.fetch(b"GET", chain.url(path), chain.headers(cookie=False))
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/app/page?x=1&y=2"])
        [set_cookie] = response.headers.getRawHeaders(b"set-cookie")
        self.assertIn(b"HttpOnly", set_cookie)
        cookie = set_cookie.split(b";")[0]
        self.assertEqual(cookie, chain.cluster.cookie())
        self.assertEqual(chain.service.received, [])

        headers = Headers({b"host": [chain.vhost], b"cookie": [cookie]})
        response, body = await chain.client.fetch(b"GET", chain.url(b"/app/page?x=1&y=2"), headers)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["uri"], "/app/page?x=1&y=2")

        response, _ = await chain.client.fetch(
            b"GET", chain.url(b"/app/page"), chain.headers(cookie=False)
        )
        self.assertEqual(response.code, 401)
        self.assertEqual(len(chain.service.received), 1)

    def test_service_sees_clean_headers(self) -> defer.Deferred[None]:
        """The service sees its own headers and the proxy's, never the token or forged ones."""
        return run(self._service_sees_clean_headers())

    async def _service_sees_clean_headers(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        headers = chain.headers(
            cookie=False,
            cookie_=[b"first=1; " + chain.cluster.cookie() + b"; second=2", b"third=3"],
            authorization=[b"Bearer service-password"],
            x_arvados_target_uuid=[b"zzzzz-dz642-000000000000000"],
            x_arvados_target_port=[b"1"],
            x_arvados_authorization=[b"forged"],
            x_arvados_request_host=[b"evil.example"],
            x_arvados_gateway_error=[b"forged"],
            x_forwarded_for=[b"203.0.113.9"],
            x_forwarded_proto=[b"https"],
            x_forwarded_host=[b"evil.example"],
            connection=[b"keep-alive, X-Hop-Secret"],
            x_hop_secret=[b"hop"],
            keep_alive=[b"timeout=5"],
            proxy_authorization=[b"Basic cHJveHk6cHJveHk="],
            te=[b"trailers"],
            x_repeat=[b"one", b"two"],
        )
        response, _ = await chain.client.fetch(b"GET", chain.url(b"/h"), headers)
        self.assertEqual(response.code, 200)
        [seen] = chain.service.received
        self.assertEqual(seen.header(b"cookie"), [b"first=1; second=2", b"third=3"])
        self.assertEqual(seen.header(b"authorization"), [b"Bearer service-password"])
        self.assertEqual([n for n in seen.names() if n.startswith(b"x-arvados-")], [], seen.headers)
        self.assertEqual(seen.header(b"host"), [chain.vhost])
        self.assertEqual(seen.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(seen.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(seen.header(b"x-forwarded-host"), [chain.vhost])
        for hop in (b"x-hop-secret", b"keep-alive", b"proxy-authorization", b"te"):
            self.assertNotIn(hop, seen.names())
        self.assertEqual(seen.header(b"x-repeat"), [b"one", b"two"])

    def test_connection_cannot_strip_proxy_headers(self) -> defer.Deferred[None]:
        """Headers a client lists in Connection go, but what the proxy sets is still set."""
        return run(self._connection_cannot_strip_proxy_headers())

    async def _connection_cannot_strip_proxy_headers(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        listed = (
            b"x-forwarded-for, cookie, host, x-forwarded-host, x-forwarded-proto, "
            b"x-arvados-authorization, x-arvados-target-uuid, x-arvados-request-host"
        )
        headers = chain.headers(
            cookie=False,
            cookie_=[chain.cluster.cookie() + b"; kept=no"],
            connection=[listed],
            x_forwarded_for=[b"203.0.113.9"],
        )
        response, body = await chain.client.fetch(b"GET", chain.url(b"/c"), headers)
        self.assertEqual(response.code, 200, body)
        [seen] = chain.service.received
        self.assertEqual(seen.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(seen.header(b"x-forwarded-host"), [chain.vhost])
        self.assertEqual(seen.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(seen.header(b"host"), [chain.vhost])
        # The client asked for its Cookie header to stop at the first hop.
        self.assertEqual(seen.header(b"cookie"), [])


class TokenLeakTests(unittest.TestCase):
    """The user's token never reaches the container and never appears in logs or pages."""

    def test_token_never_leaks(self) -> defer.Deferred[None]:
        """The token is in no log, no response body, and nothing the service receives."""
        return run(self._token_never_leaks())

    async def _token_never_leaks(self) -> None:
        chain = await e2e.start_chain(self, reactor, controller_args=["--access-log"])
        cluster = chain.cluster
        token = cluster.token
        quoted = quote(token, safe="").encode()
        bodies = []

        response, body = await chain.client.fetch(
            b"GET", chain.url(b"/p?arvados_api_token=" + quoted), chain.headers(cookie=False)
        )
        self.assertEqual(response.code, 303)
        bodies.append(body)
        referer = b"http://" + chain.vhost + b"/from?a=1&arvados_api_token=" + quoted + b"&b=2"
        requests: list[tuple[bytes, bytes, dict[str, Any]]] = [
            (b"GET", b"/p", {"referer": [referer]}),
            (b"POST", b"/p?arvados_api_token=" + quoted, {}),
            (
                b"GET",
                b"/q?z=1",
                {"referer": [b"http://elsewhere.example/?arvados_api_token=" + quoted]},
            ),
        ]
        for method, path, extra in requests:
            response, body = await chain.client.fetch(
                method,
                chain.url(path),
                chain.headers(**extra),
                b"data" if method == b"POST" else None,
            )
            bodies.append(body)
        # A bad token in a cookie: refused, and the refusal must not repeat it.
        headers = chain.headers(
            cookie=False,
            cookie_=[
                policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(token.encode() + b"x")
            ],
        )
        response, body = await chain.client.fetch(b"GET", chain.url(b"/p"), headers)
        self.assertEqual(response.code, 401)
        bodies.append(body)

        self.assertEqual([r.uri for r in chain.service.received], [b"/p", b"/q?z=1"])
        referers = [r.header(b"referer") for r in chain.service.received]
        self.assertEqual(
            referers,
            [[b"http://" + chain.vhost + b"/from?a=1&b=2"], [b"http://elsewhere.example/"]],
        )

        await chain.gateway.stop(reactor)
        await chain.controller.stop(reactor)
        logs = {p.name: p.log_text() for p in (chain.controller, chain.gateway)}
        # The access log is on, so paths were logged (and a leak could have shown).
        self.assertIn("/q", logs["controller"])
        forms = [
            cluster.token_secret.encode(),
            policy.encode_token_cookie(token.encode()),
            quoted,
        ]
        seen_by_service = b"\n".join(
            json.dumps(r.as_json()).encode() + r.body_prefix for r in chain.service.received
        )
        places = {"service": seen_by_service, "responses": b"\n".join(bodies)}
        places.update({name: text.encode() for name, text in logs.items()})
        for name, text in places.items():
            for form in forms:
                self.assertNotIn(form, text, f"the token appears in {name}")


class GatewayAuthenticationTests(unittest.TestCase):
    """Requests sent straight to the gateway's TLS port, as captured or forged ones would be."""

    def test_replay_and_forgery(self) -> defer.Deferred[None]:
        """Only a fresh request signed for this container and naming it reaches the service."""
        return run(self._replay_and_forgery())

    async def _replay_and_forgery(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        cluster = chain.cluster
        other = cluster.store.create_container_request(cluster.user.uuid, name="other")
        assert other.container_uuid is not None
        direct = e2e.Client(reactor, secret=cluster.secret)
        self.addCleanup(direct.close)
        address = cluster.gateway_address().encode()
        url = b"https://127.0.0.1:%d/direct" % (chain.gateway_port,)

        def headers(secret: str, at: float, **changes: bytes | None) -> Headers:
            """The front door's headers with C{changes}, signed with C{secret} at C{at}."""
            values = {
                b"host": address,
                policy.TARGET_UUID: cluster.container_uuid.encode(),
                policy.TARGET_PORT: b"%d" % (cluster.port,),
                policy.REQUEST_HOST: chain.vhost,
            }
            for name, value in changes.items():
                key = name.replace("_", "-").encode()
                if value is None:
                    del values[key]
                else:
                    values[key] = value
            result = Headers({k: [v] for k, v in values.items()})
            binding = policy.request_binding(b"GET", b"/direct", result)
            result.setRawHeaders(
                policy.SIGNATURE, [policy.sign(secret, at, binding=binding).encode()]
            )
            return result

        now = time.time()
        signed = headers(cluster.secret, now)
        cases = [
            ("fresh", signed, 200),
            ("replayed", signed, 401),
            ("stale", headers(cluster.secret, now - 1000), 401),
            (
                "another container's secret",
                headers(policy.gateway_secret(e2e.ROOT_TOKEN, other.container_uuid), now),
                401,
            ),
            (
                "another container's target",
                headers(cluster.secret, now, x_arvados_target_uuid=other.container_uuid.encode()),
                502,
            ),
            (
                "no request host",
                headers(cluster.secret, now, x_arvados_request_host=None),
                502,
            ),
        ]
        for name, request_headers, status in cases:
            before = len(chain.service.received)
            response, body = await direct.fetch(b"GET", url, request_headers)
            self.assertEqual((name, response.code), (name, status), body)
            if status == 200:
                self.assertEqual(len(chain.service.received), before + 1, name)
                self.assertIsNone(response.headers.getRawHeaders(policy.GATEWAY_ERROR))
            else:
                self.assertEqual(len(chain.service.received), before, name)
                self.assertTrue(response.headers.getRawHeaders(policy.GATEWAY_ERROR), name)

    def test_impostor_gateway(self) -> defer.Deferred[None]:
        """A gateway address leading to a server without the container's key gets nothing: 502."""
        return run(self._impostor_gateway())

    async def _impostor_gateway(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        impostor = e2e.ServiceSite(reactor)
        other_secret = policy.gateway_secret(e2e.ROOT_TOKEN, "zzzzz-dz642-imp0st0r0000000")
        port = impostor.listen(reactor, tls=server_context_factory(other_secret, ["127.0.0.1"]))
        self.addCleanup(impostor.stop, reactor)
        chain.cluster.store.update_container(
            chain.cluster.container_uuid, gateway_address=f"127.0.0.1:{port}"
        )
        response, body = await chain.get(b"/secret-page")
        self.assertEqual(response.code, 502, body)
        self.assertEqual(impostor.received, [])
        self.assertEqual(chain.service.received, [])


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: %s\r\nCookie: %s\r\n\r\n"


class SmugglingTests(unittest.TestCase):
    """Ambiguous framing sent as raw bytes to the controller."""

    def test_smuggling_shapes(self) -> defer.Deferred[None]:
        """Each shape gets a 400 or single requests; no smuggled request reaches the service."""
        return run(self._smuggling_shapes())

    async def _smuggling_shapes(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        host = chain.vhost
        cookie = chain.cluster.cookie()
        inner = SMUGGLED % (host, cookie)
        chunked_inner = b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner)

        def head(*lines: bytes, auth: bool = True) -> bytes:
            fixed = [b"POST /outer HTTP/1.1", b"Host: " + host]
            if auth:
                fixed.append(b"Cookie: " + cookie)
            return b"\r\n".join(fixed + list(lines)) + b"\r\n\r\n"

        body_cl = b"0\r\n\r\n" + inner
        sentinel = (
            b"GET /sentinel HTTP/1.1\r\nHost: %s\r\nCookie: %s\r\nConnection: close\r\n\r\n"
            % (
                host,
                cookie,
            )
        )
        # (name, bytes to send, bytes to send once a response has begun, acceptable statuses)
        cases = [
            (
                "CL and TE",
                head(b"Content-Length: %d" % len(body_cl), b"Transfer-Encoding: chunked") + body_cl,
                b"",
                [[400]],
            ),
            (
                "two Content-Lengths",
                head(b"Content-Length: 0", b"Content-Length: %d" % len(inner)) + inner,
                b"",
                [[400]],
            ),
            ("xchunked", head(b"Transfer-Encoding: xchunked") + chunked_inner, b"", [[501]]),
            ("two Hosts", head(b"Host: other.example", b"Content-Length: 0"), b"", [[400]]),
            (
                "a coding before chunked",
                head(b"Transfer-Encoding: gzip, chunked") + chunked_inner,
                b"",
                [[501]],
            ),
            (
                "a request in the body",
                head(b"Content-Length: %d" % len(inner), b"Connection: close") + inner,
                b"",
                [[200]],
            ),
            (
                "a request in a chunked body",
                head(b"Transfer-Encoding: chunked", b"Connection: close") + chunked_inner,
                b"",
                [[200]],
            ),
            (
                "a request in the body of a refused request",
                head(b"Content-Length: %d" % len(inner), auth=False) + inner + sentinel,
                b"",
                # Closed after the refusal, or the body skipped and the next request served.
                [[401], [401, 200]],
            ),
            (
                "a request in the rest of a refused request's body",
                head(b"Content-Length: %d" % (len(inner) + 10), auth=False) + b"x" * 10,
                inner + sentinel,
                [[401], [401, 200]],
            ),
        ]
        for name, data, then, statuses in cases:
            raw = await e2e.raw_exchange(reactor, chain.controller_port, data, then)
            codes = e2e.status_codes(raw)
            self.assertIn(codes, statuses, (name, raw, chain.service.uris()))

        # Anything still in flight would reach the service before this request's answer.
        response, _ = await chain.get(b"/after")
        self.assertEqual(response.code, 200)
        uris = [uri for uri in chain.service.uris() if uri != b"/sentinel"]
        self.assertEqual(uris, [b"/outer", b"/outer", b"/after"])
        for seen in chain.service.received[:2]:
            self.assertEqual(seen.body_prefix, inner)


class StreamingTests(unittest.TestCase):
    """1 GiB each way through both hops, with flat memory and nothing spooled to disk."""

    timeout = 150
    MAX_GROWTH = 32 * MiB

    def assertFlat(self, chain: e2e.Chain, watch: e2e.Watch, limit: int) -> None:
        growth = watch.growth()
        self.assertGreater(watch.samples, 5)
        for name, grown in growth.items():
            self.assertLessEqual(
                grown, limit, f"{name} RSS grew by {grown / MiB:.1f} MiB: {watch.peak}"
            )
        for process in (chain.controller, chain.gateway):
            self.assertEqual(watch.temporary.get(process.name, set()), set(), process.name)
            self.assertEqual(os.listdir(process.tmpdir), [], process.name)

    def test_download_1gib(self) -> defer.Deferred[None]:
        """A 1 GiB response arrives whole and intact; neither proxy's memory grows."""
        return run(self._download_1gib())

    async def _download_1gib(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        await self.download(chain, 16 * MiB)
        watch = e2e.Watch([chain.controller, chain.gateway])
        count, sha = await watch.during(reactor, self.download(chain, GiB))
        self.assertEqual(count, GiB)
        self.assertEqual(sha, chain.service.downloads[-1].sha256.hexdigest())
        self.assertFlat(chain, watch, self.MAX_GROWTH)

    async def download(self, chain: e2e.Chain, size: int) -> tuple[int, str]:
        response = await chain.client.request(
            b"GET", chain.url(b"/download/%d" % size), chain.headers()
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, size)
        body = e2e.HashBody()
        response.deliverBody(body)
        return await body.done

    def test_upload_1gib_content_length(self) -> defer.Deferred[None]:
        """A 1 GiB upload with Content-Length arrives whole and intact; memory stays flat."""
        return run(self._upload_1gib(chunked=False))

    def test_upload_1gib_chunked(self) -> defer.Deferred[None]:
        """A 1 GiB chunked upload arrives whole and intact; memory stays flat."""
        return run(self._upload_1gib(chunked=True))

    async def _upload_1gib(self, chunked: bool) -> None:
        chain = await e2e.start_chain(self, reactor)
        await self.upload(chain, 16 * MiB, chunked)
        watch = e2e.Watch([chain.controller, chain.gateway])
        await watch.during(reactor, self.upload(chain, GiB, chunked))
        self.assertFlat(chain, watch, self.MAX_GROWTH)

    async def upload(self, chain: e2e.Chain, size: int, chunked: bool) -> None:
        producer = e2e.PatternBodyProducer(size, chunked=chunked)
        response = await chain.client.request(
            b"PUT", chain.url(b"/upload"), chain.headers(), producer
        )
        body = e2e.Collect()
        response.deliverBody(body)
        echo = json.loads(await body.done)
        self.assertEqual(response.code, 200)
        self.assertEqual(producer.sent, size)
        seen = chain.service.received[-1]
        self.assertEqual(seen.header(b"content-length"), [] if chunked else [b"%d" % size])
        self.assertEqual(echo["body_length"], size)
        self.assertEqual(echo["body_sha256"], producer.sha256.hexdigest())

    def test_slow_reader(self) -> defer.Deferred[None]:
        """A client that stops reading stalls the service instead of filling the proxies' memory."""
        return run(self._slow_reader())

    async def _slow_reader(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        await StreamingTests.download(self, chain, 16 * MiB)
        watch = e2e.Watch([chain.controller, chain.gateway])

        async def stall() -> None:
            response = await chain.client.request(
                b"GET", chain.url(b"/download/%d" % GiB), chain.headers()
            )
            body = e2e.HashBody(pause_after=64 * 1024)
            response.deliverBody(body)
            await body.paused
            await task.deferLater(reactor, 4.0, lambda: None)
            self.slow_sent = chain.service.downloads[-1].sent
            body.abort()
            with self.assertRaises(ResponseFailed):
                await body.done

        await watch.during(reactor, stall())
        self.assertFlat(chain, watch, 16 * MiB)
        # The service was held back by the sockets' buffers, not by the proxies' memory.
        self.assertLess(self.slow_sent, 64 * MiB)
        download = chain.service.downloads[-1]
        finished = await download.finished
        self.assertFalse(finished, "the service's response should be cut off with the client")
        self.assertLess(download.sent, GiB)


def connections_to(port: int) -> int:
    """How many TCP connections on this machine are established to 127.0.0.1:C{port}."""
    remote = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[2] == remote and row[3] == "01")


class CarrierTests(unittest.TestCase):
    """The front door's requests to a gateway ride the streams of one connection."""

    timeout = 60

    def test_requests_share_one_connection(self) -> defer.Deferred[None]:
        """
        Forty requests, twenty of them at once, reach the service over one connection to the
        gateway; an upload larger than a carrier takes gets a connection of its own.
        """
        return run(self._requests_share_one_connection())

    async def _requests_share_one_connection(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        self.assertEqual(connections_to(chain.gateway_port), 0)
        at_once = await defer.gatherResults(
            [defer.ensureDeferred(chain.get(b"/echo?n=%d" % i)) for i in range(20)]
        )
        one_by_one = [await chain.get(b"/echo?n=%d" % i) for i in range(20, 40)]
        for i, (response, body) in enumerate(at_once + one_by_one):
            self.assertEqual(response.code, 200, body)
            self.assertEqual(json.loads(body)["uri"], f"/echo?n={i}")
        self.assertEqual(connections_to(chain.gateway_port), 1)
        await StreamingTests.upload(self, chain, 2 * MiB, chunked=True)  # type: ignore[arg-type]
        self.assertEqual(connections_to(chain.gateway_port), 2)


class ContainerFinishedTests(unittest.TestCase):
    """What a client gets once the container is over."""

    def test_finished_container(self) -> defer.Deferred[None]:
        """Complete or cancelled containers answer 410; a dead gateway of a Running one, 502."""
        return run(self._finished_container())

    async def _finished_container(self) -> None:
        async def mark_complete(chain: e2e.Chain) -> None:
            chain.cluster.store.update_container(
                chain.cluster.container_uuid, state=COMPLETE, exit_code=0
            )

        async def terminate_gateway(chain: e2e.Chain) -> None:
            # twistd re-raises the signal once it has shut down cleanly.
            self.assertIn(await chain.gateway.stop(reactor, "TERM"), (0, -15))

        async def kill_gateway(chain: e2e.Chain) -> None:
            await chain.gateway.stop(reactor, "KILL")

        cases = [
            ("marked Complete", mark_complete, COMPLETE, 410),
            # The gateway's shutdown records that the container was cancelled.
            ("gateway terminated", terminate_gateway, CANCELLED, 410),
            # Nothing can record a SIGKILL: the record still says Running, the address is dead.
            ("gateway killed", kill_gateway, RUNNING, 502),
        ]
        chains = await defer.gatherResults(
            [run(e2e.start_chain(self, reactor)) for _ in cases], consumeErrors=True
        )
        for (name, finish, state, status), chain in zip(cases, chains, strict=True):
            response, _ = await chain.get(b"/before")
            self.assertEqual(response.code, 200, name)
            await finish(chain)
            container = chain.cluster.store.get_container(chain.cluster.container_uuid)
            self.assertEqual(container.state, state, name)
            response, body = await chain.get(b"/after")
            self.assertEqual((name, response.code), (name, status), body)
            self.assertEqual(chain.service.uris(), [b"/before"], name)


class RevocationTests(unittest.TestCase):
    """The controller keeps answers about tokens, but never past a change to the registry."""

    def test_revoked_token_is_refused_at_once(self) -> defer.Deferred[None]:
        """A token revoked in the registry is refused by the next request, not after CacheTTL."""
        return run(self._revoked())

    async def _revoked(self) -> None:
        chain = await e2e.start_chain(self, reactor)
        for path in (b"/one", b"/two"):
            response, _ = await chain.get(path)
            self.assertEqual(response.code, 200)
        chain.cluster.store.revoke_token(chain.cluster.token)
        response, body = await chain.get(b"/after")
        self.assertEqual(response.code, 401, body)
        self.assertEqual(chain.service.uris(), [b"/one", b"/two"])


class StartupTests(unittest.TestCase):
    """The plugins refuse to start without what they need, and say why."""

    def test_refusals(self) -> defer.Deferred[None]:
        """A gateway without a secret or a controller with a broken config exits naming the key."""
        return run(self._refusals())

    async def _refusals(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cluster = e2e.make_cluster(directory, 1)
        self.addCleanup(cluster.store.close)
        config = e2e.write_config(directory, e2e.free_port())
        with open(config) as f:
            good = f.read()
        prefix = "Clusters.zzzzz."

        def broken(name: str, old: str, new: str) -> str:
            path = os.path.join(directory, f"{name}.yml")
            self.assertIn(old, good)
            with open(path, "w") as f:
                f.write(good.replace(old, new))
            return path

        gateway = [
            "crunch-run-gateway",
            "--config",
            config,
            "--container-uuid",
            cluster.container_uuid,
        ]
        cases = [
            ("gateway-no-secret", gateway, e2e.dispatch_json(None), "Env.GatewayAuthSecret"),
            ("gateway-empty-secret", gateway, e2e.dispatch_json(""), "Env.GatewayAuthSecret"),
            (
                "controller-short-root-token",
                ["arv-controller-proxy", "--config", broken("short", e2e.ROOT_TOKEN, "short")],
                None,
                prefix + "SystemRootToken",
            ),
            (
                "controller-no-external-url",
                [
                    "arv-controller-proxy",
                    "--config",
                    broken("nourl", "ExternalURL:", "ExternalURI:"),
                ],
                None,
                prefix + "Services.ContainerWebServices.ExternalURL",
            ),
            (
                "controller-typo",
                ["arv-controller-proxy", "--config", broken("typo", "Registry:", "Registy:")],
                None,
                prefix + "ArvProxy.Registy",
            ),
        ]
        processes = [
            e2e.Twistd.spawn(reactor, directory, name, args, stdin=stdin)
            for name, args, stdin, _ in cases
        ]
        codes = await defer.gatherResults([p.ended for p in processes])
        for (name, _, _, key), process, code in zip(cases, processes, codes, strict=True):
            output = process.output.decode(errors="replace") + process.log_text()
            self.assertNotEqual(code, 0, name)
            self.assertIn(key, output, name)
            self.assertNotIn(e2e.ROOT_TOKEN, output, name)
