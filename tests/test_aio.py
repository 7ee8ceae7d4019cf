"""Bridges to asyncio, concurrent.futures and torch: ``await fut``, to/from_asyncio,
to/from_concurrent, from_torch.

Ordering is proved with events, never with time: a thread that completes a future first waits
for a signal sent from the event loop, so the loop must have kept running meanwhile.  Every wait
is bounded, so a bug fails fast instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

import thenable
from thenable import Future

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

TIMEOUT = 10.0  # seconds: long enough never to fire on a working library, short enough to fail


class TaskError(Exception):
    """An error that a future fails with."""


# -- helpers ------------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, 3 * TIMEOUT))


def start_thread(target: Callable[[], object], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name)
    thread.start()
    return thread


def joined(thread: threading.Thread) -> None:
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"thread {thread.name} left running"


def complete_when(signal: threading.Event, fut: Future[T], value: T) -> Callable[[], None]:
    """A thread body: once ``signal`` is set, complete ``fut`` with ``value``; if it never is,
    fail ``fut`` instead, so the awaiting test fails fast."""

    def body() -> None:
        if signal.wait(TIMEOUT):
            fut.set_result(value)
        else:
            fut.set_exception(AssertionError("the event loop never sent the signal"))

    return body


def fail_when(signal: threading.Event, fut: Future[Any], exc: Exception) -> Callable[[], None]:
    def body() -> None:
        if signal.wait(TIMEOUT):
            fut.set_exception(exc)
        else:
            fut.set_exception(AssertionError("the event loop never sent the signal"))

    return body


@contextlib.contextmanager
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread; stopped, joined and closed afterwards."""
    loop = asyncio.new_event_loop()
    running = threading.Event()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))

    def serve() -> None:
        loop.call_soon(running.set)
        loop.run_forever()

    thread = start_thread(serve, "test-event-loop")
    try:
        assert running.wait(TIMEOUT)
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        joined(thread)
        loop.close()
    assert errors == [], f"the event loop reported errors: {errors}"


def in_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` (running in another thread) and return its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(TIMEOUT)


def record_loop_errors() -> list[dict[str, Any]]:
    """Collect what the running loop reports to its exception handler (e.g. failing callbacks)."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    return errors


@pytest.fixture(autouse=True)
def leaves_no_thread_behind() -> Iterator[None]:
    """No thread the test started is still running afterwards (the fork pool's workers aside)."""
    before = set(threading.enumerate())
    yield
    for thread in threading.enumerate():
        if thread not in before and not thread.name.startswith("thenable-"):
            joined(thread)


# -- await fut ----------------------------------------------------------------------------------


def test_await_a_done_future() -> None:
    async def main() -> int:
        fut: Future[int] = Future()
        fut.set_result(5)
        return await fut

    assert run(main()) == 5


def test_await_a_future_completed_later_by_another_thread() -> None:
    async def main() -> tuple[str, bool]:
        fut: Future[str] = Future()
        go = threading.Event()
        thread = start_thread(complete_when(go, fut, "later"), "test-completer")
        # Sent by the loop on its next turn, i.e. once this coroutine is suspended in the await.
        asyncio.get_running_loop().call_soon(go.set)
        was_pending = not fut.done()
        value = await fut
        joined(thread)
        return value, was_pending

    assert run(main()) == ("later", True)


def test_await_a_failed_future_raises_the_original_exception() -> None:
    async def main() -> None:
        error = TaskError("already failed")
        fut: Future[int] = Future()
        fut.set_exception(error)
        with pytest.raises(TaskError, match=r"^already failed$") as caught:
            await fut
        assert caught.value is error

        error = TaskError("failed later")
        fut = Future()
        go = threading.Event()
        thread = start_thread(fail_when(go, fut, error), "test-completer")
        asyncio.get_running_loop().call_soon(go.set)
        assert not fut.done()
        with pytest.raises(TaskError, match=r"^failed later$") as caught:
            await fut
        assert caught.value is error
        joined(thread)

    run(main())


def test_await_does_not_block_the_event_loop() -> None:
    async def main() -> list[str]:
        fut: Future[str] = Future()
        loop_ran = threading.Event()  # set from the loop once the other coroutine has run
        thread = start_thread(complete_when(loop_ran, fut, "value"), "test-completer")
        order: list[str] = []
        other_progressed = asyncio.Event()

        async def awaiter() -> str:
            order.append("awaiting")
            value = await fut  # must suspend this coroutine only, not the loop
            order.append("resumed")
            return value

        async def other() -> None:
            order.append("other ran")
            other_progressed.set()

        awaiting = asyncio.create_task(awaiter())
        helper = asyncio.create_task(other())
        await other_progressed.wait()
        assert not fut.done()
        loop_ran.set()  # only now may the thread complete the future
        assert await awaiting == "value"
        await helper
        joined(thread)
        return order

    assert run(main()) == ["awaiting", "other ran", "resumed"]


def test_await_a_forked_task() -> None:
    async def main() -> tuple[int, str]:
        started = threading.Event()
        gate = threading.Event()

        def task() -> str:
            started.set()
            if not gate.wait(TIMEOUT):
                raise TimeoutError("the loop never opened the gate")
            return threading.current_thread().name

        fut = thenable.fork(task)
        asyncio.get_running_loop().call_soon(gate.set)  # runs once we are suspended below
        name = await fut
        return await thenable.fork(sum, [1, 2, 3]), name

    total, name = run(main())
    assert total == 6
    assert name.startswith("thenable-interop-")


def test_await_a_future_that_fails_with_stop_iteration_later_does_not_hang() -> None:
    """A failure with StopIteration (e.g. ``fork(next, exhausted_iterator)``) cannot be set on an
    asyncio Future; awaiting must still end, with the same error as when the future was already
    done: RuntimeError caused by the StopIteration."""

    async def already_done() -> None:
        stop = StopIteration("exhausted")
        fut: Future[int] = Future()
        fut.set_exception(stop)
        with pytest.raises(RuntimeError) as caught:
            await fut
        assert caught.value.__cause__ is stop

    async def failed_later() -> None:
        stop = StopIteration("exhausted")
        fut: Future[int] = Future()
        go = threading.Event()
        thread = start_thread(fail_when(go, fut, stop), "test-completer")
        errors = record_loop_errors()

        async def awaiter() -> int:
            asyncio.get_running_loop().call_soon(go.set)
            assert not fut.done()
            return await fut

        try:
            await asyncio.wait_for(awaiter(), TIMEOUT)
        except RuntimeError as exc:
            assert exc.__cause__ is stop
        except asyncio.TimeoutError:
            pytest.fail(
                "`await fut` never ended after fut failed with StopIteration; "
                f"the event loop reported: {[c.get('exception') for c in errors]!r}"
            )
        else:
            pytest.fail("`await fut` returned although fut failed")
        finally:
            joined(thread)
        assert errors == []

    run(already_done())
    run(failed_later())


def test_to_asyncio_of_a_future_that_fails_with_stop_iteration_completes() -> None:
    async def main() -> None:
        errors = record_loop_errors()
        stop = StopIteration("exhausted")
        fut: Future[int] = Future()
        target = thenable.to_asyncio(fut)
        fut.set_exception(stop)  # queues the copy onto the loop, in this thread
        loop = asyncio.get_running_loop()
        copied: asyncio.Future[None] = loop.create_future()
        loop.call_soon(copied.set_result, None)  # queued after the copy
        await copied
        assert target.done(), (
            "the asyncio target never completed; the event loop reported: "
            f"{[c.get('exception') for c in errors]!r}"
        )
        exc = target.exception()
        assert isinstance(exc, RuntimeError)
        assert exc.__cause__ is stop
        assert errors == []

    run(main())


# -- to_asyncio ---------------------------------------------------------------------------------


def test_to_asyncio_copies_a_value_and_an_exception() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: Future[int] = Future()
        done.set_result(1)
        target = thenable.to_asyncio(done)
        assert isinstance(target, asyncio.Future)
        assert target.get_loop() is loop
        assert await target == 1

        later: Future[int] = Future()
        go = threading.Event()
        thread = start_thread(complete_when(go, later, 2), "test-completer")
        target = thenable.to_asyncio(later, loop=None)
        loop.call_soon(go.set)
        assert await target == 2
        joined(thread)

        error = TaskError("bridged")
        failing: Future[int] = Future()
        go = threading.Event()
        thread = start_thread(fail_when(go, failing, error), "test-completer")
        target = thenable.to_asyncio(failing)
        loop.call_soon(go.set)
        with pytest.raises(TaskError, match=r"^bridged$") as caught:
            await target
        assert caught.value is error
        joined(thread)

    run(main())


def test_cancelling_the_asyncio_target_leaves_the_future_alone() -> None:
    async def main() -> None:
        errors = record_loop_errors()
        fut: Future[int] = Future()
        cancelled = thenable.to_asyncio(fut)
        assert cancelled.cancel()
        second = thenable.to_asyncio(fut)  # bridged after: its copy runs after the first's
        fut.set_result(3)
        assert await second == 3
        assert cancelled.cancelled()
        assert fut.wait(timeout=TIMEOUT) == 3
        assert errors == []

    run(main())


def test_to_asyncio_with_a_loop_in_another_thread() -> None:
    with loop_in_thread() as loop:
        fut: Future[str] = Future()
        target = thenable.to_asyncio(fut, loop=loop)
        assert target.get_loop() is loop
        fut.set_result("across threads")

        async def get() -> str:
            return await target

        assert in_loop(loop, get()) == "across threads"


def test_to_asyncio_without_a_running_loop_is_a_runtime_error() -> None:
    fut: Future[int] = Future()
    with pytest.raises(RuntimeError):
        thenable.to_asyncio(fut)


# -- from_asyncio -------------------------------------------------------------------------------


def test_from_asyncio_inside_the_loop() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        source: asyncio.Future[int] = loop.create_future()
        fut = thenable.from_asyncio(source)
        assert isinstance(fut, Future)
        assert not fut.done()
        source.set_result(4)
        assert await fut == 4

        failing: asyncio.Future[int] = loop.create_future()
        fut = thenable.from_asyncio(failing)
        error = TaskError("from asyncio")
        failing.set_exception(error)
        with pytest.raises(TaskError, match=r"^from asyncio$") as caught:
            await fut
        assert caught.value is error

        done: asyncio.Future[int] = loop.create_future()
        done.set_result(5)
        assert await thenable.from_asyncio(done) == 5

    run(main())


def test_from_asyncio_of_a_task() -> None:
    async def main() -> None:
        async def compute() -> int:
            await asyncio.sleep(0)
            return 6

        async def explode() -> int:
            await asyncio.sleep(0)
            raise TaskError("task failed")

        assert await thenable.from_asyncio(asyncio.create_task(compute())) == 6
        task = asyncio.create_task(explode())
        with pytest.raises(TaskError, match=r"^task failed$") as caught:
            await thenable.from_asyncio(task)
        assert caught.value is task.exception()

    run(main())


def test_asyncio_round_trip() -> None:
    async def main() -> None:
        fut: Future[int] = Future()
        back = thenable.from_asyncio(thenable.to_asyncio(fut))
        fut.set_result(7)
        assert await back == 7

        source: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        there_and_back = thenable.to_asyncio(thenable.from_asyncio(source))
        source.set_result(8)
        assert await there_and_back == 8

    run(main())


def test_from_asyncio_called_from_another_thread() -> None:
    with loop_in_thread() as loop:

        async def make() -> asyncio.Future[int]:
            return asyncio.get_running_loop().create_future()

        source = in_loop(loop, make())
        fut = thenable.from_asyncio(source)  # from this thread, where no loop runs
        completed_in: list[threading.Thread] = []
        fut.add_done_callback(lambda _: completed_in.append(threading.current_thread()))
        assert not fut.done()
        loop.call_soon_threadsafe(source.set_result, 9)
        assert fut.wait(timeout=TIMEOUT) == 9
        assert [t.name for t in completed_in] == ["test-event-loop"]  # copied in the loop thread


def test_from_asyncio_of_a_task_started_with_run_coroutine_threadsafe() -> None:
    with loop_in_thread() as loop:

        async def make_task() -> tuple[asyncio.Task[int], asyncio.Event]:
            gate = asyncio.Event()

            async def body() -> int:
                await gate.wait()
                return 10

            return asyncio.create_task(body()), gate

        task, gate = in_loop(loop, make_task())
        fut = thenable.from_asyncio(task)  # from this thread, while the task is pending
        assert not fut.done()
        loop.call_soon_threadsafe(gate.set)
        assert fut.wait(timeout=TIMEOUT) == 10
        assert task.done()


def test_from_asyncio_of_a_cancelled_future_fails_with_cancelled_error() -> None:
    with loop_in_thread() as loop:

        async def make() -> asyncio.Future[int]:
            return asyncio.get_running_loop().create_future()

        source = in_loop(loop, make())
        fut = thenable.from_asyncio(source)
        loop.call_soon_threadsafe(source.cancel)
        with pytest.raises(asyncio.CancelledError):
            fut.wait(timeout=TIMEOUT)
        assert source.cancelled()


def test_from_asyncio_of_a_cancelled_task_inside_the_loop() -> None:
    async def main() -> None:
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        started = asyncio.Event()

        async def stuck() -> int:
            started.set()
            return await never

        task = asyncio.create_task(stuck())
        fut = thenable.from_asyncio(task)
        completed = asyncio.Event()
        # The outcome is copied in the loop's thread, so the callback may touch loop objects.
        fut.add_done_callback(lambda _: completed.set())
        await started.wait()  # the task is suspended on `never`
        assert task.cancel()
        await completed.wait()
        assert task.cancelled()
        with pytest.raises(asyncio.CancelledError):
            fut.value()

    run(main())


# -- concurrent.futures ---------------------------------------------------------------------------


def test_from_concurrent_copies_a_value_and_an_exception() -> None:
    done: concurrent.futures.Future[int] = concurrent.futures.Future()
    done.set_result(1)
    fut = thenable.from_concurrent(done)
    assert isinstance(fut, Future)
    assert fut.done()
    assert fut.wait() == 1

    later: concurrent.futures.Future[int] = concurrent.futures.Future()
    fut = thenable.from_concurrent(later)
    assert not fut.done()
    later.set_result(2)
    assert fut.wait(timeout=TIMEOUT) == 2

    failing: concurrent.futures.Future[int] = concurrent.futures.Future()
    fut = thenable.from_concurrent(failing)
    error = TaskError("concurrent failure")
    failing.set_exception(error)
    with pytest.raises(TaskError, match=r"^concurrent failure$") as caught:
        fut.wait(timeout=TIMEOUT)
    assert caught.value is error


def test_to_concurrent_copies_a_value_and_an_exception() -> None:
    fut: Future[str] = Future()
    target = thenable.to_concurrent(fut)
    assert isinstance(target, concurrent.futures.Future)
    assert target.running()
    assert not target.cancel()  # already running: cannot be cancelled
    assert not target.done()
    fut.set_result("v")
    assert target.result(timeout=TIMEOUT) == "v"

    failing: Future[str] = Future()
    error = TaskError("to concurrent")
    failing.set_exception(error)
    target = thenable.to_concurrent(failing)
    assert target.exception(timeout=TIMEOUT) is error
    with pytest.raises(TaskError, match=r"^to concurrent$"):
        target.result(timeout=TIMEOUT)


def test_concurrent_round_trips() -> None:
    fut: Future[int] = Future()
    back = thenable.from_concurrent(thenable.to_concurrent(fut))
    fut.set_result(11)
    assert back.wait(timeout=TIMEOUT) == 11

    source: concurrent.futures.Future[int] = concurrent.futures.Future()
    there_and_back = thenable.to_concurrent(thenable.from_concurrent(source))
    error = TaskError("round trip")
    source.set_exception(error)
    assert there_and_back.exception(timeout=TIMEOUT) is error


def test_from_concurrent_of_a_thread_pool_executor_future() -> None:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-executor") as executor:
        gate = threading.Event()
        try:
            fut = thenable.from_concurrent(executor.submit(gate.wait, TIMEOUT))
            assert not fut.done()
            gate.set()
            assert fut.wait(timeout=TIMEOUT) is True
            failing = thenable.from_concurrent(executor.submit(int, "not a number"))
            with pytest.raises(ValueError, match=r"^invalid literal for int\(\)"):
                failing.wait(timeout=TIMEOUT)
        finally:
            gate.set()


def test_forked_future_works_with_concurrent_futures_wait() -> None:
    forked = [thenable.fork(pow, 2, i) for i in range(5)]
    targets = [thenable.to_concurrent(f) for f in forked]
    done, not_done = concurrent.futures.wait(targets, timeout=TIMEOUT)
    assert not not_done
    assert len(done) == 5
    assert [t.result() for t in targets] == [1, 2, 4, 8, 16]


def test_from_concurrent_of_a_cancelled_future_fails_with_cancelled_error() -> None:
    source: concurrent.futures.Future[int] = concurrent.futures.Future()
    fut = thenable.from_concurrent(source)
    assert source.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        fut.wait(timeout=TIMEOUT)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-executor") as executor:
        started = threading.Event()
        gate = threading.Event()

        def hold() -> bool:
            started.set()
            return gate.wait(TIMEOUT)

        try:
            busy = executor.submit(hold)
            assert started.wait(TIMEOUT)
            queued = executor.submit(int, "1")
            fut = thenable.from_concurrent(queued)
            assert queued.cancel()  # still queued behind `busy`
            with pytest.raises(concurrent.futures.CancelledError):
                fut.wait(timeout=TIMEOUT)
        finally:
            gate.set()
        assert busy.result(timeout=TIMEOUT) is True


# -- argument checking --------------------------------------------------------------------------


def _thenable_future() -> Future[int]:
    return Future()


def _concurrent_future() -> concurrent.futures.Future[int]:
    return concurrent.futures.Future()


WRONG_TYPES = [
    pytest.param(
        thenable.to_asyncio,
        lambda: 42,
        "to_asyncio() takes a thenable.Future (or a torch.futures.Future), got builtins.int",
    ),
    pytest.param(
        thenable.to_asyncio,
        _concurrent_future,
        "to_asyncio() takes a thenable.Future (or a torch.futures.Future), got "
        "concurrent.futures._base.Future",
    ),
    pytest.param(
        thenable.to_concurrent,
        _concurrent_future,
        "to_concurrent() takes a thenable.Future (or a torch.futures.Future), got "
        "concurrent.futures._base.Future",
    ),
    pytest.param(
        thenable.to_concurrent,
        lambda: None,
        "to_concurrent() takes a Future, got None: Future can't be None",
    ),
    pytest.param(
        thenable.from_asyncio,
        _concurrent_future,
        "from_asyncio() takes an asyncio Future, got concurrent.futures._base.Future",
    ),
    pytest.param(
        thenable.from_asyncio,
        _thenable_future,
        "from_asyncio() takes an asyncio Future, got thenable._future.Future",
    ),
    pytest.param(
        thenable.from_asyncio,
        lambda: "x",
        "from_asyncio() takes an asyncio Future, got builtins.str",
    ),
    pytest.param(
        thenable.from_concurrent,
        _thenable_future,
        "from_concurrent() takes a concurrent.futures.Future, got thenable._future.Future",
    ),
    pytest.param(
        thenable.from_concurrent,
        lambda: 1.0,
        "from_concurrent() takes a concurrent.futures.Future, got builtins.float",
    ),
    pytest.param(
        thenable.from_torch,
        _thenable_future,
        "from_torch() takes a torch.futures.Future, got thenable._future.Future",
    ),
    pytest.param(
        thenable.from_torch,
        _concurrent_future,
        "from_torch() takes a torch.futures.Future, got concurrent.futures._base.Future",
    ),
    pytest.param(
        thenable.from_torch, lambda: None, "from_torch() takes a torch.futures.Future, got None"
    ),
]


@pytest.mark.parametrize(("bridge", "make_argument", "message"), WRONG_TYPES)
def test_bridges_reject_wrong_argument_types(
    bridge: Callable[[Any], object], make_argument: Callable[[], object], message: str
) -> None:
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        bridge(make_argument())


def test_a_none_given_to_to_asyncio_or_to_concurrent_is_also_a_runtime_error() -> None:
    """As torch's RuntimeError("Future can't be None")."""
    for bridge in (thenable.to_asyncio, thenable.to_concurrent):
        with pytest.raises(RuntimeError, match="Future can't be None") as info:
            bridge(None)  # type: ignore[arg-type]
        assert isinstance(info.value, TypeError)


def test_from_asyncio_rejects_a_wrong_type_inside_a_running_loop() -> None:
    async def main() -> None:
        with pytest.raises(
            TypeError, match=r"^from_asyncio\(\) takes an asyncio Future, got builtins\.coroutine$"
        ):
            coro = asyncio.sleep(0)
            try:
                thenable.from_asyncio(coro)  # type: ignore[arg-type]
            finally:
                await coro  # do not leave it un-awaited

    run(main())


# -- torch.futures ------------------------------------------------------------------------------


def _torch_future() -> torch.futures.Future[int]:
    torch_module = pytest.importorskip("torch")
    future: torch.futures.Future[int] = torch_module.futures.Future()
    return future


def test_from_torch_copies_a_value_and_an_exception() -> None:
    done = _torch_future()
    done.set_result(1)
    fut = thenable.from_torch(done)
    assert isinstance(fut, Future)
    assert fut.done()
    assert fut.wait() == 1

    later = _torch_future()
    fut = thenable.from_torch(later)
    assert not fut.done()
    completer = start_thread(lambda: later.set_result(2), "completes-the-torch-future")
    assert fut.wait(timeout=TIMEOUT) == 2
    joined(completer)

    failing = _torch_future()
    fut = thenable.from_torch(failing)
    error = TaskError("torch failure")
    failing.set_exception(error)  # type: ignore[arg-type]  # torch's stub: result: T
    with pytest.raises(TaskError, match=r"^torch failure$") as caught:
        fut.wait(timeout=TIMEOUT)
    assert caught.value is error


def test_from_torch_completes_in_the_thread_that_completes_the_source() -> None:
    source = _torch_future()
    fut = thenable.from_torch(source)
    threads: list[str] = []
    fut.add_done_callback(lambda _: threads.append(threading.current_thread().name))
    completer = start_thread(lambda: source.set_result(3), "torch-completer")
    joined(completer)
    assert threads == ["torch-completer"]


def test_to_asyncio_and_to_concurrent_take_a_torch_future() -> None:
    source = _torch_future()
    target = thenable.to_concurrent(source)
    assert not target.done()
    source.set_result(4)
    assert target.result(timeout=TIMEOUT) == 4

    async def main() -> int:
        return await thenable.to_asyncio(source)

    assert run(main()) == 4


def test_torch_is_never_imported_to_tell_a_torch_future() -> None:
    code = (
        "import sys, thenable\n"
        "for call in (thenable.from_torch, thenable.to_concurrent):\n"
        "    try:\n"
        "        call(object())\n"
        "    except TypeError:\n"
        "        pass\n"
        "try:\n"
        "    thenable.collect_all([object()])\n"
        "except TypeError:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.strip() == "False"
