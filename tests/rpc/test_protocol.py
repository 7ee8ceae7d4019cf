"""Tests of the sans-IO wire protocol (thenable.rpc._wire.protocol) over a fake link."""

from __future__ import annotations

import array
import ctypes
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thenable.rpc._net import memory as _recycled
from thenable.rpc._wire import protocol as _protocol
from thenable.rpc._wire.protocol import (
    MAX_BUFFERS,
    MIN_FRAME_BYTES,
    PROTOCOL_VERSION,
    Allocate,
    AuthenticationError,
    Connection,
    ConnectionClosed,
    ConnectionState,
    Event,
    HandshakeComplete,
    Message,
    MessageKind,
    ProtocolError,
)

KEY = b"correct horse battery staple"
FRAME = struct.Struct("!2sBBIQQI")  # magic, kind, reserved, flags, request_id, hlen, nbuf
HELLO = struct.Struct("!8sHBx32sQH")  # magic, version, flags, nonce, max_frame, id_len


def _nonce(n: int) -> bytes:
    return bytes([n]) * 32


def _join(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def _feed(conn: Connection, data: bytes) -> None:
    if data:  # b"" would mean EOF
        conn.receive_data(data)


def _drain(conn: Connection) -> list[Event]:
    """Every event available now."""
    events: list[Event] = []
    while (event := conn.next_event()) is not None:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def _pump(a: Connection, b: Connection, a_out: bytes, b_out: bytes) -> tuple[list[Event], ...]:
    """Shuttle bytes between two connections over a perfect link until both are quiet."""
    events_a: list[Event] = []
    events_b: list[Event] = []
    while a_out or b_out:
        _feed(b, a_out)
        _feed(a, b_out)
        events_a += _drain(a)
        events_b += _drain(b)
        a_out, b_out = a.data_to_send(), b.data_to_send()
    return events_a, events_b


def _open_pair(
    key_a: bytes | None = KEY,
    key_b: bytes | None = KEY,
    max_frame_bytes: int = 1 << 30,
    allocate: Allocate = _recycled.allocate,  # the transport's
) -> tuple[Connection, Connection]:
    """Two ends after the handshake, receiving into memory from ``allocate``."""
    a = Connection(
        key=key_a, identity=b"worker-a", max_frame_bytes=max_frame_bytes, allocate=allocate
    )
    b = Connection(
        key=key_b, identity=b"worker-b", max_frame_bytes=max_frame_bytes, allocate=allocate
    )
    events_a, events_b = _pump(a, b, a.initiate(), b.initiate())
    assert events_a == [HandshakeComplete(b"worker-b")]
    assert events_b == [HandshakeComplete(b"worker-a")]
    return a, b


def _frame(kind: int, nbuffers: int = 0, header_len: int = 0, magic: bytes = b"TN") -> bytes:
    return FRAME.pack(magic, kind, 0, 0, 1, header_len, nbuffers)


def _only_message(events: list[Event]) -> Message:
    assert len(events) == 1
    message = events[0]
    assert isinstance(message, Message)
    return message


# -- handshake -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY, None])
def test_handshake_completes_and_exchanges_identities(key: bytes | None) -> None:
    a, b = _open_pair(key, key)
    assert a.state is b.state is ConnectionState.OPEN
    assert a.peer_identity == b"worker-b"
    assert b.peer_identity == b"worker-a"


def test_handshake_without_key_sends_only_hello() -> None:
    a = Connection(key=None, identity=b"a")
    b = Connection(key=None, identity=b"b")
    b.initiate()
    b.receive_data(a.initiate())
    assert b.next_event() == HandshakeComplete(b"a")
    assert b.data_to_send() == b""


def test_peer_limit_is_advertised_and_enforced_on_send() -> None:
    a = Connection(key=KEY, identity=b"a", max_frame_bytes=1 << 30)
    b = Connection(key=KEY, identity=b"b", max_frame_bytes=4096)
    _pump(a, b, a.initiate(), b.initiate())
    assert a.peer_max_frame_bytes == 4096
    a.send_message(MessageKind.REQUEST, 1, b"x" * 1000)
    with pytest.raises(ValueError, match="exceeds the peer's limit of 4096"):
        a.send_message(MessageKind.REQUEST, 1, b"h", [bytes(5000)])


def test_wrong_key_fails_on_both_sides() -> None:
    a = Connection(key=KEY, identity=b"a")
    b = Connection(key=b"another key", identity=b"b")
    _feed(b, a.initiate())
    _feed(a, b.initiate())
    assert a.next_event() is None
    assert b.next_event() is None
    _feed(b, a.data_to_send())
    _feed(a, b.data_to_send())
    for conn in (a, b):
        with pytest.raises(AuthenticationError, match="wrong or missing key"):
            conn.next_event()
        assert conn.state is ConnectionState.ERROR
        conn.receive_data(b"ignored")  # a dead connection drops data
        with pytest.raises(ProtocolError, match="already failed"):
            conn.next_event()
        with pytest.raises(RuntimeError, match="ERROR"):
            conn.send_message(MessageKind.REQUEST, 1, b"")


@pytest.mark.parametrize("keyed_side", ["a", "b"])
def test_key_on_one_side_only_fails_on_both_sides(keyed_side: str) -> None:
    a = Connection(key=KEY if keyed_side == "a" else None, identity=b"a")
    b = Connection(key=KEY if keyed_side == "b" else None, identity=b"b")
    _feed(b, a.initiate())
    _feed(a, b.initiate())
    for conn in (a, b):
        with pytest.raises(AuthenticationError, match="wrong or missing key"):
            conn.next_event()
        assert conn.data_to_send() == b""  # no proof leaves a failed handshake


def test_reflected_proof_does_not_verify() -> None:
    a = Connection(key=KEY, identity=b"a")
    attacker = Connection(key=b"guess", identity=b"m")  # claims to have a key
    a.initiate()
    _feed(a, attacker.initiate())
    assert a.next_event() is None
    proof_from_a = a.data_to_send()
    assert proof_from_a
    _feed(a, proof_from_a)  # send a's own proof back to it
    with pytest.raises(AuthenticationError, match="wrong or missing key"):
        a.next_event()


def test_reflected_hello_is_rejected() -> None:
    a = Connection(key=KEY, identity=b"a")
    _feed(a, a.initiate())
    with pytest.raises(AuthenticationError, match="own nonce"):
        a.next_event()


def test_mirrored_connections_of_one_endpoint_are_rejected() -> None:
    # An attacker relays two connections of the same endpoint into each other.
    conn1 = Connection(key=KEY, identity=b"worker-a", nonce=_nonce(1))
    conn2 = Connection(key=KEY, identity=b"worker-a", nonce=_nonce(2))
    _feed(conn1, conn2.initiate())
    _feed(conn2, conn1.initiate())
    for conn in (conn1, conn2):
        with pytest.raises(AuthenticationError, match="own identity"):
            conn.next_event()
        assert conn.data_to_send() == b""


def test_replayed_handshake_does_not_verify() -> None:
    # Record b's HELLO and proof in one session ...
    a1 = Connection(key=KEY, identity=b"a")
    b1 = Connection(key=KEY, identity=b"b")
    b_hello = b1.initiate()
    _feed(b1, a1.initiate())
    assert b1.next_event() is None
    b_proof = b1.data_to_send()
    # ... and replay them to a fresh connection of a, which picks a new nonce.
    a2 = Connection(key=KEY, identity=b"a")
    a2.initiate()
    _feed(a2, b_hello + b_proof)
    with pytest.raises(AuthenticationError, match="wrong or missing key"):
        _drain(a2)


def test_message_frame_before_handshake_is_rejected() -> None:
    a = Connection(key=KEY, identity=b"a")
    b = Connection(key=KEY, identity=b"b")
    a.initiate()
    _feed(a, b.initiate() + _frame(MessageKind.REQUEST))
    with pytest.raises(ProtocolError, match="before the handshake completed"):
        _drain(a)


def test_frame_instead_of_hello_is_rejected() -> None:
    a = Connection(key=None, identity=b"a")
    a.initiate()
    _feed(a, _frame(MessageKind.REQUEST))
    with pytest.raises(ProtocolError, match="bad magic"):
        a.next_event()


def test_auth_frame_after_handshake_is_rejected() -> None:
    a, _ = _open_pair(None, None)
    _feed(a, _frame(0, header_len=32) + bytes(32))
    with pytest.raises(ProtocolError, match="after the handshake"):
        a.next_event()


def test_garbage_is_rejected_early() -> None:
    a = Connection(key=KEY, identity=b"a")
    a.initiate()
    _feed(a, b"GET")  # not even a whole HELLO: the magic is checked as it arrives
    with pytest.raises(ProtocolError, match=r"not a thenable\.rpc endpoint"):
        a.next_event()


def test_garbage_after_handshake_is_rejected() -> None:
    a, _ = _open_pair()
    _feed(a, b"\x00" * 64)
    with pytest.raises(ProtocolError, match="bad frame magic"):
        a.next_event()


def test_other_protocol_version_is_rejected() -> None:
    a = Connection(key=None, identity=b"a")
    a.initiate()
    hello = HELLO.pack(b"THNBLRPC", PROTOCOL_VERSION + 1, 0, _nonce(9), 1 << 20, 0)
    _feed(a, hello)
    with pytest.raises(ProtocolError, match=f"protocol version {PROTOCOL_VERSION + 1}"):
        a.next_event()


def test_api_misuse_raises_local_errors() -> None:
    a = Connection(key=KEY, identity=b"a")
    with pytest.raises(RuntimeError, match="initiate"):
        a.next_event()
    a.initiate()
    with pytest.raises(RuntimeError, match="already called"):
        a.initiate()
    with pytest.raises(RuntimeError, match="HANDSHAKING"):
        a.send_message(MessageKind.REQUEST, 1, b"")
    with pytest.raises(ValueError, match="nonce must be 32 bytes"):
        Connection(key=KEY, identity=b"a", nonce=b"short")
    with pytest.raises(ValueError, match="key must be non-empty"):
        Connection(key=b"", identity=b"a")
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Connection(key=None, identity=b"a", max_frame_bytes=MIN_FRAME_BYTES - 1)


# -- messages ------------------------------------------------------------------------------


def test_round_trip_of_all_kinds_and_buffer_types() -> None:
    a, b = _open_pair()
    big = bytearray(range(256)) * 64
    doubles = array.array("d", [1.5, 2.5, -3.0])
    for kind in MessageKind:
        parts = a.send_message(
            kind,
            2**64 - 1,
            b"pickled call",
            [big, b"", memoryview(doubles), b"tail"],
            flags=2**32 - 1,
        )
        # Buffers are referenced, not copied.
        assert any(isinstance(p, memoryview) and p.obj is big for p in parts)
        _feed(b, _join(parts))
        message = _only_message(_drain(b))
        assert message.kind is kind
        assert message.request_id == 2**64 - 1
        assert message.flags == 2**32 - 1
        assert bytes(message.header) == b"pickled call"
        assert [bytes(x) for x in message.buffers] == [
            bytes(big),
            b"",
            doubles.tobytes(),
            b"tail",
        ]
        assert not message.buffers[0].readonly  # received memory is the receiver's


def test_send_message_validates_arguments() -> None:
    a, _ = _open_pair()
    with pytest.raises(ValueError, match="unknown message kind 99"):
        a.send_message(99, 1, b"")
    with pytest.raises(ValueError, match="request_id"):
        a.send_message(MessageKind.REQUEST, -1, b"")
    with pytest.raises(ValueError, match="flags"):
        a.send_message(MessageKind.REQUEST, 1, b"", flags=2**32)
    with pytest.raises(TypeError, match=r"buffers\[0\] must be a bytes-like object"):
        a.send_message(MessageKind.REQUEST, 1, b"", ["text"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at most 65536 buffers"):
        a.send_message(MessageKind.REQUEST, 1, b"", [b""] * (MAX_BUFFERS + 1))
    strided = memoryview(bytes(10))[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        a.send_message(MessageKind.REQUEST, 1, strided)


def test_large_header_is_sent_separately() -> None:
    a, b = _open_pair()
    header = bytes(range(256)) * 100
    parts = a.send_message(MessageKind.RESPONSE, 5, header)
    assert len(parts) == 2
    _feed(b, _join(parts))
    assert bytes(_only_message(_drain(b)).header) == header


def test_byte_at_a_time() -> None:
    a = Connection(key=KEY, identity=b"a")
    b = Connection(key=KEY, identity=b"b")
    a_out, b_out = a.initiate(), b.initiate()
    events_a: list[Event] = []
    events_b: list[Event] = []
    while a_out or b_out:
        for byte in a_out:
            b.receive_data(bytes([byte]))
            events_b += _drain(b)
        for byte in b_out:
            a.receive_data(bytes([byte]))
            events_a += _drain(a)
        a_out, b_out = a.data_to_send(), b.data_to_send()
    assert events_a == [HandshakeComplete(b"b")]
    assert events_b == [HandshakeComplete(b"a")]
    wire = _join(a.send_message(MessageKind.REQUEST, 42, b"head", [b"one", b"", b"three"]))
    events: list[Event] = []
    for byte in wire:
        b.receive_data(bytes([byte]))
        events += _drain(b)
    message = _only_message(events)
    assert (message.request_id, bytes(message.header)) == (42, b"head")
    assert [bytes(x) for x in message.buffers] == [b"one", b"", b"three"]


def test_many_messages_in_one_chunk() -> None:
    a, b = _open_pair()
    count = 20_000
    wire = b"".join(
        _join(a.send_message(MessageKind.NOTIFY, i, i.to_bytes(4, "big"), [b"x" * (i % 7)]))
        for i in range(count)
    )
    start = time.perf_counter()
    _feed(b, wire)
    events = _drain(b)
    elapsed = time.perf_counter() - start
    assert [m.request_id for m in events if isinstance(m, Message)] == list(range(count))
    assert all(
        isinstance(m, Message) and bytes(m.header) == m.request_id.to_bytes(4, "big")
        for m in events
    )
    assert elapsed < 10  # linear parsing; a quadratic buffer would take minutes


def test_large_message_in_small_chunks() -> None:
    a, b = _open_pair()
    payload = bytes(range(256)) * (5 << 15)  # 40 MiB, allocated as an mmap on receipt
    wire = _join(a.send_message(MessageKind.RESPONSE, 7, b"h", [payload, b"end"]))
    view = memoryview(wire)
    events: list[Event] = []
    for start in range(0, len(wire), 65536):
        b.receive_data(view[start : start + 65536])
        events += _drain(b)
    message = _only_message(events)
    assert message.buffers[0] == payload
    assert bytes(message.buffers[1]) == b"end"
    message.buffers[0][0] = 255  # writable


@pytest.mark.parametrize("header_len", [0, 1, 63, 100])
@pytest.mark.parametrize("scale", [1, 1 << 19])  # small: bytearray payload, large: mmap
def test_received_buffers_are_aligned(header_len: int, scale: int) -> None:
    a, b = _open_pair()
    buffers = [bytes([i]) * (n * scale) for i, n in enumerate([3, 0, 64, 1, 17])]
    _feed(b, _join(a.send_message(MessageKind.REQUEST, 1, b"h" * header_len, buffers)))
    message = _only_message(_drain(b))
    assert bytes(message.header) == b"h" * header_len
    assert [bytes(x) for x in message.buffers] == buffers
    for view in message.buffers:
        if view.nbytes:
            assert ctypes.addressof(ctypes.c_char.from_buffer(view)) % 64 == 0


def test_get_buffer_lends_the_payload_itself() -> None:
    a, b = _open_pair()
    payload = bytes(range(256)) * 4096  # 1 MiB
    wire = _join(a.send_message(MessageKind.REQUEST, 3, b"h", [payload]))
    prefix_len = len(wire) - len(payload)
    _feed(b, wire[:prefix_len])
    assert b.next_event() is None
    lent = b.get_buffer()
    assert lent.nbytes == len(payload)  # the rest of the payload, not a staging area
    lent[:] = payload
    b.buffer_updated(len(payload))
    message = _only_message(_drain(b))
    assert message.buffers[0] == payload
    lent[0] = 123  # same memory: what recv_into wrote is what the message holds
    assert message.buffers[0][0] == 123


def test_get_buffer_staging_area_for_small_reads() -> None:
    a, b = _open_pair()
    wire = _join(a.send_message(MessageKind.REQUEST, 3, b"small", [b"abc"]))
    lent = b.get_buffer(10)
    lent[: len(wire)] = wire
    b.buffer_updated(len(wire))
    assert bytes(_only_message(_drain(b)).header) == b"small"
    with pytest.raises(RuntimeError, match="without a preceding get_buffer"):
        b.buffer_updated(1)


def _sendmsg_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """sendmsg until everything is written (a stream socket may take part of it)."""
    views = [memoryview(p) for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def test_over_a_real_socket_with_sendmsg_and_recv_into() -> None:
    left, right = socket.socketpair()
    with left, right:
        a = Connection(key=KEY, identity=b"a")
        b = Connection(key=KEY, identity=b"b")
        payload = bytes(range(256)) * (1 << 14)  # 4 MiB, more than the socket buffer

        def serve() -> None:
            left.sendall(a.initiate())
            while a.state is ConnectionState.HANDSHAKING:
                for _ in iter(a.next_event, None):
                    pass
                left.sendall(a.data_to_send())
                if a.state is ConnectionState.HANDSHAKING:
                    a.receive_data(left.recv(65536))
            _sendmsg_all(left, a.send_message(MessageKind.REQUEST, 9, b"hdr", [payload]))
            left.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=serve)
        sender.start()
        right.sendall(b.initiate())
        events: list[Event] = []
        while not events or not isinstance(events[-1], ConnectionClosed):
            events += _drain(b)
            if out := b.data_to_send():
                right.sendall(out)
            if events and isinstance(events[-1], ConnectionClosed):
                break
            view = b.get_buffer()
            nbytes = right.recv_into(view)
            del view
            if nbytes:
                b.buffer_updated(nbytes)
            else:
                b.buffer_updated(0)
                b.receive_data(b"")
        sender.join()
    assert events[0] == HandshakeComplete(b"a")
    message = events[1]
    assert isinstance(message, Message)
    assert message.buffers[0] == payload
    assert isinstance(events[2], ConnectionClosed)


# -- limits and truncation -----------------------------------------------------------------


def _open_pair_counting_allocations(max_frame_bytes: int = 1 << 30) -> tuple[Connection, list[int]]:
    """An open connection; the list records payload allocations made from now on."""
    allocations: list[int] = []

    def allocate(nbytes: int) -> bytearray:
        allocations.append(nbytes)
        return bytearray(nbytes)

    a, _ = _open_pair(max_frame_bytes=max_frame_bytes, allocate=allocate)
    allocations.clear()  # the handshake's AUTH frames
    return a, allocations


def test_oversized_header_length_fails_before_allocating() -> None:
    a, allocations = _open_pair_counting_allocations()
    _feed(a, _frame(MessageKind.REQUEST, header_len=2**62))
    with pytest.raises(ProtocolError, match="exceeds max_frame_bytes"):
        a.next_event()
    assert allocations == []


def test_oversized_buffer_lengths_fail_before_allocating() -> None:
    a, allocations = _open_pair_counting_allocations(max_frame_bytes=1 << 20)
    table = struct.pack("!2Q", 1 << 19, (1 << 19) + 1)
    _feed(a, _frame(MessageKind.REQUEST, nbuffers=2) + table)
    with pytest.raises(ProtocolError, match="exceeds max_frame_bytes=1048576"):
        a.next_event()
    assert allocations == []
    assert a.state is ConnectionState.ERROR


def test_data_after_a_failure_mid_payload_is_dropped() -> None:
    _, b = _open_pair()
    _feed(b, _frame(MessageKind.REQUEST, header_len=10) + b"12345")
    assert b.next_event() is None  # mid-payload
    b.receive_data(b"")
    with pytest.raises(ProtocolError, match="received 5 of the 10 payload bytes"):
        b.next_event()
    b.receive_data(b"67890")
    assert b.get_buffer().nbytes > 0  # a staging area, not the dropped payload
    assert b.state is ConnectionState.ERROR


def test_too_many_buffers_is_rejected() -> None:
    a, _ = _open_pair()
    _feed(a, _frame(MessageKind.REQUEST, nbuffers=MAX_BUFFERS + 1))
    with pytest.raises(ProtocolError, match="65537 buffers, over the limit"):
        a.next_event()


def test_unknown_kind_is_rejected() -> None:
    a, _ = _open_pair()
    _feed(a, _frame(200))
    with pytest.raises(ProtocolError, match="unknown message kind 200"):
        a.next_event()


def test_clean_eof_between_frames() -> None:
    a, b = _open_pair()
    _feed(b, _join(a.send_message(MessageKind.REQUEST, 1, b"x")))
    b.receive_data(b"")
    events = _drain(b)
    assert isinstance(events[0], Message)
    assert events[1:] == [ConnectionClosed()]
    assert b.state is ConnectionState.CLOSED
    assert b.next_event() == ConnectionClosed()
    with pytest.raises(RuntimeError, match="after EOF"):
        b.receive_data(b"more")


@pytest.mark.parametrize("cut", [3, FRAME.size + 2, FRAME.size + 8 + 5])
def test_eof_mid_frame_is_an_error(cut: int) -> None:
    a, b = _open_pair()
    wire = _join(a.send_message(MessageKind.REQUEST, 1, b"header", [b"buffer"]))
    _feed(b, wire[:cut])
    b.receive_data(b"")
    with pytest.raises(ProtocolError, match="mid-frame"):
        _drain(b)


def test_eof_during_handshake_is_an_error() -> None:
    a = Connection(key=KEY, identity=b"a")
    a.initiate()
    a.receive_data(b"")
    with pytest.raises(ProtocolError, match="during the handshake"):
        a.next_event()


# -- fuzzing -------------------------------------------------------------------------------


def _feed_all_expecting_only_protocol_errors(conn: Connection, chunks: list[bytes]) -> None:
    """Feed chunks then EOF; the connection may fail, but only with ProtocolError."""
    try:
        for chunk in [*(c for c in chunks if c), b""]:
            conn.receive_data(chunk)
            for _ in range(len(chunk) + 2):  # each event consumes bytes, so this bounds it
                event = conn.next_event()
                if event is None or isinstance(event, ConnectionClosed):
                    break
    except ProtocolError:
        assert conn.state is ConnectionState.ERROR


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8), st.booleans())
def test_fuzz_random_bytes_before_handshake(chunks: list[bytes], keyed: bool) -> None:
    conn = Connection(key=KEY if keyed else None, identity=b"a", max_frame_bytes=1 << 16)
    conn.initiate()
    _feed_all_expecting_only_protocol_errors(conn, chunks)


@_FUZZ
@given(
    st.integers(0, 0xFFFF),
    st.booleans(),
    st.binary(max_size=40),
    st.lists(st.binary(max_size=200), max_size=6),
)
def test_fuzz_random_bytes_after_valid_hello(
    peer_max: int, peer_keyed: bool, identity: bytes, chunks: list[bytes]
) -> None:
    conn = Connection(key=KEY, identity=b"a", max_frame_bytes=1 << 16)
    conn.initiate()
    flags = int(peer_keyed)
    hello = HELLO.pack(b"THNBLRPC", PROTOCOL_VERSION, flags, _nonce(7), peer_max, len(identity))
    _feed_all_expecting_only_protocol_errors(conn, [hello + identity, *chunks])


@_FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(0, 255),  # kind
            st.integers(0, 3),  # reserved
            st.integers(0, 2**64 - 1),  # header_len
            st.integers(0, MAX_BUFFERS + 2),  # nbuffers
            st.binary(max_size=120),  # whatever follows
        ),
        max_size=5,
    ),
    st.integers(1, 64),
)
def test_fuzz_random_frames_after_handshake(
    frames: list[tuple[int, int, int, int, bytes]], chunk_size: int
) -> None:
    a, _ = _open_pair(max_frame_bytes=1 << 16)
    wire = b"".join(
        FRAME.pack(b"TN", kind, reserved, 0, 0, header_len % 70_000, nbuffers) + rest
        for kind, reserved, header_len, nbuffers, rest in frames
    )
    chunks = [wire[i : i + chunk_size] for i in range(0, len(wire), chunk_size)]
    _feed_all_expecting_only_protocol_errors(a, chunks)


def test_many_small_messages_with_buffers_in_one_chunk() -> None:
    """Small frames with buffers, all received at once, take the one-step path: same result."""
    a, b = _open_pair()
    sent = [(i, b"h" * (i % 7), [bytes([i % 256]) * (i % 5), b"xy" * i]) for i in range(50)]
    wire = b"".join(
        _join(a.send_message(MessageKind.RESPONSE, i, header, buffers))
        for i, header, buffers in sent
    )
    _feed(b, wire)
    events = _drain(b)
    assert len(events) == len(sent)
    for event, (i, header, buffers) in zip(events, sent, strict=True):
        assert isinstance(event, Message)
        assert (event.kind, event.request_id, bytes(event.header)) == (
            MessageKind.RESPONSE,
            i,
            header,
        )
        assert [bytes(x) for x in event.buffers] == buffers
        for view in event.buffers:
            if view.nbytes:
                assert ctypes.addressof(ctypes.c_char.from_buffer(view)) % 64 == 0


# -- recycled payload memory -----------------------------------------------------------------


def _address_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.fixture
def empty_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh pool of recycled mappings for this test (the real one is process-wide)."""
    monkeypatch.setattr(_recycled, "_free", {})
    monkeypatch.setattr(_recycled, "_free_bytes", 0)


def _receive_large(b: Connection, a: Connection, fill: int) -> Message:
    """Send a 40 MiB buffer of ``fill`` bytes from ``a`` and receive it on ``b``."""
    payload = bytes([fill]) * (40 << 20)
    _feed(b, _join(a.send_message(MessageKind.REQUEST, fill, b"h", [payload])))
    return _only_message(_drain(b))


@pytest.mark.usefixtures("empty_pool")
def test_large_payloads_reuse_memory_only_once_every_view_is_gone() -> None:
    a, b = _open_pair()
    first = _receive_large(b, a, 1)
    kept = first.buffers[0][10:20]  # a view of a view keeps the payload lent
    address = _address_of(first.buffers[0])
    del first
    assert _recycled.pooled_bytes() == 0
    second = _receive_large(b, a, 2)
    assert _address_of(second.buffers[0]) != address  # still lent: not reused
    assert bytes(kept) == b"\x01" * 10  # ... and not overwritten
    del kept, second
    assert _recycled.pooled_bytes() == 2 * (64 << 20)  # both back (size class: 64 MiB)
    third = _receive_large(b, a, 3)
    assert _recycled.pooled_bytes() == 64 << 20  # one of them taken again
    assert third.buffers[0] == b"\x03" * (40 << 20)  # every byte of the old data overwritten


@pytest.mark.usefixtures("empty_pool")
def test_recycled_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_recycled, "KEEP_BYTES", 64 << 20)  # one mapping of the 64 MiB class
    a, b = _open_pair()
    held = [_receive_large(b, a, fill) for fill in (1, 2, 3)]
    del held
    assert _recycled.pooled_bytes() == 64 << 20  # one kept, two unmapped


@pytest.mark.usefixtures("empty_pool")
def test_recycled_memory_left_unused_is_dropped() -> None:
    a, b = _open_pair()
    message = _receive_large(b, a, 1)
    del message
    assert _recycled.pooled_bytes() == 64 << 20  # returned (and stamped) now
    now = time.monotonic()
    _recycled.drop_idle(now)
    assert _recycled.pooled_bytes() == 64 << 20  # returned just now: kept
    _recycled.drop_idle(now + _recycled.IDLE_S)
    assert _recycled.pooled_bytes() == 0


@pytest.mark.usefixtures("empty_pool")
def test_payloads_too_big_to_keep_get_a_mapping_of_their_own_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_recycled, "KEEP_BYTES", 32 << 20)
    kept = _recycled.lend(33 << 20)  # rounded up: 64 MiB, more than may be kept
    exported: Any = kept._objects  # ctypes keeps the exported view of the mapping here
    (mapping,) = exported.values()
    assert mapping.nbytes == 33 << 20
    del kept, mapping
    assert _recycled.pooled_bytes() == 0


def test_the_protocol_module_is_pure() -> None:
    """Loaded on its own, ``_protocol`` imports no socket, thread, memory-mapping or thenable
    module: sans-IO, with the memory for payloads given by its user (``allocate``)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {_protocol.__file__!r})\n"
        "before = set(sys.modules)\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m\n"
        "spec.loader.exec_module(m)\n"
        "new = set(sys.modules) - before - {'m'}\n"
        "bad = sorted(n for n in new if n.split('.')[0] in "
        "{'mmap', 'socket', '_socket', 'threading', 'selectors', 'thenable'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
