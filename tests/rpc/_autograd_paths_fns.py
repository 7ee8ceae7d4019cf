"""What the workers of test_dist_autograd_paths.py run: user code reached by every path a call
can take (``remote()`` to oneself, proxies on an owner, a proxy that waits for its value), and
backward functions that count their runs.

Commands named ``check_*`` run on worker0 and return what they saw.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from _remote_fns import WAIT_S, open_gate, wait_for_gate
from torch import nn

import thenable.autograd as dist_autograd
from thenable import rpc

# -- a backward function that records each run (on the worker that runs it) -------------------

_RUNS: list[torch.Tensor] = []
_RUNS_LOCK = threading.Lock()


class _Counted(torch.autograd.Function):
    """The identity, whose backward records the gradient it ran with."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        with _RUNS_LOCK:
            _RUNS.append(grad.detach().clone())
        return grad


def counted(x: torch.Tensor) -> torch.Tensor:
    return _Counted.apply(x)  # type: ignore[no-untyped-call,no-any-return]


def take_runs() -> list[torch.Tensor]:
    """The gradients the counted backward ran with here since the last call."""
    with _RUNS_LOCK:
        runs = list(_RUNS)
        _RUNS.clear()
    return runs


def _pass_runs(cid: int, x: torch.Tensor, roots: list[torch.Tensor]) -> dict[str, Any]:
    dist_autograd.backward(cid, roots)
    return {"grad": dist_autograd.get_gradients(cid).get(x), "runs": rpc.rpc_sync(1, take_runs)}


def check_tensor_in_two_messages_runs_its_node_once() -> dict[str, Any]:
    """One tensor of worker1 fetched twice (two replies): its node runs once, with the sum."""
    x = torch.ones(2, requires_grad=True)
    with dist_autograd.context() as cid:
        rref = rpc.remote("worker1", counted, args=(x,))
        a, b = rref.to_here(), rref.to_here()
        return _pass_runs(cid, x, [(2 * a + 3 * b).sum()])


def check_two_messages_sharing_a_node_run_it_once() -> dict[str, Any]:
    """Two results computed on worker1 from one tensor (two proxy calls): the shared node runs
    once."""
    x = torch.ones(2, requires_grad=True)
    with dist_autograd.context() as cid:
        rref = rpc.remote("worker1", counted, args=(x,))
        a = rref.rpc_sync().mul(2)
        b = rref.rpc_async().mul(3).wait()
        return _pass_runs(cid, x, [(a + b).sum()])


def scaled_copy(rref: rpc.RRef[torch.Tensor], factor: float) -> torch.Tensor:
    """On worker2: the RRef's value fetched from its owner (a message of its own), scaled."""
    return rref.to_here() * factor


def check_messages_from_two_workers_run_a_node_once() -> dict[str, Any]:
    """worker1's tensor reaches the loss through worker2 and directly: its gradients come back
    to worker1 from two workers, at different times; its node runs once, with their sum."""
    x = torch.ones(2, requires_grad=True)
    with dist_autograd.context() as cid:
        rref = rpc.remote("worker1", counted, args=(x,))
        through_worker2 = rpc.rpc_sync("worker2", scaled_copy, args=(rref, 2.0))
        return _pass_runs(cid, x, [(through_worker2 + 3 * rref.to_here()).sum()])


def check_unused_message_does_not_hold_a_shared_node_forever() -> dict[str, Any]:
    """worker1's tensor is fetched twice and the loss uses one copy: torch's engine waits for
    the other copy's gradient forever; ours runs the node once the pass has nothing else to
    wait for, with the gradient that came."""
    x = torch.ones(2, requires_grad=True)
    with dist_autograd.context() as cid:
        rref = rpc.remote("worker1", counted, args=(x,))
        used, _unused = rref.to_here(), rref.to_here()
        return _pass_runs(cid, x, [(3 * used).sum()])


def double(t: torch.Tensor) -> torch.Tensor:
    return t * 2


def round_trip(rref: rpc.RRef[torch.Tensor]) -> torch.Tensor:
    """On worker1: y (the RRef's value) goes to worker2 and comes back doubled; y * 2y goes to
    the caller.  In the backward pass y's node must wait for worker2's gradient, while the
    gradient of what came back from worker2 must go there first."""
    y = rref.local_value()
    return y * rpc.rpc_sync("worker2", double, args=(y,))


def check_a_node_waiting_for_a_message_lets_the_rest_run() -> dict[str, Any]:
    x = torch.ones(2, requires_grad=True)
    with dist_autograd.context() as cid:
        rref = rpc.remote("worker1", counted, args=(x,))
        out = rpc.rpc_sync("worker1", round_trip, args=(rref,))
        return _pass_runs(cid, x, [out.sum()])


def counted_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = counted(x)
    return y * 2, y * 3


def check_one_message_whose_tensors_return_at_different_times() -> dict[str, Any]:
    """worker1 replies (a, b) in one message; b's gradient is ready here at once, a's comes
    back from worker2 later: the message's gradients go back to worker1 once, together."""
    x = torch.ones(2, requires_grad=True)
    with dist_autograd.context() as cid:
        a, b = rpc.rpc_sync("worker1", counted_pair, args=(x,))
        doubled = rpc.rpc_sync("worker2", double, args=(a,))
        return _pass_runs(cid, x, [(b + doubled).sum()])


_WEIGHT = torch.full((2,), 0.5, requires_grad=True)  # worker1's own leaf


def weight_gradient(cid: int) -> torch.Tensor | None:
    return dist_autograd.get_gradients(cid).get(_WEIGHT)


def _use_weight_around_a_round_trip(x: torch.Tensor) -> torch.Tensor:
    """On worker1: y = w * x goes to worker2 and back; the result uses y and w again."""
    y = _WEIGHT * x
    back = rpc.rpc_sync("worker2", double, args=(y,))
    return y * back + _WEIGHT


def check_weight_used_around_a_round_trip() -> dict[str, Any]:
    """worker1's weight feeds what it sends to worker2 and what it sends back here: its node
    waits for worker2's gradient while worker2 waits for what that node would send it, a cycle
    torch's engine avoids and ours breaks by forcing the pass (the gradients stay right)."""
    x = torch.full((2,), 3.0, requires_grad=True)
    with dist_autograd.context() as cid:
        out = rpc.rpc_sync("worker1", _use_weight_around_a_round_trip, args=(x,))
        dist_autograd.backward(cid, [out.sum()])
        got = {
            "x": dist_autograd.get_gradients(cid).get(x),
            "w": rpc.rpc_sync("worker1", weight_gradient, args=(cid,)),
        }
    w, local_x = _WEIGHT.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y = w * local_x
    torch.autograd.backward((y * (y * 2) + w).sum())
    got["expected"] = {"x": local_x.grad, "w": w.grad}
    return got


# -- user code that makes calls of its own, reached by every path ------------------------------


def exp_on(to: str, a: torch.Tensor) -> torch.Tensor:
    """A nested call: the gradient of ``a`` comes back only through the caller's context."""
    return rpc.rpc_sync(to, torch.mul, args=(a.exp(), a))


class Forwarder(nn.Module):
    """A module whose forward makes a nested call to ``to``."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return exp_on(self.peer, a) * 2


def gated_forwarder(tag: str, to: str) -> Forwarder:
    """Made only once the gate ``tag`` opens: a proxy call arriving before waits for it."""
    wait_for_gate(tag)
    return Forwarder(to)


def _expected(a: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    copy = a.detach().clone().requires_grad_()
    torch.autograd.backward(((copy.exp() * copy) * factor).sum())
    assert copy.grad is not None
    return copy.grad


def _grad_of(cid: int, a: torch.Tensor, out: torch.Tensor) -> Any:
    dist_autograd.backward(cid, [out.sum()])
    return dist_autograd.get_gradients(cid).get(a)


def check_remote_to_self_keeps_the_context() -> dict[str, Any]:
    a = torch.rand(3, requires_grad=True)
    got: dict[str, Any] = {}
    with dist_autograd.context() as cid:
        out = rpc.remote("worker0", exp_on, args=("worker1", a)).to_here()
        got["remote to self"] = (_grad_of(cid, a, out), _expected(a))
    with dist_autograd.context() as cid:
        out = rpc.remote(0, exp_on, args=("worker1", a)).to_here(WAIT_S)
        got["remote to self by rank"] = (_grad_of(cid, a, out), _expected(a))
    module = rpc.RRef(Forwarder("worker1"))
    with dist_autograd.context() as cid:
        out = module.remote().forward(a).to_here()
        got["rref.remote() on the owner"] = (_grad_of(cid, a, out), _expected(a, 2))
    with dist_autograd.context() as cid:
        out = module.rpc_sync().forward(a)
        got["rref.rpc_sync() on the owner"] = (_grad_of(cid, a, out), _expected(a, 2))
    with dist_autograd.context() as cid:
        out = module.rpc_async().forward(a).wait()
        got["rref.rpc_async() on the owner"] = (_grad_of(cid, a, out), _expected(a, 2))
    return got


def check_proxy_waiting_for_its_value_keeps_the_context(owner: str) -> dict[str, Any]:
    """Proxy calls that reach ``owner`` while the value is still being made (a gate holds it).
    (``rref.remote()`` proxies wait for the value's type first, as torch's do.)"""
    a = torch.rand(3, requires_grad=True)
    tag = f"forwarder-{owner}"
    module = rpc.remote(owner, gated_forwarder, args=(tag, "worker2"))
    got: dict[str, Any] = {}
    with dist_autograd.context() as cid:
        first, second = module.rpc_async().forward(a), module.rpc_async().forward(a * 2)
        rpc.rpc_sync(owner, open_gate, args=(tag,))
        out = first.wait() + second.wait()
        got["waiting proxies"] = (_grad_of(cid, a, out), _expected(a, 2) + _expected(a * 2, 2) * 2)
    return got
