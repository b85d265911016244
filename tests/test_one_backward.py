"""Weightings that read no gradients (equal weighting) run one backward of Σ_i w_i L_i, whatever
the mode: counted here on the trunk's backward, checked against float64 autograd."""

from __future__ import annotations

import pytest
import torch
from multitask_models import CountedTrunk, ToyMultiTask, float64_twin, toy_batch, weighted_sum_gradients64
from torch import nn

from emtl_kernels import MTLStep
from emtl_kernels.grad_writes import zero_if_

MODES = {
    "speed": {},
    "memory": {"mode": "memory"},
    "norm_params": {"norm_params": "last layer"},
    "batched": {"batched_backward": True},
    "unweighted_heads": {"head_gradients": "unweighted"},
    "features": {},
}


def step_for(model: ToyMultiTask, name: str) -> MTLStep:
    options = dict(MODES[name])
    if options.get("norm_params") == "last layer":
        options["norm_params"] = model.trunk[2].parameters()
    return MTLStep(model.trunk.parameters(), "equal", **options)


@pytest.mark.parametrize("name", list(MODES))
def test_equal_weighting_runs_one_backward_of_the_sum_in_every_mode(name):
    model = CountedTrunk()
    step = step_for(model, name)
    features, losses = model.features_and_losses(*toy_batch())
    weights = step.backward(losses, features=features if name == "features" else None)
    assert model.calls == [1]
    assert torch.equal(weights, torch.ones(3))
    model64 = float64_twin(model)
    expected = weighted_sum_gradients64(model64, model64.losses(*toy_batch(dtype=torch.float64)), weights)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad.double(), e, rtol=2e-4, atol=1e-6)
    record = step.last
    assert record.gram is None and bool(record.sq_norms.isnan().all())
    assert bool(record.relative_contributions.isnan().all()) and not bool(record.skipped)


def test_a_finite_gradient_beyond_float32_norms_does_not_skip():
    """Each element of the gradient is finite, its squared norm is not (beyond ~1.8e19 in norm)."""
    shared = nn.Parameter(torch.ones(4096))
    losses = [(shared * 1e17).sum(), (shared * 2).sum()]
    step = MTLStep([shared], "equal")
    step.backward(losses)
    assert not bool(step.last.skipped)
    torch.testing.assert_close(shared.grad, torch.full((4096,), 1e17 + 2))


def test_a_non_finite_gradient_skips_and_leaves_every_grad_as_it_was():
    shared = nn.Parameter(torch.zeros(3))
    head = nn.Parameter(torch.ones(()))
    shared.grad, head.grad = torch.full((3,), 7.0), torch.full((), 7.0)
    losses = [torch.sqrt(shared).sum() * head, shared.sum() * head]
    step = MTLStep([shared], "equal")
    weights = step.backward(losses)
    assert step.last.why_skipped() == ["update"] and torch.equal(weights, torch.zeros(2))
    assert bool((shared.grad == 7.0).all()) and head.grad == 7.0


def test_no_loss_reaching_the_shared_parameters_raises():
    shared, head = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match="no loss reaches any of the shared parameters"):
        MTLStep([shared], "equal").backward([head * 2, head * 3])
    assert shared.grad is None and head.grad is None


def test_the_update_is_written_by_autograd_as_backward_writes_it():
    """The one backward writes ``.grad`` through AccumulateGrad: the hooks that fire after a
    parameter's gradient is accumulated fire once per parameter, with the values of float64 autograd."""
    model = ToyMultiTask()
    seen: list[tuple[nn.Parameter, torch.Tensor]] = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda param: seen.append((param, param.grad.clone())))
    weights = MTLStep(model.trunk.parameters(), "equal").backward(model.losses(*toy_batch()))
    assert sorted(id(p) for p, _ in seen) == sorted(id(p) for p in model.parameters())
    model64 = float64_twin(model)
    expected = weighted_sum_gradients64(model64, model64.losses(*toy_batch(dtype=torch.float64)), weights)
    by_param = {id(p): grad for p, grad in seen}
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(by_param[id(p)].double(), e, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("head_gradients", ["weighted", "unweighted"])
def test_gradients_add_to_what_grad_holds(head_gradients):
    model = ToyMultiTask()
    held = {id(p): torch.randn_like(p) for p in model.parameters()}
    for p in model.parameters():
        p.grad = held[id(p)].clone()
    objects = {id(p): p.grad for p in model.parameters()}
    step = MTLStep(model.trunk.parameters(), "equal", head_gradients=head_gradients)
    weights = step.backward(model.losses(*toy_batch()))
    model64 = float64_twin(model)
    losses64 = model64.losses(*toy_batch(dtype=torch.float64))
    expected = weighted_sum_gradients64(model64, losses64, weights)  # w = 1: the heads' Σ_i ∇L_i alike
    for p, e in zip(model.parameters(), expected, strict=True):
        assert p.grad is objects[id(p)]  # added in place, as backward() adds
        torch.testing.assert_close(p.grad.double(), e + held[id(p)].double(), rtol=2e-4, atol=1e-6)


def test_a_skipped_step_leaves_none_as_zeros_and_values_as_they_were():
    shared = nn.Parameter(torch.zeros(5))
    kept, empty = nn.Parameter(torch.ones(())), nn.Parameter(torch.ones(()))
    kept.grad = torch.full((), 3.0)
    losses = [torch.sqrt(shared).sum() * kept * empty, shared.sum() * kept]
    MTLStep([shared], "equal").backward(losses)
    assert torch.equal(shared.grad, torch.zeros(5)) and empty.grad == 0.0 and kept.grad == 3.0


def test_a_float16_sum_that_would_overflow_skips():
    shared = nn.Parameter(torch.ones(4, dtype=torch.float16))
    shared.grad = torch.full((4,), 60000.0, dtype=torch.float16)
    step = MTLStep([shared], "equal")
    step.backward([(shared * 5000).sum(), (shared * 1000).sum()])
    assert step.last.why_skipped() == ["update"]
    assert bool((shared.grad == 60000.0).all())


class _FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward failed")


def test_a_backward_that_raises_leaves_every_grad_as_it_was():
    shared, head = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(()))
    shared.grad, head.grad = torch.full((3,), 2.0), torch.full((), 2.0)
    losses = [(_FailsInBackward.apply(shared) * head).sum(), (shared * head).sum()]
    with pytest.raises(RuntimeError, match="backward failed"):
        MTLStep([shared], "equal").backward(losses)
    assert bool((shared.grad == 2.0).all()) and head.grad == 2.0


@pytest.mark.parametrize("skip", [False, True])
def test_sparse_gradients_on_shared_parameters_are_written_as_backward_writes_them(skip):
    """No fused pass reads them on this path: a sparse gradient is added, or left out, as it is."""
    embedding = nn.Embedding(10, 4, sparse=True)
    held = torch.sparse_coo_tensor([[7]], torch.ones(1, 4), (10, 4), check_invariants=True)
    embedding.weight.grad = held.clone()
    rows = embedding(torch.tensor([1, 3, 3]))
    scale = torch.tensor(float("inf") if skip else 2.0)
    losses = [rows.sum() * scale, rows.square().sum()]
    MTLStep(embedding.parameters(), "equal").backward(losses)
    grad = embedding.weight.grad
    assert grad.is_sparse
    expected = held.to_dense()
    if not skip:
        expected[1] += 2.0 + 2 * rows.detach()[0]
        expected[3] += 2 * (2.0 + 2 * rows.detach()[1])
    torch.testing.assert_close(grad.to_dense(), expected)


@pytest.mark.parametrize("flag", [False, True])
def test_zero_if_zeroes_every_tensor_or_none(flag):
    tensors = [torch.tensor([1.0, float("nan"), float("inf")]), torch.ones(2, 3, dtype=torch.float16)[:, ::2]]
    before = [t.clone() for t in tensors]
    zero_if_(tensors, torch.tensor(flag))
    for tensor, old in zip(tensors, before, strict=True):
        expected = torch.zeros_like(old) if flag else old
        torch.testing.assert_close(tensor, expected, equal_nan=True)


def test_zero_if_passes_opcheck():
    torch.library.opcheck(zero_if_, ([torch.randn(3), torch.randn(2, 2)], torch.tensor(True)))
