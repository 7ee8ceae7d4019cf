"""Process-wide and per-thread context of the RPC layer.

The current agent (set by ``init_rpc``, cleared by ``shutdown``), and, while a message is being
pickled or unpickled, which worker it goes to or comes from: an RRef needs that to register the
new reference with its owner (see ``_rref``).

The layers below the agent see it as a ``Worker``: the part of ``_agent.Agent`` they use, so that
they need not import the agent (which imports them).  The layers above it get the ``Agent``
itself from ``_agent.require_agent()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from thenable._future import Future
    from thenable._pool import InteropPool

__all__ = (
    "NO_FORKS",
    "ForkRecord",
    "Worker",
    "current_agent",
    "receiving",
    "require_agent",
    "sending",
    "set_agent",
)


class Worker(Protocol):
    """What the layers below the agent use of it (``_agent.Agent`` provides it)."""

    name: str
    rank: int
    rpc_timeout: float
    rrefs: Any  # its _rref.OwnerTable
    pool: InteropPool

    def name_of(self, rank: int) -> str: ...

    def call(
        self,
        to_rank: int,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
        *,
        counted: bool = True,
    ) -> Future[Any]: ...

    def notify(self, to_rank: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None: ...


_AGENT: Worker | None = None


def set_agent(agent: Worker | None) -> None:
    global _AGENT
    _AGENT = agent


def current_agent() -> Worker | None:
    return _AGENT


def require_agent() -> Worker:
    """The running agent, or a RuntimeError telling the user to call ``init_rpc`` first."""
    agent = _AGENT
    if agent is None:
        raise RuntimeError(
            "RPC has not been initialized on this process: call "
            "thenable.rpc.init_rpc(name, rank=..., world_size=...) first"
        )
    return agent


class ForkRecord:
    """What pickling one message did to RRef references, to finish or undo once it is sent.

    Attributes:
        is_request: the message is a request (its reply tells that the peer processed it).
        holds: RRefs to keep alive until the reply arrives.
        undo: what to run if the message is never sent.
        after_send: what to run once it has been sent.
        reductions: how each RRef (by id) was pickled, so that pickling the message again
            (``dumps`` may make a second pass) makes no second fork.
    """

    def __init__(self, is_request: bool) -> None:
        self.is_request = is_request
        self.reductions: dict[int, tuple[Any, ...]] = {}
        self.holds: list[Any] = []
        self.undo: list[Callable[[], None]] = []
        self.after_send: list[Callable[[], None]] = []

    def sent(self) -> None:
        for action in self.after_send:
            action()

    def unsent(self) -> None:
        for action in self.undo:
            action()


NO_FORKS = ForkRecord(False)
"""The record of a message that pickled no RRef (nothing is ever added to it)."""


class _Local(threading.local):
    def __init__(self) -> None:
        self.destination: int | None = None
        self.source: int | None = None
        self.agent: Any = None
        self.sending: sending | None = None
        self.receiving: receiving | None = None


_LOCAL = _Local()


class sending:  # lower case: used like a function, `with sending(...) as message:`
    """Pickling a message for ``destination``; RRefs pickled now note their forks in
    ``record`` (made by the first of them: most messages carry none, and keep ``NO_FORKS``).

    If pickling fails the record is undone here; otherwise the caller calls ``sent()`` or
    ``unsent()`` on it once it knows whether the message left.  (A class rather than a
    generator context manager: this runs for every message.)
    """

    __slots__ = ("_is_request", "_saved", "grads", "record")

    def __init__(
        self, agent: Worker, destination: int, *, is_request: bool, note_grads: bool = False
    ) -> None:
        self._saved = (_LOCAL.agent, _LOCAL.destination, _LOCAL.sending)
        self._is_request = is_request
        self.record = NO_FORKS
        self.grads: dict[int, Any] | None = {} if note_grads else None
        _LOCAL.agent, _LOCAL.destination, _LOCAL.sending = agent, destination, self

    def __enter__(self) -> sending:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        _LOCAL.agent, _LOCAL.destination, _LOCAL.sending = self._saved
        if kind is not None:
            self.record.unsent()

    def forks(self) -> ForkRecord:
        """The record, made now if this is the message's first RRef."""
        if self.record is NO_FORKS:
            self.record = ForkRecord(self._is_request)
        return self.record

    def grad_tensors(self) -> list[Any]:
        """The tensors requiring grad that the message holds, in pickling order (only when
        made with ``note_grads``)."""
        return list(self.grads.values()) if self.grads else []


class receiving:  # lower case: used like a function
    """Unpickling a message from ``source``; ``grad_tensors`` are the rebuilt tensors that
    require grad, in the order they were pickled."""

    __slots__ = ("_saved", "grad_tensors")

    def __init__(self, agent: Worker, source: int) -> None:
        self._saved = (_LOCAL.agent, _LOCAL.source, _LOCAL.receiving)
        self.grad_tensors: list[Any] = []
        _LOCAL.agent, _LOCAL.source, _LOCAL.receiving = agent, source, self

    def __enter__(self) -> receiving:
        return self

    def __exit__(self, *_: object) -> None:
        _LOCAL.agent, _LOCAL.source, _LOCAL.receiving = self._saved


def note_sent_grad(tensor: Any) -> None:
    """A tensor requiring grad is being pickled (see ``sending(note_grads=True)``)."""
    message = _LOCAL.sending
    if message is not None and message.grads is not None:
        message.grads.setdefault(id(tensor), tensor)  # dumps may pickle a message twice


def note_received_grad(tensor: Any) -> None:
    """A tensor requiring grad has been rebuilt from a message."""
    message = _LOCAL.receiving
    if message is not None:
        message.grad_tensors.append(tensor)


def sending_to() -> tuple[Worker, int, ForkRecord] | None:
    """(agent, destination, record) while a message is being pickled, else None."""
    message = _LOCAL.sending
    if message is None or _LOCAL.destination is None:
        return None
    return _LOCAL.agent, _LOCAL.destination, message.forks()


def received_from() -> tuple[Worker, int] | None:
    """(agent, source) while a message is being unpickled, else None."""
    if _LOCAL.source is None:
        return None
    return _LOCAL.agent, _LOCAL.source
