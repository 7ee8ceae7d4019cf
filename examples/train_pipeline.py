"""Pipeline-parallel training on thenable.rpc: a model cut into two stages on two workers.

Worker 0 is the master.  It creates one ``Stage`` on each of the other two workers with
``rpc.remote``: stage 1 is the first half of a small MLP, stage 2 the rest.  A forward pass cuts
the batch into micro-batches and sends each one through both stages without waiting for it:
``stage1.remote().forward(x_rref)`` leaves its output on worker 1 behind an RRef, which
``stage2.rpc_async().forward(y_rref)`` hands to worker 2 (which fetches it from worker 1 itself),
so stage 1 can work on one micro-batch while stage 2 works on the one before.  The master
gathers the futures and trains both stages with distributed autograd
(``dist_autograd.context()``, ``dist_autograd.backward``) and a ``DistributedOptimizer`` over the
RRefs of every stage's parameters.

The task: classify points labelled by a fixed random "teacher" network; the loss falls.
Needs torch.

Run:  thenable launch -n 3 examples/train_pipeline.py [--steps 30] [--micro-batches 4]
"""

from __future__ import annotations

import argparse
import os
import threading

import torch
from torch import nn, optim

import thenable.autograd as dist_autograd
import thenable.futures
from thenable import rpc
from thenable.optim import DistributedOptimizer

FEATURES = 8
HIDDEN = 32
CLASSES = 3
BATCH = 96


class Stage(nn.Module):
    """One part of the model, on its own worker.

    Micro-batches arrive concurrently (one RPC thread each); a lock runs them through the layers
    one at a time.
    """

    def __init__(self, index: int) -> None:
        super().__init__()
        torch.manual_seed(index)
        self.layers: nn.Module
        if index == 1:
            self.layers = nn.Sequential(
                nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh()
            )
        else:
            self.layers = nn.Linear(HIDDEN, CLASSES)
        self.lock = threading.Lock()

    def forward(self, x_rref: rpc.RRef[torch.Tensor]) -> torch.Tensor:
        x = x_rref.to_here()
        with self.lock:
            out: torch.Tensor = self.layers(x)
        return out

    def parameter_rrefs(self) -> list[rpc.RRef[nn.Parameter]]:
        return [rpc.RRef(p) for p in self.parameters()]


class PipelineModel:
    """The master's handle on the two stages: a forward pass pipelined over micro-batches."""

    def __init__(self, workers: list[str], micro_batches: int) -> None:
        self.micro_batches = micro_batches
        self.stage1 = rpc.remote(workers[0], Stage, args=(1,))
        self.stage2 = rpc.remote(workers[1], Stage, args=(2,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        futures = []
        for chunk in x.chunk(self.micro_batches):
            x_rref = rpc.RRef(chunk)
            y_rref = self.stage1.remote().forward(x_rref)  # stays on stage 1's worker
            futures.append(self.stage2.rpc_async().forward(y_rref))
        return torch.cat(thenable.futures.wait_all(futures))

    def parameter_rrefs(self) -> list[rpc.RRef[nn.Parameter]]:
        rrefs: list[rpc.RRef[nn.Parameter]] = []
        for stage in (self.stage1, self.stage2):
            rrefs.extend(stage.rpc_sync().parameter_rrefs())
        return rrefs


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH points and their classes, from a fixed random teacher."""
    generator = torch.Generator().manual_seed(1234)
    teacher = torch.randn(FEATURES, CLASSES, generator=generator)
    x = torch.randn(BATCH, FEATURES, generator=generator)
    return x, (x @ teacher).argmax(dim=1)


def train(steps: int, micro_batches: int) -> list[float]:
    model = PipelineModel(["stage1", "stage2"], micro_batches)
    optimizer = DistributedOptimizer(optim.SGD, model.parameter_rrefs(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    inputs, labels = dataset()
    losses = []
    for step in range(steps):
        with dist_autograd.context() as context_id:
            loss = loss_fn(model.forward(inputs), labels)
            dist_autograd.backward(context_id, [loss])
            optimizer.step(context_id)
        losses.append(loss.item())
        print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    options = parser.parse_args()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != 3:
        raise SystemExit(f"train_pipeline.py needs 3 workers, got {world_size}")
    if rank == 0:
        rpc.init_rpc("master", rank=rank, world_size=world_size)
        losses = train(options.steps, options.micro_batches)
        print(f"trained: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    else:
        rpc.init_rpc(f"stage{rank}", rank=rank, world_size=world_size)
    rpc.shutdown()


if __name__ == "__main__":
    main()
