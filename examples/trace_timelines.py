"""Run the tutorials' examples traced, and draw each merged timeline for the documentation.

Each example runs under ``thenable launch -n 3`` with ``THENABLE_TRACE`` set: every worker
records, rank 0 merges the job into one trace at shutdown, and ``thenable trace plot`` draws
it.  The traces themselves (``<out>/<example>/trace.json``) open in ui.perfetto.dev.

    python3 examples/trace_timelines.py            # writes docs/img/timeline-*.png
    python3 examples/trace_timelines.py --out /tmp/timelines
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (picture name, script, its arguments, the milliseconds drawn: the run's end, past start-up)
RUNS = [
    ("parameter-server", "parameter_server.py", ["--steps", "10"], 40.0),
    ("batched-rl", "observers_agent.py", ["--episodes", "3"], 60.0),
    ("pipeline", "train_pipeline.py", ["--steps", "5"], 150.0),
]


def run_traced(script: str, args: list[str], directory: Path) -> Path:
    """Run ``script`` as 3 traced workers; return the merged trace."""
    env = {**os.environ, "THENABLE_TRACE": str(directory)}
    command = [sys.executable, "-m", "thenable", "launch", "-n", "3", str(HERE / script), *args]
    subprocess.run(command, env=env, check=True, timeout=600)
    return directory / "trace.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "img"), help="pictures here")
    options = parser.parse_args()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="thenable-timelines-"))
    try:
        for name, script, args, last_ms in RUNS:
            trace = run_traced(script, args, scratch / name)
            picture = out / f"timeline-{name}.png"
            title = f"{script} {' '.join(args)}: its last {last_ms:.0f} ms, 3 workers"
            plot = [sys.executable, "-m", "thenable", "trace", "plot", str(trace)]
            window = ["--last-ms", str(last_ms)]
            subprocess.run([*plot, "-o", str(picture), "--title", title, *window], check=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
