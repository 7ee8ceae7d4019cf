"""``thenable.trace``: record what ran where, as one timeline for every worker of a job.

Two ways in:

- ``with thenable.trace("step.json"):`` records this process - and, when RPC is running, every
  worker of the group, started and collected over RPC - and writes one merged file at the end.
- ``THENABLE_TRACE=<dir>`` in the environment records each process from ``import thenable``
  to its exit, appending its events to ``<dir>/<process>.part.jsonl`` every second (so a crash
  keeps what was flushed).  RPC workers hand their part to rank 0 at ``rpc.shutdown()``, which
  writes the merged ``<dir>/trace.json``; a process without RPC writes
  ``<dir>/trace-<pid>.json`` at exit.  ``python -m thenable trace merge <dir>`` merges whatever
  parts a crashed job left.

The RPC layer plugs in through ``set_peers`` (this module never imports it): it starts and
collects the other workers' recordings and measures their clocks.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from thenable._tracing import recorder as _recorder
from thenable._tracing import trace_file as _trace_file
from thenable._tracing import trace_hooks as _trace_hooks

__all__ = ["ENV_BUFFER", "ENV_DIR", "Trace", "trace"]

_LOGGER = logging.getLogger("thenable.trace")

ENV_DIR = "THENABLE_TRACE"
"""The environment variable naming a directory: trace every process of the job into it."""
ENV_BUFFER = "THENABLE_TRACE_BUFFER"
"""The environment variable overriding the events kept per thread between flushes."""

DEFAULT_BUFFER_EVENTS = 1 << 16
# Seconds between two flushes of an environment-started trace to its part file.
_FLUSH_S = 1.0


class PeerTracing(Protocol):
    """What the RPC layer provides while it runs: the other workers' recordings."""

    def start(self, capacity: int) -> Any:
        """Start recording on every other worker; return what ``finish`` needs."""

    def finish(self, started: Any) -> tuple[list[dict[str, Any]], list[str]]:
        """Stop them; return their parts (with clock samples) and what went wrong."""

    def describe(self) -> dict[str, Any]:
        """This process's header in a part (its worker name and rank)."""


_peers: PeerTracing | None = None


def set_peers(peers: PeerTracing | None) -> None:
    """Install (or remove, with None) the RPC layer's peer tracing."""
    global _peers
    _peers = peers


def start_recording(capture: _recorder.Capture) -> None:
    """Make ``capture`` the active one and swap the traced Future/fork methods in.

    Raises:
        RuntimeError: a trace already records in this process.
    """
    capture.start()
    _trace_hooks.install()


def stop_recording(capture: _recorder.Capture) -> None:
    """Stop ``capture`` and put the untraced methods back (idempotent)."""
    capture.stop()
    _trace_hooks.uninstall()


def process_header() -> dict[str, Any]:
    """This process's header for a part: its worker identity when RPC runs."""
    peers = _peers
    return peers.describe() if peers is not None else _trace_file.describe_process()


class Trace:
    """A recording of this process, and of every RPC worker of the group, into one file.

    Use it as a context manager (``with thenable.trace("step.json"):``) or call ``start()`` and
    ``stop()``.  While it records, fork/wait, Future callbacks and every RPC (both sides) are
    recorded as spans with arrows from each call to its handler and back; the file opens in
    Perfetto (ui.perfetto.dev) or chrome://tracing.

    Args:
        path: where ``stop()`` writes the merged trace (JSON); None keeps it in memory only
            (see ``result``).
        buffer_events: events kept per thread at most; beyond it the oldest go (the trace's
            ``otherData`` names the threads that overflowed).
        all_workers: when RPC is running, also record every other worker (default True).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        buffer_events: int = DEFAULT_BUFFER_EVENTS,
        all_workers: bool = True,
    ) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"trace() takes a file path or None, got {type(path).__qualname__}")
        self.path = Path(path) if path is not None else None
        self._capture = _recorder.Capture(buffer_events)
        self._all_workers = all_workers
        self._peers_started: Any = None
        self._peers: PeerTracing | None = None
        self.result: dict[str, Any] | None = None
        """The merged trace (the Chrome trace JSON object), once stopped."""

    def start(self) -> Trace:
        """Start recording (this process first, then the other workers).

        Raises:
            RuntimeError: a trace already records in this process.
        """
        _recorder.refuse_if_recording()  # (before the peers start)
        peers = _peers if self._all_workers else None
        if peers is not None:
            self._peers_started = peers.start(self._capture.capacity)
            self._peers = peers
        try:
            start_recording(self._capture)
        except RuntimeError:
            self._stop_peers()  # (a trace started here meanwhile)
            raise
        return self

    def _stop_peers(self) -> tuple[list[dict[str, Any]], list[str]]:
        peers, self._peers = self._peers, None
        if peers is None:
            return [], []
        return peers.finish(self._peers_started)

    def stop(self) -> dict[str, Any]:
        """Stop recording everywhere, merge, write ``path`` (if any); return the trace."""
        if self.result is not None:
            return self.result
        stop_recording(self._capture)
        own = _trace_file.make_part(process_header(), self._capture, self._capture.drain())
        theirs, problems = self._stop_peers()
        parts = [own, *theirs]
        self.result = _trace_file.merge(parts)
        if problems:
            self.result["otherData"]["problems"] = problems
            for problem in problems:
                _LOGGER.warning("trace: %s", problem)
        if self.path is not None:
            _trace_file.write_trace(self.result, self.path)
        return self.result

    def __enter__(self) -> Trace:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def trace(
    path: str | os.PathLike[str] | None = None,
    *,
    buffer_events: int = DEFAULT_BUFFER_EVENTS,
    all_workers: bool = True,
) -> Trace:
    """Record a timeline trace into ``path``: ``with thenable.trace("step.json"): ...``.

    See ``Trace`` for the arguments; the file is in the Chrome trace event format.
    """
    return Trace(path, buffer_events=buffer_events, all_workers=all_workers)


class EnvironmentTrace:
    """The trace ``THENABLE_TRACE`` starts: the whole process, flushed to a part file."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory = directory
        self.capture = _recorder.Capture(capacity)
        header = _trace_file.describe_process()
        self.part_path = directory / f"process-{os.getpid()}.part.jsonl"
        self.part = _trace_file.PartFile(self.part_path, header)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        start_recording(self.capture)
        self._flusher = threading.Thread(
            target=self._flush_every, name="thenable-trace-flush", daemon=True
        )
        self._flusher.start()

    def _flush_every(self) -> None:
        while not self._stopped.wait(_FLUSH_S):
            self.flush()

    def flush(self) -> None:
        """Append what was recorded since the last flush to the part file."""
        with self._lock:
            self.part.write(self.capture.drain())

    def relabel(self, header: dict[str, Any], path: Path) -> None:
        """RPC started: the part file takes the worker's name (and is renamed to it)."""
        with self._lock:
            self.part.relabel(header)
            try:
                self.part_path.rename(path)
            except OSError as exc:
                _LOGGER.warning("trace: cannot rename %s: %s", self.part_path, exc)
            else:
                self.part_path = self.part.path = path

    def clock(self, sample: list[int]) -> None:
        with self._lock:
            self.part.clock(sample)

    def finish(self) -> dict[str, Any]:
        """Stop recording, close the part file, and return the part read back from it."""
        self._stopped.set()
        stop_recording(self.capture)
        with self._lock:
            self.part.write(self.capture.drain())
            self.part.close(self.capture)
        return _trace_file.read_part(self.part_path)


_environment: EnvironmentTrace | None = None


def environment_trace() -> EnvironmentTrace | None:
    """The trace started by ``THENABLE_TRACE``, if it still records."""
    return _environment


def end_environment_trace() -> dict[str, Any] | None:
    """Stop the environment's trace (if any) and return this process's part."""
    global _environment
    env, _environment = _environment, None
    return env.finish() if env is not None else None


def start_from_environment(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Start tracing the whole process if ``THENABLE_TRACE`` names a directory."""
    global _environment
    directory = environ.get(ENV_DIR)
    if not directory or _environment is not None:
        return
    capacity_text = environ.get(ENV_BUFFER, str(DEFAULT_BUFFER_EVENTS))
    try:
        capacity = int(capacity_text)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        _environment = EnvironmentTrace(path, capacity)
    except (ValueError, OSError, RuntimeError) as exc:
        _LOGGER.warning("%s=%s: not tracing: %s", ENV_DIR, directory, exc)
        return
    atexit.register(_at_exit)


def _at_exit() -> None:
    """A process that never ran (or never shut down) RPC writes its own merged trace."""
    env = _environment
    if env is None:
        return
    part = end_environment_trace()
    if part is not None:
        target = env.directory / f"trace-{os.getpid()}.json"
        _trace_file.write_trace(_trace_file.merge([part]), target)
