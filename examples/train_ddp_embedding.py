"""Distributed data parallel with a remote embedding table, on thenable.rpc.

Four workers: the master (0), a parameter server "ps" (1) and two trainers (2, 3).  The master
puts an ``nn.EmbeddingBag`` on the parameter server with
``RemoteModule("ps/cpu", nn.EmbeddingBag, ...)`` and hands it to both trainers.  Each trainer's
model is a ``HybridModel``: the remote embedding lookup, then a local ``nn.Linear`` wrapped in
``torch.nn.parallel.DistributedDataParallel`` over a gloo process group of the two trainers
only, so their gradients for it are averaged (allreduce) while the embedding's go to the server.
A ``DistributedOptimizer`` over the remote module's ``remote_parameters()`` and RRefs of the
local parameters steps both, once per ``dist_autograd.context()``.

The process group meets at a ``TCPStore`` that the master opens on a port the system picks and
keeps open, and passes to the trainers: nothing else can take that port, whatever else runs on
the machine.

The task: every embedding row belongs to one of CLASSES classes, and each sample is a bag of rows
of one class, to be classified; the loss falls.  Needs torch.

Run:  thenable launch -n 4 examples/train_ddp_embedding.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn, optim
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # (re-exported by torch)
from torch.nn.parallel import DistributedDataParallel

import thenable.autograd as dist_autograd
import thenable.futures
from thenable import rpc
from thenable.nn import RemoteModule
from thenable.optim import DistributedOptimizer

NUM_EMBEDDINGS = 40
EMBEDDING_DIM = 16
CLASSES = 4
BATCH = 16
BATCHES = 4  # per trainer and epoch
TRAINERS = ["trainer0", "trainer1"]


class HybridModel(nn.Module):
    """The remote embedding table, then a local linear layer replicated with DDP."""

    def __init__(self, remote_emb_module: RemoteModule) -> None:
        super().__init__()
        self.remote_emb_module = remote_emb_module
        torch.manual_seed(0)
        self.fc = DistributedDataParallel(nn.Linear(EMBEDDING_DIM, CLASSES))

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        embedded = self.remote_emb_module.forward(indices, offsets)
        out: torch.Tensor = self.fc(embedded)
        return out


def batches(trainer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This trainer's batches of (indices, offsets, classes): row i is of class i % CLASSES."""
    generator = torch.Generator().manual_seed(100 + trainer)
    out = []
    for _ in range(BATCHES):
        targets = torch.randint(CLASSES, (BATCH,), generator=generator)
        bag_sizes = torch.randint(2, 5, (BATCH,), generator=generator)
        bags = []
        for target, size in zip(targets.tolist(), bag_sizes.tolist(), strict=True):
            rows = torch.randint(NUM_EMBEDDINGS // CLASSES, (size,), generator=generator)
            bags.append(rows * CLASSES + target)
        offsets = torch.cumsum(bag_sizes, 0) - bag_sizes
        out.append((torch.cat(bags), offsets, targets))
    return out


def run_trainer(
    remote_emb_module: RemoteModule, trainer: int, store_port: int, epochs: int
) -> tuple[list[float], torch.Tensor]:
    """On a trainer: join the trainers' process group and train; the mean loss of each epoch,
    and the local layer's parameters at the end."""
    store = TCPStore("127.0.0.1", store_port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=trainer, world_size=len(TRAINERS))
    try:
        model = HybridModel(remote_emb_module)
        parameter_rrefs = [
            *remote_emb_module.remote_parameters(),
            *(rpc.RRef(p) for p in model.fc.parameters()),
        ]
        optimizer = DistributedOptimizer(optim.SGD, parameter_rrefs, lr=0.5)
        loss_fn = nn.CrossEntropyLoss()
        losses = []
        for epoch in range(epochs):
            epoch_losses = []
            for indices, offsets, targets in batches(trainer):
                with dist_autograd.context() as context_id:
                    loss = loss_fn(model(indices, offsets), targets)
                    dist_autograd.backward(context_id, [loss])
                    optimizer.step(context_id)
                epoch_losses.append(loss.item())
            losses.append(sum(epoch_losses) / len(epoch_losses))
            print(f"trainer{trainer} epoch {epoch}: loss {losses[-1]:.4f}", flush=True)
        return losses, torch.cat([p.detach().flatten() for p in model.fc.parameters()])
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="passes over each trainer's data")
    options = parser.parse_args()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != 2 + len(TRAINERS):
        raise SystemExit(f"train_ddp_embedding.py needs {2 + len(TRAINERS)} workers")
    if rank == 0:
        rpc.init_rpc("master", rank=rank, world_size=world_size)
        # Port 0: the system picks a free port, and the store holds it until training is over.
        store = TCPStore("127.0.0.1", 0, is_master=True)
        remote_emb_module = RemoteModule(
            "ps/cpu",
            nn.EmbeddingBag,
            args=(NUM_EMBEDDINGS, EMBEDDING_DIM),
            kwargs={"mode": "mean"},
        )
        futures = [
            rpc.rpc_async(
                name, run_trainer, args=(remote_emb_module, i, store.port, options.epochs)
            )
            for i, name in enumerate(TRAINERS)
        ]
        results = thenable.futures.wait_all(futures)
        # DDP averaged the local layer's gradients: every replica ends with the same parameters.
        in_sync = all(torch.equal(results[0][1], fc) for _, fc in results)
        print(f"local layer replicas in sync: {in_sync}")
        firsts = [losses[0] for losses, _ in results]
        lasts = [losses[-1] for losses, _ in results]
        first, last = sum(firsts) / len(firsts), sum(lasts) / len(lasts)
        print(f"trained: loss {first:.4f} -> {last:.4f} (mean of {len(results)} trainers)")
        del store
    elif rank == 1:
        torch.manual_seed(0)  # the embedding table is created here
        rpc.init_rpc("ps", rank=rank, world_size=world_size)
    else:
        rpc.init_rpc(TRAINERS[rank - 2], rank=rank, world_size=world_size)
    rpc.shutdown()


if __name__ == "__main__":
    main()
