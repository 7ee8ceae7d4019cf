"""thenable.trace in one process: the spans of fork/wait and callbacks, the file, the merge.

The RPC side (three workers, one merged file, clocks) is in test_trace_rpc.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import thenable
from _trace_schema import check_trace
from thenable._future import Future
from thenable._pool import InteropPool
from thenable._tracing import recorder as _recorder
from thenable._tracing import trace_file as _trace_file
from thenable._tracing import trace_hooks as _trace_hooks


def spans(trace: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"].startswith(prefix)]


def flows(trace: dict[str, Any]) -> dict[int, dict[str, dict[str, Any]]]:
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for event in trace["traceEvents"]:
        if event["ph"] in ("s", "f"):
            out.setdefault(event["id"], {})[event["ph"]] = event
    return out


def enclosing(trace: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The innermost span around a flow end."""
    around = [
        s
        for s in spans(trace)
        if (s["pid"], s["tid"]) == (point["pid"], point["tid"])
        and s["ts"] <= point["ts"] <= s["ts"] + s["dur"]
    ]
    assert around, point
    return min(around, key=lambda s: s["dur"])


def double(x: int) -> int:
    time.sleep(0.005)
    return 2 * x


def test_fork_then_and_wait_are_recorded_as_spans_with_arrows(tmp_path: Path) -> None:
    path = tmp_path / "step.json"
    with thenable.trace(path) as recording:
        futures = [thenable.fork(double, i) for i in range(3)]
        chained = futures[0].then(lambda f: f.value() + 1)
        seen: list[int] = []
        futures[1].add_done_callback(lambda f: seen.append(f.value()))
        assert [thenable.wait(f) for f in futures] == [0, 2, 4]
        assert chained.wait() == 1
    trace = json.loads(path.read_text())
    assert trace == recording.result
    check_trace(trace)
    assert len(spans(trace, "fork double")) == 3
    tasks = spans(trace, "task double")
    assert len(tasks) == 3 and all(t["args"]["queued_us"] >= 0 for t in tasks)
    assert all(t["dur"] >= 5000 for t in tasks)  # (the 5 ms sleep, in microseconds)
    assert len(spans(trace, "then ")) == 1 and len(spans(trace, "callback ")) == 1
    assert spans(trace, "wait")
    # Every fork has its arrow, from the fork's span to its task's span.
    arrows = flows(trace)
    assert len(arrows) == 3
    for ends in arrows.values():
        assert enclosing(trace, ends["s"])["name"] == "fork double"
        assert enclosing(trace, ends["f"])["name"] == "task double"
        assert ends["f"]["ts"] >= ends["s"]["ts"]
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert "MainThread" in names


def test_tracing_off_leaves_the_untraced_methods_in_place() -> None:
    """Off is free: outside a trace, Future and the pool run exactly their untraced code."""
    untraced = (Future.then, Future.add_done_callback, Future._block, InteropPool._submit)
    with thenable.trace():
        assert _recorder.recording and _trace_hooks.installed()
        assert Future.then is not untraced[0]
    assert not _recorder.recording and not _trace_hooks.installed()
    assert (Future.then, Future.add_done_callback, Future._block, InteropPool._submit) == untraced
    # Nothing is recorded without a trace, and a callback wrapped during one runs plainly after.
    pending: Future[int] = Future()
    with thenable.trace() as recording:
        child = pending.then(lambda f: f.value() * 3)
    pending.set_result(2)
    assert child.wait() == 6
    assert not spans(recording.result or {}, "then")


def test_a_second_trace_in_the_same_process_is_refused() -> None:
    with thenable.trace(), pytest.raises(RuntimeError, match="already recording"):
        thenable.trace().start()
    with thenable.trace():  # and the first one's end frees the way
        pass


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(TypeError, match="file path"):
        thenable.trace(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1 event"):
        thenable.trace(buffer_events=0)


def test_failures_keep_their_meaning_while_tracing() -> None:
    def boom(f: Future[int]) -> int:
        raise KeyError("no such key")

    with thenable.trace() as recording:
        failed = thenable.fork(int, "not a number")
        with pytest.raises(ValueError, match="not a number"):
            thenable.wait(failed)
        child = Future[int]()
        grandchild = child.then(boom)
        child.set_result(1)
        with pytest.raises(KeyError):
            grandchild.wait()
        with pytest.raises(TypeError, match="callable"):
            child.then(42)  # type: ignore[arg-type]
        with pytest.raises(TimeoutError):
            Future[int]().wait(0.001)
    raised = [s for s in spans(recording.result or {}, "then ") if s["name"].endswith(".boom")]
    assert len(raised) == 1  # (recorded although it raised)


def test_a_full_buffer_keeps_the_newest_events_and_says_so() -> None:
    done = Future[int]()
    done.set_result(1)
    with thenable.trace(buffer_events=10) as recording:
        for _ in range(100):
            done.then(lambda f: f.value())
    trace = recording.result
    assert trace is not None
    assert len(spans(trace, "then")) == 10
    (process,) = trace["otherData"]["processes"]
    assert process["overflowed_threads"] == ["MainThread"]


def test_threads_started_during_the_trace_get_their_own_tracks() -> None:
    def work() -> None:
        done = Future[None]()
        done.add_done_callback(lambda f: None)
        done.set_result(None)

    with thenable.trace() as recording:
        threads = [threading.Thread(target=work, name=f"worker-{i}") for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    trace = recording.result
    assert trace is not None
    check_trace(trace)
    tracks = {e["tid"] for e in spans(trace, "callback")}
    assert len(tracks) == 3
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert {"worker-0", "worker-1", "worker-2"} <= names


# -- merging ----------------------------------------------------------------------------------


def part(
    label: str, rank: int, events: list[list[Any]], clock: list[list[int]], boot: str
) -> dict[str, Any]:
    return {
        "process": {"label": label, "rank": rank, "pid": 100 + rank, "host": "h", "boot_id": boot},
        "threads": {"1": "main"},
        "events": events,
        "start_ns": events[0][3],
        "stop_ns": events[-1][3],
        "clock": clock,
    }


def call(ts: int, dur: int, flow: int, phase: str) -> list[list[Any]]:
    """A span with a flow end in its middle, as part events."""
    return [
        ["X", "span", "rpc", ts, dur, None, 1],
        [phase, "rpc", "rpc", ts + dur // 2, flow, None, 1],
    ]


def test_merge_shifts_other_hosts_clocks_by_their_samples() -> None:
    # Worker 1's clock reads 1 s (1e9 ns) behind worker 0's; the sample says so exactly.
    offset = 1_000_000_000
    zero = part("w0", 0, call(5_000, 1_000, 4, "s"), [], "boot-a")
    one = part("w1", 1, call(5_000 - offset + 2_000, 1_000, 4, "f"), [[0, offset, 100]], "boot-b")
    trace = _trace_file.merge([zero, one])
    check_trace(trace)
    start, end = flows(trace)[1]["s"], flows(trace)[1]["f"]
    assert end["ts"] - start["ts"] == pytest.approx(2.0)  # microseconds: the true 2 us
    assert trace["otherData"]["processes"][1]["clock"]["method"] == "rpc"


def test_merge_interpolates_drift_between_the_first_and_last_samples() -> None:
    samples = [[0, 1_000, 10], [1_000_000, 3_000, 10]]  # the offset grows by 2 us over 1 ms
    zero = part("w0", 0, call(100, 10, 4, "s") + call(503_000, 10, 8, "f"), [], "a")
    events = call(0, 10, 4, "f") + call(500_000, 10, 8, "s")
    one = part("w1", 1, events, samples, "b")
    trace = _trace_file.merge([zero, one])
    assert trace["otherData"]["processes"][1]["clock"]["correction_us"] == 0
    for ends in flows(trace).values():
        assert ends["f"]["ts"] >= ends["s"]["ts"]
    # The mid-trace span of worker 1 (at 500 us local) moved by the interpolated 2 us.
    moved = [e for e in spans(trace) if e["pid"] == 101 and e["ts"] > 100]
    assert moved[0]["ts"] == pytest.approx((500_000 + 2_000 - 100) / 1000)


def test_merge_puts_every_flow_end_after_its_start_when_samples_are_off() -> None:
    # The sample's estimate is 50 us off (a lopsided round trip): the arrows bound it.
    zero = part("w0", 0, call(10_000, 1_000, 4, "s") + call(30_000, 1_000, 8, "f"), [], "a")
    one = part(
        "w1", 1, call(8_000, 1_000, 4, "f") + call(9_000, 500, 8, "s"), [[0, -50_000, 1]], "b"
    )
    trace = _trace_file.merge([zero, one])
    check_trace(trace)
    for ends in flows(trace).values():
        assert ends["f"]["ts"] >= ends["s"]["ts"]
    assert trace["otherData"]["processes"][1]["clock"]["correction_us"] > 0


def test_merge_never_shifts_a_process_that_shares_the_clock() -> None:
    zero = part("w0", 0, call(1_000, 100, 4, "s"), [], "same")
    one = part("w1", 1, call(1_500, 100, 4, "f"), [[0, 999_999, 1]], "same")
    trace = _trace_file.merge([zero, one])
    assert trace["otherData"]["processes"][1]["clock"]["method"] == "same host clock"
    start, end = flows(trace)[1]["s"], flows(trace)[1]["f"]
    assert end["ts"] - start["ts"] == pytest.approx(0.5)


def test_merge_drops_arrows_with_one_end() -> None:
    zero = part("w0", 0, call(1_000, 100, 4, "s") + call(2_000, 100, 12, "s"), [], "a")
    one = part("w1", 1, call(1_500, 100, 4, "f"), [], "a")
    trace = _trace_file.merge([zero, one])
    assert len(flows(trace)) == 1
    check_trace(trace)


def test_merge_needs_a_part() -> None:
    with pytest.raises(ValueError, match="at least one"):
        _trace_file.merge([])


def test_a_part_file_is_read_back_up_to_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "p.part.jsonl"
    path.write_text(
        json.dumps({"format": _trace_file.PART_FORMAT, "process": {"label": "x", "pid": 1}})
        + "\n"
        + json.dumps({"thread": [7, "main"]})
        + "\n"
        + json.dumps(["X", "a", "fork", 10, 5, None, 7])
        + "\n"
        + '["X", "b", "fo'
    )
    read = _trace_file.read_part(path)
    assert read["events"] == [["X", "a", "fork", 10, 5, None, 7]]
    assert read["threads"] == {"7": "main"} and not read["complete"]
    (tmp_path / "bad.part.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="not a thenable trace part"):
        _trace_file.read_part(tmp_path / "bad.part.jsonl")


# -- THENABLE_TRACE ---------------------------------------------------------------------------

_PROGRAM = """
import os, pathlib, signal, sys, time
import thenable

def square(x):
    return x * x

results = [thenable.wait(thenable.fork(square, i)) for i in range(5)]
assert results == [0, 1, 4, 9, 16]
if sys.argv[1] == "crash":
    # Killed once the periodic flush has written the tasks (it runs every second).
    (part,) = pathlib.Path(os.environ["THENABLE_TRACE"]).glob("*.part.jsonl")
    deadline = time.monotonic() + 30
    while part.read_text().count('"task square"') < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
"""


_THENABLE = (sys.executable, "-m", "thenable")


def run_program(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "program.py"
    script.write_text(_PROGRAM)
    env = {**os.environ, "THENABLE_TRACE": str(tmp_path / "traces")}
    return subprocess.run(
        [sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_environment_traces_a_whole_process_into_its_directory(tmp_path: Path) -> None:
    done = run_program(tmp_path, "exit")
    assert done.returncode == 0, done.stderr
    (merged,) = (tmp_path / "traces").glob("trace-*.json")
    trace = json.loads(merged.read_text())
    check_trace(trace)
    assert len(spans(trace, "task square")) == 5
    (part_file,) = (tmp_path / "traces").glob("*.part.jsonl")
    assert _trace_file.read_part(part_file)["complete"]


def test_a_crashed_process_keeps_what_was_flushed(tmp_path: Path) -> None:
    done = run_program(tmp_path, "crash")
    assert done.returncode == -signal.SIGKILL
    directory = tmp_path / "traces"
    assert not list(directory.glob("trace-*.json"))
    merged = subprocess.run(
        [sys.executable, "-m", "thenable", "trace", "merge", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert merged.returncode == 0, merged.stderr
    assert "ended early" in merged.stdout
    trace = json.loads((directory / "trace.json").read_text())
    check_trace(trace)
    assert len(spans(trace, "task square")) == 5
    assert trace["otherData"]["processes"][0]["complete"] is False


def test_trace_merge_says_what_is_wrong(tmp_path: Path) -> None:
    empty = subprocess.run(
        [sys.executable, "-m", "thenable", "trace", "merge", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert empty.returncode == 2 and "no trace parts" in empty.stderr


def test_trace_plot_draws_a_picture(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with thenable.trace(tmp_path / "t.json"):
        thenable.wait(thenable.fork(double, 1))
    done = subprocess.run(
        [*_THENABLE, "trace", "plot", str(tmp_path / "t.json"), "-o", str(tmp_path / "t.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
