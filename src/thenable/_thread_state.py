"""The forking thread's state, captured cheaply and re-entered around its task.

Theory of operation
-------------------
``torch.jit.fork`` runs its task under the caller's ``at::ThreadLocalState`` (scripted: on
torch's inter-op threads; eager: in the caller itself), so a task forked under
``torch.no_grad()`` makes no graph and one forked under a profiler is recorded.  A fork here
captures, in the forking thread:

* its ``contextvars`` context, always (``_pool`` calls ``contextvars.copy_context()``, O(1): a
  context is an immutable mapping).  The task runs in ``context.run``, as with
  ``asyncio.to_thread`` and trio: it sees the caller's ``ContextVar`` values, and what it sets
  stays in its own copy;
* torch's thread-local state, with ``capture()``: only where torch is imported already
  (thenable never imports it), and only where it differs from a fresh thread's.  ``capture()``
  asks torch five yes/no questions (a C call each, ~40 ns) and returns None when every answer
  is the default's, so the common case carries nothing; otherwise it reads the state into a
  ``TorchState``.

What is carried, read and set through torch's Python bindings: grad mode, inference mode,
autocast (enabled and dtype per device type, and its cache flag), the ``__torch_function__``
mode stack (``torch.device(...)`` as a context manager and ``torch.set_default_device``, which
are thread-local), and the profiler.  Each costs every fork one more question, so the
``__torch_dispatch__`` mode stack and the saved-tensors default hooks, which torch propagates
too and Python can read and set, are left out: they would cost the common case 20% more.

``TorchState.call`` makes the running thread's state the snapshot's, runs the task and puts
the thread's own state back, as torch's ``ThreadLocalStateGuard`` does: a pool worker is left
as it was, and a waiter that runs a task inline (``wait`` on a task no worker has started)
runs it under the forker's state, not its own.  A task forked in the default state runs as it
is where the running thread is in the default state too (``is_default()``, the same questions
less the profiler's): a worker always is, since ``reset()`` undoes what such a task left
changed (``torch.set_grad_enabled(False)`` not undone, say).

The profiler is the exception: its thread-local part (RecordFunction's thread-local callbacks
and the profiler's ``ThreadLocalDebugInfo``) can be neither read nor set from Python in torch
2.13, so no thread of ours can record into a profile started in another thread.  torch's own
inter-op threads can: ``at::launch`` runs a task under the launcher's whole ThreadLocalState.
So a task forked while the forking thread records (``torch.autograd.profiler.profile``,
``torch.profiler.profile``) is handed to ``launch_in_torch``, a one-line TorchScript
``torch.jit.fork`` of a Python function, and runs on torch's inter-op pool, in parallel and
recorded, as a scripted ``torch.jit.fork`` would.  A profiler that records every thread
(``_ExperimentalConfig(profile_all_threads=True)``) records our threads as they are.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "DEFAULT",
    "TorchState",
    "capture",
    "is_default",
    "launch_in_torch",
    "profiling",
    "reset",
]

_LOGGER = logging.getLogger("thenable.pool")


class TorchState:
    """A snapshot of one thread's torch state (see the module docstring for what it holds)."""

    __slots__ = ("autocast", "autocast_cache", "function_modes", "grad", "inference", "profiler")

    def __init__(
        self,
        grad: bool = True,
        inference: bool = False,
        autocast: tuple[tuple[str, Any], ...] = (),
        autocast_cache: bool = True,
        function_modes: tuple[Any, ...] = (),
        profiler: bool = False,
    ) -> None:
        self.grad = grad
        self.inference = inference
        # (device type, dtype) of each device type whose autocast is on.
        self.autocast = autocast
        self.autocast_cache = autocast_cache
        # The __torch_function__ mode stack, bottom first, as torch's getter indexes it.
        self.function_modes = function_modes
        # The thread records into a thread-local profile (only torch's threads can carry it).
        self.profiler = profiler

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in sorted(self.__slots__))
        return f"TorchState({fields})"

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``fn(*args, **kwargs)`` under this state, then put the thread's own back."""
        torch = _torch
        assert torch is not None  # (a TorchState is made only where torch is imported)
        here = DEFAULT if is_default() else torch.read()
        guard = None
        if here.inference != self.inference:
            # Inference mode has no setter, only this guard; it sets grad mode too (to the
            # opposite of inference mode), and on exit puts back all it changed.
            guard = torch.inference_mode_guard(self.inference)
            guard.__enter__()
            here = TorchState(
                not self.inference,
                self.inference,
                here.autocast,
                here.autocast_cache,
                here.function_modes,
                here.profiler,
            )
        try:
            torch.switch(here, self)
            if self.autocast:
                torch.autocast_increment_nesting()
            try:
                return fn(*args, **kwargs)
            finally:
                # As torch.autocast's exit does: the outermost region clears the cast cache.
                if self.autocast and torch.autocast_decrement_nesting() == 0:
                    torch.clear_autocast_cache()
                torch.switch(self if torch.matches(self) else torch.read(), here)
        finally:
            if guard is not None:
                guard.__exit__(None, None, None)


# The state of a thread that never touched torch's: what a task forked in it runs under.
DEFAULT = TorchState()


class _Torch:
    """The bindings of torch that read and set a thread's state, looked up once.

    Raises AttributeError (at construction) where torch is half imported or lacks one.
    """

    def __init__(self, torch: Any) -> None:
        c = torch._C
        self.grad = c.is_grad_enabled
        self.set_grad = c._set_grad_enabled
        self.inference = c.is_inference_mode_enabled
        self.inference_mode_guard = c._InferenceMode
        self.any_autocast = c._is_any_autocast_enabled
        self.autocast_devices = tuple(c._autocast_supported_devices())
        self.is_autocast_enabled = c.is_autocast_enabled
        self.set_autocast_enabled = c.set_autocast_enabled
        self.get_autocast_dtype = c.get_autocast_dtype
        self.set_autocast_dtype = c.set_autocast_dtype
        self.autocast_cache = c.is_autocast_cache_enabled
        self.set_autocast_cache = c.set_autocast_cache_enabled
        self.autocast_increment_nesting = c.autocast_increment_nesting
        self.autocast_decrement_nesting = c.autocast_decrement_nesting
        self.clear_autocast_cache = c.clear_autocast_cache
        self.function_modes = c._len_torch_function_stack
        self.function_mode_at = c._get_function_stack_at
        self.push_function_mode = c._push_on_torch_function_stack
        self.pop_function_mode = c._pop_torch_function_stack
        self.profiler = c._autograd._profiler_enabled

    def read(self) -> TorchState:
        """The calling thread's state (not cheap: callers ask the questions first)."""
        autocast: tuple[tuple[str, Any], ...] = ()
        if self.any_autocast():
            autocast = tuple(
                (device, self.get_autocast_dtype(device))
                for device in self.autocast_devices
                if self.is_autocast_enabled(device)
            )
        depth = self.function_modes()
        modes = tuple(self.function_mode_at(i) for i in range(depth)) if depth else ()
        return TorchState(
            self.grad(), self.inference(), autocast, self.autocast_cache(), modes, self.profiler()
        )

    def matches(self, state: TorchState) -> bool:
        """Whether the calling thread is (as far as the cheap questions tell) in ``state``."""
        return bool(
            self.grad() == state.grad
            and self.inference() == state.inference
            and self.any_autocast() == bool(state.autocast)
            and self.function_modes() == len(state.function_modes)
        )

    def switch(self, here: TorchState, to: TorchState) -> None:
        """Make the calling thread's state ``to``, from ``here`` (all but inference mode: the
        caller enters its guard first)."""
        if here.grad != to.grad:
            self.set_grad(to.grad)
        if here.autocast != to.autocast:
            enabled = dict(to.autocast)
            for device in {device for device, _ in here.autocast} | enabled.keys():
                dtype = enabled.get(device)
                if dtype is not None:
                    self.set_autocast_dtype(device, dtype)
                self.set_autocast_enabled(device, dtype is not None)
        if here.autocast_cache != to.autocast_cache:
            self.set_autocast_cache(to.autocast_cache)
        if here.function_modes != to.function_modes:
            for _ in here.function_modes:
                self.pop_function_mode()
            for mode in to.function_modes:
                self.push_function_mode(mode)


_torch: _Torch | None = None  # set once torch is imported (see _found_torch)


def reset() -> None:
    """Put the calling thread back in the default state: a task forked in the default state
    left it changed, which must not reach the next task the same worker runs.  Inference mode
    excepted: only its guard sets it, so a task cannot leave it on but by entering one by
    hand."""
    torch = _torch
    if torch is None:
        return
    here = torch.read()
    torch.switch(here, TorchState(True, here.inference))
    if here.autocast:
        torch.clear_autocast_cache()


# -- the cheap questions ------------------------------------------------------------------------


def _make_checks(torch: _Torch) -> tuple[Callable[[], bool], Callable[[], TorchState | None]]:
    """``is_default`` and ``capture``, torch's bindings held in closures (the fastest lookup)."""
    grad = torch.grad
    inference = torch.inference
    autocast = torch.any_autocast
    function_modes = torch.function_modes
    profiler = torch.profiler
    read = torch.read

    # The same questions, written out twice: a call less on the fast path of every fork.
    # (is_default leaves the profiler out: no thread can be made to stop recording.)
    def is_default() -> bool:
        return grad() and not inference() and not autocast() and not function_modes()

    def capture() -> TorchState | None:
        if (
            grad()
            and not inference()
            and not autocast()
            and not function_modes()
            and not profiler()
        ):
            return None
        return read()

    return is_default, capture


_modules = sys.modules


def _found_torch() -> bool:
    """Put the real checks in place, torch being imported; whether they are."""
    global _torch, capture, is_default
    try:
        torch = _Torch(_modules["torch"])
    except AttributeError:  # torch is half imported (by another thread): nothing to carry yet
        return False
    is_default, capture = _make_checks(torch)
    _torch = torch
    return True


def _is_default_before_torch() -> bool:
    if "torch" not in _modules or not _found_torch():
        return True
    return is_default()


def _capture_before_torch() -> TorchState | None:
    if "torch" not in _modules or not _found_torch():
        return None
    return capture()


# Module attributes rebound once torch is found, so that each costs one call on the fast path;
# callers look them up as ``_thread_state.capture`` every time.

# Whether the calling thread's torch state is a fresh thread's, the profiler aside (True where
# torch is not imported).
is_default: Callable[[], bool] = _is_default_before_torch

# The calling thread's torch state; None where it is the default (or torch is not imported).
capture: Callable[[], TorchState | None] = _capture_before_torch


def profiling() -> bool:
    """Whether the calling thread records into a torch profile (False without torch)."""
    torch = _torch
    return torch is not None and bool(torch.profiler())


# -- running on torch's inter-op threads, which carry the profiler ------------------------------

_pending: dict[int, Callable[[], object]] = {}
_keys = itertools.count()
_launcher: Callable[[int], object] | None = None
_launcher_lock = threading.Lock()
_launcher_failed = False


def _run_pending(key: int) -> None:
    """Run the task filed under ``key``: torch's inter-op thread calls it, under the launcher's
    thread-local state.  The task catches its own exceptions (into its Future)."""
    _pending.pop(key)()


def _make_launcher() -> Callable[[int], object]:
    """``thenable_fork(key)``: a TorchScript function that forks ``_run_pending(key)``, so that
    torch starts it with ``at::launch``.  (Its name shows in the profile, at the fork.)"""
    torch: Any = sys.modules["torch"]

    def run_pending(key: int) -> None:
        _run_pending(key)

    # TorchScript reads the signature of the Python function it calls; this module's
    # annotations are strings (from __future__ import annotations), which it cannot resolve.
    run_pending.__annotations__ = {"key": int, "return": None}
    unit = torch.jit.CompilationUnit()
    unit.define(
        "def thenable_fork(key: int) -> Future[None]:\n"
        "    return torch.jit.fork(run_pending, key)\n",
        rcb={"torch": torch, "run_pending": torch.jit.ignore(run_pending)}.get,
    )
    launch: Callable[[int], object] = unit.thenable_fork
    return launch


def launch_in_torch(task: Callable[[], object]) -> bool:
    """Start ``task()`` on torch's inter-op pool, under the calling thread's whole
    ThreadLocalState; False (and a warning logged once) where torch cannot."""
    global _launcher, _launcher_failed
    launch = _launcher
    if launch is None:
        if _launcher_failed:
            return False
        with _launcher_lock:
            if _launcher is None and not _launcher_failed:
                try:
                    _launcher = _make_launcher()
                except Exception:
                    _launcher_failed = True
                    _LOGGER.warning(
                        "fork cannot carry torch's profiler state to its task (TorchScript's "
                        "fork is not available): tasks forked under a profiler run on the "
                        "interop pool and their ops are not recorded",
                        exc_info=True,
                    )
                    return False
            launch = _launcher
            if launch is None:
                return False
    key = next(_keys)
    _pending[key] = task
    try:
        launch(key)
    except Exception:
        del _pending[key]
        _LOGGER.warning(
            "torch could not start a forked task; it runs on the interop pool, "
            "its ops not recorded by the profiler",
            exc_info=True,
        )
        return False
    return True
