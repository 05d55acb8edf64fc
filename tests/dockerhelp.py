"""
What the tests that use a real Docker engine share: the engine check (skip with the fix, or fail
under CI), the locally built test image, and a container command that listens on chosen ports
and exits when told to.
"""

from __future__ import annotations

import functools
import os
import subprocess
from typing import Any

from twisted.trial import unittest

import arvproxy

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(arvproxy.__file__)))
TEST_IMAGE = "arvproxy-test/busybox:1"
HELLO = b"hello from arvproxy-test\n"
EXIT_FILE = "/tmp/exit"


@functools.lru_cache(maxsize=1)
def _engine_problem() -> str | None:
    from arvproxy.gateway.docker_runtime import engine_status

    problem = engine_status()
    if problem is not None:
        return problem
    result = subprocess.run(
        [os.path.join(SOURCE_ROOT, "scripts", "build-test-image"), TEST_IMAGE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        return f"cannot build the test image {TEST_IMAGE}: {result.stderr.strip()}"
    return None


def require_docker() -> None:
    """
    Skip the calling test when no Docker engine answers, saying how to start one; under CI
    (C{CI=true}) fail instead, so a broken engine never passes for green.
    """
    problem = _engine_problem()
    if problem is None:
        return
    message = f"{problem} (`make test` runs scripts/ensure-docker first)"
    if os.environ.get("CI", "").lower() == "true":
        raise unittest.FailTest(f"CI=true and the Docker tests cannot run: {message}")
    raise unittest.SkipTest(message)


def client() -> Any:
    from arvproxy.gateway.docker_runtime import default_client

    return default_client()


def serve_command(ports: list[int]) -> list[str]:
    """
    Serve the image's /www with busybox httpd on 127.0.0.1:<port> for each of C{ports}, then
    wait until L{EXIT_FILE} appears and exit with the code written in it.
    """
    servers = "".join(f"httpd -p 127.0.0.1:{port} -h /www; " for port in ports)
    wait = f"while [ ! -e {EXIT_FILE} ]; do sleep 0.1; done; exit $(cat {EXIT_FILE})"
    return ["sh", "-c", servers + wait]


def tell_exit(container: Any, code: int) -> None:
    """Make a container running L{serve_command} exit with C{code} (blocking)."""
    result = container.exec_run(
        ["sh", "-c", f"echo {code} > {EXIT_FILE}.new && mv {EXIT_FILE}.new {EXIT_FILE}"]
    )
    if result.exit_code != 0:
        raise RuntimeError(f"cannot tell the container to exit: {result.output!r}")


def remove_labelled(label: str, value: str) -> None:
    """Remove every container labelled C{label=value} (test clean-up; blocking)."""
    docker_client = client()
    for container in docker_client.containers.list(all=True, filters={"label": f"{label}={value}"}):
        container.remove(force=True)
