"""
A WebSocket server and client for tests, built on wsproto so that every frame-level detail
(subprotocols, extensions, fragments, pings, close codes) is visible at both ends.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import RemoteProtocolError


class EchoServer(Protocol):
    """
    Echoes every message frame by frame (a fragmented message comes back fragmented alike),
    answers pings, and echoes the close code.  Requests with C{?reject} are refused with 403.
    """

    def __init__(self, factory: EchoFactory) -> None:
        self.factory = factory
        self.ws = WSConnection(ConnectionType.SERVER)

    def dataReceived(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data)
        except RemoteProtocolError:
            # Not a WebSocket handshake: answer as a plain web server would.
            self.factory.plain_requests += 1
            body = b"plain HTTP answer"
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        for event in self.ws.events():
            if isinstance(event, Request):
                self.factory.requests.append(event)
                if "reject" in event.target:
                    self._send(RejectConnection(status_code=403, has_body=True))
                    self._send(RejectData(data=b"refused by the service", body_finished=True))
                    self.transport.loseConnection()
                    return
                wanted = [p for p in event.subprotocols if p in ("superchat", "chat")]
                extensions = [PerMessageDeflate()] if event.extensions else []
                self._send(
                    AcceptConnection(
                        subprotocol=wanted[0] if wanted else None, extensions=extensions
                    )
                )
            elif isinstance(event, Message):
                self.factory.frames.append((type(event).__name__, len(event.data)))
                self._send(event)
            elif isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                self.factory.close_codes.append(event.code)
                self._send(event.response())
                self.transport.loseConnection()

    def _send(self, event: Any) -> None:
        self.transport.write(self.ws.send(event))


class EchoFactory(Factory):
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.frames: list[tuple[str, int]] = []
        self.close_codes: list[int] = []
        self.plain_requests = 0

    def buildProtocol(self, addr: Any) -> EchoServer:
        return EchoServer(self)


class Client(Protocol):
    """
    A WebSocket client that sends its handshake with a given C{Host} (and extra headers) and
    collects what comes back.

    @ivar accepted: fires with the C{AcceptConnection} event, or fails with the raw response
        text when the server answers otherwise.
    """

    def __init__(
        self,
        host: str,
        target: str,
        headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
        subprotocols: list[str] = (),  # type: ignore[assignment]
        deflate: bool = False,
    ) -> None:
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._request = Request(
            host=host,
            target=target,
            extra_headers=list(headers),
            subprotocols=list(subprotocols),
            extensions=[PerMessageDeflate()] if deflate else [],
        )
        self.accepted: defer.Deferred[AcceptConnection] = defer.Deferred()
        self.rejected_status: int | None = None
        self.rejected_body = b""
        self.messages: defer.DeferredQueue[tuple[str, Any]] = defer.DeferredQueue()
        self.closed: defer.Deferred[int | None] = defer.Deferred()
        self._parts: list[Any] = []

    def connectionMade(self) -> None:
        self.transport.write(self.ws.send(self._request))

    def send(self, event: Any) -> None:
        self.transport.write(self.ws.send(event))

    def dataReceived(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.accepted.callback(event)
            elif isinstance(event, RejectConnection):
                self.rejected_status = event.status_code
            elif isinstance(event, RejectData):
                self.rejected_body += event.data
                if event.body_finished and not self.accepted.called:
                    self.accepted.errback(Rejected(self.rejected_status, self.rejected_body))
            elif isinstance(event, Message):
                self._parts.append(event)
                if event.message_finished:
                    kind = "text" if isinstance(event, TextMessage) else "bytes"
                    joined: Any = ("" if kind == "text" else b"").join(p.data for p in self._parts)
                    self.messages.put((kind, (joined, len(self._parts))))
                    self._parts = []
            elif isinstance(event, Pong):
                self.messages.put(("pong", bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                if not self.closed.called:
                    self.closed.callback(event.code)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.accepted.called:
            self.accepted.errback(Rejected(self.rejected_status, self.rejected_body))
        if not self.closed.called:
            self.closed.callback(None)


class Rejected(Exception):
    """The server did not switch protocols."""

    def __init__(self, status: int | None, body: bytes) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


__all__ = ["BytesMessage", "Client", "EchoFactory", "Rejected", "TextMessage"]
