"""Bridges between thenable Futures and asyncio / concurrent.futures futures.

Each bridge copies the outcome (value or exception) once the source completes, in whichever
thread completes it; asyncio futures are only ever touched from their event loop's thread.
Cancellation: thenable Futures cannot be cancelled (as in torch), so a cancelled source fails the
thenable Future with the source's CancelledError, and cancelling a bridged target does not stop
the thenable computation.
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING, Any, TypeVar

from thenable._future import Future

if TYPE_CHECKING:
    import asyncio

__all__ = ["from_asyncio", "from_concurrent", "to_asyncio", "to_concurrent"]

T = TypeVar("T")


def to_asyncio(
    future: Future[T], loop: asyncio.AbstractEventLoop | None = None
) -> asyncio.Future[T]:
    """Return an asyncio Future on ``loop`` that completes like ``future``.

    Args:
        future: the thenable Future to follow.
        loop: the event loop; default the running one (so call this from a coroutine).

    Raises:
        TypeError: ``future`` is not a thenable Future.
        RuntimeError: no loop was given and none is running in this thread.
    """
    _check_thenable(future, "to_asyncio")
    return future._to_asyncio(loop)


def from_asyncio(source: asyncio.Future[T]) -> Future[T]:
    """Return a thenable Future that completes like the asyncio future or task ``source``.

    Safe to call from any thread; the outcome is copied in the loop's thread.

    Raises:
        TypeError: ``source`` is not an asyncio future.
    """
    import asyncio

    if not asyncio.isfuture(source):
        raise TypeError(f"from_asyncio() takes an asyncio Future, got {type(source).__qualname__}")
    target: Future[T] = Future()

    def copy_outcome(done: asyncio.Future[T]) -> None:
        if done.cancelled():
            try:
                done.result()  # raises the CancelledError, with the message given to cancel()
            except asyncio.CancelledError as cancelled:
                target._complete(None, cancelled, cancelled.__traceback__)
            return
        exception = done.exception()
        if exception is not None:
            target._complete(None, exception, exception.__traceback__)
        else:
            target._complete(done.result(), None)

    loop = source.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        source.add_done_callback(copy_outcome)
    else:
        loop.call_soon_threadsafe(source.add_done_callback, copy_outcome)
    return target


def from_concurrent(source: concurrent.futures.Future[T]) -> Future[T]:
    """Return a thenable Future that completes like the ``concurrent.futures`` future ``source``.

    Raises:
        TypeError: ``source`` is not a ``concurrent.futures.Future``.
    """
    if not isinstance(source, concurrent.futures.Future):
        raise TypeError(
            f"from_concurrent() takes a concurrent.futures.Future, got {type(source).__qualname__}"
        )
    target: Future[T] = Future()

    def copy_outcome(done: concurrent.futures.Future[T]) -> None:
        if done.cancelled():
            target._complete(None, concurrent.futures.CancelledError("the future was cancelled"))
            return
        exception = done.exception()
        if exception is not None:
            target._complete(None, exception, exception.__traceback__)
        else:
            target._complete(done.result(), None)

    source.add_done_callback(copy_outcome)
    return target


def to_concurrent(future: Future[T]) -> concurrent.futures.Future[T]:
    """Return a ``concurrent.futures.Future`` that completes like ``future``.

    The result is already marked running, so it cannot be cancelled; use it with
    ``concurrent.futures.wait`` / ``as_completed`` or code that expects the standard type.

    Raises:
        TypeError: ``future`` is not a thenable Future.
    """
    _check_thenable(future, "to_concurrent")
    target: concurrent.futures.Future[T] = concurrent.futures.Future()
    target.set_running_or_notify_cancel()

    def copy_outcome(done: Future[T]) -> None:
        if done._exception is not None:
            target.set_exception(done._exception)
        else:
            target.set_result(done._result)

    future.add_done_callback(copy_outcome)
    return target


def _check_thenable(future: Any, caller: str) -> None:
    if not isinstance(future, Future):
        raise TypeError(f"{caller}() takes a thenable Future, got {type(future).__qualname__}")
