"""The async_execution patterns of the examples, without torch, and nested blocking calls.

One group of three workers, each with num_worker_threads=1: worker0 makes the calls, worker1
runs the async functions (which call worker2), and the nested handlers call back into worker0.
"""

from __future__ import annotations

import _remote_fns as fns
from _harness import Group

PATTERNS = (
    "async_add_chained",
    "static_async_add",
    "class_async_add",
    "bound_method_direct",
    "rref.rpc_sync()",
    "rref.rpc_async()",
    "rref.remote()",
    "bound method",
    "rref.remote() classmethod",
)


GROUP_SIZE = 3
GROUP_OPTIONS = {"num_worker_threads": 1}


def test_async_execution_patterns_with_plain_numbers(group: Group) -> None:
    out = group.call(0, fns.check_async_patterns, "float")
    assert set(out) == set(PATTERNS)
    assert out.pop("async_add_chained") == ("float", 3.0)
    for pattern, value in out.items():
        assert value == ("float", 4.0), pattern


def test_async_execution_patterns_with_numpy_arrays(group: Group) -> None:
    out = group.call(0, fns.check_async_patterns, "numpy")
    assert set(out) == set(PATTERNS)
    assert out.pop("async_add_chained") == ("ndarray", "float64", [3.0, 3.0])
    for pattern, value in out.items():
        assert value == ("ndarray", "float64", [4.0, 4.0]), pattern


def test_nested_blocking_calls_do_not_deadlock_with_one_thread(group: Group) -> None:
    """20 concurrent calls to worker1, whose handlers block on worker2 and on worker0 (whose
    only handler thread is then needed while its main thread waits); all complete."""
    count = 20
    results = group.call(0, fns.check_nested, count, timeout=60.0)
    assert results == [(i + 1000) + i * 2 for i in range(count)]


def test_a_handler_blocked_on_a_plain_event_does_not_stop_its_connection(group: Group) -> None:
    """worker1 may run a request in the thread that reads its connection; blocked there on
    a threading.Event, it must not keep the call that sets the Event from being read."""
    assert group.call(0, fns.check_plain_wait, "plain") == "plain"


def test_a_handler_polling_a_nested_call_gets_its_reply(group: Group) -> None:
    """A handler that waits for a nested call by polling done() (not Future.wait) gets the
    reply, even if it arrives on the connection the handler's own request came in on."""
    for _ in range(3):
        assert group.call(0, fns.call_with, "worker1", fns.poll_a_nested_call) == 5


def test_group_shuts_down_gracefully_after_all_checks(group: Group) -> None:
    """Last test of the module: every worker's graceful shutdown completes."""
    group.call_all(fns.shutdown_worker, True, 20.0)
    assert group.call_all(fns.thenable_threads_left) == [[], [], []]
    # Nothing in this module needs torch: the workers must not have imported it.
    assert group.call_all(fns.loaded_modules, "torch") == [[], [], []]
