"""How distributed autograd rides on RPC calls (``thenable.rpc._worker.extensions``).

A call made while a context is current carries a ``_Link``: the context id and a new message
id.  Both sides record, under that message id, the tensors requiring grad that the message
held: the sender the tensors it pickled (with their graphs), the receiver the fresh leaves it
rebuilt.  The callee runs the function inside the context (so its own calls carry it further),
and its reply carries a ``_Link`` of its own, the same way back.  User code run for a call in
another thread of the same worker (``remote()`` to itself, a proxy call waiting for its value)
runs inside the caller's context too (``_Current``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from thenable.autograd import _contexts, _engine
from thenable.rpc._handlers import pinned
from thenable.rpc._worker import extensions as _extensions

if TYPE_CHECKING:
    from thenable.rpc._worker.agent import Agent

__all__ = ("install",)


@pinned
class _Link:
    """What a message in a context carries: its context and message ids."""

    __slots__ = ("context_id", "is_reply", "message_id")

    def __init__(self, context_id: int, message_id: int, is_reply: bool) -> None:
        self.context_id = context_id
        self.message_id = message_id
        self.is_reply = is_reply

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Link, (self.context_id, self.message_id, self.is_reply))


class _Current:
    """The caller's context, for user code run for its call in another thread here."""

    __slots__ = ("context_id",)

    def __init__(self, context_id: int) -> None:
        self.context_id = context_id


class _Serving:
    """The callee's function runs with the caller's context current."""

    __slots__ = ("_context_id", "_previous")

    def __init__(self, context_id: int) -> None:
        self._context_id = context_id
        self._previous: int | None = None

    def __enter__(self) -> None:
        self._previous = _contexts.set_current_id(self._context_id)

    def __exit__(self, *_: object) -> None:
        _contexts.set_current_id(self._previous)


class _AutogradExtension:
    def request_extra(self, agent: Agent, destination: int) -> object | None:
        context_id = _contexts.current_id()
        if context_id is None:
            return None
        table = _contexts.table(agent)
        if table.get(context_id) is None:
            return None  # released meanwhile (a callback running after its block ended)
        return _Link(context_id, table.new_message_id(), False)

    def reply_extra(self, agent: Agent, destination: int, request_extra: object) -> object | None:
        if not isinstance(request_extra, _Link):
            return None
        table = _contexts.table(agent)
        return _Link(request_extra.context_id, table.new_message_id(), True)

    def sent(self, agent: Agent, destination: int, extra: object, tensors: list[Any]) -> None:
        assert isinstance(extra, _Link)
        context = _contexts.table(agent).get(extra.context_id)
        if context is not None:
            context.record_send(extra.message_id, destination, tensors)

    def received(self, agent: Agent, source: int, extra: object, tensors: list[Any]) -> None:
        if not isinstance(extra, _Link):
            return
        table = _contexts.table(agent)
        if extra.is_reply:  # the caller's context: gone if its block ended before the reply
            context = table.get(extra.context_id)
            if context is None:
                return
        else:
            context = table.get_or_create(extra.context_id)
            if context is None:
                return  # a request read after its context's release: make no new one
        context.record_recv(extra.message_id, source, tensors)

    def serving(self, agent: Agent, extra: object) -> _Serving:
        assert isinstance(extra, (_Link, _Current))
        return _Serving(extra.context_id)

    def current(self, agent: Agent) -> _Current | None:
        context_id = _contexts.current_id()
        return None if context_id is None else _Current(context_id)

    def rref_backward(self, agent: Agent, rref: Any, context_id: int, retain_graph: bool) -> None:
        _engine.rref_backward(agent, rref, context_id, retain_graph)


def install() -> None:
    _extensions.install(_AutogradExtension())
