"""Property: after any ``MTLStep.backward`` that raises or skips, every ``.grad`` is what it was
before the call (where there was none, there is none, or zeros after a skip); after one that
does neither, every ``.grad`` is finite. Over random small models (dense and sparse-gradient
heads, a shared parameter without elements), storage dtypes, modes, existing gradients, hooks
that put inf or NaN into a forward value or a gradient, loss scales that overflow float16 or
float32's squares, and custom weightings that return bad shapes, bad dtypes, non-finite or
huge weights, or raise."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional

from emtl_kernels import MTLStep, Weighting


class Spike(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``value`` (inf or NaN)."""

    @staticmethod
    def forward(ctx, tensor, value):
        ctx.value = value
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


class CustomWeights(Weighting):
    """A user's weighting gone wrong in one of several ways."""

    gram_use = "diagonal"

    def __init__(self, kind: str):
        self.kind = kind

    def weights(self, losses, gram):
        num_tasks = losses.numel()
        if self.kind == "raises":
            raise RuntimeError("weighting failed")
        return {
            "wrong shape": lambda: torch.ones(num_tasks + 1),
            "integers": lambda: torch.ones(num_tasks, dtype=torch.int64),
            "nan": lambda: torch.full((num_tasks,), math.nan),
            "inf": lambda: torch.full((num_tasks,), math.inf),
            "huge": lambda: torch.full((num_tasks,), 1e36),
        }[self.kind]()


WEIGHTINGS = ["equal", "emtl", "gradnorm_scaling", "upgrad", "raises", "wrong shape", "integers", "nan", "inf", "huge"]
FAULTS = [None, "nan forward", "inf into the trunk", "nan into the trunk", "inf into a head", "nan into a head"]


class RandomMultiTask(nn.Module):
    def __init__(self, widths, sparse_heads, empty_shared, dtype, fault, fault_task, loss_scale):
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip([3, *widths[:-1]], widths, strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        self.trunk = nn.Sequential(*layers).to(dtype)
        self.empty = nn.Parameter(torch.zeros(0, dtype=dtype)) if empty_shared else None
        self.heads = nn.ModuleList(
            (nn.Embedding(4, widths[-1], sparse=True) if sparse else nn.Linear(widths[-1], 1)).to(dtype)
            for sparse in sparse_heads
        )
        self.dtype, self.fault, self.fault_task, self.loss_scale = dtype, fault, fault_task, loss_scale

    def shared(self):
        return [*self.trunk.parameters(), *([] if self.empty is None else [self.empty])]

    def losses(self):
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(5, 3, generator=generator).to(self.dtype)
        ids = torch.randint(0, 4, (5,), generator=generator)
        features = self.trunk(inputs)
        if self.empty is not None:
            features = features + self.empty.sum()
        losses = []
        for i, head in enumerate(self.heads):
            faulty = i == self.fault_task and self.fault is not None
            value = math.nan if faulty and "nan" in self.fault else math.inf
            inputs_i = Spike.apply(features, value) if faulty and "trunk" in self.fault else features
            if isinstance(head, nn.Embedding):
                weight = Spike.apply(head.weight, value) if faulty and "head" in self.fault else head.weight
                out = (inputs_i * functional.embedding(ids, weight, sparse=True)).sum(-1)
            else:
                weight = Spike.apply(head.weight, value) if faulty and "head" in self.fault else head.weight
                out = functional.linear(inputs_i, weight, head.bias).squeeze(-1)
            if faulty and self.fault == "nan forward":
                out = out * math.nan
            losses.append(self.loss_scale * (out.float() - i).square().mean())
        return losses


@st.composite
def scenarios(draw):
    num_tasks = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    model = RandomMultiTask(
        widths=draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)),
        sparse_heads=draw(st.lists(st.booleans(), min_size=num_tasks, max_size=num_tasks)),
        empty_shared=draw(st.booleans()),
        dtype=dtype,
        fault=draw(st.sampled_from(FAULTS)),
        fault_task=draw(st.integers(0, num_tasks - 1)),
        loss_scale=draw(st.sampled_from([1.0, 3e4, 1e21])),
    )
    for p in model.parameters():
        if draw(st.booleans()):
            p.grad = (torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5).to(p.dtype)
    options = draw(st.sampled_from(["speed", "memory", "batched", "norm_params"]))
    return {
        "model": model,
        "weighting": draw(st.sampled_from(WEIGHTINGS)),
        "options": options,
        "head_gradients": draw(st.sampled_from(["weighted", "unweighted"])),
    }


def make_step(model, weighting, options, head_gradients):
    kwargs = {
        "speed": {},
        "memory": {"mode": "memory"},
        "batched": {"batched_backward": True},
        "norm_params": {"norm_params": list(model.trunk[-2].parameters())},
    }[options]
    chosen = weighting if weighting in ("equal", "emtl", "gradnorm_scaling", "upgrad") else CustomWeights(weighting)
    return MTLStep(model.shared(), chosen, head_gradients=head_gradients, **kwargs)


def expected_errors(model, weighting, options) -> tuple[type[Exception], ...]:
    errors: tuple[type[Exception], ...] = ()
    if weighting in ("raises", "wrong shape", "integers"):
        errors += (RuntimeError, ValueError, TypeError)
    if options == "batched" and any(isinstance(head, nn.Embedding) for head in model.heads):
        errors += (NotImplementedError,)
    return errors


def dense(tensor):
    return tensor.to_dense() if tensor.is_sparse else tensor


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_a_step_that_raises_or_skips_leaves_every_grad_as_it_was(scenario):
    model = scenario["model"]
    params = list(model.parameters())
    before = [None if p.grad is None else p.grad.clone() for p in params]
    step = make_step(model, scenario["weighting"], scenario["options"], scenario["head_gradients"])
    try:
        step.backward(model.losses())
    except expected_errors(model, scenario["weighting"], scenario["options"]):
        event("raised")
        for p, b in zip(params, before, strict=True):
            assert (p.grad is None) if b is None else torch.equal(dense(p.grad), dense(b))
        assert step.last is None and step.num_tasks is None
        return
    event(f"skipped: {step.last.why_skipped()}" if bool(step.last.skipped) else "stepped")
    if bool(step.last.skipped):
        assert step.last.skip_reasons.any()
        for p, b in zip(params, before, strict=True):
            if b is None:
                assert p.grad is None or torch.count_nonzero(dense(p.grad)) == 0
            else:
                assert torch.equal(dense(p.grad), dense(b))
    else:
        assert not step.last.skip_reasons.any()
        for p in params:
            assert p.grad is None or torch.isfinite(dense(p.grad)).all()


@pytest.mark.parametrize("fault", [f for f in FAULTS if f is not None])
def test_every_fault_of_the_property_test_is_caught(fault):
    """The faults the property test injects do reach a gradient: each one skips the step."""
    model = RandomMultiTask([3], [False, True], False, torch.float32, fault, 1, 1.0)
    step = MTLStep(model.shared(), "equal")
    step.backward(model.losses())
    assert bool(step.last.skipped)
