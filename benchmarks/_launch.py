"""What every benchmark's parent and children share to run processes side by side: a free
port, the children's reports, one run of a group of processes watched to its end, the end of a
worker's log, and reaping what a run started."""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import queue
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ("Outcome", "Reporter", "free_port", "reap", "run_processes", "tail")

SPAWN = mp.get_context("spawn")
"""The context every benchmark's processes (and the barriers they share) come from."""


class Reporter:
    """Sends (rank, kind, payload) tuples to the parent and remembers the current phase."""

    def __init__(self, q: Any, rank: int) -> None:
        self.q = q
        self.rank = rank
        self.phase = "start"

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.q.put((self.rank, "phase", phase))

    def value(self, name: str, value: float) -> None:
        self.q.put((self.rank, "value", (name, float(value))))

    def error(self, text: str) -> None:
        self.q.put((self.rank, "error", f"rank {self.rank}, during {self.phase}: {text}"))

    def done(self) -> None:
        self.q.put((self.rank, "done", None))


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a worker's log."""
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def reap(procs: Sequence[Any], grace_s: float) -> None:
    """Join, then terminate, then kill: nothing outlives its run."""
    end = time.perf_counter() + grace_s
    for p in procs:
        p.join(timeout=max(0.1, end - time.perf_counter()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=3.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=3.0)


@dataclass
class Outcome:
    """What the processes of one run reported (``values`` by rank), or why it failed."""

    values: dict[int, dict[str, float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    wall_s: float = math.nan
    started_at: float = math.nan  # the wall clock (time.time()) as the processes started


def run_processes(
    target: Callable[..., None],
    args_of: Callable[[int, Any], tuple[Any, ...]],
    logs: Sequence[Path],
    timeout_s: float,
    name: str,
    error_grace_s: float = 10.0,
) -> Outcome:
    """Run ``target(*args_of(rank, reports))`` in one spawned process per log in ``logs``
    (each child reports through a ``Reporter`` on ``reports``), collect the reports until
    every rank is done, one fails (the others then get ``error_grace_s`` more), the processes
    die, or ``timeout_s`` passes; make sure none outlives the run; on errors, add each rank's
    log tail."""
    count = len(logs)
    reports: Any = SPAWN.Queue()
    outcome = Outcome()
    procs = [
        SPAWN.Process(target=target, args=args_of(r, reports), name=f"{name}-{r}", daemon=True)
        for r in range(count)
    ]
    phases = dict.fromkeys(range(count), "process start")
    finished: set[int] = set()
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    outcome.started_at = time.time()
    for p in procs:
        p.start()
    dead_since: float | None = None
    while len(finished) < count:
        try:
            rank, kind, payload = reports.get(timeout=0.2)
        except queue.Empty:
            now = time.perf_counter()
            if now > deadline:
                stuck = {r: phases[r] for r in range(count) if r not in finished}
                outcome.errors.append(
                    f"timed out after {now - t0:.0f} s; unfinished ranks and their phase: {stuck}"
                )
                break
            if all(not p.is_alive() for p in procs):
                dead_since = dead_since if dead_since is not None else now
                if now - dead_since > 2.0:  # what was left in the queue has arrived by now
                    for r in sorted(set(range(count)) - finished):
                        outcome.errors.append(
                            f"rank {r} exited (code {procs[r].exitcode}) during {phases[r]} "
                            "without reporting"
                        )
                    break
            continue
        if kind == "phase":
            phases[rank] = payload
        elif kind == "value":
            value_name, value = payload
            outcome.values.setdefault(rank, {})[value_name] = value
        elif kind == "error":
            outcome.errors.append(payload)
            finished.add(rank)
            # The others may now wait for the failed rank (a barrier, shutdown): give them a
            # little while to notice, not the whole time limit.
            deadline = min(deadline, time.perf_counter() + error_grace_s)
        elif kind == "done":
            finished.add(rank)
    outcome.wall_s = time.perf_counter() - t0
    reap(procs, grace_s=1.0 if len(finished) < count else 15.0)
    for r, p in enumerate(procs):
        if p.exitcode not in (0, None) and not any(f"rank {r}" in e for e in outcome.errors):
            outcome.errors.append(f"rank {r} exit code {p.exitcode}")
    if outcome.errors:
        for r, path in enumerate(logs):
            end = tail(path)
            if "Timeout (" in end:  # faulthandler's header: the process hung, stacks follow
                outcome.errors.insert(
                    0, f"rank {r} ran past its time limit (hung or too slow): stacks in its log"
                )
            outcome.errors.append(f"--- log of rank {r} ({path}), last lines:\n{end}")
    with contextlib.suppress(Exception):
        reports.close()
        reports.cancel_join_thread()
    return outcome
