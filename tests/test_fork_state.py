"""fork runs its task under the forking thread's state: contextvars, and torch's thread-local state.

``torch.jit.fork`` runs a task under the caller's ``at::ThreadLocalState``.  thenable's fork
carries its grad mode, inference mode, autocast, ``__torch_function__`` modes and profiler, and
the caller's ``contextvars`` context, to whichever thread runs the task: a pool worker, or a
waiter that runs it inline.

Synchronisation is by events only.  ``result_of`` waits on a done-callback, so the waiting
thread never runs the task itself: a task it checks ran on a worker.  A test that wants the task
run inline holds the one worker of the pool on a gate, so that ``thenable.wait`` must run it.
The contextvars tests never import torch; the torch tests skip without it.
"""

from __future__ import annotations

import contextvars
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import thenable
from _fork_helpers import TIMEOUT, eventually, hold, result_of
from thenable import Future, InteropPool
from thenable._pool import default_pool

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


# -- helpers ------------------------------------------------------------------------------------


def thread_name() -> str:
    return threading.current_thread().name


def on_a_worker(name: str) -> bool:
    return name.startswith("thenable-interop-")


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def pool_at_rest() -> Iterator[None]:
    """After each test the default pool is at rest: nothing queued, nobody blocked."""
    yield
    pool = default_pool()

    def at_rest() -> bool:
        stats = pool.statistics()
        return stats["queued"] == 0 and stats["blocked"] == 0 and stats["workers"] <= stats["size"]

    eventually(at_rest, f"the default pool is at rest: {pool.statistics()}")


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event that holds tasks; always opened at teardown, so a failing test frees its worker."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def one_worker(gate: threading.Event) -> Iterator[Callable[[], None]]:
    """The default pool with one interop thread (restored afterwards); calling the fixture's
    value occupies that thread on ``gate``, so that a ``wait`` runs the next task inline."""
    saved = thenable.get_num_interop_threads()
    thenable.set_num_interop_threads(1)
    pool = default_pool()
    eventually(lambda: pool.statistics()["workers"] <= 1, f"one worker left: {pool.statistics()}")
    held: list[Future[str]] = []

    def occupy() -> None:
        started = threading.Event()
        held.append(thenable.fork(hold, started, gate))
        assert started.wait(TIMEOUT)

    yield occupy
    gate.set()
    for fut in held:
        result_of(fut)
    thenable.set_num_interop_threads(saved)


@pytest.fixture
def torch() -> Any:
    """torch, or the test is skipped."""
    return pytest.importorskip("torch")


# -- contextvars (no torch) ---------------------------------------------------------------------


def test_a_task_sees_the_forkers_context_variables() -> None:
    token = VAR.set("forker")
    try:
        assert result_of(thenable.fork(VAR.get)) == "forker"
        assert thenable.wait(thenable.fork(VAR.get)) == "forker"
    finally:
        VAR.reset(token)
    assert result_of(thenable.fork(VAR.get)) == "unset"


def set_var(value: str) -> tuple[str, str]:
    """Set VAR; return what it was and the thread."""
    before = VAR.get()
    VAR.set(value)
    return before, thread_name()


def test_a_variable_a_task_sets_stays_in_the_task(one_worker: Callable[[], None]) -> None:
    token = VAR.set("forker")
    try:
        # On the worker: the next task on the same thread does not see it.
        before, worker = result_of(thenable.fork(set_var, "task 1"))
        assert (before, on_a_worker(worker)) == ("forker", True)
        assert result_of(thenable.fork(set_var, "task 2")) == ("forker", worker)
        # Inline, in this thread: the caller does not see it.
        one_worker()
        assert thenable.wait(thenable.fork(set_var, "task 3")) == ("forker", thread_name())
        assert VAR.get() == "forker"
    finally:
        VAR.reset(token)


def test_submit_runs_in_the_submitters_context_too() -> None:
    pool = InteropPool(1, name="test-fork-state")
    try:
        token = VAR.set("submitter")
        try:
            assert result_of(pool.submit(VAR.get)) == "submitter"
        finally:
            VAR.reset(token)
    finally:
        pool.shutdown()


def test_fork_does_not_import_torch() -> None:
    """Looking at torch's state costs nothing where torch is not imported: fork never imports it."""
    code = textwrap.dedent(
        """
        import contextvars, sys
        import thenable

        var = contextvars.ContextVar("var")
        var.set(1)
        assert thenable.wait(thenable.fork(var.get)) == 1
        futures = [thenable.fork(var.get) for _ in range(100)]
        assert [thenable.wait(f) for f in futures] == [1] * 100
        print("torch" in sys.modules)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout == "False\n"


# -- torch: each state ---------------------------------------------------------------------------


def grad_probe(torch: Any) -> tuple[str, bool, bool]:
    """The thread, whether grad is enabled, and whether a new result requires grad."""
    x = torch.ones(2, requires_grad=True)
    return thread_name(), torch.is_grad_enabled(), (x * 2).requires_grad


def test_no_grad_is_carried(torch: Any) -> None:
    with torch.no_grad():
        fut = thenable.fork(grad_probe, torch)
    worker, enabled, requires_grad = result_of(fut)
    assert on_a_worker(worker)
    assert (enabled, requires_grad) == (False, False)


def test_inference_mode_is_carried(torch: Any) -> None:
    def make() -> tuple[bool, Any]:
        return torch.is_inference_mode_enabled(), torch.ones(2) * 2

    with torch.inference_mode():
        enabled, out = result_of(thenable.fork(make))
    assert enabled
    assert torch.is_inference(out)
    enabled, out = result_of(thenable.fork(make))
    assert not enabled
    assert not torch.is_inference(out)


def test_autocast_is_carried(torch: Any) -> None:
    def probe() -> tuple[bool, Any, Any, bool]:
        x = torch.ones(4, 4)
        return (
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
            torch.mm(x, x).dtype,
            torch.is_autocast_cache_enabled(),
        )

    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        inside = result_of(thenable.fork(probe))
    assert inside == (True, torch.bfloat16, torch.bfloat16, False)
    enabled, _, dtype, cache = result_of(thenable.fork(probe))
    assert (enabled, dtype, cache) == (False, torch.float32, True)


def test_a_nested_fork_under_no_grad_keeps_no_grad(torch: Any) -> None:
    def outer() -> tuple[tuple[str, bool, bool], tuple[str, bool, bool]]:
        mine = grad_probe(torch)
        return mine, thenable.wait(thenable.fork(grad_probe, torch))

    with torch.no_grad():
        fut = thenable.fork(outer)
    (worker, *mine), (_, *nested) = result_of(fut)
    assert on_a_worker(worker)
    assert mine == nested == [False, False]


def test_function_modes_are_carried(torch: Any) -> None:
    with torch.device("meta"):
        out = result_of(thenable.fork(torch.empty, 3))
    assert out.device.type == "meta"
    torch.set_default_device("meta")  # thread-local: a mode pushed on this thread's stack
    try:
        out = result_of(thenable.fork(torch.empty, 3))
    finally:
        torch.set_default_device(None)
    assert out.device.type == "meta"
    assert result_of(thenable.fork(torch.empty, 3)).device.type == "cpu"


# -- torch: the profiler ---------------------------------------------------------------------------


def mm_count(prof: Any) -> int:
    return sum(event.count for event in prof.key_averages() if event.key == "aten::mm")


@pytest.mark.parametrize("kind", ["torch.profiler", "torch.autograd.profiler"])
def test_the_profiler_records_forked_and_nested_tasks(torch: Any, kind: str) -> None:
    profile = {
        "torch.profiler": torch.profiler.profile,
        "torch.autograd.profiler": torch.autograd.profiler.profile,
    }[kind]
    x = torch.ones(4, 4)
    threads: list[str] = []

    def leaf() -> None:
        threads.append(thread_name())
        torch.mm(x, x)

    def outer() -> None:
        leaf()
        nested = [thenable.fork(leaf), thenable.fork(leaf)]
        for fut in nested:
            thenable.wait(fut)

    with profile() as prof:
        for fut in [thenable.fork(outer) for _ in range(3)]:
            result_of(fut)
    assert len(threads) == 9
    assert thread_name() not in threads  # each was recorded from another thread
    assert mm_count(prof) == 9


# -- torch: whichever thread runs it ---------------------------------------------------------------


def test_wait_running_a_task_inline_uses_the_forkers_state(
    torch: Any, one_worker: Callable[[], None]
) -> None:
    one_worker()
    forked: list[Future[tuple[str, bool, bool]]] = []

    def forker() -> None:
        with torch.no_grad():
            forked.append(thenable.fork(grad_probe, torch))

    thread = threading.Thread(target=forker)
    thread.start()
    thread.join(TIMEOUT)
    assert torch.is_grad_enabled()
    assert thenable.wait(forked[0]) == (thread_name(), False, False)  # ran here, inline
    assert torch.is_grad_enabled()


def test_wait_running_a_task_inline_does_not_lend_it_the_waiters_state(
    torch: Any, one_worker: Callable[[], None]
) -> None:
    one_worker()
    fut = thenable.fork(grad_probe, torch)
    with torch.no_grad():
        assert thenable.wait(fut) == (thread_name(), True, True)  # ran here, inline
        assert not torch.is_grad_enabled()


def test_the_workers_state_is_put_back_after_each_task(
    torch: Any, one_worker: Callable[[], None]
) -> None:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        worker, enabled, _ = result_of(thenable.fork(grad_probe, torch))
    assert on_a_worker(worker)
    assert not enabled

    def probe() -> tuple[str, bool, bool]:
        return thread_name(), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")

    assert result_of(thenable.fork(probe)) == (worker, True, False)


def test_a_task_that_leaves_grad_off_does_not_leave_it_to_the_next(
    torch: Any, one_worker: Callable[[], None]
) -> None:
    def leave_grad_off() -> str:
        torch.set_grad_enabled(False)  # not undone: torch's fork would undo it after the task
        return thread_name()

    worker = result_of(thenable.fork(leave_grad_off))
    assert result_of(thenable.fork(grad_probe, torch)) == (worker, True, True)


# -- the example ----------------------------------------------------------------------------------


def test_fork_state_example_passes_its_checks() -> None:
    pytest.importorskip("torch")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fork_state.py"), "--members", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert "ok   no_grad: 6 of 6 tasks ran with grad off" in lines
    assert "ok   torch.profiler.profile: 9 of 9 linear layers recorded" in lines
    assert "ok   torch.autograd.profiler.profile: 9 of 9 linear layers recorded" in lines
    assert lines[-1] == "all checks passed"
