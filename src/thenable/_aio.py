"""Bridges between thenable Futures and asyncio / concurrent.futures / torch futures.

Each bridge copies the outcome (value or exception) once the source completes, in whichever
thread completes it; asyncio futures are only ever touched from their event loop's thread.
Cancellation: thenable Futures cannot be cancelled (as in torch), so a cancelled source fails the
thenable Future with the source's CancelledError, and cancelling a bridged target does not stop
the thenable computation.

A ``torch.futures.Future`` is accepted wherever a thenable Future is (``as_future``,
``as_futures``: the combinators, ``to_asyncio``, ``to_concurrent``), bridged with
``from_torch``, so a program moving from torch one import at a time can mix both kinds.  torch
is never imported for it: if it is not loaded, nothing can be a torch Future.
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from thenable import _future
from thenable._errors import as_runtime_error, type_name
from thenable._future import Future

if TYPE_CHECKING:
    import asyncio

    import torch  # for annotations only: never imported at run time

__all__ = ["from_asyncio", "from_concurrent", "from_torch", "to_asyncio", "to_concurrent"]

T = TypeVar("T")


def to_asyncio(
    future: Future[T] | torch.futures.Future[T], loop: asyncio.AbstractEventLoop | None = None
) -> asyncio.Future[T]:
    """Return an asyncio Future on ``loop`` that completes like ``future``.

    Args:
        future: the thenable Future to follow (or a ``torch.futures.Future``, bridged with
            ``from_torch``).
        loop: the event loop; default the running one (so call this from a coroutine).

    Raises:
        TypeError: ``future`` is not a Future.
        RuntimeError: no loop was given and none is running in this thread.
    """
    return as_future(future, "to_asyncio")._to_asyncio(loop)


def from_asyncio(source: asyncio.Future[T]) -> Future[T]:
    """Return a thenable Future that completes like the asyncio future or task ``source``.

    Safe to call from any thread; the outcome is copied in the loop's thread.

    Raises:
        TypeError: ``source`` is not an asyncio future.
    """
    import asyncio

    if not asyncio.isfuture(source):
        raise TypeError(f"from_asyncio() takes an asyncio Future, got {type_name(source)}")
    target: Future[T] = Future()

    def copy_outcome(done: asyncio.Future[T]) -> None:
        if done.cancelled():
            try:
                done.result()  # raises the CancelledError, with the message given to cancel()
            except asyncio.CancelledError as cancelled:
                _future.complete(target, None, cancelled, cancelled.__traceback__)
            return
        exception = done.exception()
        if exception is not None:
            _future.complete(target, None, exception, exception.__traceback__)
        else:
            _future.complete(target, done.result(), None)

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
            f"from_concurrent() takes a concurrent.futures.Future, got {type_name(source)}"
        )
    target: Future[T] = Future()

    def copy_outcome(done: concurrent.futures.Future[T]) -> None:
        if done.cancelled():
            _future.complete(
                target, None, concurrent.futures.CancelledError("the future was cancelled")
            )
            return
        exception = done.exception()
        if exception is not None:
            _future.complete(target, None, exception, exception.__traceback__)
        else:
            _future.complete(target, done.result(), None)

    source.add_done_callback(copy_outcome)
    return target


def to_concurrent(future: Future[T] | torch.futures.Future[T]) -> concurrent.futures.Future[T]:
    """Return a ``concurrent.futures.Future`` that completes like ``future``.

    The result is already marked running, so it cannot be cancelled; use it with
    ``concurrent.futures.wait`` / ``as_completed`` or code that expects the standard type.
    ``future`` may also be a ``torch.futures.Future`` (bridged with ``from_torch``).

    Raises:
        TypeError: ``future`` is not a Future.
    """
    source = as_future(future, "to_concurrent")
    target: concurrent.futures.Future[T] = concurrent.futures.Future()
    target.set_running_or_notify_cancel()

    def copy_outcome(done: Future[T]) -> None:
        error = _future.exception_of(done)
        if error is not None:
            target.set_exception(error)
        else:
            target.set_result(_future.result_of(done))

    source.add_done_callback(copy_outcome)
    return target


def from_torch(source: torch.futures.Future[T]) -> Future[T]:
    """Return a thenable Future that completes like the ``torch.futures.Future`` ``source``.

    A callback added to ``source`` (``add_done_callback``) copies its outcome, in the thread
    that completes ``source`` (at once if it is done already): the value, or the exception, that
    ``source.wait()`` gives.  The combinators (``collect_all``, ``wait_all``, ``collect_any``,
    ``as_completed``), ``to_asyncio`` and ``to_concurrent`` bridge a torch Future this way by
    themselves.

    Raises:
        TypeError: ``source`` is not a ``torch.futures.Future``.
    """
    if not is_torch_future(source):
        raise TypeError(f"from_torch() takes a torch.futures.Future, got {type_name(source)}")
    target: Future[T] = Future()

    def copy_outcome(done: torch.futures.Future[T]) -> None:
        try:
            value = done.wait()  # done: returns at once (after syncing its CUDA streams, if any)
        # Whatever it failed with is the outcome to copy: raised here, it would only reach
        # torch's callback runner, and the bridge would never complete.
        except BaseException as exc:
            _future.complete(target, None, exc, exc.__traceback__)
        else:
            _future.complete(target, value, None)

    source.add_done_callback(copy_outcome)
    return target


def is_torch_future(value: object) -> TypeGuard[torch.futures.Future[Any]]:
    """Whether ``value`` is a ``torch.futures.Future`` (``torch._C.Future``), without
    importing torch: if it is not loaded, nothing can be one."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    torch_future = getattr(getattr(torch, "_C", None), "Future", None)  # None: half imported
    return isinstance(torch_future, type) and isinstance(value, torch_future)


def as_future(value: object, caller: str) -> Future[Any]:
    """``value`` itself if it is a thenable Future, or its bridge if it is a torch Future.

    Raises:
        TypeError: ``value`` is neither (None: a TypeError that is also a RuntimeError, with
            torch's words "Future can't be None").
    """
    if isinstance(value, Future):
        return value
    if is_torch_future(value):
        return from_torch(value)
    if value is None:
        raise as_runtime_error(TypeError(f"{caller}() takes a Future, got None: {_NONE}"))
    raise TypeError(
        f"{caller}() takes a thenable.Future (or a torch.futures.Future), got {type_name(value)}"
    )


def as_futures(futures: object, caller: str, distinct: bool = False) -> list[Future[Any]]:
    """``futures`` as a list of thenable Futures, each torch Future in it bridged.

    Args:
        futures: the caller's argument, an iterable of Futures.
        caller: the public function's name, for the messages.
        distinct: keep only the first of each future listed more than once.

    Raises:
        TypeError: ``futures`` is a single Future or not iterable, or an item is not a Future
            (None: a TypeError that is also a RuntimeError, with torch's words "Future can't
            be None", as torch raises a RuntimeError there).
    """
    if isinstance(futures, Future) or is_torch_future(futures):
        raise TypeError(f"{caller}() takes a list of Futures, got a single Future; wrap it: [fut]")
    if not isinstance(futures, Iterable):
        raise TypeError(f"{caller}() takes a list of Futures, got {type_name(futures)}")
    items = list(futures)
    bridged = False
    for index, item in enumerate(items):
        if isinstance(item, Future):
            continue
        if not is_torch_future(item):
            raise _not_a_future(caller, index, item)
        bridged = True
    # (Checked first: a bad item must not leave bridges behind on the torch Futures before it.)
    if distinct:
        items = list(dict.fromkeys(items))
    if bridged:
        items = [item if isinstance(item, Future) else from_torch(item) for item in items]
    return items


_NONE = "Future can't be None"  # torch's words for a None where a Future should be


def _not_a_future(caller: str, index: int, item: object) -> TypeError:
    if item is None:
        return as_runtime_error(TypeError(f"{caller}(): item {index} is None: {_NONE}"))
    return TypeError(
        f"{caller}(): item {index} is {type_name(item)}, not a thenable.Future; wrap "
        "concurrent.futures / asyncio futures with thenable.from_concurrent() / "
        "thenable.from_asyncio() first (a torch.futures.Future is bridged by itself)"
    )
