"""What the workers of test_rpc_callee.py run: user code that fails on the callee (logged there
once, raised on the caller), proxies of a method the value lacks, ``remote()`` of an
``@async_execution`` function that returns no Future, ``RRef.backward`` of a value that is no
tensor.  ``check_*`` commands run on worker0 and return what they saw."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable
from typing import Any

import torch
from _harness import failure_of
from _remote_fns import WAIT_S, open_gate, wait_for_gate

import thenable.autograd as dist_autograd
from thenable import rpc
from thenable.rpc.functions import async_execution

EXPECTED = "Expected error from the callee"


def raise_value_error() -> None:
    raise ValueError(EXPECTED)


@async_execution
def async_fails() -> Any:
    return rpc.rpc_async("worker0", raise_value_error)


@async_execution
def async_returns_an_int() -> int:
    return 3


@async_execution
def async_returns_a_torch_future(value: int) -> Any:
    """torch's own futures are what torch programs return from @async_execution functions."""
    future: torch.futures.Future[int] = torch.futures.Future()
    future.set_result(value)
    return future


def check_async_torch_future() -> list[Any]:
    return [
        rpc.rpc_sync("worker1", async_returns_a_torch_future, args=(5,)),
        rpc.rpc_async("worker1", async_returns_a_torch_future, args=(6,)).wait(),
        rpc.remote("worker1", async_returns_a_torch_future, args=(7,)).to_here(),
        rpc.remote("worker0", async_returns_a_torch_future, args=(8,)).to_here(),
    ]


class Rendezvous:
    """Two methods that meet: ``wait`` returns once ``arrive`` has run (or after WAIT_S)."""

    def __init__(self) -> None:
        self._arrived = threading.Event()

    def wait(self) -> bool:
        return self._arrived.wait(WAIT_S)

    def arrive(self) -> None:
        self._arrived.set()


def gated_rendezvous(tag: str) -> Rendezvous:
    wait_for_gate(tag)
    return Rendezvous()


def check_proxy_calls_waiting_for_the_value_run_concurrently(owner: str) -> bool:
    """Two proxy calls reach the owner while the value is being made; the first waits for the
    second: they must not run one after the other in one thread."""
    tag = f"rendezvous-{owner}"
    rref = rpc.remote(owner, gated_rendezvous, args=(tag,))
    waiting = rref.rpc_async().wait()
    arriving = rref.rpc_async().arrive()
    rpc.rpc_sync(owner, open_gate, args=(tag,))
    arriving.wait(WAIT_S)
    return bool(waiting.wait(WAIT_S))


class Holder:
    """A value with one method and one callable attribute of the instance only."""

    def __init__(self) -> None:
        self.instance_fn = lambda: "instance"

    def method(self) -> str:
        return "method"


def _stderr_of(run: Any) -> str:
    """What this worker wrote to its stderr while ``run()`` ran (a handler thread raising
    meanwhile writes there: logging's last-resort handler writes to the current sys.stderr)."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        run()
    return buffer.getvalue()


def stderr_while_called(tag: str) -> str:
    """On worker1: its stderr while worker0 makes the failing call ``tag`` to it."""
    return _stderr_of(lambda: rpc.rpc_sync("worker0", _fail_on_peer, args=(tag,)))


def _fail_on_peer(tag: str) -> None:
    """On worker0: call worker1 so that user code fails there."""
    calls: dict[str, Callable[[], object]] = {
        "sync": lambda: rpc.rpc_async("worker1", raise_value_error).wait(WAIT_S),
        "async_execution": lambda: rpc.rpc_async("worker1", async_fails).wait(WAIT_S),
        "remote": lambda: rpc.remote("worker1", raise_value_error).to_here(WAIT_S),
    }
    try:
        calls[tag]()
    except ValueError:
        return
    raise AssertionError(f"{tag}: the call did not raise on the caller")


def check_missing_methods() -> dict[str, Any]:
    rref = rpc.remote("worker1", Holder)
    mine = rpc.RRef(Holder())
    out: dict[str, Any] = {}
    for name, owner in (("remote", rref), ("local", mine)):
        out[f"{name} sync"] = failure_of(lambda o=owner: o.rpc_sync().non_exist())
        out[f"{name} async"] = failure_of(lambda o=owner: o.rpc_async().non_exist().wait())
        out[f"{name} remote"] = failure_of(lambda o=owner: o.remote().non_exist())
        out[f"{name} method"] = owner.remote().method().to_here()
        out[f"{name} instance attribute"] = owner.remote().instance_fn().to_here()
    return out


def check_async_wrong_return_type() -> dict[str, Any]:
    return {
        "sync": failure_of(lambda: rpc.rpc_sync("worker1", async_returns_an_int)),
        "async": failure_of(lambda: rpc.rpc_async("worker1", async_returns_an_int).wait()),
        "remote": failure_of(lambda: rpc.remote("worker1", async_returns_an_int).to_here()),
        "remote to self": failure_of(lambda: rpc.remote("worker0", async_returns_an_int).to_here()),
    }


def _identity(x: Any) -> Any:
    return x


def check_backward_of_a_non_tensor() -> dict[str, Any]:
    out: dict[str, Any] = {"local": failure_of(lambda: rpc.RRef("foo").backward())}
    with dist_autograd.context() as cid:
        rref = rpc.remote("worker1", _identity, args=("foo",))
        out["owned elsewhere"] = failure_of(lambda: rref.backward(cid))
        out["owned here"] = failure_of(lambda: rpc.RRef("foo").backward(cid))
    rpc.RRef(torch.ones(2, requires_grad=True).sum()).backward()  # a tensor's works
    return out
