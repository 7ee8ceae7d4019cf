"""An agent's table of calls in flight, on its own with fake links: each call is taken out once
(by its reply, its timeout, the loss of its connection, or shutdown); a timed-out call is taken
back from a link that still queues it, and its RRefs stay held until the late reply."""

from __future__ import annotations

import queue
import threading
from typing import Any

from thenable import Future
from thenable.rpc._worker.calls import Calls, Pending, describe_call

WAIT_S = 10.0


class FakeLink:
    """A link that sends nothing and notes what was taken back."""

    closed = False

    def __init__(self) -> None:
        self.dropped: list[int] = []

    def send(self, *args: Any, **kwargs: Any) -> None:
        pass

    def drop(self, request_id: int) -> bool:
        self.dropped.append(request_id)
        return True


def _table() -> tuple[Calls, threading.Lock, queue.SimpleQueue[tuple[Pending, float]]]:
    lock = threading.Lock()
    timed_out: queue.SimpleQueue[tuple[Pending, float]] = queue.SimpleQueue()
    calls = Calls(lock, "test-calls-timer", lambda p, timeout: timed_out.put((p, timeout)))
    return calls, lock, timed_out


def _pending(link: FakeLink, timeout: float = 0.0, holds: list[Any] | None = None) -> Pending:
    return Pending(Future(), 1, link, print, True, timeout, holds)


def test_a_reply_takes_its_call_once_and_its_deadline_with_it() -> None:
    calls, _, timed_out = _table()
    try:
        link = FakeLink()
        rid = calls.new_id()
        call = _pending(link, timeout=0.05)
        calls.add(rid, call)
        assert (calls.count(), calls.issued()) == (1, 1)
        assert calls.take_answered(rid) is call
        assert calls.take_answered(rid) is None  # (a second reply finds nothing)
        other, later = calls.new_id(), _pending(link, timeout=0.05)
        calls.add(other, later)
        assert timed_out.get(timeout=WAIT_S) == (later, 0.05)  # (the answered one never does)
        assert link.dropped == [other]  # taken back from the link that still queued it
        assert timed_out.empty() and calls.count() == 0
    finally:
        calls.close()


def test_a_timed_out_call_with_rrefs_holds_them_until_its_late_reply() -> None:
    calls, lock, timed_out = _table()
    try:
        rref = object()
        rid = calls.new_id()
        calls.add(rid, _pending(FakeLink(), timeout=0.01, holds=[rref]))
        pending, timeout = timed_out.get(timeout=WAIT_S)
        assert timeout == 0.01 and pending.holds == [rref]
        with lock:
            assert calls.snapshot_locked() == ([], 1, 1)  # held, no longer in flight
        assert calls.take_answered(rid) is None  # the late reply: dropped, the hold ends
        with lock:
            assert calls.snapshot_locked()[1] == 0
    finally:
        calls.close()


def test_a_lost_connection_takes_exactly_the_calls_sent_on_it() -> None:
    calls, lock, _ = _table()
    lost, kept = FakeLink(), FakeLink()
    on_lost, on_kept = _pending(lost), _pending(kept)
    calls.add(calls.new_id(), on_lost)
    calls.add(calls.new_id(), on_kept)
    with lock:
        assert calls.take_went_on_locked(lost) == [on_lost]  # type: ignore[arg-type]
        assert calls.take_all_locked() == [on_kept]
    assert calls.count() == 0
    calls.close()


def test_wait_idle_returns_once_every_call_has_ended() -> None:
    calls, _, _ = _table()
    rid = calls.new_id()
    call = _pending(FakeLink())
    calls.add(rid, call)
    assert calls.take(rid) is call
    call.future.set_result(None)
    calls.wait_idle(WAIT_S)  # (returns: nothing pending)
    calls.close()


def test_a_call_is_described_by_its_function_and_peer() -> None:
    assert describe_call(print, "worker1") == "call of builtins.print on worker1"
