"""shutdown(): graceful waiting, calls afterwards, a second session, no threads left.

The tests share one group of two workers and run in order: the first shuts RPC down, the
second checks the aftermath, the third starts and ends a second session.
"""

from __future__ import annotations

from collections.abc import Iterator

import _remote_fns as fns
import pytest
from _harness import Failure, Group, free_port

CALLS = 8


@pytest.fixture(scope="module")
def group() -> Iterator[Group]:
    with Group(2) as group:
        group.init_all(fns.init_worker, rpc_timeout=30.0)
        yield group
        group.call_all(fns.shutdown_if_running)


def test_graceful_shutdown_waits_for_outstanding_calls(group: Group) -> None:
    """worker0 fires calls that block on worker1 until worker1 itself opens their gate (once
    it has seen worker0 shutting down), and calls shutdown() at once: every call completes."""
    caller = group.submit(0, fns.fire_and_shutdown, CALLS)
    callee = group.submit(1, fns.shutdown_worker)
    out = group.result(caller)
    group.result(callee)
    assert out["pending_at_shutdown"] == CALLS
    *values, opener = out["outcomes"]
    assert values == [i * 10 for i in range(CALLS)]
    assert opener == "shutting down"  # the gate opened only after worker0's shutdown began


def test_calls_after_shutdown_raise_and_threads_stop(group: Group) -> None:
    for rank, out in enumerate(group.call_all(fns.calls_after_shutdown)):
        for label, failure in out.items():
            assert isinstance(failure, Failure), (rank, label, failure)
            assert failure.type_name == "builtins.RuntimeError", (rank, label, failure.traceback)
            if label.startswith("old_rref"):  # an RRef made before the shutdown
                assert "RPC is shut down" in failure.message, (rank, label, failure.message)
            else:
                assert "init_rpc" in failure.message, (rank, label, failure.message)
        assert ("old_rref.to_here" in out) == (rank == 0)
    assert group.call_all(fns.thenable_threads_left) == [[], []]


def test_init_rpc_again_starts_a_second_session(group: Group) -> None:
    group.init_all(fns.init_worker, port=free_port(), rpc_timeout=30.0)
    assert group.call(0, fns.roundtrip, "worker1", 41) == 42
    assert group.call(1, fns.roundtrip, "worker0", 1) == 2
    assert group.call(0, fns.make_and_drop_rref, "worker1") == 1
    group.call_all(fns.shutdown_worker)
    assert group.call_all(fns.thenable_threads_left) == [[], []]
