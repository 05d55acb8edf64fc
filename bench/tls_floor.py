"""
What one idle TLS connection costs by itself, configured exactly as the hops configure theirs
(L{tlsidentity.server_context_factory} on the gateway, L{tlsidentity.client_creator} on the
controller: buffers released when idle).

Each side is measured in a fresh interpreter: C{count} connection pairs complete their handshake
in memory and exchange a few bytes each way; one side of each pair is kept and the other freed,
and the interpreter's RSS growth per kept connection is reported.  This is the floor under the
idle-WebSocket figure while every tunnel has a TLS connection of its own between the hops.

C{python -m bench.tls_floor server|client COUNT} prints the bytes per connection.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

from OpenSSL import SSL

from arvproxy import tlsidentity
from bench.procs import rss_of

SECRET = "ab" * 32
_NO_TLS_PROTOCOL = SimpleNamespace(factory=SimpleNamespace(wrappedFactory=None))


@dataclass
class TLSFloor:
    openssl: str
    count: int
    server: int
    client: int


def _pump(client: SSL.Connection, server: SSL.Connection) -> None:
    """Move bytes between the two in-memory connections until neither has anything to say."""
    for _ in range(20):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        moved = False
        for source, sink in ((client, server), (server, client)):
            try:
                sink.bio_write(source.bio_read(65536))
                moved = True
            except SSL.WantReadError:
                pass
        if not moved:
            return
    raise RuntimeError("the in-memory handshake did not settle")


def _per_connection(keep: str, count: int) -> int:
    server_context = tlsidentity.server_context_factory(SECRET).getContext()
    creator = tlsidentity.client_creator(SECRET)
    kept = []
    gc.collect()
    before = rss_of(os.getpid())
    for _ in range(count):
        server = SSL.Connection(server_context, None)
        # Twisted's ALPN callback asks the TLS protocol for its factory's own protocols.
        server.set_app_data(_NO_TLS_PROTOCOL)
        server.set_accept_state()
        client = creator.clientConnectionForTLS(None)
        _pump(client, server)
        for source, sink in ((client, server), (server, client)):
            source.send(b"x" * 100)
            _pump(client, server)
            if sink.recv(1000) != b"x" * 100:
                raise RuntimeError("the in-memory connection lost bytes")
        kept.append(server if keep == "server" else client)
    gc.collect()
    return (rss_of(os.getpid()) - before) // count


def tls_floor(count: int = 2000) -> TLSFloor:
    """Measure both sides, each in an interpreter of its own."""
    sides = {}
    for side in ("server", "client"):
        out = subprocess.run(
            [sys.executable, "-m", "bench.tls_floor", side, str(count)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        sides[side] = json.loads(out.stdout)
    return TLSFloor(
        openssl=SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        count=count,
        server=sides["server"],
        client=sides["client"],
    )


if __name__ == "__main__":
    print(json.dumps(_per_connection(sys.argv[1], int(sys.argv[2]))))
