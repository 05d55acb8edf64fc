"""
Tunnel carriers (arvproxy.carrier): streams keep their bytes apart and in order, each has its
own window, a slow one holds up nobody else, and a frame that breaks the rules ends the carrier.
"""

from __future__ import annotations

import struct

from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from arvproxy.carrier import (
    CLOSE,
    DATA,
    HEADER,
    MAX_PAYLOAD,
    MAX_STREAMS,
    MAX_WINDOW,
    OPEN,
    STREAM_WINDOW,
    WINDOW,
    WINDOW_HEADER,
    WINDOW_SIZE,
    Carrier,
    CarrierError,
    CarrierPool,
    Stream,
    announced_window,
)


class Recorder(Protocol):
    """Keeps what arrives and how the stream ended."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


class Producer:
    """A streaming producer that records being paused and resumed."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


def frame(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream_id, len(payload)) + payload


class Pair:
    """A front-door carrier and a gateway carrier joined in memory."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.accepted: list[tuple[Stream, Recorder]] = []
        self.front = Carrier(self.clock.callLater)
        self.gateway = Carrier(self.clock.callLater, accept=self._accept)
        self.pump = iosim.connect(
            self.gateway,
            iosim.makeFakeServer(self.gateway),
            self.front,
            iosim.makeFakeClient(self.front),
            greet=False,
            clock=self.clock,
        )

    def _accept(self, stream: Stream) -> None:
        recorder = Recorder()
        stream.protocol = recorder
        recorder.makeConnection(stream)
        self.accepted.append((stream, recorder))

    def open(self) -> tuple[Stream, Recorder, Stream, Recorder]:
        """A stream: front end and its recorder, gateway end and its recorder."""
        recorder = Recorder()
        stream = self.front.open_stream(recorder)
        self.pump.flush()
        far, far_recorder = self.accepted[-1]
        return stream, recorder, far, far_recorder


class StreamTests(SynchronousTestCase):
    def test_streams_keep_their_bytes_apart_and_in_order(self) -> None:
        """Interleaved writes on three streams arrive on the right stream, in order, both ways."""
        pair = Pair()
        streams = [pair.open() for _ in range(3)]
        for round_ in range(5):
            for i, (near, _, far, _) in enumerate(streams):
                near.write(b"to gateway %d.%d;" % (i, round_))
                far.write(b"to front %d.%d;" % (i, round_))
        pair.pump.flush()
        for i, (_, near_seen, _, far_seen) in enumerate(streams):
            self.assertEqual(
                far_seen.received, b"".join(b"to gateway %d.%d;" % (i, r) for r in range(5))
            )
            self.assertEqual(
                near_seen.received, b"".join(b"to front %d.%d;" % (i, r) for r in range(5))
            )
        self.assertTrue(all(r.made for _, r, _, _ in streams))

    def test_large_writes_arrive_whole_in_bounded_frames(self) -> None:
        """A write larger than a frame (and than the window) arrives complete and unchanged."""
        pair = Pair()
        near, _, _, far_seen = pair.open()
        payload = bytes(range(256)) * (4 * WINDOW_SIZE // 256 + 7)
        near.write(payload)
        pair.pump.flush()
        self.assertEqual(far_seen.received, payload)

    def test_frames_of_a_large_write_leave_a_few_at_a_time(self) -> None:
        """
        A large write leaves as writes of four frames each (so that no frame's header is left
        for a TLS record of its own), within the other end's window.
        """
        carrier, transport, _ = on_string_transport(accepting=False)
        writes: list[bytes] = []
        transport.write = writes.append  # type: ignore[method-assign]
        stream = carrier.open_stream(Recorder())
        payload = bytes(range(256)) * (6 * MAX_PAYLOAD // 256)
        stream.write(payload)
        frames = [data for data in writes if data[0] == DATA]
        self.assertEqual([len(data) for data in frames], [4 * (HEADER.size + MAX_PAYLOAD)])
        offset, received = 0, b""
        while offset < len(frames[0]):
            kind, stream_id, length = HEADER.unpack_from(frames[0], offset)
            self.assertEqual((kind, stream_id, length), (DATA, stream.id, MAX_PAYLOAD))
            received += frames[0][offset + HEADER.size : offset + HEADER.size + length]
            offset += HEADER.size + length
        self.assertEqual(received, payload[:WINDOW_SIZE])
        self.assertEqual(stream._outgoing_size, len(payload) - WINDOW_SIZE)

    def test_slow_reader_holds_up_only_its_own_stream(self) -> None:
        """
        A paused receiver gets at most one window; the sender's producer is paused meanwhile,
        other streams keep flowing, and everything arrives once the receiver resumes.
        """
        pair = Pair()
        slow, _, slow_far, slow_seen = pair.open()
        fast, _, _, fast_seen = pair.open()
        producer = Producer()
        slow.registerProducer(producer, True)
        slow_far.pauseProducing()
        payload = b"x" * (3 * WINDOW_SIZE)
        slow.write(payload)
        fast.write(b"meanwhile")
        pair.pump.flush()
        self.assertEqual(fast_seen.received, b"meanwhile")
        self.assertEqual(slow_seen.received, b"")
        self.assertTrue(producer.paused)
        # Only one window's worth ever crossed: the rest waits at the sender.
        self.assertEqual(slow._outgoing_size, 2 * WINDOW_SIZE)
        slow_far.resumeProducing()
        pair.pump.flush()
        self.assertEqual(slow_seen.received, payload)
        self.assertFalse(producer.paused)

    def test_lose_connection_sends_everything_first(self) -> None:
        """loseConnection delivers what was written, then both ends see a clean close."""
        pair = Pair()
        near, near_seen, _, far_seen = pair.open()
        near.write(b"last words")
        near.loseConnection()
        near.write(b"too late")
        pair.pump.flush()
        self.assertEqual(far_seen.received, b"last words")
        self.assertIsNotNone(near_seen.lost)
        self.assertIsNotNone(far_seen.lost)
        assert near_seen.lost is not None and far_seen.lost is not None
        near_seen.lost.trap(ConnectionDone)
        far_seen.lost.trap(ConnectionDone)
        self.assertEqual((len(pair.front), len(pair.gateway)), (0, 0))

    def test_abort_drops_unsent_bytes(self) -> None:
        """
        abortConnection ends the stream at once and drops what was not sent; the other end
        delivers what had crossed (one window at most, even while paused), then sees the end.
        """
        pair = Pair()
        near, near_seen, far, far_seen = pair.open()
        far.pauseProducing()
        near.write(b"y" * (2 * WINDOW_SIZE))
        near.abortConnection()
        pair.pump.flush()
        assert near_seen.lost is not None
        near_seen.lost.trap(ConnectionAborted)
        self.assertEqual(far_seen.received, b"y" * WINDOW_SIZE)
        assert far_seen.lost is not None
        far_seen.lost.trap(ConnectionDone)
        self.assertEqual((len(pair.front), len(pair.gateway)), (0, 0))

    def test_the_end_of_a_stream_stops_its_producer(self) -> None:
        """As with a real connection, whatever produces into a stream is stopped when it ends."""
        pair = Pair()
        near, _, far, _ = pair.open()
        producer = Producer()
        far.registerProducer(producer, True)
        near.abortConnection()
        pair.pump.flush()
        self.assertTrue(producer.stopped)

    def test_losing_the_carrier_ends_every_stream(self) -> None:
        """When the connection goes, every stream on both ends sees its connection lost."""
        pair = Pair()
        streams = [pair.open() for _ in range(3)]
        pair.front.transport.loseConnection()
        pair.pump.flush()
        for _, near_seen, _, far_seen in streams:
            assert near_seen.lost is not None and far_seen.lost is not None
            near_seen.lost.trap(ConnectionLost)
            far_seen.lost.trap(ConnectionLost)
        self.assertTrue(pair.front.closed.called)

    def test_a_failing_protocol_ends_only_its_stream(self) -> None:
        """An exception in one stream's protocol closes that stream, not its neighbours."""
        pair = Pair()
        bad, _, bad_far, bad_far_seen = pair.open()
        good, _, _, good_seen = pair.open()

        def explode(data: bytes) -> None:
            raise RuntimeError("bug in a tunnel")

        bad_far_seen.dataReceived = explode  # type: ignore[method-assign]
        bad.write(b"boom")
        good.write(b"fine")
        pair.pump.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(good_seen.received, b"fine")
        self.assertIsNotNone(bad_far_seen.lost)
        self.assertFalse(bad.connected)
        self.assertEqual(len(pair.gateway), 1)

    def test_frames_crossing_a_close_are_ignored(self) -> None:
        """Bytes the other end sent before it learnt of the close do no harm."""
        pair = Pair()
        near, _, far, _ = pair.open()
        near.abortConnection()
        far.write(b"crossing")
        pair.pump.flush()
        self.assertIsNone(pair.front.lost)
        self.assertIsNone(pair.gateway.lost)


def on_string_transport(
    accepting: bool, max_streams: int = MAX_STREAMS, announced: int | None = None
) -> tuple[Carrier, StringTransport, list[Stream]]:
    """
    One end of a carrier (the gateway's when C{accepting}) on a C{StringTransport}, and the
    streams it accepts (each with a L{Recorder}).
    """
    opened: list[Stream] = []

    def accept(stream: Stream) -> None:
        stream.protocol = Recorder()
        opened.append(stream)

    carrier = Carrier(
        Clock().callLater,
        accept=accept if accepting else None,
        max_streams=max_streams,
        announced=announced,
    )
    transport = StringTransport()
    carrier.makeConnection(transport)
    return carrier, transport, opened


class FrameAttackTests(SynchronousTestCase):
    """Frames that break the rules end the carrier (both ends are ours: a bug or an intruder)."""

    def test_broken_frames(self) -> None:
        """(what, frames sent to the gateway's end) → the connection is aborted."""
        over_window = [
            frame(DATA, 1, b"z" * MAX_PAYLOAD) for _ in range(WINDOW_SIZE // MAX_PAYLOAD + 1)
        ]
        cases: list[tuple[str, list[bytes]]] = [
            ("oversized frame", [HEADER.pack(DATA, 1, MAX_PAYLOAD + 1)]),
            ("unknown type", [frame(OPEN, 1), frame(9, 1, b"?")]),
            ("OPEN with a payload", [frame(OPEN, 1, b"x")]),
            ("stream ids that do not grow", [frame(OPEN, 2), frame(OPEN, 1)]),
            ("reused stream id", [frame(OPEN, 1), frame(CLOSE, 1), frame(OPEN, 1)]),
            ("stream id 0", [frame(OPEN, 0)]),
            ("DATA for a stream never opened", [frame(DATA, 7, b"x")]),
            ("empty DATA", [frame(OPEN, 1), frame(DATA, 1)]),
            ("DATA beyond the window", [frame(OPEN, 1), *over_window]),
            (
                "DATA beyond the window, in pieces",
                [frame(OPEN, 1), *(half for f in over_window for half in (f[:999], f[999:]))],
            ),
            ("WINDOW of 3 bytes", [frame(OPEN, 1), frame(WINDOW, 1, b"\0\0\1")]),
            ("WINDOW of 0", [frame(OPEN, 1), frame(WINDOW, 1, struct.pack("!I", 0))]),
            ("WINDOW beyond the window", [frame(OPEN, 1), frame(WINDOW, 1, struct.pack("!I", 1))]),
            ("CLOSE with a payload", [frame(OPEN, 1), frame(CLOSE, 1, b"x")]),
        ]
        for name, frames in cases:
            carrier, transport, opened = on_string_transport(accepting=True)
            # Paused, so that DATA within the window stays queued rather than granted back.
            for stream in opened:
                stream.pauseProducing()
            for data in frames:
                carrier.dataReceived(data)
                for stream in opened:
                    stream.pauseProducing()
            self.assertTrue(transport.disconnecting, name)
            self.flushLoggedErrors()

    def test_stream_limit(self) -> None:
        """(frames, max 2 streams open) → whether the gateway's end ends the carrier."""
        cases = [
            ([frame(OPEN, 1), frame(OPEN, 2)], False),
            ([frame(OPEN, 1), frame(OPEN, 2), frame(OPEN, 3)], True),
            ([frame(OPEN, 1), frame(OPEN, 2), frame(CLOSE, 1), frame(OPEN, 3)], False),
            (
                [frame(OPEN, 1), frame(CLOSE, 1), frame(OPEN, 2), frame(OPEN, 3), frame(OPEN, 4)],
                True,
            ),
        ]
        for frames, ended in cases:
            carrier, transport, opened = on_string_transport(accepting=True, max_streams=2)
            for data in frames:
                carrier.dataReceived(data)
            self.assertEqual(transport.disconnecting, ended, frames)
            if not ended:
                self.assertEqual(len(carrier), 2)
            self.flushLoggedErrors()

    def test_default_stream_limit(self) -> None:
        """Both ends hold to L{MAX_STREAMS}: the pool opens no more; the gateway takes no more."""
        self.assertEqual(CarrierPool(Clock()).max_streams, MAX_STREAMS)
        carrier, transport, opened = on_string_transport(accepting=True)
        carrier.dataReceived(b"".join(frame(OPEN, i) for i in range(1, MAX_STREAMS + 1)))
        self.assertFalse(transport.disconnecting)
        carrier.dataReceived(frame(OPEN, MAX_STREAMS + 1))
        self.assertTrue(transport.disconnecting)
        self.flushLoggedErrors()

    def test_open_towards_the_opening_end(self) -> None:
        """The front door's end never accepts streams: an OPEN sent to it ends the carrier."""
        carrier, transport, _ = on_string_transport(accepting=False)
        carrier.dataReceived(frame(OPEN, 1))
        self.assertTrue(transport.disconnecting)

    def test_split_frames_are_reassembled(self) -> None:
        """A frame split across reads, byte by byte, is one frame."""
        carrier, transport, opened = on_string_transport(accepting=True)
        data = frame(OPEN, 1) + frame(DATA, 1, b"hello") + frame(DATA, 1, b" world")
        for i in range(len(data)):
            carrier.dataReceived(data[i : i + 1])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(opened[0].protocol.received, b"hello world")


class WindowTests(SynchronousTestCase):
    """The window each end announces in the handshake, and the one each end then keeps to."""

    def test_announcements(self) -> None:
        """(the handshake's header values) → the window announced, or the handshake refused."""
        cases: list[tuple[list[bytes] | None, int | None]] = [
            (None, None),
            ([b"%d" % (STREAM_WINDOW,)], STREAM_WINDOW),
            ([b"%d" % (WINDOW_SIZE,)], WINDOW_SIZE),
            ([b"%d" % (MAX_WINDOW,)], MAX_WINDOW),
            ([b"%d" % (WINDOW_SIZE - 1,)], CarrierError),
            ([b"%d" % (MAX_WINDOW + 1,)], CarrierError),
            ([b"0"], CarrierError),
            ([b"-1048576"], CarrierError),
            ([b"1048576 "], CarrierError),
            ([b"0x100000"], CarrierError),
            ([b"1e6"], CarrierError),
            ([b""], CarrierError),
            ([b"9" * 400], CarrierError),
            ([b"1048576", b"1048576"], CarrierError),
        ]
        for values, expected in cases:
            headers = Headers()
            if values is not None:
                headers.setRawHeaders(WINDOW_HEADER, values)
            if expected is CarrierError:
                self.assertRaises(CarrierError, announced_window, headers)
            else:
                self.assertEqual(announced_window(headers), expected, values)

    def test_windows_kept(self) -> None:
        """
        (the other end's announcement) → how much of a stream each end sends before it waits
        for a grant, and how much it takes before it ends the carrier.
        """
        cases = [
            (None, WINDOW_SIZE, WINDOW_SIZE),
            (WINDOW_SIZE, WINDOW_SIZE, STREAM_WINDOW),
            (2 * STREAM_WINDOW, 2 * STREAM_WINDOW, STREAM_WINDOW),
        ]
        for announced, sends, takes in cases:
            carrier, transport, _ = on_string_transport(False, announced=announced)
            stream = carrier.open_stream(Recorder())
            stream.write(b"s" * (4 * MAX_WINDOW))
            self.assertEqual(stream._outgoing_size, 4 * MAX_WINDOW - sends, announced)
            stream.pauseProducing()
            for _ in range(takes // MAX_PAYLOAD):
                carrier.dataReceived(frame(DATA, stream.id, b"t" * MAX_PAYLOAD))
            self.assertFalse(transport.disconnecting, announced)
            carrier.dataReceived(frame(DATA, stream.id, b"t"))
            self.assertTrue(transport.disconnecting, announced)
            self.flushLoggedErrors()


class PayloadTests(SynchronousTestCase):
    """A stream's bytes reach its protocol as they arrive, in as few calls as the reads allow."""

    def test_a_frame_split_across_reads_arrives_as_it_comes(self) -> None:
        """The first part of a DATA frame reaches the stream before the rest has arrived."""
        carrier, transport, opened = on_string_transport(accepting=True)
        data = frame(OPEN, 1) + frame(DATA, 1, b"hello world")
        carrier.dataReceived(data[:-6])
        self.assertEqual(opened[0].protocol.received, b"hello")
        carrier.dataReceived(data[-6:])
        self.assertEqual(opened[0].protocol.received, b"hello world")

    def test_one_read_of_frames_arrives_in_one_call_per_stream_run(self) -> None:
        """Consecutive frames of one stream in one read reach it at once, in order."""
        calls: list[tuple[int, bytes]] = []
        carrier, transport, opened = on_string_transport(accepting=True)
        carrier.dataReceived(frame(OPEN, 1) + frame(OPEN, 2))
        for stream in opened:
            stream.protocol.dataReceived = lambda data, i=stream.id: calls.append((i, data))
        carrier.dataReceived(
            frame(DATA, 1, b"a")
            + frame(DATA, 1, b"b")
            + frame(DATA, 2, b"c")
            + frame(DATA, 1, b"d")
            + frame(DATA, 1, b"e")
            + frame(CLOSE, 1)
        )
        self.assertEqual(calls, [(1, b"ab"), (2, b"c"), (1, b"de")])
        self.assertEqual(len(carrier), 1)

    def test_rest_of_a_frame_for_a_closed_stream_is_dropped(self) -> None:
        """A stream that ends while its frame arrives gets no more of it; the others go on."""
        carrier, transport, opened = on_string_transport(accepting=True)
        carrier.dataReceived(frame(OPEN, 1) + frame(OPEN, 2))
        (first, seen_first), (second, seen_second) = [(s, s.protocol) for s in opened]
        data = frame(DATA, 1, b"x" * 100) + frame(DATA, 2, b"y")
        carrier.dataReceived(data[:50])
        first.abortConnection()
        carrier.dataReceived(data[50:])
        self.assertEqual(seen_first.received, b"x" * (50 - HEADER.size))
        self.assertEqual(seen_second.received, b"y")
        self.assertFalse(transport.disconnecting)


class CarrierPoolTests(SynchronousTestCase):
    """The front door's pool hands out only carriers that can take another stream."""

    def test_closing_carrier_is_not_handed_out(self) -> None:
        """
        A carrier the pool is closing (idle just as a stream asks, or at shutdown) is neither
        handed out nor opens a stream: the next stream gets a new carrier.
        """
        clock = Clock()
        pool = CarrierPool(clock, idle_timeout=10)
        opened: list[Carrier] = []

        def connect() -> defer.Deferred[Carrier]:
            carrier, _, _ = on_string_transport(accepting=False)
            opened.append(carrier)
            return defer.succeed(carrier)

        first = self.successResultOf(pool.get("gateway", connect))
        self.assertIs(self.successResultOf(pool.get("gateway", connect)), first)
        first.open_stream(Recorder()).abortConnection()  # Its last stream ends.
        clock.advance(10)  # Idle that long: the pool closes it.
        self.assertTrue(first.closing)
        self.assertRaises(CarrierError, first.open_stream, Recorder())
        second = self.successResultOf(pool.get("gateway", connect))
        self.assertIsNot(second, first)
        self.assertEqual(opened, [first, second])
