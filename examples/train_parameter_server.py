"""A parameter server trained with distributed autograd on thenable.rpc.

Worker 0 is the parameter server ("ps"): it holds the one model, a small MLP.  Every other worker
is a trainer with a ``TrainerNet``: a local stand-in for the model whose forward pass is an
``rpc_sync`` to the server (``_remote_method(ParameterServer.forward, ps_rref, x)``).  Each
trainer runs its own loop: ``dist_autograd.context()``, a forward pass through the server, the
loss, ``dist_autograd.backward(context_id, [loss])`` (the gradients flow back to the server's
parameters and stay in the context) and ``DistributedOptimizer.step(context_id)`` over the RRefs
of the server's parameters.  The trainers train the same model at once, each on its own data;
at the end each reports its losses to the server, which prints the summary.

The task: classify points labelled by a fixed random "teacher"; the loss falls.  Needs torch.

Run:  thenable launch -n 3 examples/train_parameter_server.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn, optim

import thenable.autograd as dist_autograd
from thenable import rpc
from thenable.optim import DistributedOptimizer

FEATURES = 10
HIDDEN = 32
CLASSES = 3
BATCH = 32
BATCHES = 4  # per trainer and epoch


def _call_method(method: Callable[..., Any], rref: rpc.RRef[Any], *args: Any) -> Any:
    """On the owner of ``rref``: ``method(rref.local_value(), *args)``."""
    return method(rref.local_value(), *args)


def _remote_method(method: Callable[..., Any], rref: rpc.RRef[Any], *args: Any) -> Any:
    """Call ``method`` on the value of ``rref``, where it lives."""
    return rpc.rpc_sync(rref.owner(), _call_method, args=(method, rref, *args))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Trainers call this at once, and one trainer's optimizer step may update the parameters
        # in place between another's forward pass and its backward pass.  Computing with copies
        # of the parameters (which autograd traces back to them) keeps that other graph valid,
        # and changes nothing in the module, so concurrent calls cannot disturb each other.
        hidden = F.relu(_linear_on_copies(self.fc1, x))
        return F.log_softmax(_linear_on_copies(self.fc2, hidden), dim=1)


def _linear_on_copies(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight.clone(), layer.bias.clone())


class ParameterServer:
    """The model, shared by every trainer."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out

    def parameter_rrefs(self) -> list[rpc.RRef[nn.Parameter]]:
        return [rpc.RRef(p) for p in self.model.parameters()]


_server: ParameterServer | None = None
_server_lock = threading.Lock()
_reports: dict[int, list[float]] = {}
_reports_changed = threading.Condition()


def get_parameter_server() -> ParameterServer:
    """On the server: the one ParameterServer, created by the first trainer that asks."""
    global _server
    with _server_lock:
        if _server is None:
            _server = ParameterServer()
        return _server


def report_losses(trainer: int, losses: list[float]) -> None:
    """On the server: a trainer is done; these were its losses."""
    with _reports_changed:
        _reports[trainer] = losses
        _reports_changed.notify_all()


class TrainerNet:
    """The model as a trainer sees it: every forward pass runs on the server."""

    def __init__(self) -> None:
        self.ps_rref = rpc.remote("ps", get_parameter_server)

    def parameter_rrefs(self) -> list[rpc.RRef[nn.Parameter]]:
        rrefs: list[rpc.RRef[nn.Parameter]] = _remote_method(
            ParameterServer.parameter_rrefs, self.ps_rref
        )
        return rrefs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _remote_method(ParameterServer.forward, self.ps_rref, x)
        return out


def shard(trainer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This trainer's batches; the labels come from the same teacher on every trainer."""
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(trainer)
    batches = []
    for _ in range(BATCHES):
        x = torch.randn(BATCH, FEATURES, generator=generator)
        batches.append((x, (x @ teacher).argmax(dim=1)))
    return batches


def run_trainer(rank: int, epochs: int) -> list[float]:
    """Train through the server; the mean loss of each epoch."""
    net = TrainerNet()
    optimizer = DistributedOptimizer(optim.SGD, net.parameter_rrefs(), lr=0.3)
    losses = []
    for epoch in range(epochs):
        epoch_losses = []
        for inputs, targets in shard(rank):
            with dist_autograd.context() as context_id:
                loss = F.nll_loss(net.forward(inputs), targets)
                dist_autograd.backward(context_id, [loss])
                optimizer.step(context_id)
            epoch_losses.append(loss.item())
        losses.append(sum(epoch_losses) / len(epoch_losses))
        print(f"trainer{rank} epoch {epoch}: loss {losses[-1]:.4f}", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="passes over each trainer's data")
    options = parser.parse_args()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size < 2:
        raise SystemExit("train_parameter_server.py needs a server and at least one trainer")
    if rank == 0:
        rpc.init_rpc("ps", rank=rank, world_size=world_size)
        with _reports_changed:
            _reports_changed.wait_for(lambda: len(_reports) == world_size - 1)
        firsts = [losses[0] for losses in _reports.values()]
        lasts = [losses[-1] for losses in _reports.values()]
        first, last = sum(firsts) / len(firsts), sum(lasts) / len(lasts)
        print(f"trained: loss {first:.4f} -> {last:.4f} (mean of {len(firsts)} trainers)")
    else:
        rpc.init_rpc(f"trainer{rank}", rank=rank, world_size=world_size)
        losses = run_trainer(rank, options.epochs)
        rpc.rpc_sync("ps", report_losses, args=(rank, losses))
    rpc.shutdown()


if __name__ == "__main__":
    main()
