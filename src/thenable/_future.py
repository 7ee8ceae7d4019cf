"""The Future core: one completable value, its callbacks and its waiters.

Theory of operation
-------------------
A ``Future`` is PENDING until ``set_result`` or ``set_exception`` moves it, exactly once, to
FINISHED.  Its state, value, callbacks and waiters are guarded by one small lock per future;
state changes happen under the lock, and callbacks run *after* releasing it, in the thread that
completed the future, in registration order.

Callbacks that complete further futures (a ``then`` chain) would recurse once per link, so the
callback runner is a trampoline: each thread runs callbacks inline up to ``_MAX_INLINE_DEPTH``
nested completions, and queues deeper ones to be run by the outermost runner of that thread.
A chain of a million links therefore uses a bounded stack.  A thread that blocks in ``wait``
first runs whatever its own trampoline still has queued, so deferring never deadlocks a waiter.

Blocking waits park on a private lock per waiter, created only when a wait actually blocks; the
fast paths (already done, no waiters) take one uncontended lock and allocate nothing else.

No code ever holds two futures' locks at once, so the children made by ``then`` share their
parent's lock (a chain allocates one lock, not one a link).  The hot paths take locks with
``acquire``/``try``/``finally`` rather than ``with``: on CPython 3.11 that costs half as much.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeVar

from thenable import _devices
from thenable._errors import as_runtime_error

if TYPE_CHECKING:
    import asyncio

    from thenable._devices import DeviceSpec

__all__ = ["Future", "FutureState"]

T = TypeVar("T")
S = TypeVar("S")

_LOGGER = logging.getLogger("thenable.future")

# Deeper nested completions than this are queued on the thread's trampoline instead of recursing.
_MAX_INLINE_DEPTH = 24


class FutureState(enum.Enum):
    """Where a Future is in its life: PENDING, then FINISHED exactly once."""

    PENDING = "pending"
    FINISHED = "finished"


_PENDING = FutureState.PENDING
_FINISHED = FutureState.FINISHED


class _Trampoline:
    """One thread's callback runner state: how deep it is, and the completions it deferred."""

    __slots__ = ("deferred", "depth")

    def __init__(self) -> None:
        self.depth = 0
        self.deferred: deque[tuple[Future[Any], Any]] = deque()


class _InlineTask(Protocol):
    """What a Future's ``_run_inline`` holds: a queued task that a waiter may run itself."""

    def help(self) -> None:
        """A thread is about to block on the task's Future: run the task there if better."""


class _PerThread(threading.local):
    """This module's per-thread state, one thread-local lookup away."""

    def __init__(self) -> None:
        self.trampoline = _Trampoline()
        # Called before a blocking wait, returning what to call after it: a pool worker grows
        # its pool, an RPC reader hands its connection to a new reader.
        self.on_block: Callable[[], Callable[[], None]] | None = None


_PER_THREAD = _PerThread()


class Future(Generic[T]):
    """The result of an asynchronous computation, completed exactly once.

    A drop-in for ``torch.futures.Future`` that works on any Python value.  Callbacks added with
    ``then`` or ``add_done_callback`` run in registration order, in the thread that completes
    the future; added to a completed future, they run at once in the calling thread.

    Args:
        devices: CUDA devices whose streams the value may use (``torch.futures`` semantics).
            ``None`` or empty for CPU-only values, the default.  Any other entry needs torch
            with CUDA; children made by ``then`` inherit the devices.
    """

    __slots__ = (
        "__weakref__",
        "_callbacks",
        "_devices",
        "_exception",
        "_lock",
        "_result",
        "_run_inline",
        "_state",
        "_then_fn",
        "_traceback",
        "_waiters",
    )

    # Invariant: _state is PENDING until the one completion, which sets _result, _exception and
    # _traceback (unset before); after it, _callbacks and _waiters are None.
    _state: FutureState
    _result: Any
    _exception: BaseException | None
    # The exception's traceback as it was at completion, restored on every re-raise so that
    # repeated waits (or a failure flowing down a long then-chain) do not grow it.
    _traceback: TracebackType | None
    # None, one _Entry, or a list of them (one entry needs no list: fewer objects for the
    # cycle collector to track, which is most of the cost of long then() chains).
    _callbacks: _Entry | list[_Entry] | None
    _waiters: list[Any] | None
    # For a Future made by then(): the callback whose result completes it (set once, by then).
    _then_fn: Callable[[Future[Any]], Any] | None
    # A task that a waiter may run itself instead of blocking (set by the fork pool); see wait().
    _run_inline: _InlineTask | None
    _devices: tuple[Any, ...]

    def __init__(self, *, devices: DeviceSpec = None) -> None:
        self._lock = threading.Lock()
        self._state = _PENDING
        # _result, _exception and _traceback stay unset until completion sets all three:
        # nothing reads them before, and every Future made saves the stores.
        self._callbacks = None
        self._waiters = None
        self._run_inline = None
        self._devices = _devices.normalize(devices) if devices else ()

    # -- inspection ---------------------------------------------------------------------------

    def done(self) -> bool:
        """Return True if this Future holds a result or an exception."""
        return self._state is _FINISHED

    @property
    def state(self) -> FutureState:
        """The current state, PENDING or FINISHED."""
        return self._state

    @property
    def devices(self) -> tuple[Any, ...]:
        """The CUDA devices given at construction (empty for CPU-only futures)."""
        return self._devices

    def __repr__(self) -> str:
        state = self._state
        if state is _PENDING:
            detail = "pending"
        elif self._exception is not None:
            detail = f"failed with {type(self._exception).__name__}: {self._exception}"
        else:
            detail = f"done, result={_short_repr(self._result)}"
        return f"<{type(self).__qualname__} at {id(self):#x} {detail}>"

    def __reduce__(self) -> NoReturn:
        # A TypeError, as pickle raises for what it cannot pickle, and a RuntimeError, as
        # torch raises ("Can not pickle torch.futures.Future").
        raise as_runtime_error(
            TypeError(
                "Can not pickle torch.futures.Future (nor thenable.Future): it is a handle to a "
                "computation in this process. Send its value instead (fut.wait()), or return the "
                "Future from an @rpc.functions.async_execution function to have RPC send its "
                "value when ready."
            )
        )

    # -- completion ---------------------------------------------------------------------------

    def set_result(self, result: T) -> None:
        """Complete this Future with ``result`` and run its callbacks.

        Raises:
            RuntimeError: the Future was already completed ("can only be marked completed once").
        """
        callbacks = self._settle(result, None, None, True)  # (_complete, one call level less)
        if callbacks is not None:
            _run_callbacks(self, callbacks)
            callbacks = None  # see _invoke: frames kept by a traceback must not hold a child

    def set_exception(self, result: BaseException) -> None:
        """Complete this Future with an exception; ``wait()`` and ``value()`` will raise it.

        The parameter is named ``result`` as in torch.futures.

        Raises:
            TypeError: ``result`` is not an Exception instance.
            RuntimeError: the Future was already completed.
        """
        if not isinstance(result, Exception):
            raise TypeError(
                f"set_exception() takes an Exception instance, got {_short_repr(result)} "
                f"of type {type(result).__qualname__}; to fail a future with a message, pass "
                "e.g. RuntimeError('...')"
            )
        self._complete(None, result, result.__traceback__)

    def _complete(
        self,
        result: Any,
        exception: BaseException | None,
        traceback: TracebackType | None = None,
        strict: bool = True,
    ) -> bool:
        """Move to FINISHED once; wake waiters; run callbacks outside the lock.

        Returns whether this call completed the Future; if it was done already, raises
        RuntimeError when ``strict``, else returns False.
        """
        callbacks = self._settle(result, exception, traceback, strict)
        if callbacks is _NOT_SETTLED:
            return False
        if callbacks is not None:
            _run_callbacks(self, callbacks)
            callbacks = None  # see _invoke: frames kept by a traceback must not hold a child
        return True

    def _settle(
        self,
        result: Any,
        exception: BaseException | None,
        traceback: TracebackType | None,
        strict: bool,
    ) -> Any:
        """The completion without running callbacks: move to FINISHED, wake the waiters, and
        return the callbacks to run (None: none), or _NOT_SETTLED if already done and not
        ``strict`` (if ``strict``, raise RuntimeError)."""
        self._lock.acquire()
        try:
            if self._state is not _PENDING:
                if not strict:
                    return _NOT_SETTLED
                raise RuntimeError(
                    f"this Future can only be marked completed once; it is already {self!r}"
                )
            self._result = result
            self._exception = exception
            self._traceback = traceback
            self._state = _FINISHED
            callbacks = self._callbacks
            waiters = self._waiters
            self._callbacks = None
            self._waiters = None
            self._run_inline = None
        finally:
            self._lock.release()
        if waiters is not None:
            for waiter in waiters:
                waiter.release()
        return callbacks

    # -- reading ------------------------------------------------------------------------------

    def value(self) -> T:
        """Return the value of a completed Future, or raise its exception.

        Meant for callbacks and for after ``wait()``; it never blocks.

        Raises:
            RuntimeError: the Future is still pending (call ``wait()`` to block for it).
        """
        if self._state is not _FINISHED:
            raise RuntimeError(
                "value() called on a pending Future: it has no value yet. Call wait() to block "
                "until it completes, or read it in a callback passed to then()."
            )
        if self._exception is None:
            return self._result  # type: ignore[no-any-return]
        try:
            raise self._exception.with_traceback(self._traceback)
        finally:
            self = None  # type: ignore[assignment]  # no cycle through the traceback's frame

    def wait(self, timeout: float | None = None) -> T:
        """Block until this Future completes; return its value or raise its exception.

        Args:
            timeout: seconds to wait at most; ``None`` (default) waits as long as it takes.

        Raises:
            TimeoutError: ``timeout`` passed before the Future completed.
            Exception: whatever the Future was completed with by ``set_exception``.
        """
        if self._state is not _FINISHED:
            self._block(_check_timeout(timeout))
        if self._exception is None:
            return self._result  # type: ignore[no-any-return]
        # The stored traceback is restored on every raise so repeated waits do not grow it; the
        # raise will hold this frame, so drop `self` to leave no cycle keeping the future alive.
        try:
            raise self._exception.with_traceback(self._traceback)
        finally:
            self = None  # type: ignore[assignment]

    def _block(self, timeout: float | None) -> None:
        """Wait for completion, helping first: run this thread's deferred callbacks, and (when
        there is no timeout) the task itself if no worker has started it.  Raises TimeoutError."""
        trampoline = _PER_THREAD.trampoline
        if trampoline.deferred:
            _drain_deferred(trampoline)
        run_inline = self._run_inline
        if run_inline is not None and timeout is None and self._state is _PENDING:
            run_inline.help()  # not under a timeout: the task could take longer than one may wait
        self._lock.acquire()
        try:
            if self._state is _FINISHED:
                return
            waiter = threading.Lock()
            waiter.acquire()
            if self._waiters is None:
                self._waiters = [waiter]
            else:
                self._waiters.append(waiter)
        finally:
            self._lock.release()
        on_block = _PER_THREAD.on_block
        on_unblock = on_block() if on_block is not None else None
        try:
            acquired = waiter.acquire(True, -1 if timeout is None else timeout)
        finally:
            if on_unblock is not None:
                on_unblock()
        if not acquired:
            with self._lock:
                if self._waiters is not None and waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._state is not _FINISHED:
                raise TimeoutError(f"Future did not complete within {timeout} seconds: {self!r}")

    def __await__(self) -> Generator[Any, None, T]:
        """Let asyncio code ``await`` this Future without blocking its event loop."""
        if self._state is not _FINISHED:
            yield from self._to_asyncio(None).__await__()
        return self.value()

    def _to_asyncio(self, loop: asyncio.AbstractEventLoop | None) -> asyncio.Future[T]:
        """An asyncio Future on ``loop`` (default: the running one) that completes like this
        one (``thenable.to_asyncio`` and ``await``); touched only from the loop's thread."""
        import asyncio  # here, not at the top: `import thenable` stays light

        if loop is None:
            loop = asyncio.get_running_loop()
        target: asyncio.Future[T] = loop.create_future()

        def copy_outcome(done: Future[T]) -> None:
            # A closed loop raises RuntimeError: nobody can await the target any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_copy_into_asyncio, done, target)

        self.add_done_callback(copy_outcome)
        return target

    # -- callbacks ----------------------------------------------------------------------------

    def add_done_callback(self, callback: Callable[[Future[T]], object]) -> None:
        """Run ``callback(self)`` once this Future completes (at once if it already has).

        The callback runs in the thread that completes the future, after callbacks added before
        it.  If it raises, the error is logged on the ``thenable.future`` logger and ignored:
        the future's value and the other callbacks are unaffected.  Use ``then`` to get a
        Future for the callback's outcome.

        Raises:
            TypeError: ``callback`` is not callable.
        """
        if not callable(callback):
            raise TypeError(
                "incompatible function arguments: add_done_callback() needs a callable, got "
                f"{_short_repr(callback)}"
            )
        self._register(callback)

    def _register(self, entry: _Entry) -> None:
        """Add a callback entry, or run it now if this Future is already done."""
        self._lock.acquire()
        try:
            if self._state is _PENDING:
                callbacks = self._callbacks
                if callbacks is None:
                    self._callbacks = entry
                elif type(callbacks) is list:
                    callbacks.append(entry)
                else:
                    self._callbacks = [callbacks, entry]  # type: ignore[list-item]
                return
        finally:
            self._lock.release()
        _run_callbacks(self, entry)

    def then(self, callback: Callable[[Future[T]], S]) -> Future[S]:
        """Return a new Future that completes with ``callback(self)`` once this one completes.

        If the callback raises (for example by calling ``wait()`` on this future when it
        failed), the returned Future fails with that exception: its type, message, attributes
        and the callback's traceback intact.  Where torch would fail it with a
        ``RuntimeError`` instead, the exception is also an instance of ``RuntimeError`` (a
        ``ValueError`` raised in the callback is caught by ``except ValueError`` and by
        ``except RuntimeError``; see ``thenable._errors``).  The new Future inherits this
        Future's devices.

        Raises:
            TypeError: ``callback`` is not callable.
        """
        if not callable(callback):
            raise TypeError(
                f"incompatible function arguments: then() needs a callable, got "
                f"{_short_repr(callback)}"
            )
        # The child is built and registered here, not through __init__ and _register: this is
        # the hot path of building every then() chain, and each Python call level costs.
        child: Future[S] = _new_object(Future)
        child._lock = self._lock  # shared along the chain: see the module's docstring
        child._state = _PENDING
        child._callbacks = None
        child._waiters = None
        child._run_inline = None
        child._devices = self._devices
        child._then_fn = callback
        self._lock.acquire()
        try:
            if self._state is _PENDING:
                callbacks = self._callbacks
                if callbacks is None:
                    self._callbacks = child  # the child itself is the entry: see _run_callbacks
                elif type(callbacks) is list:
                    callbacks.append(child)
                else:
                    self._callbacks = [callbacks, child]  # type: ignore[list-item]
                return child
        finally:
            self._lock.release()
        _run_callbacks(self, child)
        return child


_new_object = object.__new__
# What Future._settle returns when the Future was done already (and not strict).
_NOT_SETTLED: Any = object()

# A callback entry: a callable, or a Future made by then(), which completes itself from its
# parent (a Future entry saves allocating a bound method per link of a then() chain).
_Entry = Callable[["Future[Any]"], object] | Future[Any]


def _run_callbacks(future: Future[Any], callbacks: _Entry | list[_Entry]) -> None:
    """Run ``callbacks`` for ``future`` inline, or defer them if this thread is nested too deep.

    A then() child that is its parent's only callback (a link of a chain) is completed here,
    then its own callbacks are taken in turn, in a loop: a chain runs without recursing.
    """
    trampoline = _PER_THREAD.trampoline
    depth = trampoline.depth
    if depth >= _MAX_INLINE_DEPTH:
        trampoline.deferred.append((future, callbacks))
        return
    trampoline.depth = depth + 1
    while type(callbacks) is Future:
        child = callbacks
        fn = child._then_fn
        child._then_fn = None
        try:
            result = fn(future)  # type: ignore[misc]
        except BaseException as exc:
            callbacks = _fail_child(future, child, exc)
        else:
            # (not strict: completed by hand, the child's value stands)
            callbacks = child._settle(result, None, None, False)
        if callbacks is None or callbacks is _NOT_SETTLED:
            break
        future = child
    else:
        if type(callbacks) is list:
            _invoke(future, callbacks)
        else:  # one plain callback: _invoke_one written out
            try:
                callbacks(future)  # type: ignore[operator]
            except BaseException:
                _log_callback_error(callbacks, future)
    trampoline.depth = depth
    # A traceback made in a callback holds this frame: keep nothing alive through it.
    future = child = callbacks = fn = result = None  # type: ignore[assignment]
    if not depth and trampoline.deferred:
        _drain_deferred(trampoline)


def _drain_deferred(trampoline: _Trampoline) -> None:
    """Run the completions this thread deferred, until none are left."""
    deferred = trampoline.deferred
    depth = trampoline.depth
    while deferred:
        future, callbacks = deferred.popleft()
        trampoline.depth = depth + 1
        _invoke(future, callbacks)
        trampoline.depth = depth
    callbacks = None  # see _invoke


def _invoke(future: Future[Any], callbacks: _Entry | list[_Entry]) -> None:
    """Call each entry; a raising callback is logged and the others still run.

    A traceback made in a callback keeps the calling frames, with their locals, alive: the
    frames of this module drop their references to the entries before returning, or a then()
    child failing with that exception would hold itself in a cycle.
    """
    if type(callbacks) is list:
        for entry in callbacks:
            _invoke_one(future, entry)
        callbacks.clear()
    else:
        _invoke_one(future, callbacks)  # type: ignore[arg-type]
        callbacks = None  # type: ignore[assignment]


def _invoke_one(future: Future[Any], entry: _Entry) -> None:
    """Call one entry: a callback (its errors are logged), or complete a then() child."""
    if type(entry) is Future:
        _run_callbacks(future, entry)
    else:
        try:
            entry(future)  # type: ignore[operator]
        except BaseException:
            _log_callback_error(entry, future)
    entry = None  # type: ignore[assignment]  # see _invoke


def _fail_child(future: Future[Any], child: Future[Any], exc: BaseException) -> Any:
    """The callback of the then() ``child`` of ``future`` raised ``exc``: fail the child with it,
    and return the child's callbacks, not yet run (as ``Future._settle`` does)."""
    # A failure merely re-raised from the parent keeps the parent's traceback, so a failure
    # flowing down a long chain does not grow one frame pair per link.
    if exc is future._exception:
        traceback = future._traceback
        exc.with_traceback(traceback)  # drop the re-raise's frames: they hold future
    else:
        traceback = exc.__traceback__
    # torch fails the child with a RuntimeError: the child's exception is also one.
    error = as_runtime_error(exc)
    # Not strict: the user may have completed the child by hand; its value stands then.
    callbacks = child._settle(None, error, traceback, False)
    # Break the cycle exception -> traceback -> this frame -> child -> exception.
    child = future = exc = traceback = error = None  # type: ignore[assignment]
    return callbacks


# -- what thenable's other modules do to a Future beyond its public API (so that this module
# alone reads and writes its fields, and owns their invariants) --------------------------------

complete = Future._complete
"""``complete(future, result, exception, traceback=None, strict=True)``: complete ``future``
(with ``exception`` if it is not None) without the public setters' checks; False if it was
done already and not ``strict``."""
register = Future._register
"""``register(future, entry)``: a done-callback entry (a callable of the future) run in order
with the others, without ``add_done_callback``'s wrapping."""


def exception_of(future: Future[Any]) -> BaseException | None:
    """The exception of a completed ``future``, None if it has a value (without raising)."""
    return future._exception


def result_of(future: Future[T]) -> T:
    """The value of a completed ``future`` that has no exception (without raising)."""
    return future._result  # type: ignore[no-any-return]


def copy_outcome(source: Future[Any], target: Future[Any], strict: bool = True) -> bool:
    """Complete ``target`` like the completed ``source``: its value, or its exception with
    the traceback it had (False: ``target`` was done already and not ``strict``)."""
    return target._complete(source._result, source._exception, source._traceback, strict)


def offer_inline(future: Future[Any], task: _InlineTask | None) -> None:
    """Let a thread about to block on ``future`` run ``task`` itself (None: no longer)."""
    future._run_inline = task


def claim_inline(future: Future[Any]) -> bool:
    """Take the task offered on ``future`` away from waiters: True once, for the first of
    the task's runners (a worker, or a waiter helping)."""
    with future._lock:
        if future._run_inline is None:
            return False
        future._run_inline = None
        return True


def _log_callback_error(callback: object, future: Future[Any]) -> None:
    """An add_done_callback callback raised: log it and carry on with the others."""
    _LOGGER.exception("exception in callback %r of %r (ignored)", callback, future)


def _check_timeout(timeout: float | None) -> float | None:
    """Validate a user timeout in seconds; None means forever."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"timeout must be a number of seconds or None, got {type(timeout).__qualname__}"
        )
    if timeout < 0 or math.isnan(timeout):
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
    return float(timeout)


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic time at which ``timeout`` (validated) runs out, or None for never."""
    timeout = _check_timeout(timeout)
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), or None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _short_repr(value: object, limit: int = 60) -> str:
    """A repr bounded in length, for error messages and __repr__."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__qualname__} with failing repr>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _copy_into_asyncio(source: Future[T], target: asyncio.Future[T]) -> None:
    if target.done():  # cancelled by its awaiter
        return
    exception = source._exception
    if isinstance(exception, StopIteration):
        # asyncio refuses StopIteration (it would end the awaiting coroutine silently); wrap
        # it the way asyncio wraps one escaping from a coroutine.
        wrapped = RuntimeError(f"the thenable Future failed with StopIteration: {exception!r}")
        wrapped.__cause__ = exception
        exception = wrapped
    if exception is not None:
        target.set_exception(exception)
    else:
        target.set_result(source._result)
