"""What torch programs rely on beyond the public calls: failures they catch as RuntimeError
(each of thenable's precise types is also the type torch raises), WorkerInfo's semantics,
the default timeout, and ``rpc.api``.

One group of three workers; worker0 makes the calls.
"""

from __future__ import annotations

import pickle
import re
from typing import Any

import _compat_fns as compat
import pytest
from _harness import Failure, Group

from thenable import rpc

GROUP_SIZE = 3


def _is(
    failure: Any, cls: type[BaseException], *fragments: str, torch: type = RuntimeError
) -> None:
    """``failure`` is exactly ``cls``, also an instance of ``torch`` (the type torch raises),
    and its message has ``fragments``."""
    assert isinstance(failure, Failure), failure
    assert failure.type_name == f"{cls.__module__}.{cls.__qualname__}", failure.traceback
    assert f"builtins.{torch.__qualname__}" in failure.bases, failure.bases
    for fragment in fragments:
        assert fragment in failure.message, (fragment, failure.message)


def test_failures_are_catchable_as_torch_raises_them(group: Group) -> None:
    out = group.call(0, compat.check_failures_catchable_as_torch)
    _is(out["unpicklable-argument"], rpc.SerializationError, "_thread.lock", torch=TypeError)
    _is(out["unpicklable-argument"], rpc.SerializationError)
    _is(out["unpicklable-result"], rpc.SerializationError, "_thread.lock")
    _is(out["future-result"], rpc.SerializationError, "Can not pickle torch.futures.Future")
    _is(out["async-no-future"], rpc.AsyncExecutionError, "async_returns_an_int", "returned int")
    _is(out["unknown-name"], rpc.UnknownWorkerError, "'worker9'")
    _is(out["unknown-rank"], rpc.UnknownWorkerError, "rank 9")
    _is(out["unknown-info"], rpc.UnknownWorkerError, "'nobody'")
    _is(out["pickle-rref"], rpc.SerializationError, "only be pickled by thenable.rpc")
    _is(
        out["callee-cannot-import"],
        rpc.SerializationError,
        "worker1",
        "cannot load the call",
        "No module named 'only_on_worker0'",
    )
    _is(out["not-recreatable"], rpc.RemoteError, "TwoArgError")
    _is(out["not-recreatable"], rpc.RemoteError, "Original exception on remote side was")
    _is(out["timeout"], rpc.RpcTimeoutError, "timed out after 0.2 s", torch=TimeoutError)
    # torch's test fixture matches its timeouts with get_timeout_error_regex(): this phrase.
    _is(out["timeout"], rpc.RpcTimeoutError, "RPC ran for more than set timeout (200 ms)")
    # A then() callback failing on the callee: the type stays, and it is a RuntimeError too.
    then = out["then-on-callee"]
    assert then.type_name == "builtins.ValueError"
    assert "builtins.RuntimeError" in then.bases and "invalid literal" in then.message
    assert out["after"] == 1


def test_the_default_timeout_can_be_read_and_changed(group: Group) -> None:
    out = group.call(0, compat.check_default_timeout)
    assert out["initial"] == 30.0
    assert out["set"] == 0.2
    _is(out["short"], rpc.RpcTimeoutError, "timed out after 0.2 s")
    _is(out["made-before"], rpc.RpcTimeoutError, "timed out after 0.2 s")
    assert out["unlimited"] == "in time"
    negative, text, nan = out["bad"]
    assert negative.type_name == "builtins.ValueError"
    assert text.type_name == "builtins.TypeError"
    assert nan.type_name == "builtins.ValueError"


def test_rpc_api_agent_view(group: Group) -> None:
    out = group.call(0, compat.agent_view)
    assert out["infos"] == [("worker0", 0), ("worker1", 1), ("worker2", 2)]
    assert out["me"] == rpc.WorkerInfo("worker0", 0)
    assert out["by-name"] == rpc.WorkerInfo("worker2", 2)
    assert out["by-rank"] == rpc.WorkerInfo("worker1", 1)
    _is(out["unknown"], rpc.UnknownWorkerError)
    assert {"agent.num_pending_requests", "num_owner_rrefs"} <= set(out["debug-keys"])
    assert out["debug-strings"] is True
    assert out["set"] is True and out["available"] is True
    assert out["to-info"] == rpc.WorkerInfo("worker1", 1)


def test_rpc_api_all_gather_and_barriers(group: Group) -> None:
    tickets = [group.submit(rank, compat.gather, f"from{rank}", None, 3) for rank in range(3)]
    results = [group.result(ticket) for ticket in tickets]
    expected = [{f"worker{r}": (f"from{r}", i) for r in range(3)} for i in range(3)]
    assert results == [expected] * 3
    # A subset of the workers gathers among itself.
    names = ["worker1", "worker2"]
    tickets = [group.submit(rank, compat.gather, rank, names, 1) for rank in (1, 2)]
    assert [group.result(t) for t in tickets] == [[{"worker1": (1, 0), "worker2": (2, 0)}]] * 2
    tickets = [group.submit(rank, compat.barrier_then_wait_all) for rank in range(3)]
    assert [group.result(t) for t in tickets] == ["worker0", "worker1", "worker2"]
    misuse = group.call(0, compat.gather_misuse)
    assert misuse["not-in-names"].type_name == "builtins.ValueError"
    _is(misuse["unknown-name"], rpc.UnknownWorkerError, "'nobody'")
    _is(
        misuse["timeout"],
        rpc.RpcTimeoutError,
        "RPC ran for more than set timeout (100 ms)",
        "timed out in _all_gather after 0.10 seconds",
    )
    late = group.call(2, compat.gather, "late", ["worker0", "worker2"], 1)
    assert late == [{"worker0": 1, "worker2": ("late", 0)}]


# -- without workers -----------------------------------------------------------------------------


def test_worker_info_is_as_torch_s() -> None:
    info = rpc.WorkerInfo("worker1", 1)
    assert (info.name, info.id) == ("worker1", 1)
    assert repr(info) == "WorkerInfo(id=1, name=worker1)"
    assert info == rpc.WorkerInfo("worker1", 1)
    assert info != rpc.WorkerInfo("worker1", 2) and info != rpc.WorkerInfo("worker2", 1)
    assert info != ("worker1", 1)  # not a tuple (torch's is not either)
    assert hash(info) == hash(1)
    assert len({info, rpc.WorkerInfo("worker1", 1)}) == 1
    with pytest.raises(TypeError):
        _ = info < rpc.WorkerInfo("worker2", 2)  # type: ignore[operator]
    with pytest.raises(AttributeError):
        info.name = "other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(info)) == info
    with pytest.raises(TypeError, match="name must be a str"):
        rpc.WorkerInfo(1, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="id must be an int"):
        rpc.WorkerInfo("w", "1")  # type: ignore[arg-type]


INVALID_NAMES = ["", "bad name", "a/b", "é", "x" * 128, "tab\t", "abc*", " ", "a" * 500]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_worker_names_are_refused_as_torch_refuses_them(name: str) -> None:
    with pytest.raises(rpc.WorkerNameError, match="invalid worker name") as info:
        rpc.init_rpc(name, rank=0, world_size=1)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    _has_torch_s_words(info.value)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_worker_info_refuses_the_names_that_torch_s_refuses(name: str) -> None:
    with pytest.raises(rpc.WorkerNameError, match=f"^invalid worker name {re.escape(repr(name))}"):
        rpc.WorkerInfo(name, 0)
    with pytest.raises(RuntimeError) as info:
        rpc.WorkerInfo(name, 0)
    _has_torch_s_words(info.value)


def _has_torch_s_words(error: BaseException) -> None:
    """What torch's test_invalid_names matches, for WorkerInfo("abc*", 0) and the like."""
    for words in ("Worker name must match", "must be non-empty", "shorter than 128"):
        assert words in str(error), (words, str(error))


def test_valid_worker_names_include_torch_s_punctuation() -> None:
    from thenable.rpc._options import check_worker_name

    for name in ("worker-1", "trainer_0", "ps:0", "x" * 127, "A9"):
        check_worker_name(name)
    with pytest.raises(TypeError):
        check_worker_name(3)


def test_calls_before_init_are_runtime_errors() -> None:
    with pytest.raises(RuntimeError, match="init_rpc"):
        rpc.get_rpc_timeout()
    with pytest.raises(RuntimeError, match="init_rpc"):
        rpc._set_rpc_timeout(1.0)
    with pytest.raises(RuntimeError, match="init_rpc"):
        rpc.api._get_current_rpc_agent()
    assert rpc.api._is_current_rpc_agent_set() is False
    assert rpc.is_available() is True


def test_the_error_types_derive_from_torch_s() -> None:
    assert issubclass(rpc.RpcError, RuntimeError)
    for cls, builtin in [
        (rpc.RpcTimeoutError, TimeoutError),
        (rpc.RpcConnectionError, ConnectionError),
        (rpc.SerializationError, TypeError),
        (rpc.UnknownWorkerError, ValueError),
        (rpc.WorkerNameError, ValueError),
        (rpc.RendezvousError, ValueError),
        (rpc.AsyncExecutionError, TypeError),
        (rpc.DestinationTypeError, TypeError),
    ]:
        assert issubclass(cls, builtin) and issubclass(cls, rpc.RpcError), cls
    assert issubclass(rpc.RemoteError, rpc.RpcError)
    # torch raises ValueError for rpc_sync(1.0, f): an UnknownWorkerError is one.
    assert issubclass(rpc.DestinationTypeError, rpc.UnknownWorkerError)


@pytest.mark.parametrize(
    ("timeout", "shown"), [(0.5, "500 ms"), (0.2, "200 ms"), (60.0, "60000 ms"), (1e-4, "0.1 ms")]
)
def test_a_call_timeout_says_what_torch_s_does(timeout: float, shown: str) -> None:
    """torch's words, matched by its tests' get_timeout_error_regex() ("RPC ran for more
    than"), follow thenable's own."""
    message = f"RPC call of f on worker1 timed out after {timeout} s"
    error = rpc.RpcTimeoutError.after_timeout(message, timeout)
    assert type(error) is rpc.RpcTimeoutError
    assert str(error) == (
        f"{message}: RPC ran for more than set timeout ({shown}) and will now be marked with "
        "an error"
    )


def test_torch_s_module_level_names_and_constants() -> None:
    """Names torch programs and tests reach for, with torch's values."""
    import torch.distributed.rpc as torch_rpc

    for name in (
        "DEFAULT_INIT_METHOD",
        "DEFAULT_NUM_WORKER_THREADS",
        "DEFAULT_RPC_TIMEOUT_SEC",
        "DEFAULT_SHUTDOWN_TIMEOUT",
        "UNSET_RPC_TIMEOUT",
    ):
        assert getattr(rpc.constants, name) == getattr(torch_rpc.constants, name), name
    assert rpc.PyRRef is rpc.RRef
    assert rpc.RpcAgent is rpc.api.RpcAgent
    assert rpc._is_current_rpc_agent_set() is False
