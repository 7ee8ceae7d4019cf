"""thenable.autograd: distributed autograd, the counterpart of ``torch.distributed.autograd``.

Code written for torch runs after changing its import:

    import thenable.autograd as dist_autograd   # was: import torch.distributed.autograd ...

    with dist_autograd.context() as context_id:
        loss = rpc.rpc_sync("worker1", forward, args=(rref, batch)).sum()
        dist_autograd.backward(context_id, [loss])
        grads = dist_autograd.get_gradients(context_id)   # {tensor: gradient}, this worker's

Every RPC made inside the block (and the nested calls its callees make) links the tensors that
require grad on both sides; ``backward`` runs the pass on every worker the forward pass
touched; gradients accumulate in the context, not in ``.grad``; leaving the block releases the
context on every worker.  Needs torch (``pip install 'thenable[torch]'``).
"""

from __future__ import annotations

from typing import Any

from thenable.autograd import _extension
from thenable.autograd._contexts import DistAutogradContext, current_id, release_everywhere
from thenable.autograd._contexts import set_current_id as _set_current_id
from thenable.autograd._contexts import table as _table
from thenable.autograd._engine import BackwardError, check_roots, run_backward
from thenable.rpc import _handlers
from thenable.rpc._worker import agent as _agent

__all__ = (
    "BackwardError",
    "DistAutogradContext",
    "backward",
    "context",
    "get_gradients",
    "is_available",
)

_extension.install()


class context:  # lower case: torch's name, used as `with dist_autograd.context() as cid:`
    """A distributed autograd context for one forward and backward pass; ``with`` gives its
    globally unique id.  Leaving the block releases it here and on every worker it reached.

    Raises:
        RuntimeError: RPC is not initialized, or this thread already has a context.
    """

    def __init__(self) -> None:
        self._context_id: int | None = None

    def __enter__(self) -> int:
        agent = _agent.require_agent()
        if current_id() is not None:
            raise RuntimeError(
                "Already have an autograd context id for this thread: distributed autograd "
                "contexts do not nest (end the outer `with dist_autograd.context()` first)"
            )
        new = _table(agent).new()
        self._context_id = new._context_id()
        _set_current_id(self._context_id)
        return self._context_id

    def __exit__(self, *_: object) -> None:
        context_id, self._context_id = self._context_id, None
        _set_current_id(None)
        agent = _agent.current_agent()
        if agent is not None and context_id is not None:
            release_everywhere(agent, context_id)


def backward(context_id: int, roots: list[Any], retain_graph: bool = False) -> None:
    """Run the backward pass from scalar ``roots`` on every worker the forward pass touched;
    return when all gradients are in the context.

    ``retain_graph`` is accepted for torch's signature; the graph is always kept until the
    context ends, so a second ``backward`` in the same context works either way (torch
    raises there without ``retain_graph=True``).

    Raises:
        RuntimeError: unknown or released context id; a root that does not require grad, is not
            a scalar or is a leaf; an error in a backward function or a worker lost, on any
            worker (``BackwardError`` and the RPC errors are RuntimeErrors).
        TypeError: ``roots`` is not a list of tensors.
    """
    del retain_graph
    agent = _agent.require_agent()
    found = _table(agent).retrieve(context_id)
    run_backward(agent, found, check_roots(roots))


def get_gradients(context_id: int) -> dict[Any, Any]:
    """``{tensor: gradient}`` for the leaves on this worker that the context's backward
    passes reached (the sum over passes)."""
    return _table().retrieve(context_id).gradients()


def is_available() -> bool:
    """Distributed autograd is available (torch's check; here: whenever this imports)."""
    return True


def _current_context() -> DistAutogradContext:
    """This thread's context (torch's private helper, used by its tests and programs)."""
    context_id = current_id()
    if context_id is None:
        raise RuntimeError(
            "Current thread doesn't have a valid autograd context. Wrap the code in `with "
            "dist_autograd.context() as context_id:`"
        )
    return _table().retrieve(context_id)


def _retrieve_context(context_id: int) -> DistAutogradContext:
    return _table().retrieve(context_id)


def _is_valid_context(context_id: int) -> bool:
    return _table().get(context_id) is not None


def _get_max_id() -> int:
    """The largest context id this worker can make (torch's private helper)."""
    return _table().max_id


def _get_debug_info() -> dict[str, str]:
    """Counts, as torch's (strings, as torch gives them): contexts alive on this worker and
    its parts of backward passes still running."""
    found = _table()
    return {
        "num_current_backward_passes": str(found.passes_running),
        "num_autograd_contexts": str(len(found)),
    }


_handlers.publish(__name__, globals(), __all__)  # BackwardError travels by its public path
