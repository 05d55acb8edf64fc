"""
The backend's WebSocket echo for the idle-tunnel test: the tests' wsproto echo server
(L{tests.wsservice.EchoFactory}) in a process of its own.

    python -m bench.wsecho PORT
"""

from __future__ import annotations

import sys

from twisted.internet import reactor

from tests.wsservice import EchoFactory


def main() -> None:
    port = int(sys.argv[1])
    reactor.listenTCP(port, EchoFactory(), backlog=4096, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
