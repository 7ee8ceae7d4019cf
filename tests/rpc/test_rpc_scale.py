"""32 workers on this machine: all start, each calls every other one, all shut down cleanly.

The workers import only thenable and the test helpers (no numpy, no torch), so starting them is
cheap even on a 2-core CI machine.
"""

from __future__ import annotations

import time

import _remote_fns as fns
from conftest import GroupFactory

WORLD = 32
BUDGET_S = 90.0


def test_32_workers_call_each_other_and_shut_down(make_group: GroupFactory) -> None:
    start = time.monotonic()
    group = make_group(WORLD)
    group.init_all(fns.init_worker, rpc_timeout=60.0, timeout=BUDGET_S)
    answers = group.call_all(fns.call_everyone, timeout=BUDGET_S)
    for rank, names in enumerate(answers):
        assert names == [f"worker{r}" for r in range(WORLD) if r != rank], rank
    group.call_all(fns.shutdown_worker, timeout=BUDGET_S)
    assert group.call_all(fns.thenable_threads_left) == [[]] * WORLD
    assert group.call_all(fns.loaded_modules, "numpy", "torch") == [[]] * WORLD
    group.close()
    elapsed = time.monotonic() - start
    assert elapsed < BUDGET_S, f"took {elapsed:.1f} s"
