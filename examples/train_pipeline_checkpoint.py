"""Pipeline training with activation checkpointing: remote stages whose backward has side effects.

Worker 0 is the master; ``stage1`` and ``stage2`` hold ``RemoteModule`` stages.  The trunk on
stage 1 maps each micro-batch to two halves, ``(left, right)``; ``left`` goes on to the branch on
stage 2, ``right`` skips it and meets the branch's output on the master, where a local layer
adds it to the logits.  Both remote stages checkpoint their activations as fairscale's pipeline
does, with a pair of autograd Functions sharing a deque: ``Checkpoint`` runs the stage without
saving activations, ``Recompute`` (hanging off the stage's first output) recomputes them in the
backward pass and pushes them onto the deque, and ``Checkpoint``'s backward pops them and
back-propagates through them.  The two halves of a micro-batch share the trunk's
``Checkpoint`` node, and their gradients reach stage 1 by two ways: ``right``'s from the master,
``left``'s from stage 2 through the master.  As torch's engine does, that node must run once,
after both have arrived, with their sum (run once per arrival, the second run finds the deque
empty).

The master trains everything with ``dist_autograd.context()``, ``dist_autograd.backward`` and
a ``DistributedOptimizer``, and checks, every step, that the gradients equal those of the same
model run in one process without RPC (which it trains alongside with the same SGD steps), that
each stage recomputed each micro-batch exactly once, and at the end that the loss fell.  It
exits non-zero if any check fails or the backward pass raises.

The task: classify points labelled by a fixed random "teacher" network.  Needs torch.

Run:  thenable launch -n 3 examples/train_pipeline_checkpoint.py [--steps 20] [--micro-batches 4]
"""

from __future__ import annotations

import argparse
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import nn, optim

import thenable.autograd as dist_autograd
import thenable.futures
from thenable import rpc
from thenable.nn import RemoteModule
from thenable.optim import DistributedOptimizer

FEATURES = 8
HIDDEN = 16
CLASSES = 3
BATCH = 96
LR = 0.5

Recomputed = deque[tuple[torch.Tensor, torch.Tensor]]  # (output, input leaf), at most one


class _Fork(torch.autograd.Function):
    """``x -> (x, phony)``: the phony orders ``Recompute`` before the ``Checkpoint`` behind x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.detach(), torch.empty(0, requires_grad=True).detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, phony_grad: torch.Tensor) -> torch.Tensor:
        return grad


class _Join(torch.autograd.Function):
    """``(x, phony) -> x``: x's gradient runs the phony's producer (``Recompute``) first."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, phony: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


Outputs = tuple[torch.Tensor, ...]


class _Checkpoint(torch.autograd.Function):
    """Runs ``module`` without saving activations; its backward pops what ``_Recompute``
    pushed and returns the gradients of the input and of the parameters (which it takes as
    inputs, so that they reach the distributed autograd context, not ``.grad``)."""

    @staticmethod
    def forward(
        ctx: Any,
        phony: torch.Tensor,
        recomputed: Recomputed,
        module: Callable[[torch.Tensor], Outputs],
        x: torch.Tensor,
        *params: nn.Parameter,
    ) -> Outputs:
        ctx.recomputed = recomputed
        ctx.params = params
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        outputs, leaf = ctx.recomputed.pop()  # IndexError if Recompute did not run first
        inputs = ([leaf] if leaf.requires_grad else []) + list(ctx.params)
        computed = list(torch.autograd.grad(outputs, inputs, grads))
        leaf_grad = computed.pop(0) if leaf.requires_grad else None
        return (None, None, None, leaf_grad, *computed)


class _Recompute(torch.autograd.Function):
    """Its backward recomputes ``module(x)`` with grad and pushes it for ``_Checkpoint``."""

    @staticmethod
    def forward(
        ctx: Any,
        phony: torch.Tensor,
        recomputed: Recomputed,
        module: Callable[[torch.Tensor], Outputs],
        x: torch.Tensor,
        on_recompute: Callable[[], None],
    ) -> torch.Tensor:
        ctx.recomputed, ctx.module, ctx.on_recompute = recomputed, module, on_recompute
        ctx.save_for_backward(x)
        return phony

    @staticmethod
    def backward(ctx: Any, phony_grad: torch.Tensor) -> tuple[None, ...]:
        (x,) = ctx.saved_tensors
        leaf = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            ctx.recomputed.append((ctx.module(leaf), leaf))
        ctx.on_recompute()
        return None, None, None, None, None


def _apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    apply: Any = function.apply  # untyped in torch
    return apply(*args)


def checkpointed(
    module: Callable[[torch.Tensor], Outputs],
    params: list[nn.Parameter],
    x: torch.Tensor,
    on_recompute: Callable[[], None],
) -> Outputs:
    """``module(x)``, checkpointed as fairscale's pipeline does: ``Recompute`` hangs off the
    first output only (the others' gradients reach ``Checkpoint`` through the same node)."""
    recomputed: Recomputed = deque(maxlen=1)
    phony = torch.empty(0, requires_grad=True)
    outputs = list(_apply(_Checkpoint, phony, recomputed, module, x, *params))
    first, fork_phony = _apply(_Fork, outputs[0])
    recompute_phony = _apply(_Recompute, fork_phony, recomputed, module, x, on_recompute)
    outputs[0] = _apply(_Join, first, recompute_phony)
    return tuple(outputs)


class Stage(nn.Module):
    """A part of the model, checkpointed when ``checkpoint`` is set (its remote copies are).

    Stage 1 (the trunk) maps a micro-batch to ``(left, right)``, HIDDEN features each; stage 2
    (the branch) maps ``left`` to ``(logits,)``.  Micro-batches arrive concurrently (one RPC
    thread each); a lock runs them through the layers one at a time.
    """

    def __init__(self, index: int, checkpoint: bool) -> None:
        super().__init__()
        torch.manual_seed(index)
        self.index = index
        self.layers: nn.Module
        if index == 1:
            self.layers = nn.Sequential(nn.Linear(FEATURES, 2 * HIDDEN), nn.Tanh())
        else:
            self.layers = nn.Sequential(
                nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)
            )
        self.checkpoint = checkpoint
        self.lock = threading.Lock()
        self.recomputes = 0

    def _run(self, x: torch.Tensor) -> Outputs:
        out: torch.Tensor = self.layers(x)
        return tuple(out.chunk(2, dim=1)) if self.index == 1 else (out,)

    def _count_recompute(self) -> None:
        with self.lock:
            self.recomputes += 1

    def forward(self, x: torch.Tensor) -> Outputs:
        with self.lock:
            if not self.checkpoint:
                return self._run(x)
            params = list(self.parameters())
            return checkpointed(self._run, params, x, self._count_recompute)

    def take_recomputes(self) -> int:
        """How many micro-batches were recomputed since the last call."""
        with self.lock:
            count, self.recomputes = self.recomputes, 0
        return count


def _gradients_here(context_id: int, params: list[rpc.RRef[nn.Parameter]]) -> list[torch.Tensor]:
    """On the parameters' owner: their gradients in the context."""
    gradients = dist_autograd.get_gradients(context_id)
    return [gradients[p.local_value()] for p in params]


class PipelineModel:
    """The master's handle on the two remote stages and the local skip layer."""

    def __init__(self, micro_batches: int) -> None:
        self.micro_batches = micro_batches
        self.trunk = RemoteModule("stage1/cpu", Stage, args=(1, True))
        self.branch = RemoteModule("stage2/cpu", Stage, args=(2, True))
        torch.manual_seed(3)
        self.skip = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(self.micro_batches)
        halves = thenable.futures.wait_all([self.trunk.forward_async(c) for c in chunks])
        branches = [self.branch.forward_async(left) for left, _ in halves]
        outs = thenable.futures.wait_all(branches)
        return torch.cat(
            [out + self.skip(right) for (out,), (_, right) in zip(outs, halves, strict=True)]
        )

    def parameter_groups(self) -> list[list[rpc.RRef[nn.Parameter]]]:
        """The parameters' RRefs: trunk, branch, skip (the local model's order)."""
        skip = [rpc.RRef(p) for p in self.skip.parameters()]
        return [self.trunk.remote_parameters(), self.branch.remote_parameters(), skip]

    def take_recomputes(self) -> list[int]:
        stages = (self.trunk, self.branch)
        return [stage.get_module_rref().rpc_sync().take_recomputes() for stage in stages]


class LocalModel(nn.Module):
    """The same model in one process, without RPC or checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = Stage(1, checkpoint=False)
        self.branch = Stage(2, checkpoint=False)
        torch.manual_seed(3)
        self.skip = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.trunk(x)
        (out,) = self.branch(left)
        return out + self.skip(right)  # type: ignore[no-any-return]


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH points and their classes, from a fixed random teacher."""
    generator = torch.Generator().manual_seed(1234)
    teacher = torch.randn(FEATURES, CLASSES, generator=generator)
    x = torch.randn(BATCH, FEATURES, generator=generator)
    return x, (x @ teacher).argmax(dim=1)


def _grads_match(
    context_id: int, groups: list[list[rpc.RRef[nn.Parameter]]], local: LocalModel
) -> bool:
    remote: list[torch.Tensor] = []
    for params in groups:
        remote.extend(rpc.rpc_sync(params[0].owner(), _gradients_here, (context_id, params)))
    expected = [p.grad for p in local.parameters()]
    return all(
        g is not None and torch.allclose(r, g, atol=1e-6)
        for r, g in zip(remote, expected, strict=True)
    )


def train(steps: int, micro_batches: int) -> list[str]:
    """Train; the failed checks (empty if all passed)."""
    model = PipelineModel(micro_batches)
    groups = model.parameter_groups()
    optimizer = DistributedOptimizer(optim.SGD, [p for g in groups for p in g], lr=LR)
    local = LocalModel()
    local_optimizer = optim.SGD(local.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    inputs, labels = dataset()
    losses: list[float] = []
    failures: list[str] = []
    for step in range(steps):
        local_optimizer.zero_grad()
        loss_fn(local(inputs), labels).backward()
        with dist_autograd.context() as context_id:
            loss = loss_fn(model.forward(inputs), labels)
            try:
                dist_autograd.backward(context_id, [loss])
            except RuntimeError as exc:
                return [f"step {step}: the backward pass raised {exc}"]
            if not _grads_match(context_id, groups, local):
                failures.append(f"step {step}: gradients differ from the local model's")
            optimizer.step(context_id)
        local_optimizer.step()
        recomputes = model.take_recomputes()
        if recomputes != [micro_batches, micro_batches]:
            failures.append(
                f"step {step}: stages recomputed {recomputes} micro-batches, expected "
                f"{micro_batches} each"
            )
        losses.append(loss.item())
        print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
    if not losses[-1] < 0.7 * losses[0]:
        failures.append(f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"trained: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    options = parser.parse_args()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != 3:
        raise SystemExit(f"train_pipeline_checkpoint.py needs 3 workers, got {world_size}")
    failures: list[str] = []
    if rank == 0:
        rpc.init_rpc("master", rank=rank, world_size=world_size)
        failures = train(options.steps, options.micro_batches)
        for failure in failures:
            print(f"check failed: {failure}", flush=True)
        if not failures:
            print(
                "checks passed: gradients equal the local model's, one recompute each", flush=True
            )
    else:
        rpc.init_rpc(f"stage{rank}", rank=rank, world_size=world_size)
    rpc.shutdown()
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
