"""Helpers of the fork tests (test_fork.py, test_fork_state.py): waiting without sleeps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from thenable import Future

T = TypeVar("T")

TIMEOUT = 10.0  # seconds: long enough never to fire on a working library, short enough to fail


def result_of(fut: Future[T], timeout: float = TIMEOUT) -> T:
    """The outcome of ``fut``, waited for without ever running its task in this thread."""
    done = threading.Event()
    fut.add_done_callback(lambda _: done.set())
    if not done.wait(timeout):
        pytest.fail(f"{fut!r} did not complete within {timeout} s")
    return fut.value()


def eventually(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Wait until ``predicate()`` holds, for state that has no event to wait on (a worker thread
    retiring after its last task).  The outcome does not depend on timing; only a bug makes the
    deadline pass."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout} s: {what}")
        tick.wait(0.001)


def hold(started: threading.Event, gate: threading.Event) -> str:
    """Occupy a worker: signal ``started``, then block (not in Future.wait) until ``gate``."""
    started.set()
    if not gate.wait(TIMEOUT):
        raise TimeoutError("the test never opened the gate")
    return threading.current_thread().name
