"""The backward pass across workers (torch's FAST mode).

On each worker the local engine runs once from the tensors whose gradients arrived (the roots,
or the tensors this worker sent in a message whose receiver sends their gradients back) down to
the leaves they reach.  Gradients of leaves that came from another worker go back to it by RPC
(``_propagate``: one call per worker, carrying the gradients of every message it sent, all calls
at once), the others accumulate in the context.  The receiver runs its engine once over all the
messages of a call, so a node that several of them reach runs once, with the sum of their
gradients, as torch's engine runs it.  A pass is done when its engine run and all the
propagations it started are done, so the caller's ``backward`` returns once every worker the
forward pass touched has finished.

The engine runs as ``torch.autograd.backward`` into the leaves' ``.grad`` (borrowed, see
``_grad_field``), not as ``torch.autograd.grad``: only then does torch run the leaves' hooks, which
DDP's gradient reducer and users' tensor hooks rely on.

``_propagate`` is an async-execution function: a worker waiting for the gradients it sent on
pins no thread, so a chain A -> B -> C -> A needs none per hop.  No lock is held while
gradients travel.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from thenable import _recorder
from thenable._errors import as_runtime_error
from thenable._future import Future
from thenable.autograd import _contexts, _grad_field
from thenable.autograd._torch import torch
from thenable.rpc import _agent
from thenable.rpc._rref import backward_root
from thenable.rpc.functions import async_execution

if TYPE_CHECKING:
    from thenable.autograd._contexts import DistAutogradContext
    from thenable.rpc._agent import Agent

__all__ = ("BackwardError", "check_roots", "local_pass", "rref_backward", "run_backward")


class BackwardError(RuntimeError):
    """An error raised by the backward pass on one worker ("Error on Node N: ...", as torch
    says); the original is its ``__cause__`` where it could travel."""


def check_roots(roots: object) -> list[Any]:
    """The roots as a list, or torch's errors for bad ones."""
    if not isinstance(roots, (list, tuple)):
        raise TypeError(
            "incompatible function arguments: roots must be a list of scalar tensors, got "
            f"{type(roots).__qualname__}"
        )
    if not roots:
        raise RuntimeError("No tensors provided for gradient computation: roots is empty")
    for index, root in enumerate(roots):
        if not isinstance(root, torch.Tensor):
            raise TypeError(f"root {index} is a {type(root).__qualname__}, not a tensor")
        if not root.requires_grad:
            raise RuntimeError(f"requires_grad not set on root {index}")
        if root.numel() != 1:
            raise RuntimeError(
                f"root {index} of size {tuple(root.shape)} is not a scalar, all roots need to "
                "be scalar (reduce it first, e.g. loss.sum())"
            )
        if root.grad_fn is None:
            raise RuntimeError(
                f"root {index} does not have a valid gradient function: it is a leaf, so the "
                "backward pass would compute nothing"
            )
    return list(roots)


def run_backward(agent: Agent, context: DistAutogradContext, roots: list[Any]) -> None:
    """``dist_autograd.backward``: the pass from checked ``roots``, blocking until done."""
    _wait(local_pass(agent, context, [(root, torch.ones_like(root)) for root in roots]))


def _wait(done: Future[None]) -> None:
    """Wait; an error another worker's backward raised in its own type is also a
    RuntimeError (raised outside the ``except``: the remote traceback stays its cause)."""
    try:
        done.wait()
    except Exception as exc:
        error = exc
    else:
        return
    try:
        raise as_runtime_error(error)
    finally:
        del error  # its traceback holds this frame: no cycle through it


def local_pass(
    agent: Agent, context: DistAutogradContext, seeds: list[tuple[Any, Any]]
) -> Future[None]:
    """Run this worker's part of the pass from ``(tensor, gradient)`` pairs; the Future is done
    when the gradients reached every leaf, here and on the workers they came from.  Counted in
    the debug info's ``num_current_backward_passes`` until then."""
    passes, context_id = _contexts.table(agent), context._id
    passes.pass_started(context_id)
    try:
        done = _run_pass(agent, context, seeds)
    except BaseException:
        passes.pass_ended(context_id)
        raise
    done.add_done_callback(lambda _: passes.pass_ended(context_id))
    return done


def _run_pass(
    agent: Agent, context: DistAutogradContext, seeds: list[tuple[Any, Any]]
) -> Future[None]:
    outputs = [tensor for tensor, grad in seeds if grad is not None]
    output_grads = [grad for _, grad in seeds if grad is not None]
    leaf_grads: list[tuple[Any, Any]] = []
    leaves = _reachable_leaves(outputs)
    if leaves:
        start = _recorder.now() if _recorder.recording else 0
        with _grad_field.borrowed(leaves, [None] * len(leaves)):
            try:
                torch.autograd.backward(outputs, output_grads, retain_graph=True, inputs=leaves)
            except Exception as exc:
                raise BackwardError(f"Error on Node {agent.rank}: {exc}") from exc
            leaf_grads = [(leaf, leaf.grad) for leaf in leaves]
        if start:
            args = {"context_id": context._id, "leaves": len(leaves)}
            _recorder.complete("dist_autograd backward", "autograd", start, args)
    outgoing = context.route(leaf_grads)
    if not outgoing:
        done: Future[None] = Future()
        done.set_result(None)
        return done
    by_sender: dict[int, dict[int, list[Any]]] = {}
    for message_id, (sender, grads) in outgoing.items():
        by_sender.setdefault(sender, {})[message_id] = grads
    previous = _contexts.set_current_id(None)  # gradients need no context of their own
    try:
        calls = [
            agent.call(sender, _propagate, (context._id, grads), {}, agent.rpc_timeout)
            for sender, grads in by_sender.items()
        ]
    finally:
        _contexts.set_current_id(previous)
    return _all_done(calls)


def _reachable_leaves(outputs: list[Any]) -> list[Any]:
    """The leaf tensors (``AccumulateGrad`` nodes) that ``outputs``' graphs reach, and the
    outputs that are leaves themselves (sent as they are)."""
    leaves: dict[int, Any] = {id(t): t for t in outputs if t.grad_fn is None}
    seen: set[int] = set()
    stack = [t.grad_fn for t in outputs]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.setdefault(id(variable), variable)
            continue
        stack.extend(child for child, _ in node.next_functions)
    return list(leaves.values())


def _all_done(calls: list[Future[Any]]) -> Future[None]:
    """Done when every call is, or failed as soon as one fails (with its error)."""
    done: Future[None] = Future()
    lock = threading.Lock()
    remaining = [len(calls)]  # 0 once done is (being) completed

    def one_done(call: Future[Any]) -> None:
        error = call._exception
        with lock:
            if not remaining[0]:
                return
            remaining[0] = 0 if error is not None else remaining[0] - 1
            if remaining[0]:
                return
        # Completed outside the lock: done's callbacks may run long.
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    for call in calls:
        call.add_done_callback(one_done)
    return done


@async_execution
def _propagate(context_id: int, grads_by_message: dict[int, list[Any]]) -> Future[None]:
    """On the worker that sent these messages: continue the pass from their tensors, in one
    engine run (a tensor sent in two messages, or two tensors sharing a node, run it once)."""
    agent = _agent.require_agent()
    context = _contexts.table(agent).retrieve(context_id)
    seeds: list[tuple[Any, Any]] = []
    for message_id, grads in grads_by_message.items():
        seeds.extend(zip(context.sent_tensors(message_id), grads, strict=True))
    return local_pass(agent, context, seeds)


def rref_backward(agent: Agent, rref: Any, context_id: int, retain_graph: bool) -> None:
    """``RRef.backward(context_id)``: the pass from the RRef's value, started on its owner."""
    del retain_graph  # the graph is kept until the context ends (see ``backward``)
    if rref.is_owner():
        _wait(_backward_here(agent, context_id, rref._owner_value(-1.0)))
        return
    previous = _contexts.set_current_id(None)
    try:
        done = agent.call(
            rref._owner, _backward_on_owner, (rref, context_id), {}, agent.rpc_timeout
        )
    finally:
        _contexts.set_current_id(previous)
    _wait(done)


def _backward_here(agent: Agent, context_id: int, root: Any) -> Future[None]:
    context = _contexts.table(agent).retrieve(context_id)
    (root,) = check_roots([backward_root(root)])
    return local_pass(agent, context, [(root, torch.ones_like(root))])


@async_execution
def _backward_on_owner(rref: Any, context_id: int) -> Future[None]:
    agent = _agent.require_agent()
    return _backward_here(agent, context_id, rref._owner_value(-1.0))
