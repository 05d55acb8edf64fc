"""
The backend service and the four ways the benchmark reaches it, all on 127.0.0.1:

  - C{direct}: the backend itself;
  - C{arvproxy}: C{twistd arv-controller-proxy} → pinned TLS → C{twistd crunch-run-gateway} →
    backend, the real plugins as processes of their own, with an embedded registry, a user, a
    token and a container request set up as the admin CLI would;
  - C{nginx}: an nginx front → TLS (trusting only the gateway's self-signed certificate) → an
    nginx "gateway" → backend: two nginx masters with one worker each, upstream keep-alive,
    C{proxy_buffering off} and C{proxy_request_buffering off} (streaming, like arvproxy);
  - C{http-proxy}: the same two hops from node's C{http-proxy} (bench/node/chain.js).

The backend is one nginx (one worker, sendfile) serving C{/small} (a 68-byte file) and C{/big}
(a sparse 1 GiB file), and forwarding C{/upload} to L{bench.sink}; a WebSocket echo
(L{bench.wsecho}) listens on a second port, published by the same container request.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from arvproxy import config as arvconfig
from arvproxy import policy
from arvproxy.backends import RUNNING
from arvproxy.backends.registry import RegistryStore
from bench.procs import Proc, Processes, free_port, settle, wait_until_accepting

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_DIR = os.path.join(REPO_ROOT, "bench", "node")
CLUSTER_ID = "zzzzz"
ROOT_TOKEN = "benchOnlySystemRootToken" + "0123456789abcdefghijklmnopqrstuvwxyz"
SUFFIX = "containers.localhost"
SMALL_BODY = b"arvproxy bench: a small static response, 68 bytes long, from nginx.\n"
BIG_SIZE = 1 << 30
GATEWAY_NAME = "gateway.invalid"


@dataclass
class Target:
    """
    One way to reach the backend.

    @ivar port: where the client connects (127.0.0.1).
    @ivar host: the C{Host} header to send.
    @ivar cookie: the C{Cookie} header to send (arvproxy's token), or C{None}.
    @ivar procs: the proxy processes of this chain, measured for memory and CPU.
    """

    key: str
    label: str
    port: int
    host: str
    cookie: str | None = None
    procs: list[Proc] = field(default_factory=list)
    ws_host: str = ""

    def header_lines(self, host: str | None = None) -> list[tuple[str, str]]:
        lines = [("Host", host or self.host)]
        if self.cookie:
            lines.append(("Cookie", self.cookie))
        return lines

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class Bed:
    """Everything started: the backend and the targets, keyed by C{Target.key}."""

    directory: str
    backend_port: int
    ws_port: int
    big_file: str
    backend: list[Proc]
    targets: dict[str, Target]
    versions: dict[str, str]


# --- Files ---------------------------------------------------------------------------------------


def write_certificate(directory: str) -> tuple[str, str]:
    """A self-signed P-256 certificate for the nginx and node gateways (like arvproxy's key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GATEWAY_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(GATEWAY_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "gateway.crt")
    key_path = os.path.join(directory, "gateway.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def _nginx_conf(directory: str, name: str, server: str, upstream: str = "") -> str:
    """Write an nginx configuration with one worker and its files under C{directory}/C{name}."""
    prefix = os.path.join(directory, name)
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    user = "user root root;\n" if os.geteuid() == 0 else ""
    text = f"""{user}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    default_type application/octet-stream;
    {upstream}
    server {{
        {server}
    }}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


# Shared by both nginx proxy hops: stream both ways, reuse upstream connections.
_NGINX_PROXY = """
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            client_max_body_size 0;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
"""


def _start_nginx(procs: Processes, name: str, conf: str, port: int) -> Proc:
    proc = procs.start(name, ["nginx", "-e", "stderr", "-p", os.path.dirname(conf), "-c", conf])
    wait_until_accepting(port, [proc], name)
    settle(proc)
    return proc


# --- The backend ---------------------------------------------------------------------------------


def start_backend(
    procs: Processes, directory: str, big_size: int = BIG_SIZE
) -> tuple[int, int, str, list[Proc]]:
    www = os.path.join(directory, "www")
    os.makedirs(www)
    with open(os.path.join(www, "small"), "wb") as f:
        f.write(SMALL_BODY)
    big = os.path.join(www, "big")
    with open(big, "wb") as f:
        f.truncate(big_size)
    port, sink_port, ws_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    sink = procs.start("backend sink", [sys.executable, "-m", "bench.sink", str(sink_port)], env)
    echo = procs.start("backend wsecho", [sys.executable, "-m", "bench.wsecho", str(ws_port)], env)
    wait_until_accepting(sink_port, [sink], "the upload sink")
    wait_until_accepting(ws_port, [echo], "the WebSocket echo")
    upstream = f"upstream sink {{ server 127.0.0.1:{sink_port}; keepalive 16; }}"
    server = f"""listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = /small {{ }}
        location = /big {{ }}
        location = /upload {{
            proxy_pass http://sink;{_NGINX_PROXY}
        }}"""
    conf = _nginx_conf(directory, "backend", server, upstream)
    nginx = _start_nginx(procs, "backend nginx", conf, port)
    return port, ws_port, big, [nginx, sink, echo]


# --- The chains ----------------------------------------------------------------------------------


def start_nginx_chain(
    procs: Processes, directory: str, backend_port: int, cert: str, key: str
) -> Target:
    front_port, gateway_port = free_port(), free_port()
    gateway_conf = _nginx_conf(
        directory,
        "nginx-gateway",
        f"""listen 127.0.0.1:{gateway_port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_cache shared:gw:1m;
        location / {{
            proxy_pass http://service;{_NGINX_PROXY}
        }}""",
        f"upstream service {{ server 127.0.0.1:{backend_port}; keepalive 64; "
        "keepalive_requests 1000000; }",
    )
    front_conf = _nginx_conf(
        directory,
        "nginx-front",
        f"""listen 127.0.0.1:{front_port} backlog=4096;
        location / {{
            proxy_pass https://gateway;{_NGINX_PROXY}
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {cert};
            proxy_ssl_name {GATEWAY_NAME};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}""",
        f"upstream gateway {{ server 127.0.0.1:{gateway_port}; keepalive 64; "
        "keepalive_requests 1000000; }",
    )
    gateway = _start_nginx(procs, "nginx gateway", gateway_conf, gateway_port)
    front = _start_nginx(procs, "nginx front", front_conf, front_port)
    return Target(
        "nginx", "Nginx chain", front_port, f"127.0.0.1:{front_port}", procs=[front, gateway]
    )


def start_node_chain(procs: Processes, backend_port: int, cert: str, key: str) -> Target:
    front_port, gateway_port = free_port(), free_port()
    script = os.path.join(NODE_DIR, "chain.js")
    node = shutil.which("node") or "node"
    gateway = procs.start(
        "http-proxy gateway",
        [node, script, "gateway", str(gateway_port), str(backend_port), cert, key],
    )
    front = procs.start(
        "http-proxy front", [node, script, "front", str(front_port), str(gateway_port), cert]
    )
    wait_until_accepting(gateway_port, [gateway], "the http-proxy gateway")
    wait_until_accepting(front_port, [front], "the http-proxy front")
    for proc in (front, gateway):
        settle(proc)
    return Target(
        "http-proxy",
        "http-proxy chain",
        front_port,
        f"127.0.0.1:{front_port}",
        procs=[front, gateway],
    )


def write_arvproxy_config(directory: str, port: int) -> str:
    own: dict[str, object] = {"Backend": "embedded", "Registry": "registry.sqlite"}
    if "Limits" in getattr(arvconfig, "ARVPROXY_KEYS", ()):
        # The default (1000 requests and tunnels per container) would refuse most of the 10,000
        # idle WebSockets, which all go to one container here.
        own["Limits"] = {"MaxConnectionsPerContainer": 100000}
    document = {
        "Clusters": {
            CLUSTER_ID: {
                "SystemRootToken": ROOT_TOKEN,
                "Services": {
                    "ContainerWebServices": {
                        "ExternalURL": f"http://*.{SUFFIX}:{port}",
                        "InternalURLs": {f"http://127.0.0.1:{port}": {}},
                    }
                },
                "ArvProxy": own,
            }
        }
    }
    path = os.path.join(directory, "config.yml")
    with open(path, "w") as f:
        yaml.safe_dump(document, f)
    return path


def start_arvproxy_chain(
    procs: Processes, directory: str, backend_port: int, ws_port: int
) -> Target:
    """The real plugins, each a C{twistd -n} process, with default settings (access log off)."""
    home = os.path.join(directory, "arvproxy")
    os.makedirs(home)
    store = RegistryStore(
        os.path.join(home, "registry.sqlite"), CLUSTER_ID, system_root_token=ROOT_TOKEN
    )
    try:
        user = store.create_user("Bench User")
        token, _ = store.create_token(user.uuid)
        request = store.create_container_request(
            user.uuid,
            name="bench",
            published_ports={backend_port: {"access": "private"}, ws_port: {"access": "private"}},
        )
        container_uuid = request.container_uuid
        assert container_uuid is not None
        port = free_port()
        config = write_arvproxy_config(home, port)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")

        def spawn(name: str, args: list[str], stdin: bytes | None = None) -> Proc:
            tmp = os.path.join(home, f"{name}-tmp")
            os.makedirs(tmp)
            env = dict(os.environ, PYTHONPATH=REPO_ROOT, TMPDIR=tmp, PYTHONUNBUFFERED="1")
            log = os.path.join(home, f"{name}.log")
            command = [sys.executable, twistd, "-n", "--pidfile=", "-l", log, *args]
            return procs.start(f"arvproxy {name}", command, env, home, stdin)

        controller = spawn("controller", ["arv-controller-proxy", "--config", config])
        secret = policy.gateway_secret(ROOT_TOKEN, container_uuid)
        dispatch = {"Env": {"GatewayAddress": "127.0.0.1:0", "GatewayAuthSecret": secret}}
        gateway = spawn(
            "gateway",
            ["crunch-run-gateway", "--config", config, "--container-uuid", container_uuid],
            json.dumps(dispatch).encode() + b"\n",
        )
        wait_until_accepting(port, [controller, gateway], "the arvproxy controller")
        deadline = time.monotonic() + 30
        while True:
            container = store.get_container(container_uuid)
            if container.state == RUNNING and container.gateway_address:
                break
            if not gateway.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the arvproxy gateway did not start:\n{gateway.log_tail()}")
            time.sleep(0.05)
    finally:
        store.close()
    for proc in (controller, gateway):
        settle(proc)
    cookie = (policy.TOKEN_COOKIE + b"=" + policy.encode_token_cookie(token.encode())).decode()
    return Target(
        "arvproxy",
        "arvproxy chain",
        port,
        f"{request.uuid}-{backend_port}.{SUFFIX}:{port}",
        cookie=cookie,
        procs=[controller, gateway],
        ws_host=f"{request.uuid}-{ws_port}.{SUFFIX}:{port}",
    )


def start_all(procs: Processes, directory: str, big_size: int = BIG_SIZE) -> Bed:
    os.chmod(directory, 0o755)
    backend_port, ws_port, big, backend = start_backend(procs, directory, big_size)
    cert, key = write_certificate(directory)
    direct = Target("direct", "direct", backend_port, f"127.0.0.1:{backend_port}")
    targets = {
        "direct": direct,
        "arvproxy": start_arvproxy_chain(procs, directory, backend_port, ws_port),
        "nginx": start_nginx_chain(procs, directory, backend_port, cert, key),
        "http-proxy": start_node_chain(procs, backend_port, cert, key),
    }
    return Bed(directory, backend_port, ws_port, big, backend, targets, {})
