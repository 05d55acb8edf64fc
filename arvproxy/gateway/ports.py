"""
Which TCP ports a container listens on, read from its own C{/proc/<pid>/net/tcp} and C{tcp6}.

Those files describe the network namespace of process C{<pid>}, so the gateway learns the
container's ports without running anything inside it.  L{parse_listening_ports} is the pure
parser; L{read_listening_ports} is the tiny reader (blocking file reads: call it in a thread).
"""

from __future__ import annotations

import os

TCP_LISTEN = "0A"
"""The kernel's state code for a listening socket (C{TCP_LISTEN} in C{include/net/tcp_states.h})."""

TABLES = ("tcp", "tcp6")


def parse_listening_ports(table: str) -> set[int]:
    """
    The local ports of the listening sockets in one C{/proc/net/tcp} or C{tcp6} table.

    Lines are C{"sl local_address rem_address st ..."}, addresses C{HEXADDR:HEXPORT}; the header
    line and lines that do not have this shape are ignored.
    """
    ports: set[int] = set()
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].endswith(":") or fields[3] != TCP_LISTEN:
            continue
        _, colon, port_hex = fields[1].rpartition(":")
        if not colon:
            continue
        try:
            port = int(port_hex, 16)
        except ValueError:
            continue
        if 1 <= port <= 65535:
            ports.add(port)
    return ports


def read_listening_ports(pid: int, proc: str = "/proc") -> list[int]:
    """
    The sorted TCP ports some socket in process C{pid}'s network namespace listens on.

    A missing C{tcp6} table (IPv6 disabled) counts as empty.

    @raise OSError: the process is gone or its tables cannot be read.
    """
    ports: set[int] = set()
    for index, name in enumerate(TABLES):
        path = os.path.join(proc, str(pid), "net", name)
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                ports |= parse_listening_ports(f.read())
        except FileNotFoundError:
            if index == 0:
                raise
    return sorted(ports)
