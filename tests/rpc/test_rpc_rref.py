"""RRefs: owner and user RRefs, passing them around, the proxies, and reference counting.

One group of three workers (worker0 makes the calls); the last test shuts it down and checks
that nothing outlives RPC.
"""

from __future__ import annotations

from typing import Any

import _remote_fns as fns
from _harness import Failure, Group

COUNTER_ON_1 = {"is_owner": False, "owner": ("worker1", 1), "owner_name": "worker1"}


GROUP_SIZE = 3


def _failure(value: Any, type_name: str, *fragments: str) -> None:
    assert isinstance(value, Failure), value
    assert value.type_name == type_name, value.traceback
    for fragment in fragments:
        assert fragment in value.message, (fragment, value.message)


def test_owner_rref_of_a_local_value(group: Group) -> None:
    out = group.call(0, fns.check_owner_rref)
    assert out["is_owner"] is True
    assert out["local_value_is_value"] is True
    assert out["to_here_is_value"] is True
    assert out["confirmed"] is True
    assert out["owner"] == ("WorkerInfo", "worker0", 0)
    assert out["owner_name"] == "worker0"
    assert out["repr"].startswith("OwnerRRef(")


def test_remote_gives_a_user_rref(group: Group) -> None:
    out = group.call(0, fns.check_user_rref)
    assert out["is_owner"] is False
    assert out["owner"] == ("WorkerInfo", "worker1", 1)
    assert out["owner_name"] == "worker1"
    assert out["to_here"] == 5
    _failure(out["local_value"], "builtins.RuntimeError", "local_value()", "to_here()")
    assert out["repr"].startswith("UserRRef(")
    assert out["confirm_round_trips"] >= 0, "never confirmed by its owner"
    assert out["confirmed"] is True
    assert out["by_rank"] == ("worker1", 6)
    assert out["by_info"] == ("worker2", 7)
    _failure(out["failed_creation"], "_remote_fns.CustomError", "no value")


def test_remote_is_confirmed_without_further_traffic(group: Group) -> None:
    assert group.call(0, fns.confirmed_without_other_calls) is True


def test_remote_whose_request_the_owner_cannot_decode_fails_its_users(group: Group) -> None:
    out = group.call(0, fns.check_undecodable_creation)
    for key in ("to_here", "to_here_again"):
        _failure(out[key], "thenable.rpc.SerializationError", "cannot load", "TwoArgError")
    _failure(out["proxy"], "builtins.RuntimeError", "creating the value", "TwoArgError")
    assert out["confirmed"] is True  # the owner answered, with the error
    assert out["table_after"] == 0


def test_rrefs_passed_as_arguments_and_returned(group: Group) -> None:
    out = group.call(0, fns.check_rref_passing)
    assert out["user_rref_to_third"] == {"me": "worker2", **COUNTER_ON_1, "value": 10}
    assert out["user_rref_to_owner"] == {
        "me": "worker1",
        "is_owner": True,
        "owner": ("worker1", 1),
        "owner_name": "worker1",
        "value": 10,
        "local_value": 10,
    }
    assert out["owner_rref_to_other"] == {
        "me": "worker1",
        "is_owner": False,
        "owner": ("worker0", 0),
        "owner_name": "worker0",
        "value": 3,
    }
    assert out["returned_by_owner"] == {"me": "worker0", **COUNTER_ON_1, "value": 7}
    assert out["returned_by_third"] == {"me": "worker0", **COUNTER_ON_1, "value": 9}
    assert out["returned_to_owner"] == {"is_owner": True, "same_value": True}
    assert out["chain"]["me"] == "worker1"
    assert out["chain"]["is_owner"] is True
    assert out["chain"]["local_value"] == 10


def test_rref_proxies_call_methods_on_the_owner(group: Group) -> None:
    out = group.call(0, fns.check_rref_proxies)
    assert out["rpc_sync"] == 7
    assert out["rpc_async"] == 10
    assert out["remote"] == ("worker1", 10)
    assert out["kwargs"] == 20
    _failure(out["exception"], "_remote_fns.CustomError", "proxy failed")
    assert out["exception"].attributes["code"] == 42
    assert "in fail" in out["exception"].cause_text
    _failure(out["missing_method"], "builtins.AttributeError", "no_such_method")
    assert out["final"] == 20
    assert out["owner_proxy"] == 2


def test_owner_frees_a_remote_value_once_no_worker_holds_it(group: Group) -> None:
    out = group.call(0, fns.check_refcount_user_rref, "user")
    assert out["to_here_tag"] == "user"
    assert out["confirm_round_trips"] >= 0
    assert out["created"] == 1
    assert out["held_by_worker2"] == "worker1"
    assert out["while_worker2_holds"] == (1, True)  # worker0 dropped its reference only
    assert out["after_all_dropped"] == (0, True)
    assert out["value_alive"] is False


def test_owner_frees_a_local_value_once_no_worker_holds_it(group: Group) -> None:
    out = group.call(0, fns.check_refcount_owner_rref, "owned")
    assert out["created"] == 1
    assert out["while_held"] == (1, True)
    assert out["after_all_dropped"] == (0, True)
    assert out["value_alive"] is False


def test_reference_counting_under_concurrent_forks_and_releases(group: Group) -> None:
    out = group.call(0, fns.check_refcount_churn, "churn", 25)
    assert out["owners"] == ["worker1"]
    assert out["while_held"] == 1
    assert out["after_all_dropped"] == (0, True)
    assert out["value_alive"] is False
    assert out["early_left"] == 0


def test_remote_values_and_failures_from_many_threads_are_all_freed(group: Group) -> None:
    out = group.call(0, fns.check_remote_churn_from_threads, 4, 60)
    assert out["wrong"] == [] and out["alive"] == []
    assert out["left"] == 0 and out["settled"] is True


def test_nothing_outlives_shutdown(group: Group) -> None:
    """Shuts the module's group down: worker2 still holds a reference to a worker1 value."""
    assert group.call(0, fns.check_rref_kept_over_shutdown, "kept") == "worker1"
    assert group.call(1, fns.tracked_alive, "kept") is True
    reports = group.call_all(fns.shutdown_and_report_leaks)
    for rank, report in enumerate(reports):
        assert report == {"table": 0, "alive": [], "threads": []}, f"worker{rank}: {report}"
