"""Forked tasks run under the forking thread's torch state: an ensemble, no_grad, a profiler.

An ensemble of small models evaluates one batch: each member is forked, and each member forks
its own sub-task (a second head over its hidden features), so the work runs two fork levels
deep on thenable's interop threads.  The program checks what ``torch.jit.fork`` guarantees:

1. under ``torch.no_grad()`` every task, nested ones included, runs with grad disabled, and no
   output requires grad;
2. under ``torch.profiler.profile()`` (and the legacy ``torch.autograd.profiler.profile()``)
   every linear layer of every task is recorded, though the tasks ran on other threads;
3. after both, a task forked in the default state runs with grad enabled again: the workers'
   own state was put back.

It prints each check and exits with status 1 if one fails.  Needs torch.

Run:  python examples/fork_state.py [--members 4]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import thenable

FEATURES = 16
HIDDEN = 32
BATCH = 8


class Member(nn.Module):
    """One ensemble member: a body, then two heads, the second one forked."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.body = nn.Linear(FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)
        self.aux = nn.Linear(HIDDEN, 1)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)

    def forward(self, x: torch.Tensor, seen: list[tuple[str, bool]]) -> torch.Tensor:
        seen.append(("member", torch.is_grad_enabled()))
        hidden = torch.relu(self.body(x))
        aux = thenable.fork(self._aux, hidden, seen)  # the nested fork
        return self.head(hidden) + thenable.wait(aux)

    def _aux(self, hidden: torch.Tensor, seen: list[tuple[str, bool]]) -> torch.Tensor:
        seen.append(("sub-task", torch.is_grad_enabled()))
        return self.aux(hidden)


def evaluate(
    members: list[Member], x: torch.Tensor, seen: list[tuple[str, bool]]
) -> list[torch.Tensor]:
    """Each member's prediction, each member forked (the ensemble's is their mean)."""
    futures = [thenable.fork(member, x, seen) for member in members]
    return [thenable.wait(f) for f in futures]


def linear_events(prof: Any) -> int:
    """How many linear layers the profile recorded."""
    return sum(event.count for event in prof.key_averages() if event.key == "aten::linear")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--members", type=int, default=4, help="ensemble size (default 4)")
    args = parser.parse_args(argv)
    members = [Member(seed) for seed in range(args.members)]
    x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(0))
    tasks = 2 * args.members  # a member and its sub-task each
    failed: list[str] = []

    def check(what: str, ok: bool) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failed.append(what)

    seen: list[tuple[str, bool]] = []
    with torch.no_grad():
        outputs = evaluate(members, x, seen)
    grad_off = sum(not enabled for _, enabled in seen)
    check(f"no_grad: {grad_off} of {tasks} tasks ran with grad off", grad_off == tasks)
    plain = sum(not out.requires_grad for out in outputs)
    check(f"no_grad: {plain} of {len(outputs)} outputs need no grad", plain == len(outputs))

    # Each member runs two linear layers (body, head), its sub-task one (aux).
    expected = 3 * args.members
    profilers: list[tuple[str, Callable[[], Any]]] = [
        ("torch.profiler.profile", torch.profiler.profile),
        ("torch.autograd.profiler.profile", torch.autograd.profiler.profile),
    ]
    for name, profile in profilers:
        with profile() as prof:
            evaluate(members, x, [])
        recorded = linear_events(prof)
        check(f"{name}: {recorded} of {expected} linear layers recorded", recorded == expected)

    seen = []
    outputs = evaluate(members, x, seen)
    grad_on = sum(enabled for _, enabled in seen)
    check(f"afterwards: {grad_on} of {tasks} tasks ran with grad on", grad_on == tasks)
    tracked = sum(out.requires_grad for out in outputs)
    check(f"afterwards: {tracked} of {len(outputs)} outputs require grad", tracked == len(outputs))

    if failed:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
