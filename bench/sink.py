"""
The backend's upload sink: reads a whole request body (Content-Length or chunked) as fast as the
socket gives it, throws it away, and only then answers C{200} with the byte count.

The backend nginx forwards C{/upload} here (nginx's own C{return 200} would answer before the
body has arrived, which would make an upload look finished early).

    python -m bench.sink PORT
"""

from __future__ import annotations

import socket
import socketserver
import sys

BUFFER = 1024 * 1024


class _Connection(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray(BUFFER)
        view = memoryview(buffer)
        pending = b""
        while True:
            while b"\r\n\r\n" not in pending:
                data = sock.recv(65536)
                if not data:
                    return
                pending += data
            head, pending = pending.split(b"\r\n\r\n", 1)
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                count, pending = _read_chunked(sock, pending)
            else:
                length = int(headers.get(b"content-length", b"0"))
                count = min(length, len(pending))
                pending = pending[count:]
                while count < length:
                    got = sock.recv_into(view[: min(BUFFER, length - count)])
                    if not got:
                        return
                    count += got
            body = b"%d\n" % count
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )


def _read_chunked(sock: socket.socket, pending: bytes) -> tuple[int, bytes]:
    count = 0

    def line() -> bytes:
        nonlocal pending
        while b"\r\n" not in pending:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed inside a chunked body")
            pending += data
        first, pending = pending.split(b"\r\n", 1)
        return first

    def skip(n: int) -> None:
        nonlocal pending
        while len(pending) < n:
            data = sock.recv(BUFFER)
            if not data:
                raise ConnectionError("closed inside a chunk")
            pending += data
            if len(pending) > n:
                break
        pending = pending[n:]

    while True:
        size = int(line().split(b";", 1)[0], 16)
        if size == 0:
            while line():
                pass
            return count, pending
        skip(size)
        count += size
        line()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def main() -> None:
    port = int(sys.argv[1])
    with _Server(("127.0.0.1", port), _Connection) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
