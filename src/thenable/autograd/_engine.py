"""The backward pass across workers (torch's FAST mode).

On each worker the local engine runs from the tensors whose gradients arrived (the roots, or the
tensors this worker sent in a message whose receiver sends their gradients back) down to the
leaves they reach (``_pass``: a node runs once, after every gradient for it has arrived).
Gradients of leaves that came from another worker go back to it by RPC (``_propagate``: one call
per worker, carrying the gradients of every message it sent, all calls at once), the others
accumulate in the context.  Each call is done when the part of the pass it caused is done, so the
caller's first wave is done once every worker the gradients reached has run what it could.

If a worker held gradients at the end of its part (a node waits for a message whose gradients
never came: the forward pass sent a tensor that the loss does not use), the caller starts a
*resolve* wave: ``_resolve`` passes every worker the context reached once, each declares the
received messages that will get no gradient (``_dead``), and what waited for them runs with what
did arrive.  torch's engine waits for those gradients forever.  Whether a worker holds is told as
of the end of each of its parts, so a wave that ends with "held" may be stale (another worker's
declaration released it later): a second wave, with nothing left in flight, tells for sure.
Gradients still held then wait in a cycle (see ``_pass``): a third wave forces the pass, and
the worker that started it logs a warning.

The engine runs as ``torch.autograd.backward`` into the leaves' ``.grad`` (borrowed, see
``_grad_field``), not as ``torch.autograd.grad``: only then does torch run the leaves' hooks, which
DDP's gradient reducer and users' tensor hooks rely on.

The gradient calls are async-execution functions: a worker waiting for the gradients it sent on
pins no thread, so a chain A -> B -> C -> A needs none per hop.  No lock is held while
gradients travel.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

from thenable import _future
from thenable._errors import as_runtime_error
from thenable._future import Future
from thenable.autograd import _contexts
from thenable.autograd._pass import BackwardError, Event, PassState, Seeds, Step, advance
from thenable.autograd._torch import torch
from thenable.rpc._handlers import pinned
from thenable.rpc._rref import backward_root
from thenable.rpc._worker import agent as _agent
from thenable.rpc.functions import async_execution

if TYPE_CHECKING:
    from thenable.autograd._contexts import DistAutogradContext
    from thenable.rpc._worker.agent import Agent

__all__ = ("BackwardError", "check_roots", "rref_backward", "run_backward")

_FORCED = 3  # the resolve wave that forces the pass (see the module docstring)
_LOGGER = logging.getLogger("thenable.autograd")


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
    _wait(_pass_from(agent, context, [(root, torch.ones_like(root)) for root in roots]))


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


def _pass_from(agent: Agent, context: DistAutogradContext, seeds: Seeds) -> Future[None]:
    """A new pass from ``seeds`` on this worker: the first wave, then a resolve wave if a
    worker still holds gradients after it."""
    pass_id = _contexts.table(agent).new_message_id()
    result: Future[None] = Future()

    def after(wave: Future[bool], number: int) -> None:
        error = _future.exception_of(wave)
        if error is not None:
            result.set_exception(error)
        elif not _future.result_of(wave):
            result.set_result(None)
        elif number == _FORCED:  # (forced, nothing waits: see _pass)
            result.set_exception(
                BackwardError(
                    f"Error on Node {agent.rank}: gradients of autograd context {context._id} "
                    "still wait for messages after the pass was forced"
                )
            )
        else:
            if number + 1 == _FORCED:
                _LOGGER.warning(
                    "the backward pass of autograd context %d waited in a cycle: nodes held "
                    "back for gradients that other workers could only send after them; they "
                    "run now with the gradients they have, and again for any that come later "
                    "(the gradients are right; backward functions reached that way may run "
                    "more than once)",
                    context._id,
                )
            _resolve_from(agent, context, pass_id, number + 1, None).add_done_callback(
                functools.partial(after, number=number + 1)
            )

    _event(agent, context, pass_id, seeds=seeds).add_done_callback(
        functools.partial(after, number=0)
    )
    return result


def _event(
    agent: Agent,
    context: DistAutogradContext,
    pass_id: int,
    **what: Any,
) -> Future[bool]:
    """Hand ``Event(**what)`` to this worker's part of pass ``pass_id``; the Future is done
    when it and what it caused are done (counted in the debug info's
    ``num_current_backward_passes`` until then)."""
    passes, context_id = _contexts.table(agent), context._id
    done: Future[bool] = Future()
    passes.pass_started(context_id)
    done.add_done_callback(lambda _: passes.pass_ended(context_id))
    state = context.backward_pass(pass_id)
    if state.enqueue(Event(done, **what)):
        _run_events(agent, context, pass_id, state)
    return done


def _run_events(agent: Agent, context: DistAutogradContext, pass_id: int, state: PassState) -> None:
    while (batch := state.take()) is not None:
        try:
            calls = _send(agent, context, pass_id, advance(agent.rank, context, state, batch))
        except Exception as exc:
            for event in batch:
                event.done.set_exception(exc)
            del exc
            continue
        _all_done(calls).add_done_callback(functools.partial(_batch_done, state=state, batch=batch))


def _batch_done(calls: Future[bool], state: PassState, batch: list[Event]) -> None:
    error = _future.exception_of(calls)
    holding = error is None and (bool(_future.result_of(calls)) or state.holding)
    for event in batch:
        if error is not None:
            event.done.set_exception(error)
        else:
            event.done.set_result(holding)


def _send(
    agent: Agent, context: DistAutogradContext, pass_id: int, step: Step
) -> list[Future[Any]]:
    """The calls that carry ``step``'s gradients and declarations to their workers."""
    previous = _contexts.set_current_id(None)  # gradients need no context of their own
    try:
        timeout, context_id = agent.rpc_timeout, context._id
        calls = [
            agent.call(sender, _propagate, (context_id, pass_id, grads), {}, timeout)
            for sender, grads in step.gradients.items()
        ]
        calls.extend(
            agent.call(sender, _dead, (context_id, pass_id, message_ids), {}, timeout)
            for sender, message_ids in step.dead.items()
        )
    finally:
        _contexts.set_current_id(previous)
    return calls


def _resolve_from(
    agent: Agent, context: DistAutogradContext, pass_id: int, wave: int, source: int | None
) -> Future[bool]:
    """Resolve wave ``wave`` of pass ``pass_id``, here and on every worker the context reached
    (but ``source``, which asked us), once each."""
    if not context.backward_pass(pass_id).start_resolving(wave):
        done: Future[bool] = Future()
        done.set_result(False)
        return done
    previous = _contexts.set_current_id(None)
    try:
        calls = [
            agent.call(
                rank, _resolve, (context._id, pass_id, wave, agent.rank), {}, agent.rpc_timeout
            )
            for rank in sorted(context._known_worker_ids() - {agent.rank, source})
        ]
    finally:
        _contexts.set_current_id(previous)
    calls.append(_event(agent, context, pass_id, resolving=True, forced=wave == _FORCED))
    return _all_done(calls)


def _all_done(calls: list[Future[Any]]) -> Future[bool]:
    """Done when every call is, with whether any said True; or failed as soon as one fails
    (with its error)."""
    done: Future[bool] = Future()
    lock = threading.Lock()
    remaining = [len(calls)]  # 0 once done is (being) completed
    said = [False]

    def one_done(call: Future[Any]) -> None:
        error = _future.exception_of(call)
        with lock:
            if not remaining[0]:
                return
            said[0] = said[0] or (error is None and bool(_future.result_of(call)))
            remaining[0] = 0 if error is not None else remaining[0] - 1
            if remaining[0]:
                return
        # Completed outside the lock: done's callbacks may run long.
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(said[0])

    if not calls:
        done.set_result(False)
    for call in calls:
        call.add_done_callback(one_done)
    return done


@pinned
@async_execution
def _propagate(
    context_id: int, pass_id: int, grads_by_message: dict[int, list[Any]]
) -> Future[bool]:
    """On the worker that sent these messages: their gradients, in one event (a tensor sent in
    two messages, or two tensors sharing a node, run it once)."""
    agent = _agent.require_agent()
    context = _contexts.table(agent).retrieve(context_id)
    seeds: Seeds = []
    for message_id, grads in grads_by_message.items():
        seeds.extend(zip(context.sent_tensors(message_id), grads, strict=True))
    return _event(agent, context, pass_id, seeds=seeds, arrived=list(grads_by_message))


@pinned
@async_execution
def _dead(context_id: int, pass_id: int, message_ids: list[int]) -> Future[bool]:
    """On the worker that sent these messages: no gradient will come for them."""
    agent = _agent.require_agent()
    context = _contexts.table(agent).retrieve(context_id)
    return _event(agent, context, pass_id, dead=message_ids)


@pinned
@async_execution
def _resolve(context_id: int, pass_id: int, wave: int, source: int) -> Future[bool]:
    """Resolve wave ``wave`` of pass ``pass_id`` reaches this worker (see the module
    docstring)."""
    agent = _agent.require_agent()
    context = _contexts.table(agent).get(context_id)
    if context is None:  # never reached here, or released: nothing waits here
        done: Future[bool] = Future()
        done.set_result(False)
        return done
    return _resolve_from(agent, context, pass_id, wave, source)


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
    return _pass_from(agent, context, [(root, torch.ones_like(root))])


@pinned
@async_execution
def _backward_on_owner(rref: Any, context_id: int) -> Future[None]:
    agent = _agent.require_agent()
    return _backward_here(agent, context_id, rref._owner_value(-1.0))
