"""The training examples (distributed autograd, DistributedOptimizer, RemoteModule) run under
``thenable launch`` and train: the loss they report at the end is well below the first one."""

from __future__ import annotations

import re

import pytest

from test_examples import _launch


@pytest.mark.parametrize(
    ("script", "workers"),
    [
        ("train_pipeline.py", 3),
        ("train_ddp_embedding.py", 4),
        ("train_rnn.py", 2),
        ("train_parameter_server.py", 3),
    ],
)
def test_training_example_trains(script: str, workers: int) -> None:
    lines = _launch(script, workers=workers)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    trained = [m for line in lines if (m := re.search(r"trained: loss ([\d.]+) -> ([\d.]+)", line))]
    assert len(trained) == 1, "\n".join(lines)
    first, last = (float(v) for v in trained[0].groups())
    assert last < 0.7 * first, f"{script}: loss {first} -> {last}"
