"""Tests for L{arvproxy.service}: what both plugins do when they start."""

from __future__ import annotations

import gc

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from arvproxy.service import freeze_start_up


class FreezeStartUpTests(SynchronousTestCase):
    def test_frozen_after_the_first_turn(self) -> None:
        """What start-up made is out of the collector's way once the reactor has turned."""
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        clock = MemoryReactorClock()
        freeze_start_up(clock)
        self.assertEqual(gc.get_freeze_count(), 0)
        clock.run()  # The services start; the freeze waits for the end of this turn.
        self.assertEqual(gc.get_freeze_count(), 0)
        clock.advance(0)
        self.assertGreater(gc.get_freeze_count(), 0)
