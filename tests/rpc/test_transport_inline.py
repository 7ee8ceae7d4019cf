"""What the transport's watchdog guarantees, on two ``PeerConnection``s over a socket pair.

- A request run by a connection's reader (``run_inline``, as the agent does when nothing else
  is waiting) that blocks on a plain Event, not a Future, does not keep the next request from
  being read: after ``INLINE_PATIENCE_S`` another thread reads.
- Requests waiting behind quick ones run in the reader too; behind a slow one (or one the
  watchdog took the reading from), they are left to the pool.
- A segment RELEASE with no frame to ride on is still sent, and a segment retired on release
  is unmapped by both ends.
- The watchdog writes a queued frame only when it has waited a whole tick (otherwise it likely
  rides with the next frame).
- The watchdog dozes while no connection needs it, and wakes at once for a request run inline
  or a frame left queued.
- A reader polls for frames that come within ``busy_poll_s`` of each other; for frames further
  apart, only once in ``_PROBE_EVERY`` waits; and it stops using the CPU once they stop coming.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from thenable._future import Future
from thenable.rpc._net import shm as _shm
from thenable.rpc._net import sockets as _sockets
from thenable.rpc._net import transport as _transport
from thenable.rpc._net.transport import PeerConnection
from thenable.rpc._wire.protocol import Connection, Message, MessageKind

WAIT_S = 10.0


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield ours, theirs
    ours.close()
    theirs.close()


def _handshaken(a: socket.socket, b: socket.socket) -> tuple[Connection, Connection]:
    """Both ends' protocols after a handshake (run in two threads, as the two workers do)."""
    protocols: dict[str, Connection] = {}

    def side(name: str, sock: socket.socket) -> None:
        protocol = Connection(key=None, identity=name.encode())
        _sockets.handshake(sock, protocol, WAIT_S)
        protocols[name] = protocol

    other = threading.Thread(target=side, args=("b", b))
    other.start()
    side("a", a)
    other.join(WAIT_S)
    return protocols["a"], protocols["b"]


def _connected(
    pair: tuple[socket.socket, socket.socket],
    on_message: Callable[[PeerConnection, Message], None],
    on_closed: Callable[[PeerConnection, BaseException | None], None] = lambda *_: None,
    busy_poll_s: float = 0.0,
) -> tuple[PeerConnection, PeerConnection]:
    """(sender, receiver), both started; the receiver's messages go to ``on_message``, and
    its reader polls for up to ``busy_poll_s`` (the sender's never polls)."""
    sender_sock, receiver_sock = pair
    sender_protocol, receiver_protocol = _handshaken(sender_sock, receiver_sock)
    receiver = PeerConnection(
        receiver_sock,
        receiver_protocol,
        0,
        on_message=on_message,
        on_closed=on_closed,
        description="sender",
        busy_poll_s=busy_poll_s,
    )
    sender = PeerConnection(
        sender_sock,
        sender_protocol,
        1,
        on_message=lambda *_: None,
        on_closed=lambda *_: None,
        description="receiver",
    )
    receiver.start()
    sender.start()
    return sender, receiver


def test_a_blocked_inline_request_does_not_stop_the_next_from_being_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    gate = threading.Event()
    entered = threading.Event()
    ran_in: dict[int, str] = {}
    done: dict[int, bool] = {}
    finished = threading.Event()
    closed: list[BaseException | None] = []

    def handle(message: Message) -> None:
        ran_in[message.request_id] = threading.current_thread().name
        if message.request_id == 1:
            entered.set()
            done[1] = gate.wait(WAIT_S)  # a plain Event: no Future.wait, no on_block hand-off
        else:
            gate.set()
            done[2] = True
        if len(done) == 2:
            finished.set()

    def on_message(conn: PeerConnection, message: Message) -> None:
        if conn.may_run_inline():
            conn.run_inline(handle, message)
        else:
            threading.Thread(target=handle, args=(message,)).start()

    sender, receiver = _connected(pair, on_message, lambda _, error: closed.append(error))
    try:
        sender.send(MessageKind.REQUEST, 1, b"first")
        assert entered.wait(WAIT_S)
        # The first request is running in the reader thread, blocked until the second runs.
        assert "reader" in ran_in[1]
        sender.send(MessageKind.REQUEST, 2, b"second")
        assert finished.wait(WAIT_S), f"the second request was never read: {ran_in}"
        assert done == {1: True, 2: True}
        assert "reader" in ran_in[2]  # read (and run) by the thread that took over
    finally:
        gate.set()
        sender.close()
        receiver.close()
    assert closed == [None] or closed == []


def test_readers_taken_over_are_reused_and_end_with_the_connection(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A handler that blocks (``Future.wait``) hands the reading to another thread; once it is
    done its thread parks, and the next hand-off wakes it instead of starting a thread: a
    connection whose every request blocks runs on two reader threads, not one per request."""
    rounds = 20
    threads: list[threading.Thread] = []
    finished: queue.Queue[int] = queue.Queue()

    def on_message(conn: PeerConnection, message: Message) -> None:
        threads.append(threading.current_thread())
        reply: Future[None] = Future()
        threading.Timer(0.001, reply.set_result, (None,)).start()
        conn.run_inline(reply.wait)  # blocks: the reader hands off first
        finished.put(message.request_id)

    sender, receiver = _connected(pair, on_message)
    try:
        for request_id in range(rounds):
            sender.send(MessageKind.REQUEST, request_id, b"x")
            assert finished.get(timeout=WAIT_S) == request_id
            # (the next request comes once this handler is done: its reader parks first)
            deadline = time.monotonic() + WAIT_S
            while not receiver._spares and threads[-1].is_alive() and time.monotonic() < deadline:
                time.sleep(0.001)
        distinct = {id(t) for t in threads}
        assert len(threads) == rounds
        assert len(distinct) <= 2, f"{len(distinct)} reader threads for {rounds} hand-offs"
    finally:
        sender.close()
        receiver.close()
    for thread in set(threads):
        thread.join(WAIT_S)
        assert not thread.is_alive(), "a spare reader outlived its connection"


def test_may_run_inline_only_in_the_reader_and_with_nothing_buffered(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender_sock, receiver_sock = pair
    sender_protocol, receiver_protocol = _handshaken(sender_sock, receiver_sock)
    seen: list[tuple[int, bool]] = []
    all_seen = threading.Event()

    def on_message(conn: PeerConnection, message: Message) -> None:
        seen.append((message.request_id, conn.may_run_inline()))
        if len(seen) == 3:
            all_seen.set()

    receiver = PeerConnection(
        receiver_sock,
        receiver_protocol,
        0,
        on_message=on_message,
        on_closed=lambda *_: None,
        description="sender",
    )
    assert not receiver.may_run_inline()  # not the reader thread
    # Three frames in one write: the reader sees the first two with more data behind them.
    frames = b"".join(
        bytes(part)
        for request_id in (1, 2, 3)
        for part in sender_protocol.send_message(MessageKind.REQUEST, request_id, b"x")
    )
    sender_sock.sendall(frames)
    receiver.start()
    try:
        assert all_seen.wait(WAIT_S)
        assert seen == [(1, False), (2, False), (3, True)]
    finally:
        receiver.close()


class _Recorder:
    """A receiving PeerConnection that runs each request inline when ``may_run_inline()``
    allows (the request's handler: ``handlers[id]``, else nothing) and records
    (request id, whether it ran inline); frames are written raw, several in one write."""

    def __init__(self, pair: tuple[socket.socket, socket.socket]) -> None:
        self._sock, receiver_sock = pair
        self._sender_protocol, receiver_protocol = _handshaken(self._sock, receiver_sock)
        self.seen: list[tuple[int, bool]] = []
        self.handlers: dict[int, Callable[[], None]] = {}
        self._changed = threading.Condition()
        self.receiver = PeerConnection(
            receiver_sock,
            receiver_protocol,
            0,
            on_message=self._on_message,
            on_closed=lambda *_: None,
            description="sender",
        )
        self.receiver.start()

    def _on_message(self, conn: PeerConnection, message: Message) -> None:
        inline = conn.may_run_inline()
        with self._changed:
            self.seen.append((message.request_id, inline))
            self._changed.notify_all()
        if inline:
            conn.run_inline(self.handlers.get(message.request_id, lambda: None))

    def send(self, *request_ids: int) -> None:
        """Write these requests in one system call: the reader finds all but the last with
        more data behind them."""
        self._sock.sendall(
            b"".join(
                bytes(part)
                for request_id in request_ids
                for part in self._sender_protocol.send_message(
                    MessageKind.REQUEST, request_id, b"x"
                )
            )
        )

    def wait_for(self, count: int) -> list[tuple[int, bool]]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.seen) >= count, WAIT_S)
            return list(self.seen)


def test_after_a_quick_inline_request_waiting_ones_run_inline_too(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind requests that the reader ran quickly (a stream of small calls), the ones
    waiting run in the reader too: a pool hand-off would cost more than the wait."""
    monkeypatch.setattr(_transport, "INLINE_QUICK_S", 60.0)  # every request here is quick
    recorder = _Recorder(pair)
    try:
        recorder.send(1)  # alone: inline, and now known to be quick
        assert recorder.wait_for(1) == [(1, True)]
        recorder.send(2, 3, 4)
        assert recorder.wait_for(4) == [(1, True), (2, True), (3, True), (4, True)]
    finally:
        recorder.receiver.close()


def test_behind_a_slow_inline_request_waiting_ones_go_to_the_pool(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a request that was not quick, those waiting behind it are not run inline (the
    agent gives them to its pool, to run concurrently) until the reader has caught up."""
    monkeypatch.setattr(_transport, "INLINE_QUICK_S", 0.0)  # no request is quick
    recorder = _Recorder(pair)
    try:
        recorder.send(1, 2, 3)
        assert recorder.wait_for(3) == [(1, False), (2, False), (3, True)]
        recorder.send(4, 5)  # 3 ran inline, and was slow
        assert recorder.wait_for(5)[3:] == [(4, False), (5, True)]
    finally:
        recorder.receiver.close()


def test_after_a_take_over_waiting_requests_go_to_the_pool(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that held the reader until the watchdog took over was not quick, however
    quick the ones before it: the new reader gives the waiting requests to the pool, so a
    burst of slow requests does not make each wait for its own take-over."""
    monkeypatch.setattr(_transport, "INLINE_QUICK_S", 60.0)
    recorder = _Recorder(pair)
    gate = threading.Event()

    def block() -> None:  # on a plain Event, not a Future: no hand-off but the watchdog's
        gate.wait(WAIT_S)

    recorder.handlers[2] = block
    try:
        recorder.send(1)
        assert recorder.wait_for(1) == [(1, True)]
        recorder.send(2)  # runs inline, blocks: the watchdog hands reading to a new thread
        assert recorder.wait_for(2) == [(1, True), (2, True)]
        recorder.send(3, 4)
        assert recorder.wait_for(4)[2:] == [(3, False), (4, True)]
    finally:
        gate.set()
        recorder.receiver.close()


@pytest.mark.skipif(not _shm.available(), reason="needs memfd and file sealing")
def test_a_release_with_no_frame_to_ride_on_still_goes_out(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A segment RELEASE waits for the next frame on the connection; when none comes (a
    one-way transfer), the watchdog sends it, and the sender's segment is free again."""
    arrived = threading.Event()
    sender, receiver = _connected(pair, lambda *_: arrived.set())
    try:
        sender.send(MessageKind.NOTIFY, 0, b"big", [memoryview(bytes(_shm.STAGE_MIN_BYTES))])
        assert arrived.wait(WAIT_S)
        outbox = sender._outbox
        assert outbox is not None and outbox.segment_count() == 1
        deadline = time.monotonic() + WAIT_S
        while not outbox.free_count():
            assert time.monotonic() < deadline, "the RELEASE never arrived"
            time.sleep(0.001)
    finally:
        sender.close()
        receiver.close()


@pytest.mark.skipif(not _shm.available(), reason="needs memfd and file sealing")
def test_a_segment_retired_on_release_is_unmapped_by_the_peer_too(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no room in the cache, a released segment is retired at once: the sender drops
    it, and its RETIRE frame makes the receiver unmap it as well."""
    monkeypatch.setattr(_shm, "CACHE_BYTES", 0)
    arrived = threading.Event()
    sender, receiver = _connected(pair, lambda *_: arrived.set())
    try:
        sender.send(MessageKind.NOTIFY, 0, b"big", [memoryview(bytes(_shm.STAGE_MIN_BYTES))])
        assert arrived.wait(WAIT_S)
        outbox, inbox = sender._outbox, receiver._inbox
        assert outbox is not None and inbox is not None
        deadline = time.monotonic() + WAIT_S
        while outbox.segment_count() or inbox.segment_count():
            assert time.monotonic() < deadline, "the segment was not retired on both ends"
            time.sleep(0.001)
    finally:
        sender.close()
        receiver.close()


def _polls_for_frames(
    pair: tuple[socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    *,
    busy_poll_s: float,
    count: int,
    spacing_s: float = 0.0,
) -> list[int | None]:
    """Send ``count`` frames, each ``spacing_s`` after the receiver got the previous one (the
    first, ``spacing_s`` after the receiver started); what the receiver's ``_poll`` calls
    returned meanwhile (bytes received, or None for a poll that ran out of time)."""
    results: list[int | None] = []
    poll = PeerConnection._poll

    def recorded(self: PeerConnection, view: memoryview, deadline: float) -> int | None:
        result = poll(self, view, deadline)
        results.append(result)
        return result

    monkeypatch.setattr(PeerConnection, "_poll", recorded)
    arrived: queue.Queue[int] = queue.Queue()
    sender, receiver = _connected(
        pair, lambda _, message: arrived.put(message.request_id), busy_poll_s=busy_poll_s
    )
    try:
        for request_id in range(count):
            time.sleep(spacing_s)  # the frames' spacing is what is under test
            sender.send(MessageKind.NOTIFY, request_id, b"x")
            assert arrived.get(timeout=WAIT_S) == request_id
        return results.copy()
    finally:
        sender.close()
        receiver.close()


def test_a_reader_polls_for_frames_that_come_close_together(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    polls = _polls_for_frames(pair, monkeypatch, busy_poll_s=WAIT_S, count=20)
    # The first wait slept (nothing had come yet); it was short, so every later frame was
    # taken by polling.
    assert len(polls) >= 19
    assert all(received for received in polls[:19]), polls


def test_a_reader_does_not_poll_for_frames_further_apart(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    polls = _polls_for_frames(pair, monkeypatch, busy_poll_s=0.005, count=5, spacing_s=0.02)
    # Every wait was long, so the reader slept in recv each time.
    assert polls == [], polls


def test_a_reader_that_stopped_polling_tries_again_once_in_probe_every_waits(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 2 * _transport._PROBE_EVERY + 4
    polls = _polls_for_frames(pair, monkeypatch, busy_poll_s=0.002, count=count, spacing_s=0.008)
    # Two probes (at the 17th and 34th wait), each running out of time: so a stream that is
    # quick only when polled gets polled again, and a sparse one wastes one poll in 16 waits.
    assert polls == [None, None], polls


def _decisions(policy: _transport._PollPolicy, waits: list[float]) -> list[bool]:
    """Whether ``policy`` polled for each of these waits (seconds), in turn."""
    polled = []
    for seconds in waits:
        polled.append(policy.poll())
        policy.waited(seconds)
    return polled


def test_the_poll_policy_polls_after_short_waits_and_through_one_long_one() -> None:
    window = 0.001
    short, long = window / 2, window * 2
    polled = _decisions(_transport._PollPolicy(window), [short, short, long, short, short])
    # Not before anything came; then after every short wait, and through one long wait.
    assert polled == [False, True, True, True, True]
    polled = _decisions(_transport._PollPolicy(window), [short, long, long, long, short, short])
    # Two long waits in a row stop it; a short one (here not polled) starts it again.
    assert polled == [False, True, True, False, False, True]
    assert _decisions(_transport._PollPolicy(0.0), [0.0] * 5) == [False] * 5  # 0: never


def test_the_poll_policy_probes_once_in_probe_every_waits_after_stopping() -> None:
    window = 0.001
    every = _transport._PROBE_EVERY
    polled = _decisions(_transport._PollPolicy(window), [window * 2] * (3 * every + 3))
    assert [i for i, p in enumerate(polled) if p] == [every, 2 * every + 1, 3 * every + 2]


def test_a_reader_stops_using_the_cpu_when_frames_stop_coming(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    arrived: queue.Queue[int] = queue.Queue()
    idle_s = 0.5
    sender, receiver = _connected(
        pair, lambda _, message: arrived.put(message.request_id), busy_poll_s=idle_s / 10
    )
    try:
        for request_id in range(20):  # close together: the reader is polling afterwards
            sender.send(MessageKind.NOTIFY, request_id, b"x")
            assert arrived.get(timeout=WAIT_S) == request_id
        reader = receiver._reader
        assert reader is not None and reader.ident is not None
        cpu_clock = time.pthread_getcpuclockid(reader.ident)
        before = time.clock_gettime(cpu_clock)
        time.sleep(idle_s)  # idle: what is under test
        used = time.clock_gettime(cpu_clock) - before
        # It polls for at most _LONG_WAITS * busy_poll_s after the last frame (polling
        # throughout would take about idle_s of CPU), then sleeps in recv.
        assert used < idle_s / 2, used
    finally:
        sender.close()
        receiver.close()


@pytest.fixture
def dozing_watchdog(monkeypatch: pytest.MonkeyPatch) -> _transport._Watchdog:
    """A watchdog of the connections made from now on, whose doze outlasts every wait of the
    tests: what it does while dozing, it does because something woke it."""
    monkeypatch.setattr(_transport, "IDLE_CHECK_S", 10 * WAIT_S)
    watchdog = _transport._Watchdog()
    monkeypatch.setattr(_transport, "_WATCHDOG", watchdog)
    return watchdog


def _wait_until_it_dozes(watchdog: _transport._Watchdog) -> None:
    deadline = time.monotonic() + WAIT_S
    while not watchdog.dozing:
        assert time.monotonic() < deadline, "the watchdog never dozed"
        time.sleep(0.001)


def test_a_dozing_watchdog_wakes_to_take_over_from_a_blocked_inline_request(
    pair: tuple[socket.socket, socket.socket], dozing_watchdog: _transport._Watchdog
) -> None:
    entered = threading.Event()
    gate = threading.Event()
    second_read = threading.Event()

    def block() -> None:
        entered.set()
        gate.wait(WAIT_S)  # a plain Event: no Future.wait, no on_block hand-off

    def on_message(conn: PeerConnection, message: Message) -> None:
        if message.request_id == 1:
            conn.run_inline(block)
        else:
            second_read.set()

    sender, receiver = _connected(pair, on_message)
    try:
        _wait_until_it_dozes(dozing_watchdog)
        sender.send(MessageKind.REQUEST, 1, b"blocks")
        assert entered.wait(WAIT_S)
        sender.send(MessageKind.REQUEST, 2, b"next")
        assert second_read.wait(WAIT_S), "the watchdog slept through a blocked inline request"
    finally:
        gate.set()
        sender.close()
        receiver.close()


def test_a_dozing_watchdog_wakes_to_send_a_deferred_frame(
    pair: tuple[socket.socket, socket.socket], dozing_watchdog: _transport._Watchdog
) -> None:
    arrived: queue.Queue[int] = queue.Queue()
    sender, receiver = _connected(pair, lambda _, message: arrived.put(message.request_id))
    try:
        _wait_until_it_dozes(dozing_watchdog)
        sender.send(MessageKind.NOTIFY, 7, b"deferred", defer=True)  # no frame follows it
        assert arrived.get(timeout=WAIT_S) == 7
    finally:
        sender.close()
        receiver.close()


def test_the_watchdog_writes_only_frames_left_queued_for_a_whole_tick(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sock, _ = pair
    conn = PeerConnection(  # not started: no watchdog looks at it but this test
        sock,
        Connection(key=None, identity=b"a"),
        1,
        on_message=lambda *_: None,
        on_closed=lambda *_: None,
        description="peer",
    )
    try:
        assert not conn._left_behind()  # nothing queued
        conn._queue.append([b"first"])
        assert not conn._left_behind()  # queued since the last look: it may ride along yet
        assert conn._left_behind()  # still the oldest a tick later: nothing sent it
        conn._queue.popleft()  # a sender took it, and another frame waits
        conn._queue.append([b"second"])
        assert not conn._left_behind()
    finally:
        conn.close()
