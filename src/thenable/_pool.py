"""The interop thread pool behind ``fork``/``wait``, and the executor interface it implements.

Theory of operation
-------------------
``submit`` puts a task on a FIFO queue and wakes one parked worker (or starts one while the pool
is below its size).  Each task is offered on its Future (``_future.offer_inline``): whoever
claims it first (``_future.claim_inline``) - a worker that pops the task, or a thread that
``wait``s on the Future before any worker has started it - runs it.  A waiter
runs the task itself when it is a worker of the pool, when no worker is on its way, or when
enough workers are on their way for all unclaimed tasks; otherwise it leaves the task to the
workers, so the waiter does not make one more thread compete for the cores.  So a waiter never
blocks on a task that no thread will run, and nested ``fork``/``wait`` cannot deadlock, even
with one thread.

A worker that blocks in ``Future.wait`` (on anything: a forked task running elsewhere, an RPC
reply, a user's Future) reports it through a thread-local hook; while it is blocked the pool
does not count it, and starts a replacement if work is queued, so blocked tasks never shrink the
capacity to run the others.  Surplus workers retire when they next look for work, which is also
how ``resize`` shrinks the pool.  Queued tasks always run: ``shutdown`` (called at interpreter
exit too, as ``concurrent.futures`` does) refuses new tasks but finishes the queue.

A task runs in the state of the thread that submitted it, whoever runs it (``_thread_state``):
in a copy of its ``contextvars`` context and, where torch is imported and the submitter's torch
state is not the default, under that state, put back afterwards.  A task forked while the
submitter records a torch profile runs on torch's inter-op pool instead, the only threads that
can carry a profiler; it is then outside this pool's counters and queue.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from contextvars import Context, copy_context
from typing import Any, ParamSpec, Protocol, TypeVar

from thenable import _future, _thread_state
from thenable._aio import from_torch, is_torch_future
from thenable._errors import as_runtime_error, type_name
from thenable._future import _PER_THREAD, Future

__all__ = ["InteropPool", "TaskExecutor", "default_pool"]

T = TypeVar("T")
P = ParamSpec("P")

_LOGGER = logging.getLogger("thenable.pool")

# Replacement workers started for blocked ones, at most, beyond the pool's size.
_MAX_EXTRA_WORKERS = 256

# torch's thread state exists only where torch is imported: a lookup in here spares every fork
# the calls to _thread_state where it is not.
_MODULES = sys.modules


class TaskExecutor(Protocol):
    """What ``fork`` needs of an executor: run ``fn(*args, **kwargs)``, returning its Future."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Start ``fn(*args, **kwargs)``; return its Future at once (its errors go there)."""
        ...


class _Task:
    """One queued call, the Future it completes and the submitter's state it runs under; runs
    at most once, by whoever claims it."""

    __slots__ = ("args", "context", "fn", "future", "kwargs", "pool", "torch_state")

    def __init__(
        self,
        pool: InteropPool,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        # None while the task is on torch's inter-op pool (see InteropPool._submit).
        self.pool: InteropPool | None = pool
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.future: Future[Any] | None = Future()
        _future.offer_inline(self.future, self)  # (the task itself: no bound method to allocate)
        self.context: Context = copy_context()
        # None: the default state.
        self.torch_state = _thread_state.capture() if "torch" in _MODULES else None

    def help(self) -> None:
        """A thread is about to block on this task's Future: run it here if that is better."""
        pool = self.pool
        if pool is None:
            # On torch's inter-op pool: only a thread that records too may run it, or the
            # task's ops would be missing from the profile; another waits for torch's thread.
            if self.future is not None and _thread_state.profiling():
                self.run(True)
        elif pool._waiter_should_run_it():
            self.run(True)

    def run(self, here: bool = False) -> None:
        """Claim the task and run it in this thread; return at once if already claimed.

        Args:
            here: the thread is not a worker (a waiter, ``shutdown``): its own torch state may
                differ from the default, which a worker's is, so it is checked.
        """
        future = self.future
        if future is None:
            return
        if not _future.claim_inline(future):
            return
        # Claimed.  Drop every reference the queue could keep alive: the task may sit in the
        # queue until a worker pops it, long after a waiter ran it.
        fn, args, kwargs, pool = self.fn, self.args, self.kwargs, self.pool
        context, state = self.context, self.torch_state
        self.fn = self.args = self.kwargs = self.future = self.pool = None  # type: ignore[assignment]
        self.context = self.torch_state = None  # type: ignore[assignment]
        if pool is not None:
            lock = pool._lock  # (InteropPool._claimed, written out: once a task)
            lock.acquire()
            pool._unclaimed -= 1
            lock.release()
        if state is None and here and "torch" in _MODULES and not _thread_state.is_default():
            state = _thread_state.DEFAULT  # forked in the default state, run where it is not
        try:
            try:
                if state is None:
                    result = context.run(fn, *args, **kwargs) if kwargs else context.run(fn, *args)
                else:
                    result = context.run(state.call, fn, args, kwargs)
            finally:
                # A worker starts each task in the default state: undo what a task left
                # changed, before its Future's callbacks run here.  (state.call puts back the
                # thread's own state itself; a waiter's own state is its business.)
                if (
                    state is None
                    and not here
                    and "torch" in _MODULES
                    and not _thread_state.is_default()
                ):
                    _thread_state.reset()
        except BaseException as exc:
            _future.complete(future, None, exc, exc.__traceback__)
            del exc
        else:
            future.set_result(result)


class InteropPool:
    """A resizable pool of daemon threads that runs submitted calls, each into a Future.

    Args:
        num_threads: worker threads to keep; default ``os.cpu_count()``.
        name: thread name prefix, for debuggers and ``threading.enumerate()``.
    """

    def __init__(self, num_threads: int | None = None, *, name: str = "thenable-interop") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._tasks: deque[_Task] = deque()
        # Invariant (under _lock): every parked worker's lock is in _parked, and it is released
        # exactly once, by whoever pops it.
        self._parked: list[threading.Lock] = []
        self._size = _check_num_threads(num_threads if num_threads is not None else _cpus())
        self._workers = 0  # threads alive
        self._blocked = 0  # of them, blocked in Future.wait
        # Workers released from parking (or just started) that have not looked for work yet,
        # and tasks no thread has claimed: a waiter runs a task itself only when that does
        # not leave more running threads than cores (see _waiter_should_run_it).
        self._waking = 0
        self._unclaimed = 0
        self._started = 0  # threads ever started, for names
        self._closing = False
        self._threads: set[threading.Thread] = set()
        _register_exit(self)

    # -- public -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The number of worker threads the pool keeps (not counting blocked ones)."""
        return self._size

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Queue ``fn(*args, **kwargs)`` and return the Future of its result.

        Never raises for ``fn``'s sake: its exception goes into the Future.  Unlike
        ``concurrent.futures``' executors, the task runs in the calling thread's state, as a
        ``fork`` does (``fork`` is this, on the default pool): in a copy of its ``contextvars``
        context, and under its torch thread state (see ``fork``).

        Raises:
            TypeError: ``fn`` is not callable.
        """
        return self._submit(fn, args, kwargs)

    def _submit(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[T]:
        """submit, with the arguments packed already (fork passes its own: no repacking)."""
        if not callable(fn):
            raise TypeError(f"fork() needs a callable to run, got {type(fn).__qualname__}")
        task = _Task(self, fn, args, kwargs)
        future = task.future
        assert future is not None
        if self._closing:
            _future.offer_inline(future, None)
            _future.complete(
                future,
                None,
                RuntimeError(f"cannot run new tasks: the pool {self._name} is shut down"),
            )
            return future
        state = task.torch_state
        if state is not None and state.profiler:
            # Recording a profile: only torch's inter-op threads can carry the profiler.
            task.pool = None
            if _thread_state.launch_in_torch(task.run):
                return future
            task.pool = self  # torch cannot: run it here, unrecorded (a warning was logged)
        self._tasks.append(task)
        self._lock.acquire()
        try:
            self._unclaimed += 1
            park = self._wake_or_grow_locked()
        finally:
            self._lock.release()
        if park is not None:
            park.release()
        return future

    def resize(self, num_threads: int) -> None:
        """Keep ``num_threads`` workers from now on; queued tasks still run.

        Growing starts threads as work arrives; shrinking lets surplus workers finish their
        current task and retire.

        Raises:
            TypeError, ValueError: ``num_threads`` is not a positive int.
        """
        size = _check_num_threads(num_threads)
        with self._lock:
            self._size = size
            parked = self._unpark_all_locked()
            missing = min(self._unclaimed, size - (self._workers - self._blocked))
            for _ in range(max(0, missing)):
                self._start_worker_locked()
        for park in parked:  # let them re-check: the surplus retire, the rest park again
            park.release()

    def statistics(self) -> dict[str, int]:
        """A snapshot: size, workers alive, blocked in waits, parked idle, tasks queued."""
        with self._lock:
            return {
                "size": self._size,
                "workers": self._workers,
                "blocked": self._blocked,
                "idle": len(self._parked),
                "queued": self._unclaimed,
            }

    # -- internals ----------------------------------------------------------------------------

    def _wake_or_grow_locked(self) -> threading.Lock | None:
        """Get a worker for a new task: a parked one (returned, to release after the lock),
        or a new thread while the pool is below its size; none if the workers already on their
        way will do (waking a thread costs a system call, and a thread more wanting the GIL)."""
        if self._waking >= self._unclaimed:
            return None
        if self._parked:
            self._waking += 1
            return self._parked.pop()
        if self._workers - self._blocked < self._size:
            self._start_worker_locked()
        return None

    def _unpark_all_locked(self) -> list[threading.Lock]:
        parked, self._parked = self._parked, []
        self._waking += len(parked)
        return parked

    def _waiter_should_run_it(self) -> bool:
        """Whether a thread about to block on a queued task should run it itself.

        Yes for this pool's own workers (nested fork/wait: the waiter's core is idle anyway),
        and when no worker is on its way (the pool is busy: nobody else would run it soon).
        Otherwise only if the workers on their way are at least as many as the unclaimed
        tasks, so that running it here does not make one more thread compete for the cores.
        """
        if _PER_THREAD.on_block == self._on_block:
            return True
        self._lock.acquire()
        try:
            return not self._waking or self._unclaimed <= self._waking
        finally:
            self._lock.release()

    def _start_worker_locked(self) -> None:
        if self._workers >= self._size + _MAX_EXTRA_WORKERS:
            return
        self._workers += 1
        self._waking += 1
        self._started += 1
        thread = threading.Thread(
            target=self._work, name=f"{self._name}-{self._started}", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # can't start new thread (resource limits, interpreter exit)
            self._workers -= 1
            self._waking -= 1
            _LOGGER.exception("could not start an interop worker thread")
        else:
            self._threads.add(thread)

    def _work(self) -> None:
        _PER_THREAD.on_block = self._on_block
        park = threading.Lock()
        park.acquire()
        tasks = self._tasks
        with self._lock:
            self._waking -= 1
        while True:
            try:
                task = tasks.popleft()
            except IndexError:
                pass
            else:
                task.run()
                del task
                if self._workers - self._blocked <= self._size:
                    continue
            with self._lock:
                if self._workers - self._blocked > self._size or (self._closing and not tasks):
                    self._workers -= 1
                    self._threads.discard(threading.current_thread())
                    return
                if tasks:
                    continue
                self._parked.append(park)
            park.acquire()
            with self._lock:
                self._waking -= 1

    def _on_block(self) -> Callable[[], None]:
        """A worker is about to block: run queued work on another thread meanwhile."""
        with self._lock:
            self._blocked += 1
            park = self._wake_or_grow_locked() if self._unclaimed else None
        if park is not None:
            park.release()
        return self._on_unblock

    def _on_unblock(self) -> None:
        with self._lock:
            self._blocked -= 1

    def shutdown(self, wait: bool = True) -> None:
        """Refuse new tasks (their Futures fail); queued tasks still run.

        Args:
            wait: run queued tasks in this thread too, and return once every task is done.
        """
        with self._lock:
            self._closing = True
            parked = self._unpark_all_locked()
        for park in parked:
            park.release()
        if not wait:
            return
        while True:
            try:
                task = self._tasks.popleft()
            except IndexError:
                break
            task.run(True)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()


def _check_num_threads(num_threads: object) -> int:
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(
            f"the number of interop threads must be an int, got {type(num_threads).__qualname__}"
        )
    if num_threads < 1:
        raise ValueError(f"the number of interop threads must be >= 1, got {num_threads}")
    return num_threads


def _cpus() -> int:
    return os.cpu_count() or 1


def _register_exit(pool: InteropPool) -> None:
    """Have ``pool`` finish its queue at interpreter exit, before daemon threads are dropped."""
    pool_ref = weakref.ref(pool)

    def finish() -> None:
        alive = pool_ref()
        if alive is not None:
            alive.shutdown(wait=True)

    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - every CPython we support has it
        import atexit

        atexit.register(finish)
    else:
        register(finish)


_DEFAULT_POOL: InteropPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()


def default_pool() -> InteropPool:
    """The process-wide pool behind ``fork``, made on first use."""
    pool = _DEFAULT_POOL
    if pool is None:
        with _DEFAULT_POOL_LOCK:
            pool = _DEFAULT_POOL
            if pool is None:
                pool = _set_default_pool(InteropPool())
    return pool


def _set_default_pool(pool: InteropPool) -> InteropPool:
    global _DEFAULT_POOL
    _DEFAULT_POOL = pool
    return pool


def set_num_interop_threads(num_threads: int) -> None:
    """Set how many threads run forked tasks; works at any time, unlike in torch.

    Raises:
        TypeError, ValueError: ``num_threads`` is not a positive int.
    """
    size = _check_num_threads(num_threads)
    with _DEFAULT_POOL_LOCK:
        pool = _DEFAULT_POOL
        if pool is None:
            _set_default_pool(InteropPool(size))
            return
    pool.resize(size)


def get_num_interop_threads() -> int:
    """The number of threads that run forked tasks (default: the number of CPUs)."""
    return default_pool().size


def fork(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Start ``func(*args, **kwargs)`` on the interop pool and return its Future at once.

    Unlike ``torch.jit.fork`` in eager mode, the call really runs in parallel (for code that
    releases the GIL: I/O, sleeps, numpy and torch ops).  Its exception goes into the Future,
    never out of ``fork``.  ``func`` may be any callable, an ``nn.Module`` included.

    Like ``torch.jit.fork``, the task runs under the state the forking thread had at the fork,
    whichever thread runs it (a worker, or a ``wait`` that runs it inline), and leaves that
    thread's own state as it was: in a copy of the forker's ``contextvars`` context (as
    ``asyncio.to_thread`` does: the task sees the forker's values, and what it sets stays in
    the task) and, where torch is imported, under the forker's grad mode, inference mode,
    autocast and ``__torch_function__`` modes (``torch.device(...)``, ``set_default_device``).
    A task forked while a torch profiler records in the forking thread runs on torch's
    inter-op threads instead, the only ones that can carry a profiler, so that its ops are
    recorded.  Not carried: ``__torch_dispatch__`` modes and saved-tensors hooks.

    Raises:
        TypeError: ``func`` is not callable.
    """
    pool = _DEFAULT_POOL
    if pool is None:
        pool = default_pool()
    return pool._submit(func, args, kwargs)


def wait(future: Future[T]) -> T:
    """Return the result of a forked task, running it in this thread if no worker has started it.

    A ``torch.futures.Future`` (what ``torch.jit.wait`` takes) is waited for too.

    Raises:
        TypeError: ``future`` is not a Future (also a ``RuntimeError``, which torch raises for
            ``torch.jit.wait(None)``: "Future can't be None").
        Exception: the task's own exception.
    """
    if not isinstance(future, Future):
        if is_torch_future(future):
            return from_torch(future).wait()
        prefix = "Future can't be None: " if future is None else ""
        raise as_runtime_error(
            TypeError(
                f"{prefix}wait() takes the Future returned by fork(), got {type_name(future)}"
            )
        )
    return future.wait()
