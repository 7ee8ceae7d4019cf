"""What the workers of test_rpc_torch_compat.py run: the failures torch programs catch as
``RuntimeError``, and the parts of torch's API beyond the public calls (``rpc.api``, the
default timeout).  ``check_*`` commands run on worker0 and return what they saw.
"""

from __future__ import annotations

import importlib
import itertools
import pickle
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from _harness import failure_of
from _remote_fns import WAIT_S, open_gate, raise_two_arg, wait_for_gate

import thenable
from thenable import rpc


def return_a_future() -> thenable.Future[int]:
    """Not @async_execution: its Future cannot be sent back."""
    future: thenable.Future[int] = thenable.Future()
    future.set_result(1)
    return future


@rpc.functions.async_execution
def async_returns_an_int() -> int:
    return 3


@rpc.functions.async_execution
def async_then_fails() -> thenable.Future[int]:
    """A then() callback on the callee raises ValueError (torch: a RuntimeError reaches the
    caller)."""
    future: thenable.Future[str] = thenable.Future()
    child = future.then(lambda f: int(f.value()))
    future.set_result("not a number")
    return child


def _module_only_here() -> Any:
    """A module that worker0 can import and the others cannot (it lives in a folder only
    worker0 has on its path)."""
    folder = tempfile.mkdtemp(prefix="thenable-compat-")
    (Path(folder) / "only_on_worker0.py").write_text("def double(x):\n    return 2 * x\n")
    sys.path.insert(0, folder)
    return importlib.import_module("only_on_worker0")


def check_failures_catchable_as_torch() -> dict[str, Any]:
    """Each failure of the issue's list, as the caller sees it."""
    rref = rpc.remote("worker1", len, args=([1, 2],))
    only_here = _module_only_here()
    out: dict[str, Any] = {
        "unpicklable-argument": failure_of(rpc.rpc_sync, "worker1", len, args=(threading.Lock(),)),
        "unpicklable-result": failure_of(rpc.rpc_sync, "worker1", threading.Lock),
        "future-result": failure_of(rpc.rpc_sync, "worker1", return_a_future),
        "async-no-future": failure_of(rpc.rpc_sync, "worker1", async_returns_an_int),
        "unknown-name": failure_of(rpc.rpc_sync, "worker9", len, args=((),)),
        "unknown-rank": failure_of(rpc.rpc_async, 9, len, args=((),)),
        "unknown-info": failure_of(rpc.get_worker_info, "nobody"),
        "pickle-rref": failure_of(pickle.dumps, rref),
        "callee-cannot-import": failure_of(rpc.rpc_sync, "worker1", only_here.double, args=(2,)),
        "not-recreatable": failure_of(rpc.rpc_sync, "worker1", raise_two_arg, args=("p", "q")),
        "timeout": failure_of(
            rpc.rpc_sync, "worker1", wait_for_gate, args=("compat-late",), timeout=0.2
        ),
        "then-on-callee": failure_of(rpc.rpc_sync, "worker1", async_then_fails),
    }
    rpc.rpc_sync("worker1", open_gate, args=("compat-late",))
    out["after"] = rpc.rpc_sync("worker1", len, args=([1],))
    return out


def check_default_timeout() -> dict[str, Any]:
    """``get_rpc_timeout`` / ``_set_rpc_timeout``: the default of calls made afterwards."""
    out: dict[str, Any] = {"initial": rpc.get_rpc_timeout()}
    rpc._set_rpc_timeout(0.2)
    out["set"] = rpc.get_rpc_timeout()
    out["short"] = failure_of(rpc.rpc_sync, "worker1", wait_for_gate, args=("default-1",))
    pending = rpc.rpc_async("worker1", wait_for_gate, args=("default-2", "late"))
    rpc._set_rpc_timeout(0)  # no limit, for calls made from now on
    unlimited = rpc.rpc_async("worker1", wait_for_gate, args=("default-3", "in time"))
    out["made-before"] = failure_of(pending.wait, WAIT_S)
    for tag in ("default-1", "default-2", "default-3"):
        rpc.rpc_sync("worker1", open_gate, args=(tag,))
    out["unlimited"] = unlimited.wait(WAIT_S)
    out["bad"] = [
        failure_of(rpc._set_rpc_timeout, -1),
        failure_of(rpc._set_rpc_timeout, "1"),
        failure_of(rpc._set_rpc_timeout, float("nan")),
    ]
    rpc._set_rpc_timeout(out["initial"])
    return out


def agent_view() -> dict[str, Any]:
    agent = rpc.api._get_current_rpc_agent()
    infos = agent.get_worker_infos()
    debug = agent.get_debug_info()
    return {
        "infos": [(info.name, info.id) for info in infos],
        "me": agent.get_worker_info(),
        "by-name": agent.get_worker_info("worker2"),
        "by-rank": agent.get_worker_info(1),
        "unknown": failure_of(agent.get_worker_info, "nobody"),
        "debug-keys": sorted(debug),
        "debug-strings": all(isinstance(v, str) for v in debug.values()),
        "set": rpc.api._is_current_rpc_agent_set(),
        "available": rpc.is_available(),
        "to-info": rpc.api._to_worker_info("worker1"),
    }


def gather(obj: Any, names: list[str] | None, rounds: int) -> list[dict[str, Any]]:
    """``rounds`` successive ``_all_gather`` calls of ``(obj, round)`` over ``names``."""
    return [rpc.api._all_gather((obj, i), names) for i in range(rounds)]


def barrier_then_wait_all() -> str:
    rpc.api._barrier(["worker0", "worker1", "worker2"])
    rpc.api._wait_all_workers(WAIT_S)
    return rpc.get_worker_info().name


def gather_misuse() -> dict[str, Any]:
    return {
        "not-in-names": failure_of(rpc.api._all_gather, 1, ["worker1", "worker2"]),
        "unknown-name": failure_of(rpc.api._all_gather, 1, ["worker0", "nobody"]),
        # worker2 joins this set's gather only after worker0's call timed out (the test then
        # has it join, so that the leader's pending gather ends).
        "timeout": failure_of(rpc.api._all_gather, 1, ["worker0", "worker2"], timeout=0.1),
    }


# -- received tensors own their memory -----------------------------------------------------------

_KEPT: list[tuple[Any, float]] = []  # (received tensor, the value it arrived with)

# Float counts: in the header (16 B), 4 KiB, shared memory or the socket (400 KB), and, over
# TCP, memory recycled from earlier payloads (40 MB).
TENSOR_SIZES = (4, 1024, 100_000, 10_000_000)


def keep_tensor(tensor: Any, value: float) -> Any:
    """Keep what arrived; reply with a tensor of its own."""
    import torch

    _KEPT.append((tensor, value))
    return torch.full_like(tensor, value + 0.5)


@rpc.functions.async_execution
def keep_tensor_async(tensor: Any, value: float) -> thenable.Future[Any]:
    future: thenable.Future[Any] = thenable.Future()
    future.set_result(keep_tensor(tensor, value))
    return future


def kept_tensors_report() -> dict[str, int]:
    """How many kept tensors changed since they arrived, and how many share memory."""
    changed = sum(1 for tensor, value in _KEPT if not bool((tensor == value).all()))
    spans = sorted((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t, _ in _KEPT)
    overlapping = sum(1 for (a, n), (b, _) in itertools.pairwise(spans) if b < a + n)
    report = {"kept": len(_KEPT), "changed": changed, "overlapping": overlapping}
    _KEPT.clear()
    return report


def check_received_tensors_own_their_memory() -> dict[str, Any]:
    """worker0 sends tensors of every size (to worker1, plain and @async_execution, and to
    itself) and writes each of its own at once after the call; the receivers keep them all,
    and worker0 keeps and writes the replies.  No kept tensor may change, or share memory."""
    import torch

    value = 0.0
    for _ in range(2):
        for size in TENSOR_SIZES:
            for to, fn in (("worker1", keep_tensor), ("worker1", keep_tensor_async)):
                for target in (to, "worker0"):
                    value += 1
                    sent = torch.full((size,), value)
                    reply = rpc.rpc_async(target, fn, args=(sent, value))
                    sent.add_(1000.0)  # the sender writes its tensor right away
                    received = reply.wait(WAIT_S)
                    _KEPT.append((received, value + 0.5))
                    torch.empty(size).fill_(-1.0)  # fresh memory, written, then freed
    return {
        "worker0": kept_tensors_report(),
        "worker1": rpc.rpc_sync("worker1", kept_tensors_report),
    }
