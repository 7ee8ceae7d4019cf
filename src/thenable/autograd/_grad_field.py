"""The ``.grad`` field of leaf tensors, borrowed for a moment under one lock per process.

torch runs a leaf's hooks (tensor hooks, ``AccumulateGrad`` pre- and post-hooks, and through
those DDP's gradient reducer) only when its engine accumulates into ``.grad``, and an optimizer
steps on ``.grad``.  So the distributed backward and ``DistributedOptimizer`` both set ``.grad``
for the time of their local computation and put the old value back after: between passes and
steps, gradients live in the context only, and ``.grad`` is what the user left there.

Leaves may be shared (two trainers' passes over one parameter server's model), so no two
borrows overlap in a process.  What runs under the lock is local computation (and the
collectives of a DDP model's hooks), never a wait for an RPC reply.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ("borrowed",)

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
