"""A distributed RNN language model on thenable.rpc: embedding and decoder on a parameter server.

Worker 1 is the parameter server ("ps"): the trainer (worker 0) creates the model's embedding
table and its decoder there with ``rpc.remote``, and keeps only the LSTM between them.  Each
forward pass sends the tokens to the server's embedding table, runs the LSTM locally and sends its
output to the server's decoder, through the ``_remote_method`` helper of torch's examples
(``rpc_sync(rref.owner(), _call_method, args=(method, rref, ...))``, which calls ``method`` on
``rref.local_value()`` where it lives).  Distributed autograd carries the gradients back through
both servers' modules, and a ``DistributedOptimizer`` (Adam) steps the remote and the local
parameters alike.

The text is synthetic: every token is followed by a fixed successor, so the next token can be
predicted and the loss falls.  Training runs over the sequences in chunks of BPTT steps
(truncated backpropagation through time: the hidden state is carried over, detached).
Needs torch.

Run:  thenable launch -n 2 examples/train_rnn.py [--epochs 6]
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn, optim

import thenable.autograd as dist_autograd
from thenable import rpc
from thenable.optim import DistributedOptimizer

VOCAB = 12
EMBEDDING = 8
HIDDEN = 24
BATCH = 16
SEQ_LEN = 24
BPTT = 6

# The server builds both remote modules at once, on two RPC threads: each seeds torch's (global)
# generator and draws its initial weights under this lock, so the draws cannot interleave.
_init_lock = threading.Lock()


def _call_method(method: Callable[..., Any], rref: rpc.RRef[Any], *args: Any) -> Any:
    """On the owner of ``rref``: ``method(rref.local_value(), *args)``."""
    return method(rref.local_value(), *args)


def _remote_method(method: Callable[..., Any], rref: rpc.RRef[Any], *args: Any) -> Any:
    """Call ``method`` on the value of ``rref``, where it lives."""
    return rpc.rpc_sync(rref.owner(), _call_method, args=(method, rref, *args))


def _parameter_rrefs(module: nn.Module) -> list[rpc.RRef[nn.Parameter]]:
    """RRefs of a module's parameters, owned where the module lives."""
    return [rpc.RRef(p) for p in module.parameters()]


class EmbeddingTable(nn.Module):
    """The token embeddings, on the parameter server."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        with _init_lock:
            torch.manual_seed(1)
            self.encoder = nn.Embedding(vocab, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.encoder(tokens)
        return out


class Decoder(nn.Module):
    """From the LSTM's output to scores over the vocabulary, on the parameter server."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        with _init_lock:
            torch.manual_seed(2)
            self.decoder = nn.Linear(hidden, vocab)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(output)
        return out


Hidden = tuple[torch.Tensor, torch.Tensor]


class RNNModel(nn.Module):
    """Embedding (remote) -> LSTM (local) -> decoder (remote)."""

    def __init__(self, ps: str) -> None:
        super().__init__()
        self.embedding_rref = rpc.remote(ps, EmbeddingTable, args=(VOCAB, EMBEDDING))
        torch.manual_seed(3)
        self.rnn = nn.LSTM(EMBEDDING, HIDDEN)
        self.decoder_rref = rpc.remote(ps, Decoder, args=(VOCAB, HIDDEN))

    def forward(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        embedded = _remote_method(EmbeddingTable.forward, self.embedding_rref, tokens)
        output, hidden = self.rnn(embedded, hidden)
        decoded: torch.Tensor = _remote_method(Decoder.forward, self.decoder_rref, output)
        return decoded, hidden

    def parameter_rrefs(self) -> list[rpc.RRef[nn.Parameter]]:
        rrefs: list[rpc.RRef[nn.Parameter]] = []
        rrefs.extend(_remote_method(_parameter_rrefs, self.embedding_rref))
        rrefs.extend(_parameter_rrefs(self.rnn))
        rrefs.extend(_remote_method(_parameter_rrefs, self.decoder_rref))
        return rrefs

    def init_hidden(self) -> Hidden:
        return torch.zeros(1, BATCH, HIDDEN), torch.zeros(1, BATCH, HIDDEN)


def corpus() -> torch.Tensor:
    """BATCH sequences of SEQ_LEN + 1 tokens, (time, batch): each token's successor is fixed."""
    generator = torch.Generator().manual_seed(0)
    successor = torch.randperm(VOCAB, generator=generator)
    tokens = torch.empty(SEQ_LEN + 1, BATCH, dtype=torch.long)
    tokens[0] = torch.randint(VOCAB, (BATCH,), generator=generator)
    for t in range(SEQ_LEN):
        tokens[t + 1] = successor[tokens[t]]
    return tokens


def train(epochs: int) -> list[float]:
    """Train on the corpus; the mean loss of each epoch."""
    model = RNNModel("ps")
    optimizer = DistributedOptimizer(optim.Adam, model.parameter_rrefs(), lr=0.02)
    loss_fn = nn.CrossEntropyLoss()
    tokens = corpus()
    losses = []
    for epoch in range(epochs):
        hidden = model.init_hidden()
        epoch_losses = []
        for start in range(0, SEQ_LEN, BPTT):
            inputs = tokens[start : start + BPTT]
            targets = tokens[start + 1 : start + 1 + BPTT]
            hidden = (hidden[0].detach(), hidden[1].detach())  # truncated BPTT
            with dist_autograd.context() as context_id:
                output, hidden = model(inputs, hidden)
                loss = loss_fn(output.reshape(-1, VOCAB), targets.reshape(-1))
                dist_autograd.backward(context_id, [loss])
                optimizer.step(context_id)
            epoch_losses.append(loss.item())
        losses.append(sum(epoch_losses) / len(epoch_losses))
        print(f"epoch {epoch}: loss {losses[-1]:.4f}", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="passes over the corpus")
    options = parser.parse_args()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != 2:
        raise SystemExit(f"train_rnn.py needs 2 workers, got {world_size}")
    if rank == 0:
        rpc.init_rpc("trainer", rank=rank, world_size=world_size)
        losses = train(options.epochs)
        print(f"trained: loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    else:
        rpc.init_rpc("ps", rank=rank, world_size=world_size)
    rpc.shutdown()


if __name__ == "__main__":
    main()
