"""The training examples (distributed autograd, DistributedOptimizer, RemoteModule) learn.

Each runs under ``thenable launch`` and ends with ``trained: loss A -> B``; B must be well
below A, and no worker may print a traceback.
"""

from __future__ import annotations

import re

import pytest

from test_examples import _launch

_TRAINED = re.compile(r"\[\d+\] trained: loss (\d+\.\d+) -> (\d+\.\d+)\b.*")


def _assert_trained(lines: list[str], margin: float = 0.7) -> tuple[float, float]:
    """The first and last loss of the run's summary line, after checking that it learned."""
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    summaries = [m for m in map(_TRAINED.fullmatch, lines) if m is not None]
    assert len(summaries) == 1, "\n".join(lines)
    first, last = float(summaries[0][1]), float(summaries[0][2])
    assert last < margin * first, summaries[0][0]
    return first, last


def _losses(lines: list[str], pattern: str) -> list[float]:
    return [float(m[1]) for m in map(re.compile(pattern).fullmatch, lines) if m is not None]


def test_train_pipeline_learns() -> None:
    """Two stages behind rpc.remote, micro-batches pipelined with rpc_async."""
    lines = _launch("train_pipeline.py", "--steps", "20", workers=3)
    assert len(_losses(lines, r"\[0\] step \d+: loss (\d+\.\d+)")) == 20, lines
    _assert_trained(lines, margin=0.5)


def test_train_pipeline_checkpoint_learns_with_local_gradients() -> None:
    """Checkpointed stages (a deque shared by a recompute and a checkpoint Function) whose two
    outputs' gradients reach the trunk by two ways: its Checkpoint node runs once, with their
    sum, so the gradients equal the local model's and each micro-batch is recomputed once."""
    lines = _launch("train_pipeline_checkpoint.py", "--steps", "15", workers=3)
    assert len(_losses(lines, r"\[0\] step \d+: loss (\d+\.\d+)")) == 15, lines
    assert not any("check failed" in line for line in lines), lines
    assert "[0] checks passed: gradients equal the local model's, one recompute each" in lines, (
        lines
    )
    _assert_trained(lines, margin=0.5)


def test_train_rnn_learns() -> None:
    """Embedding and decoder on the parameter server, the LSTM local."""
    lines = _launch("train_rnn.py", "--epochs", "6", workers=2)
    assert len(_losses(lines, r"\[0\] epoch \d+: loss (\d+\.\d+)")) == 6, lines
    _assert_trained(lines, margin=0.5)


def test_train_parameter_server_learns() -> None:
    """Two trainers train the server's model at once, each with its own optimizer."""
    lines = _launch("train_parameter_server.py", "--epochs", "8", workers=3)
    for rank in (1, 2):
        losses = _losses(lines, rf"\[{rank}\] trainer{rank} epoch \d+: loss (\d+\.\d+)")
        assert len(losses) == 8, lines
        assert losses[-1] < 0.7 * losses[0], losses
    _assert_trained(lines)


@pytest.fixture(scope="module")
def ddp_embedding_run() -> list[str]:
    return _launch("train_ddp_embedding.py", "--epochs", "5", workers=4)


def test_train_ddp_embedding_learns(ddp_embedding_run: list[str]) -> None:
    """A RemoteModule embedding on the server, then a local layer under DDP on each trainer."""
    lines = ddp_embedding_run
    for trainer, rank in ((0, 2), (1, 3)):
        losses = _losses(lines, rf"\[{rank}\] trainer{trainer} epoch \d+: loss (\d+\.\d+)")
        assert len(losses) == 5, lines
    _assert_trained(lines)


def test_train_ddp_embedding_keeps_replicas_in_sync(ddp_embedding_run: list[str]) -> None:
    """DDP averages the local layer's gradients, so both replicas end up equal."""
    assert "[0] local layer replicas in sync: True" in ddp_embedding_run, ddp_embedding_run
