"""
Deadlines for the front door's steps towards a gateway that TCP's connect timeout does not
cover (issue 16, hole 9): a gateway that accepts connections and then says nothing (stopped
with SIGSTOP, overloaded, or something else listening at its address) must cost a client a
504 after a while, not an endless wait.

  - the TLS handshake (L{tls_with_deadline}, C{ArvProxy.Timeouts.TLSHandshake});
  - a new carrier's handshake, its C{101} (C{CarrierHandshake}: L{arvproxy.upgrade});
  - the head of each answer, once the whole request has been sent (C{ResponseHeaders}:
    L{arvproxy.hopclient.HopPool}, and L{arvproxy.upgrade} for a WebSocket's C{101}).

Each deadline ends with the step it guards: a long body or an open WebSocket is never cut by
one.  A step that misses its deadline fails with L{DeadlinePassed}, which the front door turns
into a 504 naming the step.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as net_error
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

TLS_HANDSHAKE = "the TLS handshake"
CARRIER_HANDSHAKE = "the carrier handshake"
ANSWER_HEAD = "the answer's head"


class DeadlinePassed(net_error.TimeoutError):
    """
    A step towards the next hop did not finish within its deadline.

    @ivar step: which (L{TLS_HANDSHAKE}, L{CARRIER_HANDSHAKE} or L{ANSWER_HEAD}).
    @ivar seconds: the deadline.
    """

    def __init__(self, step: str, seconds: float) -> None:
        super().__init__()
        self.step = step
        self.seconds = seconds

    def __str__(self) -> str:
        return f"{self.step} did not finish within {self.seconds:g} s"


def deadline_of(error: BaseException) -> DeadlinePassed | None:
    """
    The deadline that C{error} comes from: C{error} itself, or one of the reasons a Twisted
    client error (C{ResponseNeverReceived} and the like) carries; C{None} when none does.
    """
    if isinstance(error, DeadlinePassed):
        return error
    for reason in getattr(error, "reasons", ()):
        if isinstance(reason.value, DeadlinePassed):
            return reason.value
    return None


def tls_with_deadline(
    creator: IOpenSSLClientConnectionCreator, endpoint: Any, clock: IReactorTime, timeout: float
) -> Any:
    """
    Like C{wrapClientTLS(creator, endpoint)}, but a connection whose TLS handshake has not
    finished C{timeout} seconds after TCP connected is aborted, and its protocol's
    C{connectionLost} is given L{DeadlinePassed} as the reason.
    """
    return _DeadlineTLSEndpoint(creator, endpoint, clock, timeout)


class _DeadlineTLSEndpoint:
    def __init__(
        self,
        creator: IOpenSSLClientConnectionCreator,
        endpoint: Any,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self._creator = creator
        self._endpoint = endpoint
        self._clock = clock
        self._timeout = timeout

    def connect(self, factory: Any) -> Any:
        tls = _DeadlineTLSFactory(self._creator, factory, self._clock, self._timeout)
        d = self._endpoint.connect(tls)
        # As wrapClientTLS's endpoint does: the caller gets its own protocol.
        return d.addCallback(lambda protocol: protocol.wrappedProtocol)


class _DeadlineTLS(BufferingTLSTransport):
    """
    Twisted's client TLS layer with a deadline on its handshake.  Only the handshake's own
    hooks are extended (C{_checkHandshakeStatus} runs until the handshake is done, never
    after), so a connection pays nothing once it is up.
    """

    factory: _DeadlineTLSFactory
    _deadline: Any = None

    def makeConnection(self, transport: Any) -> None:
        self._deadline = self.factory.deadline_clock.callLater(
            self.factory.handshake_timeout, self._handshake_late
        )
        super().makeConnection(transport)

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()
        if self._handshakeDone:
            self._stop_deadline()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _handshake_late(self) -> None:
        self._deadline = None
        if not self._handshakeDone and not self._lostTLSConnection:
            # Twisted's own way to end a handshake with a reason its protocol is given.
            self.failVerification(
                Failure(DeadlinePassed(TLS_HANDSHAKE, self.factory.handshake_timeout))
            )


class _DeadlineTLSFactory(TLSMemoryBIOFactory):
    protocol = _DeadlineTLS

    def __init__(
        self, creator: IOpenSSLClientConnectionCreator, wrapped: Any, clock: Any, timeout: float
    ) -> None:
        super().__init__(creator, True, wrapped, clock=clock)
        self.deadline_clock = clock
        self.handshake_timeout = timeout
