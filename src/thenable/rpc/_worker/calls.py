"""An agent's calls in flight: their ids, the pending table, their deadlines, and the requests
that timed out with RRefs on board.

Every entry is taken out exactly once - by its reply, its timeout, a failure to send, the loss
of the connection it went on, or shutdown - and whoever takes it completes its Future.  The
table is guarded by the agent's lock (given here), because a lost connection updates the
agent's links and takes that peer's calls at once.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from thenable._future import Future
from thenable.rpc._net.dialing import Dialing
from thenable.rpc._net.transport import Link, PeerConnection
from thenable.rpc._worker.deadlines import Deadlines

__all__ = ("Calls", "Pending", "describe_call", "flow_id", "went_on")


class Pending:
    """A call in flight: its Future, where it went, and what to say if it fails."""

    __slots__ = ("counted", "fn", "future", "holds", "link", "peer_rank", "timeout")

    def __init__(
        self,
        future: Future[Any],
        peer_rank: int,
        link: Link,  # what the request went out on
        fn: object,
        counted: bool,  # an application call, counted for the shutdown barrier
        timeout: float,
        holds: list[Any] | None,  # RRefs to keep alive until the callee has read the request
    ) -> None:
        self.future = future
        self.holds = holds
        self.peer_rank = peer_rank
        self.link = link
        self.fn = fn
        self.counted = counted
        self.timeout = timeout

    def describe(self, name_of: Callable[[int], str]) -> str:
        """For error messages: "call of module.fn on worker1"."""
        return describe_call(self.fn, name_of(self.peer_rank))


class Calls:
    """The pending table of one agent (see the module docstring).

    Methods named ``*_locked`` expect the caller to hold the lock; the others take it.
    """

    def __init__(
        self,
        lock: threading.Lock,
        timer_name: str,
        on_timeout: Callable[[Pending, float], None],
    ) -> None:
        self._lock = lock
        self._ids = itertools.count(1)
        # Invariant (under the lock): every Future here is pending, and is completed by
        # whoever removes its entry.
        self._pending: dict[int, Pending] = {}
        # Requests that timed out with RRefs on board (case 2 of _rref's protocol), by id:
        # (the link, the RRefs), kept until the callee's late reply or the link's end.
        self._late_holds: dict[int, tuple[Link, list[Any]]] = {}
        self._issued = 0  # application calls sent so far, for the shutdown barrier
        self._on_timeout = on_timeout
        self._deadlines = Deadlines(timer_name, self._expire)

    def new_id(self) -> int:
        return next(self._ids)

    def add(self, request_id: int, pending: Pending) -> None:
        """A call about to be sent; its deadline starts now."""
        with self._lock:
            self._pending[request_id] = pending
            if pending.counted:
                self._issued += 1
        if pending.timeout > 0:
            self._deadlines.add(request_id, pending.timeout)

    def take(self, request_id: int) -> Pending | None:
        """The call, out of the table (None if something else took it first)."""
        with self._lock:
            return self._pending.pop(request_id, None)

    def take_answered(self, request_id: int) -> Pending | None:
        """The call a reply answers (None: it timed out or failed already; a late hold for it
        ends, since the callee has read the request)."""
        with self._lock:
            pending = self._pending.pop(request_id, None)
            late = self._late_holds.pop(request_id, None) if pending is None else None
        del late  # (its RRefs may go now, outside the lock)
        if pending is not None and pending.timeout > 0:
            self._deadlines.cancel(request_id, pending.timeout)
        return pending

    def take_went_on_locked(self, conn: PeerConnection) -> list[Pending]:
        """The calls sent on ``conn`` (which is gone), out of the table; their late holds end."""
        lost = [rid for rid, p in self._pending.items() if went_on(p.link, conn)]
        for rid in [rid for rid, (link, _) in self._late_holds.items() if went_on(link, conn)]:
            del self._late_holds[rid]
        return [self._pending.pop(rid) for rid in lost]

    def forget_late_holds_on_locked(self, link: Link) -> None:
        """The late holds of requests that waited on ``link`` (a connect that failed) end."""
        for rid in [rid for rid, (held_on, _) in self._late_holds.items() if held_on is link]:
            del self._late_holds[rid]

    def take_all_locked(self) -> list[Pending]:
        """Every call, out of the table (shutdown); every late hold ends."""
        entries = list(self._pending.values())
        self._pending.clear()
        self._late_holds.clear()
        return entries

    def _expire(self, request_id: int, timeout: float) -> None:
        """The deadline thread: a call timed out."""
        pending = self.take(request_id)
        if pending is None:
            return
        # Still queued, untouched, for a peer that does not read: it is never sent.
        pending.link.drop(request_id)
        if pending.holds is not None:
            with self._lock:
                # The callee may not have read the request yet: the RRefs it carries stay
                # alive until its late reply comes (or the connection goes), see _rref.
                self._late_holds[request_id] = (pending.link, pending.holds)
        self._on_timeout(pending, timeout)

    # -- what the agent reports -----------------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            return len(self._pending)

    def issued(self) -> int:
        with self._lock:
            return self._issued

    def snapshot_locked(self) -> tuple[list[int], int, int]:
        """The peer rank of each call in flight, the late holds and the calls issued."""
        ranks = [pending.peer_rank for pending in self._pending.values()]
        return ranks, len(self._late_holds), self._issued

    def wait_idle(self, deadline: float | None) -> None:
        """Block until no call is pending (or ``deadline`` passes)."""
        while True:
            with self._lock:
                futures = [p.future for p in self._pending.values()]
            if not futures:
                return
            for future in futures:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    future.wait(left)
                except BaseException:
                    if not future.done():
                        raise  # our deadline passed
                    # else the call failed: that belongs to its caller; we only wait for its end

    def close(self) -> None:
        """No more deadlines (after ``take_all_locked``)."""
        self._deadlines.close()


def went_on(link: Link, conn: PeerConnection) -> bool:
    """Whether what was sent on ``link`` went on ``conn`` (directly, or once connected)."""
    return link is conn or (type(link) is Dialing and link.connection is conn)


def flow_id(caller_rank: int, request_id: int, reply: bool) -> int:
    """The id of a trace's arrow from a request to its handler (or from the reply back):
    even, and the same on both sides (fork arrows take the odd ids, see _tracing.trace_hooks)."""
    return (((caller_rank << 32) | request_id) << 2) | (2 if reply else 0)


def describe_call(fn: object, peer: str) -> str:
    """For error messages: "call of module.fn on worker1"."""
    return f"call of {_qualname(fn)} on {peer}"


def _qualname(fn: object) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else str(name)
