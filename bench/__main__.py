"""
C{python -m bench [--quick] [--results FILE] [--only PHASE ...]}: see L{bench}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench import chains, load, report
from bench.idle_ws import idle_websockets, raise_fd_limit
from bench.procs import Processes
from bench.tls_floor import tls_floor

PHASES = ("small", "latency", "bulk", "slow", "websockets")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about a minute)")
    parser.add_argument("--only", nargs="+", choices=PHASES, help="run only these phases")
    parser.add_argument(
        "--results",
        help="write the Markdown results here (default: bench/RESULTS.md for a full run, "
        "nothing for --quick)",
    )
    parser.add_argument("--websockets", type=int, help="idle WebSockets to open (10000)")
    parser.add_argument("--hold", type=float, help="seconds to hold them (60)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "connections": 32,
        "wrk_seconds": 3 if quick else 8,
        "rounds": 1 if quick else 3,
        "rate": 200.0,
        "latency_seconds": 3 if quick else 10,
        "big_size": (128 if quick else 1024) * 1024 * 1024,
        "bulk_rounds": 1 if quick else 3,
        "slow_seconds": 6 if quick else 25,
        "websockets": args.websockets or (300 if quick else 10_000),
        "hold": args.hold if args.hold is not None else (5 if quick else 60),
    }


def check_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk", "curl", "node") if shutil.which(tool) is None]
    if not os.path.exists(os.path.join(HERE, "node", "node_modules", "http-proxy")):
        missing.append("http-proxy (npm)")
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}: run scripts/ensure-bench-tools (as root)")


def sanity(bed: chains.Bed) -> None:
    """Every target answers GET /small with the backend's body before anything is measured."""
    for target in bed.targets.values():
        with socket.create_connection(("127.0.0.1", target.port), timeout=10) as s:
            lines = "".join(f"{n}: {v}\r\n" for n, v in target.header_lines())
            s.sendall(f"GET /small HTTP/1.1\r\n{lines}Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        if not data.startswith(b"HTTP/1.1 200") or not data.endswith(chains.SMALL_BODY):
            raise RuntimeError(f"{target.label} does not serve /small: {data[:300]!r}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def say(text: str) -> None:
    print(text, flush=True)


def attempt(results: report.Results, what: str, work: Callable[[], Any]) -> Any:
    """Run one measurement; a failure is noted (and printed) and the run goes on."""
    try:
        return work()
    except Exception as e:  # noqa: BLE001 - one broken measurement must not lose the others
        results.notes.append(f"{what} failed: {type(e).__name__}: {str(e)[:400]}")
        say(f"  {what} FAILED: {type(e).__name__}: {str(e)[:400]}")
        return None


def run(args: argparse.Namespace, results: report.Results, directory: str) -> None:
    s = results.settings
    phases = set(args.only or PHASES)
    limit = raise_fd_limit(65536)
    # This process holds one socket per tunnel, and so does each process of the chain (the
    # front door its client's, the gateway the service's; tunnels between them share carriers).
    if limit < s["websockets"] + 200:
        fitting = max(100, (limit - 200) // 100 * 100)
        results.notes.append(
            f"the open-file limit here is {limit} (hard limit; raising it needs "
            f"CAP_SYS_RESOURCE), and each process needs a descriptor per tunnel: "
            f"{fitting:,} WebSockets instead of {s['websockets']:,}"
        )
        s["websockets"] = fitting
    procs = Processes(directory)
    try:
        say(f"bench: starting the backend and the chains in {directory}")
        bed = chains.start_all(procs, directory, s["big_size"])
        sanity(bed)
        targets = [bed.targets[k] for k in report.ORDER]
        results.procs = {t.key: [p.name for p in t.procs] for t in targets}

        if "small" in phases:
            say(f"bench: small requests, {s['rounds']} round(s) of {s['wrk_seconds']}s per chain")
            for round_ in range(s["rounds"]):
                order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
                for t in order:
                    r = attempt(
                        results,
                        f"wrk through {t.label}",
                        lambda t=t: load.wrk(t, "/small", s["wrk_seconds"], s["connections"]),
                    )
                    if r is not None:
                        results.wrk.setdefault(t.key, []).append(r)
                        say(f"  {t.label:18} {r.rps:9,.0f} req/s  errors {r.errors}")

        if "latency" in phases:
            say(f"bench: latency at {s['rate']:g} req/s for {s['latency_seconds']}s per chain")
            for t in targets:
                r = attempt(
                    results,
                    f"latency through {t.label}",
                    lambda t=t: load.fixed_rate(t, "/small", s["rate"], s["latency_seconds"]),
                )
                if r is not None:
                    results.latency[t.key] = r
                    say(
                        f"  {t.label:18} p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  "
                        f"errors {r.errors}"
                    )

        if "bulk" in phases:
            say(
                f"bench: {s['big_size'] >> 20} MiB download and upload, "
                f"{s['bulk_rounds']} round(s) per chain"
            )
            # Interleaved like the small requests: one transfer varies by ±15% here, more than
            # the margin a target is judged by.
            for round_ in range(s["bulk_rounds"]):
                order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
                for kind, store in (("download", results.download), ("upload", results.upload)):
                    for t in order:
                        r = attempt(
                            results,
                            f"{kind} through {t.label}",
                            lambda t=t, kind=kind: load.transfer(t, kind, bed.big_file),
                        )
                        if r is None:
                            continue
                        store.setdefault(t.key, []).append(r)
                        growth = ", ".join(f"{v / 2**20:+.1f}" for v in r.growth.values())
                        say(
                            f"  {t.label:18} {kind:8} {r.mb_per_s:7,.0f} MB/s  "
                            f"HTTP {r.status}  RSS growth MiB: {growth or '-'}"
                        )

        if "slow" in phases:
            say(f"bench: slow reader (1 MB/s) for {s['slow_seconds']}s per proxied chain")
            for t in targets[1:]:
                r = attempt(
                    results,
                    f"slow reader through {t.label}",
                    lambda t=t: load.slow_reader(t, s["slow_seconds"]),
                )
                if r is None:
                    continue
                results.slow[t.key] = r
                growth = ", ".join(f"{v / 2**20:+.1f}" for v in r.growth.values())
                say(f"  {t.label:18} read {r.received / 1e6:5.1f} MB  RSS growth MiB: {growth}")

        if "websockets" in phases:
            say(
                f"bench: {s['websockets']:,} idle WebSockets through the arvproxy chain, "
                f"held {s['hold']:g}s"
            )
            results.idle = attempt(
                results,
                "idle WebSockets",
                lambda: idle_websockets(bed.targets["arvproxy"], s["websockets"], s["hold"]),
            )
            if results.idle is not None:
                per = results.idle.per_tunnel()
                say(
                    "  "
                    + ", ".join(f"{n}: {v / 1000:.1f} KB/tunnel" for n, v in per.items())
                    + f"; dropped {results.idle.dropped}, refused {results.idle.failed_to_open}"
                )
            results.tls_floor = attempt(results, "TLS connection floor", tls_floor)
            if results.tls_floor is not None:
                say(
                    f"  one idle TLS connection alone: gateway side "
                    f"{results.tls_floor.server / 1000:.1f} KB, controller side "
                    f"{results.tls_floor.client / 1000:.1f} KB"
                )

        for proc in procs.started:
            if not proc.alive():
                results.notes.append(
                    f"{proc.name} exited during the run (code {proc.popen.returncode})"
                )
    finally:
        say("bench: stopping every process it started")
        procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_tools()

    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so the finally clause stops the processes.
    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    results = report.Results(quick=args.quick, settings=settings(args))
    results.machine = report.machine()
    results.started = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    results.notes.append(f"load average at the start: {load_average()} (nproc {os.cpu_count()})")
    directory = tempfile.mkdtemp(prefix="arvproxy-bench-")
    began = time.monotonic()
    try:
        run(args, results, directory)
    except KeyboardInterrupt:
        say(f"bench: interrupted; every process it started has been stopped (logs: {directory})")
        return 130
    except BaseException:
        say(f"bench: failed; every process it started has been stopped (logs: {directory})")
        raise
    if args.keep:
        say(f"bench: logs kept in {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    results.finished = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    results.notes.append(f"load average at the end: {load_average()}")
    results.notes.append(f"the whole run took {time.monotonic() - began:.0f}s")
    say("")
    say(report.tables(results))
    say(report.verdict_table(results))
    path = args.results or (None if args.quick else os.path.join(HERE, "RESULTS.md"))
    if path:
        with open(path, "w") as f:
            f.write(report.markdown(results))
        say(f"\nbench: results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
