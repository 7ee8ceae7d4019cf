"""Tracing a whole RPC job: start, collect and clock the other workers' recordings.

While RPC runs, this module is ``thenable._tracing.trace``'s peer tracing: a ``thenable.trace()``
started on any worker starts a recording on every other worker (a notification to each: no
reply, so the start leaves no stray reply in their recordings; a worker runs it before the next
message from the starter), and stopping it collects their parts (an RPC each) and merges them
into the starter's file.  Clocks are measured before the recordings start and after they stop,
so the measuring calls are not in the trace.

Clocks are measured as NTP does: the starter asks each worker for its clock a few times, at the
start and at the stop, and keeps the sample with the shortest round trip; the worker's clock
read is taken to lie at the middle of the round trip.  Workers on the starter's host need no
samples (one ``CLOCK_MONOTONIC``), but they are taken anyway: the merge ignores them there.

Under ``THENABLE_TRACE`` every worker records from its start and tells rank 0 so; at a graceful
``rpc.shutdown()``, past the barrier (when no application call is left anywhere), each worker
other than rank 0 measures its clock against rank 0 again and sends rank 0 its part, and rank 0
waits for them and writes the merged ``trace.json``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from thenable._tracing import recorder as _recorder
from thenable._tracing import trace as _trace
from thenable._tracing import trace_file as _trace_file
from thenable.rpc._handlers import pinned
from thenable.rpc._worker.agent import Agent

__all__ = [
    "after_shutdown_barrier",
    "measure_clock",
    "started",
    "stopped",
]

_LOGGER = logging.getLogger("thenable.trace")

# Round trips per clock measurement (the shortest one is kept).
_CLOCK_ROUNDS = 5
# Seconds a control call of the trace may take (a worker that does not answer is left out).
_CONTROL_TIMEOUT_S = 30.0


class _Peers:
    """``thenable._tracing.trace.PeerTracing`` for one agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def describe(self) -> dict[str, Any]:
        agent = self.agent
        label = f"{agent.name} (rank {agent.rank})"
        return _trace_file.describe_process(label, agent.rank)

    def _others(self) -> list[int]:
        return [rank for rank in range(self.agent.world_size) if rank != self.agent.rank]

    def start(self, capacity: int) -> dict[int, list[list[int]]]:
        agent, clocks = self.agent, {}
        for rank in self._others():
            try:
                clocks[rank] = [measure_clock(agent, rank)]
                agent.notify(rank, _start_here, (capacity,))
            except Exception as exc:
                _LOGGER.warning("trace: %s does not record: %s", agent.name_of(rank), exc)
                clocks.pop(rank, None)
        return clocks

    def finish(self, started: dict[int, list[list[int]]]) -> tuple[list[dict[str, Any]], list[str]]:
        agent = self.agent
        parts, problems = [], []
        for rank, samples in started.items():
            try:
                part = agent.call(rank, _stop_here, (), {}, _CONTROL_TIMEOUT_S, counted=False)
                received: dict[str, Any] = part.wait()
                samples.append(measure_clock(agent, rank))
            except Exception as exc:
                problems.append(f"no events from {agent.name_of(rank)}: {exc}")
                continue
            received["clock"] = samples
            parts.append(received)
        return parts, problems


def measure_clock(agent: Agent, rank: int) -> list[int]:
    """One clock sample of worker ``rank``: ``[its time, offset to ours, round trip]`` (ns)."""
    best: list[int] | None = None
    for _ in range(_CLOCK_ROUNDS):
        sent = _recorder.now()
        call = agent.call(rank, _clock, (), {}, _CONTROL_TIMEOUT_S, counted=False)
        theirs: int = call.wait()
        back = _recorder.now()
        sample = [theirs, (sent + back) // 2 - theirs, back - sent]
        if best is None or sample[2] < best[2]:
            best = sample
    assert best is not None
    return best


# -- on the other workers ------------------------------------------------------------------------


@pinned
def _clock() -> int:
    """(RPC) This worker's trace clock."""
    return _recorder.now()


_REMOTE_LOCK = threading.Lock()
_remote: _recorder.Capture | None = None


@pinned
def _start_here(capacity: int) -> None:
    """(notification) Start recording here, for a trace started on another worker."""
    global _remote
    with _REMOTE_LOCK:
        capture = _recorder.Capture(capacity)
        try:
            _trace.start_recording(capture)
        except RuntimeError as exc:
            _LOGGER.warning("trace: not recording for another worker's trace: %s", exc)
            return
        _remote = capture


@pinned
def _stop_here() -> dict[str, Any]:
    """(RPC) Stop the recording ``_start_here`` began; return this worker's part."""
    global _remote
    with _REMOTE_LOCK:
        capture, _remote = _remote, None
    if capture is None:
        raise RuntimeError("this worker is not recording a trace (it was not started here)")
    _trace.stop_recording(capture)
    return _trace_file.make_part(_trace.process_header(), capture, capture.drain())


# -- THENABLE_TRACE: the whole job -------------------------------------------------------------

_JOB_LOCK = threading.Condition()
_EXPECTED: set[int] = set()  # (on rank 0) the ranks that trace and will hand over their part
_DELIVERED: dict[int, dict[str, Any]] = {}


def started(agent: Agent) -> None:
    """``init_rpc`` finished: trace the other workers from here on; under THENABLE_TRACE,
    give this worker's part file its name, measure its clock against rank 0, and tell rank 0
    to wait for its part at shutdown."""
    peers = _Peers(agent)
    _trace.set_peers(peers)
    env = _trace.environment_trace()
    if env is None:
        return
    env.relabel(peers.describe(), env.directory / f"{agent.name}.part.jsonl")
    if agent.rank == 0:
        return
    try:
        env.clock(measure_clock(agent, 0))
        agent.call(0, _announce, (agent.rank,), {}, _CONTROL_TIMEOUT_S, counted=False).wait()
    except Exception as exc:
        _LOGGER.warning("trace: rank 0 will not merge this worker's part: %s", exc)


@pinned
def _announce(rank: int) -> None:
    """(RPC, on rank 0) Worker ``rank`` traces: wait for its part at shutdown."""
    with _JOB_LOCK:
        _EXPECTED.add(rank)


@pinned
def _deliver(rank: int, part: dict[str, Any]) -> None:
    """(RPC, on rank 0) Keep a worker's part for the merged trace."""
    with _JOB_LOCK:
        _DELIVERED[rank] = part
        _JOB_LOCK.notify_all()


def after_shutdown_barrier(agent: Agent, deadline: float | None) -> None:
    """Graceful shutdown, past the barrier (no application call is left anywhere): each
    worker hands its part to rank 0, which merges them into ``<dir>/trace.json``."""
    env = _trace.environment_trace()
    if env is None:
        return
    if agent.rank != 0:
        try:
            env.clock(measure_clock(agent, 0))
        except Exception as exc:
            _LOGGER.warning("trace: cannot measure the clock against rank 0: %s", exc)
        part = _trace.end_environment_trace()
        if part is None:
            return
        try:
            args = (agent.rank, part)
            agent.call(0, _deliver, args, {}, _CONTROL_TIMEOUT_S, counted=False).wait()
        except Exception as exc:
            _LOGGER.warning("trace: could not send this worker's part to rank 0: %s", exc)
        return
    until = time.monotonic() + _CONTROL_TIMEOUT_S
    if deadline is not None:
        until = min(until, deadline)
    with _JOB_LOCK:
        while not _DELIVERED.keys() >= _EXPECTED and _JOB_LOCK.wait(until - time.monotonic()):
            pass
        missing = sorted(_EXPECTED - _DELIVERED.keys())
        theirs = [_DELIVERED.pop(rank) for rank in sorted(_DELIVERED)]
        _EXPECTED.clear()
    part = _trace.end_environment_trace()
    assert part is not None
    trace = _trace_file.merge([part, *theirs])
    if missing:
        names = ", ".join(agent.name_of(rank) for rank in missing)
        trace["otherData"]["problems"] = [f"no part from {names} (see their part files)"]
        _LOGGER.warning("trace: no part from %s; their part files keep what they flushed", names)
    target = env.directory / "trace.json"
    _trace_file.write_trace(trace, target)
    _LOGGER.info("trace of %d worker(s) written to %s", 1 + len(theirs), target)
    agent.wait_answered(deadline)  # (the replies to the deliveries)


def stopped() -> None:
    """RPC stopped (gracefully or not): no more peers to trace."""
    _trace.set_peers(None)
