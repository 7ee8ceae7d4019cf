"""collect_all, wait_all, collect_any and as_completed."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from thenable import Future, _aio, as_completed, collect_all, collect_any, wait_all


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
    with pytest.raises(TypeError, match=r"item 1 is builtins\.int, not a thenable\.Future"):
        combinator([done(1), 2])
    with pytest.raises(TypeError, match="got a single Future"):
        combinator(done(1))
    with pytest.raises(TypeError, match=r"takes a list of Futures, got builtins\.int$"):
        combinator(42)


@pytest.mark.parametrize("combinator", [collect_all, wait_all, collect_any, as_completed])
def test_a_none_is_refused_as_torch_refuses_it(combinator: Any) -> None:
    """torch raises RuntimeError("Future can't be None"): ours is a TypeError that is also
    that RuntimeError, with torch's words."""
    for futures, index in (((None,), 0), ([done(1), None], 1)):
        with pytest.raises(TypeError) as info:
            combinator(futures)
        assert isinstance(info.value, RuntimeError)
        assert str(info.value) == (
            f"{combinator.__name__}(): item {index} is None: Future can't be None"
        )


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


# -- torch futures ------------------------------------------------------------------------------


def test_combinators_take_torch_futures_beside_thenable_ones() -> None:
    torch = pytest.importorskip("torch")
    theirs: Any = torch.futures.Future()
    ours: Future[int] = Future()
    combined = collect_all([theirs, ours])
    theirs.set_result(1)
    assert not combined.done()
    ours.set_result(2)
    bridge, same = combined.wait(timeout=10)
    assert isinstance(bridge, Future) and same is ours
    assert [bridge.value(), same.value()] == [1, 2]

    done_there: Any = torch.futures.Future()
    done_there.set_result("t")
    assert wait_all([done_there, done(3)], timeout=10) == ["t", 3]
    first = collect_any([Future(), done_there])
    assert first.wait(timeout=10).value() == "t"
    assert [f.value() for f in as_completed([done_there, done_there], timeout=10)] == ["t"]


def test_wait_all_raises_a_torch_future_s_exception_itself() -> None:
    torch = pytest.importorskip("torch")
    failing: Any = torch.futures.Future()
    error = ValueError("from torch")
    completer = threading.Thread(target=failing.set_exception, args=(error,))
    completer.start()  # completes it while wait_all waits (or before: either way)
    with pytest.raises(ValueError) as info:
        wait_all([Future(), failing], timeout=30)
    assert info.value is error
    completer.join(timeout=10)


def test_a_bad_item_leaves_no_bridge_on_the_torch_futures_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = pytest.importorskip("torch")
    bridged: list[object] = []
    monkeypatch.setattr(_aio, "from_torch", bridged.append)
    with pytest.raises(TypeError, match=r"item 1 is builtins\.str, not a thenable\.Future"):
        collect_all([torch.futures.Future(), "not a future"])  # type: ignore[list-item]
    assert bridged == []  # every item is checked before any is bridged
