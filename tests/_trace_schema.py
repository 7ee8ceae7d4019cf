"""What a merged trace must be for Perfetto's JSON importer and chrome://tracing to take it.

``check_trace`` validates a trace against a JSON Schema of the Chrome trace event format's
object form, for the event phases thenable writes (complete spans ``X``, instants ``i``, flow
ends ``s``/``f``, metadata ``M``), then checks what a schema cannot: every flow has exactly one
start and one end, each inside a span of its thread, the end not before the start, and every
span on a thread either nests in or follows the previous one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jsonschema

_COMMON = {
    "name": {"type": "string", "minLength": 1},
    "cat": {"type": "string"},
    "pid": {"type": "integer", "minimum": 0},
    "tid": {"type": "integer", "minimum": 0},
    "ts": {"type": "number", "minimum": 0},
    "args": {"type": "object"},
}


def _phase(phase: str, required: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "if": {"properties": {"ph": {"const": phase}}, "required": ["ph"]},
        "then": {
            "required": ["ph", "name", "pid", "tid", *required],
            "properties": {**_COMMON, **extra},
        },
    }


CHROME_TRACE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["traceEvents"],
    "properties": {
        "traceEvents": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["ph"],
                "properties": {"ph": {"enum": ["X", "i", "s", "f", "M"]}},
                "allOf": [
                    _phase("X", ["ts", "dur", "cat"], dur={"type": "number", "minimum": 0}),
                    _phase("i", ["ts", "cat", "s"], s={"enum": ["g", "p", "t"]}),
                    _phase("s", ["ts", "cat", "id"], id={"type": ["integer", "string"]}),
                    _phase(
                        "f",
                        ["ts", "cat", "id"],
                        id={"type": ["integer", "string"]},
                        bp={"const": "e"},
                    ),
                    {
                        "if": {"properties": {"ph": {"const": "M"}}, "required": ["ph"]},
                        "then": {
                            "required": ["name", "pid", "args"],
                            "properties": {
                                "name": {
                                    "enum": [
                                        "process_name",
                                        "process_sort_index",
                                        "thread_name",
                                        "thread_sort_index",
                                    ]
                                },
                                "args": {
                                    "type": "object",
                                    "anyOf": [
                                        {
                                            "required": ["name"],
                                            "properties": {"name": {"type": "string"}},
                                        },
                                        {
                                            "required": ["sort_index"],
                                            "properties": {"sort_index": {"type": "integer"}},
                                        },
                                    ],
                                },
                            },
                        },
                    },
                ],
            },
        },
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object"},
    },
}


def check_trace(trace: dict[str, Any]) -> None:
    """Raise AssertionError (or jsonschema's ValidationError) if ``trace`` is not valid."""
    jsonschema.validate(trace, CHROME_TRACE_SCHEMA)
    events = trace["traceEvents"]
    spans: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    flows: dict[Any, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for event in events:
        if event["ph"] == "X":
            spans[(event["pid"], event["tid"])].append((event["ts"], event["ts"] + event["dur"]))
        elif event["ph"] in ("s", "f"):
            flows[(event["cat"], event["id"])][event["ph"]].append(event)
    for key, ends in flows.items():
        assert len(ends["s"]) == 1 and len(ends["f"]) == 1, f"flow {key}: {dict(ends)}"
        start, end = ends["s"][0], ends["f"][0]
        assert end["ts"] >= start["ts"], f"flow {key} ends before it starts: {start} {end}"
        for point in (start, end):
            thread = spans[(point["pid"], point["tid"])]
            assert any(a <= point["ts"] <= b for a, b in thread), (
                f"flow end outside a span: {point}"
            )
    for key, thread in spans.items():
        open_spans: list[float] = []  # ends of the spans enclosing the current one
        for begin, finish in sorted(thread, key=lambda span: (span[0], -span[1])):
            while open_spans and open_spans[-1] <= begin:
                open_spans.pop()
            # (timestamps are rounded to the nanosecond: allow that much)
            assert not open_spans or finish <= open_spans[-1] + 0.002, (
                f"spans of thread {key} overlap without nesting at {begin}"
            )
            open_spans.append(finish)
