"""Combinators over many futures: collect_all, wait_all, collect_any, as_completed.

Each takes thenable Futures and ``torch.futures.Future`` objects: a torch one is bridged
(``thenable.from_torch``), and its bridge stands in its place in what is returned.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from thenable import _future
from thenable._aio import as_futures
from thenable._future import Future, deadline_after, remaining

if TYPE_CHECKING:
    import torch  # for annotations only: never imported at run time

__all__ = ["as_completed", "collect_all", "collect_any", "wait_all"]

T = TypeVar("T")


class _Countdown:
    """Completes ``target`` with ``futures`` when the last of them is done."""

    __slots__ = ("done", "futures", "last", "target")

    def __init__(self, futures: list[Future[Any]], target: Future[list[Future[Any]]]) -> None:
        self.futures = futures
        self.target = target
        self.last = len(futures) - 1
        # next() on a count is atomic (it never releases the GIL, and is thread-safe in the
        # free-threaded build), so exactly one callback sees the last number: no lock needed.
        self.done = itertools.count()

    def on_done(self, _: Future[Any]) -> None:
        if next(self.done) == self.last:
            self.target.set_result(self.futures)


def collect_all(futures: Iterable[Future[T] | torch.futures.Future[T]]) -> Future[list[Future[T]]]:
    """Return a Future that completes, with the same list of futures, once all have completed.

    It completes successfully even if some sub-futures failed: inspect each one, or use
    ``wait_all`` to raise the first failure.  An empty list gives an already-completed Future.
    A ``torch.futures.Future`` in the list is there as its thenable bridge (``from_torch``).

    Raises:
        TypeError: ``futures`` is not a list of Futures (a None in it: also a RuntimeError,
            "Future can't be None", as torch raises).
    """
    items = as_futures(futures, "collect_all")
    combined: Future[list[Future[T]]] = Future()
    if not items:
        combined.set_result(items)
        return combined
    on_done = _Countdown(items, combined).on_done
    for future in items:
        _future.register(future, on_done)
    return combined


class _AllOrFirstError:
    """Completes ``target`` with every value, or with the first failure as soon as it happens."""

    __slots__ = ("done", "futures", "last", "target")

    def __init__(self, futures: list[Future[Any]], target: Future[list[Any]]) -> None:
        self.futures = futures
        self.target = target
        self.last = len(futures) - 1
        self.done = itertools.count()  # atomic, as in _Countdown

    def on_done(self, future: Future[Any]) -> None:
        if _future.exception_of(future) is not None:
            _future.copy_outcome(future, self.target, strict=False)
        elif next(self.done) == self.last:
            _future.complete(
                self.target, [_future.result_of(f) for f in self.futures], None, strict=False
            )


def wait_all(
    futures: Iterable[Future[T] | torch.futures.Future[T]], timeout: float | None = None
) -> list[T]:
    """Block until every future completes and return their values, in order.

    As the torch.futures documentation promises, this exits as soon as any future fails,
    raising that failure without waiting for the others.

    Args:
        futures: the futures to wait for; an empty list returns ``[]`` at once.
        timeout: seconds to wait at most (thenable extension); ``None`` waits forever.

    Raises:
        TypeError: ``futures`` is not a list of Futures (a None in it: also a RuntimeError,
            "Future can't be None", as torch raises).
        TimeoutError: ``timeout`` passed first.
        Exception: the first failure among the futures.
    """
    items = as_futures(futures, "wait_all")
    if not items:
        return []
    combined: Future[list[T]] = Future()
    on_done = _AllOrFirstError(items, combined).on_done
    for future in items:
        _future.register(future, on_done)
        if combined.done():
            break  # failed early: the rest need not be watched
    return combined.wait(timeout)


class _FirstDone:
    """Completes ``target`` with the first sub-future that completes."""

    __slots__ = ("target",)

    def __init__(self, target: Future[Future[Any]]) -> None:
        self.target = target

    def on_done(self, future: Future[Any]) -> None:
        _future.complete(self.target, future, None, strict=False)


def collect_any(futures: Iterable[Future[T] | torch.futures.Future[T]]) -> Future[Future[T]]:
    """Return a Future that completes with the first of ``futures`` to complete.

    Its value is that sub-future itself (done, successfully or not), so the caller can tell
    which one finished and read its value or exception.  thenable extension; torch has none.

    Raises:
        TypeError: ``futures`` is not a list of Futures (a None in it: also a RuntimeError,
            "Future can't be None", as torch raises).
        ValueError: ``futures`` is empty (no future could ever complete the result).
    """
    items = as_futures(futures, "collect_any")
    if not items:
        raise ValueError("collect_any() needs at least one Future; the list is empty")
    first: Future[Future[T]] = Future()
    on_done = _FirstDone(first).on_done
    for future in items:
        _future.register(future, on_done)
        if first.done():
            break
    return first


def as_completed(
    futures: Iterable[Future[T] | torch.futures.Future[T]], timeout: float | None = None
) -> Iterator[Future[T]]:
    """Yield each distinct future of ``futures`` as it completes, already-done ones first.

    Like ``concurrent.futures.as_completed``; a future listed twice is yielded once.

    Args:
        futures: the futures to watch.
        timeout: seconds, from this call, for all of them to complete; ``None`` waits forever.

    Raises:
        TypeError: ``futures`` is not a list of Futures (a None in it: also a RuntimeError,
            "Future can't be None", as torch raises).
        TimeoutError: (from ``next()``) ``timeout`` passed before every future completed.
    """
    items = as_futures(futures, "as_completed", distinct=True)
    deadline = deadline_after(timeout)
    return _as_completed(items, deadline)


def _as_completed(items: list[Future[T]], deadline: float | None) -> Iterator[Future[T]]:
    finished: queue.SimpleQueue[Future[T]] = queue.SimpleQueue()
    for future in items:
        future.add_done_callback(finished.put)
    for left in range(len(items), 0, -1):
        try:
            yield finished.get(timeout=remaining(deadline))
        except queue.Empty:
            raise TimeoutError(
                f"as_completed(): {left} of {len(items)} futures still pending after the timeout"
            ) from None
