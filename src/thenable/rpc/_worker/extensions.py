"""The one extension point of the RPC layer: what a call carries beyond its function and
arguments, and what is restored around its handler and its reply.

Distributed autograd (``thenable.autograd``, a layer above RPC) installs itself here; RPC never
imports it.  Without an installed extension a call costs one attribute read more.

- Before pickling a request, the agent asks ``request_extra(agent, destination)``; before
  pickling the reply to a request that carried an extra, ``reply_extra(agent, destination,
  request_extra)``.  A result other than None travels with the message (inside its pickle: a
  request as ``(fn, args, kwargs, extra)``, a reply as ``Reply(value, extra)``).
- Pickling a message collects the tensors in it that require grad (``_context``); after
  pickling, ``sent(agent, destination, extra, tensors)`` gets them.  The receiver, after
  unpickling a message with an extra, calls ``received(agent, source, extra, tensors)`` with
  the tensors it rebuilt that require grad, in the same order.
- A request's handler runs inside ``serving(agent, extra)``.
- User code that this process runs for a call in another thread than the caller's (``remote()``
  to this worker itself, a proxy call that waits for its RRef's value) runs inside
  ``serving(agent, current(agent))``, ``current`` taken in the calling thread: ``carried`` and
  ``run_carried`` below, so every path that runs user code for a call sees the same state.
- ``RRef.backward(context_id)`` hands over to ``rref_backward``.

The extra must be picklable and importable on the receiver: unpickling it there imports the
extension's module, which installs the extension in that process too.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

from thenable.rpc._handlers import pinned

# The agent (``thenable.rpc._worker.agent.Agent``) is passed through as it is; not naming its
# class here keeps this module below the agent in the import graph.
_Agent = Any
T = TypeVar("T")

__all__ = ("CallExtension", "Reply", "carried", "install", "installed", "run_carried")


class CallExtension(Protocol):
    """What an extension provides (see the module docstring)."""

    def request_extra(self, agent: _Agent, destination: int) -> object | None: ...

    def reply_extra(
        self, agent: _Agent, destination: int, request_extra: object
    ) -> object | None: ...

    def sent(self, agent: _Agent, destination: int, extra: object, tensors: list[Any]) -> None: ...

    def received(self, agent: _Agent, source: int, extra: object, tensors: list[Any]) -> None: ...

    def serving(self, agent: _Agent, extra: object) -> AbstractContextManager[None]:
        """Around a handler: ``extra`` is a request's extra, or what ``current`` returned."""

    def current(self, agent: _Agent) -> object | None:
        """This thread's state that user code run for its call elsewhere in this process
        needs (None: nothing)."""

    def rref_backward(self, agent: _Agent, rref: Any, context_id: int, retain_graph: bool) -> None:
        """``RRef.backward`` with a context id: the pass from the RRef's value, run on its
        owner."""


installed: CallExtension | None = None
"""The installed extension, if any."""


def install(extension: CallExtension) -> None:
    """Install ``extension`` for every agent of this process (the last one installed wins)."""
    global installed
    installed = extension


def carried(agent: _Agent) -> object | None:
    """What user code run for this thread's call in another thread must run under (see
    ``run_carried``); None without an extension, or when there is nothing to carry."""
    extension = installed
    return None if extension is None else extension.current(agent)


def run_carried(
    agent: _Agent, state: object | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)`` under ``state``, what ``carried`` returned in the caller's
    thread."""
    extension = installed
    if state is None or extension is None:
        return fn(*args, **kwargs)
    with extension.serving(agent, state):
        return fn(*args, **kwargs)


@pinned
class Reply:
    """A reply value with the extra that travels with it."""

    __slots__ = ("extra", "value")

    def __init__(self, value: object, extra: object) -> None:
        self.value = value
        self.extra = extra

    def __reduce__(self) -> tuple[Any, ...]:
        return (Reply, (self.value, self.extra))
