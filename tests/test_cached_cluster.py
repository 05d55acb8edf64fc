"""
The controller's short-lived cache in front of the embedded registry (CachedCluster).
"""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from arvproxy.backends import ICluster
from arvproxy.backends.cache import CachedCluster
from arvproxy.errors import Unauthorized
from arvproxy.testing import FakeCluster


class CachedClusterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeCluster(clock=self.clock.seconds)
        self.cluster = CachedCluster(self.clock, self.backend, ttl=10)
        self.user = self.backend.add_user("alice")
        self.container = self.backend.add_container()
        self.request = self.backend.add_container_request(self.user.uuid, self.container.uuid)

    def test_provides_the_interface(self) -> None:
        """It is an ICluster like the backend it wraps."""
        verifyObject(ICluster, self.cluster)

    def test_answers_are_kept_for_the_ttl(self) -> None:
        """Token, request, request list and permission answers cost one lookup per ttl."""
        token = self.backend.add_token(self.user.uuid)
        for _ in range(3):
            self.successResultOf(self.cluster.authenticate(token))
            self.successResultOf(self.cluster.get_container_request(self.request.uuid))
            self.successResultOf(self.cluster.container_requests_for(self.container.uuid))
            self.successResultOf(self.cluster.permission_level(self.user.uuid, self.request.uuid))
        for name in (
            "authenticate",
            "get_container_request",
            "container_requests_for",
            "permission_level",
        ):
            self.assertEqual(len(self.backend.called(name)), 1, name)
        self.clock.advance(10)
        self.successResultOf(self.cluster.authenticate(token))
        self.assertEqual(len(self.backend.called("authenticate")), 2)

    def test_containers_are_always_read_fresh(self) -> None:
        """A container's state is never kept: a finished container is seen finished at once."""
        for _ in range(3):
            self.successResultOf(self.cluster.get_container(self.container.uuid))
        self.assertEqual(len(self.backend.called("get_container")), 3)

    def test_expired_token_is_refused_from_the_cache(self) -> None:
        """A kept answer for a token that has since expired is not used."""
        token = self.backend.add_token(self.user.uuid, ttl=5)
        self.successResultOf(self.cluster.authenticate(token))
        self.clock.advance(6)
        self.failureResultOf(self.cluster.authenticate(token), Unauthorized)

    def test_revoked_token_stops_within_the_ttl(self) -> None:
        """A revoked token keeps working from the cache for at most the ttl."""
        token = self.backend.add_token(self.user.uuid)
        self.successResultOf(self.cluster.authenticate(token))
        self.backend.revoke_token(token)
        self.successResultOf(self.cluster.authenticate(token))
        self.clock.advance(10)
        self.failureResultOf(self.cluster.authenticate(token), Unauthorized)

    def test_failures_are_not_kept(self) -> None:
        """A refused token is asked about again next time (it may have been a typo since fixed)."""
        self.failureResultOf(self.cluster.authenticate("v2/nope/nope"), Unauthorized)
        self.failureResultOf(self.cluster.authenticate("v2/nope/nope"), Unauthorized)
        self.assertEqual(len(self.backend.called("authenticate")), 2)


class VersionedCachedClusterTests(SynchronousTestCase):
    """With a version (the embedded registry's data_version), a change forgets everything."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeCluster(clock=self.clock.seconds)
        self.version: int | None = 1
        self.asked: list[int | None] = []  # Every look at the version, with what it saw.
        self.cluster = CachedCluster(self.clock, self.backend, ttl=10, version=self.look)
        self.user = self.backend.add_user("alice")
        self.container = self.backend.add_container()
        self.request = self.backend.add_container_request(self.user.uuid, self.container.uuid)
        self.token = self.backend.add_token(self.user.uuid)

    def look(self) -> int | None:
        self.asked.append(self.version)
        return self.version

    def ask_everything(self) -> None:
        self.successResultOf(self.cluster.authenticate(self.token))
        self.successResultOf(self.cluster.get_container(self.container.uuid))
        self.successResultOf(self.cluster.get_container_request(self.request.uuid))
        self.successResultOf(self.cluster.container_requests_for(self.container.uuid))
        self.successResultOf(self.cluster.permission_level(self.user.uuid, self.request.uuid))

    def lookups(self) -> dict[str, int]:
        names = (
            "authenticate",
            "get_container",
            "get_container_request",
            "container_requests_for",
            "permission_level",
        )
        return {name: len(self.backend.called(name)) for name in names}

    def test_versions(self) -> None:
        """(versions seen on three rounds of questions) → lookups of each answer."""
        cases = [
            ("unchanged", [1, 1, 1], 1),
            ("changed once", [1, 2, 2], 2),
            ("changed every time", [1, 2, 3], 3),
            ("cannot tell", [None, None, None], 3),
            ("cannot tell, then unchanged", [None, 1, 1], 2),
        ]
        for name, versions, expected in cases:
            self.setUp()
            for version in versions:
                self.version = version
                self.ask_everything()
                self.clock.advance(0)  # The next round is a later reactor turn.
            self.assertEqual(set(self.lookups().values()), {expected}, name)

    def test_revoked_token_is_refused_at_once(self) -> None:
        """A revocation changes the version: the kept answer goes before the next request."""
        self.successResultOf(self.cluster.authenticate(self.token))
        self.clock.advance(0)
        self.backend.revoke_token(self.token)
        self.version = 2
        self.failureResultOf(self.cluster.authenticate(self.token), Unauthorized)

    def test_finished_container_is_seen_at_once(self) -> None:
        """Containers are kept only while nothing changes."""
        self.successResultOf(self.cluster.get_container(self.container.uuid))
        self.clock.advance(0)
        self.backend.update_container(self.container.uuid, state="Complete")
        self.version = 2
        container = self.successResultOf(self.cluster.get_container(self.container.uuid))
        self.assertEqual(container.state, "Complete")

    def test_version_asked_once_per_turn(self) -> None:
        """
        The requests of one reactor turn share one look at the version; the next turn looks
        again, and sees a change made during the previous one.
        """
        self.ask_everything()
        self.ask_everything()
        self.assertEqual(self.asked, [1])
        self.version = 2
        self.ask_everything()
        self.assertEqual(self.asked, [1])
        self.clock.advance(0)
        self.ask_everything()
        self.assertEqual(self.asked, [1, 2])
        self.assertEqual(set(self.lookups().values()), {2})

    def test_cannot_tell_is_asked_every_time(self) -> None:
        """While the version cannot be had, every call asks again and nothing kept is used."""
        self.version = None
        self.ask_everything()
        self.ask_everything()
        self.assertEqual(self.asked, [None] * 10)
        self.assertEqual(set(self.lookups().values()), {2})

    def test_ttl_still_bounds(self) -> None:
        """Even with no change, nothing is kept longer than the ttl."""
        self.ask_everything()
        self.clock.advance(10)
        self.ask_everything()
        self.assertEqual(set(self.lookups().values()), {2})


class GenerationTests(SynchronousTestCase):
    """
    L{CachedCluster.generation}: what the front door keeps a decision by.  It must move with
    every change the cache would notice, and there must be none without a version.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeCluster(clock=self.clock.seconds)
        self.version: int | None = 1
        self.cluster = CachedCluster(self.clock, self.backend, ttl=10, version=lambda: self.version)

    def test_versions(self) -> None:
        """(versions seen in three reactor turns) → whether the generation moved at each."""
        cases = [
            ("unchanged", [1, 1, 1], [False, False]),
            ("changed once", [1, 2, 2], [True, False]),
            ("changed every time", [1, 2, 3], [True, True]),
            ("cannot tell", [None, None, None], [True, True]),
        ]
        for name, versions, moved in cases:
            self.setUp()
            seen = []
            for version in versions:
                self.version = version
                seen.append(self.cluster.generation())
                self.clock.advance(0)  # The next look is in a later reactor turn.
            self.assertEqual([a != b for a, b in itertools.pairwise(seen)], moved, name)

    def test_moves_when_a_token_is_used_up(self) -> None:
        """An exchanged token's decisions go at once, and again once the exchange is done."""
        exchanged: defer.Deferred[str] = defer.Deferred()
        self.backend.exchange_token = lambda token, ttl: exchanged  # type: ignore[attr-defined]
        before = self.cluster.generation()
        self.cluster.exchange_token("v2/zzzzz-gj3su-000000000000001/secret", 60)
        during = self.cluster.generation()
        exchanged.callback("new token")
        self.assertEqual(len({before, during, self.cluster.generation()}), 3)

    def test_none_without_version(self) -> None:
        """Without a version, answers may change unseen: no generation to keep anything by."""
        self.assertIsNone(CachedCluster(self.clock, self.backend, ttl=10).generation())
