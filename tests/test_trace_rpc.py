"""thenable.trace across three RPC workers: one merged file, arrows in order, and get_stats.

Each test runs ``_traced_job.py`` under ``thenable launch -n 3`` (real processes on 127.0.0.1).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _trace_schema import check_trace
from thenable._tracing import trace_file as _trace_file

_JOB = Path(__file__).with_name("_traced_job.py")


def launch(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "thenable", "launch", "-n", "3", str(_JOB), *args]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stdout + done.stderr


def by_process(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The spans of each process, by its label's worker name."""
    names = {
        e["pid"]: e["args"]["name"].split()[0]
        for e in trace["traceEvents"]
        if e["name"] == "process_name"
    }
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names.values()}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            out[names[event["pid"]]].append(event)
    return out


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["name"] == name]


def arrows(trace: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    ends: dict[int, dict[str, dict[str, Any]]] = {}
    for event in trace["traceEvents"]:
        if event["ph"] in ("s", "f"):
            ends.setdefault(event["id"], {})[event["ph"]] = event
    return [(e["s"], e["f"]) for e in ends.values()]


def innermost(trace: dict[str, Any], point: dict[str, Any]) -> str:
    around = [
        e
        for e in trace["traceEvents"]
        if e["ph"] == "X"
        and (e["pid"], e["tid"]) == (point["pid"], point["tid"])
        and e["ts"] <= point["ts"] <= e["ts"] + e["dur"]
    ]
    return str(min(around, key=lambda e: e["dur"])["name"])


def check_job_trace(trace: dict[str, Any]) -> None:
    """What every trace of _traced_job's work shows, however it was recorded."""
    check_trace(trace)  # (valid Chrome trace JSON; every arrow ends after it starts)
    spans = by_process(trace)
    assert set(spans) == {"worker0", "worker1", "worker2"}
    zero, one, two = spans["worker0"], spans["worker1"], spans["worker2"]
    # Caller: issued and sent, then the reply received; callee: the handler, then the reply.
    assert len(named(zero, "rpc add")) == 2 and len(named(zero, "reply add")) == 2
    assert len(named(one, "handle add")) == 1 and len(named(two, "handle add")) == 2
    assert named(one, "handle add_on") and named(one, "async_execution done")
    assert named(one, "rpc add") and named(one, "then add_on.<locals>.<lambda>")
    assert named(two, "handle rref_remote_create") and named(two, "handle rref_fetch_value")
    assert named(zero, "fork rpc_sync") and named(zero, "task rpc_sync")
    shm = named(zero, "shm copy")
    assert shm and shm[0]["args"]["bytes"] >= 1 << 20
    # Arrows: each request to its handler, each reply back to the caller's reply span.
    pairs = {(innermost(trace, s), innermost(trace, f)) for s, f in arrows(trace)}
    assert ("rpc add", "handle add") in pairs
    assert ("send reply", "reply add") in pairs
    assert ("rpc add_on", "handle add_on") in pairs
    assert ("send reply", "reply add_on") in pairs
    assert ("fork rpc_sync", "task rpc_sync") in pairs
    # In order: worker0 called add_on before rref_remote_create; worker1's handler of add_on ran
    # before worker2's of rref_remote_create.
    assert named(one, "handle add_on")[0]["ts"] < named(two, "handle rref_remote_create")[0]["ts"]


def test_a_trace_started_on_one_worker_records_all_three(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    launch("trace", str(path))
    trace = json.loads(path.read_text())
    check_job_trace(trace)
    processes = trace["otherData"]["processes"]
    assert [p["label"] for p in processes] == [f"worker{r} (rank {r})" for r in range(3)]
    assert all(p["clock"]["method"] == "same host clock" for p in processes)
    # The trace's own control calls (start, clock samples, collection) are not in it.
    names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert not any("_clock" in n or "_start_here" in n or "_stop_here" in n for n in names)


def test_thenable_trace_env_writes_one_merged_file_for_the_job(tmp_path: Path) -> None:
    directory = tmp_path / "traces"
    launch("env", env={"THENABLE_TRACE": str(directory)})
    trace = json.loads((directory / "trace.json").read_text())
    check_job_trace(trace)
    labels = [p["label"] for p in trace["otherData"]["processes"]]
    assert labels == [f"worker{r} (rank {r})" for r in range(3)]
    parts = [_trace_file.read_part(directory / f"worker{r}.part.jsonl") for r in range(3)]
    assert all(part["complete"] for part in parts)
    assert all(len(part["clock"]) == 2 for part in parts[1:])  # at init and at shutdown


def test_merged_clocks_keep_every_reply_after_its_request_when_estimated(tmp_path: Path) -> None:
    """As if each worker were on a host of its own: the clocks come from the RPC samples."""
    directory = tmp_path / "traces"
    launch("env", env={"THENABLE_TRACE": str(directory)})
    parts = [_trace_file.read_part(directory / f"worker{r}.part.jsonl") for r in range(3)]
    for index, part in enumerate(parts):
        part["process"]["boot_id"] = f"host-{index}"
    trace = _trace_file.merge(copy.deepcopy(parts))
    check_job_trace(trace)  # (every arrow's end at or after its start)
    clocks = [p["clock"] for p in trace["otherData"]["processes"]]
    assert [c["method"] for c in clocks] == ["same host clock", "rpc", "rpc"]
    for clock in clocks[1:]:
        # One host really: the estimated offsets are within their round trips of zero.
        for offset, rtt in zip(clock["offset_us"], clock["rtt_us"], strict=True):
            assert abs(offset) <= rtt / 2 + 1


def test_get_stats_reports_calls_handlers_and_rrefs(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    launch("stats", str(path))
    snapshots = json.loads(path.read_text())
    local, one, two = (snapshots[f"{w}_during"] for w in ("local", "worker1", "worker2"))
    assert (local["worker"], local["rank"], local["state"]) == ("worker0", 0, "running")
    assert local["calls_in_flight"] >= 1 and local["peers"]["worker1"]["calls_in_flight"] == 1
    assert local["peers"]["worker1"]["connections"] >= 1
    assert one["requests_unanswered"] >= 1  # (run by a pool thread, or inline by a reader)
    assert set(one["handlers"]) == {"size", "threads", "busy", "blocked", "idle", "queued"}
    assert two["rrefs"]["owned"] >= 1 and two["rrefs"]["forks"] >= 1
    assert set(local["shm"]) == {
        "out_segments",
        "out_bytes",
        "out_busy",
        "in_segments",
        "in_bytes",
        "in_lent",
    }
    after = snapshots["local_after"]
    assert after["calls_in_flight"] == 0 and after["send_queue_bytes"] == 0
    assert "nobody" in snapshots["unknown"]


def test_get_stats_needs_rpc() -> None:
    from thenable import rpc

    with pytest.raises(RuntimeError, match="init_rpc"):
        rpc.get_stats()


def test_the_readme_demo_traced_gives_one_valid_merged_file(tmp_path: Path) -> None:
    """The README's first command, with THENABLE_TRACE: one file Perfetto's importer takes."""
    demo = Path(__file__).parents[1] / "examples" / "async_execution.py"
    command = [sys.executable, "-m", "thenable", "launch", "-n", "3", str(demo)]
    env = {**os.environ, "THENABLE_TRACE": str(tmp_path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    trace = json.loads((tmp_path / "trace.json").read_text())
    check_trace(trace)
    assert len(trace["otherData"]["processes"]) == 3
    spans = by_process(trace)
    assert named(spans["worker1"], "async_execution done")  # (worker1 runs the async functions)
    assert named(spans["worker2"], "handle torch.add")  # (which call torch.add on worker2)
    assert arrows(trace)
