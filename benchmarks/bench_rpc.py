#!/usr/bin/env python
"""Side-by-side RPC benchmark: thenable.rpc vs torch.distributed.rpc (TensorPipe).

Both backends run in ONE invocation, one after the other, alternating from round to round
(round 1: thenable then torch; round 2: torch then thenable; ...), so that a burst of noise on a
shared machine hits both alike.  Every *run* of a backend starts fresh processes (spawn), picks
a free port and rendezvouses over ``tcp://127.0.0.1:PORT`` with the SAME code for both backends
(only the ``rpc`` module differs): ``init_rpc``, ``rpc_sync``, ``rpc_async``, ``remote``,
``shutdown``.  Rank 0 makes all the measurements (after a warm-up) and sends them to this
process; rank 1 only serves.  Every run has a time limit: a hang or a crash in either backend
becomes an error row (with the stacks of the hung process, dumped by faulthandler), never a
stuck benchmark.

Per-run values are the median of several samples; the table shows the median over rounds of
each backend and the per-round ratios thenable/torch (both measured in the same round): their
median, their range over rounds and the worst round.  A target must hold in the WORST round.

Every round also measures the physical floor (``rpc_floor.py``: a ping-pong of a small pickled
message between two processes over a Unix socket, with no framework; one numpy copy of the
payload into a preallocated buffer), and every row is shown as a multiple of its floor too:
times as time / ping-pong, the pipelined rate as calls/s x ping-pong time, bandwidths as
bandwidth / copy bandwidth.  Targets:

==========================================================  =====================================
rpc_sync round trip of a no-op, small args                   thenable/torch time <= 0.5,
                                                             thenable/floor time <= 1.5
pipelined rpc_async no-ops, 20,000 in flight                 thenable/torch calls/s >= 3
echo of a 1 MiB float32 tensor (sent and returned)           thenable/torch bandwidth >= 3
echo of a 100 MiB float32 tensor                             thenable/torch bandwidth >= 3,
                                                             thenable/floor bandwidth >= 0.5
``remote(torch.add, (ones(2), 1)).to_here()``                thenable/torch time <= 0.4
                                                             (2.5x faster)
==========================================================  =====================================

Bandwidth counts the bytes of the tensor both ways (sent + returned = 2 x its size), for both
backends.  Among the [info] rows, "CPU while idle" is the CPU both processes use in the second
after the no-op calls stop, in cores (1.0: one core busy all the time): what busy polling costs
when nobody calls.  The scale section (``--skip-scale`` to skip it) measures ``init_rpc`` and an
all-to-all round of no-ops at world sizes 2, 4, 8 and 16, and the latency of an echo of a uint8
tensor from 8 B to 100 MiB; it draws ``rpc_latency_vs_payload.png`` and
``rpc_init_vs_world_size.png`` (with matplotlib, when installed) and writes the tables to
``rpc_benchmark.md`` in ``--charts DIR``.

Usage::

    python benchmarks/bench_rpc.py                 # full run, about 6-10 minutes on 2 cores
    python benchmarks/bench_rpc.py --quick         # smoke run, under a minute (charts: tmp dir)
    python benchmarks/bench_rpc.py --rounds 9 --skip-scale
    python benchmarks/bench_rpc.py --charts /tmp/out

Both backends use what they would on one host: TensorPipe its default transports and channels
(shared memory and cross-memory-attach), thenable Unix-domain sockets and shared memory.
``--tcp-only`` restricts both to TCP: TensorPipe to its TCP transport ("uv") and "basic"
channel, thenable to ``same_host_ipc=False``.  The machines this was
written on have 2 cores and are shared: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import _launch  # (beside this script, as the next two)
import _report
import rpc_floor

T = TypeVar("T")

BACKENDS = ("thenable", "torch")
MIB = 1 << 20
PAYLOAD_SIZES = (8, 1 << 10, 64 << 10, 1 << 20, 16 << 20, 100 << 20)
WORLD_SIZES = (2, 4, 8, 16)
SMALL_ARGS = (1, "a")
PIPELINE_CALLS = 20_000
IDLE_S = 1.0  # how long the idle CPU is measured, after the no-op calls stop

perf = time.perf_counter


# -- RPC targets: module level, so that the callee unpickles them by name ----------------------
# Under spawn, this script is imported by every child as ``__mp_main__`` and pickled functions
# defined here refer to that module, which exists in every child alike.


def noop(*args: Any) -> None:
    """The no-op of the latency and throughput measurements."""
    return None


def cpu_seconds() -> float:
    """This process's CPU time so far (every thread), user plus system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def identity(x: T) -> T:
    """The callee of the echo measurements: returns its argument (sent back over the wire)."""
    return x


# -- what a run is told, and what it reports ---------------------------------------------------


@dataclass(frozen=True)
class Iters:
    """Iteration counts of one measurement run (scaled down by --quick)."""

    sync_warm: int = 500
    sync_n: int = 500
    sync_samples: int = 7
    pipe_warm: int = 2_000
    pipe_samples: int = 3
    echo1_warm: int = 20
    echo1_n: int = 40
    echo1_samples: int = 5
    echo100_warm: int = 2
    echo100_samples: int = 5
    remote_warm: int = 200
    remote_n: int = 200
    remote_samples: int = 5
    a2a_warm: int = 5
    a2a_rounds: int = 30
    payload_calls: tuple[int, ...] = (300, 300, 200, 40, 8, 4)


QUICK_ITERS = Iters(
    sync_warm=200,
    sync_n=200,
    sync_samples=3,
    pipe_warm=1_000,
    pipe_samples=1,
    echo1_warm=5,
    echo1_n=20,
    echo1_samples=3,
    echo100_warm=1,
    echo100_samples=2,
    remote_warm=50,
    remote_n=100,
    remote_samples=3,
    a2a_warm=2,
    a2a_rounds=10,
    payload_calls=(50, 50, 50, 10, 3, 2),
)


@dataclass(frozen=True)
class RunConfig:
    """One group of processes of one backend (picklable: sent to the spawned children)."""

    backend: str
    mode: str  # "pair": rank 0 measures the main metrics; "scale": init + all-to-all only
    world_size: int
    port: int
    iters: Iters
    payload_sweep: bool  # pair mode: also the latency vs payload sweep
    tcp_only: bool
    timeout_s: float  # the whole run; the children dump their stacks and exit a bit before
    rpc_timeout_s: float


@dataclass
class GroupResult:
    """What the processes of one run reported."""

    backend: str
    world_size: int
    values: dict[int, dict[str, float]] = field(default_factory=dict)  # rank -> name -> value
    errors: list[str] = field(default_factory=list)
    wall_s: float = math.nan

    def rank0(self, name: str) -> float | None:
        return self.values.get(0, {}).get(name)

    def max_over_ranks(self, name: str) -> float | None:
        found = [v[name] for v in self.values.values() if name in v]
        if len(found) < self.world_size:
            return None  # a rank did not report it: the figure would be partial
        return max(found)


# -- the child processes ------------------------------------------------------------------------


def _load_backend(cfg: RunConfig) -> tuple[ModuleType, Callable[[list[Any]], Any]]:
    """The ``rpc`` module of the backend and its ``wait_all``."""
    if cfg.backend == "thenable":
        import thenable
        from thenable import rpc as thenable_rpc

        return thenable_rpc, thenable.wait_all
    import torch.distributed.rpc as torch_rpc
    import torch.futures

    return torch_rpc, torch.futures.wait_all


def _options(rpc: ModuleType, cfg: RunConfig) -> Any:
    kwargs: dict[str, Any] = {
        "init_method": f"tcp://127.0.0.1:{cfg.port}",
        "rpc_timeout": cfg.rpc_timeout_s,
        "num_worker_threads": 16,
    }
    if cfg.tcp_only and cfg.backend == "torch":
        kwargs["_transports"] = ["uv"]
        kwargs["_channels"] = ["basic"]
    elif cfg.tcp_only:
        kwargs["same_host_ipc"] = False
    return rpc.TensorPipeRpcBackendOptions(**kwargs)


def _child_main(cfg: RunConfig, rank: int, barrier: Any, q: Any, log_path: str) -> None:
    """Entry point of every spawned process: init_rpc, measure (rank 0), shutdown."""
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)  # C++ logging and Python warnings go to the run's log file
    os.dup2(log.fileno(), 2)
    # A hang dumps every thread's stack into the log and exits, before the parent's kill.
    faulthandler.dump_traceback_later(cfg.timeout_s - min(10.0, 0.2 * cfg.timeout_s), exit=True)
    rep = _launch.Reporter(q, rank)
    try:
        if cfg.backend == "torch":
            os.environ.setdefault("TP_SOCKET_IFNAME", "lo")  # TensorPipe's TCP on loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        rpc, wait_all = _load_backend(cfg)
        if cfg.mode == "pair":
            import torch  # noqa: F401 - the payloads; imported before the clock starts

        rep.enter("barrier before init_rpc")
        barrier.wait(timeout=cfg.timeout_s)
        rep.enter("init_rpc")
        t0 = perf()
        rpc.init_rpc(
            f"w{rank}", rank=rank, world_size=cfg.world_size, rpc_backend_options=_options(rpc, cfg)
        )
        rep.value("init_s", perf() - t0)
        rep.value("ready_at", time.time())  # the parent subtracts the group's start time
        if cfg.mode == "pair" and rank == 0:
            _measure_pair(rpc, wait_all, cfg, rep)
        elif cfg.mode == "scale":
            rep.enter("barrier before all-to-all")
            barrier.wait(timeout=cfg.timeout_s)
            _measure_all_to_all(rpc, wait_all, cfg, rank, rep)
        rep.enter("shutdown")
        t0 = perf()
        rpc.shutdown(graceful=True, timeout=cfg.timeout_s)
        rep.value("shutdown_s", perf() - t0)
        rep.done()
    except BaseException:
        rep.error(traceback.format_exc())
        traceback.print_exc()
    finally:
        faulthandler.cancel_dump_traceback_later()
        with contextlib.suppress(BaseException):
            q.close()
            q.join_thread()  # what was put reaches the parent before the hard exit
        log.flush()
        # A hard exit: no interpreter teardown (atexit hooks, non-daemon threads) can hang it.
        os._exit(0)


def _per_op(fn: Callable[[], object], n: int, samples: int) -> float:
    """Median over ``samples`` of the mean time of ``fn()`` over ``n`` calls, in seconds."""
    times = []
    for _ in range(samples):
        t0 = perf()
        for _ in range(n):
            fn()
        times.append((perf() - t0) / n)
    return statistics.median(times)


def _each_op(fn: Callable[[], object], n: int) -> float:
    """Median time of ``n`` single calls of ``fn()``, in seconds."""
    times = []
    for _ in range(n):
        t0 = perf()
        fn()
        times.append(perf() - t0)
    return statistics.median(times)


def _measure_pair(
    rpc: ModuleType, wait_all: Callable[[list[Any]], Any], cfg: RunConfig, rep: _launch.Reporter
) -> None:
    """Rank 0 of a pair: the main metrics, each after its warm-up, against rank 1."""
    import torch

    it = cfg.iters
    dst = "w1"

    rep.enter("rpc_sync no-op")

    def sync_noop() -> None:
        rpc.rpc_sync(dst, noop, args=SMALL_ARGS)

    for _ in range(it.sync_warm):
        sync_noop()
    there, here = rpc.rpc_sync(dst, cpu_seconds), cpu_seconds()
    rep.value("sync_noop_s", _per_op(sync_noop, it.sync_n, it.sync_samples))
    spent = cpu_seconds() - here + rpc.rpc_sync(dst, cpu_seconds) - there
    rep.value("sync_cpu_s", spent / (it.sync_n * it.sync_samples))

    rep.enter("idle")  # what both processes burn while nobody calls (busy polling)
    there, here = rpc.rpc_sync(dst, cpu_seconds), cpu_seconds()
    time.sleep(IDLE_S)
    spent = cpu_seconds() - here + rpc.rpc_sync(dst, cpu_seconds) - there
    rep.value("idle_cores", spent / IDLE_S)

    rep.enter("rpc_sync torch.add")
    small = torch.ones(2)

    def sync_add() -> None:
        rpc.rpc_sync(dst, torch.add, args=(small, 3))

    if not torch.equal(rpc.rpc_sync(dst, torch.add, args=(small, 3)), small + 3):
        raise AssertionError("rpc_sync(torch.add) returned a wrong value")
    for _ in range(it.sync_warm // 2):
        sync_add()
    rep.value("sync_add_s", _per_op(sync_add, it.sync_n, it.sync_samples))

    rep.enter(f"pipelined rpc_async x {PIPELINE_CALLS}")

    def pipeline(n: int) -> float:
        t0 = perf()
        futs = [rpc.rpc_async(dst, noop, args=SMALL_ARGS) for _ in range(n)]
        wait_all(futs)
        return n / (perf() - t0)

    pipeline(it.pipe_warm)
    rates = [pipeline(PIPELINE_CALLS) for _ in range(it.pipe_samples)]
    rep.value("pipe_calls_per_s", statistics.median(rates))

    for label, numel, warm, n, samples in (
        ("echo1", MIB // 4, it.echo1_warm, it.echo1_n, it.echo1_samples),
        ("echo100", 100 * MIB // 4, it.echo100_warm, 1, it.echo100_samples),
    ):
        rep.enter(f"{label} (float32 tensor of {numel * 4} bytes)")
        tensor = torch.rand(numel)
        back = rpc.rpc_sync(dst, identity, args=(tensor,))
        if not torch.equal(back, tensor):
            raise AssertionError(f"{label}: the echoed tensor differs from the one sent")
        del back

        def echo(t: Any = tensor) -> None:
            rpc.rpc_sync(dst, identity, args=(t,))

        for _ in range(warm):
            echo()
        seconds = _per_op(echo, n, samples)
        rep.value(f"{label}_s", seconds)
        rep.value(f"{label}_gbps", 2 * tensor.numel() * tensor.element_size() / seconds / 1e9)
        del tensor

    rep.enter("remote().to_here()")

    def remote_to_here() -> None:
        rpc.remote(dst, torch.add, args=(small, 1)).to_here()

    if not torch.equal(rpc.remote(dst, torch.add, args=(small, 1)).to_here(), small + 1):
        raise AssertionError("remote(torch.add).to_here() returned a wrong value")
    for _ in range(it.remote_warm):
        remote_to_here()
    rep.value("remote_s", _per_op(remote_to_here, it.remote_n, it.remote_samples))

    if cfg.payload_sweep:
        for size, calls in zip(PAYLOAD_SIZES, it.payload_calls, strict=True):
            rep.enter(f"payload sweep, uint8 tensor of {size} bytes")
            payload = torch.randint(0, 256, (size,), dtype=torch.uint8)
            if not torch.equal(rpc.rpc_sync(dst, identity, args=(payload,)), payload):
                raise AssertionError(f"echo of {size} bytes: the echoed tensor differs")

            def echo_payload(t: Any = payload) -> None:
                rpc.rpc_sync(dst, identity, args=(t,))

            for _ in range(max(2, calls // 10)):
                echo_payload()
            rep.value(f"payload_s:{size}", _each_op(echo_payload, calls))
            del payload


def _measure_all_to_all(
    rpc: ModuleType,
    wait_all: Callable[[list[Any]], Any],
    cfg: RunConfig,
    rank: int,
    rep: _launch.Reporter,
) -> None:
    """Every rank: rpc_async a no-op to every other rank, wait_all; the median round time."""
    others = [f"w{r}" for r in range(cfg.world_size) if r != rank]
    rep.enter("all-to-all")

    def one_round() -> None:
        wait_all([rpc.rpc_async(to, noop, args=SMALL_ARGS) for to in others])

    for _ in range(cfg.iters.a2a_warm):
        one_round()
    rep.value("a2a_s", _each_op(one_round, cfg.iters.a2a_rounds))


# -- the parent: start, watch and collect a group -------------------------------------------------


def run_group(cfg: RunConfig, log_dir: Path, tag: str) -> GroupResult:
    """Start ``cfg.world_size`` processes, collect their reports, make sure they are gone."""
    barrier: Any = _launch.SPAWN.Barrier(cfg.world_size)
    logs = [log_dir / f"{tag}-rank{r}.log" for r in range(cfg.world_size)]
    outcome = _launch.run_processes(
        _child_main,
        lambda r, reports: (cfg, r, barrier, reports, str(logs[r])),
        logs,
        cfg.timeout_s,
        f"bench-{cfg.backend}",
        error_grace_s=20.0,
    )
    result = GroupResult(
        cfg.backend, cfg.world_size, outcome.values, outcome.errors, outcome.wall_s
    )
    for values in result.values.values():
        if "ready_at" in values:
            values["start_to_ready_s"] = values.pop("ready_at") - outcome.started_at
    return result


# -- the schedule ---------------------------------------------------------------------------------


@dataclass
class Collected:
    """Per backend, per metric, the value of every round (None where the run failed)."""

    pair: dict[str, list[GroupResult]] = field(default_factory=dict)
    floor: list[dict[str, float]] = field(default_factory=list)  # rpc_floor.measure(), a round
    scale: dict[tuple[str, int], list[GroupResult]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _order(round_index: int) -> tuple[str, ...]:
    return BACKENDS if round_index % 2 == 0 else BACKENDS[::-1]


def _note_errors(col: Collected, res: GroupResult, what: str) -> None:
    if res.errors:
        col.errors.append(f"[{what}]\n" + "\n".join(res.errors))
        print(f"    ERROR in {what}: {res.errors[0].splitlines()[0][:200]}", flush=True)


def run_all(args: argparse.Namespace, log_dir: Path) -> Collected:
    col = Collected()
    iters = QUICK_ITERS if args.quick else Iters()
    pair_timeout = args.run_timeout or (60.0 if args.quick else 240.0)
    for b in BACKENDS:
        col.pair[b] = []
    for i in range(args.rounds):
        col.floor.append(rpc_floor.measure())
        print(
            f"  round {i + 1}, floor: ping-pong {col.floor[-1]['pingpong_s'] * 1e6:.1f} us, "
            f"copy of 100 MiB {col.floor[-1]['copy100_gbps']:.2f} GB/s",
            flush=True,
        )
        for b in _order(i):
            cfg = RunConfig(
                backend=b,
                mode="pair",
                world_size=2,
                port=_launch.free_port(),
                iters=iters,
                payload_sweep=not args.skip_scale,
                tcp_only=args.tcp_only,
                timeout_s=pair_timeout,
                rpc_timeout_s=60.0,
            )
            what = f"round {i + 1}, {b}"
            res = run_group(cfg, log_dir, f"r{i + 1}-{b}-pair")
            col.pair[b].append(res)
            print(f"  {what}: {res.wall_s:.1f} s", flush=True)
            _note_errors(col, res, what)
    if args.skip_scale:
        return col
    sizes = WORLD_SIZES[:2] if args.quick else WORLD_SIZES
    scale_rounds = args.scale_rounds or (1 if args.quick else min(3, args.rounds))
    for i in range(scale_rounds):
        for ws in sizes:
            for b in _order(i):
                if b == "torch" and args.no_torch_scale:
                    continue
                cfg = RunConfig(
                    backend=b,
                    mode="scale",
                    world_size=ws,
                    port=_launch.free_port(),
                    iters=iters,
                    payload_sweep=False,
                    tcp_only=args.tcp_only,
                    timeout_s=args.run_timeout or (60.0 + 6.0 * ws),
                    rpc_timeout_s=60.0,
                )
                what = f"scale round {i + 1}, world size {ws}, {b}"
                res = run_group(cfg, log_dir, f"s{i + 1}-ws{ws}-{b}")
                col.scale.setdefault((b, ws), []).append(res)
                print(f"  {what}: {res.wall_s:.1f} s", flush=True)
                _note_errors(col, res, what)
    return col


# -- the report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    kind: str  # "time" (lower is better) or "rate" (higher is better)
    unit: str
    target: float | None  # ratio thenable/torch: at most (time) or at least (rate)
    floor: str | None = None  # the key of its floor in rpc_floor.measure()
    floor_target: float | None = None  # ratio thenable/floor, as `target`


METRICS = (
    Metric(
        "sync_noop_s",
        "rpc_sync round trip, no-op, small args",
        "time",
        "us",
        0.5,
        "pingpong_s",
        1.5,
    ),
    Metric(
        "pipe_calls_per_s",
        "pipelined rpc_async no-ops, 20,000 in flight",
        "rate",
        "calls/s",
        3,
        "pingpong_s",
    ),
    Metric(
        "echo1_gbps",
        "echo of a 1 MiB float32 tensor (bytes both ways)",
        "rate",
        "GB/s",
        3,
        "copy1_gbps",
    ),
    Metric(
        "echo100_gbps",
        "echo of a 100 MiB float32 tensor (bytes both ways)",
        "rate",
        "GB/s",
        3,
        "copy100_gbps",
        0.5,
    ),
    Metric(
        "remote_s", "remote(torch.add, (ones(2), 1)).to_here()", "time", "us", 0.4, "pingpong_s"
    ),
    Metric("sync_cpu_s", "CPU per no-op rpc_sync, both processes [info]", "time", "us", None),
    Metric(
        "sync_add_s", "rpc_sync(torch.add, (ones(2), 3)) [info]", "time", "us", None, "pingpong_s"
    ),
    Metric("idle_cores", "CPU while idle, both processes [info]", "time", "cores", None),
    Metric("echo1_s", "echo of a 1 MiB float32 tensor, round trip [info]", "time", "ms", None),
    Metric("echo100_s", "echo of a 100 MiB float32 tensor, round trip [info]", "time", "ms", None),
    Metric("init_s", "init_rpc, 2 workers (max over ranks) [info]", "time", "ms", None),
    Metric("shutdown_s", "shutdown() on rank 0 [info]", "time", "ms", None),
)

_SCALE = {"us": 1e6, "ms": 1e3, "s": 1.0, "calls/s": 1.0, "GB/s": 1.0, "cores": 1.0}


def _fmt(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    v = value * _SCALE.get(unit, 1.0)
    if unit == "calls/s":
        return f"{v:,.0f}"
    if unit == "cores" and abs(v) < 1:
        return f"{v:.3f}"  # (an idle thenable worker uses a few thousandths)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _pair_value(res: GroupResult, key: str) -> float | None:
    if key == "init_s":
        return res.max_over_ranks("init_s")
    return res.rank0(key)


@dataclass
class Row:
    cells: list[str]


def _round_ratios(t_vals: Sequence[float | None], p_vals: Sequence[float | None]) -> list[float]:
    """The per-round ratios t/p (both measured in the same round), where both exist."""
    return [
        t / p
        for t, p in zip(t_vals, p_vals, strict=False)
        if t is not None and p is not None and p > 0
    ]


def _ratio_verdict(
    ratios: Sequence[float], kind: str, target: float | None
) -> tuple[list[str], bool | None]:
    """Cells median / range / worst round / target / result, and the verdict (None: info).

    The worst round decides: the highest ratio of a time, the lowest of a rate.
    """
    if not ratios:
        return ["-", "-", "-", "-" if target is None else f"{target:g}", "ERROR"], (
            None if target is None else False
        )
    worst = max(ratios) if kind == "time" else min(ratios)
    cells = [
        f"{statistics.median(ratios):.2f}",
        f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "-",
        f"{worst:.2f}",
    ]
    if target is None:
        return [*cells, "-", "info"], None
    ok = worst <= target if kind == "time" else worst >= target
    op = "<=" if kind == "time" else ">="
    return [*cells, f"{op} {target:g}", "PASS" if ok else "MISS"], ok


def _as_floor_ratio(value: float | None, floor: float | None, unit: str) -> float | None:
    """A row's value in a comparable form to its floor: a rate of calls becomes the time a
    call takes (so that thenable/floor reads as a multiple of the ping-pong time)."""
    if value is None or floor is None:
        return None
    if unit == "calls/s":
        return (1.0 / value) / floor if value > 0 else None
    return value / floor


def _runs_note(vals: Sequence[float | None]) -> str:
    ok = sum(v is not None for v in vals)
    return "" if ok == len(vals) else f" (ERROR in {len(vals) - ok}/{len(vals)} runs)"


def main_table(col: Collected) -> tuple[list[str], list[list[str]], list[bool | None]]:
    header = [
        "metric",
        "unit",
        "thenable",
        "torch",
        "floor",
        "thenable/torch",
        "range",
        "worst round",
        "target",
        "result",
        "thenable/floor",
        "range",
        "worst round",
        "target",
        "result",
    ]
    rows: list[list[str]] = []
    verdicts: list[bool | None] = []
    for m in METRICS:
        t_vals = [_pair_value(r, m.key) for r in col.pair["thenable"]]
        p_vals = [_pair_value(r, m.key) for r in col.pair["torch"]]
        t_med = _report.median(t_vals)
        p_med = _report.median(p_vals)
        torch_cells, ok = _ratio_verdict(_round_ratios(t_vals, p_vals), m.kind, m.target)
        verdicts.append(ok)
        if m.floor is None:
            floor_text, floor_cells = "-", ["-"] * 5
        else:
            f_vals = [f.get(m.floor) for f in col.floor]
            f_unit = "us" if m.floor.endswith("_s") else "GB/s"
            floor_text = _fmt(_report.median(f_vals), f_unit) + f" {f_unit}"
            # A rate of calls against the ping-pong's time: compare the time per call.
            kind = "time" if m.unit == "calls/s" else m.kind
            ratios = [
                r
                for r in (
                    _as_floor_ratio(t, f, m.unit) for t, f in zip(t_vals, f_vals, strict=False)
                )
                if r is not None
            ]
            floor_cells, floor_ok = _ratio_verdict(ratios, kind, m.floor_target)
            verdicts.append(floor_ok)
        rows.append(
            [
                m.label,
                m.unit,
                _fmt(t_med, m.unit) + _runs_note(t_vals),
                _fmt(p_med, m.unit) + _runs_note(p_vals),
                floor_text,
                *torch_cells,
                *floor_cells,
            ]
        )
    return header, rows, verdicts


def _size_label(size: int) -> str:
    if size >= MIB:
        return f"{size // MIB} MiB"
    if size >= 1024:
        return f"{size // 1024} KiB"
    return f"{size} B"


def payload_table(col: Collected) -> tuple[list[str], list[list[str]], dict[str, list[float]]]:
    header = [
        "payload (uint8)",
        "thenable",
        "torch",
        "thenable/torch",
        "thenable GB/s",
        "torch GB/s",
    ]
    rows: list[list[str]] = []
    series: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for size in PAYLOAD_SIZES:
        key = f"payload_s:{size}"
        per_b = {b: [r.rank0(key) for r in col.pair[b]] for b in BACKENDS}
        meds = {b: _report.median(per_b[b]) for b in BACKENDS}
        for b in BACKENDS:
            series[b].append(math.nan if meds[b] is None else meds[b] or math.nan)
        ratios = _round_ratios(per_b["thenable"], per_b["torch"])
        ratio = statistics.median(ratios) if ratios else None

        def lat(v: float | None) -> str:
            if v is None:
                return "-"
            return f"{v * 1e6:,.0f} us" if v < 0.01 else f"{v * 1e3:,.1f} ms"

        def bw(v: float | None, size: int = size) -> str:
            return "-" if not v else f"{2 * size / v / 1e9:.3g}"

        rows.append(
            [
                _size_label(size),
                lat(meds["thenable"]),
                lat(meds["torch"]),
                "-" if ratio is None else f"{ratio:.2f}",
                bw(meds["thenable"]),
                bw(meds["torch"]),
            ]
        )
    return header, rows, series


SCALE_KEYS = ("init_s", "start_to_ready_s", "a2a_s")


def scale_table(
    col: Collected, sizes: Sequence[int]
) -> tuple[list[str], list[list[str]], dict[str, dict[str, list[float]]]]:
    header = [
        "world size",
        "init_rpc thenable",
        "init_rpc torch",
        "thenable/torch",
        "spawn->ready thenable",
        "spawn->ready torch",
        "thenable/torch",
        "all-to-all thenable",
        "all-to-all torch",
        "thenable/torch",
    ]
    rows: list[list[str]] = []
    series: dict[str, dict[str, list[float]]] = {b: {k: [] for k in SCALE_KEYS} for b in BACKENDS}
    for ws in sizes:
        cells = [str(ws)]
        for key in SCALE_KEYS:
            per_b = {
                b: [r.max_over_ranks(key) for r in col.scale.get((b, ws), [])] for b in BACKENDS
            }
            meds = {b: _report.median(per_b[b]) for b in BACKENDS}
            for b in BACKENDS:
                series[b][key].append(math.nan if meds[b] is None else meds[b] or math.nan)
            ratios = _round_ratios(per_b["thenable"], per_b["torch"])
            ratio = statistics.median(ratios) if ratios else None
            for b in BACKENDS:
                runs = per_b[b]
                if not runs:
                    cells.append("not run")
                else:
                    cells.append(_fmt(meds[b], "ms") + " ms" + _runs_note(runs))
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        rows.append(cells)
    return header, rows, series


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# -- charts ---------------------------------------------------------------------------------------


def write_charts(
    out: Path,
    payload: dict[str, list[float]] | None,
    scale: dict[str, dict[str, list[float]]] | None,
    sizes: Sequence[int],
) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("note: matplotlib is not installed; no charts (pip install matplotlib)")
        return []
    written: list[Path] = []
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    # Minor ticks of a log axis: label only 2x and 5x a power of ten, to stay readable.
    sparse = FuncFormatter(lambda v, _pos: f"{v:g}" if v > 0 and f"{v:e}"[0] in "25" else "")
    if payload is not None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        _plot_backends(ax, PAYLOAD_SIZES, payload)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(PAYLOAD_SIZES), [_size_label(s) for s in PAYLOAD_SIZES])
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.set_xlabel("payload (uint8 tensor, echoed: sent and returned)")
        ax.set_ylabel("rpc_sync round trip, median (ms)")
        ax.set_title("RPC echo latency vs payload (2 processes, loopback)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "rpc_latency_vs_payload.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if scale is not None:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
        for ax, key, title in (
            (axes[0], "init_s", "init_rpc (ranks released together)"),
            (axes[1], "start_to_ready_s", "spawn -> all ranks initialized"),
            (axes[2], "a2a_s", "all-to-all round of no-op rpc_async"),
        ):
            _plot_backends(ax, sizes, {b: scale[b][key] for b in BACKENDS})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(list(sizes), [str(s) for s in sizes])
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
            ax.set_xlabel("world size (processes)")
            ax.set_ylabel("ms, max over ranks (median over rounds)")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = out / "rpc_init_vs_world_size.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _plot_backends(ax: Any, xs: Sequence[int], seconds: dict[str, list[float]]) -> None:
    """One line per backend: ``seconds[backend][i]`` at ``xs[i]``, in ms; NaN points left out."""
    style = {"thenable": ("tab:blue", "o"), "torch": ("tab:orange", "s")}
    for b in BACKENDS:
        color, marker = style[b]
        pts = [(x, v) for x, v in zip(xs, seconds[b], strict=True) if not math.isnan(v)]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] * 1e3 for p in pts],
                marker=marker,
                color=color,
                label="thenable.rpc" if b == "thenable" else "torch.distributed.rpc",
            )


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of the main metrics (default 5; quick 2)"
    )
    parser.add_argument("--skip-scale", action="store_true", help="no scale/payload section")
    parser.add_argument(
        "--scale-rounds", type=int, default=None, help="rounds of the world-size sweep (3)"
    )
    parser.add_argument(
        "--no-torch-scale", action="store_true", help="world-size sweep for thenable only"
    )
    parser.add_argument(
        "--charts",
        type=Path,
        default=None,
        help="where the charts and rpc_benchmark.md go (default: docs/ of the repository; "
        "with --quick, a temporary directory unless given)",
    )
    parser.add_argument(
        "--tcp-only",
        action="store_true",
        help="both over TCP: TensorPipe with its uv transport and basic channel, thenable with "
        "same_host_ipc=False",
    )
    parser.add_argument(
        "--run-timeout", type=float, default=None, help="seconds a run may take (else an error)"
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    if args.charts is not None:
        out = args.charts
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="bench_rpc_charts_"))
    else:
        out = Path(__file__).resolve().parent.parent / "docs"
    log_dir = Path(tempfile.mkdtemp(prefix="bench_rpc_logs_"))

    env_before = _report.environment()
    print(f"bench_rpc: thenable.rpc vs torch.distributed.rpc; {env_before}", flush=True)
    print(
        f"{args.rounds} rounds, alternating order; logs of the worker processes in {log_dir}",
        flush=True,
    )
    t_start = perf()
    col = run_all(args, log_dir)
    elapsed = perf() - t_start
    env_after = _report.environment()

    header, rows, verdicts = main_table(col)
    sections_md: list[str] = []
    print()
    print(_report.plain(header, rows))
    sections_md.append(_markdown(header, rows))

    payload_series: dict[str, list[float]] | None = None
    scale_series: dict[str, dict[str, list[float]]] | None = None
    sizes = WORLD_SIZES[:2] if args.quick else WORLD_SIZES
    if not args.skip_scale:
        p_header, p_rows, payload_series = payload_table(col)
        print("\nLatency of an rpc_sync echo vs payload (median; GB/s counts both ways):")
        print(_report.plain(p_header, p_rows))
        sections_md.append(
            "Latency of an `rpc_sync` echo of a uint8 tensor vs its size (median over rounds; "
            "GB/s counts the bytes both ways):\n\n" + _markdown(p_header, p_rows)
        )
        s_header, s_rows, scale_series = scale_table(col, sizes)
        print(
            "\ninit_rpc, spawn->ready and an all-to-all round of no-ops vs world size "
            "(max over ranks; spawn->ready includes start-up and imports):"
        )
        print(_report.plain(s_header, s_rows))
        sections_md.append(
            "`init_rpc` (all ranks released together by a barrier, max over ranks), spawn->ready "
            "(from starting the processes to the last rank returned from `init_rpc`: includes "
            "Python start-up and imports; the torch workers import torch, the thenable workers "
            "do not) and an all-to-all round of no-op `rpc_async` calls (median round per rank, "
            "max over ranks) vs world size (median over rounds; below 1 is better for "
            "thenable):\n\n" + _markdown(s_header, s_rows)
        )

    ratio_note = (
        "thenable/torch is the median over rounds of the per-round ratio (both backends in the "
        "same round), with its range and its worst round, which decides the target; times: "
        "below 1 is better for thenable; rates and bandwidth: above 1 is better for thenable. "
        "Bandwidth counts the tensor's bytes both ways (sent + returned). thenable/floor: the "
        "same against the floor measured in that round (benchmarks/rpc_floor.py): times and "
        "the pipelined rate (as time per call) against a ping-pong of a small pickled message "
        "over a Unix socket, bandwidths against one numpy copy of the payload."
    )
    transports = (
        "both over TCP only (--tcp-only)"
        if args.tcp_only
        else "each with its same-host transports (TensorPipe: shm/cma; thenable: Unix sockets "
        "and shared memory)"
    )
    print(f"\n{ratio_note}\nTransports: {transports}.")
    print(f"Total {elapsed:.0f} s. Before: {env_before}\nAfter:  {env_after}")
    passed = sum(v is True for v in verdicts)
    targets = sum(v is not None for v in verdicts)
    print(f"{passed}/{targets} targets met.")

    if col.errors:
        print(f"\n{len(col.errors)} run(s) failed:")
        for e in col.errors:
            print(e)
            print()
        print(f"worker logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)

    out.mkdir(parents=True, exist_ok=True)
    charts = write_charts(out, payload_series, scale_series, sizes)
    md = [
        "<!-- written by benchmarks/bench_rpc.py -->",
        f"`python benchmarks/bench_rpc.py{' --quick' if args.quick else ''}` — "
        f"{args.rounds} rounds, 2 processes on loopback, alternating order; {env_after}; "
        f"Transports: {transports}.",
        "",
        sections_md[0],
        "",
        ratio_note,
    ]
    for extra in sections_md[1:]:
        md += ["", extra]
    for chart in charts:
        md += ["", f"![{chart.stem}]({chart.name})"]
    if col.errors:
        md += ["", f"{len(col.errors)} run(s) failed; the first lines of each:", ""]
        md += ["- " + " ".join(e.splitlines()[:2])[:300] for e in col.errors]
    (out / "rpc_benchmark.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {out / 'rpc_benchmark.md'}" + "".join(f", {c}" for c in charts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
