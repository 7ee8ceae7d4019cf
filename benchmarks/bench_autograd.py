#!/usr/bin/env python
"""Side-by-side training-step benchmark: thenable's RPC training stack vs torch's, by phase.

One invocation runs, for each configuration, the SAME training program twice: once on torch's
stack (``torch.distributed.rpc`` with TensorPipe, ``torch.distributed.autograd`` and
``torch.distributed.optim.DistributedOptimizer``) and once on thenable's (``thenable.rpc``,
``thenable.autograd`` and ``thenable.optim.DistributedOptimizer``); only the modules differ.
Every run starts fresh processes (spawn), picks a free port and rendezvouses over
``tcp://127.0.0.1:PORT``.  The order of the two backends alternates from round to round, so
that a burst of noise on a shared machine hits both alike.  Every run has a time limit: a hang
or a crash becomes an error (with the stacks of a hung process, dumped by faulthandler into its
log), never a stuck benchmark.

A step is one ``with dist_autograd.context() as cid:`` block, timed by phase: *forward* (the
RPC forward and the local loss), *backward* (``dist_autograd.backward(cid, [loss])``) and
*step* (``DistributedOptimizer.step(cid)``, with ``DistributedOptimizer(optim.SGD, ...,
lr=0.05)`` built once before the warm-up).

Workloads:

``ps-bag``  parameter server: the server holds ``EmbeddingBag(50_000, 128, mode="sum")`` and
        a ``Linear(128, 128)``; the trainer holds ``Linear(128, 10)`` and a cross-entropy loss
        and sends 64 bags of 20 indices with ``rpc_sync(server, forward_ps, args=(table_rref,
        dense_rref, indices))``.
``ps``  the same with ``Embedding(50_000, 128)``, 64 indices and ``Linear(128, 16)``.
        With ``--trainers 2`` (or more) every trainer steps against the server's one table at
        once (made once on the server, each trainer gets an RRef to it), each through a
        ``Linear(128, 128)`` of its own on the server: a shared Linear would fail both stacks'
        backward (another trainer's step changes a weight its backward needs), the table's
        backward needs only the indices.  Each trainer's optimizer holds the table, its own
        server Linear and its head.
``pipeline``  two-stage pipeline, 3 processes (the pattern of pytorch/examples'
        ``distributed/rpc/pipeline``, in our own code): stage 1 (``Linear(256, 256)``/ReLU x 2)
        on worker 1, stage 2 (``Linear(256, 256)``/ReLU, ``Linear(256, 10)``) on worker 2; the
        master splits a batch of 64 into 4 micro-batches and, for each, creates stage 1's output
        on worker 1 with ``rpc.remote`` and has worker 2 fetch it (``to_here``) and run stage 2
        in an ``rpc_async`` call; it waits for the 4 futures, concatenates, and takes a
        cross-entropy loss.  Each stage runs one micro-batch at a time (a lock), as in the
        example.  The master keeps its RRefs to stage 1's outputs until the step's stage-2 calls
        have returned.  One trainer only.

Threads: ``default`` leaves torch's intra-op threads as torch sets them (what a user runs);
``1`` sets one per process.  ``--busy N`` runs N busy processes (a Python spin loop each) beside
the whole benchmark, as on a shared machine.

After ``--warmup`` steps, every trainer times ``--steps`` steps (the trainers start them
together, at a barrier).  A run's phase times are means over its steps (and trainers); the job's
throughput is all trainers' steps over the time from the first start to the last end.  With one
trainer both backends start from the same seeds and the same batches, so they must reach the
same loss: a final loss that differs by more than ``--loss-rtol`` (relative) is an error, and so
is a remote parameter that training did not change.

Usage::

    python benchmarks/bench_autograd.py              # 3 rounds of every configuration
    python benchmarks/bench_autograd.py --quick      # smoke run: 1 round, few steps
    python benchmarks/bench_autograd.py --workloads ps-bag --threads default --trainers 1,2
    python benchmarks/bench_autograd.py --busy 2     # beside two busy processes
    python benchmarks/bench_autograd.py --backends torch     # one side only (no ratio)

The tables show, per configuration and phase, each backend's median over rounds, and the median
and the worst (largest) over rounds of the per-round ratio thenable/torch (both measured in the
same round; below 1 is better for thenable); for several trainers, the job's steps/s; and each
backend's spread, its slowest round's step time over its fastest.  Exit status 1 if any run
failed or a check did not hold.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

# The benchmarks' shared helpers (this directory is sys.path[0] when run as a script, and the
# spawned children inherit the parent's sys.path).
import _launch
import _report

BACKENDS = ("torch", "thenable")
WORKLOADS = ("ps-bag", "ps", "pipeline")
PHASES = ("forward", "backward", "step", "whole")
DESCRIPTION = {
    "ps-bag": "parameter server: EmbeddingBag(50k,128,sum)+Linear on the server, "
    "Linear(128,10) on each trainer; 64 bags of 20",
    "ps": "parameter server: Embedding(50k,128)+Linear on the server, Linear(128,16) on each "
    "trainer; 64 indices",
    "pipeline": "pipeline: 2 MLP stages on w1, w2; batch 64 in 4 micro-batches",
}
DEFAULT_THREADS = 0  # leave torch's intra-op threads as torch sets them

BATCH = 64
BAG = 20
NUM_EMBEDDINGS = 50_000
EMBED_DIM = 128
CLASSES = {"ps-bag": 10, "ps": 16}
PIPE_WIDTH = 256
PIPE_CLASSES = 10
MICRO_BATCHES = 4
DISTINCT_BATCHES = 16  # the batches, made up front from the seed, that training cycles through
LR = 0.05

perf = time.perf_counter  # CLOCK_MONOTONIC: one clock for every process of the machine


# -- the backend stack: set once per child process ---------------------------------------------


@dataclass(frozen=True)
class Stack:
    """The modules of one backend: everything else in a run is the same code."""

    name: str
    rpc: ModuleType
    dist_autograd: ModuleType
    DistributedOptimizer: Any
    wait_all: Callable[[list[Any]], Any]


_STACK: Stack | None = None


def _load_stack(backend: str) -> Stack:
    if backend == "thenable":
        import thenable
        import thenable.autograd as thenable_autograd
        from thenable import rpc as thenable_rpc
        from thenable.optim import DistributedOptimizer as ThenableDistributedOptimizer

        return Stack(
            "thenable",
            thenable_rpc,
            thenable_autograd,
            ThenableDistributedOptimizer,
            thenable.wait_all,
        )
    import torch.distributed.autograd as torch_autograd
    import torch.distributed.rpc as torch_rpc
    import torch.futures
    from torch.distributed.optim import DistributedOptimizer as TorchDistributedOptimizer

    return Stack(
        "torch", torch_rpc, torch_autograd, TorchDistributedOptimizer, torch.futures.wait_all
    )


def _stack() -> Stack:
    if _STACK is None:
        raise RuntimeError("the backend stack of this process is not loaded")
    return _STACK


# -- RPC targets: module level, so that the callee unpickles them by name ----------------------
# Under spawn, this script is imported by every child as ``__mp_main__``.

_LOCKS: dict[int, threading.Lock] = {}  # id(module) -> the lock its forward runs under
_SHARED: dict[tuple[str, int], Any] = {}  # (kind, seed) -> the RRef of the server's one model
_SHARED_LOCK = threading.Lock()


def make_module(kind: str, seed: int) -> Any:
    """Build a module on the worker that will own it (the target of ``rpc.remote``)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    module: Any
    if kind == "ps-bag":
        module = nn.EmbeddingBag(NUM_EMBEDDINGS, EMBED_DIM, mode="sum")
    elif kind == "ps":
        module = nn.Embedding(NUM_EMBEDDINGS, EMBED_DIM)
    elif kind == "dense":
        module = nn.Linear(EMBED_DIM, EMBED_DIM)
    elif kind == "stage1":
        module = nn.Sequential(
            nn.Linear(PIPE_WIDTH, PIPE_WIDTH),
            nn.ReLU(),
            nn.Linear(PIPE_WIDTH, PIPE_WIDTH),
            nn.ReLU(),
        )
    elif kind == "stage2":
        module = nn.Sequential(
            nn.Linear(PIPE_WIDTH, PIPE_WIDTH), nn.ReLU(), nn.Linear(PIPE_WIDTH, PIPE_CLASSES)
        )
    else:
        raise ValueError(f"unknown module kind {kind!r}")
    _LOCKS[id(module)] = threading.Lock()
    return module


def shared_model(kind: str, seed: int) -> Any:
    """The server's one model of ``kind`` (made by the first trainer to ask), as an RRef."""
    with _SHARED_LOCK:
        found = _SHARED.get((kind, seed))
        if found is None:
            found = _SHARED[(kind, seed)] = _stack().rpc.RRef(make_module(kind, seed))
        return found


def forward(module_rref: Any, x: Any) -> Any:
    """Run the owner's module on ``x``, one call at a time per module."""
    module = module_rref.local_value()
    with _LOCKS[id(module)]:
        return module(x)


def forward_ps(table_rref: Any, dense_rref: Any, indices: Any) -> Any:
    """The server's part of a trainer's forward: the shared table, then the trainer's dense
    layer (no lock: the table's backward saves no weight, so other trainers' steps cannot
    spoil it)."""
    return dense_rref.local_value()(table_rref.local_value()(indices))


def forward_fetched(module_rref: Any, x_rref: Any) -> Any:
    """Fetch the input from wherever its RRef lives (the previous stage), then ``forward``."""
    return forward(module_rref, x_rref.to_here())


def param_rrefs(module_rref: Any) -> list[Any]:
    """RRefs, owned here, to the parameters of the module (for the DistributedOptimizer)."""
    rref_cls = _stack().rpc.RRef
    return [rref_cls(p) for p in module_rref.local_value().parameters()]


def param_checksum(module_rref: Any) -> float:
    """The sum of every parameter of the module, in float64: did the optimizer change it?"""
    return float(
        sum(float(p.detach().double().sum()) for p in module_rref.local_value().parameters())
    )


# -- what a run is told ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One group of processes of one backend and configuration (picklable: sent to the
    children)."""

    backend: str
    workload: str
    trainers: int
    port: int
    steps: int
    warmup: int
    threads: int  # DEFAULT_THREADS: torch's own setting
    seed: int
    timeout_s: float  # the whole run; the children dump their stacks and exit a bit before
    rpc_timeout_s: float

    @property
    def world_size(self) -> int:
        return 3 if self.workload == "pipeline" else self.trainers + 1

    @property
    def config(self) -> Config:
        return Config(self.workload, self.threads, self.trainers)


@dataclass(frozen=True)
class Config:
    """What a row of the report is about: the same for both backends."""

    workload: str
    threads: int
    trainers: int

    def label(self) -> str:
        threads = "default" if self.threads == DEFAULT_THREADS else str(self.threads)
        return f"{self.workload}, threads {threads}, trainers {self.trainers}"


@dataclass
class RunResult:
    """What the trainers of one run reported (``values`` by rank), or why it failed."""

    backend: str
    config: Config
    values: dict[int, dict[str, float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    wall_s: float = math.nan

    def _trainers(self) -> list[dict[str, float]]:
        return [v for _, v in sorted(self.values.items()) if "whole_ms" in v]

    def phase_ms(self, phase: str) -> float | None:
        """The phase's mean ms per step, over the trainers."""
        trainers = self._trainers()
        if self.errors or len(trainers) != self.config.trainers:
            return None
        return statistics.fmean(v[f"{phase}_ms"] for v in trainers)

    def steps_per_s(self) -> float | None:
        """The job's throughput: every trainer's timed steps over first start to last end."""
        trainers = self._trainers()
        if self.errors or len(trainers) != self.config.trainers:
            return None
        span = max(v["end_s"] for v in trainers) - min(v["start_s"] for v in trainers)
        return sum(v["steps"] for v in trainers) / span if span > 0 else None


# -- the child processes ------------------------------------------------------------------------


def _child_main(
    cfg: RunConfig, rank: int, barrier: Any, trainer_barrier: Any, q: Any, log_path: str
) -> None:
    """Entry point of every spawned process: init_rpc, train (a trainer) or serve, shutdown."""
    global _STACK
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)  # C++ logging and Python warnings go to the run's log file
    os.dup2(log.fileno(), 2)
    faulthandler.dump_traceback_later(cfg.timeout_s - min(10.0, 0.2 * cfg.timeout_s), exit=True)
    rep = _launch.Reporter(q, rank)
    try:
        if cfg.backend == "torch":
            os.environ.setdefault("TP_SOCKET_IFNAME", "lo")  # TensorPipe's TCP on loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        rep.enter("imports")
        import torch

        if cfg.threads != DEFAULT_THREADS:
            torch.set_num_threads(cfg.threads)
        _STACK = stack = _load_stack(cfg.backend)
        rpc = stack.rpc
        rep.enter("barrier before init_rpc")
        barrier.wait(timeout=cfg.timeout_s)
        rep.enter("init_rpc")
        options = rpc.TensorPipeRpcBackendOptions(
            init_method=f"tcp://127.0.0.1:{cfg.port}",
            rpc_timeout=cfg.rpc_timeout_s,
            num_worker_threads=16,
        )
        t0 = perf()
        rpc.init_rpc(f"w{rank}", rank=rank, world_size=cfg.world_size, rpc_backend_options=options)
        rep.value("init_s", perf() - t0)
        if rank < cfg.trainers:
            if cfg.workload == "pipeline":
                _train_pipeline(stack, cfg, rep, trainer_barrier)
            else:
                _train_ps(stack, cfg, rank, rep, trainer_barrier)
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
        os._exit(0)  # no interpreter teardown (atexit hooks, non-daemon threads) can hang it


class _Phases:
    """Per-step times of each phase, in ms."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self._last = 0.0
        self._start = 0.0

    def begin(self) -> None:
        self._start = self._last = perf()

    def mark(self, phase: str) -> None:
        now = perf()
        self.times[phase].append((now - self._last) * 1e3)
        self._last = now

    def end(self) -> None:
        self.times["whole"].append((perf() - self._start) * 1e3)

    def clear(self) -> None:
        for times in self.times.values():
            times.clear()


def _timed_steps(
    step: Callable[[int, _Phases], float],
    cfg: RunConfig,
    rep: _launch.Reporter,
    checksum: Callable[[], float],
    trainer_barrier: Any,
) -> None:
    """Warm up, time ``cfg.steps`` steps (started with the other trainers), report; check
    that training changed the parameters."""
    before = checksum()
    rep.enter("warm-up")
    phases = _Phases()
    first_loss = math.nan
    for i in range(cfg.warmup):
        loss = step(i, phases)
        if i == 0:
            first_loss = loss
    phases.clear()
    rep.enter("barrier before the timed steps")
    trainer_barrier.wait(timeout=cfg.timeout_s)
    rep.enter("timed steps")
    loss = math.nan
    start = perf()
    for i in range(cfg.warmup, cfg.warmup + cfg.steps):
        loss = step(i, phases)
    end = perf()
    rep.enter("barrier after the timed steps")
    trainer_barrier.wait(timeout=cfg.timeout_s)  # no trainer's checks slow another's steps
    rep.enter("checks")
    after = checksum()
    if not math.isfinite(loss):
        raise AssertionError(f"the loss is not finite: {loss}")
    if after == before:
        raise AssertionError(
            "DistributedOptimizer.step did not change the remote parameters "
            f"(checksum {before!r} before training and after)"
        )
    for phase, times in phases.times.items():
        rep.value(f"{phase}_ms", statistics.fmean(times))
    rep.value("start_s", start)
    rep.value("end_s", end)
    rep.value("steps", cfg.steps)
    rep.value("first_loss", first_loss)
    rep.value("last_loss", loss)


def _check_local_gradients(dist_autograd: ModuleType, cid: int, params: Sequence[Any]) -> None:
    """``get_gradients(cid)`` on a trainer holds a gradient for each of its own parameters."""
    grads = dist_autograd.get_gradients(cid)
    for p in params:
        g = grads.get(p)
        if g is None or g.shape != p.shape:
            raise AssertionError(
                f"get_gradients: no gradient of shape {tuple(p.shape)} for a local parameter "
                f"(got {None if g is None else tuple(g.shape)}; {len(grads)} entries)"
            )


def _train_ps(
    stack: Stack, cfg: RunConfig, rank: int, rep: _launch.Reporter, trainer_barrier: Any
) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn, optim

    rpc, dist_autograd = stack.rpc, stack.dist_autograd
    server = f"w{cfg.trainers}"
    classes = CLASSES[cfg.workload]
    rep.enter("setup")
    table = rpc.rpc_sync(server, shared_model, args=(cfg.workload, cfg.seed))
    dense = rpc.remote(server, make_module, args=("dense", cfg.seed + 1 + rank))
    torch.manual_seed(cfg.seed + 1000 + rank)
    head = nn.Linear(EMBED_DIM, classes)
    gen = torch.Generator().manual_seed(cfg.seed + 100 * (rank + 1))
    shape = (BATCH, BAG) if cfg.workload == "ps-bag" else (BATCH,)
    batches = [
        (
            torch.randint(0, NUM_EMBEDDINGS, shape, generator=gen),
            torch.randint(0, classes, (BATCH,), generator=gen),
        )
        for _ in range(DISTINCT_BATCHES)
    ]
    remote_params = rpc.rpc_sync(server, param_rrefs, args=(table,))
    remote_params += rpc.rpc_sync(server, param_rrefs, args=(dense,))
    local_params = [rpc.RRef(p) for p in head.parameters()]
    opt = stack.DistributedOptimizer(optim.SGD, remote_params + local_params, lr=LR)

    def step(i: int, phases: _Phases) -> float:
        indices, targets = batches[i % DISTINCT_BATCHES]
        phases.begin()
        with dist_autograd.context() as cid:
            hidden = rpc.rpc_sync(server, forward_ps, args=(table, dense, indices))
            loss = F.cross_entropy(head(hidden), targets)
            phases.mark("forward")
            dist_autograd.backward(cid, [loss])
            phases.mark("backward")
            if i == 0:
                _check_local_gradients(dist_autograd, cid, list(head.parameters()))
            opt.step(cid)
            phases.mark("step")
        phases.end()
        return float(loss.detach())

    def checksum() -> float:
        remote: float = rpc.rpc_sync(server, param_checksum, args=(table,))
        remote += rpc.rpc_sync(server, param_checksum, args=(dense,))
        return remote + float(sum(float(p.detach().double().sum()) for p in head.parameters()))

    _timed_steps(step, cfg, rep, checksum, trainer_barrier)


def _train_pipeline(
    stack: Stack, cfg: RunConfig, rep: _launch.Reporter, trainer_barrier: Any
) -> None:
    import torch
    import torch.nn.functional as F
    from torch import optim

    rpc, dist_autograd, wait_all = stack.rpc, stack.dist_autograd, stack.wait_all
    rep.enter("setup")
    stage1 = rpc.remote("w1", make_module, args=("stage1", cfg.seed))
    stage2 = rpc.remote("w2", make_module, args=("stage2", cfg.seed + 1))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    batches = [
        (
            torch.randn(BATCH, PIPE_WIDTH, generator=gen),
            torch.randint(0, PIPE_CLASSES, (BATCH,), generator=gen),
        )
        for _ in range(DISTINCT_BATCHES)
    ]
    params = rpc.rpc_sync("w1", param_rrefs, args=(stage1,))
    params += rpc.rpc_sync("w2", param_rrefs, args=(stage2,))
    opt = stack.DistributedOptimizer(optim.SGD, params, lr=LR)

    def step(i: int, phases: _Phases) -> float:
        x, targets = batches[i % DISTINCT_BATCHES]
        phases.begin()
        with dist_autograd.context() as cid:
            futures, hidden = [], []
            for mb in torch.chunk(x, MICRO_BATCHES):
                hidden.append(rpc.remote("w1", forward, args=(stage1, mb)))
                futures.append(rpc.rpc_async("w2", forward_fetched, args=(stage2, hidden[-1])))
            out = torch.cat(wait_all(futures))
            del hidden  # kept until stage 2 has fetched them (see the module's docstring)
            loss = F.cross_entropy(out, targets)
            phases.mark("forward")
            dist_autograd.backward(cid, [loss])
            phases.mark("backward")
            opt.step(cid)
            phases.mark("step")
        phases.end()
        return float(loss.detach())

    def checksum() -> float:
        one: float = rpc.rpc_sync("w1", param_checksum, args=(stage1,))
        two: float = rpc.rpc_sync("w2", param_checksum, args=(stage2,))
        return one + two

    _timed_steps(step, cfg, rep, checksum, trainer_barrier)


# -- the parent: start, watch and collect a run ---------------------------------------------------


def run_group(cfg: RunConfig, log_dir: Path, tag: str) -> RunResult:
    """Start ``cfg.world_size`` processes, collect the trainers' reports, make sure they are
    gone."""
    barrier: Any = _launch.SPAWN.Barrier(cfg.world_size)
    trainer_barrier: Any = _launch.SPAWN.Barrier(cfg.trainers)
    logs = [log_dir / f"{tag}-rank{r}.log" for r in range(cfg.world_size)]
    outcome = _launch.run_processes(
        _child_main,
        lambda r, reports: (cfg, r, barrier, trainer_barrier, reports, str(logs[r])),
        logs,
        cfg.timeout_s,
        f"bench-{cfg.backend}-{cfg.workload}",
    )
    return RunResult(cfg.backend, cfg.config, outcome.values, outcome.errors, outcome.wall_s)


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` processes spinning in Python for the duration (the load of a shared machine)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


# -- the schedule and the report -----------------------------------------------------------------


@dataclass
class Collected:
    """Per (configuration, backend), the result of every round, in order."""

    runs: dict[tuple[Config, str], list[RunResult]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def phase(self, config: Config, backend: str, phase: str) -> list[float | None]:
        return [r.phase_ms(phase) for r in self.runs.get((config, backend), [])]

    def throughput(self, config: Config, backend: str) -> list[float | None]:
        return [r.steps_per_s() for r in self.runs.get((config, backend), [])]

    def ratios(self, config: Config, phase: str) -> list[float | None]:
        """Per round, thenable/torch of the phase's time (None where either run failed)."""
        return _ratios(self.phase(config, "thenable", phase), self.phase(config, "torch", phase))


def _ratios(mine: Sequence[float | None], theirs: Sequence[float | None]) -> list[float | None]:
    return [
        None if a is None or b is None or b <= 0 else a / b
        for a, b in zip(mine, theirs, strict=False)
    ]


def _order(round_index: int, backends: Sequence[str]) -> tuple[str, ...]:
    return tuple(backends) if round_index % 2 == 0 else tuple(backends)[::-1]


def _fmt_ms(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:,.0f}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _loss_problems(col: Collected, rtol: float) -> list[str]:
    """With one trainer, both backends trained the same model on the same batches: their final
    losses agree."""
    problems = []
    for (config, backend), torch_runs in col.runs.items():
        if backend != "torch" or config.trainers != 1:
            continue
        pairs = zip(torch_runs, col.runs.get((config, "thenable"), []), strict=False)
        for i, (p, t) in enumerate(pairs):
            if p.errors or t.errors:
                continue
            a, b = p.values[0].get("last_loss"), t.values[0].get("last_loss")
            if a is None or b is None:
                continue
            if abs(a - b) > rtol * max(abs(a), abs(b), 1e-12):
                problems.append(
                    f"{config.label()}, round {i + 1}: final loss differs: torch {a:.6g}, "
                    f"thenable {b:.6g} (relative tolerance {rtol:g})"
                )
    return problems


def configs(args: argparse.Namespace) -> list[Config]:
    out = []
    for workload in args.workloads:
        for threads in args.threads:
            for trainers in [1] if workload == "pipeline" else args.trainers:
                out.append(Config(workload, threads, trainers))
    return out


def run_all(args: argparse.Namespace, log_dir: Path) -> Collected:
    col = Collected()
    for i in range(args.rounds):
        order = _order(i, args.backends)
        print(f"round {i + 1}/{args.rounds} ({' then '.join(order)}):", flush=True)
        for config in configs(args):
            for b in order:
                cfg = RunConfig(
                    backend=b,
                    workload=config.workload,
                    trainers=config.trainers,
                    port=_launch.free_port(),
                    steps=args.steps,
                    warmup=args.warmup,
                    threads=config.threads,
                    seed=args.seed,
                    timeout_s=args.run_timeout,
                    rpc_timeout_s=60.0,
                )
                tag = f"r{i + 1}-{config.workload}-t{config.threads}-n{config.trainers}-{b}"
                res = run_group(cfg, log_dir, tag)
                col.runs.setdefault((config, b), []).append(res)
                if res.errors:
                    what = f"round {i + 1}, {config.label()}, {b}"
                    col.errors.append(f"[{what}]\n" + "\n".join(res.errors))
                    first = res.errors[0].strip().splitlines()
                    print(f"  {config.label()} {b}: ERROR {(first[-1] if first else '')[:200]}")
                else:
                    ms = " ".join(f"{p} {_fmt_ms(res.phase_ms(p))}" for p in PHASES)
                    rate = res.steps_per_s() or math.nan
                    print(
                        f"  {config.label()} {b:<8} ms: {ms}; {rate:.0f} steps/s; loss "
                        f"{res.values[0]['first_loss']:.4f} -> {res.values[0]['last_loss']:.4f}"
                        f" (run {res.wall_s:.1f} s)",
                        flush=True,
                    )
    return col


def _spread(values: Sequence[float | None]) -> float | None:
    """The slowest round over the fastest."""
    ok = [v for v in values if v is not None and v > 0]
    return max(ok) / min(ok) if ok else None


def phase_table(col: Collected, cfgs: Sequence[Config]) -> tuple[list[str], list[list[str]]]:
    header = [
        "configuration",
        "phase",
        "torch ms",
        "thenable ms",
        "thenable/torch median",
        "worst round",
        "per-round ratios",
    ]
    rows = []
    for config in cfgs:
        for phase in PHASES:
            ratios = col.ratios(config, phase)
            rows.append(
                [
                    config.label() if phase == PHASES[0] else "",
                    phase,
                    _fmt_ms(_report.median(col.phase(config, "torch", phase))),
                    _fmt_ms(_report.median(col.phase(config, "thenable", phase))),
                    _fmt_ratio(_report.median(ratios)),
                    _fmt_ratio(_report.worst(ratios)),
                    " ".join(_fmt_ratio(r) for r in ratios) or "-",
                ]
            )
    return header, rows


def job_table(col: Collected, cfgs: Sequence[Config]) -> tuple[list[str], list[list[str]]]:
    header = [
        "configuration",
        "torch steps/s",
        "thenable steps/s",
        "thenable/torch median",
        "worst round",
        "torch spread",
        "thenable spread",
    ]
    rows = []
    for config in cfgs:
        torch_rate, our_rate = col.throughput(config, "torch"), col.throughput(config, "thenable")
        ratios = _ratios(our_rate, torch_rate)
        rows.append(
            [
                config.label(),
                _fmt_ms(_report.median(torch_rate)),
                _fmt_ms(_report.median(our_rate)),
                _fmt_ratio(_report.median(ratios)),
                _fmt_ratio(_report.worst(ratios, larger_is_worse=False)),
                _fmt_ratio(_spread(col.phase(config, "torch", "whole"))),
                _fmt_ratio(_spread(col.phase(config, "thenable", "whole"))),
            ]
        )
    return header, rows


def _csv(
    parse_one: Callable[[str], Any], choices: Sequence[Any] | None = None
) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            items = [parse_one(s.strip()) for s in text.split(",") if s.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
        bad = [s for s in items if choices is not None and s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(map(str, choices or ()))}, "
                f"got {text!r}"
            )
        return list(dict.fromkeys(items))

    return parse


def _threads(text: str) -> int:
    if text == "default":
        return DEFAULT_THREADS
    value = int(text)
    if value < 1:
        raise ValueError("threads are 'default' or a count of at least 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("a count of trainers is at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 round of 3 warm-up + 10 steps"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (150)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per run (20)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of each torch/thenable pair (3)"
    )
    parser.add_argument(
        "--workloads",
        type=_csv(str, WORKLOADS),
        default=list(WORKLOADS),
        help=f"comma-separated: {','.join(WORKLOADS)} (all)",
    )
    parser.add_argument(
        "--threads",
        type=_csv(_threads),
        default=[DEFAULT_THREADS, 1],
        help="comma-separated torch intra-op threads per process: 'default' (torch's own) "
        "and/or counts (default,1)",
    )
    parser.add_argument(
        "--trainers",
        type=_csv(_count),
        default=[1, 2],
        help="comma-separated trainers per parameter server (1,2; the pipeline has one)",
    )
    parser.add_argument(
        "--busy", type=int, default=0, help="busy processes beside the benchmark (0)"
    )
    parser.add_argument(
        "--backends",
        type=_csv(str, BACKENDS),
        default=list(BACKENDS),
        help="comma-separated: torch,thenable (both; with one, no ratio)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the models and batches")
    parser.add_argument(
        "--loss-rtol",
        type=float,
        default=1e-3,
        help="how far (relative) the final losses of the two backends may differ (1e-3)",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=None,
        help="seconds a run may take, else an error (300; quick 120)",
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.quick else 150
    if args.warmup is None:
        args.warmup = 3 if args.quick else 20
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.run_timeout is None:
        args.run_timeout = 120.0 if args.quick else 300.0
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1 or args.busy < 0:
        parser.error("--steps, --warmup and --rounds must be >= 1, --busy >= 0")
    args.backends = [b for b in BACKENDS if b in args.backends]  # torch first in round 1

    log_dir = Path(tempfile.mkdtemp(prefix="bench_autograd_logs_"))
    with busy_processes(args.busy):
        env_before = _report.environment()
        print(f"bench_autograd: thenable vs torch RPC training stacks; {env_before}", flush=True)
        print(
            f"{args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed steps, "
            f"alternating order, {args.busy} busy process(es) beside; worker logs in {log_dir}",
            flush=True,
        )
        for w in args.workloads:
            print(f"  {w}: {DESCRIPTION[w]}")
        t_start = perf()
        col = run_all(args, log_dir)
        elapsed = perf() - t_start
        env_after = _report.environment()

    cfgs = configs(args)
    print()
    print(_report.plain(*phase_table(col, cfgs)))
    print()
    print(_report.plain(*job_table(col, cfgs)))
    print(
        "\nms: a phase's mean over a run's steps (and trainers), median over rounds; "
        "thenable/torch: per-round ratios (same round), their median and the worst round; "
        "steps/s: the whole job's; spread: a backend's slowest round over its fastest (step "
        "time). Below 1 is better for thenable in the ms ratios, above 1 in steps/s."
    )
    print(f"Total {elapsed:.0f} s. After: {env_after}")

    problems = _loss_problems(col, args.loss_rtol)
    for p in problems:
        print(f"CHECK FAILED: {p}")
    if col.errors:
        print(f"\n{len(col.errors)} run(s) failed:")
        for e in col.errors:
            print(e)
            print()
        print(f"worker logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 1 if col.errors or problems else 0


if __name__ == "__main__":
    sys.exit(main())
