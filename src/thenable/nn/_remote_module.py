"""A module that lives on another worker: ``forward`` runs there by RPC.

``RemoteModule("worker1/cpu", nn.Linear, args=(20, 30))`` makes the module on ``worker1`` and
keeps an RRef to it.  Inside a distributed autograd context the calls link the graphs, so
``dist_autograd.backward`` reaches the remote parameters (``remote_parameters()`` gives RRefs
to them for a ``DistributedOptimizer``).  Methods that would need the module here (``to``,
``parameters``, ``state_dict``...) raise torch's ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from thenable._future import Future
from thenable.autograd._torch import torch
from thenable.rpc import RRef, rpc_async, rpc_sync
from thenable.rpc._handlers import pinned
from thenable.rpc._worker import context as _rpc_context

__all__ = ("RemoteModule",)

nn = torch.nn

# Methods of nn.Module that need the module itself, which is on another worker (torch's list).
_UNSUPPORTED = (
    "register_buffer",
    "register_parameter",
    "add_module",
    "apply",
    "cuda",
    "ipu",
    "xpu",
    "cpu",
    "type",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "register_backward_hook",
    "register_forward_pre_hook",
    "register_forward_hook",
    "state_dict",
    "load_state_dict",
    "named_parameters",
    "buffers",
    "named_buffers",
    "children",
    "named_children",
    "modules",
    "named_modules",
    "requires_grad_",
    "zero_grad",
    "share_memory",
    "extra_repr",
)


def _parse_remote_device(remote_device: str) -> tuple[str | int, str]:
    """``"worker1/cpu"``, ``"rank:1/cuda:0"`` or ``"worker1"`` -> (worker name or rank, device)."""
    if not isinstance(remote_device, str):
        raise TypeError(
            f"remote_device must be a string such as 'worker1/cpu', got "
            f"{type(remote_device).__qualname__}"
        )
    worker, _, device = remote_device.partition("/")
    device = device or "cpu"
    if not worker:
        raise ValueError(
            f"Could not parse remote_device: {remote_device!r}: expected '<worker>/<device>', "
            "e.g. 'worker1/cpu' or 'rank:1/cpu'"
        )
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"Could not parse remote_device: {remote_device!r}: {exc}") from None
    if worker.startswith("rank:"):
        try:
            return int(worker[len("rank:") :]), device
        except ValueError:
            raise ValueError(
                f"Could not parse remote_device: {remote_device!r}: 'rank:' must be followed "
                "by an integer rank"
            ) from None
    return worker, device


@pinned
def _create_module(
    module_cls: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], device: str
) -> RRef[Any]:
    """On the owner: make the module on ``device``; an RRef to it."""
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"RemoteModule on {device!r}: this worker has no CUDA device "
            "(torch.cuda.is_available() is False); use 'cpu'"
        )
    module = module_cls(*args, **kwargs)
    if not isinstance(module, nn.Module):
        raise ValueError(
            "Expect `module_cls(*args, **kwargs)` returns an instance of <class nn.Module>, "
            f"but {module_cls!r} made a {type(module).__qualname__}: module_cls must make an "
            "nn.Module"
        )
    return RRef(module.to(target))


@pinned
def _param_rrefs(module_rref: RRef[Any], recurse: bool) -> list[RRef[Any]]:
    return [RRef(param) for param in module_rref.local_value().parameters(recurse)]


@pinned
def _forward(module_rref: RRef[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return module_rref.local_value().forward(*args, **kwargs)


@pinned
def _train(module_rref: RRef[Any], mode: bool) -> None:
    module_rref.local_value().train(mode)


@pinned
def _rebuild(on: str | int, device: str, module_rref: RRef[Any]) -> RemoteModule:
    module = RemoteModule.__new__(RemoteModule)
    module._init_from(on, device, module_rref)
    return module


class RemoteModule(nn.Module):
    """``module_cls(*args, **kwargs)`` made on the worker ``remote_device`` names
    (``"worker1/cpu"``, ``"rank:1/cpu"``); ``forward`` runs it there, ``forward_async`` gives a
    Future of the result.

    It can be sent to other workers in RPC calls (they call the same remote module), not
    pickled otherwise.  Devices other than the CPU are accepted as syntax; a worker without
    that device refuses it with a clear error.

    Raises:
        ValueError: ``remote_device`` cannot be parsed; one of ``nn.Module``'s methods that
            need the module here is called.
        RuntimeError: RPC is not initialized; making the module failed on the worker.
    """

    def __init__(
        self,
        remote_device: str,
        module_cls: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        _module_interface_cls: Any = None,
    ) -> None:
        super().__init__()
        _rpc_context.require_agent()
        on, device = _parse_remote_device(remote_device)
        module_rref = rpc_sync(on, _create_module, (module_cls, args or (), kwargs or {}, device))
        self._init_from(on, device, module_rref)

    def _init_from(self, on: str | int, device: str, module_rref: RRef[Any]) -> None:
        if not hasattr(self, "_parameters"):
            nn.Module.__init__(self)
        self.on = on
        self.device = device
        self.module_rref = module_rref
        self.is_device_map_set = False

    @staticmethod
    def init_from_module_rref(
        remote_device: str, module_rref: RRef[Any], _module_interface_cls: Any = None
    ) -> RemoteModule:
        """A RemoteModule for a module that already lives behind ``module_rref`` (several
        RemoteModules may share one module)."""
        on, device = _parse_remote_device(remote_device)
        return _rebuild(on, device, module_rref)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The remote module's ``forward(*args, **kwargs)``, run on its worker."""
        return rpc_sync(self.module_rref.owner(), _forward, (self.module_rref, args, kwargs))

    def forward_async(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """A Future of the remote module's ``forward(*args, **kwargs)``."""
        return rpc_async(self.module_rref.owner(), _forward, (self.module_rref, args, kwargs))

    def remote_parameters(self, recurse: bool = True) -> list[RRef[Any]]:
        """RRefs to the remote module's parameters (for ``DistributedOptimizer``)."""
        return rpc_sync(self.module_rref.owner(), _param_rrefs, (self.module_rref, recurse))

    def get_module_rref(self) -> RRef[Any]:
        """The RRef to the remote module."""
        return self.module_rref

    def train(self, mode: bool = True) -> RemoteModule:
        """Set the remote module's training mode (``module.train(mode)`` on its worker, a
        blocking call); returns this RemoteModule."""
        rpc_sync(self.module_rref.owner(), _train, (self.module_rref, mode))
        return self

    def eval(self) -> RemoteModule:
        """``train(False)``: put the remote module in evaluation mode."""
        return self.train(False)

    def parameters(self, recurse: bool = True) -> NoReturn:
        """Not supported: the parameters live on the remote worker.

        Raises:
            ValueError: always; use ``remote_parameters()`` for RRefs of them.
        """
        raise ValueError(
            "Method ``parameters`` not supported for RemoteModule. Please use "
            "``remote_parameters`` instead."
        )

    def __repr__(self) -> str:
        return f"RemoteModule(on={self.on!r}, device={self.device!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        if _rpc_context.sending_to() is None:
            raise RuntimeError(
                "Cannot pickle RemoteModule in python pickler. RemoteModule can only be "
                "pickled when using RPC (as an argument or result of an RPC call)"
            )
        return (_rebuild, (self.on, self.device, self.module_rref))


def _not_supported(name: str) -> Callable[..., NoReturn]:
    def method(self: RemoteModule, *args: Any, **kwargs: Any) -> NoReturn:
        raise ValueError(f"Method ``{name}`` not supported for RemoteModule")

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"Not supported: ``{name}`` needs the module, which is on another worker."
    return method


for _name in _UNSUPPORTED:
    setattr(RemoteModule, _name, _not_supported(_name))
del _name
