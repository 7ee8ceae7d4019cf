"""What a ``PeerConnection`` promises when its peer does not read, on a loopback TCP pair whose
far end is a bare socket the test reads (or not) itself.

- ``send`` returns at once whatever the peer does: what the socket does not take waits in the
  connection's backlog, copied when it is the caller's memory (the caller may change its
  buffers after ``send`` returns), and reaches the peer intact and in order once it reads,
  small frames sent meanwhile included.
- The backlog is bounded: beyond ``max_send_queue_bytes`` a send fails at once with
  ``SendQueueFullError`` (a ConnectionError and a RuntimeError, naming the peer and the
  limit), the connection stays open, and sends succeed again once the peer has read.
- ``drop`` takes back a droppable message that waits untouched in the backlog (it never
  reaches the peer); not one that is started, not one sent without ``droppable``.
- A send that meets a broken socket fails with ConnectionError, closes the connection, and
  keeps nothing of the caller's: reference counting frees its buffers at once (no cycle
  waits for the collector: a lent shared-memory segment would stay mapped until then).
- The heartbeat closes a connection whose peer stays silent for three intervals, with an
  error that says so; a peer that answers (a PeerConnection) keeps an idle connection open.

The multi-process forms (SIGSTOP of a real worker, shared memory included) are in
test_rpc_frozen_peer.py.
"""

from __future__ import annotations

import gc
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from thenable.rpc import SendQueueFullError
from thenable.rpc._net.sockets import handshake
from thenable.rpc._net.transport import PeerConnection
from thenable.rpc._wire.protocol import Connection, Message, MessageKind

WAIT_S = 10.0
MIB = 1 << 20
# A send that "returns at once" returns within this (it may wait _PATIENCE_S, 0.05 s, for
# the socket; the rest is a loaded machine's noise).
AT_ONCE_S = 1.0
SOCKET_BUFFER = 64 << 10


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (no shared memory: the bare far end reads plain frames)
    with small socket buffers, so that a peer that does not read stalls the sender soon."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        ours.connect(server.getsockname())
        theirs, _ = server.accept()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    yield ours, theirs
    ours.close()
    theirs.close()


class _Peer:
    """The far end: a bare socket with its protocol, read only when the test says so."""

    def __init__(self, sock: socket.socket, protocol: Connection) -> None:
        self.sock = sock
        self.protocol = protocol

    def read(self, count: int) -> list[Message]:
        """The next ``count`` messages that are not CONTROL frames (heartbeats, releases)."""
        self.sock.settimeout(WAIT_S)
        messages: list[Message] = []
        while len(messages) < count:
            event = self.protocol.next_event()
            if event is None:
                view = self.protocol.get_buffer()
                self.protocol.buffer_updated(self.sock.recv_into(view))
            elif isinstance(event, Message) and event.kind is not MessageKind.CONTROL:
                messages.append(event)
        return messages


def _handshaken(a: socket.socket, b: socket.socket) -> tuple[Connection, Connection]:
    """Both ends' protocols after a handshake (in two threads, as two workers do)."""
    protocols: dict[int, Connection] = {}

    def side(index: int, sock: socket.socket) -> None:
        protocol = Connection(key=None, identity=b"end%d" % index)
        handshake(sock, protocol, WAIT_S)
        protocols[index] = protocol

    other = threading.Thread(target=side, args=(1, b))
    other.start()
    side(0, a)
    other.join(WAIT_S)
    return protocols[0], protocols[1]


class _Closed:
    """An on_closed handler that keeps what it was told."""

    def __init__(self) -> None:
        self.errors: list[BaseException | None] = []
        self.event = threading.Event()

    def __call__(self, _: PeerConnection, error: BaseException | None) -> None:
        self.errors.append(error)
        self.event.set()


def _connected(
    pair: tuple[socket.socket, socket.socket], closed: _Closed | None = None, **options: Any
) -> tuple[PeerConnection, _Peer]:
    """A started sender (``options``: PeerConnection's) and the bare far end, handshaken."""
    ours, theirs = pair
    sender_protocol, peer_protocol = _handshaken(ours, theirs)
    sender = PeerConnection(
        ours,
        sender_protocol,
        1,
        on_message=lambda *_: None,
        on_closed=closed or _Closed(),
        description="the peer (rank 1)",
        **options,
    )
    sender.start()
    return sender, _Peer(theirs, peer_protocol)


def _timed_send(
    conn: PeerConnection, request_id: int, header: bytes, *buffers: bytes | bytearray
) -> float:
    start = time.monotonic()
    conn.send(MessageKind.REQUEST, request_id, header, [memoryview(b) for b in buffers])
    return time.monotonic() - start


def test_sends_to_a_peer_that_does_not_read_return_at_once_and_arrive_intact_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, peer = _connected(pair)
    try:
        originals: list[bytes] = []
        longest = 0.0
        for i in range(12):
            payload = bytearray(bytes([i + 1]) * MIB)
            originals.append(bytes(payload))
            longest = max(longest, _timed_send(sender, 2 * i, b"large", payload))
            payload[:] = b"\xff" * MIB  # the caller's memory changes once send returned
            longest = max(longest, _timed_send(sender, 2 * i + 1, b"small %d" % i))
        assert longest < AT_ONCE_S, f"a send blocked for {longest:.2f} s"
        messages = peer.read(24)
        assert [m.request_id for m in messages] == list(range(24))
        for i in range(12):
            large, small = messages[2 * i], messages[2 * i + 1]
            assert bytes(large.header) == b"large"
            assert [bytes(b) for b in large.buffers] == [originals[i]]
            assert bytes(small.header) == b"small %d" % i and not small.buffers
    finally:
        sender.close()


def test_a_full_send_queue_fails_at_once_naming_the_peer_and_the_limit(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    limit = 2 * MIB
    sender, peer = _connected(pair, max_send_queue_bytes=limit)
    try:
        sent = 0
        with pytest.raises(SendQueueFullError) as info:
            for request_id in range(10):
                _timed_send(sender, request_id, b"x", bytes(MIB))
                sent += 1
        error = info.value
        assert isinstance(error, ConnectionError) and isinstance(error, RuntimeError)
        message = str(error)
        assert "the peer (rank 1) is not reading" in message
        assert f"max_send_queue_bytes={limit}" in message and "retry" in message
        assert 2 <= sent <= 4  # the socket's buffers, then the 2 MiB backlog
        assert not sender.closed
        # Once the peer reads what waits, the connection takes more.
        assert [m.request_id for m in peer.read(sent)] == list(range(sent))
        _timed_send(sender, 100, b"after", bytes(MIB))
        assert [m.request_id for m in peer.read(1)] == [100]
    finally:
        sender.close()


def test_a_message_waiting_untouched_in_the_backlog_can_be_taken_back(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, peer = _connected(pair)
    try:
        for request_id in range(6):
            sender.send(
                MessageKind.REQUEST,
                request_id,
                b"h",
                [memoryview(bytes(MIB))],
                droppable=request_id != 5,
            )
        assert not sender.drop(0)  # written (at least begun) before it could wait
        assert sender.drop(3)
        assert not sender.drop(3)  # once
        assert not sender.drop(5)  # not droppable
        assert not sender.drop(99)  # never sent
        assert [m.request_id for m in peer.read(5)] == [0, 1, 2, 4, 5]
    finally:
        sender.close()


def test_a_send_that_fails_keeps_nothing_of_the_callers_alive(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    closed = _Closed()
    sender, _peer = _connected(pair, closed)
    payload = np.ones(MIB, np.uint8)
    alive = weakref.ref(payload)
    gc.collect()
    gc.disable()  # what follows must be freed by reference counting alone
    try:
        pair[0].shutdown(socket.SHUT_WR)  # the next write fails: EPIPE
        try:
            sender.send(MessageKind.REQUEST, 1, b"x", [payload.data])
        except ConnectionError as exc:
            message = str(exc)
        else:
            pytest.fail("a send on a broken socket succeeded")
        assert "sending to the peer (rank 1) failed" in message
        assert closed.event.wait(WAIT_S) and sender.closed
        closed.errors.clear()  # (the error's traceback refers to the frames of the send)
        del payload
        assert alive() is None, "a reference cycle keeps the caller's buffer"
    finally:
        gc.enable()
        sender.close()


def test_the_heartbeat_closes_a_connection_whose_peer_stays_silent(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    closed = _Closed()
    start = time.monotonic()
    sender, _peer = _connected(pair, closed, heartbeat_s=0.2)
    try:
        assert closed.event.wait(WAIT_S)
        elapsed = time.monotonic() - start
        assert 0.6 <= elapsed < 0.6 + 3.0, elapsed  # three silent heartbeats, and the watchdog
        (error,) = closed.errors
        assert isinstance(error, ConnectionError)
        assert "the peer (rank 1) has sent nothing" in str(error)
        assert "heartbeat_s=0.2" in str(error)
        with pytest.raises(ConnectionError, match="is closed"):
            sender.send(MessageKind.REQUEST, 1, b"late")
    finally:
        sender.close()


def test_a_peer_that_answers_heartbeats_keeps_an_idle_connection_open(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    closed = _Closed()
    protocols = _handshaken(*pair)
    conns = [
        PeerConnection(
            sock,
            protocol,
            rank,
            on_message=lambda *_: None,
            on_closed=closed,
            description=f"rank {rank}",
            heartbeat_s=0.2,
        )
        for sock, protocol, rank in zip(pair, protocols, (1, 0), strict=True)
    ]
    for conn in conns:
        conn.start()
    try:
        # Idle for five times what a silent peer is given: the PONGs keep both ends open.
        assert not closed.event.wait(3.0), closed.errors
        assert not any(conn.closed for conn in conns)
    finally:
        for conn in conns:
            conn.close()
