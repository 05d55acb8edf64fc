"""
The per-container connection cap: a slot is given back exactly once, whether its block ends, it
fails, or a tunnel kept it.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial import unittest

from arvproxy.errors import Unavailable
from arvproxy.limits import ConnectionSlots, Slot, client_key

UUID = "zzzzz-dz642-000000000000001"


class ConnectionSlotsTests(unittest.TestCase):
    def test_block_ends(self):
        """(how the block ends, kept until a Deferred?, how that Deferred ends) → slots open."""
        cases = [
            ("returns", None, 0),
            ("raises", None, 0),
            ("returns", "pending", 1),
            ("raises", "pending", 1),
            ("returns", "succeeds", 0),
            ("returns", "fails", 0),
            ("raises", "fails", 0),
        ]
        for ending, kept, expected in cases:
            slots = ConnectionSlots(cap=5)
            tunnel: defer.Deferred[None] = defer.Deferred()
            try:
                with slots.hold(UUID) as slot:
                    self.assertEqual(slots.open(UUID), 1)
                    if kept is not None:
                        slot.keep_until(tunnel)
                    if ending == "raises":
                        raise ValueError("the handler failed")
            except ValueError:
                pass
            if kept == "succeeds":
                tunnel.callback(None)
            elif kept == "fails":
                tunnel.errback(Failure(ValueError("the tunnel failed")))
                # The failure is passed on, not swallowed.
                self.failureResultOf(tunnel, ValueError)
            self.assertEqual(slots.open(UUID), expected, (ending, kept))

    def test_cap(self):
        """The slot past the cap is refused with 503; a kept slot counts until its tunnel ends."""
        slots = ConnectionSlots(cap=1)
        tunnel: defer.Deferred[None] = defer.Deferred()
        with slots.hold(UUID) as slot:
            slot.keep_until(tunnel)
        with self.assertRaises(Unavailable):
            with slots.hold(UUID):
                pass
        # Another container has slots of its own.
        with slots.hold("zzzzz-dz642-000000000000002"):
            pass
        tunnel.callback(None)
        with slots.hold(UUID):
            self.assertEqual(slots.open(UUID), 1)
        self.assertEqual(slots.open(UUID), 0)


# Client keys (see client_key).
A, B, C = "192.0.2.1", "192.0.2.2", "2001:db8:1:2::/64"
D, E, F = "192.0.2.4", "192.0.2.5", "192.0.2.6"


class AnonymousBudgetTests(unittest.TestCase):
    """
    Anonymous visitors of a public port get a share of a container's connections, and each
    client a part of that; people with access always have the rest (issue 16, hole 8).
    """

    # (what happens, (cap, anonymous share, per client), [(who: None for someone with access
    # or the anonymous client's key, what they get)]; "-" gives back the oldest slot of who)
    CASES: list[tuple[str, tuple[int, int | None, int | None], list[tuple[str | None, str]]]] = [
        (
            "one client takes its part, another its own, then the share is full",
            (10, 4, 2),
            [(A, "ok"), (A, "ok"), (A, "client"), (B, "ok"), (B, "ok"), (C, "anonymous")],
        ),
        (
            "people with access have the rest when the share is full",
            (6, 3, 3),
            [(A, "ok")] * 3 + [(B, "anonymous")] + [(None, "ok")] * 3 + [(None, "full")],
        ),
        (
            "people with access may use the share's unused part",
            (4, 2, 2),
            [(None, "ok")] * 3 + [(A, "ok"), (A, "full"), (None, "full")],
        ),
        (
            "a full container refuses anonymous visitors too",
            (3, 2, 2),
            [(None, "ok")] * 3 + [(A, "full")],
        ),
        (
            "a slot given back is free again, for the same client",
            (10, 2, 1),
            [(A, "ok"), (A, "client"), (A, "-"), (A, "ok"), (B, "ok"), (C, "anonymous")],
        ),
        ("no anonymous share at all", (5, 0, None), [(A, "anonymous"), (None, "ok")]),
        (
            "the defaults: half the cap, a fifth of that per client",
            (20, None, None),
            [(A, "ok")] * 2
            + [(A, "client")]
            + [(B, "ok")] * 2
            + [(C, "ok")] * 2
            + [(D, "ok")] * 2
            + [(E, "ok")] * 2
            + [(F, "anonymous")],
        ),
    ]

    def test_table(self):
        """Each hold in turn is granted or refused with 503 for the right reason."""
        reasons = {
            "full": "Too many connections",
            "anonymous": "Too many visitors without access",
            "client": "Your address has too many connections",
        }
        for name, (cap, share, per_client), steps in self.CASES:
            with self.subTest(name):
                slots = ConnectionSlots(cap, share, per_client)
                held: list[tuple[str | None, Slot]] = []
                for i, (who, outcome) in enumerate(steps):
                    if outcome == "-":
                        index = next(j for j, (w, _) in enumerate(held) if w == who)
                        held.pop(index)[1].give_back()
                        continue
                    try:
                        held.append((who, slots.hold(UUID, who)))
                        got = "ok"
                    except Unavailable as e:
                        self.assertEqual(e.retry_after, 2)
                        got = next(k for k, text in reasons.items() if text in str(e))
                    self.assertEqual(got, outcome, (name, i, who))
                self.assertEqual(slots.open(UUID), len(held), name)
                self.assertEqual(
                    slots.open_anonymous(UUID), sum(who is not None for who, _ in held), name
                )
                for _, slot in held:
                    slot.give_back()
                self.assertEqual((slots.open(UUID), slots.open_anonymous(UUID)), (0, 0), name)
                self.assertEqual(slots.open_anonymous(UUID, A), 0, name)

    def test_per_container(self):
        """Each container has its own budget: a full share of one leaves the other's alone."""
        slots = ConnectionSlots(4, 1, 1)
        with slots.hold(UUID, A):
            with self.assertRaises(Unavailable):
                slots.hold(UUID, B)
            with slots.hold("zzzzz-dz642-000000000000002", A):
                self.assertEqual(slots.open_anonymous(UUID, A), 1)

    def test_kept_by_a_tunnel(self):
        """An anonymous tunnel keeps its place in the share until it ends."""
        slots = ConnectionSlots(4, 1, 1)
        tunnel: defer.Deferred[None] = defer.Deferred()
        with slots.hold(UUID, A) as slot:
            slot.keep_until(tunnel)
        with self.assertRaises(Unavailable):
            slots.hold(UUID, B)
        tunnel.callback(None)
        with slots.hold(UUID, B):
            self.assertEqual(slots.open_anonymous(UUID, B), 1)


PROXIES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


class ClientKeyTests(unittest.TestCase):
    """What an anonymous request is counted under: its real client, whatever it claims."""

    # (peer, X-Forwarded-For values, key)
    CASES: list[tuple[str | None, list[bytes] | None, str]] = [
        ("192.0.2.1", None, "192.0.2.1"),
        # An untrusted peer's X-Forwarded-For is the client's to write: ignored.
        ("192.0.2.1", [b"198.51.100.7"], "192.0.2.1"),
        # Behind a trusted proxy: the address it saw.
        ("127.0.0.1", [b"198.51.100.7"], "198.51.100.7"),
        ("127.0.0.1", None, "127.0.0.1"),
        # What the client wrote before its address is not believed.
        ("127.0.0.1", [b"203.0.113.9, 198.51.100.7"], "198.51.100.7"),
        ("127.0.0.1", [b"203.0.113.9", b"198.51.100.7"], "198.51.100.7"),
        # Trusted proxies in the chain are skipped.
        ("127.0.0.1", [b"198.51.100.7, 10.1.2.3"], "198.51.100.7"),
        ("127.0.0.1", [b" 198.51.100.7 ,10.1.2.3 "], "198.51.100.7"),
        # A trusted peer that forwards something else: the peer.
        ("127.0.0.1", [b"unknown"], "127.0.0.1"),
        ("127.0.0.1", [b"198.51.100.7, unknown"], "127.0.0.1"),
        ("127.0.0.1", [b"198.51.100.7:4711"], "127.0.0.1"),
        ("127.0.0.1", [b"\xff"], "127.0.0.1"),
        # Every entry a trusted proxy: the last one reached.
        ("127.0.0.1", [b"10.9.9.9"], "127.0.0.1"),
        # IPv6 clients count by their /64; mapped IPv4 addresses as IPv4.
        ("2001:db8:1:2::5", None, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:1:2:3", None, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::5", None, "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.1", None, "192.0.2.1"),
        ("127.0.0.1", [b"2001:db8:1:2::7"], "2001:db8:1:2::/64"),
        ("127.0.0.1", [b"::ffff:198.51.100.7"], "198.51.100.7"),
        # No address at all (a carrier stream has one; anything else would be a bug).
        (None, [b"198.51.100.7"], "unknown"),
    ]

    def test_table(self):
        """The key for each peer and X-Forwarded-For."""
        for peer, forwarded_for, key in self.CASES:
            self.assertEqual(client_key(peer, forwarded_for, PROXIES), key, (peer, forwarded_for))
