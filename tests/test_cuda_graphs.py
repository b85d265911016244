"""Capture in a CUDA graph: every weighting, and a whole training step through MTLStep.

A step that reads a value on the host, or copies one from it, fails to capture; one that
branches in Python on a device value would replay the branch taken at capture. So each test
captures, changes the inputs in place, replays, and compares with an eager run on the new inputs.
"""

from __future__ import annotations

import pytest
import torch
from _weighting_cases import RANDOM_DRAWS
from multitask_models import ToyMultiTask, toy_batch

from emtl_kernels import WEIGHTINGS, MTLStep, available_backends, make_weighting, pcgrad_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Calls of a function on a side stream before its capture.
CAPTURE_WARMUP = 2


def conflicting_gram(num_tasks: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(num_tasks, 64, generator=generator)
    jacobian[1] = -0.7 * jacobian[0] + 0.3 * jacobian[1]
    return (jacobian @ jacobian.T).cuda()


def capture(function, *args) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``function(*args)`` captured after warm-up runs on a side stream, as torch.cuda.graph asks."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CAPTURE_WARMUP):
            function(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = function(*args)
    return graph, out


@pytest.mark.parametrize("name", sorted(set(WEIGHTINGS) - set(RANDOM_DRAWS) - {"krum"}))
@pytest.mark.parametrize("num_tasks", [2, 8])
def test_weighting_replays_on_new_inputs(name, num_tasks):
    """The eager twin makes the calls the captured weighting ran (two warm-up calls, then the
    replay on the new inputs), so that a stateful weighting's state moves the same way in both."""
    weighting, twin = make_weighting(name), make_weighting(name)
    losses = torch.rand(num_tasks, device="cuda") + 0.5
    gram = conflicting_gram(num_tasks, seed=0)
    for _ in range(CAPTURE_WARMUP):
        twin(losses, gram)
    graph, weights = capture(weighting, losses, gram)
    losses.copy_(torch.rand(num_tasks, device="cuda") + 0.5)
    gram.copy_(conflicting_gram(num_tasks, seed=1))
    graph.replay()
    torch.testing.assert_close(weights, twin(losses, gram), rtol=1e-4, atol=1e-6)


def test_krum_replays_on_new_inputs():
    weighting = make_weighting("krum", n_byzantine=1, n_selected=2)
    losses, gram = torch.ones(6, device="cuda"), conflicting_gram(6, seed=0)
    graph, weights = capture(weighting, losses, gram)
    gram.copy_(conflicting_gram(6, seed=2))
    graph.replay()
    torch.testing.assert_close(weights, weighting(losses, gram))


def test_pcgrad_replays_with_given_orders():
    losses = torch.ones(5, device="cuda")
    gram = conflicting_gram(5, seed=0)
    orders = torch.stack([torch.randperm(5) for _ in range(5)]).cuda()
    graph, weights = capture(lambda: pcgrad_weights(losses, gram, orders=orders))
    gram.copy_(conflicting_gram(5, seed=1))
    graph.replay()
    torch.testing.assert_close(weights, pcgrad_weights(losses, gram, orders=orders))


# Triton too: the step's autograd makes new task-gradient tensors in the graph's memory pool, whose
# tables the capture copies from pinned memory that eager calls reserved.
@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
# Equal weighting checks the values it writes (and puts them back when skipped) instead of the
# certificate from G: both ways of deciding the skip capture.
@pytest.mark.parametrize("weighting", ["emtl", "upgrad", "equal"])
# Features mode: G_z from the passes through the heads, the trunk's backward of the cotangents.
@pytest.mark.parametrize("features", [False, True], ids=["parameters", "features"])
def test_whole_training_step_replays(backend, weighting, features):
    model = ToyMultiTask().cuda()
    inputs, targets = (t.cuda() for t in toy_batch())
    if backend not in available_backends(torch.device("cuda")):
        pytest.skip(f"the {backend} backend does not run on CUDA here")
    step = MTLStep(model.trunk.parameters(), weighting, backend=backend)

    def train_step():
        model.zero_grad(set_to_none=False)
        trunk_output, losses = model.features_and_losses(inputs, targets)
        step.backward(losses, features=trunk_output if features else None)

    graph, _ = capture(train_step)
    inputs.copy_(inputs.flip(0) * 0.5)
    graph.replay()
    replayed = [p.grad.clone() for p in model.parameters()]
    train_step()
    for got, expected in zip(replayed, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
