"""The README's demo: the seed examples run and print what PyTorch's documentation says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_seed_futures_example_prints_documented_output() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed_futures.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = completed.stdout
    for line in [
        "RPC return value is 5.",
        "Chained cb done. None",
        "This will run after the future has finished.",
        "ValueError: foo",
        "fut0 result = 0",
        "fut1 result = 1",
        "[0, 1, 4, 9, 16]",
    ]:
        assert line + "\n" in out
    assert completed.stderr == ""


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's second command must stay the one .ci/run calls."""
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m ")]
    assert len(commands) >= 2
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def _launch(script: str, *args: str, workers: int = 3) -> list[str]:
    """Run an example under ``thenable launch``; its output lines (the run must succeed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    command = [sys.executable, "-m", "thenable", "launch", "-n", str(workers)]
    completed = subprocess.run(
        [*command, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout.splitlines()


def test_parameter_server_example_trains_every_trainer() -> None:
    """The batch-updating parameter server (one @async_execution update per step)."""
    pytest.importorskip("torch")
    lines = _launch("parameter_server.py", "--steps", "15")
    assert "[0] ps: 15 steps; loss fell tenfold on every trainer: True" in lines, lines
    for rank in (1, 2):
        [line] = [line for line in lines if line.startswith(f"[{rank}] trainer{rank}: loss")]
        first, last = (float(x) for x in re.findall(r"\d+\.\d+", line))
        assert last < first / 10, line


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "one-by-one"])
def test_observers_agent_example_learns(batch: bool) -> None:
    """The agent with observers, batched with @async_execution or answering each at once."""
    pytest.importorskip("torch")
    lines = _launch("observers_agent.py", "--episodes", "15", *([] if batch else ["--no-batch"]))
    episodes = [line for line in lines if re.fullmatch(r"\[0\] episode \d+: reward .*", line)]
    assert len(episodes) == 15, lines
    [summary] = [line for line in lines if "mean reward of the first 5" in line]
    first, last = (float(x) for x in re.findall(r"\d+\.\d", summary))
    assert last > first + 2 and last >= 17, summary
