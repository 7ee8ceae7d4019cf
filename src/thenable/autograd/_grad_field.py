"""The ``.grad`` field of leaf tensors, borrowed for a moment under one lock per process.

torch runs a leaf's ``AccumulateGrad`` pre- and post-hooks (and through those DDP's gradient
reducer) and its post-accumulate-grad hooks only when its engine accumulates into ``.grad``, and
an optimizer steps on ``.grad``.  So the distributed backward and ``DistributedOptimizer`` both
set ``.grad`` for the time of their local computation and put the old value back after: between
passes and steps, gradients live in the context only, and ``.grad`` is what the user left there.

Leaves may be shared (two trainers' passes over one parameter server's model), so no two
borrows overlap in a process.  A pass therefore computes its leaves' gradients outside the lock
(``torch.autograd.grad``, which runs their tensor hooks) and borrows ``.grad`` only to hand each
gradient to its ``AccumulateGrad`` (``accumulate``: hooks, then the field, without a copy of a
dense gradient).  What runs under the lock is local computation (and the collectives of a DDP
model's hooks), never a wait for an RPC reply.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from thenable.autograd._torch import torch

__all__ = ("accumulate", "borrowed", "has_tensor_hooks")

_LOCK = threading.Lock()


@contextlib.contextmanager
def borrowed(leaves: Sequence[Any], grads: Sequence[Any]) -> Iterator[None]:
    """Set each leaf's ``.grad`` to its entry of ``grads`` (``None`` for an empty field) for
    the block, holding the process's ``.grad`` lock; restore the old values after."""
    with _LOCK:
        saved = [leaf.grad for leaf in leaves]
        try:
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.grad = grad
            yield
        finally:
            for leaf, grad in zip(leaves, saved, strict=True):
                leaf.grad = grad


def has_tensor_hooks(leaf: Any) -> bool:
    """Whether ``leaf`` has tensor hooks (``register_hook``): a gradient computed for it has
    been through them, so handing it to ``AccumulateGrad`` would run them twice."""
    return bool(leaf._backward_hooks)


def accumulate(pairs: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Each ``(leaf, gradient)`` through the leaf's ``AccumulateGrad`` into an empty ``.grad``
    (borrowed), which runs its hooks; the gradients as they came out (a hook may replace one).

    A dense gradient reaches ``AccumulateGrad`` as a fresh alias of itself (the backward of
    ``view_as``), which it keeps instead of copying; a sparse one (or one of a sparse leaf) is
    copied, as torch copies a gradient something else still holds."""
    if not pairs:
        return []
    leaves = [leaf for leaf, _ in pairs]
    with borrowed(leaves, [None] * len(leaves)), torch.enable_grad():
        roots = [leaf.view_as(leaf) if _both_strided(leaf, grad) else leaf for leaf, grad in pairs]
        torch.autograd.backward(roots, [grad for _, grad in pairs])
        return [(leaf, leaf.grad) for leaf in leaves]


def _both_strided(leaf: Any, grad: Any) -> bool:
    return bool(leaf.layout is torch.strided and grad.layout is torch.strided)
