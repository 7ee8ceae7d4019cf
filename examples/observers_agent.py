"""An agent and its observers on thenable.rpc: reinforcement learning, written as torch RPC
programs are.

Worker 0 is the agent: it holds the policy and creates one ``Observer`` on every other worker
with ``rpc.remote``.  Each observer has an environment of its own and, at every step, asks the
agent for an action with ``rpc_sync(agent_rref.owner(), ...)``:

- batched (the default): ``Agent.select_action_batch`` is ``@rpc.functions.async_execution``.
  It stores the observer's state and returns a Future; once every observer has sent its state,
  the agent runs the policy once on the whole batch and completes the Future, whose ``then``
  children hand each observer its action.  No server thread waits in between.
- ``--no-batch``: ``Agent.select_action`` answers each observer at once, through the
  ``_call_method`` helper of torch's examples (``rref.local_value()`` on the owner).

After each episode the agent trains the policy with REINFORCE on what the observers report.
The environment is a small corridor (no gym needed): moving right is rewarded, and the
reward per episode rises as the policy learns.  Needs torch.

Run:  thenable launch -n 3 examples/observers_agent.py [--episodes 30] [--no-batch]
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn, optim
from torch.distributions import Categorical

import thenable.futures
from thenable import rpc

STEPS = 20


class Corridor:
    """A walk along cells 0..length: action 1 moves right (reward 1), 0 moves left (reward
    0); reaching the right end starts again from the middle."""

    def __init__(self, length: int = 10) -> None:
        self.length = length
        self.position = length // 2

    def reset(self) -> torch.Tensor:
        self.position = self.length // 2
        return self.state()

    def state(self) -> torch.Tensor:
        x = self.position / self.length
        return torch.tensor([x, 1.0 - x, 1.0, 0.0])

    def step(self, action: int) -> tuple[torch.Tensor, float]:
        if action == 1:
            self.position += 1
        else:
            self.position = max(0, self.position - 1)
        reward = float(action == 1)
        if self.position >= self.length:
            self.position = self.length // 2
        return self.state(), reward


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(x), dim=-1)


def _call_method(method: Callable[..., Any], rref: rpc.RRef[Any], *args: Any) -> Any:
    """On the owner of ``rref``: ``method(rref.local_value(), *args)``."""
    return method(rref.local_value(), *args)


def _remote_method(method: Callable[..., Any], rref: rpc.RRef[Any], *args: Any) -> Any:
    """Call ``method`` on the value of ``rref``, where it lives."""
    return rpc.rpc_sync(rref.owner(), _call_method, args=(method, rref, *args))


class Observer:
    """One environment, stepped with the agent's actions."""

    def __init__(self, batch: bool) -> None:
        self.id = rpc.get_worker_info().id - 1
        self.env = Corridor()
        self.batch = batch

    def run_episode(self, agent_rref: rpc.RRef[Agent], steps: int) -> tuple[torch.Tensor, float]:
        """Step the environment ``steps`` times; return the discounted returns and the total
        reward."""
        state = self.env.reset()
        rewards = torch.zeros(steps)
        for step in range(steps):
            if self.batch:
                action = rpc.rpc_sync(
                    agent_rref.owner(),
                    Agent.select_action_batch,
                    args=(agent_rref, self.id, state),
                )
            else:
                action = _remote_method(Agent.select_action, agent_rref, self.id, state)
            state, reward = self.env.step(action)
            rewards[step] = reward
        total = float(rewards.sum())
        returns = torch.zeros(steps)
        running = 0.0
        for step in reversed(range(steps)):
            running = float(rewards[step]) + 0.9 * running
            returns[step] = running
        return returns, total


class Agent:
    """The policy, its optimizer and the observers it drives."""

    def __init__(self, world_size: int, batch: bool) -> None:
        torch.manual_seed(0)
        self.policy = Policy()
        self.optimizer = optim.Adam(self.policy.parameters(), lr=0.02)
        self.agent_rref = rpc.RRef(self)
        self.batch = batch
        self.ob_rrefs = [
            rpc.remote(f"observer{rank}", Observer, args=(batch,)) for rank in range(1, world_size)
        ]
        self.lock = threading.Lock()
        self.states = torch.zeros(len(self.ob_rrefs), 4)
        self.pending = len(self.ob_rrefs)
        self.future_actions: thenable.futures.Future[torch.Tensor] = thenable.futures.Future()
        self.log_probs: list[torch.Tensor] = []  # batched: one row per step
        self.own_log_probs: dict[int, list[torch.Tensor]] = {}  # per observer

    @staticmethod
    @rpc.functions.async_execution
    def select_action_batch(
        agent_rref: rpc.RRef[Agent], observer: int, state: torch.Tensor
    ) -> thenable.futures.Future[int]:
        """Answered once every observer has sent its state: one policy call for all."""
        self = agent_rref.local_value()
        with self.lock:
            self.states[observer] = state
            action = self.future_actions.then(lambda done: int(done.value()[observer]))
            self.pending -= 1
            if self.pending == 0:
                self.pending = len(self.ob_rrefs)
                # A copy goes into the graph: the next step writes self.states again.
                distribution = Categorical(self.policy(self.states.clone()))
                actions = distribution.sample()
                self.log_probs.append(distribution.log_prob(actions))
                ready, self.future_actions = self.future_actions, thenable.futures.Future()
                ready.set_result(actions)
        return action

    def select_action(self, observer: int, state: torch.Tensor) -> int:
        """Answered at once, for one observer."""
        distribution = Categorical(self.policy(state))
        action = distribution.sample()
        with self.lock:
            self.own_log_probs.setdefault(observer, []).append(distribution.log_prob(action))
        return int(action)

    def run_episode(self, steps: int) -> float:
        """One episode on every observer, then one policy update; the mean total reward."""
        futures = [ob.rpc_async().run_episode(self.agent_rref, steps) for ob in self.ob_rrefs]
        results = thenable.futures.wait_all(futures)
        returns = torch.stack([r for r, _ in results])  # (observers, steps)
        if self.batch:
            log_probs = torch.stack(self.log_probs).t()
        else:
            log_probs = torch.stack(
                [torch.stack(self.own_log_probs[i]) for i in range(len(self.ob_rrefs))]
            )
        advantage = (returns - returns.mean()) / (returns.std() + 1e-6)
        loss = -(log_probs * advantage).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.log_probs, self.own_log_probs = [], {}
        return sum(total for _, total in results) / len(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--no-batch", dest="batch", action="store_false")
    options = parser.parse_args()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if rank == 0:
        rpc.init_rpc("agent", rank=rank, world_size=world_size)
        agent = Agent(world_size, options.batch)
        rewards = []
        for episode in range(options.episodes):
            rewards.append(agent.run_episode(STEPS))
            print(f"episode {episode}: reward {rewards[-1]:.1f} of {STEPS}", flush=True)
        first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
        print(f"agent: mean reward of the first 5 episodes {first:.1f}, of the last 5 {last:.1f}")
    else:
        rpc.init_rpc(f"observer{rank}", rank=rank, world_size=world_size)
    rpc.shutdown()


if __name__ == "__main__":
    main()
