"""The linear layers of an autograd graph whose weight the graph uses nowhere else, found
without running it.

``F.linear`` (``nn.Linear``, ``nn.MultiheadAttention``'s projections) builds Y = X Wᵀ as a matrix
product of the input, flattened to ``[N, in]``, and ``W.t()``: an ``AddmmBackward0`` (with a bias)
or ``MmBackward0`` node whose second matrix comes from a ``TBackward0`` of W's ``AccumulateGrad``.
Such a layer's task gradients are D_iᵀ X, so its share of the Gram matrix can be formed from X,
which the node keeps, and the gradient D reaching the node (:mod:`.linear_gram`), while the
backward leaves W out. That holds only where this product is W's one use: a weight used again
(tied to an embedding, a layer applied twice) has a gradient summed over its uses, whose Gram
matrix has cross terms between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from torch import Tensor

from .autograd_graph import leaf_of

#: The products ``F.linear`` builds: which of the node's inputs is ``W.t()``, and the saved input X.
_PRODUCTS = {"AddmmBackward0": (2, "_saved_mat1"), "MmBackward0": (1, "_saved_self")}


class LinearLayer(NamedTuple):
    """A product X Wᵀ of the graph: its backward node and the attribute holding X."""

    node: Any
    input_name: str

    def inputs(self) -> Tensor:
        """X, ``[N, in]``, as the node saved it."""
        return getattr(self.node, self.input_name)

    def scale(self) -> float:
        """The factor on the layer's Gram matrix: the square of addmm's α (1 for F.linear)."""
        return float(getattr(self.node, "_saved_alpha", 1)) ** 2


def sole_linear_layers(roots: Iterable[Tensor], params: Sequence[Tensor]) -> dict[int, LinearLayer]:
    """The position in ``params`` of each weight whose only use in the graph of ``roots`` is one
    linear product, and that product's layer. Where a backward from ``roots`` to the other
    params would not run the product's node (nothing but the weight lies below it), the weight
    is not taken: no gradient would reach the node without it.
    """
    graph = _Graph(roots)
    position = {id(p): k for k, p in enumerate(params)}
    candidates: dict[int, LinearLayer] = {}
    kept = []
    for accumulator in graph.accumulators:
        k = position.get(id(leaf_of(accumulator)))
        if k is None:
            continue
        layer = _sole_product_of(graph, accumulator)
        if layer is None:
            kept.append(accumulator)
        else:
            candidates[k] = layer
    running = graph.reaching(kept)
    return {k: layer for k, layer in candidates.items() if id(layer.node) in running}


class _Graph:
    """The nodes a backward from ``roots`` could run, each with the edges into it."""

    def __init__(self, roots: Iterable[Tensor]):
        # The nodes themselves are held, not only their ids (see graph_leaves).
        self.nodes: dict[int, Any] = {}
        self.parents: dict[int, list[tuple[Any, int]]] = {}
        stack = [root.grad_fn for root in roots if root.grad_fn is not None]
        while stack:
            node = stack.pop()
            if id(node) in self.nodes:
                continue
            self.nodes[id(node)] = node
            for slot, (child, _) in enumerate(node.next_functions):
                if child is not None:
                    self.parents.setdefault(id(child), []).append((node, slot))
                    stack.append(child)
        self.accumulators = [node for node in self.nodes.values() if _name(node) == "AccumulateGrad"]

    def only_parent(self, node: Any) -> tuple[Any, int] | None:
        """The one node using ``node``'s output, and at which of its inputs; None for another count."""
        edges = self.parents.get(id(node), [])
        return edges[0] if len(edges) == 1 else None

    def reaching(self, targets: Iterable[Any]) -> set[int]:
        """The ids of the nodes from which some path leads to one of ``targets``."""
        found: set[int] = set()
        stack = list(targets)
        while stack:
            node = stack.pop()
            if id(node) in found:
                continue
            found.add(id(node))
            stack.extend(parent for parent, _ in self.parents.get(id(node), []))
        return found


def _sole_product_of(graph: _Graph, accumulator: Any) -> LinearLayer | None:
    """The linear product that is the one use of the weight behind ``accumulator``, if it is one."""
    transpose = graph.only_parent(accumulator)
    if transpose is None or _name(transpose[0]) != "TBackward0":
        return None
    product = graph.only_parent(transpose[0])
    if product is None or _name(product[0]) not in _PRODUCTS:
        return None
    weight_slot, input_name = _PRODUCTS[_name(product[0])]
    return LinearLayer(product[0], input_name) if product[1] == weight_slot else None


def _name(node: Any) -> str:
    return type(node).__name__
