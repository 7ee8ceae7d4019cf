"""Distributed autograd contexts: what one worker knows of each training step.

A context holds, under its globally unique id, the tensors this worker sent that require grad
(by message id: the backward pass starts from them when the receiver sends their gradients
back), the tensors it received that require grad (by message id, with their sender), the
gradients accumulated for its own leaves, and the workers the context reached (so that leaving
it releases it everywhere).  Ids are ``rank << 48`` plus a counter, as torch's are.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from thenable.autograd._pass import PassState
from thenable.rpc._handlers import pinned
from thenable.rpc._worker import agent as _agent

if TYPE_CHECKING:
    from thenable.rpc._worker.agent import Agent

__all__ = (
    "ContextTable",
    "DistAutogradContext",
    "current_id",
    "release_everywhere",
    "set_current_id",
    "table",
)

_LOGGER = logging.getLogger(__name__)

_ID_BITS = 48
_RELEASED_KEPT = 4096  # (ids, a few bytes each)


class DistAutogradContext:
    """One distributed autograd context on this worker (torch's ``DistAutogradContext``)."""

    def __init__(self, context_id: int) -> None:
        self._id = context_id
        self._lock = threading.Lock()
        self._sends: dict[int, list[Any]] = {}
        self._recvs: dict[int, tuple[int, list[Any]]] = {}
        self._recv_slots: dict[int, tuple[int, int]] = {}  # id(tensor) -> (message id, index)
        self._gradients: dict[int, tuple[Any, Any]] = {}  # id(leaf) -> (leaf, gradient)
        self._known: set[int] = set()
        self._passes: dict[int, PassState] = {}  # backward pass id -> its state here

    def __repr__(self) -> str:
        return f"DistAutogradContext(context_id={self._id})"

    def _context_id(self) -> int:
        return self._id

    def _known_worker_ids(self) -> set[int]:
        """The ranks this context sent to or received from (torch's name)."""
        with self._lock:
            return set(self._known)

    def _send_functions(self) -> dict[int, list[Any]]:
        """Message id -> the tensors sent in it that require grad."""
        with self._lock:
            return {mid: list(tensors) for mid, tensors in self._sends.items()}

    def _recv_functions(self) -> dict[int, list[Any]]:
        """Message id -> the tensors received in it that require grad."""
        with self._lock:
            return {mid: list(tensors) for mid, (_, tensors) in self._recvs.items()}

    # -- recording (called by the RPC extension) --------------------------------------------

    def know(self, rank: int) -> None:
        """Count worker ``rank`` among those this context reached (the release goes there too)."""
        with self._lock:
            self._known.add(rank)

    def record_send(self, message_id: int, rank: int, tensors: list[Any]) -> None:
        """Remember the tensors that require grad sent to worker ``rank`` in message
        ``message_id``: the gradients that come back for that message flow into them.

        Called by the RPC extension, in the thread that sends the message.
        """
        with self._lock:
            self._known.add(rank)
            if tensors:
                self._sends[message_id] = tensors

    def record_recv(self, message_id: int, rank: int, tensors: list[Any]) -> None:
        """Remember the tensors that require grad received from worker ``rank`` in message
        ``message_id``: their gradients go back to that worker in the backward pass.

        Called by the RPC extension, in the thread that reads the message.
        """
        with self._lock:
            self._known.add(rank)
            if tensors:
                self._recvs[message_id] = (rank, tensors)
                for index, tensor in enumerate(tensors):
                    self._recv_slots[id(tensor)] = (message_id, index)

    def _recv_messages(self) -> dict[int, tuple[int, list[Any]]]:
        """Message id -> (sender, the tensors received in it that require grad)."""
        with self._lock:
            return dict(self._recvs)

    # -- backward -----------------------------------------------------------------------------

    def backward_pass(self, pass_id: int) -> PassState:
        """The state of backward pass ``pass_id`` on this worker (made on first use; kept
        with the context)."""
        with self._lock:
            state = self._passes.get(pass_id)
            if state is None:
                state = self._passes[pass_id] = PassState()
            return state

    def is_received(self, tensor: Any) -> bool:
        """Whether ``tensor`` came in a message (its gradient goes back to the sender)."""
        return id(tensor) in self._recv_slots

    def sent_tensors(self, message_id: int) -> list[Any]:
        """The tensors that require grad this worker sent in message ``message_id``.

        Raises:
            RuntimeError: this context sent no such message with tensors that require grad.
        """
        with self._lock:
            tensors = self._sends.get(message_id)
        if tensors is None:
            raise RuntimeError(
                f"autograd context {self._id} has no message {message_id} with tensors that "
                "require grad: the gradients came back to a worker that did not send them"
            )
        return tensors

    def route(self, grads: list[tuple[Any, Any]]) -> dict[int, tuple[int, list[Any]]]:
        """Accumulate the gradients of this worker's own leaves; return those of received
        tensors, by message id: ``(sender, one gradient or None per tensor of the message)``."""
        outgoing: dict[int, tuple[int, list[Any]]] = {}
        with self._lock:
            kept: set[int] = {id(g) for _, g in self._gradients.values()}
            for leaf, grad in grads:
                if grad is None:
                    continue
                slot = self._recv_slots.get(id(leaf))
                if slot is not None:
                    message_id, index = slot
                    sender, tensors = self._recvs[message_id]
                    if message_id not in outgoing:
                        outgoing[message_id] = (sender, [None] * len(tensors))
                    bucket = outgoing[message_id][1]
                    bucket[index] = grad if bucket[index] is None else bucket[index] + grad
                    continue
                held = self._gradients.get(id(leaf))
                if held is not None:
                    total = held[1] + grad  # a new tensor: none given out is changed
                elif id(grad) in kept or _shares_memory(grad):
                    total = grad.clone()  # one gradient for two leaves, or a view: own it
                else:
                    total = grad  # (as torch, which takes over a fresh gradient buffer)
                kept.add(id(total))
                self._gradients[id(leaf)] = (leaf, total)
        return outgoing

    def gradients(self) -> dict[Any, Any]:
        """``{tensor: gradient}`` for this worker's leaves that the context's backward passes
        reached (the sum over passes); a copy."""
        with self._lock:
            return dict(self._gradients.values())


def _shares_memory(grad: Any) -> bool:
    """``grad`` is a view, or not laid out contiguously (it may alias other memory)."""
    return grad._base is not None or (grad.layout is _strided() and not grad.is_contiguous())


def _strided() -> Any:
    import torch

    return torch.strided


class ContextTable:
    """The contexts of one agent, and the ids it hands out."""

    def __init__(self, rank: int) -> None:
        if not 0 <= rank < 1 << 16:
            raise RuntimeError(f"distributed autograd supports ranks below 65536, not {rank}")
        self._lock = threading.Lock()
        self._contexts: dict[int, DistAutogradContext] = {}
        # Ids released lately: a request of a context can be read after the release that its
        # sender sent after it (requests are unpickled on the pool, releases at once), and
        # must not make the context again.
        self._released: collections.OrderedDict[int, None] = collections.OrderedDict()
        base = rank << _ID_BITS
        self._max_id = base + (1 << _ID_BITS) - 1
        self._context_ids = itertools.count(base)
        self._message_ids = itertools.count(base)
        self._passes_running: collections.Counter[int] = collections.Counter()

    def __len__(self) -> int:
        return len(self._contexts)

    @property
    def max_id(self) -> int:
        """The largest context id this worker can hand out (its rank in the top 16 bits)."""
        return self._max_id

    @property
    def passes_running(self) -> int:
        """The backward passes this worker has a part in that is not done yet (torch's count:
        contexts, however many of their gradient messages are being worked on here)."""
        return len(self._passes_running)

    def pass_started(self, context_id: int) -> None:
        with self._lock:
            self._passes_running[context_id] += 1

    def pass_ended(self, context_id: int) -> None:
        with self._lock:
            self._passes_running[context_id] -= 1
            if not self._passes_running[context_id]:
                del self._passes_running[context_id]

    def new(self) -> DistAutogradContext:
        context = DistAutogradContext(next(self._context_ids))
        with self._lock:
            self._contexts[context._id] = context
        return context

    def new_message_id(self) -> int:
        return next(self._message_ids)

    def get(self, context_id: int) -> DistAutogradContext | None:
        return self._contexts.get(context_id)

    def get_or_create(self, context_id: int) -> DistAutogradContext | None:
        """The context ``context_id``, made here if a call brings it for the first time (None
        if it was released here already)."""
        context = self._contexts.get(context_id)
        if context is None:
            with self._lock:
                if context_id in self._released:
                    return None
                context = self._contexts.setdefault(context_id, DistAutogradContext(context_id))
        return context

    def retrieve(self, context_id: int) -> DistAutogradContext:
        """The context, or torch's RuntimeError for an unknown or released id."""
        if not isinstance(context_id, int) or isinstance(context_id, bool):
            raise TypeError(
                "incompatible function arguments: an autograd context id is an int (from "
                f"`with dist_autograd.context() as context_id`), got "
                f"{type(context_id).__qualname__}"
            )
        context = self._contexts.get(context_id)
        if context is None:
            raise RuntimeError(
                f"Could not find autograd context with id: {context_id} (it was never made "
                "on this worker, or its `with dist_autograd.context()` block has ended)"
            )
        return context

    def release(self, context_id: int) -> DistAutogradContext | None:
        with self._lock:
            self._released[context_id] = None
            if len(self._released) > _RELEASED_KEPT:
                self._released.popitem(last=False)
            return self._contexts.pop(context_id, None)


_TABLES: weakref.WeakKeyDictionary[Agent, ContextTable] = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def table(agent: Agent | None = None) -> ContextTable:
    """The context table of ``agent`` (by default the running one)."""
    if agent is None:
        agent = _agent.require_agent()
    found = _TABLES.get(agent)
    if found is None:
        with _TABLES_LOCK:
            found = _TABLES.get(agent)
            if found is None:
                found = _TABLES[agent] = ContextTable(agent.rank)
    return found


class _Local(threading.local):
    context_id: int | None = None


_LOCAL = _Local()


def current_id() -> int | None:
    """The id of this thread's current context, if any."""
    return _LOCAL.context_id


def set_current_id(context_id: int | None) -> int | None:
    """Make ``context_id`` this thread's current context; return the previous one."""
    previous = _LOCAL.context_id
    _LOCAL.context_id = context_id
    return previous


def release_everywhere(agent: Agent, context_id: int, source: int | None = None) -> None:
    """Release the context here and tell every worker it reached (but ``source``, which told
    us) to do the same; they pass it on to the workers they reached in turn."""
    context = table(agent).release(context_id)
    if context is None:
        return  # released already (the message went round a cycle), or never reached here
    for rank in sorted(context._known_worker_ids() - {agent.rank, source}):
        try:
            agent.notify(rank, _release_notified, (context_id, agent.rank))
        except Exception as exc:  # that worker is gone or RPC is shutting down: nothing to free
            _LOGGER.info(
                "could not release autograd context %d on rank %d: %s", context_id, rank, exc
            )


@pinned
def _release_notified(context_id: int, source: int) -> None:
    agent = _agent.current_agent()
    if agent is not None:  # (else this worker shuts down: its contexts are gone with it)
        release_everywhere(agent, context_id, source)
