"""Trace parts and the merged timeline: one process's events in, one Chrome trace out.

A *part* is what one process recorded: its events (``recorder``'s tuples, as lists), the names
of its threads, who it is (worker name, rank, host, boot id) and clock samples against the
process that merges (each ``[local_ns, offset_ns, rtt_ns]``: local time + offset = the merging
process's time, measured over one round trip of ``rtt_ns``).  A part travels as a dict (over RPC)
or as a *part file*: JSON lines appended as the trace goes (a header, then thread, event and
clock lines, then an end line), so a process that crashes leaves everything flushed so far, and
a truncated last line is skipped.

``merge`` turns parts into one trace in the Chrome trace event format (the JSON object form,
which Perfetto and chrome://tracing open): a process per part, a track per thread, flow arrows
from each call to its handler and back.  Clocks: parts from the merging host share its clock
(``CLOCK_MONOTONIC``, the same boot) and are not shifted; the others are shifted by their
samples (interpolated linearly between the first and the last when they differ by more than
their round trips' uncertainty, else the shortest round trip's), then by the least constant that
puts every flow's end at or after its start (the arrows' causality bounds what the samples'
round trips leave uncertain).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from thenable._tracing import recorder as _recorder

__all__ = [
    "PART_FORMAT",
    "PartFile",
    "describe_process",
    "make_part",
    "merge",
    "read_part",
    "write_trace",
]

PART_FORMAT = "thenable-trace-part/1"

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def _boot_id() -> str:
    """This host's boot id (Linux): processes with the same one share ``CLOCK_MONOTONIC``."""
    try:
        return Path(_BOOT_ID_PATH).read_text().strip()
    except OSError:
        return ""


def describe_process(label: str | None = None, rank: int | None = None) -> dict[str, Any]:
    """Who this process is, for a part's header."""
    pid = os.getpid()
    return {
        "label": label if label is not None else f"process {pid}",
        "rank": rank,
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
    }


def make_part(
    process: dict[str, Any],
    capture: _recorder.Capture,
    drained: Iterable[tuple[_recorder.ThreadEvents, list[_recorder.Event]]],
    clock: list[list[int]] | None = None,
) -> dict[str, Any]:
    """A part from a stopped capture and what was drained from it."""
    threads: dict[str, str] = {}
    events: list[list[Any]] = []
    for thread, batch in drained:
        threads[str(thread.tid)] = thread.name
        events.extend([*event, thread.tid] for event in batch)
    return {
        "format": PART_FORMAT,
        "process": process,
        "threads": threads,
        "events": events,
        "start_ns": capture.start_ns,
        "stop_ns": capture.stop_ns,
        "overflowed": sorted(capture.overflowed),
        "clock": clock or [],
        "complete": True,
    }


class PartFile:
    """A part written as it is recorded: JSON lines, flushed after every batch."""

    def __init__(self, path: str | os.PathLike[str], process: dict[str, Any]) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        self._threads: set[int] = set()
        self._line({"format": PART_FORMAT, "process": process})

    def _line(self, obj: object) -> None:
        if self._file is not None:
            self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def write(
        self, drained: Iterable[tuple[_recorder.ThreadEvents, list[_recorder.Event]]]
    ) -> None:
        """Append drained events (and the names of threads not seen before); flush."""
        if self._file is None:
            return
        for thread, batch in drained:
            if thread.tid not in self._threads:
                self._threads.add(thread.tid)
                self._line({"thread": [thread.tid, thread.name]})
            tid = thread.tid
            self._file.writelines(
                json.dumps([*event, tid], separators=(",", ":")) + "\n" for event in batch
            )
        self._file.flush()

    def relabel(self, process: dict[str, Any]) -> None:
        """Append a new header for this process (it became an RPC worker): the last wins."""
        self._line({"process": process})

    def clock(self, sample: list[int]) -> None:
        """Append one clock sample (see the module docstring)."""
        self._line({"clock": sample})

    def close(self, capture: _recorder.Capture) -> None:
        """Write the end line and close (idempotent)."""
        if self._file is None:
            return
        end = {
            "start_ns": capture.start_ns,
            "stop_ns": capture.stop_ns,
            "overflowed": sorted(capture.overflowed),
        }
        self._line({"end": end})
        self._file.close()
        self._file = None


def read_part(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a part file; a part whose process died mid-trace has ``complete`` False.

    Raises:
        ValueError: the file is not a thenable trace part.
    """
    part: dict[str, Any] = {
        "threads": {},
        "events": [],
        "clock": [],
        "start_ns": None,
        "stop_ns": None,
        "overflowed": [],
        "complete": False,
    }
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if number == 0:
                    raise ValueError(f"{path} is not a thenable trace part") from None
                break  # the line being written when the process died
            if number == 0:
                if not isinstance(obj, dict) or obj.get("format") != PART_FORMAT:
                    raise ValueError(f"{path} is not a thenable trace part ({PART_FORMAT})")
                part["format"] = PART_FORMAT
                part["process"] = obj["process"]
            elif isinstance(obj, list):
                part["events"].append(obj)
            elif "thread" in obj:
                tid, name = obj["thread"]
                part["threads"][str(tid)] = name
            elif "clock" in obj:
                part["clock"].append(obj["clock"])
            elif "process" in obj:
                part["process"] = obj["process"]
            elif "end" in obj:
                part.update(obj["end"])
                part["complete"] = True
    return part


class _Clock:
    """One part's mapping from its clock to the merging process's."""

    def __init__(self, part: dict[str, Any], reference: dict[str, Any]) -> None:
        own = part["process"].get("boot_id")
        self.exact = bool(own) and own == reference["process"].get("boot_id")
        samples = sorted(part.get("clock") or [])
        if len(samples) > 1:
            first, last = samples[0], samples[-1]
            if abs(last[1] - first[1]) <= (first[2] + last[2]) / 2:
                # No drift measurable beyond the round trips' uncertainty: one offset, that of
                # the shortest round trip (a line through two noisy ends would tilt the whole
                # part, which no constant shift below could straighten).
                samples = [min(samples, key=lambda sample: sample[2])]
        self.samples: list[list[int]] = [] if self.exact else samples
        self.method = "same host clock" if self.exact else ("rpc" if samples else "none")
        self.correction = 0  # set by _order_flows

    def __call__(self, ts: int) -> int:
        samples = self.samples
        if not samples:
            return ts + self.correction
        first, last = samples[0], samples[-1]
        if len(samples) == 1 or ts <= first[0]:
            offset = first[1]
        elif ts >= last[0]:
            offset = last[1]
        else:
            fraction = (ts - first[0]) / (last[0] - first[0])
            offset = round(first[1] + (last[1] - first[1]) * fraction)
        return ts + offset + self.correction

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"method": self.method, "correction_us": self.correction / 1000}
        if self.samples:
            info["offset_us"] = [round(s[1] / 1000, 3) for s in self.samples]
            info["rtt_us"] = [round(s[2] / 1000, 3) for s in self.samples]
        return info


def _order_flows(clocks: list[_Clock], ends: dict[Any, dict[str, tuple[int, int]]]) -> None:
    """Shift the estimated clocks by the least constants that put every flow's end at or
    after its start (difference constraints, relaxed as Bellman-Ford does)."""
    need: dict[tuple[int, int], int] = {}  # (from part, to part) -> least shift of "to" over "from"
    for flow in ends.values():
        if "s" in flow and "f" in flow:
            (a, ts_a), (b, ts_b) = flow["s"], flow["f"]
            if a != b:
                gap = ts_a - ts_b
                if gap > need.get((a, b), -(1 << 62)):
                    need[(a, b)] = gap
    for _ in range(len(clocks) + 1):
        moved = False
        for (a, b), gap in need.items():
            if clocks[b].correction - clocks[a].correction >= gap:
                continue
            if not clocks[b].exact:
                clocks[b].correction = clocks[a].correction + gap
                moved = True
            elif not clocks[a].exact:
                clocks[a].correction = clocks[b].correction - gap
                moved = True
        if not moved:
            return


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One Chrome trace from parts; the first part's process is the clock reference."""
    if not parts:
        raise ValueError("merge() needs at least one trace part")
    reference = parts[0]
    clocks = [_Clock(part, reference) for part in parts]
    # Flow ends, aligned by the samples.
    ends: dict[Any, dict[str, tuple[int, int]]] = {}
    for index, part in enumerate(parts):
        clock = clocks[index]
        for recorded in part["events"]:
            phase = recorded[0]
            if phase == "s" or phase == "f":
                key = _flow_key(index, recorded[4])
                ends.setdefault(key, {})[phase] = (index, clock(recorded[3]))
    _order_flows(clocks, ends)
    # Arrows with one end only (the other fell before the trace started, or out of a full
    # buffer) are left out: a viewer could not draw them.
    whole = {key for key, flow in ends.items() if len(flow) == 2}

    pids = [part["process"]["pid"] for part in parts]
    if len(set(pids)) != len(pids):  # processes of several hosts: number them instead
        pids = list(range(1, len(parts) + 1))
    # Time 0 is the earliest start (or event: a part of a process that died has no start).
    starts = [clocks[i](p["start_ns"]) for i, p in enumerate(parts) if p.get("start_ns")]
    firsts = [clocks[i](min(e[3] for e in p["events"])) for i, p in enumerate(parts) if p["events"]]
    origin = min(starts + firsts, default=0)
    flow_ids: dict[Any, int] = {}
    out: list[dict[str, Any]] = []
    for index, part in enumerate(parts):
        process, pid, clock = part["process"], pids[index], clocks[index]
        rank = process.get("rank")
        out.append(_meta("process_name", pid, 0, {"name": process["label"]}))
        sort = rank if isinstance(rank, int) else 1_000_000 + index
        out.append(_meta("process_sort_index", pid, 0, {"sort_index": sort}))
        for tid, name in part["threads"].items():
            out.append(_meta("thread_name", pid, int(tid), {"name": name}))
        for phase, name, category, ts, value, args, tid in part["events"]:
            begin = clock(ts)
            event: dict[str, Any] = {
                "ph": phase,
                "name": name,
                "cat": category,
                "ts": round((begin - origin) / 1000, 3),
                "pid": pid,
                "tid": tid,
            }
            if phase == "X":  # (its end mapped too: drift must not break the nesting)
                event["dur"] = round((clock(ts + value) - begin) / 1000, 3)
            elif phase == "i":
                event["s"] = "t"
            else:
                key = _flow_key(index, value)
                if key not in whole:
                    continue
                event["id"] = flow_ids.setdefault(key, len(flow_ids) + 1)
                event["bp"] = "e"
            if args:
                event["args"] = args
            out.append(event)
    return {
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "otherData": {
            "generator": "thenable.trace",
            "processes": [
                {
                    **part["process"],
                    "clock": clocks[index].describe(),
                    "complete": part.get("complete", True),
                    "overflowed_threads": part.get("overflowed", []),
                }
                for index, part in enumerate(parts)
            ],
        },
    }


def _flow_key(part_index: int, flow_id: int) -> Any:
    """Which arrow a flow end belongs to: fork arrows (odd ids, counted per process) stay
    within their part; RPC arrows (even ids, from the caller's rank) join parts."""
    return (part_index, flow_id) if flow_id % 2 else flow_id


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"ph": "M", "name": name, "pid": pid, "tid": tid, "args": args}


def write_trace(trace: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a merged trace as JSON (atomically: a reader never sees half a file)."""
    target = Path(path)
    if target.parent and not target.parent.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    with partial.open("w", encoding="utf-8") as file:
        json.dump(trace, file, separators=(",", ":"))
    partial.replace(target)
    return target
