"""Shared memory between same-host workers (``thenable.rpc._net.shm``) and its ownership rules.

The first part drives an ``Outbox`` and an ``Inbox`` in this process, handing each staged
descriptor over as the transport does after ``SCM_RIGHTS`` (a duplicate, then the sender's
copy closed), and recording the Inbox's ``release`` calls (what the transport turns into
RELEASE frames).  Received buffers are views lent from the segment: the tests drop them with
``del`` and ``gc.collect()`` (never a sleep) and check that exactly one release follows, and
only then.  Every one of those tests ends with both ends closed and checks that this process
holds as many descriptors and segment mappings as before, and that ``/dev/shm`` has no new
file.

The second part runs workers (``_harness``) on this host: their connections are Unix-domain
(TCP with ``same_host_ipc=False``), large payloads arrive intact in the receiver's segment
and stay private to each end, a receiver that keeps what it received keeps its sender's
segment busy until it drops it, segments and descriptors stay bounded over many calls, and
shutdown or a killed peer unmaps everything that no one still holds.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import importlib.util
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _remote_fns as fns
import _shm_fns as shm_fns
import pytest
from _harness import Group, join_thenable_threads
from conftest import GroupFactory

from thenable.rpc._net import shm as _shm
from thenable.rpc._net.shm import MAX_PENDING_DESCRIPTORS, MAX_SEGMENTS, STAGE_MIN_BYTES
from thenable.rpc._options import RpcBackendOptions
from thenable.rpc._wire import protocol as _protocol
from thenable.rpc._wire.protocol import (
    Connection,
    HandshakeComplete,
    Message,
    MessageKind,
    ProtocolError,
)
from thenable.rpc._wire.serialize import dumps, loads
from thenable.rpc._worker.agent import Agent

FREED_WITHIN_S = 10.0  # the workers free unused memory after 0.2 s (forget_quickly)
needs_shm = pytest.mark.skipif(not _shm.available(), reason="needs memfd and file sealing")

MIB = 1 << 20
# The descriptor's layout, from the module's docstring.
HEAD = struct.Struct("!QQBxxxHI")  # segment id, size, fd attached, retired ids, parts
ID = struct.Struct("!Q")
PART = struct.Struct("!QQ")  # offset, length
SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)


# -- what this process holds --------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _memfd_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(shm_fns.MEMFD_NAME in line for line in maps)


def _shm_files() -> set[str]:
    """Files in /dev/shm, but POSIX semaphores (``sem.*``: what multiprocessing makes, in
    other processes of this machine too); a segment with a name would be ``psm_*``, say."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return set()
    return {path.name for path in shm.iterdir() if not path.name.startswith("sem.")}


class Held:
    """What this process held when made; ``check`` asserts that it holds that again."""

    def __init__(self) -> None:
        gc.collect()  # (what earlier tests left for the collector is not counted, nor freed later)
        self.fds = _open_fds()
        self.maps = _memfd_mappings()
        self.shm = _shm_files()

    def new_maps(self) -> int:
        return _memfd_mappings() - self.maps

    def new_fds(self) -> int:
        return _open_fds() - self.fds

    def check_shm(self) -> None:
        assert _shm_files() <= self.shm, f"new in /dev/shm: {_shm_files() - self.shm}"

    def check(self) -> None:
        assert self.new_maps() == 0, "segment mappings left behind"
        assert self.new_fds() == 0, "file descriptors left behind"
        self.check_shm()


# An Outbox, the Inbox of its peer, and the segment ids that the Inbox released, in order.
Ends = tuple[_shm.Outbox, _shm.Inbox, list[int]]


@pytest.fixture
def held() -> Iterator[Held]:
    yield Held()


def _both_ends() -> Iterator[Ends]:
    """An Outbox and the Inbox of its peer, whose releases are recorded; both closed when
    the test is done with them."""
    released: list[int] = []
    outbox, inbox = _shm.Outbox(), _shm.Inbox(released.append)
    yield outbox, inbox, released
    outbox.close()
    inbox.close()


@pytest.fixture
def ends(held: Held) -> Iterator[Ends]:
    """A connection's two ends (``_both_ends``), closed at the end (after the test dropped
    what it received), which must free everything."""
    yield from _both_ends()
    held.check()


def _deliver(inbox: _shm.Inbox, staged: _shm.Staged) -> tuple[int, list[memoryview]]:
    """What the transport does with a staged frame: pass the descriptor, then unstage.

    Returns the segment id (the one the Inbox will release) and the lent views.
    """
    if staged.fd is not None:
        inbox.add_descriptors([os.dup(staged.fd)])
        os.close(staged.fd)
    return staged.segment_id, inbox.unstage(memoryview(staged.descriptor))


def _one_kept_one_dropped(
    ends: Ends, kept_data: bytes
) -> tuple[int, list[memoryview], _shm.Staged]:
    """Stage and deliver two messages in two segments: ``kept_data``, whose views the
    caller keeps (its segment stays lent), and another, dropped at once (its segment is
    released).  Returns the lent segment's id, the kept views and the dropped message."""
    outbox, inbox, released = ends
    first = outbox.stage([memoryview(kept_data)])
    second = outbox.stage(_message(STAGE_MIN_BYTES, 2))
    assert first is not None and second is not None
    lent_id, kept = _deliver(inbox, first)
    _deliver(inbox, second)  # dropped at once
    assert released == [second.segment_id]
    return lent_id, kept, second


def _close_fd(staged: _shm.Staged | None) -> None:
    """A staged message that is never delivered: close its descriptor (the transport would,
    once sent)."""
    if staged is not None and staged.fd is not None:
        os.close(staged.fd)


def _parse(descriptor: bytes) -> tuple[int, int, int, list[int], list[tuple[int, int]]]:
    """(segment id, size, fd attached, retired ids, parts) of a descriptor."""
    segment_id, size, has_fd, n_retired, n_parts = HEAD.unpack_from(descriptor)
    position = HEAD.size
    retired = [ID.unpack_from(descriptor, position + i * ID.size)[0] for i in range(n_retired)]
    position += n_retired * ID.size
    parts = [PART.unpack_from(descriptor, position + i * PART.size) for i in range(n_parts)]
    assert len(descriptor) == position + n_parts * PART.size
    return segment_id, size, has_fd, retired, parts


def _descriptor(
    segment_id: int,
    size: int,
    has_fd: bool,
    retired: tuple[int, ...] = (),
    parts: tuple[tuple[int, int], ...] = (),
) -> memoryview:
    return memoryview(
        HEAD.pack(segment_id, size, has_fd, len(retired), len(parts))
        + b"".join(ID.pack(r) for r in retired)
        + b"".join(PART.pack(offset, length) for offset, length in parts)
    )


def _address(buffer: Any) -> int:
    """Where a (writable, non-empty) buffer's memory starts."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _segment_start(inbox: _shm.Inbox, segment_id: int) -> int:
    """Where the Inbox maps a segment (its export is released at once)."""
    with memoryview(inbox._mappings[segment_id]) as whole:
        return _address(whole)


def _in_a_segment(address: int, nbytes: int) -> bool:
    """Whether ``nbytes`` at ``address`` lie in one segment mapping of /proc/self/maps."""
    return any(low <= address and address + nbytes <= end for low, end in shm_fns.memfd_ranges())


def _message(nbytes: int, seed: int) -> list[memoryview]:
    return [memoryview(random.Random(seed).randbytes(nbytes))]


def _fd_closed(fd: int, inode: tuple[int, int]) -> bool:
    """Whether ``fd`` no longer refers to the file ``inode`` (its number may be reused)."""
    try:
        stat = os.fstat(fd)
    except OSError:
        return True
    return (stat.st_dev, stat.st_ino) != inode


def _inode(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _memfd(size: int, seals: int | None) -> int:
    """A memfd of ``size`` bytes; sealed with ``seals`` (None: sealing not even allowed)."""
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seals is not None else 0)
    fd = os.memfd_create("thenable-rpc", flags)  # named as a real segment: counted too
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


# -- Outbox and Inbox in one process ------------------------------------------------------------


@needs_shm
def test_round_trip_lends_aligned_writable_views_of_the_segment(ends: Ends, held: Held) -> None:
    outbox, inbox, released = ends
    # Too small to stage, or nothing at all: the socket carries them.  (STAGE_MIN_BYTES - 64,
    # not - 1: the threshold applies to the layout, whose parts end on 64-byte boundaries.)
    assert outbox.stage([memoryview(bytes(STAGE_MIN_BYTES - 64))]) is None
    assert outbox.stage([memoryview(b"x" * 1000)] * 3) is None
    assert outbox.stage([]) is None
    assert outbox.segment_count() == 0
    assert held.new_maps() == 0

    sizes = [3, 100_003, 1, 65_537, 150_001]
    assert sum(sizes) >= STAGE_MIN_BYTES
    rng = random.Random(1)
    sent = [rng.randbytes(n) for n in sizes]
    staged = outbox.stage([memoryview(data) for data in sent])
    assert staged is not None and staged.fd is not None
    held.check_shm()  # the live segment has no name
    segment_id, size, has_fd, retired, parts = _parse(staged.descriptor)
    assert (segment_id, has_fd, retired) == (staged.segment_id, 1, [])
    assert [length for _, length in parts] == sizes
    assert all(offset % 64 == 0 for offset, _ in parts)
    assert size >= parts[-1][0] + sizes[-1]

    got_id, received = _deliver(inbox, staged)
    assert got_id == segment_id
    assert [bytes(buffer) for buffer in received] == sent
    assert inbox.segment_count() == outbox.segment_count() == 1
    assert held.new_maps() == 2  # the sender's mapping and the receiver's
    # Each part is the segment's memory, where the descriptor says: no copy was made.
    start = _segment_start(inbox, segment_id)
    for buffer, (offset, length) in zip(received, parts, strict=True):
        assert not buffer.readonly
        assert buffer.nbytes == length
        assert _address(buffer) == start + offset, "a received buffer is not in its segment"
        assert _address(buffer) % 64 == 0, "a received buffer is not 64-byte aligned"
        assert _in_a_segment(_address(buffer), length)
    del buffer
    # Writing a received buffer writes the segment (lent to the receiver alone, rule 3).
    received[1][:] = b"\xaa" * sizes[1]
    mapping = inbox._mappings[segment_id]
    assert bytes(mapping[parts[1][0] : parts[1][0] + sizes[1]]) == b"\xaa" * sizes[1]
    assert bytes(received[0]) == sent[0] and bytes(received[2]) == sent[2]

    # Lent while any view lives: no release yet, whatever the collector finds.
    first = received[0]
    del received
    gc.collect()
    assert released == [], "released while a view was alive"
    assert bytes(first) == sent[0]
    del first
    gc.collect()
    assert released == [segment_id], "not released exactly once when the views were dropped"

    # The transport's RELEASE frees the segment for the next message, which lands there.
    outbox.release(segment_id)
    second = [rng.randbytes(n) for n in sizes]
    again = outbox.stage([memoryview(data) for data in second])
    assert again is not None and again.fd is None and again.segment_id == segment_id
    assert _parse(again.descriptor)[4] == parts
    _, received_again = _deliver(inbox, again)
    assert [bytes(buffer) for buffer in received_again] == second
    assert _address(received_again[0]) == start
    assert released == [segment_id]
    del received_again
    assert released == [segment_id, segment_id]
    outbox.release(segment_id)

    # Exactly STAGE_MIN_BYTES is staged.
    boundary = outbox.stage(_message(STAGE_MIN_BYTES, 3))
    assert boundary is not None
    _close_fd(boundary)


def _built_on(view: memoryview, kind: str) -> Any:
    """A 1-D uint8 object on ``view``'s memory: a ``memoryview`` slice, a numpy array or a
    torch tensor."""
    if kind == "numpy":
        import numpy as np

        return np.frombuffer(view, dtype=np.uint8)
    if kind == "torch":
        import torch

        return torch.frombuffer(view, dtype=torch.uint8)
    return view[:]


@needs_shm
@pytest.mark.parametrize("kind", ["memoryview", "numpy", "torch"])
def test_an_array_built_on_a_view_keeps_the_message_lent(ends: Ends, kind: str) -> None:
    """Whatever is built on one part of a message (the others dropped) keeps the whole
    message lent and shares the segment's memory; its end releases the segment, once."""
    if kind != "memoryview":
        pytest.importorskip(kind)
    outbox, inbox, released = ends
    sent = [random.Random(seed).randbytes(STAGE_MIN_BYTES // 2) for seed in range(3)]
    staged = outbox.stage([memoryview(data) for data in sent])
    assert staged is not None
    segment_id, received = _deliver(inbox, staged)
    address = _address(received[1]) + 10
    kept = _built_on(received[1], kind)[10:20]
    del received
    gc.collect()
    assert released == [], "released while what was built on a view was alive"
    assert bytes(kept.tolist()) == sent[1][10:20]
    # It is the segment's memory: a write through it lands there.
    assert _in_a_segment(address, 10)
    kept[0] = 0x55
    assert ctypes.c_ubyte.from_address(address).value == 0x55
    del kept
    gc.collect()
    assert released == [segment_id]


@needs_shm
def test_a_view_in_a_reference_cycle_is_released_by_the_collector(ends: Ends) -> None:
    outbox, inbox, released = ends
    staged = outbox.stage(_message(STAGE_MIN_BYTES, 1))
    assert staged is not None
    gc.disable()  # no automatic collection between the two checks
    try:
        segment_id, received = _deliver(inbox, staged)
        cycle: list[Any] = [received[0]]
        cycle.append(cycle)
        del received, cycle
        assert released == [], "released while a view was still referenced"
        gc.collect()
        assert released == [segment_id]
    finally:
        gc.enable()


@needs_shm
def test_a_message_without_parts_is_released_at_once(ends: Ends) -> None:
    outbox, inbox, released = ends
    staged = outbox.stage(_message(STAGE_MIN_BYTES, 1))
    assert staged is not None
    segment_id, size, _, _, _ = _parse(staged.descriptor)
    _deliver(inbox, staged)  # (its views dropped at once)
    assert released == [segment_id]
    assert inbox.unstage(_descriptor(segment_id, size, False)) == []
    assert released == [segment_id, segment_id], "an empty message was not released at once"
    # Not lent: the next message may use the segment.
    assert len(inbox.unstage(_descriptor(segment_id, size, False, parts=((0, 5),)))) == 1
    assert released == [segment_id] * 3


@needs_shm
def test_staging_into_a_lent_segment_is_a_protocol_error(ends: Ends) -> None:
    outbox, inbox, released = ends
    sent = bytes(_message(STAGE_MIN_BYTES, 1)[0])
    staged = outbox.stage([memoryview(sent)])
    assert staged is not None
    segment_id, size, _, _, _ = _parse(staged.descriptor)
    _, received = _deliver(inbox, staged)
    for parts in [((0, 10),), ((MIB // 2, 10),), ()]:
        with pytest.raises(ProtocolError, match="lent"):
            inbox.unstage(_descriptor(segment_id, size, False, parts=parts))
    # Refused without a trace: the message is still lent, intact and not released.
    assert bytes(received[0]) == sent
    assert released == []
    assert inbox.segment_count() == 1
    del received
    assert released == [segment_id]
    # Once returned, the same frame is accepted.
    later = inbox.unstage(_descriptor(segment_id, size, False, parts=((0, 10),)))
    assert bytes(later[0]) == sent[:10]
    del later
    assert released == [segment_id, segment_id]


@needs_shm
def test_retiring_a_lent_segment_is_a_protocol_error(ends: Ends, held: Held) -> None:
    _, inbox, released = ends
    kept_data = bytes(_message(STAGE_MIN_BYTES, 1)[0])
    lent_id, kept, second = _one_kept_one_dropped(ends, kept_data)
    free_id = second.segment_id
    free_size = _parse(second.descriptor)[1]
    # A message in the free segment that retires the lent one.
    frame = _descriptor(free_id, free_size, False, retired=(lent_id,), parts=((0, 10),))
    with pytest.raises(ProtocolError, match="retired"):
        inbox.unstage(frame)
    assert lent_id in inbox._mappings, "the receiver unmapped a segment it lends"
    assert bytes(kept[0]) == kept_data
    assert released == [free_id]
    assert held.new_maps() == 4
    del kept
    assert released == [free_id, lent_id]
    # Returned: now it may be retired.
    assert len(inbox.unstage(frame)) == 1
    assert lent_id not in inbox._mappings
    assert held.new_maps() == 3
    assert released == [free_id, lent_id, free_id]


@needs_shm
def test_close_while_a_view_is_alive_unmaps_it_when_dropped(ends: Ends, held: Held) -> None:
    """Closing the Inbox (the connection closed) leaves a lent segment mapped: its views stay
    readable and writable; it is unmapped when they are dropped, and not released (the
    connection is gone).  Segments that are not lent are unmapped at once."""
    np = pytest.importorskip("numpy")
    outbox, inbox, released = ends
    sent = bytes(_message(STAGE_MIN_BYTES, 1)[0])
    _, kept, second = _one_kept_one_dropped(ends, sent)
    array_on_it = np.frombuffer(kept[0], dtype=np.uint8)
    free_id = second.segment_id
    address = _address(kept[0])
    assert held.new_maps() == 4

    outbox.close()
    inbox.close()  # no BufferError, although a mapping is exported
    assert inbox.segment_count() == 0
    assert held.new_maps() == 1, "closing did not unmap the other segments"
    assert _in_a_segment(address, len(sent))
    # Still the received data, and still writable.
    assert bytes(kept[0]) == sent
    kept[0][:4] = b"\x01\x02\x03\x04"
    assert array_on_it[:4].tolist() == [1, 2, 3, 4]
    array_on_it[-1] = 0xEE
    assert kept[0][-1] == 0xEE
    inbox.close()  # again: harmless

    del kept
    gc.collect()
    assert held.new_maps() == 1, "unmapped while an array built on a view was alive"
    assert array_on_it[0] == 1
    del array_on_it
    gc.collect()
    assert not _in_a_segment(address, 1), "the lent segment was not unmapped once dropped"
    assert released == [free_id], "a segment was released after the Inbox closed"
    held.check()


# A collection that starts inside the Inbox's lock (any allocation there may start one) and
# finds the last reference to a lent view in garbage: the finalizer runs right there.
_COLLECT_WHILE_LOCKED = """
import faulthandler, gc, os, sys
from thenable.rpc._net import shm as _shm

released = []
outbox, inbox = _shm.Outbox(), _shm.Inbox(released.append)

def deliver(staged):
    inbox.add_descriptors([os.dup(staged.fd)])
    os.close(staged.fd)
    return inbox.unstage(memoryview(staged.descriptor))

pending = [deliver(outbox.stage([memoryview(bytes(_shm.STAGE_MIN_BYTES))]))[0]]
second = outbox.stage([memoryview(bytes(_shm.STAGE_MIN_BYTES))])

def drop_in_garbage(phase, info):
    if phase == "start" and pending and inbox._lock.locked():
        cycle = [pending.pop()]
        cycle.append(cycle)

gc.callbacks.append(drop_in_garbage)
gc.set_threshold(1)
faulthandler.dump_traceback_later(10, exit=True)
if sys.argv[1] == "unstage":
    kept = deliver(second)
else:
    inbox.close()
gc.set_threshold(700)
faulthandler.cancel_dump_traceback_later()
assert not pending, "no collection started inside the lock"
print(released)
"""


@needs_shm
@pytest.mark.parametrize(("during", "expected"), [("unstage", "[1]"), ("close", "[]")])
def test_a_view_collected_inside_the_inbox_lock_does_not_deadlock(
    during: str, expected: str
) -> None:
    """The last view of a message may die in a garbage collection that an allocation inside
    ``unstage`` or ``close`` starts, in the thread that holds the Inbox's lock; its release
    must not wait for that lock.  (In a child process: a deadlock there ends in 10 s with
    the stacks, instead of hanging this process.)"""
    done = subprocess.run(
        [sys.executable, "-c", _COLLECT_WHILE_LOCKED, during],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


@needs_shm
def test_a_released_segment_is_reused_and_a_busy_one_is_not(ends: Ends, held: Held) -> None:
    outbox, inbox, released = ends
    first = outbox.stage(_message(STAGE_MIN_BYTES, 1))
    assert first is not None and first.fd is not None
    _deliver(inbox, first)  # (its views dropped at once)
    assert released == [first.segment_id]
    outbox.release(first.segment_id)

    reused = outbox.stage(_message(STAGE_MIN_BYTES + 5, 2))
    assert reused is not None
    assert reused.fd is None, "a free segment was not reused"
    assert reused.segment_id == first.segment_id
    assert _parse(reused.descriptor)[2] == 0  # no descriptor attached
    _, received = _deliver(inbox, reused)
    assert bytes(received[0]) == bytes(_message(STAGE_MIN_BYTES + 5, 2)[0])

    # Not released (the receiver holds the message): the next one needs a segment of its own.
    busy = outbox.stage(_message(STAGE_MIN_BYTES, 3))
    assert busy is not None and busy.fd is not None
    assert busy.segment_id != first.segment_id
    _, received_busy = _deliver(inbox, busy)
    assert bytes(received_busy[0]) == bytes(_message(STAGE_MIN_BYTES, 3)[0])
    assert bytes(received[0]) == bytes(_message(STAGE_MIN_BYTES + 5, 2)[0])
    assert outbox.segment_count() == inbox.segment_count() == 2
    assert outbox.free_count() == 0
    assert held.new_maps() == 4
    assert released == [first.segment_id]
    del received, received_busy
    assert sorted(released[1:]) == sorted([first.segment_id, busy.segment_id])


@needs_shm
def test_at_most_max_segments_and_a_too_small_free_one_is_retired(ends: Ends, held: Held) -> None:
    outbox, inbox, released = ends
    staged = []
    lent = []
    for seed in range(MAX_SEGMENTS):
        one = outbox.stage(_message(STAGE_MIN_BYTES, seed))
        assert one is not None and one.fd is not None
        lent.append(_deliver(inbox, one)[1])  # the receiver keeps them all
        staged.append(one)
    ids = {one.segment_id for one in staged}
    assert len(ids) == MAX_SEGMENTS
    # Every segment busy: the socket carries the message.
    assert outbox.stage(_message(STAGE_MIN_BYTES, 99)) is None
    assert outbox.segment_count() == MAX_SEGMENTS
    assert outbox.free_count() == 0
    assert held.new_maps() == 2 * MAX_SEGMENTS

    assert released == []
    del lent
    assert sorted(released) == sorted(ids)
    for one in staged:
        outbox.release(one.segment_id)
    assert outbox.free_count() == MAX_SEGMENTS
    # All free, but all too small for 2 MiB, and no room for another: one is retired.
    big = outbox.stage(_message(2 * MIB, 5))
    assert big is not None and big.fd is not None
    segment_id, size, _, retired, _ = _parse(big.descriptor)
    assert size >= 2 * MIB
    assert len(retired) == 1 and retired[0] in ids
    assert segment_id not in ids
    assert outbox.segment_count() == MAX_SEGMENTS
    assert held.new_maps() == 2 * MAX_SEGMENTS  # the sender unmapped it, mapped the new one

    _, received = _deliver(inbox, big)
    assert bytes(received[0]) == bytes(_message(2 * MIB, 5)[0])
    assert retired[0] not in inbox._mappings, "the receiver kept a retired segment"
    assert set(inbox._mappings) == set(outbox._segments)
    assert inbox.segment_count() == MAX_SEGMENTS
    assert held.new_maps() == 2 * MAX_SEGMENTS
    del received
    assert released[-1] == segment_id

    # A retired id is announced once.
    outbox.release(segment_id)
    after = outbox.stage(_message(STAGE_MIN_BYTES, 6))
    assert after is not None and after.fd is None
    assert _parse(after.descriptor)[3] == []
    _deliver(inbox, after)
    assert len(released) == MAX_SEGMENTS + 2

    # Too big for any segment: the socket carries it (nothing is created or copied).
    with mmap.mmap(-1, _shm.MAX_SEGMENT_BYTES + 1, prot=mmap.PROT_READ) as huge:
        view = memoryview(huge)
        try:
            assert outbox.stage([view]) is None
        finally:
            view.release()
    assert outbox.segment_count() == MAX_SEGMENTS


@needs_shm
def test_free_segments_beyond_the_cache_are_retired_oldest_first(
    ends: Ends, held: Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a RELEASE leaves more than CACHE_BYTES of free segments, the least recently used
    are retired (release() returns them, for RETIRE frames); the peer unmaps them on
    retire()."""
    outbox, inbox, released = ends
    monkeypatch.setattr(_shm, "CACHE_BYTES", 4 * MIB)
    old = outbox.stage(_message(2 * MIB + 1, 1))  # a 4 MiB segment, used first
    new = outbox.stage(_message(STAGE_MIN_BYTES, 2))  # a 1 MiB segment, used last
    assert old is not None and new is not None
    for staged in (old, new):
        _deliver(inbox, staged)  # dropped at once: released
    assert released == [old.segment_id, new.segment_id]
    assert outbox.release(new.segment_id) == []  # 1 MiB free: within the cache
    assert outbox.release(old.segment_id) == [old.segment_id]  # 5 MiB: the oldest goes
    assert outbox.segment_count() == 1 and outbox.free_count() == 1
    assert inbox.segment_count() == 2
    inbox.retire([old.segment_id])
    assert inbox.segment_count() == 1
    assert held.new_maps() == 2  # the 1 MiB segment, once on each end
    # The retired id is not announced again by the next staged frame.
    again = outbox.stage(_message(STAGE_MIN_BYTES, 3))
    assert again is not None and again.segment_id == new.segment_id
    assert _parse(again.descriptor)[3] == []
    _deliver(inbox, again)


@pytest.fixture
def other_ends(held: Held) -> Iterator[Ends]:
    """A second connection's two ends, beside ``ends``."""
    yield from _both_ends()


def _staged_and_released(ends: Ends, nbytes: int, seed: int) -> int:
    """Stage a message, let the peer drop it, and hand its RELEASE to the Outbox; return the
    segment's id."""
    outbox, inbox, released = ends
    staged = outbox.stage(_message(nbytes, seed))
    assert staged is not None
    _deliver(inbox, staged)
    assert released[-1] == staged.segment_id
    assert outbox.release(staged.segment_id) == []
    return staged.segment_id


@needs_shm
def test_the_process_keeps_at_most_process_cache_bytes_of_free_segments(
    ends: Ends, other_ends: Ends, held: Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Free segments count against one budget for all of a process's connections: a RELEASE
    that takes the total over PROCESS_CACHE_BYTES retires the least recently freed segment,
    even another connection's, which then announces it (RETIRE) with its next release or
    retire_idle; a segment in use again no longer counts."""
    monkeypatch.setattr(_shm, "PROCESS_CACHE_BYTES", 3 * MIB)
    before = _shm.spare_bytes()
    old_id = _staged_and_released(ends, MIB + 1, 1)  # a 2 MiB segment, freed first
    assert _shm.spare_bytes() - before == 2 * MIB
    # The other connection reuses one of its own segments: no new spare bytes meanwhile.
    reused_id = _staged_and_released(other_ends, STAGE_MIN_BYTES, 2)
    again = other_ends[0].stage(_message(STAGE_MIN_BYTES, 3))
    assert again is not None and again.segment_id == reused_id
    assert _shm.spare_bytes() - before == 2 * MIB  # the 1 MiB one is busy again
    _deliver(other_ends[1], again)
    assert other_ends[0].release(reused_id) == []  # 3 MiB free in all: within the budget
    new_id = _staged_and_released(other_ends, MIB + 1, 4)  # 5 MiB: the oldest must go
    assert _shm.spare_bytes() - before == 3 * MIB
    outbox, inbox, _ = ends
    assert outbox.segment_count() == 0
    assert outbox.retire_idle(time.monotonic()) == [old_id]  # announced to its peer
    inbox.retire([old_id])
    assert inbox.segment_count() == 0
    assert other_ends[0].segment_count() == 2 and other_ends[0].free_count() == 2
    assert new_id != reused_id
    assert held.new_maps() == 4  # the other connection's two segments, on each end
    other_ends[0].close()
    assert _shm.spare_bytes() == before  # a closed Outbox keeps nothing on the books


@needs_shm
def test_segments_left_free_for_idle_s_are_retired(ends: Ends) -> None:
    """retire_idle (the watchdog's call) retires free segments unused for IDLE_S, and only
    those: a busy one stays, whatever its age."""
    outbox, inbox, _ = ends
    idle = outbox.stage(_message(STAGE_MIN_BYTES, 1))
    assert idle is not None
    _deliver(inbox, idle)
    outbox.release(idle.segment_id)
    busy = outbox.stage(_message(2 * MIB, 2))  # too big for the free one: a new segment
    assert busy is not None and busy.segment_id != idle.segment_id
    _, kept = _deliver(inbox, busy)
    now = time.monotonic()
    assert outbox.retire_idle(now) == []  # freed just now
    assert outbox.retire_idle(now + _shm.IDLE_S) == [idle.segment_id]
    assert outbox.segment_count() == 1 and outbox.free_count() == 0
    inbox.retire([idle.segment_id])  # the RETIRE frame's effect
    assert inbox.segment_count() == 1
    assert outbox.retire_idle(now + 100 * _shm.IDLE_S) == []  # the busy one stays
    del kept


@needs_shm
def test_retire_frames_refuse_a_lent_segment(ends: Ends) -> None:
    outbox, inbox, released = ends
    staged = outbox.stage(_message(STAGE_MIN_BYTES, 1))
    assert staged is not None
    segment_id, kept = _deliver(inbox, staged)
    with pytest.raises(ProtocolError, match="lent"):
        inbox.retire([segment_id])
    assert bytes(kept[0]) == bytes(_message(STAGE_MIN_BYTES, 1)[0])
    del kept
    assert released == [segment_id]
    inbox.retire([segment_id])
    assert inbox.segment_count() == 0


@needs_shm
def test_abandon_retires_the_segment(ends: Ends, held: Held) -> None:
    outbox, inbox, released = ends
    first = outbox.stage(_message(STAGE_MIN_BYTES, 1))
    second = outbox.stage(_message(STAGE_MIN_BYTES, 2))
    assert first is not None and second is not None
    _deliver(inbox, first)  # (views dropped at once: released)
    _deliver(inbox, second)
    assert released == [first.segment_id, second.segment_id]
    outbox.release(first.segment_id)
    outbox.release(second.segment_id)
    assert inbox.segment_count() == 2

    lost = outbox.stage(_message(STAGE_MIN_BYTES, 3))  # reuses a free segment ...
    assert lost is not None and lost.fd is None
    outbox.abandon(lost)  # ... that could not be sent
    assert outbox.segment_count() == 1
    assert held.new_maps() == 3
    with pytest.raises(ProtocolError):  # it is gone: the peer cannot release it
        outbox.release(lost.segment_id)

    after = outbox.stage(_message(STAGE_MIN_BYTES, 4))
    assert after is not None and after.fd is None  # the other free segment
    assert after.segment_id != lost.segment_id
    assert _parse(after.descriptor)[3] == [lost.segment_id]
    _, received = _deliver(inbox, after)
    assert bytes(received[0]) == bytes(_message(STAGE_MIN_BYTES, 4)[0])
    assert inbox.segment_count() == 1, "the receiver did not unmap the abandoned segment"
    assert held.new_maps() == 2
    del received

    # Abandoning a brand-new segment (its descriptor never sent) retires it too.
    fresh = outbox.stage(_message(STAGE_MIN_BYTES, 5))
    assert fresh is not None and fresh.fd is not None
    _close_fd(fresh)
    outbox.abandon(fresh)
    assert outbox.segment_count() == 1
    assert held.new_maps() == 2
    assert released == [first.segment_id, second.segment_id, after.segment_id]


def _malformed_cases() -> list[Any]:
    valid = HEAD.pack(1, MIB, 0, 0, 0)
    return [
        pytest.param(b"\x00" * (HEAD.size - 1), id="short head"),
        pytest.param(valid + b"\x00", id="trailing byte"),
        pytest.param(HEAD.pack(1, MIB, 0, 0, 2) + PART.pack(0, 1), id="missing part"),
        pytest.param(HEAD.pack(1, MIB, 0, 3, 0) + ID.pack(7), id="missing retired ids"),
        pytest.param(HEAD.pack(1, MIB, 0, 0, 1) + PART.pack(0, 1)[:-1], id="cut part"),
    ]


@needs_shm
@pytest.mark.parametrize("descriptor", _malformed_cases())
def test_malformed_descriptor_is_a_protocol_error(ends: Ends, descriptor: bytes) -> None:
    _, inbox, _ = ends
    with pytest.raises(ProtocolError, match="malformed"):
        inbox.unstage(memoryview(descriptor))


@needs_shm
def test_bad_frames_and_releases_are_protocol_errors(
    ends: Ends,
) -> None:
    outbox, inbox, released = ends
    # Nothing mapped yet: an unknown segment, or a frame whose descriptor never came.
    with pytest.raises(ProtocolError, match="unknown segment"):
        inbox.unstage(_descriptor(42, MIB, False, parts=((0, 10),)))
    with pytest.raises(ProtocolError, match="did not arrive"):
        inbox.unstage(_descriptor(42, MIB, True, parts=((0, 10),)))
    # Releases of segments that the peer does not hold.
    with pytest.raises(ProtocolError):
        outbox.release(1)

    staged = outbox.stage(_message(STAGE_MIN_BYTES, 1))
    assert staged is not None
    segment_id, size, _, _, _ = _parse(staged.descriptor)
    _deliver(inbox, staged)  # (its views dropped at once)
    assert released == [segment_id]
    outbox.release(segment_id)
    with pytest.raises(ProtocolError):
        outbox.release(segment_id)  # twice
    with pytest.raises(ProtocolError):
        outbox.release(segment_id + 1000)

    # Parts that do not lie inside the (known) segment.
    for offset, length in [(size - 10, 11), (size, 1), (0, size + 1), ((1 << 64) - 1, 1)]:
        with pytest.raises(ProtocolError, match="outside"):
            inbox.unstage(_descriptor(segment_id, size, False, parts=((offset, length),)))
    # The very end of the segment is inside.
    received = inbox.unstage(_descriptor(segment_id, size, False, parts=((size - 10, 10),)))
    assert len(received) == 1 and len(received[0]) == 10

    # A new descriptor for an id that is already mapped: refused, and the descriptor closed.
    fd = _memfd(size, SEALS)
    inode = _inode(fd)
    inbox.add_descriptors([fd])
    with pytest.raises(ProtocolError, match="reused"):
        inbox.unstage(_descriptor(segment_id, size, True, parts=((0, 1),)))
    assert _fd_closed(fd, inode)
    assert inbox.segment_count() == 1
    assert released == [segment_id]
    del received
    assert released == [segment_id, segment_id]


def _bad_segment_cases() -> list[Any]:
    shrink = getattr(fcntl, "F_SEAL_SHRINK", 0)
    return [
        pytest.param(MIB, MIB, None, id="sealing not allowed"),
        pytest.param(MIB, MIB, 0, id="not sealed"),
        pytest.param(MIB, MIB, shrink, id="may grow"),
        pytest.param(MIB, 2 * MIB, SEALS, id="size differs"),
        pytest.param(-1, MIB, None, id="a pipe"),
        pytest.param(0, 0, SEALS, id="sealed but empty"),
        pytest.param(2 * _shm.MAX_SEGMENT_BYTES, 2 * _shm.MAX_SEGMENT_BYTES, SEALS, id="too big"),
    ]


@needs_shm
@pytest.mark.parametrize(("real_size", "claimed_size", "seals"), _bad_segment_cases())
def test_a_segment_that_can_change_size_is_refused_and_closed(
    ends: Ends,
    held: Held,
    real_size: int,
    claimed_size: int,
    seals: int | None,
) -> None:
    _, inbox, _ = ends
    if real_size < 0:
        fd, write_end = os.pipe()
        os.close(write_end)
    else:
        fd = _memfd(real_size, seals)
    inode = _inode(fd)
    inbox.add_descriptors([fd])
    with pytest.raises(ProtocolError):
        inbox.unstage(_descriptor(1, claimed_size, True, parts=((0, 1),)))
    assert _fd_closed(fd, inode), "the refused descriptor was not closed"
    assert held.new_fds() == 0
    assert held.new_maps() == 0
    assert inbox.segment_count() == 0


@needs_shm
def test_a_peer_cannot_share_more_than_max_segments(ends: Ends, held: Held) -> None:
    _, inbox, released = ends
    for segment_id in range(1, MAX_SEGMENTS + 1):
        inbox.add_descriptors([_memfd(MIB, SEALS)])
        inbox.unstage(_descriptor(segment_id, MIB, True, parts=((0, 1),)))  # dropped at once
    assert inbox.segment_count() == MAX_SEGMENTS
    fd = _memfd(MIB, SEALS)
    inode = _inode(fd)
    inbox.add_descriptors([fd])
    with pytest.raises(ProtocolError):
        inbox.unstage(_descriptor(MAX_SEGMENTS + 1, MIB, True, parts=((0, 1),)))
    assert _fd_closed(fd, inode)
    assert inbox.segment_count() == MAX_SEGMENTS
    # Retiring one in the same frame makes room.
    inbox.add_descriptors([_memfd(MIB, SEALS)])
    inbox.unstage(_descriptor(MAX_SEGMENTS + 2, MIB, True, retired=(1,), parts=((0, 1),)))
    assert inbox.segment_count() == MAX_SEGMENTS
    assert held.new_maps() == MAX_SEGMENTS
    assert released == [*range(1, MAX_SEGMENTS + 1), MAX_SEGMENTS + 2]


@needs_shm
@pytest.mark.parametrize("batches", [[MAX_PENDING_DESCRIPTORS + 1], [MAX_PENDING_DESCRIPTORS, 1]])
def test_too_many_pending_descriptors_are_refused_and_closed(
    ends: Ends, held: Held, batches: list[int]
) -> None:
    _, inbox, _ = ends
    fds = []
    for count in batches[:-1]:
        batch = [_memfd(0, None) for _ in range(count)]
        fds += batch
        inbox.add_descriptors(batch)
    last = [_memfd(0, None) for _ in range(batches[-1])]
    fds += last
    inodes = [_inode(fd) for fd in fds]
    assert held.new_fds() == len(fds)
    with pytest.raises(ProtocolError):
        inbox.add_descriptors(last)
    assert all(_fd_closed(fd, inode) for fd, inode in zip(fds, inodes, strict=True))
    assert held.new_fds() == 0
    # The inbox is closed for good: descriptors that still come are closed at once.
    late = _memfd(0, None)
    late_inode = _inode(late)
    with pytest.raises(ProtocolError):
        inbox.add_descriptors([late])
    assert _fd_closed(late, late_inode)


@needs_shm
def test_close_unmaps_every_segment_and_closes_pending_descriptors(held: Held) -> None:
    released: list[int] = []
    outbox, inbox = _shm.Outbox(), _shm.Inbox(released.append)
    try:
        delivered = []
        for seed, nbytes in enumerate([STAGE_MIN_BYTES, 3 * MIB]):
            one = outbox.stage(_message(nbytes, seed))
            assert one is not None
            _deliver(inbox, one)  # (its views dropped at once)
            delivered.append(one)
        assert released == [one.segment_id for one in delivered]
        # Two descriptors whose frames have not come yet.
        for seed in (10, 11):
            pending = outbox.stage(_message(STAGE_MIN_BYTES, seed))
            assert pending is not None and pending.fd is not None
            inbox.add_descriptors([os.dup(pending.fd)])
            os.close(pending.fd)
        outbox.release(delivered[0].segment_id)  # one free, three busy
        assert outbox.segment_count() == MAX_SEGMENTS
        assert outbox.free_count() == 1
        assert inbox.segment_count() == 2
        assert held.new_maps() == MAX_SEGMENTS + 2
        # The two pending descriptors, and (CPython's mmap keeps a duplicate) maybe one per
        # mapping.
        assert held.new_fds() - 2 in (0, held.new_maps())
        held.check_shm()

        inbox.close()
        assert inbox.segment_count() == 0
        assert held.new_maps() == MAX_SEGMENTS
        assert held.new_fds() in (0, held.new_maps())
        outbox.close()
        assert outbox.segment_count() == 0
        held.check()

        # Closed for good, and closing again is harmless.
        assert outbox.stage(_message(STAGE_MIN_BYTES, 12)) is None
        with pytest.raises(ProtocolError):
            inbox.unstage(_descriptor(delivered[1].segment_id, MIB, False, parts=((0, 1),)))
        outbox.close()
        inbox.close()
        held.check()
        assert len(released) == 2
    finally:
        outbox.close()
        inbox.close()


def _hello_then_staged_request(
    identity: bytes, request: tuple[bytes, list[memoryview]]
) -> tuple[list[bytes | memoryview], _shm.Staged]:
    """The bytes of a peer's HELLO followed at once by a staged REQUEST (request id 1), and
    what was staged (the caller attaches its descriptor, then closes it)."""
    ours = Connection(key=None, identity=identity)
    hello = ours.initiate()
    # Any HELLO completes a handshake without a key: what lets `ours` write frames.
    ours.receive_data(Connection(key=None, identity=b"{}").initiate())
    assert ours.next_event() is not None and ours.state.name == "OPEN"
    header, buffers = request
    staged = _shm.Outbox().stage(buffers)
    assert staged is not None and staged.fd is not None
    frame = ours.send_message(
        MessageKind.REQUEST,
        1,
        header,
        [memoryview(staged.descriptor)],
        flags=_protocol.FLAG_STAGED,
    )
    return [hello, *frame], staged


def _response_and_release(sock: socket.socket) -> tuple[Message | None, list[int]]:
    """Read until the first RESPONSE (or ERROR_RESPONSE) and the first RELEASE have arrived:
    that response (None if none came) and the segments released, in order.  Ends early at
    EOF or after 10 s without data."""
    theirs = Connection(key=None, identity=b"{}")
    theirs.initiate()  # never sent: it only reads
    sock.settimeout(10.0)
    response: Message | None = None
    released: list[int] = []
    while response is None or not released:
        event = theirs.next_event()
        if event is None:
            try:
                theirs.receive_data(sock.recv(1 << 16))
            except TimeoutError:
                break
        elif isinstance(event, Message):
            if event.kind in (MessageKind.RESPONSE, MessageKind.ERROR_RESPONSE):
                response = response or event
            elif event.kind is MessageKind.CONTROL and event.flags == _protocol.FLAG_RELEASE:
                released.append(event.request_id)
        elif not isinstance(event, HandshakeComplete):
            break  # ConnectionClosed
    return response, released


@needs_shm
def test_a_staged_frame_read_with_the_handshake_keeps_its_descriptor() -> None:
    """A peer completes its handshake as soon as our HELLO arrives and may then send a staged
    message at once, so that our last handshake read also takes that frame (with its
    SCM_RIGHTS descriptor).  Sent here in one ``sendmsg``, which makes that certain: the
    request must still be served, not dropped for a missing descriptor; and once served (its
    argument dropped), the segment comes back in a RELEASE frame."""
    np = pytest.importorskip("numpy")
    agent = Agent("worker0", 0, 2, RpcBackendOptions(), None, ("127.0.0.1", 0))
    agent.start()
    try:
        address = agent.local_listener.address if agent.local_listener is not None else None
        assert isinstance(address, str), "no Unix-domain listener"
        payload = np.arange(STAGE_MIN_BYTES, dtype=np.uint8)
        request = dumps((len, (payload,), {}))
        parts, staged = _hello_then_staged_request(b'{"name": "worker1", "rank": 1}', request)
        assert staged.fd is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(address)
            try:
                sock.sendmsg(
                    parts, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [staged.fd]))]
                )
            finally:
                os.close(staged.fd)
            response, released = _response_and_release(sock)
        assert response is not None, "the worker dropped the connection"
        assert response.kind is MessageKind.RESPONSE
        assert loads(response.header, response.buffers) == STAGE_MIN_BYTES
        assert released == [staged.segment_id], "the served request's segment never came back"
    finally:
        agent.stop()
    assert join_thenable_threads(10.0) == []


# -- workers on this host -----------------------------------------------------------------------


def _shutdown_all(group: Group, ranks: list[int], graceful: bool = True) -> None:
    """Shut every worker in ``ranks`` down at once; each must map no segment afterwards."""
    tickets = [group.submit(r, shm_fns.shutdown_and_count, graceful) for r in ranks]
    for ticket in tickets:
        _, after = group.result(ticket)
        assert after == 0, f"worker {ticket.rank} maps {after} segments after shutdown"


def _connect_all(group: Group, ranks: list[int]) -> None:
    """Connect every pair of workers with small calls, highest rank first; each link must
    be Unix-domain.

    Rank 0 calls last: by then every peer has connected to it over a Unix-domain socket,
    which replaces any TCP link it kept from the join (see
    test_same_host_workers_talk_over_unix_sockets, which calls from rank 0 first).
    """
    for rank in sorted(ranks, reverse=True):
        peers = [r for r in ranks if r != rank]
        kinds = group.call(rank, shm_fns.link_kinds, [f"worker{r}" for r in peers])
        assert kinds["local_listener"] and kinds["published_local"], (rank, kinds)
        assert kinds["is_local"] == dict.fromkeys(peers, True), (rank, kinds)


def _settle(group: Group) -> None:
    """Every worker drops what it kept; then every worker's sending segments must all come
    back free within 10 s (the peers' RELEASEs, sent as their last views are collected)."""
    group.call_all(shm_fns.drop_kept)
    for rank, (busy, elapsed) in enumerate(group.call_all(shm_fns.wait_until_idle, 10.0)):
        assert busy == 0, f"worker{rank}: {busy} segments still busy after {elapsed:.1f} s"


@needs_shm
def test_same_host_workers_talk_over_unix_sockets(make_group: GroupFactory) -> None:
    """Every worker's link to every other is Unix-domain, rank 0's included, when rank 0
    is the first to call: its links to the others must not be the TCP connections over
    which they joined."""
    group: Group = make_group(3)
    group.init_all(shm_fns.init_worker)
    for rank in range(3):
        peers = [r for r in range(3) if r != rank]
        kinds = group.call(rank, shm_fns.link_kinds, [f"worker{r}" for r in peers])
        assert kinds["local_listener"] and kinds["published_local"], (rank, kinds)
        assert kinds["is_local"] == dict.fromkeys(peers, True), (rank, kinds)
    for rank in range(3):
        report = group.call(rank, shm_fns.report)
        # (Two between a pair is possible: both may connect before either has adopted the
        # other's connection.)
        assert report["local"] >= 2, (rank, report)
        assert report["maps"] == 0, (rank, report)  # small calls are not staged
    _shutdown_all(group, [0, 1, 2])
    group.close()


def test_same_host_ipc_false_uses_tcp_and_never_stages(make_group: GroupFactory) -> None:
    group: Group = make_group(2)
    group.init_all(shm_fns.init_worker, same_host_ipc=False)
    for rank, peer in [(0, 1), (1, 0)]:
        kinds = group.call(rank, shm_fns.link_kinds, [f"worker{peer}"])
        assert kinds == {
            "is_local": {peer: False},
            "local_listener": False,
            "published_local": False,
        }
    assert group.call(0, shm_fns.echo_loop, "worker1", 2, 8 * MIB) == 0
    for rank in (0, 1):
        report = group.call(rank, shm_fns.report)
        assert report["local"] == 0 and report["maps"] == 0 and report["segments"] == 0
    # Payloads of 32 MiB and more arrive in recycled memory (_recycled): worker1 keeps each
    # one, so none may be overwritten by the next; worker0 drops its echoes, so it reuses.
    trips = group.call(0, shm_fns.keep_many, "worker1", 3, 40 * MIB)
    assert all(trip["equal"] for trip in trips), trips
    for i, trip in enumerate(trips):
        assert group.call(1, shm_fns.kept_state, f"many-{i}")["digest"] == trip["digest"]
    _shutdown_all(group, [0, 1])
    group.close()


@needs_shm
def test_a_worker_without_same_host_ipc_is_reached_over_tcp(make_group: GroupFactory) -> None:
    """One worker opts out: both ends of their connection use TCP, and calls work."""
    group: Group = make_group(2)
    tickets = [
        group.submit(0, shm_fns.init_worker, 0, 2, group.port),
        group.submit(1, shm_fns.init_worker, 1, 2, group.port, same_host_ipc=False),
    ]
    for ticket in tickets:
        group.result(ticket)
    assert group.call(0, shm_fns.link_kinds, ["worker1"])["is_local"] == {1: False}
    assert group.call(1, shm_fns.link_kinds, ["worker0"])["is_local"] == {0: False}
    assert group.call(0, shm_fns.echo_loop, "worker1", 2, 4 * MIB) == 0
    assert group.call(1, shm_fns.echo_loop, "worker0", 2, 4 * MIB) == 0
    assert group.call(0, shm_fns.memfd_mappings) == 0
    _shutdown_all(group, [0, 1])
    group.close()


@pytest.fixture(scope="module")
def pair() -> Iterator[Group]:
    """Two workers that stay up for the payload tests."""
    with Group(2) as group:
        group.init_all(shm_fns.init_worker)
        _connect_all(group, [0, 1])
        yield group
        group.call_all(fns.shutdown_if_running)


PAYLOADS = [
    pytest.param("array", id="numpy"),
    pytest.param(
        "tensor",
        id="torch",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("torch") is None, reason="torch is not installed"
        ),
    ),
    pytest.param("views", id="two numpy views"),
]


@needs_shm
@pytest.mark.parametrize("kind", PAYLOADS)
def test_large_payloads_arrive_intact_and_private(pair: Group, kind: str) -> None:
    """worker0 echoes 8 MiB through worker1 (which keeps what it received): the payload
    goes through shared memory and comes back equal (views still sharing memory).  Each
    received copy lies in a segment (lent to its receiver, not copied out), yet each can
    be changed without the other end seeing it, and the next trips, while both are held,
    change neither (a segment is not written while its receiver holds it)."""
    _settle(pair)  # every segment free: both trips of each echo are staged
    try:
        out = pair.call(0, shm_fns.check_echo, "worker1", kind)
        assert out["type"] == {"array": "ndarray", "tensor": "Tensor", "views": "tuple"}[kind]
        assert out["mapped_after_trip"] > 0, "the payload did not go through shared memory"
        failed = [
            name
            for name in [
                "equal",
                "there_equal",
                "back_changed",
                "there_unchanged_by_back",
                "there_changed",
                "back_unchanged_by_there",
                "second_equal",
                "back_intact_after_next_trip",
                "there_intact_after_next_trip",
                "sent_unchanged",
            ]
            if out[name] is not True
        ]
        assert not failed, out
        assert out["back_in_shm"] is True and out["there_in_shm"] is True, out
        if kind == "views":
            assert out["back_shares"] and out["there_shares"] and out["back_views_linked"], out
    finally:
        _settle(pair)


@needs_shm
def test_a_kept_payload_keeps_its_segment_busy_until_dropped(pair: Group) -> None:
    """worker1 keeps every payload that worker0 sends: each keeps one of worker0's segments
    busy, so after MAX_SEGMENTS of them the rest go through the socket (intact, and not in
    shared memory); once worker1 drops them, every segment comes back free."""
    _settle(pair)
    count = MAX_SEGMENTS + 2
    try:
        trips = pair.call(0, shm_fns.keep_many, "worker1", count, 2 * MIB)
        assert [trip["equal"] for trip in trips] == [True] * count, trips
        expected_busy = [min(i + 1, MAX_SEGMENTS) for i in range(count)]
        assert [trip["busy"] for trip in trips] == expected_busy, trips
        kept = [pair.call(1, shm_fns.kept_state, f"many-{i}") for i in range(count)]
        assert [state["digest"] for state in kept] == [trip["digest"] for trip in trips]
        in_shm = [state["in_shm"] for state in kept]
        assert in_shm == [True] * MAX_SEGMENTS + [False] * (count - MAX_SEGMENTS), in_shm
        # Changing one kept payload changes no other (each has a segment, or memory, of its
        # own).
        changed = pair.call(1, shm_fns.mutate_kept, "many-0")
        assert changed != trips[0]["digest"]
        after = [pair.call(1, shm_fns.kept_state, f"many-{i}")["digest"] for i in range(count)]
        assert after[1:] == [trip["digest"] for trip in trips[1:]]
        assert pair.call(0, shm_fns.busy_segments) == MAX_SEGMENTS
    finally:
        assert pair.call(1, shm_fns.drop_kept) == count
        busy, elapsed = pair.call(0, shm_fns.wait_until_idle, 10.0)
        assert busy == 0, f"{busy} segments still busy {elapsed:.1f} s after worker1 dropped all"


def _echo_both_ways(group: Group, rounds: int, nbytes: int) -> None:
    tickets = [
        group.submit(0, shm_fns.echo_loop, "worker1", rounds, nbytes),
        group.submit(1, shm_fns.echo_loop, "worker0", rounds, nbytes),
    ]
    assert [group.result(ticket) for ticket in tickets] == [0, 0]


@needs_shm
def test_segments_and_descriptors_stay_bounded(pair: Group) -> None:
    """50 echoes of 2 MiB each way at once, twice: once the workers hold nothing (their
    segments all free again), each maps at most MAX_SEGMENTS segments per connection each
    way, every mapping is in a connection's table, and the second round opens no
    descriptor for good."""
    reports = []
    for _ in range(2):
        _echo_both_ways(pair, 50, 2 * MIB)
        _settle(pair)
        reports.append(pair.call_all(shm_fns.report))
    for rank, (before, after) in enumerate(zip(*reports, strict=True)):
        for report in (before, after):
            assert 1 <= report["local"] <= 2, (rank, report)
            assert 0 < report["maps"] <= 2 * MAX_SEGMENTS * report["local"], (rank, report)
            assert report["max_sending"] <= MAX_SEGMENTS, (rank, report)
            assert report["max_receiving"] <= MAX_SEGMENTS, (rank, report)
            assert report["busy"] == 0, (rank, report)
            # Every mapping belongs to a connection's segment table: none leaked.
            assert report["maps"] == report["segments"], (rank, report)
        assert after["fds"] <= before["fds"], (rank, before, after)


@needs_shm
@pytest.mark.parametrize(
    ("same_host_ipc", "nbytes"),
    [(True, 8 * MIB), (False, 40 * MIB)],
    ids=["shared memory segments", "recycled payload mappings over TCP"],
)
def test_memory_left_unused_is_freed_while_connections_stay_open(
    make_group: GroupFactory, same_host_ipc: bool, nbytes: int
) -> None:
    """After large messages, a quiet worker frees the shared memory segments (both ends,
    through RETIRE frames) or the recycled mappings of received payloads that it kept for
    reuse, without closing any connection."""
    group: Group = make_group(2)
    group.init_all(shm_fns.init_worker, same_host_ipc=same_host_ipc)
    group.call_all(shm_fns.forget_quickly, 0.2)
    assert group.call(0, shm_fns.echo_loop, "worker1", 3, nbytes) == 0
    for rank in (0, 1):
        state = group.call(rank, shm_fns.wait_until_freed, FREED_WITHIN_S)
        assert state["local"] + state["tcp"] >= 1, (rank, state)  # still connected
        assert state["segments"] == state["maps"] == state["pooled"] == 0, (rank, state)
    assert group.call(0, shm_fns.echo_loop, "worker1", 2, nbytes) == 0  # and still works
    _shutdown_all(group, [0, 1])
    group.close()


@needs_shm
def test_shutdown_unmaps_every_segment(make_group: GroupFactory) -> None:
    """Segments in use both ways; after a graceful shutdown neither worker maps any."""
    shm = _shm_files()
    group: Group = make_group(2)
    group.init_all(shm_fns.init_worker)
    _connect_all(group, [0, 1])
    _echo_both_ways(group, 3, 2 * MIB)
    tickets = [group.submit(r, shm_fns.shutdown_and_count) for r in (0, 1)]
    for ticket in tickets:
        before, after = group.result(ticket)
        assert before > 0, "nothing went through shared memory"
        assert after == 0, f"worker {ticket.rank} maps {after} segments after shutdown"
    group.close()
    assert _shm_files() <= shm


@needs_shm
def test_a_payload_held_at_shutdown_stays_mapped_until_dropped(make_group: GroupFactory) -> None:
    """worker1 keeps a payload that came through shared memory and both shut down: worker0
    maps nothing, worker1 only the segment it holds, whose data stays readable and
    writable; dropping it unmaps that too."""
    shm = _shm_files()
    group: Group = make_group(2)
    group.init_all(shm_fns.init_worker)
    _connect_all(group, [0, 1])
    [trip] = group.call(0, shm_fns.keep_many, "worker1", 1, 2 * MIB)
    assert trip["equal"] and trip["busy"] == 1, trip
    assert group.call(1, shm_fns.kept_state, "many-0") == {
        "digest": trip["digest"],
        "in_shm": True,
    }
    tickets = [group.submit(r, shm_fns.shutdown_and_count) for r in (0, 1)]
    (_, after0), (_, after1) = [group.result(ticket) for ticket in tickets]
    assert after0 == 0, f"worker0 maps {after0} segments after shutdown"
    assert after1 == 1, f"worker1 maps {after1} segments after shutdown, holding one"
    # What worker1 holds is intact, still in the segment, and still its own to change.
    assert group.call(1, shm_fns.kept_state, "many-0") == {
        "digest": trip["digest"],
        "in_shm": True,
    }
    assert group.call(1, shm_fns.mutate_kept, "many-0") != trip["digest"]
    assert group.call(1, shm_fns.drop_kept_and_count) == 0
    group.close()
    assert _shm_files() <= shm


@needs_shm
def test_a_killed_peer_leaves_no_segment_behind(make_group: GroupFactory) -> None:
    """worker1, echoing 8 MiB through worker0 without end, is killed: worker0 unmaps every
    segment within 10 s, still serves worker2 and the test (large payloads too), and
    nothing appears in /dev/shm."""
    shm = _shm_files()
    group: Group = make_group(3)
    group.init_all(shm_fns.init_worker)
    _connect_all(group, [0, 1, 2])  # small calls: nothing staged
    assert group.call(0, shm_fns.memfd_mappings) == 0
    group.call(1, shm_fns.echo_in_background, "worker0", 8 * MIB, 5)
    assert group.wait_signal(1, "echoing") > 0
    assert group.call(0, shm_fns.memfd_mappings) > 0
    assert group.call(0, shm_fns.hold_connections) >= 2  # Unix-domain: to worker1, worker2
    group.kill(1)  # in the middle of an echo, most likely
    # worker0 keeps nothing it receives (echo_value returns its argument, which the reply
    # copies into worker0's own segment), so nothing keeps a mapping once the handlers end.
    count, elapsed = group.call(0, shm_fns.wait_for_no_mappings, 10.0)
    assert count == 0, f"worker0 still maps {count} segments {elapsed:.1f} s after the kill"
    group.call(0, shm_fns.drop_connections)
    held_shm = _shm_files()
    assert held_shm <= shm, f"new in /dev/shm: {held_shm - shm}"
    # worker0 still serves the others, large payloads included.
    assert group.call(2, fns.roundtrip, "worker0", 5) == 6
    assert group.call(0, fns.roundtrip, "worker2", 7) == 8
    assert group.call(2, shm_fns.echo_loop, "worker0", 3, 8 * MIB) == 0
    assert group.call(0, shm_fns.memfd_mappings) > 0
    _shutdown_all(group, [0, 2], graceful=False)
    group.close()
    assert _shm_files() <= shm
