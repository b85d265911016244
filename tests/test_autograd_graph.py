"""graph_leaves: the leaf tensors a backward from the losses would reach, each once."""

from __future__ import annotations

import weakref

import torch

from emtl_kernels.autograd_graph import graph_leaves


def test_finds_every_parameter_of_a_multi_head_model_once():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(6))
    frozen = torch.nn.Linear(8, 8).requires_grad_(False)
    features = frozen(trunk(torch.randn(4, 8)).tanh())
    losses = [head(features).square().mean() + 0 * features.sum() for head in heads]
    found = {id(leaf) for leaf in graph_leaves(losses)}
    expected = {id(p) for p in [*trunk.parameters(), *heads.parameters()]}
    assert found == expected
    assert len(graph_leaves(losses)) == len(expected)


class Leaf:
    pass


class Node:
    """An autograd node, held by the graph; :func:`wrap` gives its Python object."""

    def __init__(self, children=(), variable=None):
        self.children, self.variable = list(children), variable


#: The live Python object of each node: as in torch builds where a node does not keep its object
#: alive, the object dies once nothing holds it, and its id is then free for another's.
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def wrap(node: Node):
    handle = _LIVE.get(id(node))
    if handle is None:
        handle = (AccumulateGrad if node.variable is not None else Function)(node)
        _LIVE[id(node)] = handle
    return handle


class Function:
    def __init__(self, node: Node):
        self.node = node

    @property
    def next_functions(self):
        return tuple((wrap(child), 0) for child in self.node.children)


class AccumulateGrad(Function):
    @property
    def variable(self):
        return self.node.variable


def test_finds_every_leaf_when_node_objects_die_after_their_visit():
    leaves = [Leaf() for _ in range(40)]
    chains = []
    for leaf in leaves:
        node = Node(variable=leaf)
        for _ in range(3):
            node = Node([node])
        chains.append(node)

    class Root:
        grad_fn = wrap(Node(chains))

    assert {id(leaf) for leaf in graph_leaves([Root()])} == {id(leaf) for leaf in leaves}
