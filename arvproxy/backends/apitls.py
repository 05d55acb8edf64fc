"""
Trusting the Arvados API server's certificate, and saying plainly when it is not trusted.

The API server's certificate is checked against the system's CA certificates (OpenSSL's, which
honour C{SSL_CERT_FILE}), or against a file of CA certificates: C{ArvProxy.TLS.CAFile}, else
C{/etc/arvados/ca-certificates.crt} when it exists, the file Arvados' own programs load
(C{sdk/go/arvados/tls_certs.go}).  C{TLS.Insecure} (or a dispatcher's
C{ARVADOS_API_HOST_INSECURE}) skips the check.

When the check fails, the error says which host failed and what to set, instead of a bare
C{ResponseNeverReceived}: L{certificate_problem} recognises the failure, L{UntrustedAPI} carries
the explanation.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from OpenSSL import SSL
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger

from arvproxy.errors import Unavailable
from arvproxy.service import exit_when_stopped

log = Logger()

ARVADOS_CA_FILE = "/etc/arvados/ca-certificates.crt"
"""Where Arvados' own programs look for extra CA certificates (C{tls_certs.go})."""

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class UntrustedAPI(Unavailable):
    """The API server's certificate failed the check: nothing was sent to it."""


def ca_file_for(configured: str) -> str:
    """The CA file to trust: the configured one, else Arvados' own when it exists, else C{""}."""
    if configured:
        return configured
    return ARVADOS_CA_FILE if os.path.isfile(ARVADOS_CA_FILE) else ""


def trust_root_from_file(path: str) -> Any:
    """
    Every certificate in the PEM file at C{path}, as a trust root for
    L{twisted.web.client.BrowserLikePolicyForHTTPS}.

    @raise ValueError: the file holds no certificate (or one that cannot be read).
    @raise OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        blocks = _PEM.findall(f.read())
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ValueError(f"{path}: cannot read a certificate: {e}") from None
    return trustRootFromCertificates(certificates)


def certificate_problem(error: BaseException) -> str | None:
    """
    What was wrong with the server's certificate when C{error} (from Twisted's HTTP client)
    comes from the TLS check, or C{None} for any other failure.
    """
    reasons = [getattr(r, "value", r) for r in getattr(error, "reasons", [])] or [error]
    for reason in reasons:
        if isinstance(reason, SSL.Error) and "certificate verify failed" in str(reason):
            return "certificate verify failed"
        if type(reason).__name__ == "VerificationError":  # service_identity: wrong name
            return "certificate verify failed (it does not name this host)"
    return None


def explain(problem: str, netloc: str, insecure_setting: str, ca_setting: str) -> str:
    """The one sentence an operator needs: which host failed, and what to set."""
    return (
        f"{problem} for {netloc}: set {insecure_setting} (test clusters only) or install the CA "
        f"({ca_setting}, or the system's CA certificates)"
    )


async def check_at_start(reactor: Any, cluster: Any, program: str) -> None:
    """
    Ask the API server once, at start-up (L{ArvadosCluster.probe}): a certificate that fails the
    check stops the process with one plain line and exit status 1 (it cannot fix itself); any
    other failure is logged, and requests get 503 until the server answers.
    """
    try:
        await cluster.probe()
    except UntrustedAPI as e:
        stop_plainly(reactor, f"{program}: error: {e.message}")
    except Exception as e:
        log.warn(
            "The Arvados API server does not answer at start-up ({error}); requests get 503 "
            "until it does",
            error=getattr(e, "message", None) or type(e).__name__,
        )


def stop_plainly(reactor: Any, line: str) -> None:
    """
    Write C{line} to standard error (twistd's log, with C{--logfile}), stop the reactor, and
    exit with status 1.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    exit_when_stopped(reactor)
