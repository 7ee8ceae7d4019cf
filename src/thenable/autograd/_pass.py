"""One worker's part of one backward pass: which of its nodes may run now, and what waits.

A worker's graph is reached by the gradients of the messages it sent (and, on the worker that
called ``backward``, by the roots).  As torch's engine does, a node runs once, after every
gradient for it that will arrive has arrived: so while a message this worker sent has not had
its gradients back (it is *pending*), the nodes its tensors reach (the *blocked* region) do not
run.  A run from the gradients that did arrive stops at the edges into blocked nodes and keeps
the gradients that reached them (*held*), with the gradients of this worker's own leaves, until
the messages they wait for are settled.  (torch's engine captures a node's input from every path
at once: where one stopping edge's node lies below another's, the nodes feeding it wait too.)
Gradients of a received message none of whose tensors is blocked are final and go back to its
sender at once (waiting with them could deadlock a pass that crosses a worker twice); the others
go back when the message's last tensor is final: a message's gradients go back once, as torch's
receiving node runs once.  While nothing is pending, a run is one ``torch.autograd.backward``
into the leaves.

A pending message is settled when its gradients arrive, or when its receiver declares that they
never will (*dead*: no gradient reached those tensors, and none of what the receiver still waits
for reaches them).  Receivers declare only once the pass is *resolving*, which the worker that
started the pass sets everywhere when its first wave of gradients is done and some worker said
it still held gradients then (see ``_engine``): torch's engine would wait for those gradients
forever; ours runs what they held back with what did arrive.  Every message was sent after the
ones it was computed from, so the messages alone never wait in a cycle; nodes that wait as
feeders can (a worker's weight used before and after a round trip through other workers), and
for that last case the pass is *forced*: every worker runs what it holds with what it has, and
gradients that come later run their nodes again (the sums at the leaves stay right).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from thenable._tracing import recorder as _recorder
from thenable.autograd import _grad_field
from thenable.autograd._graph import (
    Blocked,
    Region,
    frontier,
    leaf_of,
    node_of,
    unsafe_feeders,
    walk,
)
from thenable.autograd._torch import torch

if TYPE_CHECKING:
    from thenable._future import Future

__all__ = ("BackwardError", "Event", "Messages", "PassState", "Step", "advance")


class Messages(Protocol):
    """What a pass uses of its context (``_contexts.DistAutogradContext``, which holds the
    passes' states: named here by what it does, so that neither module imports the other)."""

    _id: int

    def _send_functions(self) -> dict[int, list[Any]]: ...

    def _recv_messages(self) -> dict[int, tuple[int, list[Any]]]: ...

    def route(self, grads: list[tuple[Any, Any]]) -> dict[int, tuple[int, list[Any]]]: ...

    def is_received(self, tensor: Any) -> bool: ...


Seeds = list[tuple[Any, Any]]
"""(target, gradient) pairs: a target is a tensor or a ``GradientEdge``."""


class BackwardError(RuntimeError):
    """An error raised by the backward pass on one worker ("Error on Node N: ...", as torch
    says); the original is its ``__cause__`` where it could travel."""


class Event:
    """What reached a pass on this worker: gradients of sent messages (or the roots), messages
    declared dead, the start of resolving.  ``done``: when it and what it caused are done; its
    value says whether a worker still held gradients then."""

    __slots__ = ("arrived", "dead", "done", "forced", "resolving", "seeds")

    def __init__(
        self,
        done: Future[bool],
        seeds: Sequence[tuple[Any, Any]] = (),
        arrived: tuple[int, ...] | list[int] = (),
        dead: tuple[int, ...] | list[int] = (),
        resolving: bool = False,
        forced: bool = False,
    ) -> None:
        self.done = done
        self.seeds = [(target, grad) for target, grad in seeds if grad is not None]
        self.arrived = arrived
        self.dead = dead
        self.resolving = resolving
        self.forced = forced


class PassState:
    """One pass on this worker.  Its events run one batch at a time, in the thread that finds
    no batch running (``enqueue``/``take``); the fields below the lock's belong to that thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Event] = []
        self._running = False
        self._holding = False
        self._resolve_round = 0
        self.arrived: set[int] = set()  # sent messages whose gradients came
        self.dead: set[int] = set()  # sent messages whose gradients never will
        self.given: set[int] = set()  # received messages whose gradients went back
        self.declared: set[int] = set()  # received messages declared dead to their senders
        self.held: dict[tuple[int, int], tuple[Any, Any]] = {}  # -> (edge or leaf, grad)
        self.resolving = False
        self.forced = False  # every sent message counts as settled (see the module docstring)

    def enqueue(self, event: Event) -> bool:
        """Queue ``event``; True if the caller must run the queue (``take`` until None)."""
        with self._lock:
            self._queue.append(event)
            if self._running:
                return False
            self._running = True
            return True

    def take(self) -> list[Event] | None:
        """The events queued since the last batch, or None (and the queue is free again)."""
        with self._lock:
            if not self._queue:
                self._running = False
                return None
            batch, self._queue = self._queue, []
            return batch

    def start_resolving(self, wave: int) -> bool:
        """True the first time wave ``wave`` reaches this worker (each passes it once)."""
        with self._lock:
            if wave <= self._resolve_round:
                return False
            self._resolve_round = wave
            return True

    @property
    def holding(self) -> bool:
        """Whether gradients wait here for pending messages (as of the last batch)."""
        with self._lock:
            return self._holding

    def _set_holding(self) -> None:
        with self._lock:
            self._holding = bool(self.held)

    def hold(self, target: Any, grad: Any) -> None:
        """Keep ``grad`` for ``target`` (an edge, or a leaf tensor) until a later run."""
        if isinstance(target, torch.Tensor):
            key = (id(target), -1)
        else:
            key = (id(target.node), target.output_nr)
        kept = self.held.get(key)
        self.held[key] = (target, grad if kept is None else kept[1] + grad)


class Step:
    """What a batch leaves to send: gradients by sender (``{sender: {message: grads}}``) and
    dead received messages by sender."""

    __slots__ = ("dead", "gradients")

    def __init__(self) -> None:
        self.gradients: dict[int, dict[int, list[Any]]] = {}
        self.dead: dict[int, list[int]] = {}


def advance(rank: int, context: Messages, state: PassState, batch: list[Event]) -> Step:
    """Run what ``batch`` lets run; accumulate this worker's leaves into the context."""
    seeds: Seeds = []
    for event in batch:
        seeds.extend(event.seeds)
        state.arrived.update(event.arrived)
        state.dead.update(event.dead)
        state.resolving = state.resolving or event.resolving
        state.forced = state.forced or event.forced
    seeds.extend(state.held.values())
    state.held.clear()
    settled = state.arrived | state.dead
    blocked = Blocked(
        tensor
        for message_id, tensors in context._send_functions().items()
        if message_id not in settled and not state.forced
        for tensor in tensors
    )
    step = Step()
    if seeds:
        outgoing = context.route(_run(rank, state, context, seeds, blocked))
        received = context._recv_messages() if outgoing and blocked.leaves else {}
        for message_id, (sender, grads) in outgoing.items():
            tensors = received[message_id][1] if received else ()
            if any(id(tensor) in blocked.leaves for tensor in tensors):
                # Others of its tensors still wait here: the message's gradients go back whole,
                # once (its sender's nodes would run twice else).
                for tensor, grad in zip(tensors, grads, strict=True):
                    if grad is not None:
                        state.hold(tensor, grad)
                continue
            state.given.add(message_id)
            step.gradients.setdefault(sender, {})[message_id] = grads
    if state.resolving:
        _declare_dead(context, state, blocked, step)
    state._set_holding()
    return step


def _run(
    rank: int, state: PassState, context: Messages, seeds: Seeds, blocked: Blocked
) -> list[tuple[Any, Any]]:
    """Run from ``seeds`` up to ``blocked``; the (leaf, gradient) pairs that are final."""
    while True:
        if blocked:
            runnable: Seeds = []
            for target, grad in seeds:
                if blocked.holds(target):
                    state.hold(target if node_of(target) is None else _edge_of(target), grad)
                else:
                    runnable.append((target, grad))
            seeds = runnable
        if not seeds:
            return []
        region = walk((node_of(target) for target, _ in seeds), stop=blocked)
        edges = frontier(region, blocked) if blocked else []
        feeders = unsafe_feeders(region, edges)
        if not feeders:
            break
        blocked.extend(feeders)
    start = _recorder.now() if _recorder.recording else 0
    try:
        if edges:
            pairs = _run_to(state, context, seeds, region, edges, blocked)
        else:
            pairs = _backward_into_leaves(seeds, region)
    except Exception as exc:
        raise BackwardError(f"Error on Node {rank}: {exc}") from exc
    if start:
        args = {"context_id": context._id, "leaves": len(pairs)}
        _recorder.complete("dist_autograd backward", "autograd", start, args)
    return pairs


def _edge_of(target: Any) -> Any:
    """A non-leaf tensor's ``GradientEdge`` (an edge as it is)."""
    if isinstance(target, torch.Tensor):
        return torch.autograd.graph.get_gradient_edge(target)
    return target


def _leaves(region: Region, seeds: Sequence[tuple[Any, Any]] = ()) -> list[Any]:
    """The leaves of ``region``'s gradient accumulators, and the seeds that are leaf tensors."""
    found: dict[int, Any] = {}
    for node in region.values():
        leaf = leaf_of(node)
        if leaf is not None:
            found.setdefault(id(leaf), leaf)
    for target, _ in seeds:
        if isinstance(target, torch.Tensor) and target.grad_fn is None:
            found.setdefault(id(target), target)
    return list(found.values())


def _backward_into_leaves(seeds: Seeds, region: Region) -> list[tuple[Any, Any]]:
    """The leaves' gradients, accumulated into their ``.grad`` with their hooks (DDP's reducer
    among them; see ``_grad_field``).  Computed outside the ``.grad`` lock, unless a leaf has
    tensor hooks: those run in the engine's pass, so that pass runs into the borrowed field."""
    leaves = _leaves(region, seeds)
    if not leaves:
        return []
    targets = [target for target, _ in seeds]
    grads = [grad for _, grad in seeds]
    if any(_grad_field.has_tensor_hooks(leaf) for leaf in leaves):
        with _grad_field.borrowed(leaves, [None] * len(leaves)):
            torch.autograd.backward(targets, grads, retain_graph=True, inputs=leaves)
            return [(leaf, leaf.grad) for leaf in leaves]
    computed = torch.autograd.grad(targets, leaves, grads, retain_graph=True, allow_unused=True)
    return _grad_field.accumulate(
        [(leaf, grad) for leaf, grad in zip(leaves, computed, strict=True) if grad is not None]
    )


def _run_to(
    state: PassState,
    context: Messages,
    seeds: Seeds,
    region: Region,
    edges: list[Any],
    blocked: Blocked,
) -> list[tuple[Any, Any]]:
    """The gradients at the edges into blocked nodes and at this worker's own leaves are held
    (the leaves accumulate, with their hooks, in the run that has nothing left to wait for);
    those of received tensors are returned."""
    leaves = [leaf for leaf in _leaves(region, seeds) if id(leaf) not in blocked.leaves]
    inputs: list[Any] = [*edges, *leaves]
    grads = torch.autograd.grad(
        [target for target, _ in seeds],
        inputs,
        [grad for _, grad in seeds],
        retain_graph=True,
        allow_unused=True,
    )
    received: list[tuple[Any, Any]] = []
    for target, grad in zip(inputs, grads, strict=True):
        if grad is None:
            continue
        if isinstance(target, torch.Tensor) and context.is_received(target):
            received.append((target, grad))
        else:
            state.hold(target, grad)
    return received


def _declare_dead(context: Messages, state: PassState, blocked: Blocked, step: Step) -> None:
    """Received messages that no gradient reached, and that nothing still pending here reaches:
    their senders wait for nothing."""
    for message_id, (sender, tensors) in context._recv_messages().items():
        if message_id in state.given or message_id in state.declared:
            continue
        if any(id(tensor) in blocked.leaves for tensor in tensors):
            continue
        state.declared.add(message_id)
        step.dead.setdefault(sender, []).append(message_id)
