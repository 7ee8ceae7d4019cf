"""A harness for multi-process thenable.rpc tests: real processes on 127.0.0.1, bounded in time.

The parent (the pytest process) starts N worker processes with the ``spawn`` start method.  Each
worker runs ``worker_main``: a loop that takes *commands* from its inbox pipe, runs them in its
main thread and sends the outcome back on its outbox pipe.  Every worker has pipes of its own
(not a shared multiprocessing.Queue, whose lock a killed worker could leave held, silencing all
the others), and a dead worker's outbox reads as EOF at once.  A command is a module-level
function (pickled by reference, so it must live in an importable module such as
``_remote_fns``) with its arguments; initializing RPC, making calls and shutting down are all
commands, so a test drives every worker step by step and asserts in the parent.

- ``Group.call(rank, fn, *args)`` runs a command and returns its value; a command that raised
  fails the test with the worker's traceback (``WorkerFailed``), and ``Group.failure`` returns
  the ``Failure`` of a command that is expected to raise.
- ``Group.submit`` / ``Group.result`` run commands on several workers at once.
- ``signal(key)`` lets any thread of a worker (an RPC handler, say) tell the parent that
  something happened; ``Group.wait_signal`` waits for it.  Tests synchronize on these signals,
  never on sleeps.
- Every wait has a deadline; a worker that dies unexpectedly fails the wait at once.  ``close``
  asks the workers to exit and asserts that they did with code 0; ``terminate`` (always run,
  from the fixtures' finalizers) kills whatever is left.

This module is imported by the workers: it must not import pytest, numpy or torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import itertools
import multiprocessing
import os
import pickle
import signal as signals
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from types import TracebackType
from typing import Any, TypeVar

__all__ = (
    "DEFAULT_TIMEOUT_S",
    "Failure",
    "Group",
    "Ticket",
    "WorkerFailed",
    "failure_of",
    "free_port",
    "join_thenable_threads",
    "qualified_name",
    "signal",
    "without_launcher_variables",
    "worker_main",
)

T = TypeVar("T")

_SPAWN = multiprocessing.get_context("spawn")

# The bound on any one wait of the parent for a worker (commands pass their own when needed).
DEFAULT_TIMEOUT_S = 60.0
# A worker that gets no command for this long exits by itself (the parent must be gone).
_IDLE_LIMIT_S = 150.0


def qualified_name(cls: type) -> str:
    """``module.qualname`` of a class, e.g. ``builtins.TimeoutError``."""
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass(frozen=True)
class Failure:
    """An exception seen in a worker, in a form that survives the trip to the parent.

    Attributes:
        type_name: the exception's exact class, ``module.qualname``.
        message: its ``str()``.
        traceback: the formatted traceback (with causes).
        cause_type_name: the class of its ``__cause__``, or "" if it has none.
        cause_text: ``str(__cause__)`` (for thenable's RemoteTraceback: the remote traceback).
        attributes: the exception's ``__dict__`` entries that pickle (custom attributes).
        args: ``repr`` of its ``args``.
        bases: ``module.qualname`` of every class in its MRO (``builtins.RuntimeError``...).
    """

    type_name: str
    message: str
    traceback: str
    cause_type_name: str = ""
    cause_text: str = ""
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    args: str = ""
    bases: tuple[str, ...] = ()

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        cause = exc.__cause__
        attributes: dict[str, Any] = {}
        for name, value in vars(exc).items():
            try:
                pickle.dumps(value)
            except Exception:
                attributes[name] = f"<unpicklable {qualified_name(type(value))}>"
            else:
                attributes[name] = value
        return cls(
            type_name=qualified_name(type(exc)),
            message=str(exc),
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            cause_type_name=qualified_name(type(cause)) if cause is not None else "",
            cause_text=str(cause) if cause is not None else "",
            attributes=attributes,
            args=repr(exc.args),
            bases=tuple(qualified_name(klass) for klass in type(exc).__mro__),
        )


def failure_of(fn: Callable[..., object], *args: Any, **kwargs: Any) -> Failure:
    """The Failure of ``fn(*args, **kwargs)``, which must raise.

    Raises:
        AssertionError: ``fn`` returned (its value is in the message).
    """
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:
        return Failure.of(exc)
    raise AssertionError(f"{fn!r} did not raise; it returned {value!r}")


class WorkerFailed(AssertionError):
    """A command failed in a worker; the message carries the worker's traceback."""

    def __init__(self, rank: int, what: str, failure: Failure) -> None:
        super().__init__(f"worker {rank}: {what} raised:\n{failure.traceback}")
        self.rank = rank
        self.failure = failure


def join_thenable_threads(timeout: float) -> list[str]:
    """Join every thread whose name starts with "thenable" (within ``timeout`` in all).

    Returns:
        The names of those still alive afterwards.
    """
    deadline = time.monotonic() + timeout
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and thread.name.startswith("thenable"):
            thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("thenable"))


def report(what: str, **numbers: Any) -> None:
    """Print numbers a test measured, one line tagged ``[measured]`` (shown by ``pytest -s``):
    bounds are what the tests assert, these are what the README quotes."""
    shown = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()
    )
    print(f"\n[measured] {what}: {shown}")


def free_port(low: int = 0, high: int = 0) -> int:
    """A TCP port of 127.0.0.1 that is free right now (in ``[low, high]`` if given)."""
    for port in range(low, high + 1) if low else [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = probe.getsockname()[1]
            return chosen
    raise AssertionError(f"no free port in {low}..{high}")


# -- the worker side ----------------------------------------------------------------------------

_OUTBOX: Connection | None = None
_OUTBOX_LOCK = threading.Lock()  # signal() may be called from any thread
_RANK = -1


def _send(message: tuple[Any, ...]) -> None:
    assert _OUTBOX is not None
    with _OUTBOX_LOCK:
        _OUTBOX.send(message)


def signal(key: str, value: object = None) -> None:
    """Tell the parent that ``key`` happened in this worker (from any thread)."""
    if _OUTBOX is None:
        raise RuntimeError("signal() is only available in a harness worker")
    _send(("signal", _RANK, key, value))


def without_launcher_variables(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the variables that would change how a worker initializes RPC (a
    launcher's, ``thenable.rpc._options.LAUNCHER_VARIABLES``, and torchrun's local rank):
    workers start without them unless a test sets them explicitly."""
    from thenable.rpc._options import LAUNCHER_VARIABLES  # (here: keeps this module light)

    dropped = {*LAUNCHER_VARIABLES, "LOCAL_RANK"}
    return {name: value for name, value in env.items() if name not in dropped}


def worker_main(rank: int, inbox: Connection, outbox: Connection, env: dict[str, str]) -> None:
    """A worker process: run commands from ``inbox`` until told to stop (None)."""
    global _OUTBOX, _RANK
    _OUTBOX, _RANK = outbox, rank
    # The parent sends SIGUSR1 to a worker that does not answer in time: its threads' stacks
    # then go to stderr, which pytest shows with the failure.
    faulthandler.register(signals.SIGUSR1, all_threads=True)
    clean = without_launcher_variables(os.environ)
    os.environ.clear()
    os.environ.update(clean, **env)
    while True:
        try:
            if not inbox.poll(_IDLE_LIMIT_S):
                _send(("stray", rank, "no command for too long; exiting"))
                break
            command = inbox.recv()
        except EOFError:  # the parent is gone
            break
        if command is None:
            break
        _send(_run(rank, command))
        del command  # drop its arguments (RRefs, say) before waiting for the next one
    # A test must shut RPC down itself; say so if it did not (and do it, so the process ends).
    from thenable.rpc._worker import (
        context as _context,  # imported here: keeps this module light to import
    )

    if _context.current_agent() is not None:
        _send(("stray", rank, "RPC was still running when the worker was told to exit"))
        from thenable import rpc

        rpc.shutdown(graceful=False)
    _send(("exit", rank, None))
    outbox.close()


def _run(
    rank: int, command: tuple[int, Callable[..., Any], tuple[Any, ...], dict[str, Any]]
) -> Any:
    """Run one command; the message that reports its outcome."""
    seq, fn, args, kwargs = command
    try:
        value = fn(*args, **kwargs)
        pickle.dumps(value)  # fail here, as the command's failure, not in send()
    except BaseException as exc:
        return ("error", rank, seq, Failure.of(exc))
    return ("ok", rank, seq, value)


# -- the parent side ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ticket:
    """A submitted command: which worker, which sequence number, what (for messages)."""

    rank: int
    seq: int
    what: str


class Group:
    """N worker processes driven by the test; use as a context manager (or call terminate)."""

    def __init__(
        self,
        size: int,
        *,
        env: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
        port: int | None = None,
    ) -> None:
        """Start ``size`` workers.

        Args:
            env: environment variables for every worker, or one mapping per worker.
            port: rank 0's port for ``init_all``; default a free one.
        """
        self.size = size
        self.port = port if port is not None else free_port()
        if env is None or isinstance(env, Mapping):
            envs = [dict(env or {}) for _ in range(size)]
        else:
            envs = [dict(e) for e in env]
            if len(envs) != size:
                raise ValueError(f"{len(envs)} environments for {size} workers")
        # Per worker: the parent's ends of its pipes; None once closed.
        self._to: list[Connection | None] = []
        self._from: dict[Connection, int] = {}
        self._seq = itertools.count(1)
        self._results: dict[tuple[int, int], tuple[str, Any]] = {}
        self._signals: dict[tuple[int, str], list[Any]] = {}
        self._strays: list[str] = []
        self._exited: set[int] = set()
        self._killed: set[int] = set()
        self._stopping: set[int] = set()
        self.processes: list[SpawnProcess] = []
        try:
            for rank in range(size):
                inbox, to_worker = _SPAWN.Pipe(duplex=False)
                from_worker, outbox = _SPAWN.Pipe(duplex=False)
                self._to.append(to_worker)
                self._from[from_worker] = rank
                process = _SPAWN.Process(
                    target=worker_main,
                    args=(rank, inbox, outbox, envs[rank]),
                    name=f"rpc-test-worker{rank}",
                    daemon=True,
                )
                try:
                    process.start()
                finally:
                    inbox.close()  # the worker has its own copies now: its death reads as EOF
                    outbox.close()
                self.processes.append(process)
        except BaseException:
            self.terminate()
            raise

    def __enter__(self) -> Group:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            self.terminate()

    # -- commands -------------------------------------------------------------------------------

    def submit(self, rank: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Ticket:
        """Send a command to worker ``rank`` without waiting for it."""
        seq = next(self._seq)
        to_worker = self._to[rank]
        assert to_worker is not None, f"worker {rank} was stopped"
        to_worker.send((seq, fn, args, kwargs))
        return Ticket(rank, seq, f"{getattr(fn, '__qualname__', fn)}{args!r}")

    def outcome(self, ticket: Ticket, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[str, Any]:
        """("ok", value) or ("error", Failure) of a submitted command."""
        key = (ticket.rank, ticket.seq)
        deadline = time.monotonic() + timeout
        while key not in self._results:
            self._receive(deadline, f"the result of {ticket.what} on worker {ticket.rank}")
        return self._results.pop(key)

    def result(self, ticket: Ticket, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """The value of a submitted command; fails the test if it raised."""
        kind, value = self.outcome(ticket, timeout)
        if kind == "error":
            raise WorkerFailed(ticket.rank, ticket.what, value)
        return value

    def error(self, ticket: Ticket, timeout: float = DEFAULT_TIMEOUT_S) -> Failure:
        """The Failure of a submitted command that must raise."""
        kind, value = self.outcome(ticket, timeout)
        if kind != "error":
            raise AssertionError(
                f"worker {ticket.rank}: {ticket.what} returned {value!r} instead of raising"
            )
        assert isinstance(value, Failure)
        return value

    def call(
        self,
        rank: int,
        fn: Callable[..., T],
        *args: Any,
        timeout: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> T:
        """Run a command on worker ``rank`` and return its value."""
        value: T = self.result(self.submit(rank, fn, *args, **kwargs), timeout)
        return value

    def failure(
        self,
        rank: int,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> Failure:
        """Run a command that must raise on worker ``rank``; return how it failed."""
        return self.error(self.submit(rank, fn, *args, **kwargs), timeout)

    def call_all(
        self,
        fn: Callable[..., T],
        *args: Any,
        ranks: Sequence[int] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> list[T]:
        """Run the same command on several workers at once; their values in rank order."""
        tickets = [self.submit(r, fn, *args, **kwargs) for r in self._ranks(ranks)]
        deadline = time.monotonic() + timeout
        return [self.result(t, max(0.0, deadline - time.monotonic())) for t in tickets]

    def init_all(
        self,
        fn: Callable[..., None],
        *,
        world_size: int | None = None,
        port: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        **options: Any,
    ) -> None:
        """Run ``fn(rank, world_size, port, **options)`` (an init command) on every worker."""
        world = self.size if world_size is None else world_size
        where = self.port if port is None else port
        tickets = [self.submit(r, fn, r, world, where, **options) for r in range(self.size)]
        deadline = time.monotonic() + timeout
        for ticket in tickets:
            self.result(ticket, max(0.0, deadline - time.monotonic()))

    def _ranks(self, ranks: Sequence[int] | None) -> list[int]:
        if ranks is not None:
            return list(ranks)
        return [r for r in range(self.size) if r not in self._killed]

    # -- signals --------------------------------------------------------------------------------

    def wait_signal(self, rank: int, key: str, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """Wait until worker ``rank`` called ``signal(key, value)``; return the value."""
        deadline = time.monotonic() + timeout
        while not self._signals.get((rank, key)):
            self._receive(deadline, f"signal {key!r} from worker {rank}")
        return self._signals[(rank, key)].pop(0)

    # -- processes ------------------------------------------------------------------------------

    def kill(self, rank: int, timeout: float = 10.0) -> None:
        """SIGKILL worker ``rank`` and wait until it is gone."""
        process = self.processes[rank]
        assert process.pid is not None
        self._killed.add(rank)
        os.kill(process.pid, signals.SIGKILL)
        process.join(timeout)
        assert process.exitcode == -signals.SIGKILL, (
            f"worker {rank} exit code {process.exitcode} after SIGKILL"
        )

    def close(self, timeout: float = 30.0) -> None:
        """Tell every live worker to exit; assert that each did, with code 0, and said nothing
        unexpected (a worker exiting with RPC still running is reported)."""
        deadline = time.monotonic() + timeout
        for rank in self._ranks(None):
            if rank not in self._stopping:
                self._stopping.add(rank)
                to_worker = self._to[rank]
                if to_worker is not None:
                    with contextlib.suppress(OSError):  # it may be gone: reported below
                        to_worker.send(None)
        waiting = set(self._ranks(None)) - self._exited
        while waiting:
            self._receive(deadline, f"workers {sorted(waiting)} to exit")
            waiting -= self._exited
        for rank, process in enumerate(self.processes):
            if rank in self._killed:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            assert process.exitcode == 0, f"worker {rank} exited with code {process.exitcode}"
        assert not self._strays, f"workers reported problems: {self._strays}"

    def terminate(self) -> None:
        """Kill every worker still running and close the pipes (idempotent)."""
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join(10)
        for connection in [*self._to, *self._from]:
            if connection is not None:
                connection.close()
        self._to = [None] * len(self._to)
        self._from.clear()

    def pid(self, rank: int) -> int:
        pid = self.processes[rank].pid
        assert pid is not None
        return pid

    # -- receiving ------------------------------------------------------------------------------

    def _receive(self, deadline: float, what: str) -> None:
        """Take the messages that arrive next into the tables; fail at the deadline, or at once
        when a worker dies unexpectedly."""
        left = deadline - time.monotonic()
        if left <= 0:
            self._dump_stacks()
            raise TimeoutError(f"timed out waiting for {what}")
        for ready in wait(list(self._from), timeout=left):
            assert isinstance(ready, Connection)
            rank = self._from[ready]
            try:
                message = ready.recv()
            except (EOFError, OSError):  # the worker is gone
                del self._from[ready]
                ready.close()
                if rank not in self._killed and rank not in self._exited:
                    process = self.processes[rank]
                    process.join(10)
                    raise AssertionError(
                        f"worker {rank} died with exit code {process.exitcode} while waiting "
                        f"for {what}"
                    ) from None
                continue
            self._store(message)

    def _store(self, message: tuple[Any, ...]) -> None:
        kind, rank = message[0], message[1]
        if kind in ("ok", "error"):
            self._results[(rank, message[2])] = (kind, message[3])
        elif kind == "signal":
            self._signals.setdefault((rank, message[2]), []).append(message[3])
        elif kind == "stray":
            self._strays.append(f"worker {rank}: {message[2]}")
        elif kind == "exit":
            self._exited.add(rank)
        else:
            raise AssertionError(f"unexpected message {message!r}")

    def _dump_stacks(self) -> None:
        """Make every live worker print its threads' stacks to stderr (see worker_main)."""
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signals.SIGUSR1)
        # Diagnostics of a failure only: give the workers a moment to write before pytest
        # stops capturing this test's output.
        time.sleep(1.0)
