"""What a ``Dialing`` (the link to a worker while it is being connected to) promises, with a
fake connection: sends never wait for the connect; what waits is a copy, goes out in order and
before anything sent later; a droppable request that still waits can be taken back; the bytes
waiting are bounded; a failed connect hands the waiting requests over and makes later sends
fail, naming the peer and the reason.  The multi-process forms (a peer frozen, or gone, before
the first contact) are in test_rpc_frozen_peer.py."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, cast

import pytest

from thenable.rpc import SendQueueFullError
from thenable.rpc._net.dialing import Dialing
from thenable.rpc._net.transport import PeerConnection
from thenable.rpc._wire.protocol import MessageKind

WAIT_S = 10.0
REQUEST, NOTIFY = MessageKind.REQUEST, MessageKind.NOTIFY


class _FakeConnection:
    """Records what is sent on it, as bytes."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[tuple[MessageKind, int, bytes, list[bytes], bool]] = []

    def send(
        self,
        kind: MessageKind,
        request_id: int,
        header: bytes,
        buffers: Sequence[memoryview] = (),
        *,
        defer: bool = False,
        droppable: bool = False,
    ) -> None:
        self.sent.append((kind, request_id, bytes(header), [bytes(b) for b in buffers], droppable))

    def drop(self, request_id: int) -> bool:
        return False


class _Outcome:
    """What the handlers were told."""

    def __init__(self) -> None:
        self.connected: list[tuple[Any, list[tuple[int, BaseException]]]] = []
        self.failed: list[tuple[BaseException, list[int]]] = []
        self.done = threading.Event()

    def on_connected(
        self, _: Dialing, conn: PeerConnection, failed: list[tuple[int, ConnectionError]]
    ) -> None:
        self.connected.append((conn, list(failed)))
        self.done.set()

    def on_failed(self, _: Dialing, error: BaseException, waited: list[int]) -> None:
        self.failed.append((error, waited))
        self.done.set()


def _dialing(connect: Any, outcome: _Outcome, max_waiting_bytes: int = 1 << 20) -> Dialing:
    dialing = Dialing(
        1, "worker1 (rank 1)", max_waiting_bytes, connect, outcome.on_connected, outcome.on_failed
    )
    dialing.start()
    return dialing


class _HeldConnect:
    """A ``connect`` that returns ``fake`` once the test sets ``release``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.fake = _FakeConnection()

    def __call__(self) -> PeerConnection:
        assert self.release.wait(WAIT_S)
        return cast(PeerConnection, self.fake)


def test_what_waits_is_a_copy_and_goes_out_in_order_before_later_sends() -> None:
    connect = _HeldConnect()
    release, fake = connect.release, connect.fake
    outcome = _Outcome()
    dialing = _dialing(connect, outcome)
    payload = bytearray(b"before")
    dialing.send(REQUEST, 1, b"first", [memoryview(payload)], droppable=True)
    payload[:] = b"AFTER!"  # the caller's memory changes once send returned
    dialing.send(NOTIFY, 0, b"note")
    dialing.send(REQUEST, 2, b"second")
    assert fake.sent == [] and not dialing.closed  # still connecting: nothing went out
    release.set()
    assert dialing.wait(WAIT_S) is cast(PeerConnection, fake)
    dialing.send(REQUEST, 3, b"later")  # straight through now
    assert outcome.done.wait(WAIT_S)
    assert [(kind, rid, header) for kind, rid, header, _, _ in fake.sent] == [
        (REQUEST, 1, b"first"),
        (NOTIFY, 0, b"note"),
        (REQUEST, 2, b"second"),
        (REQUEST, 3, b"later"),
    ]
    assert fake.sent[0][3] == [b"before"] and fake.sent[0][4]  # the copy, still droppable
    assert outcome.connected == [(fake, [])] and outcome.failed == []
    assert dialing.connection is cast(PeerConnection, fake)


def test_a_droppable_request_that_still_waits_can_be_taken_back() -> None:
    connect = _HeldConnect()
    release, fake = connect.release, connect.fake
    outcome = _Outcome()
    dialing = _dialing(connect, outcome)
    dialing.send(REQUEST, 1, b"a", droppable=True)
    dialing.send(REQUEST, 2, b"b")
    assert dialing.drop(1)
    assert not dialing.drop(1)  # once
    assert not dialing.drop(2)  # not droppable
    assert not dialing.drop(99)  # never sent
    release.set()
    dialing.wait(WAIT_S)
    assert [rid for _, rid, _, _, _ in fake.sent] == [2]


def test_the_bytes_waiting_for_the_connection_are_bounded() -> None:
    connect = _HeldConnect()
    release = connect.release
    dialing = _dialing(connect, _Outcome(), max_waiting_bytes=1000)
    try:
        dialing.send(REQUEST, 1, b"h", [memoryview(bytes(5000))])  # alone: taken, whatever size
        with pytest.raises(SendQueueFullError) as info:
            dialing.send(REQUEST, 2, b"h", [memoryview(bytes(10))])
        assert isinstance(info.value, RuntimeError)
        message = str(info.value)
        assert "worker1 (rank 1) is not connected yet" in message
        assert "max_send_queue_bytes=1000" in message
    finally:
        release.set()
        dialing.wait(WAIT_S)


def test_a_failed_connect_hands_over_the_waiting_requests_and_fails_later_sends() -> None:
    release = threading.Event()

    def connect() -> PeerConnection:
        assert release.wait(WAIT_S)
        raise ConnectionRefusedError("refused by the test")

    outcome = _Outcome()
    dialing = _dialing(connect, outcome)
    dialing.send(REQUEST, 7, b"a")
    dialing.send(NOTIFY, 0, b"note")  # not a call: nothing to fail
    dialing.send(REQUEST, 8, b"b")
    release.set()
    assert outcome.done.wait(WAIT_S)
    ((error, waited),) = outcome.failed
    assert str(error) == "cannot reach worker1 (rank 1): refused by the test"
    assert isinstance(error.__cause__, ConnectionRefusedError) and waited == [7, 8]
    assert dialing.closed and dialing.connection is None
    with pytest.raises(ConnectionError, match=r"cannot reach worker1 \(rank 1\): refused"):
        dialing.send(REQUEST, 9, b"c")
    with pytest.raises(ConnectionError, match="cannot reach"):
        dialing.wait(WAIT_S)
