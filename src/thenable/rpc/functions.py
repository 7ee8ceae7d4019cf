"""``rpc.functions``: decorators for functions called through RPC."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from thenable._aio import from_torch, is_torch_future
from thenable._future import Future
from thenable.rpc._errors import AsyncExecutionError

__all__ = ("async_execution", "is_async_execution")

F = TypeVar("F", bound=Callable[..., Any])

# The attribute torch installs; keeping its name lets torch-decorated functions work here too.
_MARKER = "_wrapped_async_rpc_function"


def async_execution(fn: F) -> F:
    """Mark ``fn`` as returning a Future whose value is the RPC reply.

    The callee does not hold a thread while that Future is pending: it installs sending the
    reply as a callback of the returned Future.  Combined with ``@staticmethod`` or
    ``@classmethod``, this must be the inner decorator; it also works on methods called through
    the RRef helpers (``rref.rpc_sync().method(...)`` etc.).

    Raises:
        TypeError: ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(
            f"async_execution decorates a function, got {type(fn).__qualname__}; as the inner "
            "decorator under @staticmethod/@classmethod it receives the plain function"
        )

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    setattr(wrapper, _MARKER, fn)
    return wrapper  # type: ignore[return-value]


def is_async_execution(fn: object) -> bool:
    """Whether ``fn`` (a function, bound method or static/class method) is ``async_execution``."""
    return getattr(fn, _MARKER, None) is not None


def check_async_result(fn: object, result: object) -> Future[Any]:
    """The Future an ``@async_execution`` function returned.

    Raises:
        AsyncExecutionError: it returned something else (torch's words, and ours).
    """
    if isinstance(result, Future):
        return result
    if is_torch_future(result):  # a torch.futures.Future, as torch's own functions return
        return from_torch(result)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    raise AsyncExecutionError(
        "Functions decorated with @rpc.async_function must return a torch.futures.Future "
        f"object, but got {type(result).__module__}.{type(result).__qualname__}: {name} is "
        f"marked @async_execution but returned {type(result).__qualname__}, not a "
        "thenable.Future"
    )


_DEFERRED = "_thenable_reply_may_wait"


def reply_may_wait(fn: F) -> F:
    """(Internal) Mark an RPC function whose reply the caller does not wait for at once (the
    confirmation of ``remote()``'s creation request): the callee sends it with its next frame
    to the caller, or within two of the transport watchdog's ticks, instead of in a write of its
    own.
    """
    setattr(fn, _DEFERRED, True)
    return fn


def may_reply_later(fn: object) -> bool:
    """Whether ``fn`` is marked with ``reply_may_wait``."""
    return getattr(fn, _DEFERRED, False) is True
