"""collect_all, wait_all, collect_any and as_completed."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from thenable import Future, as_completed, collect_all, collect_any, wait_all


def done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def failed(exc: Exception) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_exception(exc)
    return fut


# -- collect_all --------------------------------------------------------------------------------


def test_seed_collect_all_example() -> None:
    fut0: Future[int] = Future()
    fut1: Future[int] = Future()
    fut = collect_all([fut0, fut1])
    assert not fut.done()
    fut0.set_result(0)
    assert not fut.done()
    fut1.set_result(1)
    fut_list = fut.wait()
    assert fut_list[0] is fut0 and fut_list[1] is fut1
    assert [f.wait() for f in fut_list] == [0, 1]


def test_collect_all_completes_even_when_some_fail() -> None:
    good = done(1)
    bad = failed(ValueError("x"))
    combined = collect_all([good, bad])
    assert combined.done()
    assert combined.value() == [good, bad]


def test_collect_all_empty_list_is_done_at_once() -> None:
    assert collect_all([]).wait() == []


def test_collect_all_same_future_twice() -> None:
    fut: Future[int] = Future()
    combined = collect_all([fut, fut])
    fut.set_result(3)
    assert combined.wait(timeout=10) == [fut, fut]


def test_collect_all_many_futures_completed_from_threads() -> None:
    futures: list[Future[int]] = [Future() for _ in range(1000)]
    combined = collect_all(futures)

    def complete(part: list[Future[int]]) -> None:
        for fut in part:
            fut.set_result(1)

    threads = [threading.Thread(target=complete, args=(futures[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    assert len(combined.wait(timeout=30)) == 1000
    for thread in threads:
        thread.join(timeout=10)


@pytest.mark.parametrize("combinator", [collect_all, wait_all, collect_any, as_completed])
def test_combinators_reject_non_futures(combinator: Any) -> None:
    with pytest.raises(TypeError, match=r"item 1 is int, not a thenable.Future"):
        combinator([done(1), 2])
    with pytest.raises(TypeError, match="got a single Future"):
        combinator(done(1))
    with pytest.raises(TypeError, match="takes a list of Futures"):
        combinator(42)


# -- wait_all -----------------------------------------------------------------------------------


def test_wait_all_returns_values_in_order() -> None:
    futures: list[Future[int]] = [Future() for _ in range(3)]
    for i in (2, 0, 1):
        futures[i].set_result(i * 10)
    assert wait_all(futures) == [0, 10, 20]


def test_wait_all_empty() -> None:
    assert wait_all([]) == []


def test_wait_all_exits_early_on_first_failure() -> None:
    """As documented (and unlike torch): a failure is raised without waiting for the rest."""
    never: Future[int] = Future()
    failing: Future[int] = Future()
    thread = threading.Thread(target=failing.set_exception, args=(KeyError("boom"),))
    thread.start()
    with pytest.raises(KeyError, match="boom"):
        wait_all([never, failing], timeout=30)
    assert not never.done()
    thread.join(timeout=10)


def test_wait_all_already_failed_future_raises_original_exception() -> None:
    error = ValueError("first")
    with pytest.raises(ValueError) as info:
        wait_all([done(1), failed(error), failed(ValueError("second"))])
    assert info.value is error


def test_wait_all_timeout() -> None:
    with pytest.raises(TimeoutError):
        wait_all([done(1), Future()], timeout=0.01)


def test_wait_all_blocks_until_last_value() -> None:
    first: Future[int] = Future()
    second: Future[int] = Future()
    results: list[list[int]] = []
    started = threading.Event()

    def waiter() -> None:
        started.set()
        results.append(wait_all([first, second], timeout=10))

    thread = threading.Thread(target=waiter)
    thread.start()
    started.wait(timeout=10)
    first.set_result(1)
    second.set_result(2)
    thread.join(timeout=10)
    assert results == [[1, 2]]


# -- collect_any --------------------------------------------------------------------------------


def test_collect_any_completes_with_first_done_future() -> None:
    a: Future[str] = Future()
    b: Future[str] = Future()
    first = collect_any([a, b])
    assert not first.done()
    b.set_result("b")
    assert first.wait(timeout=10) is b
    a.set_result("a")
    assert first.value() is b


def test_collect_any_with_failed_first_gives_the_failed_future() -> None:
    bad = failed(OSError("down"))
    first = collect_any([Future(), bad])
    assert first.value() is bad
    with pytest.raises(OSError, match="down"):
        first.value().wait()


def test_collect_any_empty_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one Future"):
        collect_any([])


# -- as_completed -------------------------------------------------------------------------------


def test_as_completed_yields_in_completion_order() -> None:
    futures: list[Future[int]] = [Future() for _ in range(3)]
    already = done(99)
    order = [2, 0, 1]
    go = threading.Event()

    def complete() -> None:
        go.wait(timeout=10)
        for i in order:
            futures[i].set_result(i)

    thread = threading.Thread(target=complete)
    thread.start()
    iterator = as_completed([*futures, already], timeout=30)
    assert next(iterator) is already
    go.set()
    assert [f.value() for f in iterator] == order
    thread.join(timeout=10)


def test_as_completed_deduplicates() -> None:
    fut = done(1)
    assert list(as_completed([fut, fut, fut])) == [fut]


def test_as_completed_timeout_names_the_pending_count() -> None:
    iterator = as_completed([done(1), Future(), Future()], timeout=0.01)
    assert next(iterator).value() == 1
    with pytest.raises(TimeoutError, match="2 of 3 futures still pending"):
        next(iterator)
