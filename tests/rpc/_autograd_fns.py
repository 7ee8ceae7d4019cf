"""What the workers of the distributed autograd, optimizer and RemoteModule tests run.

Commands named ``check_*`` run on worker0 and return what they saw: for gradients, pairs of
(distributed, local) gradients that the test compares, where "local" is plain
``torch.autograd`` on copies of the same leaves and the same computation in one process.
"""

from __future__ import annotations

import concurrent.futures
import copy
import threading
import time
from typing import Any

import _harness
import torch
from _harness import Failure, failure_of
from _remote_fns import WAIT_S, wait_for_gate
from torch import nn

import thenable.autograd as dist_autograd
from thenable import Future, rpc
from thenable.nn import RemoteModule
from thenable.optim import DistributedOptimizer
from thenable.rpc.functions import async_execution

Pairs = list[tuple[Any, Any]]


def _leaves(*shape: int, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=generator, requires_grad=True) for _ in range(count)]


def _local_grads(leaves: list[torch.Tensor], compute: Any) -> list[torch.Tensor]:
    """The gradients plain autograd gives for ``compute`` on copies of ``leaves``."""
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    roots = compute(*copies)
    torch.autograd.backward(roots)
    return [t.grad for t in copies]  # type: ignore[misc]


def _compare(cid: int, leaves: list[torch.Tensor], expected: list[torch.Tensor]) -> Pairs:
    grads = dist_autograd.get_gradients(cid)
    return [(grads.get(t), e) for t, e in zip(leaves, expected, strict=True)]


# -- functions the forward passes call on other workers -----------------------------------------


def mul_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * b + a


def twice(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two outputs, one of them using ``a`` twice."""
    return a * a, (a + b).sin()


def forward_to(to: str, fn: Any, *args: Any) -> Any:
    """Compute a little here, then call ``fn`` on ``to`` (a nested RPC in the context)."""
    return rpc.rpc_sync(to, fn, args=tuple(a.exp() for a in args))


def hop(path: list[str], t: torch.Tensor) -> torch.Tensor:
    """Along ``path``, each worker multiplies by 1.5 and applies tanh."""
    t = (t * 1.5).tanh()
    if not path:
        return t
    return rpc.rpc_sync(path[0], hop, args=(path[1:], t))


@async_execution
def async_chain(to: str, t: torch.Tensor) -> Future[torch.Tensor]:
    """An @async_execution function: forwards ``t * 2`` to ``to`` and replies from the Future."""
    return rpc.rpc_async(to, mul_add, args=(t * 2, t)).then(lambda fut: fut.wait().cos())


class Scale(nn.Module):
    """A module with a parameter, for RRef-based models."""

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.rand(size, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).relu() + self.weight


def scale_grad(module: rpc.RRef[Scale], cid: int) -> torch.Tensor | None:
    """On the owner: the context's gradient of the module's weight."""
    return dist_autograd.get_gradients(cid).get(module.local_value().weight)


def scale_weight(module: rpc.RRef[Scale]) -> torch.Tensor:
    return module.local_value().weight.detach().clone()


def contexts_here() -> int:
    return int(dist_autograd._get_debug_info()["num_autograd_contexts"])


def contexts_on(path: list[str]) -> list[int]:
    """The context counts of this worker and of ``path`` (each asked by the previous one, so
    every release a worker passed on has arrived before it is asked)."""
    here = contexts_here()
    if not path:
        return [here]
    return [here, *rpc.rpc_sync(path[0], contexts_on, args=(path[1:],))]


def context_ids_here() -> dict[str, Any]:
    """On the callee, inside the caller's context."""
    context = dist_autograd._current_context()
    return {"id": context._context_id(), "known": sorted(context._known_worker_ids())}


# -- gradients equal local autograd -------------------------------------------------------------


def check_simple_rpc() -> Pairs:
    """torch.add and a user function on another worker, both leaves on this one."""
    a, b = _leaves(3, 3, count=2, seed=1)
    with dist_autograd.context() as cid:
        s = rpc.rpc_sync("worker1", torch.add, args=(a, b))
        m = rpc.rpc_sync("worker2", mul_add, args=(s, b))
        dist_autograd.backward(cid, [m.sum()])
        return _compare(cid, [a, b], _local_grads([a, b], lambda a, b: (mul_add(a + b, b).sum(),)))


def check_used_twice() -> Pairs:
    """A tensor sent twice in one message, in two messages, and used twice by the callee."""
    a, b = _leaves(4, count=2, seed=2)
    with dist_autograd.context() as cid:
        x, y = rpc.rpc_sync("worker1", twice, args=(a, b))
        z = rpc.rpc_sync("worker1", mul_add, args=(a, a))
        w = rpc.rpc_sync("worker2", mul_add, args=(x, a))
        loss = (x * y).sum() + z.sum() + w.sum() + (a * b).sum()
        dist_autograd.backward(cid, [loss])

        def local(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor]:
            x, y = twice(a, b)
            return ((x * y).sum() + mul_add(a, a).sum() + mul_add(x, a).sum() + (a * b).sum(),)

        return _compare(cid, [a, b], _local_grads([a, b], local))


def check_cycle_back_to_caller() -> Pairs:
    """worker0 -> worker1 -> worker2 -> worker0 -> worker1: the pass crosses each worker more
    than once, worker0 included while it waits in ``backward``."""
    (a,) = _leaves(5, count=1, seed=3)
    with dist_autograd.context() as cid:
        out = rpc.rpc_sync("worker1", hop, args=(["worker2", "worker0", "worker1"], a))
        dist_autograd.backward(cid, [out.sum()])

        def local(a: torch.Tensor) -> tuple[torch.Tensor]:
            for _ in range(4):
                a = (a * 1.5).tanh()
            return (a.sum(),)

        return _compare(cid, [a], _local_grads([a], local))


def check_nested_calls() -> Pairs:
    """The callee's own calls (worker1 -> worker2) are in the same context."""
    a, b = _leaves(3, count=2, seed=4)
    with dist_autograd.context() as cid:
        out = rpc.rpc_sync("worker1", forward_to, args=("worker2", mul_add, a, b))
        dist_autograd.backward(cid, [out.sum()])
        return _compare(
            cid, [a, b], _local_grads([a, b], lambda a, b: (mul_add(a.exp(), b.exp()).sum(),))
        )


def check_several_roots() -> Pairs:
    a, b = _leaves(3, count=2, seed=5)
    with dist_autograd.context() as cid:
        x = rpc.rpc_sync("worker1", mul_add, args=(a, b))
        y = rpc.rpc_sync("worker2", torch.mul, args=(x, b))
        dist_autograd.backward(cid, [x.sum(), y.mean(), (a * 3).sum()])

        def local(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
            x = mul_add(a, b)
            return (x.sum(), (x * b).mean(), (a * 3).sum())

        return _compare(cid, [a, b], _local_grads([a, b], local))


def check_async_execution() -> Pairs:
    """Through an @async_execution function on worker1 that calls worker2."""
    (a,) = _leaves(4, count=1, seed=6)
    with dist_autograd.context() as cid:
        out: Any = rpc.rpc_sync("worker1", async_chain, args=("worker2", a))
        out_async = rpc.rpc_async("worker2", async_chain, args=("worker1", a)).wait()
        dist_autograd.backward(cid, [(out * out_async).sum()])
        return _compare(
            cid, [a], _local_grads([a], lambda a: ((mul_add(a * 2, a).cos() ** 2).sum(),))
        )


def check_rref_model() -> dict[str, Any]:
    """A model behind ``remote()`` on worker1, called through ``rref.rpc_sync()``, with a
    ``remote()`` whose arguments require grad and a ``to_here()`` in the graph; its weight's
    gradient is in worker1's context."""
    (x,) = _leaves(6, count=1, seed=7)
    model = rpc.remote("worker1", Scale, args=(6, 8))
    weight = rpc.rpc_sync("worker1", scale_weight, args=(model,)).requires_grad_()
    with dist_autograd.context() as cid:
        y = model.rpc_sync().forward(x)
        z = rpc.remote("worker2", mul_add, args=(y, x)).to_here()
        dist_autograd.backward(cid, [z.sum()])
        remote_grad = rpc.rpc_sync("worker1", scale_grad, args=(model, cid))

        def local(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
            return (mul_add((x * w).relu() + w, x).sum(),)

        expected_x, expected_w = _local_grads([x, weight], local)
        return {
            "x": (dist_autograd.get_gradients(cid).get(x), expected_x),
            "weight": (remote_grad, expected_w),
        }


def check_rref_backward() -> dict[str, Any]:
    """``rref.backward(cid)`` from a user and from the owner; ``rref.backward()`` without a
    context on the owner (local autograd into ``.grad``)."""
    (a,) = _leaves(3, count=1, seed=9)
    out: dict[str, Any] = {}
    with dist_autograd.context() as cid:
        loss = rpc.remote("worker1", _sum_of_mul_add, args=(a, a))
        loss.backward(cid)
        out["user"] = _compare(cid, [a], _local_grads([a], lambda a: (mul_add(a, a).sum(),)))
    with dist_autograd.context() as cid:
        loss = rpc.RRef(mul_add(a, a).sum())
        loss.backward(cid)
        out["owner"] = _compare(cid, [a], _local_grads([a], lambda a: (mul_add(a, a).sum(),)))
    a.grad = None
    rpc.RRef(mul_add(a, a).sum()).backward()
    out["local"] = (a.grad, _local_grads([a], lambda a: (mul_add(a, a).sum(),))[0])
    out["not_owner"] = failure_of(rpc.remote("worker1", _sum_of_mul_add, args=(a, a)).backward)
    a.grad = None
    return out


def _sum_of_mul_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return mul_add(a, b).sum()


def check_backward_twice_adds_up() -> dict[str, Any]:
    """Two passes in one context add up, with or without ``retain_graph`` (torch refuses the
    second without it: a documented difference); ``.grad`` is never touched."""
    a, b = _leaves(3, count=2, seed=10)
    with dist_autograd.context() as cid:
        x = rpc.rpc_sync("worker1", mul_add, args=(a, b))
        dist_autograd.backward(cid, [x.sum()], retain_graph=True)
        once = dict(dist_autograd.get_gradients(cid))
        dist_autograd.backward(cid, [x.sum()])
        dist_autograd.backward(cid, [x.sum()])
        thrice = dist_autograd.get_gradients(cid)
        expected = _local_grads([a, b], lambda a, b: (mul_add(a, b).sum(),))
        return {
            "once": [(once[a], expected[0]), (once[b], expected[1])],
            "thrice": [(thrice[a], 3 * expected[0]), (thrice[b], 3 * expected[1])],
            "first_unchanged": once[a] is not thrice[a],
            "dot_grad": (a.grad, b.grad),
        }


def check_unreached_and_no_grad() -> dict[str, Any]:
    """Leaves the pass does not reach get no entry; tensors without grad record nothing."""
    a, b = _leaves(3, count=2, seed=11)
    plain = torch.ones(3)
    with dist_autograd.context() as cid:
        x = rpc.rpc_sync("worker1", torch.add, args=(a, plain))
        y = rpc.rpc_sync("worker1", torch.add, args=(plain, plain))
        kept = rpc.rpc_sync("worker1", torch.mul, args=(b, plain))
        dist_autograd.backward(cid, [x.sum()])
        grads = dist_autograd.get_gradients(cid)
        context = dist_autograd._current_context()
        return {
            "keys_are_a": list(grads) == [a],
            "y_requires_grad": y.requires_grad,
            "kept_requires_grad": kept.requires_grad,
            "sends": len(context._send_functions()),
            "recvs": len(context._recv_functions()),
        }


# -- contexts -----------------------------------------------------------------------------------


def check_context_ids_and_propagation() -> dict[str, Any]:
    ids = []
    for _ in range(3):
        with dist_autograd.context() as cid:
            ids.append(cid)
            callee = rpc.rpc_sync("worker1", context_ids_here)
            nested = rpc.rpc_sync("worker1", forward_to_ids, args=("worker2",))
            known = sorted(dist_autograd._current_context()._known_worker_ids())
    after = [failure_of(dist_autograd._retrieve_context, cid) for cid in ids]
    return {
        "ids": ids,
        "callee": callee,
        "nested": nested,
        "known": known,
        "after": after,
        "no_current": failure_of(dist_autograd._current_context),
        "valid_after": dist_autograd._is_valid_context(ids[-1]),
    }


def forward_to_ids(to: str) -> dict[str, Any]:
    return rpc.rpc_sync(to, context_ids_here)


def check_contexts_released_everywhere(iterations: int) -> dict[str, Any]:
    """Many steps over worker0 -> worker1 -> worker2 -> worker3 (worker3 is reached only by
    worker2): afterwards no worker keeps a context."""
    (a,) = _leaves(4, count=1, seed=12)
    during: list[int] = []
    for _ in range(iterations):
        with dist_autograd.context() as cid:
            out = rpc.rpc_sync("worker1", hop, args=(["worker2", "worker3"], a))
            dist_autograd.backward(cid, [out.sum()])
            if not during:
                during = contexts_on(["worker1", "worker2", "worker3"])
    return {
        "during": during,
        "after": contexts_on(["worker1", "worker2", "worker3"]),
        "late_reply_context": _late_reply(),
    }


def _late_reply() -> list[int]:
    """A reply that arrives after its context ended makes no context here."""
    (a,) = _leaves(2, count=1, seed=13)
    with dist_autograd.context():
        pending = rpc.rpc_async("worker1", slow_mul_add, args=(a, a))
    pending.wait()
    return contexts_on(["worker1"])


def slow_mul_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    time.sleep(0.05)  # only makes the reply late; the test does not depend on how late
    return mul_add(a, b)


# -- errors -------------------------------------------------------------------------------------


class FailingBackward(torch.autograd.Function):
    """Identity forward; backward raises."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise ValueError("Simulated error in a backward function")


class BlockingBackward(torch.autograd.Function):
    """Identity forward; backward tells the parent it runs, then waits (for ever)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _harness.signal("in-backward")
        wait_for_gate("never-opened", timeout=WAIT_S)
        return grad


def failing(x: torch.Tensor) -> torch.Tensor:
    return FailingBackward.apply(x) * 2  # type: ignore[no-untyped-call, no-any-return]


def blocking(x: torch.Tensor) -> torch.Tensor:
    return BlockingBackward.apply(x) * 2  # type: ignore[no-untyped-call, no-any-return]


def check_errors() -> dict[str, Failure]:
    (a,) = _leaves(3, count=1, seed=14)
    out: dict[str, Failure] = {}
    with dist_autograd.context() as cid:
        x = rpc.rpc_sync("worker1", mul_add, args=(a, a))
        out["unknown_id"] = failure_of(dist_autograd.backward, cid + 1000, [x.sum()])
        out["gradients_unknown_id"] = failure_of(dist_autograd.get_gradients, 12345)
        out["roots_none"] = failure_of(dist_autograd.backward, cid, None)
        out["id_none"] = failure_of(dist_autograd.backward, None, [x.sum()])
        out["roots_empty"] = failure_of(dist_autograd.backward, cid, [])
        out["no_requires_grad"] = failure_of(dist_autograd.backward, cid, [torch.ones(())])
        out["not_scalar"] = failure_of(dist_autograd.backward, cid, [x])
        out["leaf_root"] = failure_of(dist_autograd.backward, cid, [torch.ones(1).requires_grad_()])
        out["nested"] = failure_of(dist_autograd.context().__enter__)
        remote_failure = rpc.rpc_sync("worker1", failing, args=(a,))
        out["remote_backward"] = failure_of(dist_autograd.backward, cid, [remote_failure.sum()])
        local_failure = failing(a)
        out["local_backward"] = failure_of(dist_autograd.backward, cid, [local_failure.sum()])
        # The context still works after the failures.
        dist_autograd.backward(cid, [x.sum()])
    out["released"] = failure_of(dist_autograd.get_gradients, cid)
    return out


def backward_through_blocking_worker() -> tuple[Failure, float]:
    """backward waits on worker1, which the test kills meanwhile: (the error, seconds)."""
    (a,) = _leaves(3, count=1, seed=15)
    with dist_autograd.context() as cid:
        x = rpc.rpc_sync("worker1", blocking, args=(a,))
        start = time.monotonic()
        failure = failure_of(dist_autograd.backward, cid, [x.sum()])
        return failure, time.monotonic() - start


def context_before_init() -> dict[str, Failure]:
    return {
        "context": failure_of(dist_autograd.context().__enter__),
        "gradients": failure_of(dist_autograd.get_gradients, 1),
    }


# -- DistributedOptimizer -----------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.hidden = nn.Linear(6, 5)
        self.unused = nn.Linear(2, 2)  # the pass never reaches it: the step leaves it alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hidden(x))


def net_weights(net: rpc.RRef[Net]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.local_value().parameters()]


def net_dot_grads(net: rpc.RRef[Net]) -> list[Any]:
    return [p.grad for p in net.local_value().parameters()]


def net_forward(net: rpc.RRef[Net], x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = net.local_value()(x)
    return out


def net_param_rrefs(net: rpc.RRef[Net]) -> list[rpc.RRef[Any]]:
    return [rpc.RRef(p) for p in net.local_value().parameters()]


def check_optimizer(name: str, steps: int) -> dict[str, Any]:
    """A model split over worker1 (Net), worker2 (Net) and worker0 (a head), trained with a
    DistributedOptimizer, against the same model and optimizer in one process."""
    optim_class, kwargs = {
        "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        "Adam": (torch.optim.Adam, {"lr": 0.01}),
    }[name]
    nets = [rpc.remote(f"worker{r}", Net) for r in (1, 2)]
    torch.manual_seed(22)
    head = nn.Linear(5, 1)
    local_nets = [Net(), Net()]
    local_head = copy.deepcopy(head)
    rrefs = [r for net in nets for r in rpc.rpc_sync(net.owner(), net_param_rrefs, args=(net,))]
    rrefs += [rpc.RRef(p) for p in head.parameters()]
    optimizer = DistributedOptimizer(optim_class, rrefs, **kwargs)
    local_params = [p for m in (*local_nets, local_head) for p in m.parameters()]
    local_optimizer = optim_class(local_params, **kwargs)
    generator = torch.Generator().manual_seed(23)
    for _ in range(steps):
        x = torch.rand(4, 6, generator=generator)
        with dist_autograd.context() as cid:
            h1 = rpc.rpc_sync("worker1", net_forward, args=(nets[0], x))
            h2 = rpc.rpc_async("worker2", net_forward, args=(nets[1], x)).wait()
            loss = head(h1 * h2).pow(2).mean()
            dist_autograd.backward(cid, [loss])
            optimizer.step(cid)
        local_optimizer.zero_grad()
        local_head(local_nets[0](x) * local_nets[1](x)).pow(2).mean().backward()
        local_optimizer.step()
    remote = [rpc.rpc_sync(net.owner(), net_weights, args=(net,)) for net in nets]
    return {
        "remote": [
            (got, want.detach())
            for weights, net in zip(remote, local_nets, strict=True)
            for got, want in zip(weights, net.parameters(), strict=True)
        ],
        "head": [
            (p.detach(), q.detach())
            for p, q in zip(head.parameters(), local_head.parameters(), strict=True)
        ],
        "dot_grads": [rpc.rpc_sync(net.owner(), net_dot_grads, args=(net,)) for net in nets],
        "not_rrefs": failure_of(DistributedOptimizer, torch.optim.SGD, list(head.parameters())),
        "bad_kwargs": failure_of(DistributedOptimizer, torch.optim.SGD, rrefs, bogus=1),
    }


# -- RemoteModule -------------------------------------------------------------------------------


def remote_module_forward(module: RemoteModule, x: torch.Tensor) -> torch.Tensor:
    """On another worker: a RemoteModule that came in an RPC call works there too."""
    return module(x)  # type: ignore[no-any-return]


def check_remote_module() -> dict[str, Any]:
    torch.manual_seed(31)
    module = RemoteModule("worker1/cpu", nn.Linear, args=(4, 3), kwargs={"bias": True})
    by_rank = RemoteModule("rank:2/cpu", nn.Linear, args=(3, 2))
    local = nn.Linear(4, 3)
    local_second = nn.Linear(3, 2)
    with torch.no_grad():
        for target, source in ((local, module), (local_second, by_rank)):
            for p, r in zip(target.parameters(), source.remote_parameters(), strict=True):
                p.copy_(r.to_here())
    optimizer = DistributedOptimizer(
        torch.optim.SGD, module.remote_parameters() + by_rank.remote_parameters(), lr=0.5
    )
    local_optimizer = torch.optim.SGD([*local.parameters(), *local_second.parameters()], lr=0.5)
    x = torch.rand(5, 4)
    for _ in range(3):
        with dist_autograd.context() as cid:
            loss = by_rank.forward_async(module(x)).wait().pow(2).sum()
            dist_autograd.backward(cid, [loss])
            optimizer.step(cid)
        local_optimizer.zero_grad()
        local_second(local(x)).pow(2).sum().backward()
        local_optimizer.step()
    trained = [
        (r.to_here(), p.detach())
        for source, target in ((module, local), (by_rank, local_second))
        for r, p in zip(source.remote_parameters(), target.parameters(), strict=True)
    ]
    unsupported = {}
    for name, args in (("to", ("cpu",)), ("cuda", ()), ("state_dict", ()), ("zero_grad", ())):
        unsupported[name] = failure_of(getattr(module, name), *args)
    return {
        "trained": trained,
        "forward_elsewhere": (
            rpc.rpc_sync("worker3", remote_module_forward, args=(module, x)),
            local(x).detach(),
        ),
        "module_rref_owner": module.get_module_rref().owner_name(),
        "unsupported": unsupported,
        "parameters": failure_of(module.parameters),
        "pickle": failure_of(_pickle, module),
        "bad_device": failure_of(RemoteModule, "worker1/nonsense", nn.Linear, (1, 1)),
        "no_worker": failure_of(RemoteModule, "/cpu", nn.Linear, (1, 1)),
        "cuda": failure_of(RemoteModule, "worker1/cuda:0", nn.Linear, (1, 1))
        if not torch.cuda.is_available()
        else None,
        "not_a_module": failure_of(RemoteModule, "worker1/cpu", dict, ()),
        "shared": (
            # The calls go to the module's owner, whatever worker the device string names.
            RemoteModule.init_from_module_rref("worker2/cpu", module.get_module_rref())(x),
            local(x).detach(),
        ),
    }


def _pickle(module: Any) -> bytes:
    import pickle

    return pickle.dumps(module)


class SlowSGD(torch.optim.SGD):
    """SGD whose steps take long enough for two of them to overlap if nothing stops them."""

    def step(self, closure: Any = None) -> Any:
        time.sleep(0.2)  # widens the window for an overlap; the result must not depend on it
        return super().step(closure)


def make_shared_weight() -> rpc.RRef[torch.Tensor]:
    return rpc.RRef(torch.zeros(1, requires_grad=True))


def times_weight(weight: rpc.RRef[torch.Tensor], factor: float) -> torch.Tensor:
    return weight.local_value() * factor


def shared_weight_state(weight: rpc.RRef[torch.Tensor]) -> tuple[float, Any]:
    tensor = weight.local_value()
    return float(tensor.detach()), tensor.grad


def check_two_optimizers_share_a_parameter() -> tuple[float, Any]:
    """Two DistributedOptimizers over one parameter on worker1, stepped at once from two
    threads with gradients 1 and 100 (SGD, lr 1): the weight must end at -101."""
    import threading

    weight = rpc.rpc_sync("worker1", make_shared_weight)
    optimizers = [DistributedOptimizer(SlowSGD, [weight], lr=1.0) for _ in range(2)]
    errors: list[BaseException] = []

    def train(optimizer: DistributedOptimizer, factor: float) -> None:
        try:
            with dist_autograd.context() as cid:
                out = rpc.rpc_sync("worker1", times_weight, args=(weight, factor))
                dist_autograd.backward(cid, [out.sum()])
                optimizer.step(cid)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=train, args=(opt, f))
        for opt, f in zip(optimizers, (1.0, 100.0), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not errors, errors
    return rpc.rpc_sync("worker1", shared_weight_state, args=(weight,))


def sparse_mm(s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = torch.sparse.mm(s, d)
    return out


def check_sparse_and_shared_gradients() -> dict[str, Any]:
    """A sparse tensor requiring grad keeps it across RPC and gets its gradient; gradients
    the engine hands to two leaves (x + y) are separate tensors in the context."""
    indices = torch.tensor([[0, 1, 2], [2, 0, 1]])
    s = torch.sparse_coo_tensor(indices, torch.tensor([1.0, 2.0, 3.0]), (3, 3)).requires_grad_()
    (d,) = _leaves(3, 2, count=1, seed=40)
    x, y = _leaves(4, count=2, seed=41)
    with dist_autograd.context() as cid:
        out = rpc.rpc_sync("worker1", sparse_mm, args=(s, d))
        dist_autograd.backward(cid, [out.sum(), (x + y).sum()])
        grads = dist_autograd.get_gradients(cid)
        local_s = s.detach().clone().requires_grad_()
        local_d = d.detach().clone().requires_grad_()
        torch.sparse.mm(local_s, local_d).sum().backward()
        grads[x].add_(1.0)  # must not show in y's gradient
        return {
            "sparse": (grads[s].to_dense(), local_s.grad.to_dense()),  # type: ignore[union-attr]
            "dense": (grads[d], local_d.grad),
            "y_unchanged": (grads[y], torch.ones(4)),
        }


def _double(grad: torch.Tensor) -> torch.Tensor:
    return grad * 2


def check_leaf_hooks_run() -> dict[str, Any]:
    """Tensor hooks and ``AccumulateGrad`` hooks run in the distributed pass as in a local one
    (DDP's reducer relies on the latter), whether the leaf was sent as it is or used first;
    a ``.grad`` the user left stays as it was."""
    a, b = _leaves(3, count=2, seed=20)
    a.register_hook(_double)  # type: ignore[no-untyped-call]
    calls: list[str] = []
    c = b * 1.0
    b_accumulate: Any = c.grad_fn.next_functions[0][0]  # type: ignore[union-attr]

    def pre_hook(grads: Any) -> None:
        calls.append("pre")

    def post_hook(grads_in: Any, grads_out: Any) -> None:
        calls.append("post")

    b_accumulate.register_prehook(pre_hook)
    b_accumulate.register_hook(post_hook)
    b.grad = torch.full((3,), 7.0)
    with dist_autograd.context() as cid:
        x = rpc.rpc_sync("worker1", mul_add, args=(a, c))
        dist_autograd.backward(cid, [x.sum()])
        grads = dist_autograd.get_gradients(cid)
    a_local, b_local = (t.detach().clone().requires_grad_() for t in (a, b))
    a_local.register_hook(_double)  # type: ignore[no-untyped-call]
    torch.autograd.backward([mul_add(a_local, b_local * 1.0).sum()])
    return {
        "pairs": [(grads[a], a_local.grad), (grads[b], b_local.grad)],
        "calls": calls,
        "dot_grad": (a.grad, b.grad),
    }


def check_node_hooks_run_without_tensor_hooks() -> dict[str, Any]:
    """With no tensor hook on any leaf (the pass computes gradients outside the ``.grad`` lock),
    ``AccumulateGrad``'s pre- and post-hooks and post-accumulate-grad hooks still run, each
    once, seeing the gradient in ``.grad``; a ``.grad`` the user left stays as it was."""
    a, b = _leaves(3, count=2, seed=22)
    calls: list[Any] = []
    b_accumulate: Any = (b * 1.0).grad_fn.next_functions[0][0]  # type: ignore[union-attr]
    b_accumulate.register_prehook(lambda grads: calls.append("pre"))
    b_accumulate.register_hook(lambda grads_in, grads_out: calls.append("post"))
    b.register_post_accumulate_grad_hook(lambda leaf: calls.append(leaf.grad.clone()))  # type: ignore[no-untyped-call]
    a.grad = torch.full((3,), 5.0)
    with dist_autograd.context() as cid:
        x = rpc.rpc_sync("worker1", mul_add, args=(a, b))
        dist_autograd.backward(cid, [x.sum()])
        pairs = _compare(cid, [a, b], _local_grads([a, b], lambda a, b: [mul_add(a, b).sum()]))
    return {"pairs": pairs, "calls": calls, "dot_grad": (a.grad, b.grad)}


_SHARED_WEIGHT = torch.arange(4.0).requires_grad_()
_BOTH_PASSES = threading.Barrier(2, timeout=WAIT_S)


def _meet_other_pass(grad: torch.Tensor) -> torch.Tensor:
    """A backward hook that waits until another pass's backward is in it too."""
    _BOTH_PASSES.wait()
    return grad


def shared_weight_times(a: torch.Tensor) -> torch.Tensor:
    """``a`` times this worker's one shared weight, through a backward that meets another pass."""
    weight = _SHARED_WEIGHT * 1.0  # (the hook is on this copy: the weight itself has none)
    weight.register_hook(_meet_other_pass)  # type: ignore[no-untyped-call]
    return weight * a


def shared_weight_gradient(cid: int) -> tuple[torch.Tensor, Any]:
    """The shared weight's gradient in context ``cid`` here, and its ``.grad``."""
    return dist_autograd.get_gradients(cid)[_SHARED_WEIGHT], _SHARED_WEIGHT.grad


def check_passes_over_a_shared_weight_overlap() -> dict[str, Any]:
    """Two trainers' passes through one weight on worker1 are in its backward at once (each
    waits there for the other), and each context gets its own gradient."""

    def train(seed: int) -> tuple[Any, ...]:
        (a,) = _leaves(4, count=1, seed=seed)
        with dist_autograd.context() as cid:
            x = rpc.rpc_sync("worker1", shared_weight_times, (a,))
            dist_autograd.backward(cid, [x.sum()])
            weight_grad, dot_grad = rpc.rpc_sync("worker1", shared_weight_gradient, (cid,))
            a_grad = dist_autograd.get_gradients(cid)[a]
        return (weight_grad, a.detach()), (a_grad, torch.arange(4.0)), dot_grad

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(train, (31, 32)))
    pairs = [pair for run in runs for pair in run[:2]]
    return {"pairs": pairs, "dot_grads": [run[2] for run in runs]}


class _PassesSeen(torch.autograd.Function):
    """Identity whose backward notes this worker's running backward passes."""

    seen: list[int] = []  # noqa: RUF012 - one list per worker process, read by the test

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _PassesSeen.seen.append(int(dist_autograd._get_debug_info()["num_current_backward_passes"]))
        return grad


def passes_seen_mul_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return mul_add(_PassesSeen.apply(a), b)  # type: ignore[no-untyped-call]


def passes_seen_and_debug_info() -> tuple[list[int], dict[str, str]]:
    return list(_PassesSeen.seen), dist_autograd._get_debug_info()


def check_debug_info_and_max_id() -> dict[str, Any]:
    """torch's private counters: passes running on a worker during its part of a pass, none
    after; the largest id this worker can make."""
    a, b = _leaves(3, count=2, seed=21)
    with dist_autograd.context() as cid:
        x = rpc.rpc_sync("worker1", passes_seen_mul_add, args=(a, b))
        dist_autograd.backward(cid, [x.sum()])
        during, after = rpc.rpc_sync("worker1", passes_seen_and_debug_info)
        return {
            "during": during,
            "after_remote": after,
            "after_here": dist_autograd._get_debug_info(),
            "max_id": dist_autograd._get_max_id(),
            "cid": cid,
        }
