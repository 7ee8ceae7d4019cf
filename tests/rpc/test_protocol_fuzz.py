"""Mutation fuzzer of the sans-IO protocol decoder (``thenable.rpc._wire.protocol.Connection``).

The decoder reads bytes from a peer that may be broken or hostile.  Valid streams -- a
peer's HELLO (with and without a key), its AUTH proof and a run of message frames, all made
by a real sending Connection -- are mutated (bit flips, truncation, inserted random bytes and
frame headers, deleted and duplicated ranges, length fields overwritten with huge values)
and fed to a fresh receiving Connection in random chunks, through ``receive_data()`` and
through ``get_buffer()``/``buffer_updated()``, then EOF.  Whatever arrives, the decoder may
only raise ProtocolError (and is then in the ERROR state), must not stop making progress,
and must not allocate memory because a length field says so: the peak traced memory of one
feed stays under the receiver's max_frame_bytes plus the input's own size and a little slack.

Every input is derived from one integer seed (``random.Random``: a plain loop runs orders of
magnitude more inputs than hypothesis would); a failure names its seed, and
``THENABLE_FUZZ_REPLAY=seed[,seed...]`` replays seeds with memory tracing (``test_replay``).
The short form runs by default; the long form (10**6 inputs unless ``THENABLE_FUZZ_INPUTS``
says otherwise) only with ``THENABLE_LONG_TESTS=1``.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import random
import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from thenable.rpc._net import memory as _recycled
from thenable.rpc._wire.protocol import (
    MAX_BUFFERS,
    MIN_FRAME_BYTES,
    Connection,
    ConnectionClosed,
    ConnectionState,
    HandshakeComplete,
    Message,
    MessageKind,
    ProtocolError,
)

KEY = b"correct horse battery staple"
HELLO = struct.Struct("!8sHBx32sQH")  # magic, version, flags, nonce, max_frame, id_len
FRAME = struct.Struct("!2sBBIQQI")  # magic, kind, reserved, flags, request_id, hlen, nbuf
_HELLO_MAX_AT = 44  # offsets of HELLO's length fields: max_frame (Q) ...
_HELLO_IDLEN_AT = 52  # ... and id_len (H)
_FRAME_HLEN_AT = 16  # offsets in a frame header: header_len (Q) ...
_FRAME_NBUF_AT = 24  # ... and nbuffers (I); the length table (nbuffers x Q) follows it

_MIB = 1 << 20
_RX_MAX_FRAMES = (_MIB, _MIB, 64 << 10, 4096)  # the receivers' max_frame_bytes, by stream
_RX_MAX_FRAME = max(_RX_MAX_FRAMES)
_RX_IDENTITY = b"receiver"
_RX_NONCE = bytes(range(32))  # fixed, so that a recorded AUTH proof verifies on a new receiver
_SLACK = 2 * _MIB  # what a feed may allocate beyond a frame and twice its input (seen: 0.3)
_BASE_SEED = 0xF0221
_BASES = 96  # valid streams to mutate (built once, lazily)
_TRACE_EVERY = 50  # trace memory of every 50th input (and of every huge-length input)
_SHORT_INPUTS = 10_000
_LONG_SEED_START = 10**9  # the long form explores seeds that the short form does not
_LONG_INPUTS = int(os.environ.get("THENABLE_FUZZ_INPUTS") or 1_000_000)

# All payloads under max_frame_bytes are bytearrays, which tracemalloc sees (large payloads
# would be anonymous mappings, which it does not).
assert _RX_MAX_FRAME < _recycled.MIN_BYTES


@dataclass(frozen=True)
class _Sent:
    """One message as the sender sent it."""

    kind: MessageKind
    request_id: int
    flags: int
    header: bytes
    buffers: tuple[bytes, ...]


@dataclass(frozen=True)
class _Stream:
    """A valid byte stream from a sender, with a map of its structure."""

    keyed: bool
    max_frame: int  # the receiver's max_frame_bytes
    identity: bytes  # the sender's
    wire: bytes
    messages: tuple[_Sent, ...]
    regions: tuple[tuple[int, int], ...]  # [start, end) of each HELLO, frame header, table
    fields: tuple[tuple[int, int], ...]  # (offset, size) of each length or count field
    boundaries: tuple[int, ...]  # where each HELLO or frame starts, and the end


def _receiver(keyed: bool, max_frame: int) -> tuple[Connection, bytes]:
    """A fresh receiving end (always the same nonce and identity) and its HELLO."""
    conn = Connection(
        key=KEY if keyed else None,
        identity=_RX_IDENTITY,
        max_frame_bytes=max_frame,
        nonce=_RX_NONCE,
        allocate=_recording_allocate,  # the transport's allocator, its sizes noted
    )
    return conn, conn.initiate()


def _buffer_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.35:
        return 0
    if r < 0.70:
        return rng.randint(1, 64)
    if r < 0.92:
        return rng.randint(65, 4096)
    return rng.randint(4097, 100_000)  # some tens of KiB (over 64 KiB: lent by get_buffer)


def _random_message(rng: random.Random, budget: int) -> _Sent:
    kind = rng.choice(list(MessageKind))
    request_id = rng.choice([0, 1, 2**64 - 1, rng.getrandbits(64), rng.randrange(1000)])
    flags = rng.choice([0, 0, 2**32 - 1, rng.getrandbits(32)])
    header_len = rng.choice([0, rng.randint(1, 100), rng.randint(1, 6000), _buffer_size(rng)])
    header = rng.randbytes(min(header_len, budget))
    budget -= len(header)
    count = rng.choice([0, 0, 1, 1, 2, 3, 4, 6, rng.randint(0, 70)])  # 70: over 64, no fast path
    buffers = []
    for _ in range(count):
        size = min(_buffer_size(rng), max(budget, 0))
        budget -= size + 8
        buffers.append(rng.randbytes(size))
    return _Sent(kind, request_id, flags, header, tuple(buffers))


@functools.cache
def _base_stream(index: int) -> _Stream:
    """Valid stream number ``index``: handshake and messages from a real sending Connection."""
    rng = random.Random(_BASE_SEED + index)
    keyed = index % 2 == 0
    max_frame = _RX_MAX_FRAMES[index // 2 % len(_RX_MAX_FRAMES)]
    identity = b"s" + rng.randbytes(rng.randrange(40))  # never the receiver's identity
    sender = Connection(
        key=KEY if keyed else None,
        identity=identity,
        max_frame_bytes=rng.choice([MIN_FRAME_BYTES, _MIB, 1 << 30]),
        nonce=rng.randbytes(32),
    )
    peer, peer_hello = _receiver(keyed, max_frame)  # stands for every fresh receiver of this stream
    wire = bytearray()
    regions: list[tuple[int, int]] = []
    fields: list[tuple[int, int]] = []
    boundaries: list[int] = []

    def add_frame(frame: bytes) -> None:
        start = len(wire)
        nbuffers = struct.unpack_from("!I", frame, _FRAME_NBUF_AT)[0]
        boundaries.append(start)
        regions.append((start, start + FRAME.size + 8 * nbuffers))
        fields.append((start + _FRAME_HLEN_AT, 8))
        fields.append((start + _FRAME_NBUF_AT, 4))
        fields.extend((start + FRAME.size + 8 * i, 8) for i in range(nbuffers))
        wire.extend(frame)

    hello = sender.initiate()
    boundaries.append(0)
    regions.append((0, len(hello)))
    fields += [(_HELLO_MAX_AT, 8), (_HELLO_IDLEN_AT, 2)]
    wire += hello
    peer.receive_data(hello)
    sender.receive_data(peer_hello)
    if keyed:
        assert peer.next_event() is None  # queues its proof
        assert sender.next_event() is None
        proof = sender.data_to_send()
        add_frame(proof)
        regions.append((len(wire) - len(proof) + FRAME.size, len(wire)))  # the MAC itself
        sender.receive_data(peer.data_to_send())
        peer.receive_data(proof)
        assert peer.next_event() == HandshakeComplete(identity)
    else:
        assert peer.next_event() == HandshakeComplete(identity)
    assert sender.next_event() == HandshakeComplete(_RX_IDENTITY)

    budget = rng.choice([4096, 64 << 10, 256 << 10])
    messages = []
    for _ in range(rng.choice([0, 1, 2, 3, 4, 6, 8, 12])):
        # Within the receiver's limit with the largest length table (70 buffers) too.
        sent = _random_message(rng, max(0, min(budget, max_frame - FRAME.size - 8 * 70)))
        budget -= len(sent.header) + sum(len(b) for b in sent.buffers)
        # Vary the header's type: a bytes header without buffers takes the send fast path.
        types: list[bytes | bytearray | memoryview] = [
            sent.header,
            bytearray(sent.header),
            memoryview(sent.header),
        ]
        header = rng.choice(types)
        parts = sender.send_message(sent.kind, sent.request_id, header, sent.buffers, sent.flags)
        add_frame(b"".join(bytes(p) for p in parts))
        messages.append(sent)
    boundaries.append(len(wire))
    return _Stream(
        keyed,
        max_frame,
        identity,
        bytes(wire),
        tuple(messages),
        tuple(regions),
        tuple(fields),
        tuple(boundaries),
    )


# -- mutations -----------------------------------------------------------------------------


def _huge(rng: random.Random, size: int, limit: int) -> int:
    """A hostile value for a length field of ``size`` bytes; ``limit``: max_frame_bytes."""
    if size == 8:
        return rng.choice(
            [
                2**64 - 1,
                2**64 - rng.randint(1, 1 << 20),  # sums that would wrap in 64 bits
                2**63,
                2**63 - 1,
                2**32,
                2**32 - 1,
                limit + 1,
                limit,
                max(0, limit - rng.randint(0, 4096)),  # within the limit, but may never arrive
                rng.randint(0, 2 * limit),
                rng.getrandbits(64),
                rng.getrandbits(rng.randint(1, 64)),
            ]
        )
    if size == 4:
        return rng.choice([2**32 - 1, MAX_BUFFERS, MAX_BUFFERS + 1, 64, 65, rng.getrandbits(32)])
    return rng.choice([2**16 - 1, rng.getrandbits(16)])


def _position(rng: random.Random, stream: _Stream, data: bytearray) -> int:
    """A position in ``data``, half the time in a HELLO, frame header or length table."""
    if rng.random() < 0.5:
        start, end = rng.choice(stream.regions)
        return min(rng.randrange(start, end), len(data))
    return rng.randint(0, len(data))


def _boundary(rng: random.Random, stream: _Stream, data: bytearray) -> int:
    """A position in ``data``, mostly where a HELLO or frame started in the valid stream."""
    if rng.random() < 0.7:
        return min(rng.choice(stream.boundaries), len(data))
    return rng.randint(0, len(data))


def _run_length(rng: random.Random) -> int:
    return rng.choice([1, 2, 8, FRAME.size, rng.randint(1, 64), rng.randint(1, 4096)])


def _mutate(rng: random.Random, stream: _Stream) -> tuple[bytes, bool]:
    """A mutation of ``stream`` and whether a length field was overwritten with a huge value."""
    data = bytearray(stream.wire)
    huge = rng.random() < 0.12
    if huge:  # first, while the field offsets hold
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            offset, size = rng.choice(stream.fields)
            data[offset : offset + size] = _huge(rng, size, stream.max_frame).to_bytes(size, "big")
    for _ in range(rng.choice([0, 0, 1, 1, 1, 2, 3]) if huge else rng.choice([1, 1, 1, 2, 3, 5])):
        op = rng.randrange(7)
        if op <= 1:  # bit flips
            for _ in range(rng.choice([1, 1, 2, 4, 8])):
                if data:
                    at = min(_position(rng, stream, data), len(data) - 1)
                    data[at] ^= 1 << rng.randrange(8)
        elif op == 2:  # truncation
            del data[_position(rng, stream, data) :]
        elif op == 3:  # random bytes, or a frame header with random fields
            at = _boundary(rng, stream, data)
            if rng.random() < 0.5:
                data[at:at] = rng.randbytes(_run_length(rng))
            else:
                nbuffers = rng.choice([0, 1, 2, 64, 65, rng.randrange(8)])
                header = FRAME.pack(
                    b"TN",
                    rng.choice([0, *MessageKind, 7, 255]),
                    rng.choice([0, 0, 0, 1]),
                    rng.getrandbits(32),
                    rng.getrandbits(64),
                    rng.choice([0, 32, rng.randrange(100), _huge(rng, 8, stream.max_frame)]),
                    nbuffers,
                )
                table = b"".join(
                    rng.choice(
                        [0, 1, rng.randrange(200), _huge(rng, 8, stream.max_frame)]
                    ).to_bytes(8, "big")
                    for _ in range(min(nbuffers, 8))
                )
                data[at:at] = header + table + rng.randbytes(rng.randrange(64))
        elif op == 4:  # deletion of a range
            at = _position(rng, stream, data)
            del data[at : at + _run_length(rng)]
        else:  # duplication of a range, often right after itself
            at = _boundary(rng, stream, data)
            end = min(at + _run_length(rng), len(data))
            to = end if rng.random() < 0.5 else rng.randint(0, len(data))
            data[to:to] = data[at:end]
    return bytes(data), huge


# -- feeding -------------------------------------------------------------------------------

_largest_payload = [0]  # the largest payload the receiver allocated since the last reset


def _recording_allocate(nbytes: int) -> bytearray | ctypes.Array[ctypes.c_ubyte]:
    """Every payload allocation is checked, including mappings that tracemalloc cannot see."""
    _largest_payload[0] = max(_largest_payload[0], nbytes)
    return _recycled.allocate(nbytes)


@dataclass
class _Outcome:
    handshake: bool = False  # HandshakeComplete was seen
    messages: int = 0
    closed: bool = False  # ConnectionClosed was seen
    error: ProtocolError | None = None
    kept: list[Message] | None = None  # the messages, when asked to keep them


def _chunk_sizes(rng: random.Random, total: int) -> Callable[[int], int]:
    """How the stream is cut: whole, tiny pieces, or log-uniform sizes of 1 byte .. all."""
    mode = rng.random()
    if mode < 0.1 or total <= 1:
        return lambda left: left
    if mode < 0.2 and total <= 4096:
        return lambda left: rng.randint(1, 8)
    top = math.log2(total + 1)
    return lambda left: max(1, int(2 ** rng.uniform(0, top)))


def _drain(conn: Connection, outcome: _Outcome, limit: int) -> None:
    """Take every event available now; each consumes bytes, so ``limit`` calls are plenty."""
    for _ in range(limit):
        event = conn.next_event()
        if event is None:
            return
        if isinstance(event, ConnectionClosed):
            assert conn.state is ConnectionState.CLOSED
            assert conn.next_event() == ConnectionClosed()  # and on every later call
            outcome.closed = True
            return
        assert not outcome.closed, f"{event!r} after ConnectionClosed"
        if isinstance(event, HandshakeComplete):
            assert not outcome.handshake, "a second HandshakeComplete"
            outcome.handshake = True
            continue
        assert isinstance(event, Message), f"unexpected event {event!r}"
        assert outcome.handshake, "a message before HandshakeComplete"
        size = event.header.nbytes + sum(b.nbytes for b in event.buffers)
        assert size <= conn.max_frame_bytes, f"a message of {size} bytes over the limit"
        assert len(event.buffers) <= MAX_BUFFERS, f"a message of {len(event.buffers)} buffers"
        outcome.messages += 1
        if outcome.kept is not None:
            outcome.kept.append(event)
    raise AssertionError(f"next_event() returned events {limit} times without running dry")


def _feed(rng: random.Random, conn: Connection, data: bytes, outcome: _Outcome) -> None:
    """Feed ``data`` in random chunks, mixing receive_data and get_buffer, then EOF."""
    view = memoryview(data)
    limit = len(data) + 4
    size_of = _chunk_sizes(rng, len(data))
    direct = rng.random()  # how often a chunk goes through get_buffer/buffer_updated
    pos = 0
    while pos < len(data):
        chunk = view[pos : pos + size_of(len(data) - pos)]
        pos += chunk.nbytes
        if rng.random() < direct:
            while chunk.nbytes:
                lent = conn.get_buffer(rng.choice([-1, -1, chunk.nbytes]))
                taken = min(lent.nbytes, chunk.nbytes, rng.choice([chunk.nbytes, 1 << 16]))
                lent[:taken] = chunk[:taken]
                del lent
                conn.buffer_updated(taken)
                chunk = chunk[taken:]
        else:
            conn.receive_data(chunk if rng.random() < 0.8 else bytes(chunk))
        if rng.random() < 0.7:  # else let data pile up (several frames at once)
            _drain(conn, outcome, limit)
    _drain(conn, outcome, limit)
    conn.receive_data(b"")
    _drain(conn, outcome, limit)
    assert outcome.closed, "EOF without ConnectionClosed or ProtocolError"


def _decode(rng: random.Random, stream: _Stream, data: bytes, keep: bool = False) -> _Outcome:
    """Feed ``data`` to a fresh receiver of ``stream``; a ProtocolError is kept in the outcome."""
    conn, _ = _receiver(stream.keyed, stream.max_frame)
    outcome = _Outcome(kept=[] if keep else None)
    _largest_payload[0] = 0
    try:
        _feed(rng, conn, data, outcome)
    except ProtocolError as exc:
        assert conn.state is ConnectionState.ERROR, f"ProtocolError in state {conn.state}"
        conn.receive_data(b"dropped")  # a dead connection drops data ...
        with pytest.raises(ProtocolError):  # ... and keeps failing
            conn.next_event()
        outcome.error = exc
    # The largest payload a frame within the limit takes: its parts, up to 63 bytes of
    # alignment padding per buffer and 64 bytes more.
    largest = stream.max_frame + 64 * (MAX_BUFFERS + 1)
    assert _largest_payload[0] <= largest, f"a payload of {_largest_payload[0]} bytes"
    return outcome


def _traced(run: Callable[[], _Outcome]) -> tuple[_Outcome, int]:
    """``run()`` and the peak of the memory that tracemalloc saw it allocate."""
    if tracemalloc.is_tracing():  # e.g. python -X tracemalloc: leave the tracing on
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        outcome = run()
        return outcome, tracemalloc.get_traced_memory()[1] - base
    tracemalloc.start()
    try:
        outcome = run()
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _fuzz_one(seed: int, *, trace: bool | None = None) -> _Outcome:
    """Decode input ``seed``; AssertionError naming the seed if the decoder misbehaves.

    ``trace``: measure memory (None: for every huge-length input and every 50th seed).
    """
    rng = random.Random(seed)
    stream = _base_stream(rng.randrange(_BASES))
    data, huge = _mutate(rng, stream)
    if trace is None:
        trace = huge or seed % _TRACE_EVERY == 0
    try:
        if trace:
            outcome, peak = _traced(lambda: _decode(rng, stream, data))
            bound = stream.max_frame + 2 * len(data) + _SLACK
            assert peak <= bound, f"a feed of {len(data)} bytes allocated {peak} > {bound} bytes"
        else:
            outcome = _decode(rng, stream, data)
        if data == stream.wire:  # unmutated (or mutated back): exactly what was sent
            assert outcome.error is None, f"valid stream rejected: {outcome.error}"
            assert outcome.handshake
            assert outcome.messages == len(stream.messages)
    except Exception as exc:  # AssertionError, or anything but ProtocolError from the decoder
        raise AssertionError(
            f"seed {seed} (huge={huge}, {len(data)} bytes): {type(exc).__name__}: {exc}; "
            f"replay with THENABLE_FUZZ_REPLAY={seed}"
        ) from exc
    return outcome


def _fuzz(seeds: range) -> tuple[int, int, float]:
    """Run the seeds: (inputs past the handshake, inputs with a message, inputs per second)."""
    start = time.perf_counter()
    past_handshake = with_messages = 0
    for seed in seeds:
        outcome = _fuzz_one(seed)
        past_handshake += outcome.handshake
        with_messages += outcome.messages > 0
    rate = len(seeds) / (time.perf_counter() - start)
    return past_handshake, with_messages, rate


# -- tests ---------------------------------------------------------------------------------


def _same(received: Message, sent: _Sent) -> bool:
    return (
        received.kind is sent.kind
        and received.request_id == sent.request_id
        and received.flags == sent.flags
        and received.header == sent.header
        and [bytes(b) for b in received.buffers] == list(sent.buffers)
    )


@pytest.mark.parametrize("chunking_seed", range(4))
def test_valid_streams_decode_to_exactly_the_sent_messages(chunking_seed: int) -> None:
    """The positive control: unmutated streams carry real frames past the handshake."""
    total = 0
    for index in range(_BASES):
        stream = _base_stream(index)
        rng = random.Random(f"chunks {chunking_seed} {index}")
        outcome = _decode(rng, stream, stream.wire, keep=True)
        assert outcome.error is None, f"stream {index}: {outcome.error}"
        assert outcome.handshake and outcome.closed
        assert outcome.kept is not None and len(outcome.kept) == len(stream.messages)
        for i, (received, sent) in enumerate(zip(outcome.kept, stream.messages, strict=True)):
            assert _same(received, sent), f"stream {index}, message {i}"
        total += len(stream.messages)
    keyed = sum(_base_stream(i).keyed for i in range(_BASES))
    assert 0 < keyed < _BASES
    assert total > 3 * _BASES  # the streams are not mostly empty


def test_mutation_fuzz_short() -> None:
    """Short form: 10**4 inputs in 2.1 s on a 2-core VM (4700/s; 7000/s untraced)."""
    past_handshake, with_messages, _ = _fuzz(range(_SHORT_INPUTS))
    # Most inputs get past the handshake (64% here) and yield messages (45%).
    assert past_handshake > 0.5 * _SHORT_INPUTS
    assert with_messages > 0.35 * _SHORT_INPUTS


def test_huge_declared_lengths_allocate_nothing_beyond_the_limit() -> None:
    """Every length or count field of valid streams overwritten with hostile values, traced."""
    rng = random.Random("huge")
    cases = 0
    for index in range(_BASES):
        stream = _base_stream(index)
        for offset, size in rng.sample(stream.fields, min(len(stream.fields), 4)):
            for _ in range(2):
                data = bytearray(stream.wire)
                data[offset : offset + size] = _huge(rng, size, stream.max_frame).to_bytes(
                    size, "big"
                )
                if rng.random() < 0.3:  # the frame cut short as well
                    del data[rng.randint(offset, len(data)) :]
                seed = rng.getrandbits(32)
                run = functools.partial(_decode, random.Random(seed), stream, bytes(data))
                try:
                    _, peak = _traced(run)
                except Exception as exc:
                    raise AssertionError(
                        f"stream {index}, field at {offset}, chunking seed {seed}: {exc!r}"
                    ) from exc
                bound = stream.max_frame + 2 * len(data) + _SLACK
                assert peak <= bound, f"stream {index}, field at {offset}: {peak} > {bound}"
                cases += 1
    assert cases > 2 * _BASES


def test_largest_frame_table_stays_bounded() -> None:
    """MAX_BUFFERS one-byte buffers: a legal frame whose bookkeeping is the most per byte."""
    stream = _base_stream(1)
    assert not stream.keyed and stream.max_frame == _MIB
    frame = FRAME.pack(b"TN", MessageKind.REQUEST, 0, 0, 1, 0, MAX_BUFFERS)
    data = stream.wire + frame + struct.pack(f"!{MAX_BUFFERS}Q", *[1] * MAX_BUFFERS)
    data += bytes(MAX_BUFFERS)
    outcome, peak = _traced(lambda: _decode(random.Random(0), stream, data))
    assert outcome.error is None and outcome.messages == len(stream.messages) + 1
    # The payload aligns every buffer to 64 bytes and the receiver keeps an (offset, length)
    # pair per buffer: bounded by MAX_BUFFERS, whatever max_frame_bytes is.
    # The message's 65536 memoryviews cost the most; 590 KB on the wire took 24.5 MB here.
    assert peak <= stream.max_frame + 2 * len(data) + MAX_BUFFERS * 512 + _SLACK


@pytest.mark.long
@pytest.mark.skipif(
    os.environ.get("THENABLE_LONG_TESTS") != "1", reason="long form: set THENABLE_LONG_TESTS=1"
)
@pytest.mark.timeout(max(600, _LONG_INPUTS // 100))  # 10**6: 3.5 min here; allows 100/s
def test_mutation_fuzz_long() -> None:
    """Long form: THENABLE_FUZZ_INPUTS inputs (default 10**6) from seeds the short form skips."""
    count = _LONG_INPUTS
    past_handshake, with_messages, rate = _fuzz(range(_LONG_SEED_START, _LONG_SEED_START + count))
    print(f"{count} inputs at {rate:.0f} inputs/s")
    assert past_handshake > 0.5 * count
    assert with_messages > 0.35 * count


@pytest.mark.skipif(
    not os.environ.get("THENABLE_FUZZ_REPLAY"), reason="set THENABLE_FUZZ_REPLAY=seed[,seed...]"
)
def test_replay() -> None:
    """Replays the seeds of failed inputs, each with memory tracing."""
    for seed in os.environ["THENABLE_FUZZ_REPLAY"].split(","):
        _fuzz_one(int(seed), trace=True)
