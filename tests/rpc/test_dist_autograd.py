"""Distributed autograd (thenable.autograd): gradients equal plain torch.autograd on the same
computation, across RPCs of every kind; contexts are released on every worker; errors are
torch's (catchable as RuntimeError); a worker lost during backward fails it promptly."""

from __future__ import annotations

from typing import Any

import _autograd_fns as ag
import _remote_fns as fns
import pytest
import torch
from _harness import Failure, Group
from conftest import GroupFactory

GROUP_SIZE = 4


def _assert_equal_pairs(pairs: list[tuple[Any, Any]], *, exact: bool = True) -> None:
    """Each (distributed, local) gradient pair is equal: exactly where each leaf's gradient
    comes along one path (the same ops in the same order), else up to float rounding (the
    contributions of several paths are summed in another order)."""
    assert pairs
    for got, want in pairs:
        assert got is not None, "no gradient reached this leaf"
        assert got.dtype == want.dtype
        if exact:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("check", "exact"),
    [
        (ag.check_simple_rpc, True),
        (ag.check_used_twice, False),
        (ag.check_cycle_back_to_caller, True),
        (ag.check_nested_calls, True),
        (ag.check_several_roots, False),
        (ag.check_async_execution, True),
    ],
)
def test_gradients_equal_local_autograd(group: Group, check: Any, exact: bool) -> None:
    _assert_equal_pairs(group.call(0, check), exact=exact)


def test_rref_based_model_gets_its_gradients_on_the_owner(group: Group) -> None:
    out = group.call(0, ag.check_rref_model)
    _assert_equal_pairs([out["x"], out["weight"]])


def test_rref_backward(group: Group) -> None:
    out = group.call(0, ag.check_rref_backward)
    _assert_equal_pairs(out["user"])
    _assert_equal_pairs(out["owner"])
    _assert_equal_pairs([out["local"]])
    failure: Failure = out["not_owner"]
    assert "builtins.RuntimeError" in failure.bases
    assert "only the owner ('worker1')" in failure.message


def test_two_passes_in_one_context_add_up_and_dot_grad_is_untouched(group: Group) -> None:
    out = group.call(0, ag.check_backward_twice_adds_up)
    _assert_equal_pairs(out["once"])
    _assert_equal_pairs(out["thrice"])  # torch: the 2nd pass without retain_graph raises
    assert out["first_unchanged"]  # get_gradients' tensors are not updated in place later
    assert out["dot_grad"] == (None, None)


def test_unreached_leaves_and_tensors_without_grad(group: Group) -> None:
    out = group.call(0, ag.check_unreached_and_no_grad)
    assert out["keys_are_a"]
    assert out["y_requires_grad"] is False
    assert out["kept_requires_grad"] is True
    # Sends: a (request 1), b (request 3); receives: the replies of requests 1 and 3.
    assert (out["sends"], out["recvs"]) == (2, 2)


def test_context_ids_propagate_to_callees_and_end_with_the_block(group: Group) -> None:
    out = group.call(0, ag.check_context_ids_and_propagation)
    ids = out["ids"]
    assert len(set(ids)) == 3 and all(cid >> 48 == 0 for cid in ids)  # worker0's rank on top
    assert out["callee"]["id"] == ids[-1] and out["callee"]["known"] == [0]
    assert out["nested"]["id"] == ids[-1] and out["nested"]["known"] == [1]
    assert out["known"] == [1]
    for failure, cid in zip(out["after"], ids, strict=True):
        assert failure.type_name == "builtins.RuntimeError"
        assert f"Could not find autograd context with id: {cid}" in failure.message
    assert "Current thread doesn't have a valid autograd context" in out["no_current"].message
    assert out["valid_after"] is False


def test_contexts_are_released_on_every_worker(group: Group) -> None:
    out = group.call(0, ag.check_contexts_released_everywhere, 40, timeout=120)
    assert out["during"] == [1, 1, 1, 1]
    assert out["after"] == [0, 0, 0, 0]
    assert out["late_reply_context"] == [0, 0]


def test_errors_are_torchs(group: Group) -> None:
    out: dict[str, Failure] = group.call(0, ag.check_errors)
    expected = {
        "unknown_id": ("builtins.RuntimeError", "Could not find autograd context with id"),
        "gradients_unknown_id": ("builtins.RuntimeError", "with id: 12345"),
        "roots_none": (
            "builtins.TypeError",
            "incompatible function arguments: roots must be a list of scalar tensors",
        ),
        "id_none": (
            "builtins.TypeError",
            "incompatible function arguments: an autograd context id is an int",
        ),
        "roots_empty": ("builtins.RuntimeError", "No tensors provided for gradient computation"),
        "no_requires_grad": ("builtins.RuntimeError", "requires_grad not set on root 0"),
        "not_scalar": ("builtins.RuntimeError", "is not a scalar, all roots need to be scalar"),
        "leaf_root": ("builtins.RuntimeError", "does not have a valid gradient function"),
        "nested": ("builtins.RuntimeError", "Already have an autograd context id for this thread"),
        "remote_backward": (
            "thenable.autograd.BackwardError",
            "Error on Node 1: Simulated error in a backward function",
        ),
        "local_backward": (
            "thenable.autograd.BackwardError",
            "Error on Node 0: Simulated error in a backward function",
        ),
        "released": ("builtins.RuntimeError", "Could not find autograd context"),
    }
    for key, (type_name, fragment) in expected.items():
        failure = out[key]
        assert failure.type_name == type_name, (key, failure.traceback)
        assert fragment in failure.message, (key, failure.message)
        assert isinstance(failure, Failure)
    for key in ("remote_backward", "local_backward"):
        assert "builtins.RuntimeError" in out[key].bases


def test_a_worker_killed_during_backward_fails_it_promptly(make_group: GroupFactory) -> None:
    group = make_group(2)
    group.init_all(fns.init_worker, rpc_timeout=20.0)
    ticket = group.submit(0, ag.backward_through_blocking_worker)
    group.wait_signal(1, "in-backward")
    group.kill(1)
    failure, elapsed = group.result(ticket)
    assert failure.type_name == "thenable.rpc.RpcConnectionError", failure.traceback
    assert "builtins.RuntimeError" in failure.bases
    assert elapsed < 10.0, f"backward failed only after {elapsed:.1f} s"
    group.call(0, fns.shutdown_worker, False)


def test_distributed_autograd_needs_rpc(make_group: GroupFactory) -> None:
    group = make_group(1)
    out = group.call(0, ag.context_before_init)
    for failure in out.values():
        assert failure.type_name == "builtins.RuntimeError"
        assert "call thenable.rpc.init_rpc" in failure.message
    group.close()


def test_sparse_tensors_and_gradients_given_to_two_leaves(group: Group) -> None:
    out = group.call(0, ag.check_sparse_and_shared_gradients)
    _assert_equal_pairs([out["sparse"], out["dense"], out["y_unchanged"]])


def test_leaf_hooks_run_and_dot_grad_is_kept(group: Group) -> None:
    out = group.call(0, ag.check_leaf_hooks_run)
    _assert_equal_pairs(out["pairs"])
    assert out["calls"] == ["pre", "post"]
    kept_a, kept_b = out["dot_grad"]
    assert kept_a is None
    torch.testing.assert_close(kept_b, torch.full((3,), 7.0))


def test_node_hooks_run_when_no_leaf_has_tensor_hooks(group: Group) -> None:
    out = group.call(0, ag.check_node_hooks_run_without_tensor_hooks)
    _assert_equal_pairs(out["pairs"])
    pre, seen_in_grad, post = out["calls"]  # torch's order: accumulated, then post-hooks
    assert (pre, post) == ("pre", "post")
    torch.testing.assert_close(seen_in_grad, out["pairs"][1][1])
    kept_a, kept_b = out["dot_grad"]
    torch.testing.assert_close(kept_a, torch.full((3,), 5.0))
    assert kept_b is None


def test_passes_over_a_shared_weight_run_at_once(group: Group) -> None:
    """No process-wide lock serializes the passes of two trainers through one server's weight
    (as with torch): each waits in the weight's backward for the other."""
    out = group.call(0, ag.check_passes_over_a_shared_weight_overlap)
    _assert_equal_pairs(out["pairs"])
    assert out["dot_grads"] == [None, None]


def test_debug_info_counts_running_passes_and_max_id(group: Group) -> None:
    out = group.call(0, ag.check_debug_info_and_max_id)
    assert out["during"] == [1]
    for info in (out["after_remote"], out["after_here"]):
        assert info["num_current_backward_passes"] == "0"
        assert int(info["num_autograd_contexts"]) >= 1  # the test's context is still open
    assert out["max_id"] == (1 << 48) - 1  # worker0: rank 0 in the top 16 bits
    assert 0 <= out["cid"] <= out["max_id"]
