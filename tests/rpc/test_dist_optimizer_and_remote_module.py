"""DistributedOptimizer (thenable.optim) and RemoteModule (thenable.nn): a model spread over
workers trains exactly as the same model does in one process."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import _autograd_fns as ag
import pytest
import torch
from _harness import Failure, Group

GROUP_SIZE = 4


def _assert_same(pairs: list[tuple[Any, Any]]) -> None:
    assert pairs
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_distributed_optimizer_steps_as_a_local_optimizer(group: Group, optimizer: str) -> None:
    out = group.call(0, ag.check_optimizer, optimizer, 4)
    _assert_same(out["remote"])
    _assert_same(out["head"])
    assert out["dot_grads"] == [[None] * 4, [None] * 4]  # gradients stay in the context
    not_rrefs: Failure = out["not_rrefs"]
    assert not_rrefs.type_name == "builtins.TypeError"
    assert "params_rref must be a list of RRefs" in not_rrefs.message
    bad_kwargs: Failure = out["bad_kwargs"]  # raised by the owners' optimizer class
    assert "builtins.RuntimeError" in bad_kwargs.bases and "bogus" in bad_kwargs.message


def test_remote_module(group: Group) -> None:
    out = group.call(0, ag.check_remote_module)
    _assert_same(out["trained"])
    _assert_same([out["forward_elsewhere"]])
    assert out["module_rref_owner"] == "worker1"
    for name, failure in out["unsupported"].items():
        assert failure.type_name == "builtins.ValueError"
        assert failure.message == f"Method ``{name}`` not supported for RemoteModule"
    assert "Please use ``remote_parameters`` instead" in out["parameters"].message
    assert out["pickle"].type_name == "builtins.RuntimeError"
    assert "RemoteModule can only be pickled when using RPC" in out["pickle"].message
    for key in ("bad_device", "no_worker"):
        assert out[key].type_name == "builtins.ValueError"
        assert "Could not parse remote_device" in out[key].message
    if out["cuda"] is not None:
        assert "builtins.RuntimeError" in out["cuda"].bases
        assert "has no CUDA device" in out["cuda"].message
    assert "module_cls must make an nn.Module" in out["not_a_module"].message
    assert "Expect `module_cls(*args, **kwargs)` returns an instance of <class nn.Module>," in (
        out["not_a_module"].message
    )
    _assert_same([out["shared"]])  # a second RemoteModule on the same (trained) module


def test_without_torch_the_training_modules_say_what_to_install(tmp_path: Any) -> None:
    (tmp_path / "torch.py").write_text("raise ImportError('torch is blocked for this test')\n")
    for module in ("thenable.autograd", "thenable.optim", "thenable.nn"):
        completed = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": str(tmp_path), "PATH": ""},
            check=False,
        )
        assert completed.returncode == 1
        assert "ImportError" in completed.stderr
        assert "pip install 'thenable[torch]'" in completed.stderr


def test_optimizers_sharing_a_parameter_step_one_at_a_time(group: Group) -> None:
    """Two trainers' optimizers over one server's parameter: each step sees its own gradient
    (they overwrote each other's .grad when each optimizer had a lock of its own)."""
    value, grad = group.call(0, ag.check_two_optimizers_share_a_parameter)
    assert value == -101.0
    assert grad is None
