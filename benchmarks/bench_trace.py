#!/usr/bin/env python
"""What tracing costs: thenable's Future/fork rows and an RPC round trip, untraced vs traced.

Everything is interleaved round by round (the order alternating), so noise on a shared machine
hits both modes alike; each figure is the median over rounds, each ratio is taken per round.

- **Off** (no trace recording): the Future and fork hot paths are the untraced functions
  themselves (``_trace_hooks`` swaps traced ones in only while a trace records; the test suite
  checks the identity), so their rows are measured once, as the untraced figures.  The RPC path
  reads one module global (``_recorder.recording``) at four points of a round trip: the cost of
  those reads is measured here and shown as a share of the round trip.
- **On**: the same rows inside ``thenable.trace()``; the difference divided by the events each
  operation records is the cost of one event.

Usage::

    python benchmarks/bench_trace.py              # about 40 seconds
    python benchmarks/bench_trace.py --rounds 5   # a quicker look
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import _launch  # (beside this script)

import thenable
from thenable import rpc
from thenable._tracing import recorder as _recorder

perf_ns = time.perf_counter_ns
CHAIN_LINKS = 1_000
FAN_OUT = 2_000
RPC_CALLS = 2_000
# Checks of ``_recorder.recording`` on an untraced RPC round trip: the caller's call() and its
# reply's arrival, the callee's request arrival and its reply's send.
RPC_CHECKS = 4


def _value(f: Any) -> Any:
    return f.value()


def _noop_cb(f: Any) -> None:
    return None


def _noop() -> None:
    return None


def create_set_wait(n: int) -> None:
    for _ in range(n):
        f = thenable.Future()
        f.set_result(1)
        f.wait()


def then_set_wait(n: int) -> None:
    for _ in range(n):
        f = thenable.Future()
        g = f.then(_value)
        f.set_result(1)
        g.wait()


def callback_set(n: int) -> None:
    for _ in range(n):
        f = thenable.Future()
        f.add_done_callback(_noop_cb)
        f.set_result(1)


def chain(n: int) -> None:
    for _ in range(n):
        f = thenable.Future()
        g = f
        for _ in range(CHAIN_LINKS):
            g = g.then(lambda x: x.value() + 1)
        f.set_result(0)
        g.wait()


def fork_wait(n: int) -> None:
    for _ in range(n):
        thenable.wait(thenable.fork(_noop))


def fan_out(n: int) -> None:
    for _ in range(n):
        futures = [thenable.fork(_noop) for _ in range(FAN_OUT)]
        for future in futures:
            thenable.wait(future)


# (label, run, operations per call of run, unit per operation)
ROWS: list[tuple[str, Callable[[int], None], int, str]] = [
    ("Future() + set_result + wait", create_set_wait, 20_000, "op"),
    ("then + set_result + wait", then_set_wait, 20_000, "op"),
    ("add_done_callback + set_result", callback_set, 20_000, "op"),
    (f"then-chain of {CHAIN_LINKS:,}, per link", chain, 10, "link"),
    ("fork + wait of a no-op", fork_wait, 5_000, "op"),
    (f"fan-out of {FAN_OUT:,} forks, per task", fan_out, 5, "task"),
]


def _units(label: str, n: int) -> int:
    if "chain" in label:
        return n * CHAIN_LINKS
    if "fan-out" in label:
        return n * FAN_OUT
    return n


def _timed(run: Callable[[int], None], n: int, traced: bool) -> tuple[int, int]:
    """(elapsed ns, events recorded) of one sample; a trace's start and stop are not timed."""
    if not traced:
        start = perf_ns()
        run(n)
        return perf_ns() - start, 0
    recording = thenable.trace(buffer_events=1 << 22, all_workers=False).start()
    start = perf_ns()
    run(n)
    elapsed = perf_ns() - start
    trace = recording.stop()
    events = sum(1 for e in trace["traceEvents"] if e["ph"] != "M")
    return elapsed, events


def bench_futures(rounds: int) -> None:
    print(f"Future and fork rows ({rounds} rounds; ns per unit, medians)")
    print(f"{'operation':40} {'off':>9} {'on':>9} {'on/off':>7} {'events':>7} {'ns/event':>9}")
    for label, run, n, unit in ROWS:
        run(max(1, n // 10))  # warm up
        off: list[float] = []
        on: list[float] = []
        ratios: list[float] = []
        per_event: list[float] = []
        events_per_unit = 0.0
        units = _units(label, n)
        for i in range(rounds):
            order = (False, True) if i % 2 else (True, False)
            sample: dict[bool, tuple[int, int]] = {}
            for traced in order:
                sample[traced] = _timed(run, n, traced)
            off_ns, on_ns = sample[False][0] / units, sample[True][0] / units
            events_per_unit = sample[True][1] / units
            off.append(off_ns)
            on.append(on_ns)
            ratios.append(on_ns / off_ns)
            if events_per_unit:
                per_event.append((on_ns - off_ns) / events_per_unit)
        print(
            f"{label:40} {statistics.median(off):9.0f} {statistics.median(on):9.0f} "
            f"{statistics.median(ratios):7.2f} {events_per_unit:7.1f} "
            f"{statistics.median(per_event) if per_event else 0:9.0f}   (per {unit})"
        )


# -- RPC -----------------------------------------------------------------------------------------


def _serve() -> None:
    """The callee process: rank 1, which only answers until rank 0 shuts down."""
    rpc.init_rpc("callee", rank=1, world_size=2)
    rpc.shutdown()


def _check_cost_ns() -> float:
    """What one untraced check of ``_recorder.recording`` costs, in ns (over a no-op)."""
    recorder = _recorder

    def checked() -> None:
        if recorder.recording:
            pass

    def plain() -> None:
        pass

    best_checked = min(timeit.repeat(checked, number=200_000, repeat=7))
    best_plain = min(timeit.repeat(plain, number=200_000, repeat=7))
    return max(0.0, (best_checked - best_plain) / 200_000 * 1e9)


def bench_rpc(rounds: int) -> None:
    port = str(_launch.free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    env.pop("THENABLE_TRACE", None)
    callee = subprocess.Popen([sys.executable, __file__, "--serve"], env=env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    try:
        rpc.init_rpc("caller", rank=0, world_size=2)
        for _ in range(500):
            rpc.rpc_sync("callee", _noop)

        def sample(traced: bool) -> tuple[float, int]:
            recording = thenable.trace(buffer_events=1 << 20).start() if traced else None
            start = perf_ns()
            for _ in range(RPC_CALLS):
                rpc.rpc_sync("callee", _noop)
            elapsed = (perf_ns() - start) / RPC_CALLS
            if recording is None:
                return elapsed, 0
            trace = recording.stop()
            return elapsed, sum(1 for e in trace["traceEvents"] if e["ph"] != "M")

        off: list[float] = []
        on: list[float] = []
        events = 0
        for i in range(rounds):
            order = (False, True) if i % 2 else (True, False)
            got = {traced: sample(traced) for traced in order}
            off.append(got[False][0])
            on.append(got[True][0])
            events = got[True][1]
        rpc.shutdown()
    finally:
        callee.wait(60)
    check = _check_cost_ns()
    off_us, on_us = statistics.median(off) / 1000, statistics.median(on) / 1000
    per_call = events / RPC_CALLS
    print(f"\nRPC: rpc_sync of a no-op to another process ({rounds} rounds, medians)")
    print(f"  off: {off_us:.1f} us a round trip; on: {on_us:.1f} us ({on_us / off_us:.2f}x)")
    print(
        f"  on: {per_call:.1f} events a call (both sides), "
        f"{(on_us - off_us) * 1000 / per_call:.0f} ns an event"
    )
    share = RPC_CHECKS * check / (off_us * 1000) * 100
    print(
        f"  off: {RPC_CHECKS} checks of the recording flag a round trip, {check:.1f} ns each: "
        f"{share:.3f}% of the round trip"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        _serve()
        return
    print(
        f"thenable {thenable.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    bench_futures(options.rounds)
    bench_rpc(options.rounds)


if __name__ == "__main__":
    main()
