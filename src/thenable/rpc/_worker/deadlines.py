"""The deadlines of an agent's calls in flight: one thread fails each call at its timeout."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ("Deadlines",)

_LOGGER = logging.getLogger("thenable.rpc")


class Deadlines:
    """Fails pending calls at their deadlines, from one thread; adding and cancelling are O(1).

    Calls made with the same timeout expire in the order they were made, so each distinct
    timeout keeps an insertion-ordered map (request id -> deadline) and the thread sleeps until
    the earliest head.  A reply cancels its entry, so memory follows the calls in flight.
    """

    def __init__(self, name: str, expire: Callable[[int, float], None]) -> None:
        self._queues: dict[float, OrderedDict[int, float]] = {}
        self._expire = expire
        # add() and cancel() take the plain lock (cheaper than entering the Condition).
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._closed = False
        self._name = name
        self._thread: threading.Thread | None = None
        # When the thread will next wake up by itself (None: only when notified).
        self._wake_at: float | None = None

    def add(self, request_id: int, timeout: float) -> None:
        """Call ``expire(request_id, timeout)`` once ``timeout`` seconds have passed, unless
        cancelled first (nothing after ``close``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            queue = self._queues.get(timeout)
            if queue is None:
                queue = self._queues[timeout] = OrderedDict()
            queue[request_id] = deadline
            if self._wake_at is None or deadline < self._wake_at:
                self._wake_at = deadline
                self._condition.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def cancel(self, request_id: int, timeout: float) -> None:
        """Forget the deadline of ``request_id`` (added with ``timeout``), if it is still set."""
        with self._lock:
            queue = self._queues.get(timeout)
            if queue is not None:
                queue.pop(request_id, None)

    def close(self) -> None:
        """Drop every deadline and end the thread (waiting for it, unless called from it)."""
        with self._condition:
            self._closed = True
            self._queues.clear()
            self._condition.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _due(self) -> tuple[list[tuple[int, float]], float | None]:
        """Pop the expired entries; also return the next deadline (under the lock)."""
        now = time.monotonic()
        due: list[tuple[int, float]] = []
        earliest: float | None = None
        for timeout, queue in self._queues.items():
            while queue:
                request_id, deadline = next(iter(queue.items()))
                if deadline > now:
                    earliest = deadline if earliest is None else min(earliest, deadline)
                    break
                queue.popitem(last=False)
                due.append((request_id, timeout))
        return due, earliest

    def _run(self) -> None:
        while True:
            with self._condition:
                while True:
                    if self._closed:
                        return
                    due, earliest = self._due()
                    if due:
                        break
                    self._wake_at = earliest
                    self._condition.wait(None if earliest is None else earliest - time.monotonic())
            for request_id, timeout in due:
                try:
                    self._expire(request_id, timeout)
                except Exception:
                    _LOGGER.exception("failing RPC request %d at its timeout failed", request_id)
