"""Shared memory for large payloads between two workers on the same host.

Over a Unix-domain connection, a message whose out-of-band buffers add up to at least
``STAGE_MIN_BYTES`` does not cross the socket: the sender copies its buffers into a shared
memory *segment* and sends a small frame that says where they are; the receiver builds its
arrays and tensors right on the segment, and tells the sender that the segment is free again
once they are all gone.  Each byte is copied once, in user space, instead of twice through
the kernel's socket buffers (sockets top out near 1 GB/s on these machines; a warm memcpy
runs at about 10 GB/s).

Ownership and cleanup rules
---------------------------
1. A segment is a ``memfd`` (Linux ``memfd_create``): it has no name in any file system, so
   nothing can be left behind in ``/dev/shm``.  The kernel frees its memory when the last
   mapping and descriptor are gone, whichever process dies or closes first.
2. The *sender* creates a segment, sizes it, seals its size (``F_SEAL_SHRINK | F_SEAL_GROW``,
   so the peer can never be made to fault on a truncated mapping), maps it, and passes the
   descriptor to its peer once, attached (``SCM_RIGHTS``) to the first frame staged in it.
   Both ends then hold only their mapping (and the descriptor CPython's ``mmap`` keeps
   with it: one per segment and end).
3. A segment belongs to one connection and one direction.  It is *busy* from the moment the
   sender copies a message into it until the receiver's RELEASE for it arrives; only a free
   segment is written to, so the sender never changes data the receiver holds, and the
   receiver's writes to what it received are never read by the sender.
4. The receiver *lends* the message to the application: its buffers are views of the
   segment, and one exporter object per message keeps the mapping alive while any of them
   (or any array or tensor built on them) lives.  When the last one is collected, a RELEASE
   goes back, with the next frame sent on the connection or within 10 ms.  A peer that
   stages into, or retires, a segment still lent is dropped (``ProtocolError``).
5. The sender keeps at most ``MAX_SEGMENTS`` segments of at most ``MAX_SEGMENT_BYTES`` each
   per connection.  When no free one is big enough it *retires* a free one (the next staged
   frame lists it and both ends unmap it); when the free ones add up to more than
   ``CACHE_BYTES`` it retires the least recently used (a RETIRE frame tells the peer), and
   so does the process when the free segments of all its connections add up to more than
   ``PROCESS_CACHE_BYTES`` (a RETIRE for another connection's segment goes out with that
   connection's next frame, or within a second from the watchdog); when
   every segment is busy (the receiver keeps what it received), or a message is too big, the
   message goes through the socket as usual.  A segment left free for ``IDLE_S`` is retired
   too (by ``retire_idle``, which the transport's watchdog calls), so a quiet connection
   holds no shared memory.  Staging is an optimization only: any failure to stage (no
   ``memfd_create``, out of memory) falls back to the socket.
6. When the connection closes, both ends unmap all of its segments, except that a segment
   still lent stays mapped until the application drops what it received (then it is
   unmapped and freed).  A peer that crashes closes the connection, so the survivor frees
   its mappings then.  A connection that is not Unix-domain (another host) never stages.

Frames: ``_protocol.FLAG_STAGED`` on a message (its only buffer is a descriptor, below,
instead of the data), ``FLAG_RELEASE`` and ``FLAG_RETIRE`` on CONTROL frames (the segment
``request_id`` is free again / will not be used again).

Descriptor: ``!QQBxxxHI`` (segment id, segment size, 1 if a descriptor is attached, number
of retired segment ids, number of parts), then the retired ids (``Q`` each), then
``(offset, length)`` (``QQ``) per part.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import logging
import mmap
import os
import struct
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from thenable.rpc._wire.protocol import ProtocolError

__all__ = [
    "CACHE_BYTES",
    "IDLE_S",
    "MAX_SEGMENTS",
    "MAX_SEGMENT_BYTES",
    "PROCESS_CACHE_BYTES",
    "STAGE_MIN_BYTES",
    "Inbox",
    "Outbox",
    "Staged",
    "available",
    "spare_bytes",
]

_LOGGER = logging.getLogger("thenable.rpc.shm")

STAGE_MIN_BYTES: Final = 1 << 18
"""Messages with at least this many bytes of buffers are staged in shared memory."""
MAX_SEGMENTS: Final = 4
"""Most segments one end of a connection keeps for sending."""
MAX_SEGMENT_BYTES: Final = 1 << 30
"""Largest segment; bigger messages go through the socket."""
CACHE_BYTES = 512 << 20
"""Most bytes of free segments one end of a connection keeps for reuse."""
PROCESS_CACHE_BYTES = 1 << 30
"""Most bytes of free segments the sending ends of all of a process's connections keep,
together (with many same-host peers, ``CACHE_BYTES`` each would add up to a lot)."""
IDLE_S = 5.0
"""A segment free for this many seconds is retired."""
MAX_PENDING_DESCRIPTORS: Final = 8
"""Most received file descriptors waiting for their frame; more is a protocol error."""

_MIN_SEGMENT_BYTES: Final = 1 << 20
_ALIGN: Final = 64
_HEAD: Final = struct.Struct("!QQBxxxHI")
_ID: Final = struct.Struct("!Q")
_PART: Final = struct.Struct("!QQ")
if sys.platform == "linux":
    import fcntl

    _SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
else:  # pragma: no cover - staging is Linux-only
    _SEALS: Final = 0


def available() -> bool:
    """Whether this platform can stage messages (Linux with memfd and file sealing)."""
    return sys.platform == "linux" and hasattr(os, "memfd_create") and _SEALS != 0


def _align_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _segment_size(nbytes: int) -> int:
    """Segments come in powers of two, so that a few of them serve messages of any size."""
    return max(_MIN_SEGMENT_BYTES, 1 << (nbytes - 1).bit_length())


@dataclass(slots=True)
class _Segment:
    id: int
    mapping: mmap.mmap
    busy: bool = False
    last_used: int = 0  # Outbox._uses when last claimed: the cache retires the oldest first
    free_since: float = 0.0  # time.monotonic() of its last RELEASE

    @property
    def size(self) -> int:
        return len(self.mapping)


@dataclass(frozen=True, slots=True)
class Staged:
    """A message copied into shared memory: send ``descriptor`` as its only buffer, with
    ``fd`` attached when it is not None (and close ``fd`` once sent)."""

    segment_id: int
    descriptor: bytes
    fd: int | None
    retired: tuple[int, ...] = ()  # the retirements the descriptor announces


class Outbox:
    """The sending end's segments of one connection (see the module's rules)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._ids = itertools.count(1)
        self._retired: list[int] = []  # retired ids not yet announced to the peer
        self._uses = 0  # messages staged so far
        self._closed = False
        self._serial = next(_OUTBOX_SERIALS)  # its key in _SPARES

    def statistics(self) -> dict[str, int]:
        """Segments mapped for sending, their bytes, and how many the peer holds now."""
        with self._lock:
            segments = list(self._segments.values())
        return {
            "segments": len(segments),
            "bytes": sum(segment.size for segment in segments),
            "busy": sum(segment.busy for segment in segments),
        }

    def stage(self, buffers: Sequence[memoryview]) -> Staged | None:
        """Copy ``buffers`` into a free segment, or return None to send them by socket."""
        lengths = [buffer.nbytes for buffer in buffers]
        offsets = []
        end = 0
        for length in lengths:
            offsets.append(end)
            end = _align_up(end + length)
        if sum(lengths) < STAGE_MIN_BYTES or end > MAX_SEGMENT_BYTES:
            return None
        with self._lock:
            if self._closed:
                return None
            segment, fd = self._claim(end)
            if segment is None:
                return None
            retired, self._retired = self._retired, []
        target = memoryview(segment.mapping)
        try:
            for buffer, offset, length in zip(buffers, offsets, lengths, strict=True):
                target[offset : offset + length] = buffer
        finally:
            target.release()
        head = _HEAD.pack(segment.id, segment.size, fd is not None, len(retired), len(lengths))
        descriptor = b"".join(
            [head]
            + [_ID.pack(segment_id) for segment_id in retired]
            + [_PART.pack(offset, length) for offset, length in zip(offsets, lengths, strict=True)]
        )
        return Staged(segment.id, descriptor, fd, tuple(retired))

    def _claim(self, nbytes: int) -> tuple[_Segment | None, int | None]:
        """A free segment of at least ``nbytes`` (new: with its descriptor), marked busy."""
        free = sorted((s for s in self._segments.values() if not s.busy), key=lambda s: s.size)
        self._uses += 1
        for segment in free:
            if segment.size >= nbytes:
                _SPARES.discard(self, segment)
                segment.busy = True
                segment.last_used = self._uses
                return segment, None
        if len(self._segments) >= MAX_SEGMENTS:
            if not free:
                return None, None  # all busy: the caller uses the socket
            self._retire(free[0])
        try:
            segment, fd = self._create(_segment_size(nbytes))
        except OSError as exc:
            _LOGGER.info("cannot create a shared memory segment (%s); using the socket", exc)
            return None, None
        segment.busy = True
        segment.last_used = self._uses
        self._segments[segment.id] = segment
        return segment, fd

    def _create(self, size: int) -> tuple[_Segment, int]:
        fd = os.memfd_create("thenable-rpc", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return _Segment(next(self._ids), mapping), fd

    def _retire(self, segment: _Segment) -> None:
        if not segment.busy:
            _SPARES.discard(self, segment)
        del self._segments[segment.id]
        self._retired.append(segment.id)
        segment.mapping.close()

    def abandon(self, staged: Staged) -> None:
        """``staged`` could not be sent: retire its segment (the peer may never have seen it)."""
        with self._lock:
            segment = self._segments.get(staged.segment_id)
            if segment is not None:
                self._retire(segment)

    def withdraw(self, staged: Staged) -> None:
        """``staged`` will never be sent (its call timed out while queued behind a peer that
        does not read): its segment is free again, or gone if it was new (the peer never
        heard of it), and the retirements it carried wait for the next announcement."""
        with self._lock:
            self._retired[:0] = staged.retired
            segment = self._segments.get(staged.segment_id)
            if segment is None or self._closed:
                return
            if staged.fd is not None:
                del self._segments[segment.id]
                segment.mapping.close()
            else:
                segment.busy = False
                segment.free_since = time.monotonic()
                _SPARES.add(self, segment)

    def release(self, segment_id: int) -> list[int]:
        """The peer has dropped everything it received in ``segment_id`` (its RELEASE).

        Returns the segments retired now, least recently used first, to keep the free ones
        within ``CACHE_BYTES`` (and any retired before and not yet announced): send the peer
        a RETIRE for each, so that it unmaps them too.
        """
        with self._lock:
            if self._closed:  # a RELEASE that crossed our close: nothing left to free
                return []
            segment = self._segments.get(segment_id)
            if segment is None or not segment.busy:
                raise ProtocolError(
                    f"the peer released segment {segment_id}, which it did not hold"
                )
            segment.busy = False
            segment.free_since = time.monotonic()
            _SPARES.add(self, segment)
            free = [s for s in self._segments.values() if not s.busy]
            cached = sum(s.size for s in free)
            if cached > CACHE_BYTES:  # (rare: sorted only then)
                for spare in sorted(free, key=lambda s: s.last_used):
                    if cached <= CACHE_BYTES:
                        break
                    cached -= spare.size
                    self._retire(spare)
            # Beyond the process's cache: the least recently freed go, this Outbox's now,
            # others' below (under their own lock: no thread holds two Outboxes' locks).
            others = []
            for outbox, spare_id in _SPARES.excess():
                if outbox is self:
                    self._evict_locked(spare_id)
                else:
                    others.append((outbox, spare_id))
            retired, self._retired = self._retired, []
        for outbox, spare_id in others:
            outbox.evict(spare_id)
        return retired

    def evict(self, segment_id: int) -> None:
        """Retire ``segment_id`` if it is still free (it is announced to the peer with the
        next staged frame, ``release`` or ``retire_idle``)."""
        with self._lock:
            self._evict_locked(segment_id)

    def _evict_locked(self, segment_id: int) -> None:
        segment = self._segments.get(segment_id)
        if segment is not None and not segment.busy and not self._closed:
            self._retire(segment)

    def retire_idle(self, now: float) -> list[int]:
        """Retire the segments free since ``IDLE_S`` before ``now``; return every retired id
        not yet announced (send the peer a RETIRE for each)."""
        with self._lock:
            for segment in list(self._segments.values()):
                if not segment.busy and now - segment.free_since >= IDLE_S:
                    self._retire(segment)
            retired, self._retired = self._retired, []
            return retired

    def segment_count(self) -> int:
        with self._lock:
            return len(self._segments)

    def free_count(self) -> int:
        """Segments not waiting for the peer's RELEASE."""
        with self._lock:
            return sum(not s.busy for s in self._segments.values())

    def close(self) -> None:
        """Unmap every segment; later ``stage`` calls return None."""
        with self._lock:
            self._closed = True
            segments = list(self._segments.values())
            self._segments.clear()
            for segment in segments:
                if not segment.busy:
                    _SPARES.discard(self, segment)
        for segment in segments:
            segment.mapping.close()


class _Spares:
    """The free segments of every Outbox in this process, least recently freed first, and
    their total size, which ``PROCESS_CACHE_BYTES`` bounds.

    Outboxes call ``add`` and ``discard`` under their own lock; this lock is always taken
    last, and nothing here takes an Outbox's lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (outbox serial, segment id) -> (outbox, segment size)
        self._free: OrderedDict[tuple[int, int], tuple[Outbox, int]] = OrderedDict()
        self.bytes = 0

    def add(self, outbox: Outbox, segment: _Segment) -> None:
        with self._lock:
            self._free[(outbox._serial, segment.id)] = (outbox, segment.size)
            self.bytes += segment.size

    def discard(self, outbox: Outbox, segment: _Segment) -> None:
        with self._lock:
            if self._free.pop((outbox._serial, segment.id), None) is not None:
                self.bytes -= segment.size

    def excess(self) -> list[tuple[Outbox, int]]:
        """Take the least recently freed segments off the books until the rest fit in
        ``PROCESS_CACHE_BYTES``; return them (as (outbox, segment id)) to be evicted."""
        victims: list[tuple[Outbox, int]] = []
        # A look without the lock first: a stale total only delays trimming to the next call.
        if self.bytes <= PROCESS_CACHE_BYTES:
            return victims
        with self._lock:
            while self.bytes > PROCESS_CACHE_BYTES and self._free:
                (_, segment_id), (outbox, size) = self._free.popitem(last=False)
                self.bytes -= size
                victims.append((outbox, segment_id))
        return victims


_OUTBOX_SERIALS = itertools.count()
_SPARES = _Spares()


def spare_bytes() -> int:
    """Bytes of free segments that this process keeps for reuse, over all its connections."""
    return _SPARES.bytes


class Inbox:
    """The receiving end's mappings of its peer's segments (see the module's rules).

    ``release(segment_id)`` is called (from whatever thread drops the last received view, so
    it must not block) once a message's buffers are all gone.
    """

    def __init__(self, release: Callable[[int], None]) -> None:
        self._lock = threading.Lock()
        self._release = release
        self._mappings: dict[int, mmap.mmap] = {}
        # Segments whose message the application still holds: a weak reference to each
        # message's exporter, whose callback gives the segment back.
        self._lent: dict[int, weakref.ref[ctypes.Array[ctypes.c_ubyte]]] = {}
        self._descriptors: deque[int] = deque()
        self._closed = False

    def statistics(self) -> dict[str, int]:
        """The peer's segments mapped here, their bytes, and how many received messages
        still hold one."""
        with self._lock:
            return {
                "segments": len(self._mappings),
                "bytes": sum(len(mapping) for mapping in self._mappings.values()),
                "lent": len(self._lent),
            }

    def add_descriptors(self, fds: Sequence[int]) -> None:
        """File descriptors received with the socket's data, in order; this Inbox owns them."""
        with self._lock:
            self._descriptors.extend(fds)
            too_many = len(self._descriptors) > MAX_PENDING_DESCRIPTORS or self._closed
        if too_many:
            self.close()
            raise ProtocolError("the peer sent file descriptors that no frame refers to")

    def unstage(self, descriptor: memoryview) -> list[memoryview]:
        """A staged message's parts: writable views of the segment, lent until all are gone."""
        try:
            segment_id, size, has_fd, n_retired, n_parts = _HEAD.unpack_from(descriptor)
            position = _HEAD.size
            retired = [
                _ID.unpack_from(descriptor, position + i * _ID.size)[0] for i in range(n_retired)
            ]
            position += n_retired * _ID.size
            if descriptor.nbytes != position + n_parts * _PART.size:
                raise struct.error("wrong length")
            parts = [
                _PART.unpack_from(descriptor, position + i * _PART.size) for i in range(n_parts)
            ]
        except struct.error:
            raise ProtocolError("malformed shared memory descriptor") from None
        with self._lock:
            if self._closed:
                raise ProtocolError("shared memory frame after the connection closed")
            self._retire_locked(retired)
            if has_fd:
                if not self._descriptors:
                    raise ProtocolError("a staged frame's file descriptor did not arrive")
                self._map(segment_id, self._descriptors.popleft(), size)
            mapping = self._mappings.get(segment_id)
            if mapping is None:
                raise ProtocolError(f"the peer staged a message in unknown segment {segment_id}")
            if segment_id in self._lent:
                raise ProtocolError(f"the peer staged a message in lent segment {segment_id}")
            if any(offset + length > len(mapping) for offset, length in parts):
                raise ProtocolError("a staged part lies outside its segment")
            if not parts:
                self._release(segment_id)
                return []
            low = min(offset for offset, _ in parts)
            high = max(offset + length for offset, length in parts)
            # One exporter per message: it keeps the mapping alive (and unclosable) while any
            # view of the message lives, and its collection gives the segment back.  (A weak
            # reference with a callback: weakref.finalize costs several times more.)
            loan = (ctypes.c_ubyte * (high - low)).from_buffer(mapping, low)
            self._lent[segment_id] = weakref.ref(
                loan, functools.partial(self._returned, segment_id)
            )
            whole = memoryview(loan).cast("B")
        return [whole[offset - low : offset - low + length] for offset, length in parts]

    def retire(self, segment_ids: Sequence[int]) -> None:
        """The peer will not use these segments again (its RETIRE): unmap them."""
        with self._lock:
            self._retire_locked(segment_ids)

    def _retire_locked(self, segment_ids: Sequence[int]) -> None:
        for old in segment_ids:
            if old in self._lent:
                raise ProtocolError(f"the peer retired segment {old} while it was lent")
            _unmap(self._mappings.pop(old, None))

    def _returned(self, segment_id: int, _loan: object = None) -> None:
        """Every view of a lent message is gone: the segment is the sender's again.

        A weak reference's callback: it may run in any thread, at any allocation (a garbage
        collection), even one inside this Inbox's lock, so it takes no lock (dict.pop is
        atomic).
        """
        self._lent.pop(segment_id, None)
        if not self._closed:
            self._release(segment_id)

    def _map(self, segment_id: int, fd: int, size: int) -> None:
        """Map a new segment (fd is consumed), after checking that it cannot shrink."""
        try:
            if segment_id in self._mappings:
                raise ProtocolError(f"the peer reused segment id {segment_id}")
            if not 0 < size <= MAX_SEGMENT_BYTES:
                raise ProtocolError(f"the peer shared a segment of {size} bytes")
            if len(self._mappings) >= MAX_SEGMENTS:
                raise ProtocolError(f"the peer shared more than {MAX_SEGMENTS} segments")
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & _SEALS != _SEALS or os.fstat(fd).st_size != size:
                raise ProtocolError("the peer sent a shared memory segment that can change size")
            self._mappings[segment_id] = mmap.mmap(fd, size)
        except OSError as exc:
            raise ProtocolError(f"cannot map the peer's shared memory segment: {exc}") from exc
        finally:
            os.close(fd)

    def segment_count(self) -> int:
        with self._lock:
            return len(self._mappings)

    def close(self) -> None:
        """Unmap every segment and close descriptors that never found their frame."""
        with self._lock:
            self._closed = True
            mappings = list(self._mappings.values())
            self._mappings.clear()
            descriptors = list(self._descriptors)
            self._descriptors.clear()
        for mapping in mappings:
            _unmap(mapping)
        for fd in descriptors:
            os.close(fd)


def _unmap(mapping: mmap.mmap | None) -> None:
    """Unmap now, or, while received arrays still use it, when the last of them goes."""
    if mapping is not None:
        # BufferError: lent views hold the mapping; it is unmapped when they are collected.
        with contextlib.suppress(BufferError):
            mapping.close()
