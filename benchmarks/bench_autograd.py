#!/usr/bin/env python
"""Side-by-side training-step benchmark: thenable's RPC training stack vs torch's.

One invocation runs, for each workload, the SAME training program twice: once on torch's stack
(``torch.distributed.rpc`` with TensorPipe, ``torch.distributed.autograd`` and
``torch.distributed.optim.DistributedOptimizer``) and once on thenable's (``thenable.rpc``,
``thenable.autograd`` and ``thenable.optim.DistributedOptimizer``); only the modules differ.
Every run starts fresh processes (spawn), picks a free port and rendezvouses over
``tcp://127.0.0.1:PORT``.  Rank 0 trains and measures; the other ranks hold the remote modules
and serve.  The order of the two backends alternates from repeat to repeat (repeat 1: torch
then thenable; repeat 2: thenable then torch; ...), so that a burst of noise on a shared
machine hits both alike.  Every run has a time limit: a hang or a crash becomes an error (with
the stacks of a hung process, dumped by faulthandler into its log), never a stuck benchmark.

Workloads (each step is one ``with dist_autograd.context() as cid:`` block: forward through
RPC, loss on rank 0, ``dist_autograd.backward(cid, [loss])``, ``DistributedOptimizer.step(cid)``;
the optimizer, ``DistributedOptimizer(optim.SGD, param_rrefs, lr=0.05)``, is built once before
the warm-up):

``ps``  parameter server, 2 processes.  The trainer (rank 0) holds ``Linear(128, 16)`` and a
        cross-entropy loss; worker 1 holds ``Embedding(50_000, 128)`` + ``Linear(128, 128)``,
        created there with ``rpc.remote``.  A batch is 64 random indices, sent with
        ``rpc_sync(worker1, forward, args=(module_rref, indices))``.  The optimizer gets the
        remote parameters' RRefs (made on worker 1) and the trainer's own.
``pipeline``  two-stage pipeline, 3 processes (the pattern of pytorch/examples'
        ``distributed/rpc/pipeline``, in our own code): stage 1
        (``Linear(256, 256)``/ReLU x 2) on worker 1, stage 2 (``Linear(256, 256)``/ReLU,
        ``Linear(256, 10)``) on worker 2; the master splits a batch of 64 into 4 micro-batches
        and, for each, creates stage 1's output on worker 1 with ``rpc.remote`` and has worker
        2 fetch it (``to_here``) and run stage 2 in an ``rpc_async`` call; it waits for the 4
        futures, concatenates, and takes a cross-entropy loss.  Each stage runs one micro-batch
        at a time (a lock), as in the example.  The master keeps its RRefs to stage 1's outputs
        until the step's stage-2 calls have returned (the example drops each at once), so that
        no user's delete races the fetch of the fork it made; one torch run of the drop-at-once
        version hung (an RPC timeout in the forward) in testing, cause not confirmed.

After ``--warmup`` steps, rank 0 times ``--steps`` steps; ms/step is their mean.  Both backends
start from the same seeds and the same batches, so they must reach the same loss: a final loss
that differs by more than ``--loss-rtol`` (relative) is an error, and so is a remote parameter
that training did not change.  Torch's intra-op threads are set to ``--threads`` (1) in every
process: with 2-3 processes on a small machine, more only oversubscribes the cores.

Usage::

    python benchmarks/bench_autograd.py              # 3 repeats of 20 + 200 steps, ~2-4 min
    python benchmarks/bench_autograd.py --quick      # smoke run: 1 repeat of 3 + 10 steps
    python benchmarks/bench_autograd.py --repeat 5 --steps 500 --workloads ps
    python benchmarks/bench_autograd.py --backends torch     # one side only (no ratio)

The table shows, per workload, the median over repeats of each backend's ms/step and the
median, min and max of the per-repeat ratios thenable/torch (both measured in the same repeat;
below 1 is better for thenable).  Exit status 1 if any run failed or a check did not hold.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import math
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

# The helpers of the RPC benchmark (this directory is sys.path[0] when run as a script, and the
# spawned children inherit the parent's sys.path).
from bench_rpc import _environment, _free_port, _plain, _reap, _Reporter, _tail

BACKENDS = ("torch", "thenable")
WORKLOADS = ("ps", "pipeline")
WORLD_SIZE = {"ps": 2, "pipeline": 3}
DESCRIPTION = {
    "ps": "parameter server: Embedding(50k,128)+Linear on w1, Linear(128,16) on trainer",
    "pipeline": "pipeline: 2 MLP stages on w1, w2; batch 64 in 4 micro-batches",
}

BATCH = 64
NUM_EMBEDDINGS = 50_000
EMBED_DIM = 128
PS_CLASSES = 16
PIPE_WIDTH = 256
PIPE_CLASSES = 10
MICRO_BATCHES = 4
DISTINCT_BATCHES = 16  # the batches, made up front from the seed, that training cycles through
LR = 0.05

perf = time.perf_counter


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


def make_module(kind: str, seed: int) -> Any:
    """Build a module on the worker that will own it (the target of ``rpc.remote``)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    module: Any
    if kind == "embedding":
        module = nn.Sequential(
            nn.Embedding(NUM_EMBEDDINGS, EMBED_DIM), nn.Linear(EMBED_DIM, EMBED_DIM)
        )
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


def forward(module_rref: Any, x: Any) -> Any:
    """Run the owner's module on ``x``, one call at a time per module."""
    module = module_rref.local_value()
    with _LOCKS[id(module)]:
        return module(x)


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
    """One group of processes of one backend and workload (picklable: sent to the children)."""

    backend: str
    workload: str
    world_size: int
    port: int
    steps: int
    warmup: int
    threads: int
    seed: int
    timeout_s: float  # the whole run; the children dump their stacks and exit a bit before
    rpc_timeout_s: float


@dataclass
class RunResult:
    """What rank 0 of one run reported (``values``), or why it failed (``errors``)."""

    backend: str
    workload: str
    values: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    wall_s: float = math.nan

    @property
    def step_ms(self) -> float | None:
        if self.errors or "step_s" not in self.values:
            return None
        return self.values["step_s"] * 1e3


# -- the child processes ------------------------------------------------------------------------


def _child_main(cfg: RunConfig, rank: int, barrier: Any, q: Any, log_path: str) -> None:
    """Entry point of every spawned process: init_rpc, train (rank 0) or serve, shutdown."""
    global _STACK
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)  # C++ logging and Python warnings go to the run's log file
    os.dup2(log.fileno(), 2)
    faulthandler.dump_traceback_later(cfg.timeout_s - min(10.0, 0.2 * cfg.timeout_s), exit=True)
    rep = _Reporter(q, rank)
    try:
        if cfg.backend == "torch":
            os.environ.setdefault("TP_SOCKET_IFNAME", "lo")  # TensorPipe's TCP on loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        rep.enter("imports")
        import torch

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
        if rank == 0:
            train = _train_ps if cfg.workload == "ps" else _train_pipeline
            train(stack, cfg, rep)
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


def _timed_steps(
    step: Callable[[int], float],
    cfg: RunConfig,
    rep: _Reporter,
    checksum: Callable[[], float],
    t_setup: float,
) -> None:
    """Warm up, time ``cfg.steps`` steps, report; check that training changed the parameters."""
    rep.value("setup_s", perf() - t_setup)
    before = checksum()
    rep.enter("warm-up")
    first_loss = math.nan
    for i in range(cfg.warmup):
        loss = step(i)
        if i == 0:
            first_loss = loss
    rep.enter("timed steps")
    times: list[float] = []
    loss = math.nan
    t_all = perf()
    for i in range(cfg.warmup, cfg.warmup + cfg.steps):
        t0 = perf()
        loss = step(i)
        times.append(perf() - t0)
    total = perf() - t_all
    rep.enter("checks")
    after = checksum()
    if not math.isfinite(loss):
        raise AssertionError(f"the loss is not finite: {loss}")
    if after == before:
        raise AssertionError(
            "DistributedOptimizer.step did not change the remote parameters "
            f"(checksum {before!r} before training and after)"
        )
    rep.value("step_s", total / cfg.steps)
    rep.value("step_median_s", statistics.median(times))
    rep.value("first_loss", first_loss)
    rep.value("last_loss", loss)


def _check_local_gradients(dist_autograd: ModuleType, cid: int, params: Sequence[Any]) -> None:
    """``get_gradients(cid)`` on rank 0 holds a gradient for each of its own parameters."""
    grads = dist_autograd.get_gradients(cid)
    for p in params:
        g = grads.get(p)
        if g is None or g.shape != p.shape:
            raise AssertionError(
                f"get_gradients: no gradient of shape {tuple(p.shape)} for a local parameter "
                f"(got {None if g is None else tuple(g.shape)}; {len(grads)} entries)"
            )


def _train_ps(stack: Stack, cfg: RunConfig, rep: _Reporter) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn, optim

    rpc, dist_autograd = stack.rpc, stack.dist_autograd
    rep.enter("setup")
    t_setup = perf()
    module_rref = rpc.remote("w1", make_module, args=("embedding", cfg.seed))
    torch.manual_seed(cfg.seed + 1)
    head = nn.Linear(EMBED_DIM, PS_CLASSES)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    batches = [
        (
            torch.randint(0, NUM_EMBEDDINGS, (BATCH,), generator=gen),
            torch.randint(0, PS_CLASSES, (BATCH,), generator=gen),
        )
        for _ in range(DISTINCT_BATCHES)
    ]
    remote_params = rpc.rpc_sync("w1", param_rrefs, args=(module_rref,))
    local_params = [rpc.RRef(p) for p in head.parameters()]
    opt = stack.DistributedOptimizer(optim.SGD, remote_params + local_params, lr=LR)

    def step(i: int) -> float:
        indices, targets = batches[i % DISTINCT_BATCHES]
        with dist_autograd.context() as cid:
            hidden = rpc.rpc_sync("w1", forward, args=(module_rref, indices))
            loss = F.cross_entropy(head(hidden), targets)
            dist_autograd.backward(cid, [loss])
            if i == 0:
                _check_local_gradients(dist_autograd, cid, list(head.parameters()))
            opt.step(cid)
        return float(loss.detach())

    def checksum() -> float:
        remote: float = rpc.rpc_sync("w1", param_checksum, args=(module_rref,))
        return remote + float(sum(float(p.detach().double().sum()) for p in head.parameters()))

    _timed_steps(step, cfg, rep, checksum, t_setup)


def _train_pipeline(stack: Stack, cfg: RunConfig, rep: _Reporter) -> None:
    import torch
    import torch.nn.functional as F
    from torch import optim

    rpc, dist_autograd, wait_all = stack.rpc, stack.dist_autograd, stack.wait_all
    rep.enter("setup")
    t_setup = perf()
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

    def step(i: int) -> float:
        x, targets = batches[i % DISTINCT_BATCHES]
        with dist_autograd.context() as cid:
            futures, hidden = [], []
            for mb in torch.chunk(x, MICRO_BATCHES):
                hidden.append(rpc.remote("w1", forward, args=(stage1, mb)))
                futures.append(rpc.rpc_async("w2", forward_fetched, args=(stage2, hidden[-1])))
            out = torch.cat(wait_all(futures))
            del hidden  # kept until stage 2 has fetched them (see the module's docstring)
            loss = F.cross_entropy(out, targets)
            dist_autograd.backward(cid, [loss])
            opt.step(cid)
        return float(loss.detach())

    def checksum() -> float:
        one: float = rpc.rpc_sync("w1", param_checksum, args=(stage1,))
        two: float = rpc.rpc_sync("w2", param_checksum, args=(stage2,))
        return one + two

    _timed_steps(step, cfg, rep, checksum, t_setup)


# -- the parent: start, watch and collect a run ---------------------------------------------------


def run_group(cfg: RunConfig, log_dir: Path, tag: str) -> RunResult:
    """Start ``cfg.world_size`` processes, collect rank 0's report, make sure they are gone."""
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    barrier: Any = ctx.Barrier(cfg.world_size)
    result = RunResult(cfg.backend, cfg.workload)
    logs = [log_dir / f"{tag}-rank{r}.log" for r in range(cfg.world_size)]
    procs = [
        ctx.Process(
            target=_child_main,
            args=(cfg, r, barrier, q, str(logs[r])),
            name=f"bench-{cfg.backend}-{cfg.workload}-{r}",
            daemon=True,
        )
        for r in range(cfg.world_size)
    ]
    phases = dict.fromkeys(range(cfg.world_size), "process start")
    finished: set[int] = set()
    t0 = perf()
    deadline = t0 + cfg.timeout_s
    for p in procs:
        p.start()
    dead_since: float | None = None
    while len(finished) < cfg.world_size:
        try:
            rank, kind, payload = q.get(timeout=0.2)
        except queue.Empty:
            now = perf()
            if now > deadline:
                stuck = {r: phases[r] for r in range(cfg.world_size) if r not in finished}
                result.errors.append(
                    f"timed out after {now - t0:.0f} s; unfinished ranks and their phase: {stuck}"
                )
                break
            if all(not p.is_alive() for p in procs):
                dead_since = dead_since if dead_since is not None else now
                if now - dead_since > 2.0:  # what was left in the queue has arrived by now
                    for r in sorted(set(range(cfg.world_size)) - finished):
                        result.errors.append(
                            f"rank {r} exited (code {procs[r].exitcode}) during {phases[r]} "
                            "without reporting"
                        )
                    break
            continue
        if kind == "phase":
            phases[rank] = payload
        elif kind == "value" and rank == 0:
            name, value = payload
            result.values[name] = value
        elif kind == "error":
            result.errors.append(payload)
            finished.add(rank)
            # The others may now wait for the failed rank (a barrier, shutdown): give them a
            # little while to notice, not the whole time limit.
            deadline = min(deadline, perf() + 10.0)
        elif kind == "done":
            finished.add(rank)
    result.wall_s = perf() - t0
    _reap(procs, grace_s=1.0 if len(finished) < cfg.world_size else 15.0)
    for r, p in enumerate(procs):
        if p.exitcode not in (0, None) and not any(f"rank {r}" in e for e in result.errors):
            result.errors.append(f"rank {r} exit code {p.exitcode}")
    if result.errors:
        for r, path in enumerate(logs):
            tail = _tail(path)
            if "Timeout (" in tail:  # faulthandler's header: the process hung, stacks follow
                result.errors.insert(
                    0, f"rank {r} ran past its time limit (hung or too slow): stacks in its log"
                )
            result.errors.append(f"--- log of rank {r} ({path}), last lines:\n{tail}")
    with contextlib.suppress(Exception):
        q.close()
        q.cancel_join_thread()
    return result


# -- the schedule and the report -----------------------------------------------------------------


@dataclass
class Collected:
    """Per (workload, backend), the result of every repeat, in order."""

    runs: dict[tuple[str, str], list[RunResult]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def ms(self, workload: str, backend: str) -> list[float | None]:
        return [r.step_ms for r in self.runs.get((workload, backend), [])]

    def ratios(self, workload: str) -> list[float | None]:
        """Per repeat, thenable/torch of ms/step (None where either run failed)."""
        out: list[float | None] = []
        for t, p in zip(self.ms(workload, "thenable"), self.ms(workload, "torch"), strict=False):
            out.append(None if t is None or p is None or p <= 0 else t / p)
        return out


def _order(repeat_index: int, backends: Sequence[str]) -> tuple[str, ...]:
    return tuple(backends) if repeat_index % 2 == 0 else tuple(backends)[::-1]


def _fmt_ms(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:,.0f}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _loss_problems(col: Collected, workloads: Sequence[str], rtol: float) -> list[str]:
    """Both backends trained the same model on the same batches: their final losses agree."""
    problems = []
    for w in workloads:
        pairs = zip(col.runs.get((w, "torch"), []), col.runs.get((w, "thenable"), []), strict=False)
        for i, (p, t) in enumerate(pairs):
            a, b = p.values.get("last_loss"), t.values.get("last_loss")
            if a is None or b is None or p.errors or t.errors:
                continue
            if abs(a - b) > rtol * max(abs(a), abs(b), 1e-12):
                problems.append(
                    f"{w}, repeat {i + 1}: final loss differs: torch {a:.6g}, thenable {b:.6g} "
                    f"(relative tolerance {rtol:g})"
                )
    return problems


def run_all(args: argparse.Namespace, log_dir: Path) -> Collected:
    col = Collected()
    for i in range(args.repeat):
        order = _order(i, args.backends)
        print(f"repeat {i + 1}/{args.repeat} ({' then '.join(order)}):", flush=True)
        for w in args.workloads:
            for b in order:
                cfg = RunConfig(
                    backend=b,
                    workload=w,
                    world_size=WORLD_SIZE[w],
                    port=_free_port(),
                    steps=args.steps,
                    warmup=args.warmup,
                    threads=args.threads,
                    seed=args.seed,
                    timeout_s=args.run_timeout,
                    rpc_timeout_s=60.0,
                )
                res = run_group(cfg, log_dir, f"r{i + 1}-{w}-{b}")
                col.runs.setdefault((w, b), []).append(res)
                if res.errors:
                    what = f"repeat {i + 1}, {w}, {b}"
                    col.errors.append(f"[{what}]\n" + "\n".join(res.errors))
                    first = res.errors[0].strip().splitlines()
                    print(f"  {w:<8} {b:<8} ERROR: {(first[-1] if first else '')[:200]}")
                else:
                    v = res.values
                    print(
                        f"  {w:<8} {b:<8} {_fmt_ms(res.step_ms):>8} ms/step "
                        f"(median step {v['step_median_s'] * 1e3:.2f} ms; loss "
                        f"{v['first_loss']:.4f} -> {v['last_loss']:.4f}; "
                        f"init_rpc {v['init_s']:.1f} s, "
                        f"setup {v['setup_s']:.1f} s, shutdown {v['shutdown_s']:.1f} s, "
                        f"run {res.wall_s:.1f} s)",
                        flush=True,
                    )
            if len(args.backends) == 2:
                print(f"  {w:<8} thenable/torch {_fmt_ratio(col.ratios(w)[-1])}", flush=True)
    return col


def _median(values: Sequence[float | None]) -> float | None:
    ok = [v for v in values if v is not None]
    return statistics.median(ok) if ok else None


def summary_table(col: Collected, workloads: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = [
        "workload",
        "torch ms/step",
        "thenable ms/step",
        "thenable/torch",
        "ratio min / median / max",
        "per-repeat ratios",
    ]
    rows = []
    for w in workloads:
        ratios = col.ratios(w)
        ok = [r for r in ratios if r is not None]
        spread = f"{min(ok):.2f} / {statistics.median(ok):.2f} / {max(ok):.2f}" if ok else "-"
        rows.append(
            [
                w,
                _fmt_ms(_median(col.ms(w, "torch"))),
                _fmt_ms(_median(col.ms(w, "thenable"))),
                _fmt_ratio(_median(ratios)),
                spread,
                " ".join(_fmt_ratio(r) for r in ratios) or "-",
            ]
        )
    return header, rows


def _csv(kind: Callable[[str], str], choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return list(dict.fromkeys(items))

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 repeat of 3 warm-up + 10 steps"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (200)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per run (20)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="repeats of each torch/thenable pair (3)"
    )
    parser.add_argument(
        "--workloads",
        type=_csv(str, WORKLOADS),
        default=list(WORKLOADS),
        help="comma-separated: ps,pipeline (both)",
    )
    parser.add_argument(
        "--backends",
        type=_csv(str, BACKENDS),
        default=list(BACKENDS),
        help="comma-separated: torch,thenable (both; with one, no ratio)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads in every process (1)"
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
        args.steps = 10 if args.quick else 200
    if args.warmup is None:
        args.warmup = 3 if args.quick else 20
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.run_timeout is None:
        args.run_timeout = 120.0 if args.quick else 300.0
    if args.steps < 1 or args.warmup < 1 or args.repeat < 1 or args.threads < 1:
        parser.error("--steps, --warmup, --repeat and --threads must be >= 1")
    args.backends = [b for b in BACKENDS if b in args.backends]  # torch first in repeat 1

    log_dir = Path(tempfile.mkdtemp(prefix="bench_autograd_logs_"))
    env_before = _environment()
    print(f"bench_autograd: thenable vs torch RPC training stacks; {env_before}", flush=True)
    print(
        f"{args.repeat} repeat(s) of {args.warmup} warm-up + {args.steps} timed steps, "
        f"alternating order, torch threads {args.threads}; worker logs in {log_dir}",
        flush=True,
    )
    for w in args.workloads:
        print(f"  {w}: {DESCRIPTION[w]} ({WORLD_SIZE[w]} processes)")
    t_start = perf()
    col = run_all(args, log_dir)
    elapsed = perf() - t_start

    header, rows = summary_table(col, args.workloads)
    print()
    print(_plain(header, rows))
    print(
        "\nms/step: mean over the timed steps of a run, median over repeats; thenable/torch: "
        "median of the per-repeat ratios (same repeat); below 1 is better for thenable."
    )
    print(f"Total {elapsed:.0f} s. After: {_environment()}")

    problems = _loss_problems(col, args.workloads, args.loss_rtol)
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
