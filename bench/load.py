"""
The load each test puts on a target, and what it reads back.

  - L{wrk}: closed-loop small-request throughput (C{wrk -t1 -c32}), with the CPU time each proxy
    process spent per request (from /proc: steadier than req/s on a shared 2-core box);
  - L{fixed_rate}: latency at a fixed rate (200 req/s) from one keep-alive connection, open loop:
    each request is due at C{start + i/rate}; when the previous answer came back late, the
    request's latency counts from when it was due (no coordinated omission), otherwise from when
    it was sent (so the probe's own sleep jitter is not charged to the target);
  - L{transfer}: a 1 GiB download or upload with curl while a L{Sampler} records each proxy
    process's peak RSS and any regular file it opens;
  - L{slow_reader}: curl reading a 1 GiB response at 1 MB/s for a bounded time, sampled likewise.
"""

from __future__ import annotations

import re
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.chains import Target
from bench.procs import Proc

MiB = 1024 * 1024


# --- Sampling processes --------------------------------------------------------------------------


class Sampler(threading.Thread):
    """
    Samples the RSS and newly opened regular files of some processes every C{interval} seconds
    until L{stop}.

    @ivar baseline: RSS per process name when the sampler was created.
    @ivar peak: the largest RSS seen per process name.
    @ivar files: regular files seen open that were not open when the sampler was created (the
        registry database, opened at the first request, is not counted as a temporary file).
    @ivar series: C{(seconds since start, {name: rss})} samples.
    """

    def __init__(self, procs: Sequence[Proc], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.procs = list(procs)
        self.interval = interval
        self.baseline = {p.name: p.rss() for p in self.procs}
        self.peak = dict(self.baseline)
        self.files: dict[str, set[str]] = {p.name: set() for p in self.procs}
        self._open_before = {p.name: p.regular_files() for p in self.procs}
        self.series: list[tuple[float, dict[str, int]]] = []
        self.cpu_start = {p.name: p.cpu() for p in self.procs}
        self.cpu: dict[str, float] = {}
        self._stopping = threading.Event()
        self._start_time = time.monotonic()

    def sample(self) -> None:
        now = {p.name: p.rss() for p in self.procs}
        for name, rss in now.items():
            self.peak[name] = max(self.peak[name], rss)
        for p in self.procs:
            self.files[p.name] |= p.regular_files() - self._open_before[p.name]
        self.series.append((time.monotonic() - self._start_time, now))

    def run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stopping.set()
        self.join()
        self.sample()
        self.cpu = {p.name: p.cpu() - self.cpu_start[p.name] for p in self.procs}

    def growth(self) -> dict[str, int]:
        return {name: self.peak[name] - self.baseline[name] for name in self.baseline}

    def rss_at(self, seconds: float) -> dict[str, int]:
        """The sample nearest to C{seconds} after the start."""
        return min(self.series, key=lambda s: abs(s[0] - seconds))[1]


# --- wrk -----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)


def wrk(target: Target, path: str, seconds: float, connections: int = 32) -> WrkResult:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    for name, value in target.header_lines():
        args += ["-H", f"{name}: {value}"]
    args.append(target.url(path))
    cpu_before = {p.name: p.cpu() for p in target.procs}
    run = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    if run.returncode != 0:
        raise RuntimeError(f"wrk through {target.label} failed: {run.stdout} {run.stderr}")
    out = run.stdout
    cpu_after = {p.name: p.cpu() for p in target.procs}
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    # Anchored: the "+/- Stdev" column of the thread stats can end in "50%" too.
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)\s*$", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)\s*$", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    cpu = {
        name: (cpu_after[name] - cpu_before[name]) / max(requests, 1) * 1e6 for name in cpu_before
    }
    return WrkResult(rps, requests, p50, p99, errors, cpu)


# --- Fixed-rate latency --------------------------------------------------------------------------


@dataclass
class LatencyResult:
    rate: float
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int


class _HttpConnection:
    """One keep-alive HTTP/1.1 connection that reads Content-Length responses."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""

    def exchange(self, request: bytes) -> int:
        """Send C{request}, read the whole response, return its status."""
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.pending:
            self._recv()
        head, self.pending = self.pending.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"response without Content-Length: {head!r}")
        while len(self.pending) < length:
            self._recv()
        self.pending = self.pending[length:]
        return status

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self.pending += data

    def close(self) -> None:
        self.sock.close()


def fixed_rate(target: Target, path: str, rate: float, seconds: float) -> LatencyResult:
    lines = "".join(f"{name}: {value}\r\n" for name, value in target.header_lines())
    request = f"GET {path} HTTP/1.1\r\n{lines}\r\n".encode()
    connection = _HttpConnection(target.port)
    errors = 0
    try:
        for _ in range(200):  # warm up: pools, TLS sessions, caches
            connection.exchange(request)
        latencies = []
        count = int(rate * seconds)
        start = time.perf_counter() + 0.01
        previous_end = 0.0
        for i in range(count):
            due = start + i / rate
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            sent = time.perf_counter()
            try:
                status = connection.exchange(request)
            except (OSError, RuntimeError):
                errors += 1
                connection.close()
                connection = _HttpConnection(target.port)
                continue
            end = time.perf_counter()
            if status != 200:
                errors += 1
            begin = due if previous_end > due else sent
            latencies.append((end - begin) * 1000)
            previous_end = end
    finally:
        connection.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    return LatencyResult(
        rate, len(latencies), statistics.median(latencies), pct(90), pct(99), latencies[-1], errors
    )


# --- Bulk transfers ------------------------------------------------------------------------------


@dataclass
class TransferResult:
    kind: str
    status: int
    size: int
    seconds: float
    growth: dict[str, int]
    peak: dict[str, int]
    files: dict[str, set[str]]
    cpu: dict[str, float]

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6 if self.seconds else 0.0


def _curl_headers(target: Target) -> list[str]:
    args = []
    for name, value in target.header_lines():
        args += ["-H", f"{name}: {value}"]
    return args


def transfer(target: Target, kind: str, big_file: str) -> TransferResult:
    """Download C{/big} or upload C{big_file} to C{/upload} (PUT, Content-Length, no Expect)."""
    base = ["curl", "-sS", "--max-time", "600", *_curl_headers(target)]
    if kind == "download":
        args = [*base, "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}"]
        args.append(target.url("/big"))
    else:
        args = [*base, "-H", "Expect:", "-T", big_file, "-o", "/dev/null"]
        args += ["-w", "%{http_code} %{size_upload} %{time_total}", target.url("/upload")]
    sampler = Sampler(target.procs)
    sampler.start()
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=700)
    finally:
        sampler.stop()
    if out.returncode != 0:
        raise RuntimeError(f"curl {kind} through {target.label} failed: {out.stderr.strip()}")
    status, size, seconds = out.stdout.split()
    return TransferResult(
        kind,
        int(status),
        int(size),
        float(seconds),
        sampler.growth(),
        sampler.peak,
        sampler.files,
        sampler.cpu,
    )


@dataclass
class SlowReaderResult:
    seconds: float
    received: int
    growth: dict[str, int]
    late_growth: dict[str, int]
    files: dict[str, set[str]]


def slow_reader(target: Target, seconds: float, rate: str = "1M") -> SlowReaderResult:
    """
    Read C{/big} at C{rate} bytes per second for C{seconds}, then hang up.

    @ivar late_growth: RSS at the end minus RSS a third of the way in, per process: the trend
        once buffers have filled (zero means the rest of the 1 GiB would cost nothing more).
    """
    args = [
        "curl",
        "-sS",
        "--limit-rate",
        rate,
        "--max-time",
        f"{seconds:g}",
        *_curl_headers(target),
    ]
    args += ["-o", "/dev/null", "-w", "%{size_download}", target.url("/big")]
    sampler = Sampler(target.procs, interval=0.1)
    sampler.start()
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    finally:
        sampler.stop()
    if out.returncode not in (0, 28):  # 28: the time limit, which is the point
        raise RuntimeError(f"slow reader through {target.label} failed: {out.stderr.strip()}")
    end = sampler.series[-1][1]
    early = sampler.rss_at(seconds / 3)
    late = {name: end[name] - early[name] for name in end}
    return SlowReaderResult(
        seconds, int(out.stdout.strip() or 0), sampler.growth(), late, sampler.files
    )
