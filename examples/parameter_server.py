"""A batch-updating parameter server on thenable.rpc, written as torch RPC programs are.

Worker 0 is the parameter server: it holds a model and an optimizer behind an ``RRef``.  The
other workers are trainers: each computes gradients on its own batches and sends them with
``rpc_sync(ps_rref.owner(), ParameterServer.update_and_fetch_model, args=(ps_rref, grads))``.
That function is ``@rpc.functions.async_execution``: it returns a Future, so the server holds no
thread while it waits, and it completes the Future (one optimizer step on the averaged
gradients) once every trainer has reported; every trainer then gets the updated model.

The model learns a linear map from noisy samples; each trainer prints its loss, which falls.
Needs torch.

Run:  thenable launch -n 3 examples/parameter_server.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import threading

import torch
from torch import nn, optim

import thenable.futures
from thenable import rpc

FEATURES = 8
BATCH = 32


class ParameterServer:
    """The model and its optimizer; steps once all trainers have sent their gradients."""

    def __init__(self, trainers: int) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(FEATURES, 1)
        self.optimizer = optim.SGD(self.model.parameters(), lr=0.1)
        self.trainers = trainers
        self.lock = threading.Lock()
        self.reported = 0
        self.steps = 0
        self.future_model: thenable.futures.Future[nn.Module] = thenable.futures.Future()
        for parameter in self.model.parameters():
            parameter.grad = torch.zeros_like(parameter)

    def get_model(self) -> nn.Module:
        return self.model

    @staticmethod
    @rpc.functions.async_execution
    def update_and_fetch_model(
        ps_rref: rpc.RRef[ParameterServer], grads: list[torch.Tensor]
    ) -> thenable.futures.Future[nn.Module]:
        self = ps_rref.local_value()
        with self.lock:
            for parameter, grad in zip(self.model.parameters(), grads, strict=True):
                assert parameter.grad is not None
                parameter.grad += grad
            self.reported += 1
            future = self.future_model
            if self.reported == self.trainers:
                for parameter in self.model.parameters():
                    assert parameter.grad is not None
                    parameter.grad /= self.trainers
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=False)
                self.reported = 0
                self.steps += 1
                self.future_model = thenable.futures.Future()
                future.set_result(self.model)  # every trainer's call returns the new model
        return future


def batches(seed: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Noisy samples of y = x . w + 1 (the same w for every trainer)."""
    weights = torch.arange(1.0, FEATURES + 1) / FEATURES
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(BATCH, FEATURES, generator=generator)
        noise = 0.01 * torch.randn(BATCH, 1, generator=generator)
        out.append((x, x @ weights.unsqueeze(1) + 1.0 + noise))
    return out


def run_trainer(ps_rref: rpc.RRef[ParameterServer], steps: int) -> list[float]:
    """Train on this worker's batches through the server; return the loss of each step."""
    me = rpc.get_worker_info()
    model: nn.Module = ps_rref.rpc_sync().get_model()
    loss_fn = nn.MSELoss()
    losses = []
    for inputs, targets in batches(seed=me.id, steps=steps):
        model.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        losses.append(loss.item())
        grads = [p.grad for p in model.parameters()]
        model = rpc.rpc_sync(
            ps_rref.owner(), ParameterServer.update_and_fetch_model, args=(ps_rref, grads)
        )
    print(f"{me.name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    options = parser.parse_args()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if rank == 0:
        rpc.init_rpc("ps", rank=rank, world_size=world_size)
        trainers = [f"trainer{r}" for r in range(1, world_size)]
        ps_rref = rpc.RRef(ParameterServer(len(trainers)))
        futures = [rpc.rpc_async(t, run_trainer, args=(ps_rref, options.steps)) for t in trainers]
        losses = thenable.futures.wait_all(futures)
        server = ps_rref.local_value()
        fell = all(trainer[-1] < trainer[0] / 10 for trainer in losses)
        print(f"ps: {server.steps} steps; loss fell tenfold on every trainer: {fell}")
    else:
        rpc.init_rpc(f"trainer{rank}", rank=rank, world_size=world_size)
    rpc.shutdown()


if __name__ == "__main__":
    main()
