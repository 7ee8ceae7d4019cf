"""rpc_sync / rpc_async / remote, get_worker_info, errors, timeouts, arrays and tensors.

One group of three workers serves every check of this module (worker0 makes the calls); the
timeout-0 test has its own group, with a short default timeout.
"""

from __future__ import annotations

import operator
import sys
from pathlib import Path
from typing import Any

import _remote_fns as fns
import pytest
from _harness import Failure, Group

from thenable import rpc

WORKER1_TRACE = "Traceback from worker worker1 (rank 1)"


GROUP_SIZE = 3


def _is(failure: Any, cls: type[BaseException], *fragments: str) -> Failure:
    """Assert ``failure`` is a Failure of exactly ``cls`` whose message has ``fragments``."""
    assert isinstance(failure, Failure), f"expected a {cls.__name__}, got {failure!r}"
    expected = f"{cls.__module__}.{cls.__qualname__}"
    assert failure.type_name == expected, failure.traceback
    for fragment in fragments:
        assert fragment in failure.message, (fragment, failure.message)
    return failure


def test_workers_import_the_test_modules_from_this_directory(group: Group) -> None:
    here = Path(__file__).resolve().parent
    assert here.as_posix() in [Path(p).resolve().as_posix() for p in sys.path if p]
    for rank in range(3):
        for module in ("_harness", "_remote_fns"):
            path = Path(group.call(rank, fns.module_file, module))
            assert path.resolve().parent == here


def test_destination_by_name_rank_and_worker_info_with_kwargs(group: Group) -> None:
    out = group.call(0, fns.check_destinations)
    for label in ("name", "rank", "info"):
        assert out[f"sync-{label}"] == ("worker1", (1, 2), [("k", "v")])
        assert out[f"async-{label}"] == ("worker1", (3,), [("x", 1), ("y", 2)])
        assert out[f"remote-{label}"] == ("worker1", (4,), [("z", None)])
    assert out["to-worker2-by-rank"] == "worker2"
    assert out["to-self-by-name"] == "worker0"
    assert out["to-self-by-rank"] == 42
    assert out["kwargs-only"] == 42


def test_get_worker_info(group: Group) -> None:
    out = group.call(0, fns.check_worker_info)
    assert out["me"] == ("WorkerInfo", "worker0", 0)
    assert out["other"] == ("WorkerInfo", "worker1", 1)
    assert out["is_workerinfo"] is True
    assert out["equal_to_tuple"] is True
    _is(out["unknown"], rpc.UnknownWorkerError, "worker9")
    assert out["remote_view"] == ("worker2", 2, "worker0", 0)


def test_remote_exception_is_reraised_as_the_original_type(group: Group) -> None:
    out = group.call(0, fns.check_remote_exceptions)
    for label, message, code in (
        ("custom-sync", "bad thing", 7),
        ("custom-async", "async bad", 8),
        ("custom-remote", "remote bad", 9),
    ):
        failure = _is(out[label], fns.CustomError, message)
        assert failure.args == repr((message, code))
        assert failure.attributes == {
            "code": code,
            "detail": {"where": "remote", "codes": [code, code + 1]},
        }
        assert failure.cause_type_name == "thenable.rpc.RemoteTraceback"
        assert failure.cause_text.startswith(WORKER1_TRACE), failure.cause_text
        assert "in raise_custom" in failure.cause_text
        assert f"_remote_fns.CustomError: ('{message}', {code})" in failure.cause_text
    builtin = _is(out["builtin"], ZeroDivisionError, "division by zero")
    assert "Traceback from worker worker2 (rank 2)" in builtin.cause_text


def test_exception_that_cannot_travel_becomes_remote_error(group: Group) -> None:
    out = group.call(0, fns.check_remote_exceptions)
    unpicklable = _is(out["unpicklable"], rpc.RemoteError, "UnpicklableError", "cannot travel")
    assert unpicklable.attributes["type_name"] == "_remote_fns.UnpicklableError"
    assert unpicklable.attributes["message"] == "cannot travel"
    assert "pickling failed" in unpicklable.attributes["reason"]
    assert unpicklable.cause_type_name == "thenable.rpc.RemoteTraceback"
    assert "in raise_unpicklable" in unpicklable.cause_text
    unloadable = _is(out["unloadable"], rpc.RemoteError, "TwoArgError", "p/q")
    assert unloadable.attributes["type_name"] == "_remote_fns.TwoArgError"
    assert "unpickling failed" in unloadable.attributes["reason"]
    assert "in raise_two_arg" in unloadable.cause_text


def test_unpicklable_argument_fails_at_once_and_worker_keeps_serving(group: Group) -> None:
    out = group.call(0, fns.check_unpicklable_arguments)
    _is(out["lambda-async"], rpc.SerializationError, "lambda")
    _is(out["lambda-func"], rpc.SerializationError, "lambda")
    for label in ("lock-sync", "lock-kwargs", "lock-remote"):
        _is(out[label], rpc.SerializationError, "lock")
    assert out["pending-after"] == 0  # nothing was left waiting for a reply
    assert out["next-call"] == 3


def test_unpicklable_return_value_fails_the_call_and_worker_keeps_serving(group: Group) -> None:
    out = group.call(0, fns.check_unpicklable_return)
    for label in ("sync", "async"):
        failure = out[label]
        assert isinstance(failure, Failure)
        assert "_thread.lock" in failure.message, failure.traceback
        assert failure.type_name == "thenable.rpc.SerializationError"
        assert failure.cause_text.startswith(WORKER1_TRACE)
    assert out["next-call"] == 5
    assert out["worker1-pending"] == 0


def test_unknown_destination_fails_at_once(group: Group) -> None:
    out = group.call(0, fns.check_unknown_destination)
    _is(out["sync"], rpc.UnknownWorkerError, "'worker9'")
    _is(out["async"], rpc.UnknownWorkerError, "'nobody'")
    _is(out["remote"], rpc.UnknownWorkerError, "'worker9'")
    _is(out["rank"], rpc.UnknownWorkerError, "9")
    assert out["seconds"] < 5.0  # not after a timeout


def test_a_destination_of_another_type_is_a_type_error_that_torch_code_catches(
    group: Group,
) -> None:
    """torch raises ValueError ("Cannot get WorkerInfo from name 1.0") for a destination that
    is not a name, rank or WorkerInfo; ours is a TypeError that is also that ValueError (an
    UnknownWorkerError) and a RuntimeError."""
    out = group.call(0, fns.check_unknown_destination)
    for label, shown in (
        ("float-sync", "1.0 (builtins.float)"),
        ("float-async", "1.5 (builtins.float)"),
        ("float-remote", "0.5 (builtins.float)"),
        ("bytes", "b'worker1' (builtins.bytes)"),
        ("none", "None"),
        ("stats", "1.0 (builtins.float)"),
    ):
        failure = _is(out[label], rpc.DestinationTypeError, f"cannot get a WorkerInfo from {shown}")
        assert "must be a worker name (str), rank (int) or WorkerInfo" in failure.message
        for base in (TypeError, ValueError, RuntimeError, rpc.UnknownWorkerError):
            assert f"{base.__module__}.{base.__qualname__}" in failure.bases, (label, base)


def test_rpc_before_init_rpc_fails() -> None:
    # This (the pytest) process never calls init_rpc.
    for call in (
        lambda: rpc.rpc_sync("worker1", operator.add, args=(1, 2)),
        lambda: rpc.rpc_async("worker1", operator.add, args=(1, 2)),
        lambda: rpc.remote("worker1", operator.add, args=(1, 2)),
        lambda: rpc.get_worker_info(),
        lambda: rpc.shutdown(),
        lambda: rpc.RRef(1),
    ):
        with pytest.raises(RuntimeError, match=r"init_rpc\(") as info:
            call()
        assert type(info.value) is RuntimeError


def test_call_longer_than_its_timeout_fails_with_timeout_error(group: Group) -> None:
    out = group.call(0, fns.check_timeout, 0.5)
    _is(
        out["failure"],
        rpc.RpcTimeoutError,
        "timed out after 0.5 s",
        "wait_for_gate",
        "worker1",
        # torch's words, that torch's tests match ("RPC ran for more than")
        "RPC ran for more than set timeout (500 ms) and will now be marked with an error",
    )
    assert 0.45 <= out["elapsed"] < 10.0
    assert out["next"] == "worker1"


def test_numpy_arrays_round_trip_with_layout_and_shared_memory(group: Group) -> None:
    out = group.call(0, fns.check_arrays)
    there = out["there"]
    assert there["a"] == out["expected_a"]
    assert there["b"] == out["expected_b"]
    assert there["dtype"] == "float32"
    assert there["a_strides"] == out["sent_strides"]
    assert there["a_contiguous"] is False
    assert there["shares_memory"] is True
    assert there["writable"] is True
    assert out["back_a"][1][0] == -1.0
    assert out["back_b_before"] == out["expected_b"]
    assert out["back_b_after"][0] == -1.0  # the two views still share memory
    assert out["back_shares"] is True
    assert out["back_dtype"] == "float32"
    assert out["back_strides"] == out["sent_strides"]
    assert out["sender_unchanged"] == 6.0  # the callee's copy is its own


def test_torch_tensors_round_trip_with_layout_and_shared_storage(group: Group) -> None:
    pytest.importorskip("torch")
    out = group.call(0, fns.check_tensors, timeout=120.0)
    there = out["there"]
    assert there["a"] == out["expected_t"]
    assert there["b"] == out["expected_row"]
    assert there["dtype"] == "torch.float64"
    assert there["a_stride"] == out["sent_stride"] == (1, 4)
    assert there["a_contiguous"] is False
    assert there["same_storage"] is True
    assert out["back_stride"] == (1, 4)
    assert out["back_equal"] is True
    assert out["back_same_storage"] is True
    assert out["back_row_after"][0] == -5.0
    assert out["sender_unchanged"] == 4.0


def test_group_shuts_down_gracefully_after_all_checks(group: Group) -> None:
    """Last user of the module's group: every worker's graceful shutdown completes."""
    group.call_all(fns.shutdown_worker, True, 20.0)
    assert group.call_all(fns.thenable_threads_left) == [[], [], []]


def test_timeout_zero_means_no_limit(make_group: Any) -> None:
    """With a 1 s default timeout, a call made with timeout=0 outlives a default-timeout call
    made after it to the same kind of blocked handler, and completes once released."""
    group: Group = make_group(2)
    group.init_all(fns.init_worker, rpc_timeout=1.0)
    group.call(
        0, fns.start_call, "unlimited", "worker1", fns.signal_and_wait_for_gate, ("no-limit",), 0
    )
    group.wait_signal(1, "no-limit")  # its handler runs, and blocks
    group.call(0, fns.start_call, "default", "worker1", fns.signal_and_wait_for_gate, ("default",))
    outcome, elapsed = group.call(0, fns.finish_call, "default")
    _is(outcome, rpc.RpcTimeoutError, "timed out after 1.0 s")
    assert 0.9 <= elapsed < 10.0  # the timer starts just before start_call reads the clock
    # The unlimited call started before the default one, so it has been pending for more than
    # the default timeout by now.
    assert group.call(0, fns.call_done, "unlimited") is False
    group.call(1, fns.open_gate, "no-limit")
    group.call(1, fns.open_gate, "default")
    value, unlimited_elapsed = group.call(0, fns.finish_call, "unlimited")
    assert value == "no-limit"
    assert unlimited_elapsed > 1.0
    group.call_all(fns.shutdown_worker)
    group.close()


def test_calls_work_while_another_thread_imports_numpy(make_group: Any) -> None:
    """Serializing a message while numpy is half imported (another thread is importing it, so
    it is in sys.modules without its attributes) must work, for calls and RRef releases; a
    graceful shutdown afterwards must not hang."""
    group: Group = make_group(2)
    group.init_all(fns.init_worker, rpc_timeout=10.0)
    out = group.call(0, fns.check_calls_during_a_slow_import, "numpy")
    assert out["imported_before"] is False
    assert out["held"] == 4
    assert out["paused"] is True
    assert out["partially_imported"] is True
    assert out["call"] == 3
    assert out["to_here"] == 1
    assert out["flush"] is None
    assert out["importer_alive"] is False
    assert out["imported_after"] is True
    assert out["call_after"] == 5
    group.call_all(fns.shutdown_worker, True, 10.0)
    group.close()
