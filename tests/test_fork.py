"""fork / wait and the interop pool: results, errors, parallelism, nesting, resizing, statistics.

Synchronisation is by events and barriers only.  Results are collected with ``result_of``, which
waits on a done-callback instead of ``Future.wait`` so that the waiting thread never runs a queued
task itself: a task it checks was run by the pool.  Every wait has a timeout, so a bug fails the
test fast instead of hanging it.
"""

from __future__ import annotations

import functools
import operator
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import thenable
from _fork_helpers import TIMEOUT, eventually, hold, result_of
from thenable import Future, InteropPool
from thenable._pool import default_pool

T = TypeVar("T")


class TaskError(Exception):
    """An error raised inside a forked task."""


class Abort(BaseException):
    """A BaseException (not an Exception) raised inside a forked task."""


# -- helpers ------------------------------------------------------------------------------------


def cross(barrier: threading.Barrier) -> str:
    """Pass ``barrier`` (which only succeeds if all its parties run at once); return the thread."""
    barrier.wait()
    return threading.current_thread().name


def current_thread_name() -> str:
    return threading.current_thread().name


def occupy_until(barrier: threading.Barrier, gate: threading.Event) -> str:
    """Keep a worker busy: meet the others at ``barrier``, then wait for ``gate``."""
    barrier.wait()
    if not gate.wait(TIMEOUT):
        raise TimeoutError("the test never opened the gate")
    return current_thread_name()


def fail_with(message: str) -> int:
    raise TaskError(message)


def abort() -> int:
    raise Abort("aborted")


def fib(n: int) -> int:
    if n < 2:
        return n
    return thenable.wait(thenable.fork(fib, n - 1)) + thenable.wait(thenable.fork(fib, n - 2))


def fib_noting_threads(n: int, threads: set[str]) -> int:
    threads.add(current_thread_name())
    if n < 2:
        return n
    first = thenable.wait(thenable.fork(fib_noting_threads, n - 1, threads))
    return first + thenable.wait(thenable.fork(fib_noting_threads, n - 2, threads))


def pool_threads(name: str) -> list[str]:
    """Names of the live worker threads of the private pool called ``name``."""
    pattern = re.compile(rf"^{re.escape(name)}-[0-9]+$")
    return sorted(t.name for t in threading.enumerate() if pattern.match(t.name))


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def leaves_nothing_behind() -> Iterator[None]:
    """After each test: no thread the test started is left running (pool workers aside), and the
    default pool is back to rest: nothing queued, nobody blocked, no surplus worker."""
    before = set(threading.enumerate())
    yield
    for thread in threading.enumerate():
        if thread not in before and not thread.name.startswith("thenable-"):
            thread.join(TIMEOUT)
            assert not thread.is_alive(), f"thread {thread.name} left running"
    pool = default_pool()

    def at_rest() -> bool:
        stats = pool.statistics()
        return stats["queued"] == 0 and stats["blocked"] == 0 and stats["workers"] <= stats["size"]

    eventually(at_rest, f"the default pool is at rest: {pool.statistics()}")


@pytest.fixture
def interop_threads() -> Iterator[Callable[[int], InteropPool]]:
    """Resize the default pool (restored afterwards); waits until surplus workers retired."""
    saved = thenable.get_num_interop_threads()

    def set_threads(n: int) -> InteropPool:
        thenable.set_num_interop_threads(n)
        pool = default_pool()
        eventually(
            lambda: pool.statistics()["workers"] <= n,
            f"surplus workers retire after resizing to {n}: {pool.statistics()}",
        )
        return pool

    yield set_threads
    thenable.set_num_interop_threads(saved)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event that holds tasks; always opened at teardown, so a failing test frees its workers."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def make_pool(gate: threading.Event) -> Iterator[Callable[[int, str], InteropPool]]:
    """Private pools, shut down afterwards: every one of their threads must then end."""
    made: list[tuple[InteropPool, str]] = []

    def make(num_threads: int, name: str) -> InteropPool:
        pool = InteropPool(num_threads, name=name)
        made.append((pool, name))
        return pool

    yield make
    gate.set()
    for pool, _ in made:
        pool.shutdown(wait=False)
    for _, name in made:
        for thread in threading.enumerate():
            if thread.name in pool_threads(name):
                thread.join(TIMEOUT)
        assert pool_threads(name) == [], f"threads of {name} left running after shutdown"


# -- fork returns a Future; wait returns its result -----------------------------------------------


def test_fork_returns_a_pending_future_at_once(gate: threading.Event) -> None:
    started = threading.Event()
    fut = thenable.fork(hold, started, gate)
    # fork returned while the task is still blocked on the gate: it did not run it to the end.
    assert isinstance(fut, Future)
    assert not fut.done()
    assert started.wait(TIMEOUT)
    assert not fut.done()
    gate.set()
    name = thenable.wait(fut)
    assert name.startswith("thenable-interop-")
    assert fut.done()


def test_wait_returns_the_result() -> None:
    assert thenable.wait(thenable.fork(operator.add, 2, 3)) == 5
    assert result_of(thenable.fork(operator.add, "a", "b")) == "ab"


def test_fork_passes_positional_and_keyword_arguments() -> None:
    def call(a: int, b: int, /, c: int, *rest: int, d: int, **extra: int) -> tuple[Any, ...]:
        return a, b, c, rest, d, extra

    fut = thenable.fork(call, 1, 2, 3, 4, 5, d=6, e=7)
    assert result_of(fut) == (1, 2, 3, (4, 5), 6, {"e": 7})


def test_fork_passes_keywords_named_like_its_own_parameters() -> None:
    def call(**kwargs: int) -> dict[str, int]:
        return kwargs

    fut = thenable.fork(call, func=1, fn=2, self=3, args=4, kwargs=5)
    assert result_of(fut) == {"func": 1, "fn": 2, "self": 3, "args": 4, "kwargs": 5}


def test_fork_runs_callable_objects() -> None:
    class Scale:
        def __init__(self, factor: int) -> None:
            self.factor = factor

        def __call__(self, x: int, *, offset: int = 0) -> int:
            return self.factor * x + offset

    assert result_of(thenable.fork(Scale(3), 4)) == 12
    assert thenable.wait(thenable.fork(Scale(3), 4, offset=1)) == 13


def test_fork_runs_a_torch_module() -> None:
    pytest.importorskip("torch")
    import torch

    class Add(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    module = Add()
    x = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([10.0, 20.0, 30.0])
    out = result_of(thenable.fork(module, x, y))
    assert torch.equal(out, torch.tensor([11.0, 22.0, 33.0]))
    out = thenable.wait(thenable.fork(module, x, y=y))
    assert torch.equal(out, torch.tensor([11.0, 22.0, 33.0]))


# -- errors -------------------------------------------------------------------------------------


def test_exception_goes_into_the_future_not_out_of_fork() -> None:
    fut = thenable.fork(fail_with, "boom")  # must not raise
    with pytest.raises(TaskError, match=r"^boom$") as first:
        result_of(fut)
    assert fut.done()
    with pytest.raises(TaskError, match=r"^boom$") as second:
        thenable.wait(fut)
    assert second.value is first.value


def test_base_exception_goes_into_the_future_and_the_worker_survives(
    make_pool: Callable[[int, str], InteropPool],
) -> None:
    pool = make_pool(1, "thenable-test-abort")
    fut = pool.submit(abort)
    with pytest.raises(Abort, match=r"^aborted$"):
        result_of(fut)
    # The one worker is still alive and runs the next task.
    assert result_of(pool.submit(current_thread_name)) == "thenable-test-abort-1"
    assert pool.statistics()["workers"] == 1


def test_wait_takes_a_torch_future() -> None:
    torch = pytest.importorskip("torch")
    done = torch.futures.Future()
    done.set_result(3)
    assert thenable.wait(done) == 3


def test_wait_rejects_a_non_future() -> None:
    with pytest.raises(
        TypeError, match=r"^wait\(\) takes the Future returned by fork\(\), got builtins\.int$"
    ):
        thenable.wait(42)  # type: ignore[arg-type]
    import concurrent.futures

    with pytest.raises(
        TypeError, match=r"^wait\(\) takes .*, got concurrent\.futures\._base\.Future$"
    ):
        thenable.wait(concurrent.futures.Future())  # type: ignore[arg-type]


def test_wait_of_none_is_a_runtime_error_as_in_torch() -> None:
    """torch.jit.wait(None) raises RuntimeError ("Future can't be None")."""
    with pytest.raises(RuntimeError, match=r"takes the Future returned by fork\(\), got None$"):
        thenable.wait(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "type_name"), [(42, "int"), (None, "NoneType"), ("f", "str")])
def test_fork_rejects_a_non_callable(value: object, type_name: str) -> None:
    with pytest.raises(
        TypeError, match=f"^{re.escape(f'fork() needs a callable to run, got {type_name}')}$"
    ):
        thenable.fork(value)  # type: ignore[arg-type]


# -- parallelism --------------------------------------------------------------------------------


def test_forks_run_in_parallel(interop_threads: Callable[[int], InteropPool]) -> None:
    interop_threads(2)
    # Each task waits at a 2-party barrier: both finish only if they run at the same time.
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    futures = [thenable.fork(cross, barrier) for _ in range(2)]
    names = [result_of(fut) for fut in futures]
    assert len(set(names)) == 2
    assert all(name.startswith("thenable-interop-") for name in names)


def test_numpy_in_forks_gives_correct_results() -> None:
    pytest.importorskip("numpy")
    import numpy as np

    a = np.arange(240 * 160, dtype=np.int64).reshape(240, 160) % 97
    b = np.arange(160 * 80, dtype=np.int64).reshape(160, 80) % 89
    futures = [thenable.fork(np.matmul, a[i : i + 60], b) for i in range(0, 240, 60)]
    np.testing.assert_array_equal(np.concatenate([thenable.wait(f) for f in futures]), a @ b)
    sums = [thenable.fork(np.sum, row) for row in a]
    assert [int(result_of(f)) for f in sums] == [int(row.sum()) for row in a]


# -- nesting and blocking ------------------------------------------------------------------------


def test_nested_fork_does_not_deadlock_with_one_thread(
    interop_threads: Callable[[int], InteropPool],
) -> None:
    interop_threads(1)

    def parent() -> tuple[int, str, str]:
        child = thenable.fork(current_thread_name)
        child_name = thenable.wait(child)
        return thenable.wait(thenable.fork(operator.mul, 21, 2)), current_thread_name(), child_name

    value, parent_name, child_name = result_of(thenable.fork(parent))
    assert value == 42
    assert parent_name.startswith("thenable-interop-")
    assert child_name == parent_name  # the only worker ran its queued child itself


def test_recursive_fib_by_forks_with_one_thread(
    interop_threads: Callable[[int], InteropPool],
) -> None:
    pool = interop_threads(1)
    assert result_of(thenable.fork(fib, 20), timeout=60) == 6765
    # Every child was run inline by its waiter: no wait ever blocked, so no worker was added.
    threads: set[str] = set()
    assert result_of(thenable.fork(fib_noting_threads, 12, threads), timeout=60) == 144
    assert len(threads) == 1
    assert next(iter(threads)).startswith("thenable-interop-")
    stats = pool.statistics()
    assert stats["blocked"] == 0
    assert stats["workers"] == 1
    assert thenable.wait(thenable.fork(fib, 15)) == 610  # also from the main thread


def test_worker_blocked_on_a_plain_future_gets_a_replacement(
    interop_threads: Callable[[int], InteropPool],
) -> None:
    interop_threads(1)
    signal: Future[int] = Future()
    a = thenable.fork(signal.wait, TIMEOUT)  # blocks the only worker until b runs
    b = thenable.fork(signal.set_result, 7)  # queued behind a
    assert result_of(a) == 7
    assert result_of(b) is None


def test_statistics_while_a_worker_is_blocked(make_pool: Callable[[int, str], InteropPool]) -> None:
    pool = make_pool(1, "thenable-test-blocked")
    signal: Future[str] = Future()

    def waiter() -> tuple[str, str]:
        return signal.wait(TIMEOUT), current_thread_name()

    def setter() -> tuple[dict[str, int], str]:
        stats = pool.statistics()  # taken while the waiter is still blocked
        signal.set_result("go")
        return stats, current_thread_name()

    a = pool.submit(waiter)
    b = pool.submit(setter)
    stats, b_name = result_of(b)
    assert stats == {"size": 1, "workers": 2, "blocked": 1, "idle": 0, "queued": 0}
    assert result_of(a) == ("go", "thenable-test-blocked-1")
    assert b_name == "thenable-test-blocked-2"
    # The replacement was surplus once the waiter woke: one of the two retires.
    eventually(lambda: pool.statistics()["workers"] == 1, f"one worker left: {pool.statistics()}")
    eventually(
        lambda: len(pool_threads("thenable-test-blocked")) == 1,
        f"one thread left: {pool_threads('thenable-test-blocked')}",
    )
    assert pool.statistics()["blocked"] == 0


def test_blocked_count_is_restored_after_a_wait_times_out(
    make_pool: Callable[[int, str], InteropPool],
) -> None:
    pool = make_pool(1, "thenable-test-timeout-count")

    def time_out() -> dict[str, int]:
        never: Future[int] = Future()
        with pytest.raises(TimeoutError, match=r"^Future did not complete within 0.01 seconds"):
            never.wait(timeout=0.01)  # the workload: a wait that runs out
        return pool.statistics()

    stats = result_of(pool.submit(time_out))
    assert stats["blocked"] == 0
    assert stats["workers"] == 1


# -- the waiter runs a not-yet-started task itself ----------------------------------------------


def test_waiting_from_the_main_thread_runs_a_queued_task_inline(
    interop_threads: Callable[[int], InteropPool], gate: threading.Event
) -> None:
    pool = interop_threads(1)
    started = threading.Event()
    blocker = thenable.fork(hold, started, gate)
    assert started.wait(TIMEOUT)  # the only worker is now busy until the gate opens
    queued = thenable.fork(threading.current_thread)
    assert pool.statistics()["queued"] == 1
    assert thenable.wait(queued) is threading.main_thread()
    assert not blocker.done()
    gate.set()
    assert result_of(blocker).startswith("thenable-interop-")


def test_waiting_on_a_private_pool_task_runs_it_inline(
    gate: threading.Event, make_pool: Callable[[int, str], InteropPool]
) -> None:
    pool = make_pool(1, "thenable-test-inline")
    started = threading.Event()
    blocker = pool.submit(hold, started, gate)
    assert started.wait(TIMEOUT)
    queued = pool.submit(threading.current_thread)
    assert queued.wait() is threading.current_thread()
    gate.set()
    assert result_of(blocker) == "thenable-test-inline-1"


def test_wait_with_a_timeout_does_not_run_a_queued_task_past_the_timeout(
    gate: threading.Event, make_pool: Callable[[int, str], InteropPool]
) -> None:
    """``Future.wait(timeout)`` waits "at most" ``timeout`` seconds: it must not run a queued
    task inline for longer than that."""
    pool = make_pool(1, "thenable-test-wait-timeout")
    started = threading.Event()
    blocker = pool.submit(hold, started, gate)
    assert started.wait(TIMEOUT)
    release = threading.Event()
    queued = pool.submit(release.wait, TIMEOUT)  # returns True once released
    try:
        with pytest.raises(TimeoutError, match=r"^Future did not complete within 0\.05 seconds"):
            queued.wait(timeout=0.05)
    finally:
        release.set()
        gate.set()
    assert result_of(queued) is True
    assert result_of(blocker) == "thenable-test-wait-timeout-1"


# -- resizing -----------------------------------------------------------------------------------


def test_set_num_interop_threads_grows_the_pool(
    interop_threads: Callable[[int], InteropPool],
) -> None:
    interop_threads(1)
    thenable.set_num_interop_threads(4)
    assert thenable.get_num_interop_threads() == 4
    barrier = threading.Barrier(4, timeout=TIMEOUT)  # needs 4 tasks running at once
    futures = [thenable.fork(cross, barrier) for _ in range(4)]
    assert len({result_of(f) for f in futures}) == 4


def test_growing_starts_workers_for_tasks_already_queued(
    interop_threads: Callable[[int], InteropPool], gate: threading.Event
) -> None:
    pool = interop_threads(1)
    started = threading.Event()
    blocker = thenable.fork(hold, started, gate)
    assert started.wait(TIMEOUT)
    barrier = threading.Barrier(4, timeout=TIMEOUT)  # 3 queued tasks and this thread
    queued = [thenable.fork(cross, barrier) for _ in range(3)]
    assert pool.statistics()["queued"] == 3
    thenable.set_num_interop_threads(4)
    barrier.wait()  # only passes if growing started workers for the queued tasks
    assert len({result_of(f) for f in queued}) == 3
    gate.set()
    result_of(blocker)


def test_shrinking_retires_surplus_workers(
    gate: threading.Event, make_pool: Callable[[int, str], InteropPool]
) -> None:
    name = "thenable-test-shrink"
    pool = make_pool(3, name)
    barrier = threading.Barrier(4, timeout=TIMEOUT)

    occupy = functools.partial(occupy_until, barrier, gate)

    busy = [pool.submit(occupy) for _ in range(3)]
    barrier.wait()  # three workers are running at once
    assert pool_threads(name) == [f"{name}-1", f"{name}-2", f"{name}-3"]
    pool.resize(1)
    assert pool.size == 1
    assert pool.statistics()["size"] == 1
    gate.set()
    assert sorted(result_of(f) for f in busy) == [f"{name}-1", f"{name}-2", f"{name}-3"]
    eventually(lambda: pool.statistics()["workers"] == 1, f"one worker: {pool.statistics()}")
    eventually(lambda: len(pool_threads(name)) == 1, f"one thread: {pool_threads(name)}")
    # The pool still works at its new size.
    assert [result_of(pool.submit(operator.neg, i)) for i in range(5)] == [0, -1, -2, -3, -4]
    assert len(pool_threads(name)) == 1


def test_tasks_queued_before_a_shrink_still_run(
    interop_threads: Callable[[int], InteropPool], gate: threading.Event
) -> None:
    pool = interop_threads(2)
    barrier = threading.Barrier(3, timeout=TIMEOUT)

    occupy = functools.partial(occupy_until, barrier, gate)

    busy = [thenable.fork(occupy) for _ in range(2)]
    barrier.wait()  # both workers busy
    queued = [thenable.fork(operator.mul, i, 10) for i in range(5)]
    assert pool.statistics()["queued"] == 5
    thenable.set_num_interop_threads(1)
    assert thenable.get_num_interop_threads() == 1
    gate.set()
    assert [result_of(f) for f in queued] == [0, 10, 20, 30, 40]
    assert len({result_of(f) for f in busy}) == 2
    eventually(lambda: pool.statistics()["workers"] == 1, f"one worker: {pool.statistics()}")


def test_get_num_interop_threads_reports_the_value(
    interop_threads: Callable[[int], InteropPool],
) -> None:
    for n in (3, 1, 5, 2):
        thenable.set_num_interop_threads(n)
        assert thenable.get_num_interop_threads() == n
        assert default_pool().size == n


NOT_INT = "the number of interop threads must be an int, got "
NOT_POSITIVE = "the number of interop threads must be >= 1, got "
BAD_THREAD_COUNTS = [
    pytest.param(0, ValueError, NOT_POSITIVE + "0", id="0"),
    pytest.param(-1, ValueError, NOT_POSITIVE + "-1", id="-1"),
    pytest.param(1.5, TypeError, NOT_INT + "float", id="1.5"),
    pytest.param(True, TypeError, NOT_INT + "bool", id="True"),
    pytest.param("2", TypeError, NOT_INT + "str", id="str"),
    pytest.param(None, TypeError, NOT_INT + "NoneType", id="None"),
]


@pytest.mark.parametrize(("value", "error", "message"), BAD_THREAD_COUNTS)
def test_set_num_interop_threads_rejects_bad_values(
    interop_threads: Callable[[int], InteropPool],
    value: object,
    error: type[Exception],
    message: str,
) -> None:
    before = thenable.get_num_interop_threads()
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        thenable.set_num_interop_threads(value)  # type: ignore[arg-type]
    assert thenable.get_num_interop_threads() == before


@pytest.mark.parametrize(("value", "error", "message"), BAD_THREAD_COUNTS)
def test_private_pool_rejects_bad_sizes(
    value: object,
    error: type[Exception],
    message: str,
    make_pool: Callable[[int, str], InteropPool],
) -> None:
    if value is not None:  # None means "the default" to the constructor
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            InteropPool(value)  # type: ignore[arg-type]
    pool = make_pool(2, "thenable-test-bad-resize")
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        pool.resize(value)  # type: ignore[arg-type]
    assert pool.size == 2


def test_shutdown_finishes_queued_tasks_and_refuses_new_ones(
    make_pool: Callable[[int, str], InteropPool], gate: threading.Event
) -> None:
    name = "thenable-test-shutdown"
    pool = make_pool(1, name)
    started = threading.Event()
    busy = pool.submit(hold, started, gate)
    assert started.wait(TIMEOUT)
    queued = [pool.submit(operator.mul, i, 2) for i in range(3)]
    pool.shutdown(wait=False)  # returns at once, with the worker still busy
    assert not busy.done()
    refused = pool.submit(operator.mul, 1, 2)
    assert refused.done()
    with pytest.raises(
        RuntimeError, match=f"^{re.escape(f'cannot run new tasks: the pool {name} is shut down')}$"
    ):
        refused.wait()
    gate.set()
    assert result_of(busy) == f"{name}-1"
    assert [result_of(f) for f in queued] == [0, 2, 4]
    for thread in threading.enumerate():
        if thread.name in pool_threads(name):
            thread.join(TIMEOUT)
    assert pool_threads(name) == []
    assert pool.statistics()["workers"] == 0


def test_shutdown_with_wait_returns_once_every_task_is_done(
    make_pool: Callable[[int, str], InteropPool],
) -> None:
    name = "thenable-test-shutdown-wait"
    pool = make_pool(2, name)
    futures = [pool.submit(operator.add, i, 1) for i in range(50)]
    pool.shutdown(wait=True)
    # No waiting here: shutdown(wait=True) returned only after all tasks and workers finished.
    assert all(f.done() for f in futures)
    assert [f.value() for f in futures] == list(range(1, 51))
    assert pool_threads(name) == []
    assert pool.statistics() == {"size": 2, "workers": 0, "blocked": 0, "idle": 0, "queued": 0}


# -- statistics and names -----------------------------------------------------------------------


def test_statistics_and_thread_names_of_a_private_pool(
    gate: threading.Event, make_pool: Callable[[int, str], InteropPool]
) -> None:
    name = "thenable-test-stats"
    pool = make_pool(2, name)
    executor: thenable.TaskExecutor = pool  # the pool implements the executor interface
    assert pool.size == 2
    assert pool.statistics() == {"size": 2, "workers": 0, "blocked": 0, "idle": 0, "queued": 0}
    assert pool_threads(name) == []  # threads start with the work

    barrier = threading.Barrier(3, timeout=TIMEOUT)

    occupy = functools.partial(occupy_until, barrier, gate)

    busy = [executor.submit(occupy) for _ in range(2)]
    barrier.wait()
    queued = executor.submit(current_thread_name)
    assert pool.statistics() == {"size": 2, "workers": 2, "blocked": 0, "idle": 0, "queued": 1}
    assert pool_threads(name) == [f"{name}-1", f"{name}-2"]
    gate.set()
    names = {result_of(f) for f in busy}
    assert names == {f"{name}-1", f"{name}-2"}
    assert result_of(queued) in names
    eventually(
        lambda: (
            pool.statistics() == {"size": 2, "workers": 2, "blocked": 0, "idle": 2, "queued": 0}
        ),
        f"both workers parked: {pool.statistics()}",
    )


def test_default_pool_threads_are_named_thenable_interop() -> None:
    assert result_of(thenable.fork(current_thread_name)).startswith("thenable-interop-")


# -- many tasks ---------------------------------------------------------------------------------


def test_ten_thousand_forks_all_complete() -> None:
    n = 10_000
    futures = [thenable.fork(operator.mul, i, 3) for i in range(n)]
    assert [thenable.wait(f) for f in futures] == [3 * i for i in range(n)]


def test_ten_thousand_submits_all_run_on_the_pool(
    make_pool: Callable[[int, str], InteropPool],
) -> None:
    n = 10_000
    pool = make_pool(4, "thenable-test-many")
    left = [n]
    lock = threading.Lock()
    all_done = threading.Event()

    def count(_: Future[int]) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                all_done.set()

    futures = []
    for i in range(n):
        fut = pool.submit(operator.mul, i, 3)
        fut.add_done_callback(count)
        futures.append(fut)
    assert all_done.wait(60), f"{left[0]} of {n} tasks never ran: {pool.statistics()}"
    assert [f.value() for f in futures] == [3 * i for i in range(n)]
    eventually(lambda: pool.statistics()["queued"] == 0, f"queue drained: {pool.statistics()}")


# -- then on forked futures ---------------------------------------------------------------------


def test_then_callback_on_a_forked_future_runs_in_the_worker(gate: threading.Event) -> None:
    started = threading.Event()
    fut = thenable.fork(hold, started, gate)
    assert started.wait(TIMEOUT)
    ran_in: list[str] = []

    def describe(f: Future[str]) -> str:
        ran_in.append(current_thread_name())
        return "ran by " + f.wait()

    child = fut.then(describe)
    gate.set()
    worker = result_of(fut)
    assert result_of(child) == "ran by " + worker
    assert ran_in == [worker]  # the thread that completed the future ran the callback


def test_then_callback_on_a_done_forked_future_runs_inline() -> None:
    fut = thenable.fork(operator.add, 1, 1)
    assert result_of(fut) == 2
    ran_in: list[threading.Thread] = []

    def plus_one(f: Future[int]) -> int:
        ran_in.append(threading.current_thread())
        return f.value() + 1

    child = fut.then(plus_one)
    assert child.done()
    assert child.wait() == 3
    assert ran_in == [threading.current_thread()]


def test_fork_exception_propagates_through_then_children() -> None:
    fut = thenable.fork(fail_with, "bad input")
    child = fut.then(lambda f: f.wait())
    grandchild = child.then(lambda f: f.value() * 2)
    with pytest.raises(TaskError, match=r"^bad input$") as original:
        result_of(fut)
    with pytest.raises(TaskError, match=r"^bad input$") as via_child:
        result_of(child)
    with pytest.raises(TaskError, match=r"^bad input$") as via_grandchild:
        result_of(grandchild)
    # The first then() makes one copy that is also a RuntimeError (as torch's is); the
    # grandchild passes that same copy on.
    assert via_child.value is not original.value
    assert isinstance(via_child.value, RuntimeError)
    assert not isinstance(original.value, RuntimeError)
    assert via_grandchild.value is via_child.value


# -- interpreter exit ---------------------------------------------------------------------------


def test_running_and_queued_tasks_finish_at_interpreter_exit() -> None:
    script = textwrap.dedent(
        """
        import threading
        import thenable

        thenable.set_num_interop_threads(1)

        def first():
            threading.Event().wait(0.3)  # the workload: still running when the main thread exits
            print("first", flush=True)

        thenable.fork(first)
        for i in range(5):
            thenable.fork(print, i, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert sorted(done.stdout.split()) == ["0", "1", "2", "3", "4", "first"]
