"""Pinned wire names: every internal function and class that travels in RPC messages.

pickle writes a function or a class by where it lives (``__module__`` and ``__qualname__``),
so an internal handler (``_rref._fetch_value``) or rebuild function sent by its module path
would make moving a file a protocol change.  Instead, each is marked ``@pinned`` where it is
defined: it then lives, for pickle, in this module under its name in ``WIRE_NAMES``, and this
module answers that name (``__getattr__``) by importing the object from where it really lives.
Moving an object changes its location here, never its name on the wire.

Public classes (exceptions, ``WorkerInfo``) travel by their public path instead: ``publish``
sets their ``__module__`` to the package that exports them (``thenable.rpc.RpcTimeoutError``),
which is also how tracebacks and reprs name them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any, Final, TypeVar

__all__ = ("WIRE_NAMES", "pinned", "publish")

_T = TypeVar("_T")

WIRE_NAMES: Final[dict[str, str]] = {
    # name on the wire -> "module:attribute" where it lives
    "rref_add_fork": "thenable.rpc._rref:_add_fork",
    "rref_fail_creation": "thenable.rpc._rref:_fail_creation",
    "rref_fetch_value": "thenable.rpc._rref:_fetch_value",
    "rref_has_attribute": "thenable.rpc._rref:_has_attribute",
    "rref_invoke": "thenable.rpc._rref:_invoke",
    "rref_rebuild": "thenable.rpc._rref:_rebuild_rref",
    "rref_release_forks": "thenable.rpc._rref:_release_forks",
    "rref_remote_create": "thenable.rpc._rref:_remote_create",
    "rref_value_type": "thenable.rpc._rref:_value_type",
    "rendezvous_barrier": "thenable.rpc._group.rendezvous:_barrier",
    "rendezvous_join": "thenable.rpc._group.rendezvous:_join",
    "gather_at_leader": "thenable.rpc.api:_gather_at_leader",
    "worker_stats": "thenable.rpc._api:_worker_stats",
    "trace_announce": "thenable.rpc._group.tracing:_announce",
    "trace_clock": "thenable.rpc._group.tracing:_clock",
    "trace_deliver": "thenable.rpc._group.tracing:_deliver",
    "trace_start": "thenable.rpc._group.tracing:_start_here",
    "trace_stop": "thenable.rpc._group.tracing:_stop_here",
    "rebuild_block": "thenable.rpc._wire.serialize:_rebuild_block",
    "rebuild_ndarray": "thenable.rpc._wire.serialize:_rebuild_ndarray",
    "rebuild_packed_exception": "thenable.rpc._wire.serialize:_rebuild_packed_exception",
    "rebuild_requiring_grad": "thenable.rpc._wire.serialize:_rebuild_requiring_grad",
    "rebuild_small_tensor": "thenable.rpc._wire.serialize:_rebuild_small_tensor",
    "rebuild_storage": "thenable.rpc._wire.serialize:_rebuild_storage",
    "rebuild_tensor": "thenable.rpc._wire.serialize:_rebuild_tensor",
    "extension_reply": "thenable.rpc._worker.extensions:Reply",
    "autograd_backward_on_owner": "thenable.autograd._engine:_backward_on_owner",
    "autograd_dead": "thenable.autograd._engine:_dead",
    "autograd_link": "thenable.autograd._extension:_Link",
    "autograd_propagate": "thenable.autograd._engine:_propagate",
    "autograd_release_notified": "thenable.autograd._contexts:_release_notified",
    "autograd_resolve": "thenable.autograd._engine:_resolve",
    "optim_new_local_optimizer": "thenable.optim._distributed:_new_local_optimizer",
    "optim_step": "thenable.optim._distributed:_step",
    "nn_create_module": "thenable.nn._remote_module:_create_module",
    "nn_forward": "thenable.nn._remote_module:_forward",
    "nn_param_rrefs": "thenable.nn._remote_module:_param_rrefs",
    "nn_rebuild": "thenable.nn._remote_module:_rebuild",
    "nn_train": "thenable.nn._remote_module:_train",
}

_BY_LOCATION: Final = {location: name for name, location in WIRE_NAMES.items()}


def pinned(obj: _T) -> _T:
    """Mark a function or class defined at module level as one that travels in messages: from
    now on pickle writes it as this module's attribute named by ``WIRE_NAMES``.

    Raises:
        LookupError: ``WIRE_NAMES`` has no entry for where ``obj`` is defined.
    """
    target: Any = obj
    if target.__module__ == __name__ or not target.__module__.startswith("thenable."):
        return obj  # (its module ran twice; or a copy of it was loaded under another name)
    location = f"{target.__module__}:{target.__qualname__}"
    name = _BY_LOCATION.get(location)
    if name is None:
        raise LookupError(
            f"{location} is marked @pinned but has no wire name: add it to "
            f"{__name__}.WIRE_NAMES (or fix its location there, if it moved)"
        )
    target.__module__ = __name__
    target.__qualname__ = name
    return obj


def __getattr__(name: str) -> Any:
    """The object a message names: imported from where it lives, then kept here."""
    location = WIRE_NAMES.get(name)
    if location is None:
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r}: no internal RPC object has that "
            "wire name (is the peer running another version of thenable?)"
        )
    module_name, attribute = location.split(":")
    obj = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = obj
    return obj


def publish(package: str, namespace: dict[str, Any], names: Iterable[str]) -> None:
    """Give the classes among ``names`` that ``package`` exports from its private modules
    their public ``__module__`` (the trio idea): pickle, reprs and tracebacks then name
    ``package.Name``, which is where users find them and which does not move."""
    for name in names:
        obj = namespace[name]
        if isinstance(obj, type) and obj.__module__.startswith(f"{package}._"):
            obj.__module__ = package
