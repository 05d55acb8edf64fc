"""
Tests for L{arvproxy.gateway.ports}: listening ports from C{/proc/<pid>/net/tcp*}.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from arvproxy.gateway.ports import parse_listening_ports, read_listening_ports

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout"
    " inode\n"
)
TAIL = " 00000000:00000000 00:00000000 00000000     0        0 8830 1 0000000000000000 100 0 0 10 0"


def row(n: int, local: str, remote: str, state: str) -> str:
    return f"   {n}: {local} {remote} {state}{TAIL}\n"


HEADER6 = (
    "  sl  local_address                         remote_address                        st"
    " tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)
ANY6 = "00000000000000000000000000000000"
LOOPBACK6 = "00000000000000000000000001000000"


class ParseListeningPortsTests(unittest.TestCase):
    """L{parse_listening_ports} reads one table."""

    cases = [
        ("empty table", HEADER, set()),
        (
            "one listener on 127.0.0.1:8080",
            HEADER + row(0, "0100007F:1F90", "00000000:0000", "0A"),
            {8080},
        ),
        ("a listener on 0.0.0.0:80", HEADER + row(0, "00000000:0050", "00000000:0000", "0A"), {80}),
        (
            "established and time-wait sockets are not listeners",
            HEADER
            + row(0, "0100007F:1F90", "0100007F:D2F0", "01")
            + row(1, "0100007F:1F91", "0100007F:D2F1", "06"),
            set(),
        ),
        (
            "the same port on two addresses counts once",
            HEADER
            + row(0, "0100007F:0BB8", "00000000:0000", "0A")
            + row(1, "0200007F:0BB8", "00000000:0000", "0A"),
            {3000},
        ),
        (
            "tcp6 listeners",
            HEADER6
            + row(0, f"{ANY6}:1F90", f"{ANY6}:0000", "0A")
            + row(1, f"{LOOPBACK6}:0016", f"{ANY6}:0000", "0A"),
            {8080, 22},
        ),
        (
            "malformed lines are ignored",
            HEADER + "garbage\n   7: nocolon 00000000:0000 0A\n   8: 0100007F:XYZ 0:0 0A\n\n",
            set(),
        ),
        ("port zero is not a port", HEADER + row(0, "00000000:0000", "00000000:0000", "0A"), set()),
    ]

    def test_table(self) -> None:
        """Each table yields exactly the ports of its LISTEN rows."""
        for name, table, expected in self.cases:
            self.assertEqual(parse_listening_ports(table), expected, name)


class ReadListeningPortsTests(unittest.TestCase):
    """L{read_listening_ports} reads both tables of one process."""

    def make_proc(self, tables: dict[str, str]) -> str:
        proc = self.mktemp()
        net = os.path.join(proc, "42", "net")
        os.makedirs(net)
        for name, text in tables.items():
            with open(os.path.join(net, name), "w") as f:
                f.write(text)
        return proc

    def test_union_sorted(self) -> None:
        """Ports from tcp and tcp6 are merged, deduplicated and sorted."""
        proc = self.make_proc(
            {
                "tcp": HEADER + row(0, "0100007F:1F90", "00000000:0000", "0A"),
                "tcp6": HEADER6
                + row(0, f"{ANY6}:1F90", f"{ANY6}:0000", "0A")
                + row(1, f"{ANY6}:0050", f"{ANY6}:0000", "0A"),
            }
        )
        self.assertEqual(read_listening_ports(42, proc), [80, 8080])

    def test_no_tcp6(self) -> None:
        """A namespace without IPv6 (no tcp6 table) still reports its IPv4 listeners."""
        proc = self.make_proc({"tcp": HEADER + row(0, "0100007F:0050", "00000000:0000", "0A")})
        self.assertEqual(read_listening_ports(42, proc), [80])

    def test_process_gone(self) -> None:
        """A process that does not exist raises OSError."""
        self.assertRaises(OSError, read_listening_ports, 42, self.mktemp())

    def test_this_process(self) -> None:
        """The real /proc of this process parses (whatever it holds) into sorted valid ports."""
        ports = read_listening_ports(os.getpid())
        self.assertEqual(ports, sorted(set(ports)))
        self.assertTrue(all(1 <= p <= 65535 for p in ports))
