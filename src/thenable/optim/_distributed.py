"""One optimizer for parameters spread over workers: a local optimizer on each owner, stepped
with the gradients of a distributed autograd context.

Each owner's optimizer steps on the gradients ``get_gradients(context_id)`` holds there (a
parameter the pass did not reach has none, as in torch's functional optimizers); ``.grad`` is
set only for the step and restored after it, so gradients stay in the context.  No two steps in
one process overlap (optimizers may share parameters), and all owners step at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thenable._errors import as_runtime_error
from thenable.autograd import _grad_field, _torch, get_gradients
from thenable.rpc import RRef, rpc_async
from thenable.rpc._handlers import pinned

__all__ = ("DistributedOptimizer",)

torch = _torch.torch


class _LocalOptimizer:
    """The optimizer of the parameters one owner holds, made on that owner."""

    def __init__(
        self,
        optimizer_class: type[Any],
        params: list[RRef[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._params = [rref.local_value() for rref in params]
        self._optimizer = optimizer_class(self._params, *args, **kwargs)

    def step(self, context_id: int) -> None:
        grads = get_gradients(context_id)
        # Under the process's one .grad lock, as torch's one step lock: optimizers may share
        # parameters (two trainers' optimizers over one parameter server's model).
        with _grad_field.borrowed(self._params, [grads.get(p) for p in self._params]):
            self._optimizer.step()


@pinned
def _new_local_optimizer(
    optimizer_class: type[Any],
    params: list[RRef[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> RRef[_LocalOptimizer]:
    return RRef(_LocalOptimizer(optimizer_class, params, args, kwargs))


@pinned
def _step(optimizer: RRef[_LocalOptimizer], context_id: int) -> None:
    optimizer.local_value().step(context_id)


class DistributedOptimizer:
    """``torch.distributed.optim.DistributedOptimizer``: ``optimizer_class`` (any
    ``torch.optim.Optimizer``, made with ``*args, **kwargs``) over the parameters that
    ``params_rref`` point to, wherever they live.

    For example:

        optimizer = DistributedOptimizer(torch.optim.SGD, model.parameter_rrefs(), lr=0.05)
        with dist_autograd.context() as context_id:
            dist_autograd.backward(context_id, [loss(model(batch))])
            optimizer.step(context_id)

    Raises:
        TypeError: ``params_rref`` is not a list of RRefs.
        Exception: whatever making an owner's optimizer raised there.
    """

    def __init__(
        self,
        optimizer_class: type[Any],
        params_rref: Sequence[RRef[Any]],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if not isinstance(params_rref, (list, tuple)) or not all(
            isinstance(rref, RRef) for rref in params_rref
        ):
            raise TypeError(
                "params_rref must be a list of RRefs to parameters (for local parameters, "
                "rpc.RRef(param); for a RemoteModule, its remote_parameters())"
            )
        by_owner: dict[str, list[RRef[Any]]] = {}
        for rref in params_rref:
            by_owner.setdefault(rref.owner_name(), []).append(rref)
        made = [
            rpc_async(owner, _new_local_optimizer, (optimizer_class, rrefs, args, kwargs))
            for owner, rrefs in by_owner.items()
        ]
        self.remote_optimizers: list[RRef[_LocalOptimizer]] = _wait_all(made)

    def step(self, context_id: int) -> None:
        """Step every owner's optimizer, all at once, with the gradients of ``context_id``;
        return when all have stepped (raising the first error, as a RuntimeError)."""
        _wait_all([rpc_async(o.owner(), _step, (o, context_id)) for o in self.remote_optimizers])


def _wait_all(futures: list[Any]) -> list[Any]:
    """The results, once all are in (so none is left running); the first error, if any."""
    results, error = [], None
    for future in futures:
        try:
            results.append(future.wait())
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise as_runtime_error(error)
    return results
