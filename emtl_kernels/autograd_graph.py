"""Finding the leaf tensors an autograd graph reaches, without running it."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def graph_leaves(roots: Iterable[Tensor]) -> list[Tensor]:
    """The leaf tensors that require grad and that a backward from ``roots`` would reach, in a
    fixed (depth-first) order, each once.

    The step needs the task heads' parameters to give them their gradient, and a user hands it
    only the shared ones: the rest are found here, by walking the graph's nodes (host-side Python,
    no device work).
    """
    leaves: dict[int, Tensor] = {}
    # The visited nodes themselves, not only their ids: a node's Python object may die once
    # nothing holds it (torch builds differ), and a later node's object may then take its id.
    seen: dict[int, object] = {}
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        if type(node).__name__ == "AccumulateGrad":
            leaf = _leaf_of(node)
            leaves.setdefault(id(leaf), leaf)
        stack.extend(child for child, _ in reversed(node.next_functions) if child is not None)
    return list(leaves.values())


def _leaf_of(node) -> Tensor:
    """The leaf tensor of an AccumulateGrad node; an error, not a silently missing head, where the
    node does not hand it out."""
    variable = getattr(node, "variable", None)
    if variable is None:
        raise RuntimeError(
            "this torch build's autograd graph does not expose its leaf tensors (AccumulateGrad.variable): "
            "the parameters outside the shared ones cannot be found"
        )
    return variable
