"""What the workers of the wire-name test run: every global their messages name is noted."""

from __future__ import annotations

import contextlib
import io
import pickle
from typing import Any

import numpy as np
import torch
from torch import nn

import thenable.autograd as dist_autograd
from thenable import rpc
from thenable.nn import RemoteModule
from thenable.optim import DistributedOptimizer
from thenable.rpc._wire import serialize as _serialize

_SEEN: set[str] = set()


class _NotingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        _SEEN.add(f"{module}:{name}")
        return super().find_class(module, name)


class _NotingPickle:
    """Stands in for the pickle module inside ``_serialize``: loads note their globals."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def loads(data: Any, *, buffers: Any = ()) -> Any:
        return _NotingUnpickler(io.BytesIO(data), buffers=buffers).load()


def note_globals() -> None:
    """From now on, note the globals of every message this worker loads."""
    setattr(_serialize, "pickle", _NotingPickle())  # noqa: B010 - a private module global


def globals_seen() -> list[str]:
    return sorted(_SEEN)


def echo(value: Any) -> Any:
    return value


def fail() -> None:
    raise ValueError("raised on purpose")


def value_of(rref: rpc.RRef[Any]) -> Any:
    return rref.to_here()


def exercise(peer: str) -> None:
    """Calls of every kind to ``peer``: values, RRefs, errors, distributed autograd, the
    optimizer and a RemoteModule."""
    rpc.rpc_sync(peer, torch.add, (torch.ones(2), 1))
    rpc.rpc_sync(peer, echo, ({"array": np.ones(3), "big": torch.ones(100_000)},))
    rref: rpc.RRef[list[int]] = rpc.remote(peer, list, ([1, 2],))
    rref.to_here()
    rref.rpc_sync().append(3)
    rpc.rpc_sync(peer, value_of, (rref,))
    with contextlib.suppress(ValueError):
        rpc.rpc_sync(peer, fail)
    module = RemoteModule(peer, nn.Linear, args=(2, 2))
    optimizer = DistributedOptimizer(torch.optim.SGD, module.remote_parameters(), lr=0.1)
    with dist_autograd.context() as context_id:
        x = torch.ones(1, 2, requires_grad=True)
        loss = module(rpc.rpc_sync(peer, torch.mul, (x, 2))).sum()
        dist_autograd.backward(context_id, [loss])
        optimizer.step(context_id)
