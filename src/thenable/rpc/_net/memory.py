"""Recycled memory for large received payloads.

A payload of ``MIN_BYTES`` or more is received into an anonymous memory mapping (see
``_protocol``): mappings of that size are never recycled by malloc, and the first touch of each
fresh page costs a page fault and zeroing, which on these machines is slower than the socket
itself (a 100 MiB echo over TCP ran at 0.63 GB/s with fresh mappings, 1.9 GB/s below the
threshold, where malloc reuses its memory).

So the mappings are recycled here.  A payload is *lent*: it is one ctypes array over a
mapping, and the message's buffers (and the arrays and tensors built on them) are views of
it.  When the last of those is collected, the mapping returns to a free list, and the next
payload of the same size class (a power of two) takes it with its pages already in memory
(payloads too big to be kept get a mapping of their own size).
At most ``KEEP_BYTES`` of free mappings are kept per process; beyond that a returned one is
dropped (and unmapped), and so is one left unused for ``IDLE_S`` (``drop_idle``, which the
transport's watchdog calls).  A recycled mapping is not cleared: the receiver overwrites every
byte that a message's views show.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import time
import weakref
from collections import deque
from typing import Final

__all__ = ("IDLE_S", "KEEP_BYTES", "MIN_BYTES", "allocate", "drop_idle", "lend", "pooled_bytes")

MIN_BYTES: Final = 1 << 25
"""Payloads of at least this many bytes are received into recycled mappings."""
KEEP_BYTES = 256 << 20
"""Most bytes of free mappings one process keeps for reuse."""
IDLE_S = 5.0
"""A free mapping unused for this many seconds is dropped."""

_lock = threading.Lock()
_free: dict[int, list[tuple[float, mmap.mmap]]] = {}  # size class -> (free since, mapping)
_free_bytes = 0
# Mappings whose loan was collected; sorted into _free at the next lend().  Finalizers only
# append here: they may run in any thread, at any allocation, even one inside _lock.
_returned: deque[mmap.mmap] = deque()


def allocate(nbytes: int) -> bytearray | ctypes.Array[ctypes.c_ubyte]:
    """A writable area for a received payload: from ``MIN_BYTES`` on, a recycled or new
    mapping (a fresh mapping's pages cost nothing until data arrives, so a peer's claim of a
    huge frame commits no memory, and recycled ones are not faulted in again); smaller ones are
    bytearrays, whose memory malloc recycles itself (a 1 MiB echo over TCP ran 3x faster with
    the threshold at 32 MiB than at 1 MiB)."""
    if nbytes >= MIN_BYTES:
        return lend(nbytes)
    return bytearray(nbytes)


def lend(nbytes: int) -> ctypes.Array[ctypes.c_ubyte]:
    """A writable array of ``nbytes`` (>= ``MIN_BYTES``) over a recycled or new mapping.

    Its contents are undefined.  The mapping goes back to the free list once the array and
    every view of it are gone.
    """
    size = 1 << (nbytes - 1).bit_length()
    if size > KEEP_BYTES:  # never kept, so no use rounding up (and reserving more)
        size = nbytes
    with _lock:
        _sort_returned_locked()
        spare = _free.get(size)
        mapping = spare.pop()[1] if spare else None  # the most recently used: warmest
        if mapping is not None:
            _take_locked(size)
    if mapping is None:
        mapping = mmap.mmap(-1, size)
    loan = (ctypes.c_ubyte * nbytes).from_buffer(mapping)
    returned = weakref.finalize(loan, _returned.append, mapping)
    returned.atexit = False
    return loan


def drop_idle(now: float = float("inf")) -> None:
    """Drop the free mappings unused since ``IDLE_S`` before ``now`` (by default, all)."""
    global _free_bytes
    with _lock:
        _sort_returned_locked()
        for size, spare in _free.items():
            kept = [entry for entry in spare if now - entry[0] < IDLE_S]
            _free_bytes -= size * (len(spare) - len(kept))
            spare[:] = kept


def pooled_bytes() -> int:
    """Bytes of free mappings kept now (returned ones included once sorted)."""
    with _lock:
        _sort_returned_locked()
        return _free_bytes


def _take_locked(size: int) -> None:
    global _free_bytes
    _free_bytes -= size


def _sort_returned_locked() -> None:
    """Keep returned mappings within ``KEEP_BYTES``; drop the rest (which unmaps them)."""
    global _free_bytes
    while _returned:
        mapping = _returned.popleft()
        size = len(mapping)
        if _free_bytes + size <= KEEP_BYTES:
            _free.setdefault(size, []).append((time.monotonic(), mapping))
            _free_bytes += size
