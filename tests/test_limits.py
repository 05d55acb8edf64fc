"""
The per-container connection cap: a slot is given back exactly once, whether its block ends, it
fails, or a tunnel kept it.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial import unittest

from arvproxy.errors import Unavailable
from arvproxy.limits import ConnectionSlots

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
