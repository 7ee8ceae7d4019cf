"""The README's demo: the seed examples run and print what PyTorch's documentation says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
