"""Finding the leaf tensors an autograd graph reaches, without running it."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def graph_leaves(roots: Iterable[Tensor], *, stop_at: Iterable[Tensor] = ()) -> list[Tensor]:
    """The leaf tensors that require grad and that a backward from ``roots`` would reach, in a
    fixed (depth-first) order, each once. With ``stop_at`` (non-leaf tensors), the backward stops
    at them: what lies only below them is not reached.

    The step needs the task heads' parameters to give them their gradient, and a user hands it
    only the shared ones: the rest are found here, by walking the graph's nodes (host-side Python,
    no device work).
    """
    # An edge into a node is (node, which of its outputs); a tensor is the edge (grad_fn, output_nr).
    # A node may have several outputs: reached by another one, it is walked through.
    stops = {(id(t.grad_fn), t.output_nr) for t in stop_at if t.grad_fn is not None}
    leaves: dict[int, Tensor] = {}
    # The visited nodes themselves, not only their ids: a node's Python object may die once
    # nothing holds it (torch builds differ), and a later node's object may then take its id.
    seen: dict[int, object] = {}
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    # Every step walks its whole graph (hundreds of nodes): the loop stays lean.
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        if type(node).__name__ == "AccumulateGrad":
            leaf = leaf_of(node)
            leaves.setdefault(id(leaf), leaf)
            continue
        for child, output in reversed(node.next_functions):
            if child is not None and not (stops and (id(child), output) in stops):
                stack.append(child)
    return list(leaves.values())


def depends_on(tensor: Tensor, others: Iterable[Tensor]) -> bool:
    """Whether a backward from ``tensor`` would reach any of ``others`` (non-leaf tensors)."""
    targets = {(id(t.grad_fn), t.output_nr) for t in others if t.grad_fn is not None}
    seen: dict[int, object] = {}
    stack = [tensor.grad_fn] if tensor.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        for child, output in node.next_functions:
            if (id(child), output) in targets:
                return True
            if child is not None:
                stack.append(child)
    return False


def leaf_of(node) -> Tensor:
    """The leaf tensor of an AccumulateGrad node; an error, not a silently missing head, where the
    node does not hand it out."""
    variable = getattr(node, "variable", None)
    if variable is None:
        raise RuntimeError(
            "this torch build's autograd graph does not expose its leaf tensors (AccumulateGrad.variable): "
            "the parameters outside the shared ones cannot be found"
        )
    return variable
