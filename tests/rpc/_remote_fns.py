"""What the RPC test workers run: commands (sent by the parent through the harness) and the
functions and classes they call on each other through thenable.rpc.

Everything here is module-level so that it pickles by reference.  The module imports only the
standard library, thenable and the harness: numpy and torch are imported inside the functions
that need them, so workers of the lightweight scenarios (the 32-worker test) never load them.

Conventions: workers are named ``worker{rank}``; commands whose name starts with ``check_`` run
on worker0, make calls, and return what they observed (values, ``Failure``s) for the parent to
assert on.
"""

from __future__ import annotations

import gc
import importlib
import importlib.abc
import importlib.machinery
import operator
import os
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import _harness
from _harness import Failure, failure_of, join_thenable_threads

import thenable.futures
from thenable import rpc
from thenable.rpc._worker import agent as _agent

# Bound on any wait inside a worker (gates, conditions); far beyond what a test needs.
WAIT_S = 30.0
# Bound on round trips spent polling for something that happens in the background.
POLL_ROUND_TRIPS = 500


# -- commands: lifecycle ------------------------------------------------------------------------


def init_worker(
    rank: int,
    world_size: int,
    port: int,
    *,
    name: str | None = None,
    rpc_timeout: float = 30.0,
    num_worker_threads: int = 16,
    auth_key: bytes | str | None = None,
    env: dict[str, str] | None = None,
    same_host_ipc: bool = True,
) -> None:
    """init_rpc as ``worker{rank}`` (or ``name``), rank 0 at tcp://127.0.0.1:port."""
    if env:
        os.environ.update(env)
    rpc.init_rpc(
        name if name is not None else f"worker{rank}",
        rank=rank,
        world_size=world_size,
        rpc_backend_options=rpc.RpcBackendOptions(
            init_method=f"tcp://127.0.0.1:{port}",
            rpc_timeout=rpc_timeout,
            num_worker_threads=num_worker_threads,
            auth_key=auth_key,
            same_host_ipc=same_host_ipc,
        ),
    )


def init_failure(
    rank: int, world_size: int, port: int, *, name: str | None = None, rpc_timeout: float
) -> tuple[Failure, float, bool, list[str]]:
    """init_rpc that must fail: (its Failure, seconds it took, RPC cleared afterwards, thenable
    threads still alive after a bounded join)."""
    start = time.monotonic()
    failure = failure_of(init_worker, rank, world_size, port, name=name, rpc_timeout=rpc_timeout)
    elapsed = time.monotonic() - start
    return failure, elapsed, _agent.current_agent() is None, join_thenable_threads(5.0)


def init_from_env() -> tuple[str, int]:
    """init_rpc with rank, world size and master address from the environment only."""
    rpc.init_rpc(f"worker{os.environ['RANK']}")
    me = rpc.get_worker_info()
    return me.name, me.id


def shutdown_worker(graceful: bool = True, timeout: float = 0) -> None:
    rpc.shutdown(graceful=graceful, timeout=timeout)


def shutdown_if_running(timeout: float = 20.0) -> None:
    """Graceful shutdown (bounded), unless a test has shut this worker down already."""
    if _agent.current_agent() is not None:
        rpc.shutdown(timeout=timeout)


def listener_address() -> tuple[str, int]:
    address = _agent.require_agent().listener.address
    assert isinstance(address, tuple)
    host, port = address
    return str(host), int(port)


def thenable_threads_left() -> list[str]:
    """Names of thenable threads still alive after joining them for up to 5 s."""
    return join_thenable_threads(5.0)


def loaded_modules(*names: str) -> list[str]:
    """Which of ``names`` this worker has imported."""
    return [name for name in names if name in sys.modules]


def module_file(name: str) -> str:
    return str(getattr(sys.modules[name], "__file__", ""))


def roundtrip(to: str, value: int = 1) -> int:
    """One rpc_sync from this worker to ``to``: add(value, 1) there."""
    return int(rpc.rpc_sync(to, operator.add, args=(value, 1)))


# Calls started by one command and finished by another, so the parent can act in between.
_STARTED: dict[str, tuple[thenable.futures.Future[Any], float]] = {}


def start_call(
    key: str, to: str, fn: Any, args: tuple[Any, ...] = (), timeout: float = -1.0
) -> None:
    """rpc_async(to, fn, args, timeout=timeout), kept under ``key`` for ``finish_call``."""
    _STARTED[key] = (rpc.rpc_async(to, fn, args=args, timeout=timeout), time.monotonic())


def call_done(key: str) -> bool:
    return _STARTED[key][0].done()


def finish_call(key: str, wait: float = WAIT_S) -> tuple[Any, float]:
    """Wait (at most ``wait`` s) for a started call: (its value or Failure, seconds since it
    started)."""
    future, start = _STARTED.pop(key)
    try:
        outcome: Any = future.wait(wait)
    except Exception as exc:
        outcome = Failure.of(exc)
    return outcome, time.monotonic() - start


# -- functions called through RPC ---------------------------------------------------------------


def add(a: Any, b: Any) -> Any:
    return a + b


def noop() -> None:
    return None


def whoami() -> str:
    return rpc.get_worker_info().name


def echo(*args: Any) -> tuple[Any, ...]:
    return args


def describe_call(*args: Any, **kwargs: Any) -> tuple[str, tuple[Any, ...], list[Any]]:
    """(this worker's name, args, sorted kwargs items)."""
    return rpc.get_worker_info().name, args, sorted(kwargs.items())


class CustomError(Exception):
    """An exception with several args and custom attributes."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code
        self.detail = {"where": "remote", "codes": [code, code + 1]}


class UnpicklableError(Exception):
    """Cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArgError(Exception):
    """Pickles, but cannot be unpickled: its args do not fit its __init__."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_custom(message: str, code: int) -> None:
    raise CustomError(message, code)


def raise_unpicklable(message: str) -> None:
    raise UnpicklableError(message)


def raise_two_arg(a: str, b: str) -> None:
    raise TwoArgError(a, b)


def return_lock() -> threading.Lock:
    return threading.Lock()


def pending_calls() -> int:
    return _agent.require_agent().pending_count()


# Gates: handlers that block until a test opens them (always with a bound).
_GATES: dict[str, threading.Event] = {}
_GATES_LOCK = threading.Lock()


def _gate(tag: str) -> threading.Event:
    with _GATES_LOCK:
        return _GATES.setdefault(tag, threading.Event())


def wait_for_gate(tag: str, value: Any = None, timeout: float = WAIT_S) -> Any:
    """Block until ``open_gate(tag)``; return ``value``."""
    if not _gate(tag).wait(timeout):
        raise TimeoutError(f"gate {tag!r} was not opened within {timeout} s")
    return value


def open_gate(tag: str) -> None:
    _gate(tag).set()


def signal_and_wait_for_gate(tag: str, timeout: float = WAIT_S) -> str:
    """Tell the parent (signal ``tag``) that this handler runs, then wait for the gate."""
    _harness.signal(tag)
    wait_for_gate(tag, timeout=timeout)
    return tag


# -- arrays and tensors -------------------------------------------------------------------------


def describe_arrays(a: Any, b: Any) -> dict[str, Any]:
    """How two numpy arrays arrived: values, layout, and whether they share memory."""
    import numpy as np

    return {
        "a": a.tolist(),
        "b": b.tolist(),
        "dtype": str(a.dtype),
        "a_strides": a.strides,
        "a_contiguous": bool(a.flags.c_contiguous),
        "shares_memory": bool(np.shares_memory(a, b)),
        "writable": bool(a.flags.writeable and b.flags.writeable),
    }


def describe_tensors(a: Any, b: Any) -> dict[str, Any]:
    """How two torch tensors arrived: values, layout, and whether they share storage."""
    return {
        "a": a.tolist(),
        "b": b.tolist(),
        "dtype": str(a.dtype),
        "a_stride": tuple(a.stride()),
        "a_contiguous": bool(a.is_contiguous()),
        "same_storage": a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr(),
    }


# -- commands: the API checks (worker0 of a 3-worker group) -------------------------------------


def check_destinations() -> dict[str, Any]:
    """rpc_sync / rpc_async / remote with ``to`` as name, rank and WorkerInfo; kwargs."""
    info = rpc.get_worker_info("worker1")
    out: dict[str, Any] = {}
    for label, to in (("name", "worker1"), ("rank", 1), ("info", info)):
        out[f"sync-{label}"] = rpc.rpc_sync(to, describe_call, args=(1, 2), kwargs={"k": "v"})
        out[f"async-{label}"] = rpc.rpc_async(
            to, describe_call, args=[3], kwargs={"x": 1, "y": 2}
        ).wait(WAIT_S)
        rref = rpc.remote(to, describe_call, args=(4,), kwargs={"z": None})
        out[f"remote-{label}"] = rref.to_here()
    out["to-worker2-by-rank"] = rpc.rpc_sync(2, whoami)
    out["to-self-by-name"] = rpc.rpc_sync("worker0", whoami)
    out["to-self-by-rank"] = rpc.rpc_async(0, add, args=(20, 22)).wait(WAIT_S)
    out["kwargs-only"] = rpc.rpc_sync("worker1", add, kwargs={"a": 40, "b": 2})
    return out


def check_worker_info() -> dict[str, Any]:
    me = rpc.get_worker_info()
    other = rpc.get_worker_info("worker1")
    return {
        "me": (type(me).__name__, me.name, me.id),
        "other": (type(other).__name__, other.name, other.id),
        "is_workerinfo": isinstance(me, rpc.WorkerInfo) and isinstance(other, rpc.WorkerInfo),
        "equal_to_tuple": other == rpc.WorkerInfo("worker1", 1),
        "unknown": failure_of(rpc.get_worker_info, "worker9"),
        "remote_view": rpc.rpc_sync("worker2", _worker_info_there),
    }


def _worker_info_there() -> tuple[str, int, str, int]:
    me, first = rpc.get_worker_info(), rpc.get_worker_info("worker0")
    return me.name, me.id, first.name, first.id


def check_remote_exceptions() -> dict[str, Failure]:
    """Exceptions raised remotely, as the caller sees them."""
    return {
        "custom-sync": failure_of(rpc.rpc_sync, "worker1", raise_custom, args=("bad thing", 7)),
        "custom-async": failure_of(
            rpc.rpc_async("worker1", raise_custom, args=("async bad", 8)).wait, WAIT_S
        ),
        "custom-remote": failure_of(
            rpc.remote("worker1", raise_custom, args=("remote bad", 9)).to_here
        ),
        "builtin": failure_of(rpc.rpc_sync, "worker2", operator.truediv, args=(1, 0)),
        "unpicklable": failure_of(
            rpc.rpc_sync, "worker1", raise_unpicklable, args=("cannot travel",)
        ),
        "unloadable": failure_of(rpc.rpc_sync, "worker1", raise_two_arg, args=("p", "q")),
    }


def check_unpicklable_arguments() -> dict[str, Any]:
    """Unpicklable arguments fail at once in the caller; the worker keeps serving."""
    lock = threading.Lock()
    out: dict[str, Any] = {}
    out["lambda-async"] = failure_of(rpc.rpc_async, "worker1", echo, args=(lambda: 1,))
    out["lock-sync"] = failure_of(rpc.rpc_sync, "worker1", echo, args=(lock,))
    out["lock-kwargs"] = failure_of(rpc.rpc_async, "worker1", describe_call, kwargs={"k": lock})
    out["lock-remote"] = failure_of(rpc.remote, "worker1", echo, args=(lock,))
    out["lambda-func"] = failure_of(rpc.rpc_sync, "worker1", lambda: 1)
    out["pending-after"] = pending_calls()
    out["next-call"] = rpc.rpc_sync("worker1", add, args=(1, 2))
    return out


def check_unpicklable_return() -> dict[str, Any]:
    """An unpicklable return value fails the call; the worker keeps serving."""
    return {
        "sync": failure_of(rpc.rpc_sync, "worker1", return_lock),
        "async": failure_of(rpc.rpc_async("worker1", return_lock).wait, WAIT_S),
        "next-call": rpc.rpc_sync("worker1", add, args=(2, 3)),
        "worker1-pending": rpc.rpc_sync("worker1", pending_calls),
    }


def check_unknown_destination() -> dict[str, Any]:
    start = time.monotonic()
    out: dict[str, Any] = {
        "sync": failure_of(rpc.rpc_sync, "worker9", add, args=(1, 2)),
        "async": failure_of(rpc.rpc_async, "nobody", add, args=(1, 2)),
        "remote": failure_of(rpc.remote, "worker9", add, args=(1, 2)),
        "rank": failure_of(rpc.rpc_sync, 9, add, args=(1, 2)),
        # Neither a name, a rank nor a WorkerInfo (torch's test_send_to_rank: rank + 0.5).
        "float-sync": failure_of(rpc.rpc_sync, 1.0, add, args=(1, 2)),
        "float-async": failure_of(rpc.rpc_async, 1.5, add, args=(1, 2)),
        "float-remote": failure_of(rpc.remote, 0.5, add, args=(1, 2)),
        "bytes": failure_of(rpc.rpc_sync, b"worker1", add, args=(1, 2)),
        "none": failure_of(rpc.rpc_sync, None, add, args=(1, 2)),
        "stats": failure_of(rpc.get_stats, 1.0),
    }
    out["seconds"] = time.monotonic() - start
    return out


def check_timeout(seconds: float) -> dict[str, Any]:
    """A call to a handler that blocks longer than ``timeout=`` fails with TimeoutError."""
    start = time.monotonic()
    failure = failure_of(
        rpc.rpc_sync, "worker1", wait_for_gate, args=("timeout", "late"), timeout=seconds
    )
    elapsed = time.monotonic() - start
    rpc.rpc_sync("worker1", open_gate, args=("timeout",))  # let the handler finish
    return {"failure": failure, "elapsed": elapsed, "next": rpc.rpc_sync("worker1", whoami)}


def check_arrays() -> dict[str, Any]:
    """numpy arrays: a non-contiguous view and two views of one buffer, both ways."""
    import numpy as np

    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    strided = base[:, ::2]  # non-contiguous
    other = base[1]  # shares memory with strided
    there = rpc.rpc_sync("worker1", describe_arrays, args=(strided, other))
    back_a, back_b = rpc.rpc_sync("worker1", echo, args=(strided, other))
    before = back_b.tolist()
    back_a[1, 0] = -1.0  # base[1, 0]: is back_b[0] too, if they share memory as sent
    return {
        "there": there,
        "expected_a": strided.tolist(),
        "expected_b": other.tolist(),
        "back_a": back_a.tolist(),
        "back_b_before": before,
        "back_b_after": back_b.tolist(),
        "back_shares": bool(np.shares_memory(back_a, back_b)),
        "back_dtype": str(back_a.dtype),
        "back_strides": back_a.strides,
        "sent_strides": strided.strides,
        "sender_unchanged": float(base[1, 0]),
    }


def check_tensors() -> dict[str, Any]:
    """torch tensors: a non-contiguous view and two views of one storage, both ways."""
    import torch

    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    transposed = base.t()  # non-contiguous
    row = base[1]  # shares storage with transposed
    there = rpc.rpc_sync("worker1", describe_tensors, args=(transposed, row))
    back_t, back_row = rpc.rpc_sync("worker1", echo, args=(transposed, row))
    back_equal = bool(torch.equal(back_t, transposed))
    back_t[0, 1] = -5.0  # base[1, 0] == row[0] if the storage is shared as sent
    return {
        "there": there,
        "expected_t": transposed.tolist(),
        "expected_row": row.tolist(),
        "sent_stride": tuple(transposed.stride()),
        "back_stride": tuple(back_t.stride()),
        "back_equal": back_equal,
        "back_row_after": back_row.tolist(),
        "back_same_storage": (
            back_t.untyped_storage().data_ptr() == back_row.untyped_storage().data_ptr()
        ),
        "sender_unchanged": float(base[1, 0]),
    }


def _attempt(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn's value, or its Failure."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return Failure.of(exc)


def make_and_drop_rref(owner: str) -> int:
    """Create a Counter on ``owner``, fetch it, and drop the (only) reference to it."""
    rref = rpc.remote(owner, Counter, args=(1,))
    return int(rref.to_here().value)


class _PausedLoader(importlib.abc.Loader):
    """Wraps a module's real loader: executing the module waits for ``resume`` first, so the
    module sits in sys.modules partially initialized (as during any slow import)."""

    def __init__(self, loader: Any, reached: threading.Event, resume: threading.Event) -> None:
        self._loader = loader
        self._reached = reached
        self._resume = resume

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._reached.set()
        if not self._resume.wait(WAIT_S):
            raise TimeoutError("the paused import was never resumed")
        self._loader.exec_module(module)


class _PausingFinder(importlib.abc.MetaPathFinder):
    """Finds ``name`` as usual, but with a _PausedLoader."""

    def __init__(self, name: str, reached: threading.Event, resume: threading.Event) -> None:
        self._name = name
        self._reached = reached
        self._resume = resume

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PausedLoader(spec.loader, self._reached, self._resume)
        return spec


def check_calls_during_a_slow_import(module: str) -> dict[str, Any]:
    """RPC calls and RRef releases while another thread is importing ``module`` (numpy): the
    module is in sys.modules but partially initialized.  Must run before anything imported it."""
    out: dict[str, Any] = {"imported_before": module in sys.modules}
    reached, resume = threading.Event(), threading.Event()
    finder = _PausingFinder(module, reached, resume)
    held = rpc.remote("worker1", Counter, args=(4,))
    out["held"] = held.to_here().value
    sys.meta_path.insert(0, finder)
    importer = threading.Thread(target=importlib.import_module, args=(module,), name="importer")
    try:
        importer.start()
        out["paused"] = reached.wait(WAIT_S)
        out["partially_imported"] = module in sys.modules
        out["call"] = _attempt(rpc.rpc_sync, "worker1", add, args=(1, 2))
        out["to_here"] = _attempt(make_and_drop_rref, "worker1")
        del held  # made before the import: its release is sent during it
        gc.collect()
        # The release must reach the owner (and the releaser thread survive).
        out["flush"] = _attempt(_agent.require_agent().rrefs.flush, 5.0)
    finally:
        resume.set()
        importer.join(WAIT_S)
        sys.meta_path.remove(finder)
    out["importer_alive"] = importer.is_alive()
    out["imported_after"] = hasattr(sys.modules.get(module), "__version__")
    out["call_after"] = rpc.rpc_sync("worker1", add, args=(2, 3))
    return out


# -- async_execution (the examples' patterns, without torch) ------------------------------------


@rpc.functions.async_execution
def async_add_chained(to: str, x: Any, y: Any, z: Any) -> thenable.futures.Future[Any]:
    return rpc.rpc_async(to, operator.add, args=(x, y)).then(lambda fut: fut.wait() + z)


class AsyncExecutionClass:
    @staticmethod
    @rpc.functions.async_execution
    def static_async_add(to: str, x: Any, y: Any, z: Any) -> thenable.futures.Future[Any]:
        return rpc.rpc_async(to, operator.add, args=(x, y)).then(lambda fut: fut.wait() + z)

    @classmethod
    @rpc.functions.async_execution
    def class_async_add(cls, to: str, x: Any, y: Any, z: Any) -> thenable.futures.Future[Any]:
        ret_fut: thenable.futures.Future[Any] = thenable.futures.Future()
        rpc.rpc_async(to, operator.add, args=(x, y)).then(
            lambda fut: ret_fut.set_result(fut.wait() + z)
        )
        return ret_fut

    @rpc.functions.async_execution
    def bound_async_add(self, to: str, x: Any, y: Any, z: Any) -> thenable.futures.Future[Any]:
        return rpc.rpc_async(to, operator.add, args=(x, y)).then(lambda fut: fut.wait() + z)


def check_async_patterns(kind: str) -> dict[str, Any]:
    """Every async_execution pattern of the example, with floats or numpy arrays."""
    if kind == "numpy":
        import numpy as np

        one: Any = np.ones(2)
    else:
        one = 1.0
    out: dict[str, Any] = {}
    out["async_add_chained"] = rpc.rpc_sync(
        "worker1", async_add_chained, args=("worker2", one, 1, 1)
    )
    out["static_async_add"] = rpc.rpc_sync(
        "worker1", AsyncExecutionClass.static_async_add, args=("worker2", one, 1, 2)
    )
    out["class_async_add"] = rpc.rpc_sync(
        "worker1", AsyncExecutionClass.class_async_add, args=("worker2", one, 1, 2)
    )
    out["bound_method_direct"] = rpc.rpc_sync(
        "worker1", AsyncExecutionClass().bound_async_add, args=("worker2", one, 1, 2)
    )
    rref = rpc.remote("worker1", AsyncExecutionClass)
    out["rref.rpc_sync()"] = rref.rpc_sync().static_async_add("worker2", one, 1, 2)
    out["rref.rpc_async()"] = rref.rpc_async().static_async_add("worker2", one, 1, 2).wait(WAIT_S)
    out["rref.remote()"] = rref.remote().static_async_add("worker2", one, 1, 2).to_here()
    out["bound method"] = rref.rpc_sync().bound_async_add("worker2", one, 1, 2)
    out["rref.remote() classmethod"] = rref.remote().class_async_add("worker2", one, 1, 2).to_here()
    if kind == "numpy":
        return {k: (type(v).__name__, str(v.dtype), v.tolist()) for k, v in out.items()}
    return {k: (type(v).__name__, v) for k, v in out.items()}


# -- nested blocking calls ----------------------------------------------------------------------


def nested_on_worker1(i: int) -> int:
    """On worker1: blocking calls to worker2 and back to worker0 (blocked waiting for us)."""
    a = rpc.rpc_sync("worker2", operator.add, args=(i, 1000))
    b = rpc.rpc_sync("worker0", nested_on_worker0, args=(i,))
    return int(a + b)


def nested_on_worker0(i: int) -> int:
    """On worker0, while its main thread waits: one more blocking call, to worker2."""
    return int(rpc.rpc_sync("worker2", operator.mul, args=(i, 2)))


def check_nested(count: int) -> list[int]:
    """``count`` concurrent calls whose handlers block in nested calls; all must complete."""
    futures = [rpc.rpc_async("worker1", nested_on_worker1, args=(i,)) for i in range(count)]
    return thenable.futures.wait_all(futures, timeout=WAIT_S)


# -- handlers that wait without Future.wait -------------------------------------------------------


def call_with(to: str, fn: Any, *args: Any) -> Any:
    return rpc.rpc_sync(to, fn, args, timeout=WAIT_S)


def mark_and_wait_for_gate(tag: str) -> str:
    """Mark this handler as running, then block on a plain Event until open_gate(tag)."""
    _gate(tag + ":running").set()
    return str(wait_for_gate(tag, tag))


def gate_marked(tag: str) -> bool:
    return _gate(tag + ":running").is_set()


def check_plain_wait(tag: str) -> str:
    """On worker0: worker1 blocks on a plain Event in a handler (maybe run by the thread
    that reads our connection); the call that opens it follows on that same connection."""
    waiting = rpc.rpc_async("worker1", mark_and_wait_for_gate, args=(tag,))
    deadline = time.monotonic() + WAIT_S
    # Ask through worker2 (another connection) until the handler runs.
    while not rpc.rpc_sync("worker2", call_with, args=("worker1", gate_marked, tag)):
        assert time.monotonic() < deadline, "the handler never started"
    rpc.rpc_sync("worker1", open_gate, args=(tag,))
    return str(waiting.wait(WAIT_S))


def poll_a_nested_call() -> int:
    """On worker1: a nested call waited for by polling ``done()`` (not Future.wait)."""
    future = rpc.rpc_async("worker0", operator.add, args=(2, 3))
    deadline = time.monotonic() + WAIT_S
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.001)
    return int(future.value())


# -- RRefs --------------------------------------------------------------------------------------


class Counter:
    """A user class living on an RRef's owner."""

    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self, n: int = 1) -> int:
        self.value += n
        return self.value

    def get(self) -> int:
        return self.value

    def fail(self, message: str) -> None:
        raise CustomError(message, 42)


class Tracked:
    """A value whose lifetime the tests watch through a weak registry on its owner."""

    def __init__(self, tag: str) -> None:
        self.tag = tag


_TRACKED: dict[str, weakref.ref[Tracked]] = {}
_HELD: dict[str, Any] = {}


def make_tracked(tag: str) -> Tracked:
    value = Tracked(tag)
    _TRACKED[tag] = weakref.ref(value)
    return value


def tracked_alive(tag: str) -> bool:
    gc.collect()
    ref = _TRACKED.get(tag)
    return ref is not None and ref() is not None


def tracked_alive_tags() -> list[str]:
    gc.collect()
    return sorted(tag for tag, ref in _TRACKED.items() if ref() is not None)


def owner_table_size() -> int:
    """How many RRef values this worker owns (the owner table's size), once the references
    this worker dropped itself are released."""
    settle_references()
    return len(_agent.require_agent().rrefs)


def hold(tag: str, rref: rpc.RRef[Any]) -> str:
    """Keep ``rref`` (a reference held by this worker) until ``drop(tag)``."""
    _HELD[tag] = rref
    return rref.owner_name()


def drop(tag: str) -> None:
    """Drop the reference ``hold`` kept, and send its release to the owner now."""
    del _HELD[tag]
    gc.collect()
    _agent.require_agent().rrefs.flush(WAIT_S)


def rref_view(rref: rpc.RRef[Counter]) -> dict[str, Any]:
    """What this worker sees of an RRef to a Counter."""
    out: dict[str, Any] = {
        "me": rpc.get_worker_info().name,
        "is_owner": rref.is_owner(),
        "owner": (rref.owner().name, rref.owner().id),
        "owner_name": rref.owner_name(),
        "value": rref.to_here().value,
    }
    if rref.is_owner():
        out["local_value"] = rref.local_value().value
    return out


def make_owned_rref(start: int) -> rpc.RRef[Counter]:
    """An RRef owned by this worker, returned to the caller."""
    return rpc.RRef(Counter(start))


def make_remote_rref(owner: str, start: int) -> rpc.RRef[Counter]:
    """An RRef owned by ``owner`` (created from here), returned to the caller."""
    return rpc.remote(owner, Counter, args=(start,))


def settle_references() -> None:
    """Free this worker's dropped RRefs and send their releases now."""
    gc.collect()
    _agent.require_agent().rrefs.flush(WAIT_S)


def _settle_everywhere() -> None:
    """Releases of RRefs dropped by earlier checks, on every worker, reach their owners."""
    for to in ("worker1", "worker2"):
        rpc.rpc_sync(to, settle_references)
    settle_references()


def _wait_confirmed(rref: rpc.RRef[Any], owner: str) -> int:
    """Round trips to the owner until the RRef is confirmed (bounded); how many it took."""
    for attempt in range(POLL_ROUND_TRIPS):
        if rref.confirmed_by_owner():
            return attempt
        rpc.rpc_sync(owner, noop)
    return -1


def _poll_table(owner: str, expected: int) -> tuple[int, int]:
    """Flush our releases and ask the owner its table size until it is ``expected`` (bounded):
    (the last size seen, round trips spent)."""
    size = -1
    for attempt in range(POLL_ROUND_TRIPS):
        gc.collect()
        _agent.require_agent().rrefs.flush(WAIT_S)
        size = rpc.rpc_sync(owner, owner_table_size)
        if size == expected:
            return size, attempt
    return size, POLL_ROUND_TRIPS


def check_owner_rref() -> dict[str, Any]:
    value = Counter(3)
    rref = rpc.RRef(value)
    return {
        "is_owner": rref.is_owner(),
        "local_value_is_value": rref.local_value() is value,
        "to_here_is_value": rref.to_here() is value,
        "confirmed": rref.confirmed_by_owner(),
        "owner": (type(rref.owner()).__name__, rref.owner().name, rref.owner().id),
        "owner_name": rref.owner_name(),
        "repr": repr(rref),
    }


def check_user_rref() -> dict[str, Any]:
    rref = rpc.remote("worker1", Counter, args=(5,))
    out: dict[str, Any] = {
        "is_owner": rref.is_owner(),
        "owner": (type(rref.owner()).__name__, rref.owner().name, rref.owner().id),
        "owner_name": rref.owner_name(),
        "to_here": rref.to_here().value,
        "local_value": failure_of(rref.local_value),
        "repr": repr(rref),
    }
    out["confirm_round_trips"] = _wait_confirmed(rref, "worker1")
    out["confirmed"] = rref.confirmed_by_owner()
    by_rank = rpc.remote(1, Counter, kwargs={"start": 6})
    by_info = rpc.remote(rpc.get_worker_info("worker2"), Counter, kwargs={"start": 7})
    out["by_rank"] = (by_rank.owner_name(), by_rank.to_here().value)
    out["by_info"] = (by_info.owner_name(), by_info.to_here().value)
    out["failed_creation"] = failure_of(
        rpc.remote("worker1", raise_custom, args=("no value", 3)).to_here
    )
    return out


def confirmed_without_other_calls() -> bool:
    """remote() alone, then no other call: its owner's confirmation (a reply the owner may
    hold back for its next frame) still arrives, within the transport watchdog's tick."""
    rref = rpc.remote("worker1", Counter, args=(1,))
    deadline = time.monotonic() + 5.0  # far more than the watchdog's 10 ms tick
    while not rref.confirmed_by_owner() and time.monotonic() < deadline:
        time.sleep(0.005)  # polling: no RPC traffic that would carry the reply along
    return rref.confirmed_by_owner()


def check_undecodable_creation() -> dict[str, Any]:
    """remote() whose request the owner cannot decode (an argument fails to unpickle there):
    to_here() and the proxies fail with that error instead of waiting for a value that never
    comes, and the owner frees what the failed creation left behind."""
    _settle_everywhere()
    before = rpc.rpc_sync("worker1", owner_table_size)
    rref = rpc.remote("worker1", echo, args=(TwoArgError("a", "b"),))
    out: dict[str, Any] = {"to_here": failure_of(rref.to_here)}  # sent before the error came
    out["to_here_again"] = failure_of(rref.to_here)  # raised without asking the owner
    out["proxy"] = failure_of(rref.rpc_sync().__len__)
    out["confirmed"] = rref.confirmed_by_owner()
    del rref
    out["table_after"] = _poll_table("worker1", before)[0] - before
    return out


def check_rref_passing() -> dict[str, Any]:
    """RRefs as arguments to a third worker, to their owner, and as return values."""
    on1 = rpc.remote("worker1", Counter, args=(10,))
    mine = rpc.RRef(Counter(3))
    out: dict[str, Any] = {}
    out["user_rref_to_third"] = rpc.rpc_sync("worker2", rref_view, args=(on1,))
    out["user_rref_to_owner"] = rpc.rpc_sync("worker1", rref_view, args=(on1,))
    out["owner_rref_to_other"] = rpc.rpc_sync("worker1", rref_view, args=(mine,))
    returned = rpc.rpc_sync("worker1", make_owned_rref, args=(7,))
    out["returned_by_owner"] = rref_view(returned)
    third = rpc.rpc_sync("worker2", make_remote_rref, args=("worker1", 9))
    out["returned_by_third"] = rref_view(third)
    back = rpc.rpc_sync("worker1", echo, args=(mine,))[0]
    out["returned_to_owner"] = {
        "is_owner": back.is_owner(),
        "same_value": back.local_value() is mine.local_value(),
    }
    # Through a chain: worker0 -> worker2 -> worker1 (the owner) and back.
    out["chain"] = rpc.rpc_sync("worker2", _pass_on, args=("worker1", on1))
    return out


def _pass_on(to: str, rref: rpc.RRef[Counter]) -> dict[str, Any]:
    return rpc.rpc_sync(to, rref_view, args=(rref,))


def check_rref_proxies() -> dict[str, Any]:
    rref = rpc.remote("worker1", Counter, args=(5,))
    out: dict[str, Any] = {}
    out["rpc_sync"] = rref.rpc_sync().increment(2)
    out["rpc_async"] = rref.rpc_async().increment(3).wait(WAIT_S)
    remote_result = rref.remote().get()
    out["remote"] = (remote_result.owner_name(), remote_result.to_here())
    out["kwargs"] = rref.rpc_sync().increment(n=10)
    out["exception"] = failure_of(rref.rpc_sync().fail, "proxy failed")
    out["missing_method"] = failure_of(rref.rpc_sync().no_such_method)
    out["final"] = rref.to_here().value
    owned = rpc.RRef(Counter(1))  # proxies on an RRef this worker owns
    out["owner_proxy"] = owned.rpc_sync().increment(1)
    return out


def check_refcount_user_rref(tag: str) -> dict[str, Any]:
    """worker1 owns a value; worker0 (creator) and worker2 hold references; both drop theirs."""
    out: dict[str, Any] = {}
    _settle_everywhere()
    base = rpc.rpc_sync("worker1", owner_table_size)
    rref = rpc.remote("worker1", make_tracked, args=(tag,))
    out["to_here_tag"] = rref.to_here().tag
    out["confirm_round_trips"] = _wait_confirmed(rref, "worker1")
    out["created"] = rpc.rpc_sync("worker1", owner_table_size) - base
    out["held_by_worker2"] = rpc.rpc_sync("worker2", hold, args=(tag, rref))
    del rref
    gc.collect()
    _agent.require_agent().rrefs.flush(WAIT_S)
    out["while_worker2_holds"] = (
        rpc.rpc_sync("worker1", owner_table_size) - base,
        rpc.rpc_sync("worker1", tracked_alive, args=(tag,)),
    )
    rpc.rpc_sync("worker2", drop, args=(tag,))
    size, round_trips = _poll_table("worker1", base)
    out["after_all_dropped"] = (size - base, round_trips < POLL_ROUND_TRIPS)
    out["value_alive"] = rpc.rpc_sync("worker1", tracked_alive, args=(tag,))
    return out


def check_refcount_owner_rref(tag: str) -> dict[str, Any]:
    """worker0 owns a value; worker1 and worker2 (through worker1) hold references."""
    out: dict[str, Any] = {}
    agent = _agent.require_agent()
    _settle_everywhere()
    base = len(agent.rrefs)
    rref = rpc.RRef(make_tracked(tag))
    out["created"] = len(agent.rrefs) - base
    rpc.rpc_sync("worker1", hold, args=(tag, rref))
    rpc.rpc_sync("worker1", _hand_to, args=("worker2", tag))  # worker1 -> worker2 (case 3)
    del rref
    gc.collect()
    agent.rrefs.flush(WAIT_S)
    out["while_held"] = (len(agent.rrefs) - base, tracked_alive(tag))
    rpc.rpc_sync("worker1", drop, args=(tag,))
    rpc.rpc_sync("worker2", drop, args=(tag,))
    size, round_trips = _poll_table("worker0", base)
    out["after_all_dropped"] = (size - base, round_trips < POLL_ROUND_TRIPS)
    out["value_alive"] = tracked_alive(tag)
    return out


def _hand_to(to: str, tag: str) -> str:
    """Pass the RRef this worker holds under ``tag`` on to ``to``, which holds it too."""
    return rpc.rpc_sync(to, hold, args=(tag, _HELD[tag]))


def take_rref(rref: rpc.RRef[Any]) -> str:
    """Receive an RRef and drop it at once (its release races its registration)."""
    return rref.owner_name()


def early_releases() -> int:
    """How many releases the owner table keeps waiting for their fork's registration."""
    return len(_agent.require_agent().rrefs._early)


def check_refcount_churn(tag: str, rounds: int) -> dict[str, Any]:
    """A worker1 value passed ``rounds`` times to worker2 (which drops it at once) and to its
    owner, concurrently; once worker0 drops it too, the owner frees it."""
    _settle_everywhere()
    base = rpc.rpc_sync("worker1", owner_table_size)
    rref = rpc.remote("worker1", make_tracked, args=(tag,))
    futures = []
    for _ in range(rounds):
        futures.append(rpc.rpc_async("worker2", take_rref, args=(rref,)))
        futures.append(rpc.rpc_async("worker1", take_rref, args=(rref,)))
    owners = thenable.futures.wait_all(futures, timeout=WAIT_S)
    out: dict[str, Any] = {"owners": sorted(set(owners))}
    out["while_held"] = rpc.rpc_sync("worker1", owner_table_size) - base
    del rref, futures
    for to in ("worker2", "worker1"):
        rpc.rpc_sync(to, settle_references)
    size, round_trips = _poll_table("worker1", base)
    out["after_all_dropped"] = (size - base, round_trips < POLL_ROUND_TRIPS)
    out["value_alive"] = rpc.rpc_sync("worker1", tracked_alive, args=(tag,))
    out["early_left"] = rpc.rpc_sync("worker1", early_releases)
    return out


def check_remote_churn_from_threads(threads: int, rounds: int) -> dict[str, Any]:
    """``threads`` threads each make ``rounds`` remote() values on worker1 and fetch them, one
    in five with an argument worker1 cannot decode, and use one in three through a proxy;
    every RRef is dropped at once.  Every value comes back right, every failure is the
    decoding error, and once the releases are in, worker1 holds none of the values."""
    _settle_everywhere()
    base = rpc.rpc_sync("worker1", owner_table_size)
    wrong: list[str] = []

    def churn(seed: int) -> None:
        for i in range(rounds):
            bad = (seed + i) % 5 == 0
            rref = rpc.remote("worker1", echo, args=(TwoArgError("a", "b") if bad else i,))
            try:
                got = rref.rpc_sync().__len__() if i % 3 == 0 else rref.to_here()
            except Exception as exc:
                if not bad or "TwoArgError" not in str(exc):
                    wrong.append(f"{seed}/{i}: {exc!r}")
            else:
                if bad or got != (1 if i % 3 == 0 else (i,)):
                    wrong.append(f"{seed}/{i}: got {got!r}")
            del rref

    workers = [threading.Thread(target=churn, args=(seed,)) for seed in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT_S)
    size, round_trips = _poll_table("worker1", base)
    return {
        "wrong": wrong,
        "alive": [w.name for w in workers if w.is_alive()],
        "left": size - base,
        "settled": round_trips < POLL_ROUND_TRIPS,
    }


def check_rref_kept_over_shutdown(tag: str) -> str:
    """worker2 keeps a reference to a worker1 value until RPC shuts down."""
    rref = rpc.remote("worker1", make_tracked, args=(tag,))
    return rpc.rpc_sync("worker2", hold, args=(tag, rref))


def shutdown_and_report_leaks() -> dict[str, Any]:
    """Graceful shutdown, then: owner table size, tracked values alive, thenable threads."""
    agent = _agent.require_agent()
    rpc.shutdown()
    _HELD.clear()  # the RRefs outlived RPC: dropping them now must be harmless
    return {
        "table": len(agent.rrefs),
        "alive": tracked_alive_tags(),
        "threads": join_thenable_threads(5.0),
    }


# -- shutdown -----------------------------------------------------------------------------------

_ARRIVED = threading.Condition()
_ARRIVED_COUNT = [0]
_KEPT: dict[str, Any] = {}


def gated_value(i: int) -> int:
    """On worker1: count the arrival, block until the gate opens, return i * 10."""
    with _ARRIVED:
        _ARRIVED_COUNT[0] += 1
        _ARRIVED.notify_all()
    wait_for_gate("shutdown")
    return i * 10


def agent_state() -> str:
    return _agent.require_agent().state.value


def open_gate_when_caller_shuts_down(count: int) -> str:
    """On worker1: once ``count`` gated calls have arrived *and* worker0 is shutting down,
    open the gate.  Returns worker0's state as last seen."""
    with _ARRIVED:
        if not _ARRIVED.wait_for(lambda: _ARRIVED_COUNT[0] >= count, WAIT_S):
            raise TimeoutError(f"only {_ARRIVED_COUNT[0]} of {count} gated calls arrived")
    state = ""
    for _ in range(POLL_ROUND_TRIPS):
        state = rpc.rpc_sync("worker0", agent_state)
        if state != "running":
            break
    open_gate("shutdown")
    return state


def fire_and_shutdown(count: int) -> dict[str, Any]:
    """On worker0: ``count`` calls that block on worker1 until it opens the gate itself, then
    shutdown() at once; report how every call ended."""
    _KEPT["rref"] = rpc.remote("worker1", Counter, args=(1,))
    _KEPT["rref"].to_here()
    futures: list[thenable.futures.Future[Any]] = [
        rpc.rpc_async("worker1", gated_value, args=(i,)) for i in range(count)
    ]
    futures.append(rpc.rpc_async("worker1", open_gate_when_caller_shuts_down, args=(count,)))
    pending_at_shutdown = sum(not f.done() for f in futures[:-1])
    rpc.shutdown()
    outcomes: list[Any] = []
    for future in futures:
        if not future.done():
            outcomes.append("not done")
        else:
            try:
                outcomes.append(future.value())
            except Exception as exc:
                outcomes.append(Failure.of(exc))
    return {"pending_at_shutdown": pending_at_shutdown, "outcomes": outcomes}


def calls_after_shutdown() -> dict[str, Failure]:
    out = {
        "rpc_sync": failure_of(rpc.rpc_sync, "worker1", add, args=(1, 2)),
        "rpc_async": failure_of(rpc.rpc_async, "worker1", add, args=(1, 2)),
        "remote": failure_of(rpc.remote, "worker1", add, args=(1, 2)),
        "get_worker_info": failure_of(rpc.get_worker_info),
        "shutdown": failure_of(rpc.shutdown),
        "RRef": failure_of(rpc.RRef, 1),
    }
    if "rref" in _KEPT:
        out["old_rref.to_here"] = failure_of(_KEPT["rref"].to_here)
        out["old_rref.rpc_sync"] = failure_of(_KEPT["rref"].rpc_sync().get)
        del _KEPT["rref"]
    return out


# -- failure isolation --------------------------------------------------------------------------


def timed_call(to: str, fn: Any, *args: Any) -> tuple[Failure | Any, float]:
    """rpc_sync(to, fn, args): (its value or Failure, seconds it took)."""
    start = time.monotonic()
    try:
        outcome: Any = rpc.rpc_sync(to, fn, args=args)
    except Exception as exc:
        outcome = Failure.of(exc)
    return outcome, time.monotonic() - start


def timed_shutdown(graceful: bool = True, timeout: float = 0) -> tuple[Any, float]:
    """shutdown(): (None or its Failure, seconds it took)."""
    start = time.monotonic()
    outcome = _attempt(rpc.shutdown, graceful=graceful, timeout=timeout)
    return outcome, time.monotonic() - start


# -- scale --------------------------------------------------------------------------------------


def call_everyone() -> list[str]:
    """rpc_async to every other worker at once; the names that answered."""
    me = rpc.get_worker_info()
    world = int(_agent.require_agent().world_size)
    futures = [rpc.rpc_async(rank, whoami) for rank in range(world) if rank != me.id]
    return thenable.futures.wait_all(futures, timeout=WAIT_S)
