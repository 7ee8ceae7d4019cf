"""Received tensors never share memory that anything else writes: not the sender's tensor
(written right after the call), not a buffer of the transport reused for later messages, not
another received tensor.  Over same-host shared memory and over TCP, for requests, replies,
@async_execution replies and calls to oneself, at every size class of the transport."""

from __future__ import annotations

import _compat_fns as compat
import _remote_fns as fns
import pytest
from conftest import GroupFactory


@pytest.mark.parametrize("same_host_ipc", [True, False], ids=["shared-memory", "tcp"])
def test_received_tensors_own_their_memory(make_group: GroupFactory, same_host_ipc: bool) -> None:
    pytest.importorskip("torch")
    group = make_group(2)
    group.init_all(fns.init_worker, same_host_ipc=same_host_ipc)
    out = group.call(0, compat.check_received_tensors_own_their_memory, timeout=120)
    # Rounds x sizes x (plain, async) x (to worker1, to itself): worker0 keeps every reply and
    # what it sent itself, worker1 what worker0 sent it.
    calls = 2 * len(compat.TENSOR_SIZES) * 2 * 2
    assert out["worker0"] == {"kept": calls + calls // 2, "changed": 0, "overlapping": 0}
    assert out["worker1"] == {"kept": calls // 2, "changed": 0, "overlapping": 0}
    group.call_all(fns.shutdown_worker)
    group.close()
