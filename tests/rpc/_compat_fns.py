"""What the workers of test_rpc_torch_compat.py run: the failures torch programs catch as
``RuntimeError``, and the parts of torch's API beyond the public calls (``rpc.api``, the
default timeout).  ``check_*`` commands run on worker0 and return what they saw.
"""

from __future__ import annotations

import importlib
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
    }
