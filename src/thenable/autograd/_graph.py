"""Walks over a worker's local autograd graph, for the distributed backward pass.

A pass starts from *targets*: tensors (the roots, the tensors a message sent) or
``GradientEdge``s (the inputs of nodes where an earlier run of the same pass stopped).  Nodes are
keyed by ``id()``; the dicts returned hold the nodes themselves, so the ids stay theirs while
the caller keeps the dict.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from thenable.autograd._torch import torch

__all__ = ("Blocked", "Region", "frontier", "leaf_of", "node_of", "unsafe_feeders", "walk")

Region = dict[int, Any]
"""Nodes by ``id()``."""


def node_of(target: Any) -> Any | None:
    """The node a target's gradient flows into: a tensor's ``grad_fn``, an edge's node; None
    for a leaf tensor (whose gradient accumulator is only reached through ``get_gradient_edge``,
    which sparse tensors do not support)."""
    if isinstance(target, torch.Tensor):
        return target.grad_fn
    return target.node


def leaf_of(node: Any) -> Any | None:
    """The leaf tensor whose gradient accumulator ``node`` is, or None."""
    return getattr(node, "variable", None)


class Blocked:
    """What waits for pending messages: the nodes their tensors reach, and the leaves among
    those (their tensors themselves, where they are leaves)."""

    def __init__(self, tensors: Iterable[Any]) -> None:
        tensors = list(tensors)
        self.nodes = walk(node_of(tensor) for tensor in tensors)
        self.leaves = {id(t) for t in tensors if t.grad_fn is None}
        self.leaves.update(
            id(leaf) for leaf in map(leaf_of, self.nodes.values()) if leaf is not None
        )
        self._tensors = tensors  # (their ids stay theirs)

    def extend(self, nodes: Iterable[Any]) -> None:
        """Hold ``nodes`` too, and what they reach."""
        self.nodes.update(walk(nodes))
        self.leaves.update(
            id(leaf) for leaf in map(leaf_of, self.nodes.values()) if leaf is not None
        )

    def __bool__(self) -> bool:
        return bool(self.nodes) or bool(self.leaves)

    def holds_node(self, node: Any) -> bool:
        if id(node) in self.nodes:
            return True
        leaf = leaf_of(node)
        return leaf is not None and id(leaf) in self.leaves

    def holds(self, target: Any) -> bool:
        """Whether ``target``'s gradient must wait."""
        node = node_of(target)
        return id(target) in self.leaves if node is None else self.holds_node(node)


def walk(starts: Iterable[Any], stop: Blocked | None = None) -> Region:
    """Every node reachable from ``starts`` (themselves included; None ignored), not entering
    the nodes ``stop`` holds."""
    region: Region = {}
    stack = [node for node in starts if node is not None]
    while stack:
        node = stack.pop()
        key = id(node)
        if key in region or (stop is not None and stop.holds_node(node)):
            continue
        region[key] = node
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return region


def frontier(region: Region, blocked: Blocked) -> list[Any]:
    """The edges from ``region``'s nodes into nodes ``blocked`` holds (each once)."""
    edges: dict[tuple[int, int], Any] = {}
    for node in region.values():
        for child, slot in node.next_functions:
            if child is not None and blocked.holds_node(child):
                edges.setdefault((id(child), slot), torch.autograd.graph.GradientEdge(child, slot))
    return list(edges.values())


def unsafe_feeders(region: Region, edges: list[Any]) -> list[Any]:
    """The nodes of ``region`` with an edge into a node that another edge's node reaches.

    A run asked for the gradient at such an edge would run the node above it to compute it
    (torch's engine captures a node's input whole, from every path), so those feeders must
    wait too.
    """
    targets = {id(edge.node) for edge in edges}
    below = walk(
        child for edge in edges for child, _ in edge.node.next_functions if child is not None
    )
    unsafe = targets & below.keys()
    if not unsafe:
        return []
    return [
        node
        for node in region.values()
        if any(child is not None and id(child) in unsafe for child, _ in node.next_functions)
    ]
