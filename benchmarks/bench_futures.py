#!/usr/bin/env python
"""Side-by-side micro-benchmarks: thenable vs torch.futures (and the standard library).

Everything runs in ONE process, and the contenders of every operation are interleaved: each
round runs every contender once (the order alternates from round to round), so that a burst of
noise on a shared machine hits all of them alike.  Reported per-op times are the median over
rounds; each ratio thenable/peer is taken per round (both timed in the same round) and shown as
the median, the range over all rounds and the worst round.  A target must hold in the WORST
round, not in the median one.

Operations (targets are ratios thenable/peer; lower is better for thenable).  Each is written
as a user would write it, what is timed included:

1. ``Future()`` + ``set_result`` + ``wait``                        <= 0.5 vs torch
2. ``then(cb)`` + ``set_result`` + ``wait`` on the child            <= 0.5 vs torch
3. ``add_done_callback(cb)`` + ``set_result``                       <= 0.5 vs torch
4. a then-chain, per link: ``f = Future(); g = f``, 1,000 times
   ``g = g.then(lambda x: x.value() + 1)``, ``f.set_result(0); g.wait()``  <= 0.5 vs torch
5. ``collect_all`` of 1,000 fresh futures (made in the timing), ``set_result`` on each,
   ``wait``, per future                                             <= 0.5 vs torch
6. ``fork`` + ``wait`` of a no-op                                   <= 1.5 vs TorchScript fork,
                                                                    <= 1/3 vs ThreadPoolExecutor
7. fan-out: ``fork`` 20,000 no-op tasks, then ``wait`` each, in plain Python, against a
   ``@torch.jit.script`` function doing the same with ``torch.jit.fork``/``wait``, per task
                                                                    <= 1.0 vs TorchScript
8. parallel speedup of 4 forked GIL-releasing tasks                 >= 1.8 (serial / forked,
                                                                    median of the rounds)
9. ``fork`` + ``wait`` of a no-op under ``torch.no_grad()`` (the state is carried to the task
   and re-entered there) against op 6 in the default state            info
10. what it costs ``fork`` to look at the forking thread's state: ``fork`` + ``wait`` of a
    no-op (op 6) in child processes of their own, one that never imports torch and one that
    does (``fork`` then asks torch a few questions), against each other and, with
    ``--fork-baseline SRC``, against the same two children running the thenable found in SRC
    (say, a scratch copy of an earlier commit's ``src``)               info

Rows without a target are for information.  torch is imported lazily; without it the torch rows
say so and the others still run.

Usage::

    python benchmarks/bench_futures.py            # full run, about a minute
    python benchmarks/bench_futures.py --quick    # smoke run, under 20 seconds
    python benchmarks/bench_futures.py --rounds 41
    python benchmarks/bench_futures.py --watchdog 0   # no time limit (default: dump stacks, exit)
    python benchmarks/bench_futures.py --fork-baseline /tmp/old/src   # op 10 against that copy
    python benchmarks/bench_futures.py --clock cpu   # CPU time, for a machine others load

The load average is printed before and after: above the CPU count, other processes competed
for the CPUs and the parallel speedups in particular are not meaningful.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import faulthandler
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import thenable

# A sample runs `n` units of work and returns (elapsed ns, units done).
Runner = Callable[[int], tuple[int, int]]

CHAIN_LINKS = 1_000  # torch recurses once per link and segfaults near 7,000: stay well below
COLLECT_K = 1_000
FAN_OUT = 20_000
PARALLEL_TASKS = 4
SLEEP_S = 0.05
SORT_TARGET_S = 0.075  # one numpy sort task should take about this long
MAX_UNITS = 200_000  # cap on pre-created futures per sample

# The clock of ops 1-7, 9 and 10 (--clock cpu: the process's CPU time, all threads); op 8, a
# parallel speedup, is always timed by the wall clock.
perf_ns = time.perf_counter_ns
wall_ns = time.perf_counter_ns


# -- contenders and results --------------------------------------------------------------------


@dataclass
class Contender:
    """One implementation of an operation, with its per-round times (ns per unit)."""

    name: str
    run: Runner
    n: int = 0  # units per sample, set by calibration
    gc_off: bool = False  # the cycle collector is disabled during samples
    samples: list[float] = field(default_factory=list)

    def calibrate(self, sample_ns: float) -> None:
        """Warm up, then pick ``n`` so that one sample takes about ``sample_ns``."""
        n = 16
        while True:
            elapsed, units = _timed(self.run, n, self.gc_off)
            if elapsed >= sample_ns / 4 or n >= MAX_UNITS:
                break
            n *= 4
        per_unit = elapsed / units
        self.n = max(1, min(MAX_UNITS, round(sample_ns / per_unit)))

    def sample(self) -> None:
        elapsed, units = _timed(self.run, self.n, self.gc_off)
        self.samples.append(elapsed / units)


@dataclass
class Peer:
    contender: Contender | None  # None: not available (the reason is in `missing`)
    target: float | None  # the most thenable/peer may be; None: information only
    name: str = ""
    missing: str = ""


@dataclass
class OpBench:
    label: str
    unit: str
    thenable: Contender
    peers: list[Peer]

    def contenders(self) -> list[Contender]:
        found = [p.contender for p in self.peers if p.contender is not None]
        return [self.thenable, *found]


def _timed(run: Runner, n: int, gc_off: bool) -> tuple[int, int]:
    """Run one sample, starting from a fresh collection (for every contender alike).

    With ``gc_off`` (--no-gc) the cycle collector is disabled during the sample, as timeit
    does; by default it stays on, as in a real program, so that allocation-heavy operations
    (long then() chains) pay for the collections they trigger.
    """
    gc.collect()
    if not gc_off:
        return run(n)
    gc.disable()
    try:
        return run(n)
    finally:
        gc.enable()


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        only = values[0] if values else math.nan
        return only, only
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# -- callbacks and tasks shared by the contenders ----------------------------------------------


def _value_cb(fut: Any) -> Any:
    return fut.value()


def _incr_cb(fut: Any) -> Any:
    return fut.value() + 1


def _noop_cb(fut: Any) -> None:
    return None


def _noop(x: Any) -> Any:
    return x


# -- op 1: Future() + set_result + wait ---------------------------------------------------------


def _create_set_wait(new: Callable[[], Any]) -> Runner:
    def run(n: int) -> tuple[int, int]:
        t0 = perf_ns()
        for _ in range(n):
            f = new()
            f.set_result(1)
            f.wait()
        return perf_ns() - t0, n

    return run


def _create_set_result(new: Callable[[], Any]) -> Runner:
    """The same for futures read with ``result()`` (concurrent.futures, asyncio)."""

    def run(n: int) -> tuple[int, int]:
        t0 = perf_ns()
        for _ in range(n):
            f = new()
            f.set_result(1)
            f.result()
        return perf_ns() - t0, n

    return run


# -- op 2: then(cb) + set_result + wait on the child -------------------------------------------


def _then_set_wait(new: Callable[[], Any]) -> Runner:
    def run(n: int) -> tuple[int, int]:
        parents = [new() for _ in range(n)]
        t0 = perf_ns()
        for f in parents:
            child = f.then(_value_cb)
            f.set_result(1)
            child.wait()
        return perf_ns() - t0, n

    return run


# -- op 3: add_done_callback(cb) + set_result ---------------------------------------------------


def _callback_set(new: Callable[[], Any]) -> Runner:
    def run(n: int) -> tuple[int, int]:
        futures = [new() for _ in range(n)]
        t0 = perf_ns()
        for f in futures:
            f.add_done_callback(_noop_cb)
            f.set_result(1)
        return perf_ns() - t0, n

    return run


# -- op 4: a then-chain, per link ---------------------------------------------------------------


def _chain(new: Callable[[], Any]) -> Runner:
    """A user's chain, as the issue wrote it: building included, a fresh lambda per link."""

    def run(n: int) -> tuple[int, int]:
        chains = max(1, n // CHAIN_LINKS)
        t0 = perf_ns()
        for _ in range(chains):
            f = new()
            g = f
            for _ in range(CHAIN_LINKS):
                g = g.then(lambda x: x.value() + 1)
            f.set_result(0)
            if g.wait() != CHAIN_LINKS:
                raise AssertionError("then-chain computed a wrong value")
        return perf_ns() - t0, chains * CHAIN_LINKS

    return run


# -- op 5: collect_all, per future --------------------------------------------------------------


def _collect(new: Callable[[], Any], collect_all: Callable[[list[Any]], Any]) -> Runner:
    """collect_all of COLLECT_K fresh futures, made inside the timing."""

    def run(n: int) -> tuple[int, int]:
        batches = max(1, n // COLLECT_K)
        t0 = perf_ns()
        for _ in range(batches):
            futures = [new() for _ in range(COLLECT_K)]
            combined = collect_all(futures)
            for i, f in enumerate(futures):
                f.set_result(i)
            combined.wait()
        return perf_ns() - t0, batches * COLLECT_K

    return run


# -- op 6: fork + wait of a no-op ---------------------------------------------------------------


def _thenable_fork_wait(n: int) -> tuple[int, int]:
    fork, wait = thenable.fork, thenable.wait
    x: Any = 0
    t0 = perf_ns()
    for _ in range(n):
        x = wait(fork(_noop, x))
    return perf_ns() - t0, n


def _executor_submit_result(executor: cf.ThreadPoolExecutor) -> Runner:
    def run(n: int) -> tuple[int, int]:
        x: Any = 0
        t0 = perf_ns()
        for _ in range(n):
            x = executor.submit(_noop, x).result()
        return perf_ns() - t0, n

    return run


def _torchscript_fork_wait(torch: Any) -> Runner:
    """A scripted loop of fork + wait, so one interpreter entry is amortized over n calls."""
    unit = torch.jit.CompilationUnit(
        """
def noop(x: Tensor) -> Tensor:
    return x

def many(x: Tensor, n: int) -> Tensor:
    for _ in range(n):
        x = torch.jit.wait(torch.jit.fork(noop, x))
    return x
"""
    )
    many = unit.many
    x = torch.zeros(1)

    def run(n: int) -> tuple[int, int]:
        t0 = perf_ns()
        many(x, n)
        return perf_ns() - t0, n

    return run


def _torch_eager_fork_wait(torch: Any) -> Runner:
    fork, wait = torch.jit.fork, torch.jit.wait

    def run(n: int) -> tuple[int, int]:
        x: Any = 0
        t0 = perf_ns()
        for _ in range(n):
            x = wait(fork(_noop, x))
        return perf_ns() - t0, n

    return run


# -- op 7: fan-out of FAN_OUT forks, then a wait on each --------------------------------------


def _noop0() -> None:
    return None


def _thenable_fan_out(n: int) -> tuple[int, int]:
    fork, wait = thenable.fork, thenable.wait
    rounds = max(1, n // FAN_OUT)
    t0 = perf_ns()
    for _ in range(rounds):
        futures = [fork(_noop0) for _ in range(FAN_OUT)]
        for f in futures:
            wait(f)
    return perf_ns() - t0, rounds * FAN_OUT


def _torchscript_fan_out(torch: Any) -> Runner:
    unit = torch.jit.CompilationUnit(
        """
def noop(x: Tensor) -> Tensor:
    return x

def fan_out(x: Tensor, n: int) -> Tensor:
    futures = [torch.jit.fork(noop, x) for _ in range(n)]
    for f in futures:
        x = torch.jit.wait(f)
    return x
"""
    )
    fan_out = unit.fan_out
    x = torch.zeros(1)

    def run(n: int) -> tuple[int, int]:
        rounds = max(1, n // FAN_OUT)
        t0 = perf_ns()
        for _ in range(rounds):
            fan_out(x, FAN_OUT)
        return perf_ns() - t0, rounds * FAN_OUT

    return run


# -- op 9: fork + wait under torch.no_grad() -----------------------------------------------------


def _thenable_fork_wait_no_grad(torch: Any) -> Runner:
    def run(n: int) -> tuple[int, int]:
        with torch.no_grad():
            return _thenable_fork_wait(n)

    return run


# -- op 10: fork + wait in child processes, with and without torch imported -------------------


class _ChildForkWait:
    """A child process that runs op 6's thenable sample on request, so that processes which
    never import torch, or import another thenable, take part in the interleaved rounds.

    The child (this script, ``--fork-cost-child``) imports torch or not, then answers each line
    ``n`` on its stdin with ``elapsed_ns units``; it idles between requests, so only one process
    runs at a time.
    """

    def __init__(self, *, with_torch: bool, src: str | None, gc_off: bool, clock: str) -> None:
        env = dict(os.environ)
        if src is not None:  # that thenable, ahead of the installed one
            env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        command = [sys.executable, os.path.abspath(__file__), "--fork-cost-child"]
        command += ["torch" if with_torch else "plain", "--clock", clock]
        if gc_off:
            command.append("--no-gc")
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.origin = self._readline()  # where the child's thenable was imported from

    def _readline(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork-cost child exited ({self._process.wait()})")
        return line.strip()

    def __call__(self, n: int) -> tuple[int, int]:
        assert self._process.stdin is not None
        self._process.stdin.write(f"{n}\n")
        self._process.stdin.flush()
        elapsed, units = self._readline().split()
        return int(elapsed), int(units)

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _fork_cost_child(mode: str, gc_off: bool) -> int:
    """The child's side of _ChildForkWait."""
    if mode == "torch":
        import torch  # noqa: F401  (imported, so that fork has torch's state to look at)
    _thenable_fork_wait(1000)  # start the pool's threads
    gc.collect()
    gc.freeze()
    print(thenable.__file__, flush=True)
    for line in sys.stdin:
        elapsed, units = _timed(_thenable_fork_wait, int(line), gc_off)
        print(elapsed, units, flush=True)
    return 0


# -- op 8: parallel speedup ---------------------------------------------------------------------


@dataclass
class ParallelBench:
    """Serial vs forked runs of PARALLEL_TASKS copies of one task; times in ns per batch."""

    label: str
    task: Callable[[int], None]
    serial: list[float] = field(default_factory=list)
    forked: dict[str, list[float]] = field(default_factory=dict)


def _sleep_task(_: int) -> None:
    time.sleep(SLEEP_S)


def _make_sort_task() -> tuple[Callable[[int], None], int, float]:
    """A numpy sort that releases the GIL, sized to take about SORT_TARGET_S.

    Each task sorts a private, pre-allocated buffer (no page faults, no allocator contention).
    Returns the task, its element count and its measured duration in seconds.
    """
    import numpy as np

    rng = np.random.default_rng(0)

    def build(size: int) -> tuple[Callable[[int], None], float]:
        source = rng.random(size)
        buffers = [np.empty_like(source) for _ in range(PARALLEL_TASKS)]

        def sort_task(i: int) -> None:
            buffer = buffers[i]
            buffer[...] = source
            buffer.sort()

        sort_task(0)
        t0 = time.perf_counter()
        sort_task(0)
        sort_task(0)
        return sort_task, (time.perf_counter() - t0) / 2

    size = 1 << 20
    task, seconds = build(size)
    scaled = int(size * SORT_TARGET_S / max(seconds, 1e-6))
    size = max(1 << 19, min(1 << 22, scaled))
    task, seconds = build(size)
    return task, size, seconds


def _parallel_runners(
    torch: Any, executor: cf.ThreadPoolExecutor
) -> dict[str, Callable[[Callable[[int], None]], int]]:
    """Each runner runs PARALLEL_TASKS copies of a task and returns the elapsed ns."""

    def serial(task: Callable[[int], None]) -> int:
        t0 = wall_ns()
        for i in range(PARALLEL_TASKS):
            task(i)
        return wall_ns() - t0

    def thenable_fork(task: Callable[[int], None]) -> int:
        t0 = wall_ns()
        futures = [thenable.fork(task, i) for i in range(PARALLEL_TASKS)]
        for f in futures:
            thenable.wait(f)
        return wall_ns() - t0

    def executor_submit(task: Callable[[int], None]) -> int:
        t0 = wall_ns()
        futures = [executor.submit(task, i) for i in range(PARALLEL_TASKS)]
        for f in futures:
            f.result()
        return wall_ns() - t0

    runners: dict[str, Callable[[Callable[[int], None]], int]] = {
        "serial": serial,
        "thenable.fork": thenable_fork,
        "ThreadPoolExecutor": executor_submit,
    }
    if torch is not None:

        def torch_eager_fork(task: Callable[[int], None]) -> int:
            t0 = wall_ns()
            futures = [torch.jit.fork(task, i) for i in range(PARALLEL_TASKS)]
            for f in futures:
                torch.jit.wait(f)
            return wall_ns() - t0

        runners["torch.jit.fork (eager)"] = torch_eager_fork
    return runners


# -- building the benchmark ---------------------------------------------------------------------


def _import_torch() -> Any | None:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _fork_cost_ops(
    torch: Any | None,
    baseline: str | None,
    gc_off: bool,
    clock: str,
    children: list[_ChildForkWait],
) -> list[OpBench]:
    """Op 10, a row without torch and one with it: their contenders are child processes (started
    here, closed by the caller), this thenable's against the baseline's."""

    def child(with_torch: bool, src: str | None) -> _ChildForkWait:
        runner = _ChildForkWait(with_torch=with_torch, src=src, gc_off=gc_off, clock=clock)
        children.append(runner)
        return runner

    def peer(name: str, runner: _ChildForkWait | None) -> Peer:
        if runner is None:
            return Peer(None, None, name=name, missing="no --fork-baseline")
        return Peer(Contender(name, runner), None, name=name)

    plain = child(False, None)
    old_plain = child(False, baseline) if baseline is not None else None
    ops = [
        OpBench(
            "10. fork+wait no-op, child, no torch",
            "call",
            Contender("thenable", plain),
            [peer("baseline", old_plain)],
        )
    ]
    if torch is not None:
        old_torch = child(True, baseline) if baseline is not None else None
        ops.append(
            OpBench(
                "10. fork+wait no-op, child, torch imported",
                "call",
                Contender("thenable", child(True, None)),
                [peer("baseline", old_torch), peer("thenable, no torch", plain)],
            )
        )
    return ops


def _build_ops(
    torch: Any | None, executor: cf.ThreadPoolExecutor, loop: asyncio.AbstractEventLoop
) -> list[OpBench]:
    no_torch = "torch not installed"

    def torch_peer(name: str, make: Callable[[], Runner], target: float | None) -> Peer:
        if torch is None:
            return Peer(None, target, name=name, missing=no_torch)
        return Peer(Contender(name, make()), target, name=name)

    def plain_peer(name: str, run: Runner, target: float | None) -> Peer:
        return Peer(Contender(name, run), target, name=name)

    tf: Any = torch.futures if torch is not None else None
    th_future = thenable.Future
    return [
        OpBench(
            "1. Future()+set_result+wait",
            "op",
            Contender("thenable", _create_set_wait(th_future)),
            [
                torch_peer("torch.futures", lambda: _create_set_wait(tf.Future), 0.5),
                plain_peer("concurrent.futures", _create_set_result(cf.Future), None),
                plain_peer(
                    "asyncio (result())",
                    _create_set_result(lambda: asyncio.Future(loop=loop)),
                    None,
                ),
            ],
        ),
        OpBench(
            "2. then(cb)+set_result+wait",
            "op",
            Contender("thenable", _then_set_wait(th_future)),
            [torch_peer("torch.futures", lambda: _then_set_wait(tf.Future), 0.5)],
        ),
        OpBench(
            "3. add_done_callback+set_result",
            "op",
            Contender("thenable", _callback_set(th_future)),
            [
                torch_peer("torch.futures", lambda: _callback_set(tf.Future), 0.5),
                plain_peer("concurrent.futures", _callback_set(cf.Future), None),
            ],
        ),
        OpBench(
            f"4. then-chain ({CHAIN_LINKS:,} links)",
            "link",
            Contender("thenable", _chain(th_future)),
            [torch_peer("torch.futures", lambda: _chain(tf.Future), 0.5)],
        ),
        OpBench(
            f"5. collect_all ({COLLECT_K:,} fresh)",
            "future",
            Contender("thenable", _collect(th_future, thenable.collect_all)),
            [
                torch_peer(
                    "torch.futures",
                    lambda: _collect(tf.Future, tf.collect_all),
                    0.5,
                )
            ],
        ),
        OpBench(
            "6. fork+wait no-op",
            "call",
            Contender("thenable", _thenable_fork_wait),
            [
                torch_peer("TorchScript fork", lambda: _torchscript_fork_wait(torch), 1.5),
                plain_peer(
                    f"ThreadPoolExecutor({os.cpu_count()})",
                    _executor_submit_result(executor),
                    1 / 3,
                ),
                torch_peer("torch.jit.fork (eager)", lambda: _torch_eager_fork_wait(torch), None),
            ],
        ),
        OpBench(
            f"7. fan-out: fork {FAN_OUT:,}, wait each",
            "task",
            Contender("thenable", _thenable_fan_out),
            [torch_peer("TorchScript fork", lambda: _torchscript_fan_out(torch), 1.0)],
        ),
        OpBench(
            "9. fork+wait no-op under no_grad",
            "call",
            Contender(
                "thenable",
                _thenable_fork_wait_no_grad(torch) if torch is not None else _thenable_fork_wait,
            ),
            [
                plain_peer("thenable, default state", _thenable_fork_wait, None)
                if torch is not None
                else Peer(None, None, name="thenable, default state", missing=no_torch)
            ],
        ),
    ]


# -- running ------------------------------------------------------------------------------------


def _run_ops(ops: list[OpBench], rounds: int, sample_ns: float, gc_off: bool) -> None:
    for op in ops:
        for contender in op.contenders():
            contender.gc_off = gc_off
            contender.calibrate(sample_ns)
    for r in range(rounds):
        for op in ops:
            contenders = op.contenders()
            if r % 2:
                contenders.reverse()
            for contender in contenders:
                contender.sample()


def _run_parallel(
    benches: list[ParallelBench],
    runners: dict[str, Callable[[Callable[[int], None]], int]],
    rounds: int,
) -> None:
    names = list(runners)
    for bench in benches:  # warm-up: start the pools' threads
        for name in names:
            runners[name](bench.task)
    for r in range(rounds):
        for bench in benches:
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                elapsed = float(runners[name](bench.task))
                if name == "serial":
                    bench.serial.append(elapsed)
                else:
                    bench.forked.setdefault(name, []).append(elapsed)


# -- reporting ----------------------------------------------------------------------------------


def _fmt_ns(ns: float) -> str:
    if math.isnan(ns):
        return "-"
    return f"{ns:,.0f}" if ns >= 100 else f"{ns:.1f}"


def _verdict(value: float, target: float | None, *, at_least: bool = False) -> str:
    if target is None:
        return "info"
    if math.isnan(value):
        return "SKIP"
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "MISS"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _report_ops(ops: list[OpBench]) -> tuple[str, int, int]:
    rows: list[list[str]] = []
    passed = missed = 0
    for op in ops:
        th = op.thenable.samples
        th_ns = statistics.median(th)
        for peer in op.peers:
            target = "-" if peer.target is None else f"<= {peer.target:.2f}"
            if peer.contender is None:
                verdict = "SKIP" if peer.target is not None else "info"
                rows.append(
                    [f"{op.label} [ns/{op.unit}]", _fmt_ns(th_ns), peer.name, peer.missing,
                     "-", "-", "-", target, verdict]
                )  # fmt: skip
                continue
            ratios = [a / b for a, b in zip(th, peer.contender.samples, strict=True)]
            ratio = statistics.median(ratios)
            low, high = min(ratios), max(ratios)
            verdict = _verdict(high, peer.target)  # the worst round decides
            passed += verdict == "PASS"
            missed += verdict == "MISS"
            rows.append(
                [
                    f"{op.label} [ns/{op.unit}]",
                    _fmt_ns(th_ns),
                    peer.name,
                    _fmt_ns(statistics.median(peer.contender.samples)),
                    f"{ratio:.3f}",
                    f"{low:.2f}-{high:.2f}",
                    f"{high:.3f}",
                    target,
                    verdict,
                ]
            )
    headers = [
        "op",
        "thenable ns/op",
        "peer",
        "peer ns/op",
        "ratio (median)",
        "range, all rounds",
        "worst round",
        "target (worst round)",
        "result",
    ]
    return _table(headers, rows, right={1, 3, 4, 5, 6}), passed, missed


def _report_parallel(benches: list[ParallelBench], has_torch: bool) -> tuple[str, int, int]:
    rows: list[list[str]] = []
    passed = missed = 0
    for bench in benches:
        serial_ms = statistics.median(bench.serial) / 1e6
        names = list(bench.forked)
        if not has_torch:
            names.append("torch.jit.fork (eager)")
        for name in names:
            target = 1.8 if name == "thenable.fork" else None
            times = bench.forked.get(name)
            if times is None:
                rows.append(
                    [bench.label, f"{serial_ms:.1f}", name, "torch not installed", "-", "-",
                     "-", "info"]
                )  # fmt: skip
                continue
            speedups = [s / p for s, p in zip(bench.serial, times, strict=True)]
            speedup = statistics.median(speedups)
            low, high = _quartiles(speedups)
            verdict = _verdict(speedup, target, at_least=True)
            passed += verdict == "PASS"
            missed += verdict == "MISS"
            rows.append(
                [
                    bench.label,
                    f"{serial_ms:.1f}",
                    name,
                    f"{statistics.median(times) / 1e6:.1f}",
                    f"{speedup:.2f}x",
                    f"{low:.2f}-{high:.2f}",
                    "-" if target is None else f">= {target:.1f}x",
                    verdict,
                ]
            )
    headers = [
        "8. parallel speedup",
        "serial ms",
        "forked with",
        "forked ms",
        "speedup",
        "IQR",
        "target",
        "result",
    ]
    return _table(headers, rows, right={1, 3, 4, 5}), passed, missed


def _loadavg() -> str:
    """The 1-minute load average: above the CPU count, other processes were competing."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # not available on this platform
        return "n/a"


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few, short rounds")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds for ops 1-7 (default 25, or 5 with --quick); "
        "the parallel-speedup op runs about half as many (at least 3)",
    )
    parser.add_argument(
        "--no-gc",
        action="store_true",
        help="disable the cycle collector during samples, as timeit does (default: it runs, "
        "as in a real program, and each op pays for the collections its allocations trigger)",
    )
    parser.add_argument(
        "--fork-baseline",
        metavar="SRC",
        default=None,
        help="for op 10: a directory holding another thenable package (e.g. a scratch copy of an "
        "earlier commit's src/), whose fork cost child processes measure alongside this one's",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time ops 1-7, 9 and 10 by the wall clock (default) or by the process's CPU time "
        "(all its threads), which other processes on a loaded machine perturb less; CPU time "
        "leaves out the time threads wait for each other. Op 8 is always wall time",
    )
    parser.add_argument("--fork-cost-child", choices=["plain", "torch"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--watchdog",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="if the run takes longer, dump every thread's stack to stderr and exit 1 "
        "(a hang in a future or pool shows where it is stuck); 0 disables (default 600)",
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu":
        global perf_ns
        perf_ns = time.process_time_ns
    if args.fork_cost_child is not None:
        return _fork_cost_child(args.fork_cost_child, args.no_gc)
    if args.fork_baseline is not None and not os.path.isfile(
        os.path.join(args.fork_baseline, "thenable", "__init__.py")
    ):
        parser.error(f"--fork-baseline {args.fork_baseline}: no thenable/__init__.py there")
    rounds: int = args.rounds if args.rounds is not None else (5 if args.quick else 25)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    parallel_rounds = max(3, math.ceil(rounds / 2))
    sample_ns = 5e6 if args.quick else 30e6

    if args.watchdog < 0:
        parser.error("--watchdog must be >= 0")
    if args.watchdog:
        faulthandler.dump_traceback_later(args.watchdog, exit=True)

    started = time.perf_counter()
    # torch.jit.fork warns that it is deprecated on every eager call; keep the table readable.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(\.|$)")
    warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=DeprecationWarning)
    torch = _import_torch()

    import numpy as np

    cpus = os.cpu_count() or 1
    executor = cf.ThreadPoolExecutor(max_workers=cpus)
    loop = asyncio.new_event_loop()
    children: list[_ChildForkWait] = []
    try:
        sort_task, sort_size, sort_s = _make_sort_task()
        print(
            f"python {platform.python_version()} | thenable {thenable.__version__} | "
            f"torch {torch.__version__ if torch is not None else 'not installed'} | "
            f"numpy {np.__version__} | {cpus} CPUs | "
            f"thenable interop threads {thenable.get_num_interop_threads()} | "
            f"load average {_loadavg()}"
        )
        print(
            f"rounds {rounds} (speedup: {parallel_rounds}), ~{sample_ns / 1e6:.0f} ms per "
            f"sample, {args.clock} clock, cycle GC {'off' if args.no_gc else 'on'} in samples; "
            "contenders interleaved in alternating order; ns/op = median over rounds, "
            "ratio = median of per-round ratios thenable/peer",
            flush=True,
        )
        if torch is None:
            print("torch not installed: torch rows are skipped")

        ops = _build_ops(torch, executor, loop)
        ops += _fork_cost_ops(torch, args.fork_baseline, args.no_gc, args.clock, children)
        for runner in children:
            print(f"op 10 child: {runner.origin}")
        # Move everything alive so far (torch's objects above all) out of the collector's reach:
        # each sample starts with a gc.collect(), which then costs microseconds, not ~80 ms.
        gc.collect()
        gc.freeze()
        _run_ops(ops, rounds, sample_ns, args.no_gc)
        ops_table, ops_pass, ops_miss = _report_ops(ops)
        print()
        print(ops_table, flush=True)

        benches = [
            ParallelBench(f"{PARALLEL_TASKS} x time.sleep({SLEEP_S:g})", _sleep_task),
            ParallelBench(
                f"{PARALLEL_TASKS} x sort {sort_size / 1e6:.1f}M f64 (~{sort_s * 1e3:.0f} ms)",
                sort_task,
            ),
        ]
        _run_parallel(benches, _parallel_runners(torch, executor), parallel_rounds)
        par_table, par_pass, par_miss = _report_parallel(benches, torch is not None)
        print()
        print(par_table)
    finally:
        for runner in children:
            runner.close()
        executor.shutdown(wait=True)
        loop.close()

    faulthandler.cancel_dump_traceback_later()
    passed, missed = ops_pass + par_pass, ops_miss + par_miss
    print(
        f"\n{passed} PASS, {missed} MISS of {passed + missed} targets "
        f"({time.perf_counter() - started:.0f} s; load average now {_loadavg()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
