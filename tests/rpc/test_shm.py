"""Shared memory between same-host workers (``thenable.rpc._shm``) and its ownership rules.

The first part drives an ``Outbox`` and an ``Inbox`` in this process, handing each staged
descriptor over as the transport does after ``SCM_RIGHTS`` (a duplicate, then the sender's
copy closed).  Every one of those tests ends with both ends closed and checks that this
process holds as many descriptors and segment mappings as before, and that ``/dev/shm`` has
no new file.

The second part runs workers (``_harness``) on this host: their connections are Unix-domain
(TCP with ``same_host_ipc=False``), large payloads arrive intact and private, segments and
descriptors stay bounded over many calls, and shutdown or a killed peer unmaps everything.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import mmap
import os
import random
import socket
import struct
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _remote_fns as fns
import _shm_fns as shm_fns
import pytest
from _harness import Group, join_thenable_threads
from conftest import GroupFactory

from thenable.rpc import _shm
from thenable.rpc._agent import Agent
from thenable.rpc._options import RpcBackendOptions
from thenable.rpc._protocol import (
    Connection,
    HandshakeComplete,
    Message,
    MessageKind,
    ProtocolError,
)
from thenable.rpc._serialize import dumps, loads
from thenable.rpc._shm import MAX_PENDING_DESCRIPTORS, MAX_SEGMENTS, STAGE_MIN_BYTES

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


@pytest.fixture
def held() -> Iterator[Held]:
    yield Held()


@pytest.fixture
def ends(held: Held) -> Iterator[tuple[_shm.Outbox, _shm.Inbox]]:
    """An Outbox and the Inbox of its peer; closed at the end, which must free everything."""
    outbox, inbox = _shm.Outbox(), _shm.Inbox()
    yield outbox, inbox
    outbox.close()
    inbox.close()
    held.check()


def _deliver(inbox: _shm.Inbox, staged: _shm.Staged) -> tuple[int, list[memoryview]]:
    """What the transport does with a staged frame: pass the descriptor, then unstage."""
    if staged.fd is not None:
        inbox.add_descriptors([os.dup(staged.fd)])
        os.close(staged.fd)
    return inbox.unstage(memoryview(staged.descriptor))


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


def _address(buffer: memoryview) -> int:
    """Where a (writable, non-empty) buffer's memory starts."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


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
def test_round_trip_copies_odd_sizes_into_aligned_private_buffers(
    ends: tuple[_shm.Outbox, _shm.Inbox], held: Held
) -> None:
    outbox, inbox = ends
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
    assert got_id == staged.segment_id
    assert [bytes(buffer) for buffer in received] == sent
    for buffer in received:
        assert not buffer.readonly
        assert _address(buffer) % 64 == 0, "a received buffer is not 64-byte aligned"
    assert inbox.segment_count() == outbox.segment_count() == 1
    assert held.new_maps() == 2  # the sender's mapping and the receiver's

    # The received buffers are private: writing them leaves the segment as sent ...
    for buffer in received:
        buffer[:] = b"\xaa" * buffer.nbytes
    segment = inbox._mappings[segment_id]
    assert [bytes(segment[offset : offset + n]) for offset, n in parts] == sent
    # ... and the next message staged in the same segment leaves them as written.
    outbox.release(segment_id)
    second = [rng.randbytes(n) for n in sizes]
    again = outbox.stage([memoryview(data) for data in second])
    assert again is not None and again.fd is None and again.segment_id == segment_id
    _, received_again = _deliver(inbox, again)
    assert [bytes(buffer) for buffer in received_again] == second
    assert all(bytes(buffer) == b"\xaa" * buffer.nbytes for buffer in received)
    outbox.release(segment_id)

    # Exactly STAGE_MIN_BYTES is staged.
    boundary = outbox.stage(_message(STAGE_MIN_BYTES, 3))
    assert boundary is not None
    _close_fd(boundary)


@needs_shm
def test_a_released_segment_is_reused_and_a_busy_one_is_not(
    ends: tuple[_shm.Outbox, _shm.Inbox], held: Held
) -> None:
    outbox, inbox = ends
    first = outbox.stage(_message(STAGE_MIN_BYTES, 1))
    assert first is not None and first.fd is not None
    _deliver(inbox, first)
    outbox.release(first.segment_id)

    reused = outbox.stage(_message(STAGE_MIN_BYTES + 5, 2))
    assert reused is not None
    assert reused.fd is None, "a free segment was not reused"
    assert reused.segment_id == first.segment_id
    assert _parse(reused.descriptor)[2] == 0  # no descriptor attached
    _, received = _deliver(inbox, reused)
    assert bytes(received[0]) == bytes(_message(STAGE_MIN_BYTES + 5, 2)[0])

    # Not released: the next message needs a segment of its own.
    busy = outbox.stage(_message(STAGE_MIN_BYTES, 3))
    assert busy is not None and busy.fd is not None
    assert busy.segment_id != first.segment_id
    _, received = _deliver(inbox, busy)
    assert bytes(received[0]) == bytes(_message(STAGE_MIN_BYTES, 3)[0])
    assert outbox.segment_count() == inbox.segment_count() == 2
    assert held.new_maps() == 4


@needs_shm
def test_at_most_max_segments_and_a_too_small_free_one_is_retired(
    ends: tuple[_shm.Outbox, _shm.Inbox], held: Held
) -> None:
    outbox, inbox = ends
    staged = []
    for seed in range(MAX_SEGMENTS):
        one = outbox.stage(_message(STAGE_MIN_BYTES, seed))
        assert one is not None and one.fd is not None
        _deliver(inbox, one)
        staged.append(one)
    ids = {one.segment_id for one in staged}
    assert len(ids) == MAX_SEGMENTS
    # Every segment busy: the socket carries the message.
    assert outbox.stage(_message(STAGE_MIN_BYTES, 99)) is None
    assert outbox.segment_count() == MAX_SEGMENTS
    assert held.new_maps() == 2 * MAX_SEGMENTS

    for one in staged:
        outbox.release(one.segment_id)
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

    # A retired id is announced once.
    outbox.release(segment_id)
    after = outbox.stage(_message(STAGE_MIN_BYTES, 6))
    assert after is not None and after.fd is None
    assert _parse(after.descriptor)[3] == []
    _deliver(inbox, after)

    # Too big for any segment: the socket carries it (nothing is created or copied).
    with mmap.mmap(-1, _shm.MAX_SEGMENT_BYTES + 1, prot=mmap.PROT_READ) as huge:
        view = memoryview(huge)
        try:
            assert outbox.stage([view]) is None
        finally:
            view.release()
    assert outbox.segment_count() == MAX_SEGMENTS


@needs_shm
def test_abandon_retires_the_segment(ends: tuple[_shm.Outbox, _shm.Inbox], held: Held) -> None:
    outbox, inbox = ends
    first = outbox.stage(_message(STAGE_MIN_BYTES, 1))
    second = outbox.stage(_message(STAGE_MIN_BYTES, 2))
    assert first is not None and second is not None
    _deliver(inbox, first)
    _deliver(inbox, second)
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

    # Abandoning a brand-new segment (its descriptor never sent) retires it too.
    fresh = outbox.stage(_message(STAGE_MIN_BYTES, 5))
    assert fresh is not None and fresh.fd is not None
    _close_fd(fresh)
    outbox.abandon(fresh)
    assert outbox.segment_count() == 1
    assert held.new_maps() == 2


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
def test_malformed_descriptor_is_a_protocol_error(
    ends: tuple[_shm.Outbox, _shm.Inbox], descriptor: bytes
) -> None:
    _, inbox = ends
    with pytest.raises(ProtocolError, match="malformed"):
        inbox.unstage(memoryview(descriptor))


@needs_shm
def test_bad_frames_and_releases_are_protocol_errors(
    ends: tuple[_shm.Outbox, _shm.Inbox],
) -> None:
    outbox, inbox = ends
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
    _deliver(inbox, staged)
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
    _, received = inbox.unstage(_descriptor(segment_id, size, False, parts=((size - 10, 10),)))
    assert len(received[0]) == 10

    # A new descriptor for an id that is already mapped: refused, and the descriptor closed.
    fd = _memfd(size, SEALS)
    inode = _inode(fd)
    inbox.add_descriptors([fd])
    with pytest.raises(ProtocolError, match="reused"):
        inbox.unstage(_descriptor(segment_id, size, True, parts=((0, 1),)))
    assert _fd_closed(fd, inode)
    assert inbox.segment_count() == 1


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
    ends: tuple[_shm.Outbox, _shm.Inbox],
    held: Held,
    real_size: int,
    claimed_size: int,
    seals: int | None,
) -> None:
    _, inbox = ends
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
def test_a_peer_cannot_share_more_than_max_segments(
    ends: tuple[_shm.Outbox, _shm.Inbox], held: Held
) -> None:
    _, inbox = ends
    for segment_id in range(1, MAX_SEGMENTS + 1):
        inbox.add_descriptors([_memfd(MIB, SEALS)])
        inbox.unstage(_descriptor(segment_id, MIB, True, parts=((0, 1),)))
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


@needs_shm
@pytest.mark.parametrize("batches", [[MAX_PENDING_DESCRIPTORS + 1], [MAX_PENDING_DESCRIPTORS, 1]])
def test_too_many_pending_descriptors_are_refused_and_closed(
    ends: tuple[_shm.Outbox, _shm.Inbox], held: Held, batches: list[int]
) -> None:
    _, inbox = ends
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
    outbox, inbox = _shm.Outbox(), _shm.Inbox()
    try:
        delivered = []
        for seed, nbytes in enumerate([STAGE_MIN_BYTES, 3 * MIB]):
            one = outbox.stage(_message(nbytes, seed))
            assert one is not None
            _deliver(inbox, one)
            delivered.append(one)
        # Two descriptors whose frames have not come yet.
        for seed in (10, 11):
            pending = outbox.stage(_message(STAGE_MIN_BYTES, seed))
            assert pending is not None and pending.fd is not None
            inbox.add_descriptors([os.dup(pending.fd)])
            os.close(pending.fd)
        outbox.release(delivered[0].segment_id)  # one free, three busy
        assert outbox.segment_count() == MAX_SEGMENTS
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
    finally:
        outbox.close()
        inbox.close()


def _hello_then_staged_request(
    identity: bytes, request: tuple[bytes, list[memoryview]]
) -> tuple[list[bytes | memoryview], int]:
    """The bytes of a peer's HELLO followed at once by a staged REQUEST (request id 1), and
    the segment's descriptor to attach (the caller closes it)."""
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
        flags=_shm.FLAG_STAGED,
    )
    return [hello, *frame], staged.fd


def _first_response(sock: socket.socket) -> Message | None:
    """The first RESPONSE (or ERROR_RESPONSE) that arrives, or None at EOF."""
    theirs = Connection(key=None, identity=b"{}")
    theirs.initiate()  # never sent: it only reads
    sock.settimeout(10.0)
    while True:
        event = theirs.next_event()
        if event is None:
            theirs.receive_data(sock.recv(1 << 16))
        elif isinstance(event, Message):
            if event.kind in (MessageKind.RESPONSE, MessageKind.ERROR_RESPONSE):
                return event
        elif not isinstance(event, HandshakeComplete):
            return None  # ConnectionClosed


@needs_shm
def test_a_staged_frame_read_with_the_handshake_keeps_its_descriptor() -> None:
    """A peer completes its handshake as soon as our HELLO arrives and may then send a staged
    message at once, so that our last handshake read also takes that frame (with its
    SCM_RIGHTS descriptor).  Sent here in one ``sendmsg``, which makes that certain: the
    request must still be served, not dropped for a missing descriptor."""
    np = pytest.importorskip("numpy")
    agent = Agent("worker0", 0, 2, RpcBackendOptions(), None, ("127.0.0.1", 0))
    agent.start()
    try:
        address = agent.local_listener.address if agent.local_listener is not None else None
        assert isinstance(address, str), "no Unix-domain listener"
        payload = np.arange(STAGE_MIN_BYTES, dtype=np.uint8)
        request = dumps((len, (payload,), {}))
        parts, fd = _hello_then_staged_request(b'{"name": "worker1", "rank": 1}', request)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(address)
            try:
                sock.sendmsg(parts, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [fd]))])
            finally:
                os.close(fd)
            response = _first_response(sock)
        assert response is not None, "the worker dropped the connection"
        assert response.kind is MessageKind.RESPONSE
        assert loads(response.header, response.buffers) == STAGE_MIN_BYTES
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
    goes through shared memory and comes back equal (views still sharing memory); neither
    copy lies in a segment, each can be changed without the other seeing it, and the next
    trips through the same segments change neither."""
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
    assert out["back_in_shm"] is False and out["there_in_shm"] is False, out
    if kind == "views":
        assert out["back_shares"] and out["there_shares"] and out["back_views_linked"], out


def _echo_both_ways(group: Group, rounds: int, nbytes: int) -> None:
    tickets = [
        group.submit(0, shm_fns.echo_loop, "worker1", rounds, nbytes),
        group.submit(1, shm_fns.echo_loop, "worker0", rounds, nbytes),
    ]
    assert [group.result(ticket) for ticket in tickets] == [0, 0]


@needs_shm
def test_segments_and_descriptors_stay_bounded(pair: Group) -> None:
    """50 echoes of 2 MiB each way at once, twice: each worker maps at most 2*MAX_SEGMENTS
    segments per connection, every mapping is in a connection's table, and the second
    round opens no descriptor for good."""
    _echo_both_ways(pair, 50, 2 * MIB)
    first = pair.call_all(shm_fns.report)
    _echo_both_ways(pair, 50, 2 * MIB)
    second = pair.call_all(shm_fns.report)
    for rank, (before, after) in enumerate(zip(first, second, strict=True)):
        for report in (before, after):
            assert 1 <= report["local"] <= 2, (rank, report)
            assert 0 < report["maps"] <= 2 * MAX_SEGMENTS * report["local"], (rank, report)
            # Every mapping belongs to a connection's segment table: none leaked.
            assert report["maps"] == report["segments"], (rank, report)
        assert after["fds"] <= before["fds"], (rank, before, after)


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
