"""The event recorder behind ``thenable.trace``: per-thread ring buffers of timeline events.

Theory of operation
-------------------
Instrumented code asks ``recording`` (a module global) before doing anything, so a process that
never traces pays one global read at each instrumented point of the RPC layer; the Future and
fork hot paths are not instrumented at all unless a trace runs (``trace_hooks`` swaps traced
methods in for the duration).

While a ``Capture`` is active, each thread appends event tuples to a ring buffer of its own (a
``deque`` with ``maxlen``: appending never blocks, never takes a lock, and memory stays bounded;
when a thread's buffer is full its oldest events go).  Whoever drains the capture pops what the
buffers hold; the events are converted to the Chrome trace format only then, off the hot path.

An event is a tuple ``(phase, name, category, timestamp_ns, value, args)``: phase ``"X"`` (a
complete span: value is its duration), ``"i"`` (an instant), ``"s"``/``"f"`` (the start/end of
a flow arrow: value is the flow's id).  Timestamps are ``time.perf_counter_ns()``, which on
Linux is ``CLOCK_MONOTONIC``: one clock for every process of a host.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = [
    "Capture",
    "Event",
    "active",
    "complete",
    "flow",
    "flow_in_span",
    "instant",
    "now",
    "recording",
    "refuse_if_recording",
]

Event = tuple[str, str, str, int, int, Any]

recording = False
"""True while a capture is active in this process; instrumented code checks it first."""

now = time.perf_counter_ns
"""The timeline's clock, in nanoseconds."""

_ACTIVE: Capture | None = None


class ThreadEvents:
    """One thread's ring buffer in one capture."""

    __slots__ = ("events", "name", "thread", "tid")

    def __init__(self, capacity: int) -> None:
        thread = threading.current_thread()
        self.thread = thread
        self.name = thread.name
        self.tid = threading.get_native_id()
        self.events: deque[Event] = deque(maxlen=capacity)


class Capture:
    """The events recorded between ``start()`` and ``stop()``, a bounded buffer per thread.

    Args:
        capacity: events kept per thread at most (older ones are dropped first).
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"a trace buffer must hold at least 1 event, got {capacity!r}")
        self.capacity = capacity
        self.start_ns = 0
        self.stop_ns = 0
        # Threads whose buffer was found full when drained: some of their events were lost.
        self.overflowed: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[ThreadEvents] = []

    def start(self) -> None:
        """Make this the process's active capture.

        Raises:
            RuntimeError: another capture is active.
        """
        global _ACTIVE, recording
        with _STATE_LOCK:
            refuse_if_recording()
            self.start_ns = now()
            _ACTIVE = self
            recording = True

    def stop(self) -> None:
        """Stop recording (the events stay here until drained); idempotent."""
        global _ACTIVE, recording
        with _STATE_LOCK:
            if _ACTIVE is self:
                _ACTIVE = None
                recording = False
                self.stop_ns = now()

    def register(self) -> ThreadEvents:
        """This thread's buffer in this capture (made on its first event)."""
        mine = ThreadEvents(self.capacity)
        with self._lock:
            self._threads.append(mine)
        _LOCAL.current = (self, mine.events)
        return mine

    def drain(self) -> list[tuple[ThreadEvents, list[Event]]]:
        """Take the events recorded so far, thread by thread; forget threads that ended."""
        with self._lock:
            threads = list(self._threads)
        taken = []
        for mine in threads:
            events = mine.events
            if len(events) == self.capacity:
                self.overflowed.add(mine.name)
            batch = []
            while True:
                try:
                    batch.append(events.popleft())
                except IndexError:
                    break
            if batch:
                taken.append((mine, batch))
            if not mine.thread.is_alive() and not events:
                with self._lock:
                    self._threads.remove(mine)
        return taken


def active() -> Capture | None:
    """The active capture, if any."""
    return _ACTIVE


def refuse_if_recording() -> None:
    """Raise RuntimeError if a capture is active: one trace at a time in a process."""
    if _ACTIVE is not None:
        raise RuntimeError(
            "a trace is already recording in this process (thenable.trace() or "
            "THENABLE_TRACE); stop it before starting another"
        )


# Where events go when no capture is active (a thread that checked ``recording`` just before
# the capture stopped): nowhere.
_DISCARD: deque[Event] = deque(maxlen=0)


class _Local(threading.local):
    current: tuple[Capture | None, deque[Event]] = (None, _DISCARD)


_LOCAL = _Local()
_STATE_LOCK = threading.Lock()


def _events() -> deque[Event]:
    """This thread's buffer in the active capture (a throwaway one if none is active)."""
    capture, events = _LOCAL.current
    active = _ACTIVE
    if capture is active:
        return events
    if active is None:
        return _DISCARD
    return active.register().events


def complete(name: str, category: str, start_ns: int, args: dict[str, Any] | None = None) -> None:
    """Record a span from ``start_ns`` to now."""
    end = now()
    _events().append(("X", name, category, start_ns, end - start_ns, args))


def instant(name: str, category: str, args: dict[str, Any] | None = None) -> None:
    """Record an instant event, now."""
    _events().append(("i", name, category, now(), 0, args))


def flow(phase: str, flow_id: int, category: str) -> None:
    """Record one end of a flow arrow, now: ``"s"`` where it leaves, ``"f"`` where it lands.

    Each end binds to the span that encloses it on its thread, so record it inside one.
    """
    _events().append((phase, category, category, now(), flow_id, None))


def flow_in_span(phase: str, flow_id: int, category: str) -> int:
    """Start a span with one end of a flow arrow in it: record the end, and return the
    span's start (pass it to ``complete`` when the span ends)."""
    start = now()
    _events().append((phase, category, category, start, flow_id, None))
    return start
