"""
Idle WebSockets through the arvproxy chain: open N tunnels (each a real handshake with the token
cookie, answered C{101} by the backend's echo), hold them idle, then check every one still echoes
a message.  Reports the RSS each proxy process gained per tunnel, and how many were lost.

The client is asyncio on raw sockets (one small masked text frame per tunnel at the end); client
sockets are spread over several loopback source addresses (127.0.0.2, 127.0.0.3, ...) so
ephemeral ports never run out.
"""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.chains import Target
from bench.procs import Proc

SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]


@dataclass
class IdleResult:
    wanted: int
    opened: int
    failed_to_open: int
    echoed: int
    dropped: int
    hold_seconds: float
    open_seconds: float
    before: dict[str, int]
    held: dict[str, int]
    peak: dict[str, int]
    after_close: dict[str, int]
    first_error: str = ""

    def per_tunnel(self) -> dict[str, float]:
        """Bytes of RSS per open tunnel, per process (at the end of the hold)."""
        return {
            name: (self.held[name] - self.before[name]) / max(self.opened, 1)
            for name in self.before
        }


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's (and so its children's) open-file limit; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(wanted, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(wanted, limit)), limit))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _handshake(target: Target, index: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET /ws/{index} HTTP/1.1",
        f"Host: {target.ws_host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if target.cookie:
        lines.append(f"Cookie: {target.cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


async def _open(target: Target, index: int, limit: asyncio.Semaphore) -> tuple:
    async with limit:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", target.port, local_addr=(SOURCES[index % len(SOURCES)], 0)
            ),
            30,
        )
        writer.write(_handshake(target, index))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        return reader, writer


async def _echo(pair: tuple, index: int, limit: asyncio.Semaphore) -> bool:
    reader, writer = pair
    payload = b"still here %d" % index
    async with limit:
        try:
            writer.write(_text_frame(payload))
            header = await asyncio.wait_for(reader.readexactly(2), 30)
            length = header[1] & 0x7F
            body = await asyncio.wait_for(reader.readexactly(length), 30)
            return header[0] == 0x81 and body == payload
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return False


def _rss(procs: Sequence[Proc]) -> dict[str, int]:
    return {p.name: p.rss() for p in procs}


async def _run(target: Target, count: int, hold: float, report: bool) -> IdleResult:
    procs = target.procs
    before = _rss(procs)
    started = time.monotonic()
    limit = asyncio.Semaphore(64)
    results = await asyncio.gather(
        *(_open(target, i, limit) for i in range(count)), return_exceptions=True
    )
    open_seconds = time.monotonic() - started
    pairs = [r for r in results if isinstance(r, tuple)]
    errors = [r for r in results if not isinstance(r, tuple)]
    if report:
        print(
            f"    {len(pairs)} tunnels open in {open_seconds:.1f}s; holding {hold:g}s", flush=True
        )
    peak = _rss(procs)
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        now = _rss(procs)
        peak = {name: max(peak[name], now[name]) for name in peak}
    held = _rss(procs)
    echo_limit = asyncio.Semaphore(256)
    echoed = await asyncio.gather(*(_echo(p, i, echo_limit) for i, p in enumerate(pairs)))
    for _, writer in pairs:
        writer.close()
    await asyncio.sleep(3)
    after_close = _rss(procs)
    return IdleResult(
        wanted=count,
        opened=len(pairs),
        failed_to_open=len(errors),
        echoed=sum(echoed),
        dropped=len(pairs) - sum(echoed),
        hold_seconds=hold,
        open_seconds=open_seconds,
        before=before,
        held=held,
        peak=peak,
        after_close=after_close,
        first_error=repr(errors[0]) if errors else "",
    )


def idle_websockets(target: Target, count: int, hold: float, report: bool = True) -> IdleResult:
    return asyncio.run(_run(target, count, hold, report))
