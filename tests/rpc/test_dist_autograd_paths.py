"""Distributed autograd on every path a call can take: a worker's node that several gradient
messages reach runs once, with their sum (as torch's engine runs it); user code run for a call
keeps the caller's context whichever way it is reached (``remote()`` to oneself, proxies on the
owner, a proxy call that waits for its value), so its own calls carry it on and the gradients
come back."""

from __future__ import annotations

from typing import Any

import _autograd_paths_fns as paths
import pytest
import torch
from _harness import Group

GROUP_SIZE = 3


@pytest.mark.parametrize(
    "check",
    [
        paths.check_tensor_in_two_messages_runs_its_node_once,
        paths.check_two_messages_sharing_a_node_run_it_once,
    ],
)
def test_a_node_reached_by_several_messages_runs_once_with_their_sum(
    group: Group, check: Any
) -> None:
    out = group.call(0, check)
    assert [run.tolist() for run in out["runs"]] == [[5.0, 5.0]]
    torch.testing.assert_close(out["grad"], torch.full((2,), 5.0))


@pytest.mark.parametrize(
    ("check", "runs"),
    [
        (paths.check_messages_from_two_workers_run_a_node_once, [[5.0, 5.0]]),
        (paths.check_unused_message_does_not_hold_a_shared_node_forever, [[3.0, 3.0]]),
        (paths.check_a_node_waiting_for_a_message_lets_the_rest_run, [[4.0, 4.0]]),
        (paths.check_one_message_whose_tensors_return_at_different_times, [[7.0, 7.0]]),
    ],
)
def test_a_node_waits_for_every_gradient_that_will_come(
    group: Group, check: Any, runs: list[list[float]]
) -> None:
    out = group.call(0, check)
    assert [run.tolist() for run in out["runs"]] == runs
    torch.testing.assert_close(out["grad"], torch.tensor(runs[0]))


def test_a_cycle_of_waiting_workers_is_forced_and_the_gradients_stay_right(group: Group) -> None:
    out = group.call(0, paths.check_weight_used_around_a_round_trip)
    torch.testing.assert_close(out["x"], out["expected"]["x"])
    torch.testing.assert_close(out["w"], out["expected"]["w"])


def _assert_gradients(got: dict[str, tuple[Any, Any]]) -> None:
    for path, (grad, expected) in got.items():
        assert grad is not None, f"{path}: no gradient came back"
        torch.testing.assert_close(grad, expected, msg=f"{path}: wrong gradient")


def test_user_code_run_for_a_call_to_oneself_keeps_the_context(group: Group) -> None:
    got = group.call(0, paths.check_remote_to_self_keeps_the_context)
    assert len(got) == 5
    _assert_gradients(got)


@pytest.mark.parametrize("owner", ["worker1", "worker0"])
def test_a_proxy_call_waiting_for_its_value_keeps_the_context(group: Group, owner: str) -> None:
    _assert_gradients(
        group.call(0, paths.check_proxy_waiting_for_its_value_keeps_the_context, owner)
    )
