"""The layers of an autograd graph whose weight the graph uses nowhere else, found without running
it, and each one's share of the Gram matrix from what its node saved and the gradient D of its
output, without the weight's ``[T, *shape]`` task gradients.

The kinds of layer (:data:`_KINDS`), each a chain of nodes from the weight's ``AccumulateGrad``:

- a linear product: ``F.linear`` (``nn.Linear``, ``nn.MultiheadAttention``'s projections) builds
  Y = X Wᵀ as an ``AddmmBackward0`` (with a bias) or ``MmBackward0`` node whose second matrix comes
  from a ``TBackward0`` of W. Task gradients D_iᵀ X, X saved by the node (:mod:`.linear_gram`);
- an embedding: ``F.embedding`` (``nn.Embedding``, dense) is an ``EmbeddingBackward0`` node straight
  on W. Task gradients: D_i added at the saved indices (:mod:`.embedding_gram`). A sparse one is
  not taken (its gradient has no batched form: it stays where it fails by name).

A linear product may take its weight through one cast (``ToCopyBackward0``) first: autocast
multiplies a float32 weight's bfloat16 or float16 copy, cached for the forward (so a layer applied
twice shares one cast node, with two users: not taken). W's gradient is then the cast back of
D_iᵀ X, and the layer's share is formed in float32 from the saved X and D of the cast dtype: the
exact Gram matrix of D_iᵀ X, where the per-parameter path has each product rounded to that
dtype before it is widened. Autocast casts no embedding table (``embedding`` is on neither of
its lists): an embedding takes no cast.

That holds only where the layer is W's one use: a weight used again (an output projection tied
to an embedding, a layer applied twice) has a gradient summed over its uses, whose Gram matrix has
cross terms between them.

A backward that leaves W out runs a layer's node only where something below it needs a gradient;
a layer at the bottom of the graph (an embedding of the input tokens, a bias-free product of a
one-hot input) has its output gradient captured at the node instead (:attr:`SoleUseLayer.runs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

from .autograd_graph import leaf_of
from .embedding_gram import embedding_gram
from .linear_gram import linear_gram
from .task_gradients import SUPPORTED_DTYPES


@dataclass(frozen=True)
class _Kind:
    """How to find one kind of layer: the nodes from W's ``AccumulateGrad`` up to the layer's node,
    each the one user of the one before (``between``), then the layer's node names with the input
    at which W enters it; and how the layer's share of G follows from its node and D ``[T, …]``.
    ``cast_input``: for a kind that may take W through a cast, the node's saved input, which
    tells the cast's dtype and device."""

    between: tuple[str, ...]
    weight_inputs: Mapping[str, int]
    gram: Callable[[Any, Tensor, str], Tensor]
    serves: Callable[[Any], bool] = lambda node: True
    cast_input: Callable[[Any], Tensor] | None = None


def _linear_inputs(node: Any) -> Tensor:
    return node._saved_mat1 if _name(node) == "AddmmBackward0" else node._saved_self


def _linear_share(node: Any, output_grads: Tensor, backend: str) -> Tensor:
    # addmm's α scales the product, so G by its square (1 for F.linear).
    alpha = float(getattr(node, "_saved_alpha", 1))
    return alpha**2 * linear_gram(_linear_inputs(node), output_grads, backend=backend)


def _embedding_share(node: Any, output_grads: Tensor, backend: str) -> Tensor:
    # The node keeps padding_idx as an unsigned integer: "none" (-1) reads as 2⁶⁴ - 1.
    padding_idx = node._saved_padding_idx
    return embedding_gram(
        node._saved_indices,
        output_grads,
        padding_idx=padding_idx if padding_idx < node._saved_weight_sym_argsize_0 else None,
        scale_grad_by_freq=bool(node._saved_scale_grad_by_freq),
        backend=backend,
    )


_KINDS = (
    _Kind(("TBackward0",), {"AddmmBackward0": 2, "MmBackward0": 1}, _linear_share, cast_input=_linear_inputs),
    _Kind((), {"EmbeddingBackward0": 0}, _embedding_share, serves=lambda node: not node._saved_sparse),
)


class SoleUseLayer(NamedTuple):
    """A layer of the graph that is its weight's one use."""

    node: Any
    kind: _Kind
    #: Whether a backward to the other parameters and layers runs the node (else: capture its input).
    runs: bool

    def gram(self, output_grads: Tensor, backend: str) -> Tensor:
        """The layer's ``[T, T]`` float32 share of G from D, ``[T, …]``: task i's gradient of the
        layer's output in row i."""
        return self.kind.gram(self.node, output_grads, backend)


def sole_use_layers(roots: Iterable[Tensor], params: Sequence[Tensor]) -> dict[int, SoleUseLayer]:
    """The position in ``params`` of each weight whose only use in the graph of ``roots`` is one
    layer of a kind served here, and that layer."""
    graph = _Graph(roots)
    position = {id(p): k for k, p in enumerate(params)}
    found: dict[int, tuple[Any, _Kind]] = {}
    kept = []
    for accumulator in graph.accumulators:
        k = position.get(id(leaf_of(accumulator)))
        if k is None:
            continue
        layer = _sole_layer_of(graph, accumulator)
        if layer is None:
            kept.append(accumulator)
        else:
            found[k] = layer
    # A node runs where a kept parameter or another layer lies below it (captured or running,
    # that layer needs the gradient through this one).
    needing = graph.reaching(kept + [node for node, _ in found.values()])
    return {
        k: SoleUseLayer(node, kind, any(id(child) in needing for child, _ in node.next_functions if child is not None))
        for k, (node, kind) in found.items()
    }


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


def _sole_layer_of(graph: _Graph, accumulator: Any) -> tuple[Any, _Kind] | None:
    """The layer, of a kind of :data:`_KINDS`, that is the one use of the weight behind ``accumulator``."""
    for kind in _KINDS:
        node = _layer_node(graph, accumulator, kind)
        if node is not None:
            return node, kind
    return None


def _layer_node(graph: _Graph, accumulator: Any, kind: _Kind) -> Any | None:
    """The node of the ``kind`` layer that is the one use of the weight behind ``accumulator``, if any."""
    user = graph.only_parent(accumulator)
    # The saved input behind a cast tells its dtype and device (None: no cast, or none taken).
    cast_input = kind.cast_input if user is not None and _name(user[0]) == "ToCopyBackward0" else None
    if user is not None and cast_input is not None:
        user = graph.only_parent(user[0])
    for name in kind.between:
        if user is None or _name(user[0]) != name:
            return None
        user = graph.only_parent(user[0])
    if user is None or kind.weight_inputs.get(_name(user[0])) != user[1] or not kind.serves(user[0]):
        return None
    if cast_input is not None and not _casts_within(cast_input(user[0]), leaf_of(accumulator)):
        return None
    return user[0]


def _casts_within(inputs: Tensor, weight: Tensor) -> bool:
    """Whether a cast of ``weight`` to a layer of saved input ``inputs`` keeps its device and gives
    a dtype the share is formed in (a cast to float64 or to another device keeps the per-parameter
    path)."""
    return inputs.device == weight.device and inputs.dtype in SUPPORTED_DTYPES


def _name(node: Any) -> str:
    return type(node).__name__
