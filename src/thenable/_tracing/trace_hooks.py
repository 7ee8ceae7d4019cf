"""The Future and fork instrumentation of a trace, swapped in only while one records.

``install()`` replaces ``Future.then``, ``Future.add_done_callback``, ``Future._block`` and
``InteropPool._submit`` with versions that record spans, and ``uninstall()`` puts the originals
back: outside a trace those hot paths are exactly the untraced code, so tracing that is off
costs them nothing.

Spans: ``fork <fn>`` (the submit, with a flow arrow to the task) and ``task <fn>`` (its run, in
whichever thread ran it; ``queued_us`` says how long it waited), ``then <fn>`` and
``callback <fn>`` (a callback's run), ``wait`` (a thread blocked on a pending Future).
"""

from __future__ import annotations

import itertools
import threading
import types
from collections.abc import Callable
from typing import Any

from thenable._future import Future
from thenable._pool import InteropPool
from thenable._tracing import recorder as _recorder

__all__ = ["install", "installed", "uninstall"]

_plain_then = Future.then
_plain_add_done_callback = Future.add_done_callback
_plain_block = Future._block
_plain_submit = InteropPool._submit
_LOCK = threading.Lock()
_installed = False
_flow_ids = itertools.count(1)
# Flow ids of fork arrows are odd; the RPC layer's are even (see
# thenable.rpc._worker.calls.flow_id).


def installed() -> bool:
    """Whether the traced methods are in place."""
    return _installed


def install() -> None:
    """Swap the traced methods in (idempotent)."""
    global _installed
    with _LOCK:
        if _installed:
            return
        for (cls, name), traced in _TRACED.items():
            setattr(cls, name, traced)
        _installed = True


def uninstall() -> None:
    """Put the original methods back (idempotent)."""
    global _installed
    with _LOCK:
        for (cls, name), original in _ORIGINALS.items():
            setattr(cls, name, original)
        _installed = False


def name_of(fn: object) -> str:
    """A short name for a function in a span: its qualified name, or its type's (a builtin:
    its module and name, as ``torch.add`` rather than ``_VariableFunctionsClass.add``)."""
    if isinstance(fn, types.BuiltinFunctionType) and isinstance(fn.__module__, str):
        return f"{fn.__module__}.{fn.__name__}"
    name = getattr(fn, "__qualname__", None)
    if not isinstance(name, str):
        name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        name = type(fn).__qualname__
    return name


class _Callback:
    """A callback that records a span each time it runs."""

    __slots__ = ("fn", "span")

    def __init__(self, fn: Callable[[Future[Any]], Any], kind: str) -> None:
        self.fn = fn
        self.span = f"{kind} {name_of(fn)}"

    def __call__(self, future: Future[Any]) -> Any:
        if not _recorder.recording:
            return self.fn(future)
        start = _recorder.now()
        try:
            return self.fn(future)
        finally:
            _recorder.complete(self.span, "callback", start)


def _traced_then(self: Future[Any], callback: Callable[[Future[Any]], Any]) -> Future[Any]:
    if not callable(callback):  # (the plain method says so, naming the callback)
        return _plain_then(self, callback)
    return _plain_then(self, _Callback(callback, "then"))


def _traced_add_done_callback(self: Future[Any], callback: Callable[[Future[Any]], Any]) -> None:
    if not callable(callback):
        _plain_add_done_callback(self, callback)
        return
    _plain_add_done_callback(self, _Callback(callback, "callback"))


def _traced_block(self: Future[Any], timeout: float | None) -> None:
    start = _recorder.now()
    try:
        _plain_block(self, timeout)
    finally:
        _recorder.complete("wait", "wait", start)


class _Task:
    """A forked call that records its run as a span, with the arrow from its fork."""

    __slots__ = ("flow_id", "fn", "queued_ns", "span")

    def __init__(self, fn: Callable[..., Any], flow_id: int) -> None:
        self.fn = fn
        self.flow_id = flow_id
        self.span = f"task {name_of(fn)}"
        self.queued_ns = _recorder.now()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = _recorder.flow_in_span("f", self.flow_id, "fork")
        try:
            return self.fn(*args, **kwargs)
        finally:
            queued_us = (start - self.queued_ns) / 1000
            _recorder.complete(self.span, "fork", start, {"queued_us": round(queued_us, 3)})


def _traced_submit(
    self: InteropPool, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Future[Any]:
    if not callable(fn):
        return _plain_submit(self, fn, args, kwargs)
    start = _recorder.now()
    task = _Task(fn, next(_flow_ids) * 2 + 1)
    _recorder.flow("s", task.flow_id, "fork")
    try:
        return _plain_submit(self, task, args, kwargs)
    finally:
        _recorder.complete(f"fork {name_of(fn)}", "fork", start)


# Each swapped method: its untraced original (what uninstall() puts back) and its traced one.
_ORIGINALS: dict[tuple[type, str], Any] = {
    (Future, "then"): _plain_then,
    (Future, "add_done_callback"): _plain_add_done_callback,
    (Future, "_block"): _plain_block,
    (InteropPool, "_submit"): _plain_submit,
}
_TRACED: dict[tuple[type, str], Any] = {
    (Future, "then"): _traced_then,
    (Future, "add_done_callback"): _traced_add_done_callback,
    (Future, "_block"): _traced_block,
    (InteropPool, "_submit"): _traced_submit,
}
