"""The Future core: completion, callbacks, errors, waiting, depth and memory."""

from __future__ import annotations

import gc
import logging
import pickle
import threading
import traceback
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import thenable
from thenable import Future, FutureState


class Value:
    """A weak-referenceable value, to check futures do not keep values alive."""


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Disable the cycle collector so that only reference counting frees objects."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def failed(exc: Exception) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_exception(exc)
    return fut


# -- basics -------------------------------------------------------------------------------------


def test_set_result_then_wait_and_value() -> None:
    fut: Future[int] = Future()
    assert not fut.done()
    assert fut.state.name == "PENDING"
    fut.set_result(5)
    assert fut.done()
    assert fut.state is FutureState.FINISHED
    assert fut.wait() == 5
    assert fut.value() == 5


def test_generic_alias_is_usable_as_constructor() -> None:
    fut = Future[int]()
    fut.set_result(3)
    assert isinstance(fut, Future)
    assert fut.wait() == 3


def test_set_exception_reraises_original_from_wait_and_value() -> None:
    fut = failed(ValueError("foo"))
    assert fut.done()
    with pytest.raises(ValueError, match=r"^foo$"):
        fut.wait()
    with pytest.raises(ValueError, match=r"^foo$"):
        fut.value()


def test_value_on_pending_future_is_a_clear_runtime_error() -> None:
    fut: Future[int] = Future()
    with pytest.raises(RuntimeError, match=r"value\(\) called on a pending Future.*wait\(\)"):
        fut.value()


@pytest.mark.parametrize("second", ["result", "exception"])
def test_completing_twice_raises(second: str) -> None:
    fut: Future[int] = Future()
    fut.set_result(1)
    with pytest.raises(RuntimeError, match="can only be marked completed once"):
        if second == "result":
            fut.set_result(2)
        else:
            fut.set_exception(ValueError("late"))
    assert fut.wait() == 1


@pytest.mark.parametrize("bad", ["oops", ValueError, KeyboardInterrupt(), None, 3])
def test_set_exception_needs_an_exception_instance(bad: Any) -> None:
    fut: Future[int] = Future()
    with pytest.raises(TypeError, match=r"set_exception\(\) takes an Exception instance"):
        fut.set_exception(bad)
    assert not fut.done()


def test_exactly_one_of_racing_completers_wins() -> None:
    for _ in range(50):
        fut: Future[int] = Future()
        threads = 8
        barrier = threading.Barrier(threads)
        winners: list[int] = []
        losers: list[int] = []

        def complete(
            i: int,
            fut: Future[int] = fut,
            barrier: threading.Barrier = barrier,
            winners: list[int] = winners,
            losers: list[int] = losers,
        ) -> None:
            barrier.wait(timeout=10)
            try:
                fut.set_result(i)
            except RuntimeError as exc:
                assert "can only be marked completed once" in str(exc)
                losers.append(i)
            else:
                winners.append(i)

        workers = [threading.Thread(target=complete, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=10)
        assert len(winners) == 1
        assert len(losers) == threads - 1
        assert fut.wait() == winners[0]


def test_repr_shows_state() -> None:
    fut: Future[int] = Future()
    assert "pending" in repr(fut)
    fut.set_result(42)
    assert "done, result=42" in repr(fut)
    assert "failed with ValueError: bad" in repr(failed(ValueError("bad")))


def test_future_cannot_be_pickled() -> None:
    fut: Future[int] = Future()
    fut.set_result(1)
    # torch's message and type (RuntimeError), and pickle's type for the unpicklable.
    with pytest.raises(RuntimeError, match=r"^Can not pickle torch\.futures\.Future") as info:
        pickle.dumps(fut)
    assert isinstance(info.value, TypeError)
    assert "fut.wait()" in str(info.value)


# -- waiting ------------------------------------------------------------------------------------


def test_wait_blocks_until_another_thread_sets_the_result() -> None:
    fut: Future[str] = Future()
    started = threading.Event()

    def waiter(out: list[str]) -> None:
        started.set()
        out.append(fut.wait(timeout=10))

    out: list[str] = []
    thread = threading.Thread(target=waiter, args=(out,))
    thread.start()
    assert started.wait(timeout=10)
    fut.set_result("ready")
    thread.join(timeout=10)
    assert out == ["ready"]


def test_many_waiters_all_wake() -> None:
    fut: Future[int] = Future()
    ready = threading.Barrier(9)
    results: list[int] = []
    lock = threading.Lock()

    def waiter() -> None:
        ready.wait(timeout=10)
        value = fut.wait(timeout=10)
        with lock:
            results.append(value)

    threads = [threading.Thread(target=waiter) for _ in range(8)]
    for thread in threads:
        thread.start()
    ready.wait(timeout=10)
    fut.set_result(7)
    for thread in threads:
        thread.join(timeout=10)
    assert results == [7] * 8


def test_wait_timeout_raises_timeout_error_and_future_still_usable() -> None:
    fut: Future[int] = Future()
    with pytest.raises(TimeoutError, match=r"did not complete within 0\.01 seconds"):
        fut.wait(timeout=0.01)
    fut.set_result(1)
    assert fut.wait(timeout=0) == 1


@pytest.mark.parametrize(
    ("timeout", "error"), [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError)]
)
def test_wait_rejects_bad_timeouts(timeout: Any, error: type[Exception]) -> None:
    fut: Future[int] = Future()
    with pytest.raises(error, match="timeout must be"):
        fut.wait(timeout=timeout)


# -- callbacks ----------------------------------------------------------------------------------


def test_seed_then_example_prints_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    def callback(fut: Future[int]) -> None:
        print(f"RPC return value is {fut.wait()}.")

    fut: Future[int] = Future()
    cb_fut = fut.then(callback)
    chain_cb_fut = cb_fut.then(lambda x: print(f"Chained cb done. {x.wait()}"))
    fut.set_result(5)
    assert capsys.readouterr().out == "RPC return value is 5.\nChained cb done. None\n"
    assert chain_cb_fut.wait() is None


def test_callbacks_run_in_registration_order_interleaved() -> None:
    order: list[str] = []
    fut: Future[int] = Future()
    fut.then(lambda f: order.append("then1"))
    fut.add_done_callback(lambda f: order.append("adc1"))
    fut.then(lambda f: order.append("then2"))
    fut.add_done_callback(lambda f: order.append("adc2"))
    fut.set_result(0)
    assert order == ["then1", "adc1", "then2", "adc2"]


def test_callbacks_run_in_the_completing_thread() -> None:
    fut: Future[int] = Future()
    seen: list[threading.Thread] = []
    fut.add_done_callback(lambda f: seen.append(threading.current_thread()))
    child = fut.then(lambda f: threading.current_thread())
    thread = threading.Thread(target=fut.set_result, args=(1,))
    thread.start()
    thread.join(timeout=10)
    assert seen == [thread]
    assert child.wait(timeout=10) is thread


def test_callback_on_completed_future_runs_inline_at_once() -> None:
    fut: Future[int] = Future()
    fut.set_result(3)
    seen: list[int] = []
    fut.add_done_callback(lambda f: seen.append(f.value()))
    assert seen == [3]
    child = fut.then(lambda f: f.value() * 2)
    assert child.done()
    assert child.value() == 6


def test_then_returns_callback_value() -> None:
    fut: Future[int] = Future()
    child = fut.then(lambda f: f.wait() + 1)
    grandchild = child.then(lambda f: str(f.wait()))
    fut.set_result(1)
    assert child.wait() == 2
    assert grandchild.wait() == "2"


class CustomError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def test_then_child_fails_with_original_exception_and_callback_traceback() -> None:
    fut: Future[int] = Future()

    def raising_callback(f: Future[int]) -> int:
        raise CustomError("broken callback", 7)

    child = fut.then(raising_callback)
    fut.set_result(1)
    with pytest.raises(CustomError, match=r"^broken callback$") as info:
        child.wait()
    assert info.value.code == 7
    frames = [entry.name for entry in info.traceback]
    assert "raising_callback" in frames


def test_then_callback_waiting_on_failed_parent_propagates_the_exception() -> None:
    error = KeyError("missing")
    fut: Future[int] = Future()
    child = fut.then(lambda f: f.wait())
    grandchild = child.then(lambda f: f.wait() + 1)
    fut.set_exception(error)
    with pytest.raises(KeyError) as info:
        grandchild.wait()
    # The first link makes the one copy that is also a RuntimeError; the rest pass it on.
    assert info.value is child._exception
    assert isinstance(info.value, RuntimeError)
    assert info.value.args == ("missing",)
    assert fut._exception is error and not isinstance(error, RuntimeError)


class _CodedError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def test_then_callback_errors_are_catchable_as_runtime_error_as_in_torch() -> None:
    """torch fails a then() child with RuntimeError; thenable keeps the type and adds that."""
    fut: Future[int] = Future()
    wrong_arg = fut.then(lambda f: f + 1)  # type: ignore[operator]
    raised = fut.then(lambda f: (_ for _ in ()).throw(_CodedError("coded", 7)))
    runtime = fut.then(lambda f: (_ for _ in ()).throw(RuntimeError("as is")))
    fut.set_result(5)
    with pytest.raises(RuntimeError, match=r"unsupported operand type.*Future.*int"):
        wrong_arg.wait()
    with pytest.raises(TypeError):
        wrong_arg.wait()
    with pytest.raises(RuntimeError, match=r"^coded$") as info:
        raised.wait()
    assert isinstance(info.value, _CodedError) and info.value.code == 7
    assert type(info.value).__name__ == "_CodedError"
    assert "_CodedError: coded" in "".join(traceback.format_exception(info.value))
    with pytest.raises(RuntimeError, match=r"^as is$") as plain:
        runtime.wait()
    assert type(plain.value) is RuntimeError  # already one: passed on untouched


def test_a_then_error_that_is_also_a_runtime_error_pickles_as_both() -> None:
    fut: Future[int] = Future()
    child = fut.then(lambda f: int("x"))
    fut.set_result(1)
    error = child._exception
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ValueError) and isinstance(copy, RuntimeError)
    assert copy.args == error.args  # type: ignore[union-attr]


def test_raising_add_done_callback_is_logged_and_isolated(caplog: pytest.LogCaptureFixture) -> None:
    fut: Future[int] = Future()
    ran: list[str] = []

    def bad(f: Future[int]) -> None:
        raise ZeroDivisionError("callback bug")

    fut.add_done_callback(bad)
    fut.add_done_callback(lambda f: ran.append("after"))
    child = fut.then(lambda f: f.value() + 1)
    with caplog.at_level(logging.ERROR, logger="thenable.future"):
        fut.set_result(1)
    assert ran == ["after"]
    assert fut.value() == 1
    assert child.wait() == 2
    [record] = caplog.records
    assert "exception in callback" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


def test_raising_callback_on_done_future_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fut: Future[int] = Future()
    fut.set_result(1)

    def bad(f: Future[int]) -> None:
        raise RuntimeError("late callback bug")

    with caplog.at_level(logging.ERROR, logger="thenable.future"):
        fut.add_done_callback(bad)
    assert len(caplog.records) == 1


@pytest.mark.parametrize("method", ["then", "add_done_callback"])
def test_non_callable_callback_is_rejected(method: str) -> None:
    fut: Future[int] = Future()
    # torch's (pybind's) words first: its tests match them.
    with pytest.raises(TypeError, match=r"^incompatible function arguments: .*needs a callable"):
        getattr(fut, method)(42)


def test_callback_completing_and_waiting_another_future_inside_deep_chain() -> None:
    """A blocking wait deep in a chain must not deadlock on completions deferred in its thread."""
    root: Future[int] = Future()
    tip: Future[int] = root
    for _ in range(100):
        tip = tip.then(lambda f: f.value() + 1)
    inner: Future[int] = Future()
    relay = inner.then(lambda f: f.value() * 2)

    def complete_and_wait(f: Future[int]) -> int:
        inner.set_result(f.value())
        return relay.wait(timeout=10)

    result = tip.then(complete_and_wait)
    root.set_result(0)
    assert result.wait(timeout=10) == 200


# -- scale: no recursion limit ------------------------------------------------------------------


def test_million_link_then_chain_completes() -> None:
    root: Future[int] = Future()
    tip: Future[int] = root
    for _ in range(1_000_000):
        tip = tip.then(lambda f: f.value() + 1)
    root.set_result(0)
    assert tip.wait(timeout=60) == 1_000_000


def test_failure_flows_down_a_long_chain_without_growing_traceback() -> None:
    root: Future[int] = Future()
    tip: Future[int] = root
    for _ in range(100_000):
        tip = tip.then(lambda f: f.wait())
    root.set_exception(ValueError("deep"))
    with pytest.raises(ValueError, match="deep") as info:
        tip.wait(timeout=60)
    assert len(info.traceback) < 20


def test_dropping_a_long_pending_chain_does_not_crash() -> None:
    root: Future[int] = Future()
    tip: Future[int] = root
    for _ in range(200_000):
        tip = tip.then(lambda f: f.value())
    del root, tip
    gc.collect()


def test_hundred_thousand_callbacks_on_one_future() -> None:
    fut: Future[int] = Future()
    counter = [0]

    def bump(f: Future[int]) -> None:
        counter[0] += f.value()

    for _ in range(100_000):
        fut.add_done_callback(bump)
    children = [fut.then(lambda f: f.value()) for _ in range(1000)]
    fut.set_result(1)
    assert counter[0] == 100_000
    assert all(child.value() == 1 for child in children)


def test_chain_completed_from_another_thread() -> None:
    root: Future[int] = Future()
    tip: Future[int] = root
    for _ in range(10_000):
        tip = tip.then(lambda f: f.value() + 1)
    thread = threading.Thread(target=root.set_result, args=(0,))
    thread.start()
    assert tip.wait(timeout=30) == 10_000
    thread.join(timeout=10)


# -- memory -------------------------------------------------------------------------------------


def test_completed_future_does_not_keep_value_alive_after_drop(no_gc: None) -> None:
    value = Value()
    ref = weakref.ref(value)
    fut: Future[Value] = Future()
    child = fut.then(lambda f: f.value())
    fut.add_done_callback(lambda f: None)
    fut.set_result(value)
    assert child.wait() is value
    del value, fut, child
    assert ref() is None


def test_failed_chain_leaves_no_cycles(no_gc: None) -> None:
    value = Value()
    ref = weakref.ref(value)
    fut: Future[Value] = Future()

    def use_then_fail(f: Future[Value]) -> None:
        held = f.value()
        raise ValueError(f"failed with {held!r}")

    child = fut.then(use_then_fail)
    relay = child.then(lambda f: f.wait())
    fut.set_result(value)
    assert relay.done()  # not re-raised here: a re-raise would reset the traceback itself
    fut_ref = weakref.ref(fut)
    del value, fut, child, relay
    assert fut_ref() is None
    assert ref() is None


def test_waited_failure_leaves_no_cycle_through_future(no_gc: None) -> None:
    fut: Future[int] = Future()
    fut.set_exception(ValueError("x"))
    for _ in range(3):
        with pytest.raises(ValueError):
            fut.wait()
    fut_ref = weakref.ref(fut)
    del fut
    assert fut_ref() is None


# -- devices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("devices", [None, []])
def test_default_devices_are_empty(devices: Any) -> None:
    fut: Future[int] = Future(devices=devices)
    assert fut.devices == ()
    assert fut.then(lambda f: None).devices == ()


def test_devices_must_be_a_list() -> None:
    with pytest.raises(TypeError, match="devices must be a list"):
        Future(devices="cuda:0")


def test_cuda_devices_without_cuda_are_refused_clearly() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match=r"needs CUDA.*torch.cuda.is_available\(\) is False"):
        Future(devices=["cuda:0"])


def test_cuda_devices_are_kept_and_inherited() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fut: Future[int] = Future(devices=[0, "cuda:0"])
    assert fut.devices == (torch.device("cuda", 0),)
    assert fut.then(lambda f: None).devices == fut.devices
    with pytest.raises(ValueError, match="CUDA devices only"):
        Future(devices=["cpu"])


# -- values of every kind -----------------------------------------------------------------------


def test_numpy_and_torch_values_pass_through_unchanged() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(6).reshape(2, 3)
    fut: Future[Any] = Future()
    doubled = fut.then(lambda f: f.wait() * 2)
    fut.set_result(array)
    assert fut.wait() is array
    assert (doubled.wait() == array * 2).all()


def test_seed_set_result_example_with_tensor() -> None:
    torch = pytest.importorskip("torch")

    def slow_set_future(fut: Future[Any], value: Any, go: threading.Event) -> None:
        go.wait(timeout=10)
        fut.set_result(value)

    fut: Future[Any] = Future()
    go = threading.Event()
    thread = threading.Thread(target=slow_set_future, args=(fut, torch.ones(2) * 3, go))
    thread.start()
    go.set()
    assert torch.equal(fut.wait(timeout=10), torch.tensor([3.0, 3.0]))
    thread.join(timeout=10)


def test_public_front_reexports_futures_mirror() -> None:
    import thenable.futures as futures

    assert futures.Future is thenable.Future
    assert futures.collect_all is thenable.collect_all
    assert futures.wait_all is thenable.wait_all
    assert set(futures.__all__) == {"Future", "collect_all", "wait_all"}
