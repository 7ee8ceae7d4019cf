"""The agent's call deadlines, on their own: each call fails once at its timeout, in order,
unless its reply cancelled it; a failing expiry does not stop the others; close ends it all."""

from __future__ import annotations

import logging
import queue
import threading

import pytest

from thenable.rpc._worker.deadlines import Deadlines

WAIT_S = 10.0  # bound on any wait for an expiry that must come


def _recording() -> tuple[Deadlines, queue.SimpleQueue[tuple[int, float]]]:
    expired: queue.SimpleQueue[tuple[int, float]] = queue.SimpleQueue()
    return Deadlines("test-timer", lambda rid, timeout: expired.put((rid, timeout))), expired


def test_a_call_expires_once_with_its_timeout_and_a_cancelled_one_never() -> None:
    deadlines, expired = _recording()
    try:
        deadlines.add(1, 0.02)
        deadlines.add(2, 0.02)
        deadlines.cancel(1, 0.02)
        assert expired.get(timeout=WAIT_S) == (2, 0.02)  # (1 would have come first)
        deadlines.add(3, 0.02)
        assert expired.get(timeout=WAIT_S) == (3, 0.02)
        assert expired.empty()
    finally:
        deadlines.close()


def test_a_shorter_timeout_added_later_expires_first() -> None:
    deadlines, expired = _recording()
    try:
        deadlines.add(1, 0.4)
        deadlines.add(2, 0.01)
        assert expired.get(timeout=WAIT_S) == (2, 0.01)
        assert expired.get(timeout=WAIT_S) == (1, 0.4)
    finally:
        deadlines.close()


def test_an_expiry_that_raises_is_logged_and_the_others_still_come(
    caplog: pytest.LogCaptureFixture,
) -> None:
    came: queue.SimpleQueue[int] = queue.SimpleQueue()

    def expire(request_id: int, timeout: float) -> None:
        came.put(request_id)
        if request_id == 1:
            raise RuntimeError("expiry failed")

    deadlines = Deadlines("test-timer", expire)
    try:
        with caplog.at_level(logging.ERROR, logger="thenable.rpc"):
            deadlines.add(1, 0.01)
            deadlines.add(2, 0.02)
            assert [came.get(timeout=WAIT_S), came.get(timeout=WAIT_S)] == [1, 2]
        assert "failing RPC request 1 at its timeout failed" in caplog.text
    finally:
        deadlines.close()


def test_close_drops_every_deadline_and_ends_the_thread() -> None:
    deadlines, expired = _recording()
    deadlines.add(1, 0.05)
    deadlines.close()  # (joins the thread)
    deadlines.add(2, 0.01)  # ignored: closed, and no thread starts for it
    assert not [t for t in threading.enumerate() if t.name == "test-timer"]
    assert expired.empty()  # no thread is left that could expire either
