"""Features mode, ``step.backward(losses, features=z)``, against float64 autograd: G_z is the Gram
matrix of the task gradients on the features, and the update is the gradient of Σ_i w_i L_i."""

from __future__ import annotations

import pytest
import torch
from _asserts import assert_gram_close
from multitask_models import ToyMultiTask, float64_twin, toy_batch, weighted_sum_gradients64
from torch import nn

from emtl_kernels import MTLStep, make_weighting

GRAD_TOL = dict(rtol=2e-4, atol=1e-6)
GRAM_WEIGHTINGS = [("emtl", {"lam": 0.5}), ("gradnorm_scaling", {}), ("imtl_g", {}), ("mgda", {}), ("upgrad", {})]


def features_jacobian64(model: ToyMultiTask):
    """The float64 twin's losses and J_z = [∂L_i/∂z], ``[T, numel(z)]``."""
    model64 = float64_twin(model)
    features, losses = model64.features_and_losses(*toy_batch(len(model.heads), dtype=torch.float64))
    rows = [torch.autograd.grad(loss, features, retain_graph=True)[0].reshape(-1) for loss in losses]
    return model64, losses, torch.stack(rows)


def assert_grads_close(model: nn.Module, expected: list[torch.Tensor]) -> None:
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad.double(), e, **GRAD_TOL)


def features_step(model: ToyMultiTask, step: MTLStep, **options) -> torch.Tensor:
    features, losses = model.features_and_losses(*toy_batch(len(model.heads)))
    return step.backward(losses, features=features, **options)


@pytest.mark.parametrize("weighting,options", GRAM_WEIGHTINGS)
def test_weights_come_from_the_features_gram_and_the_update_is_their_weighted_sum(weighting, options):
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), weighting, **options)
    weights = features_step(model, step)
    model64, losses64, jacobian64 = features_jacobian64(model)
    assert_gram_close(step.last.gram, jacobian64)
    loss_vector64 = torch.stack(losses64).detach()
    # The weighting's solver is checked on its own elsewhere: here, that G_z is what it was given.
    torch.testing.assert_close(weights, make_weighting(weighting, **options)(step.last.losses, step.last.gram))
    assert_grads_close(model, weighted_sum_gradients64(model64, losses64, weights))
    expected_ratios = loss_vector64 / (jacobian64.norm(dim=1) + 1e-8)
    torch.testing.assert_close(step.last.relative_contributions.double(), expected_ratios, rtol=1e-5, atol=0)
    assert not step.last.skipped


@pytest.mark.parametrize("mode", ["memory", "batched"])
def test_batched_passes_and_memory_mode_give_the_same_step(mode):
    """``mode`` and ``batched_backward`` only change how the passes through the heads run."""
    results = []
    for options in ({}, {"batched_backward": True} if mode == "batched" else {"mode": "memory"}):
        model = ToyMultiTask()
        step = MTLStep(model.trunk.parameters(), "gradnorm_scaling", **options)
        results.append((features_step(model, step), [p.grad for p in model.parameters()]))
    (weights, _), (other_weights, other_grads) = results
    torch.testing.assert_close(other_weights, weights, rtol=1e-5, atol=1e-7)
    model64 = float64_twin(ToyMultiTask())
    expected = weighted_sum_gradients64(model64, model64.losses(*toy_batch(dtype=torch.float64)), other_weights)
    for got, want in zip(other_grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL)


class TwoFeatureModel(nn.Module):
    """Two trunk outputs from one shared layer: head 0 reads the first, head 1 both, head 2 the second."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lower = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.left = nn.Linear(16, 16)
        self.right = nn.Linear(16, 8)
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(24, 1), nn.Linear(8, 1)])

    def shared_params(self):
        return [*self.lower.parameters(), *self.left.parameters(), *self.right.parameters()]

    def features_and_losses(self, inputs, targets):
        hidden = self.lower(inputs)
        low, high = self.left(hidden).tanh(), self.right(hidden).tanh()
        reads = [low, torch.cat([low, high], dim=1), high]
        return [low, high], [
            (head(read).squeeze(-1) - targets[:, i]).square().mean()
            for i, (head, read) in enumerate(zip(self.heads, reads, strict=True))
        ]


def test_several_features_are_flattened_into_one_row_per_task():
    model = TwoFeatureModel()
    step = MTLStep(model.shared_params(), "upgrad")
    features, losses = model.features_and_losses(*toy_batch())
    weights = step.backward(losses, features=features)
    model64 = float64_twin(model)
    features64, losses64 = model64.features_and_losses(*toy_batch(dtype=torch.float64))
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, features64, retain_graph=True, allow_unused=True)])
        if i == 1
        else torch.cat(
            [
                torch.zeros(f.numel(), dtype=torch.float64) if g is None else g.reshape(-1)
                for g, f in zip(
                    torch.autograd.grad(loss, features64, retain_graph=True, allow_unused=True), features64, strict=True
                )
            ]
        )
        for i, loss in enumerate(losses64)
    ]
    assert_gram_close(step.last.gram, torch.stack(rows))
    assert_grads_close(model, weighted_sum_gradients64(model64, losses64, weights))


def test_unweighted_heads_get_their_plain_task_gradients():
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), "emtl", head_gradients="unweighted")
    weights = features_step(model, step)
    model64 = float64_twin(model)
    losses64 = model64.losses(*toy_batch(dtype=torch.float64))
    heads_expected = torch.autograd.grad(sum(losses64), list(model64.heads.parameters()), retain_graph=True)
    trunk_expected = weighted_sum_gradients64(model64, losses64, weights)[: len(list(model.trunk.parameters()))]
    for p, e in zip(
        [*model.trunk.parameters(), *model.heads.parameters()], [*trunk_expected, *heads_expected], strict=True
    ):
        torch.testing.assert_close(p.grad.double(), e, **GRAD_TOL)


def test_trunk_parameters_outside_shared_params_get_the_weighted_gradient_and_grads_add_up():
    model = ToyMultiTask()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    step = MTLStep(model.trunk[2].parameters(), "gradnorm_scaling")
    weights = features_step(model, step)
    model64 = float64_twin(model)
    losses64 = model64.losses(*toy_batch(dtype=torch.float64))
    assert_grads_close(model, [g + 0.25 for g in weighted_sum_gradients64(model64, losses64, weights)])


def test_a_non_finite_loss_skips_and_writes_nothing():
    model = ToyMultiTask()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    features, losses = model.features_and_losses(*toy_batch())
    losses[1] = losses[1] * float("nan")
    step = MTLStep(model.trunk.parameters(), "emtl")
    weights = step.backward(losses, features=features)
    assert bool(step.last.skipped) and "loss" in step.last.why_skipped()
    assert torch.equal(weights, torch.zeros(3))
    assert all(bool((p.grad == 7.0).all()) for p in model.parameters())


def test_an_inf_gradient_on_the_features_skips_for_its_norm():
    model = ToyMultiTask()
    features, losses = model.features_and_losses(*toy_batch())
    # Finite loss, inf gradient on the features: sqrt at 0.
    losses[0] = losses[0] + torch.sqrt(features[0, 0] - features[0, 0].detach())
    step = MTLStep(model.trunk.parameters(), "emtl")
    step.backward(losses, features=features)
    assert step.last.why_skipped() == ["sq_norm", "update"] or "sq_norm" in step.last.why_skipped()
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in model.parameters())


def bad_features_cases():
    def unreached(model, losses, features):
        return [features, model.trunk[0](toy_batch()[0])]

    def independent(model, losses, features):
        return torch.randn(32, 8, requires_grad=True) * 2

    def leaf(model, losses, features):
        return features.detach().requires_grad_()

    def detached(model, losses, features):
        return features.detach()

    return [
        ("unreached", unreached, ValueError, r"no loss reaches features\[1\]"),
        ("independent", independent, ValueError, "do not depend on any of the shared parameters"),
        ("leaf", leaf, ValueError, r"features\[0\] has no autograd graph"),
        ("detached", detached, ValueError, r"features\[0\] has no autograd graph"),
        ("twice", lambda model, losses, features: [features, features], ValueError, "appears twice"),
        ("empty", lambda model, losses, features: [], ValueError, "features is empty"),
    ]


@pytest.mark.parametrize("name,make,error,match", bad_features_cases(), ids=[c[0] for c in bad_features_cases()])
def test_bad_features_raise_before_anything_is_written(name, make, error, match):
    model = ToyMultiTask()
    features, losses = model.features_and_losses(*toy_batch())
    step = MTLStep(model.trunk.parameters(), "emtl")
    with pytest.raises(error, match=match):
        step.backward(losses, features=make(model, losses, features))
    assert all(p.grad is None for p in model.parameters()) and step.last is None


def test_a_feature_computed_from_another_raises():
    model = ToyMultiTask()
    inputs, _ = toy_batch()
    hidden = model.trunk[:2](inputs)
    features = model.trunk[2:](hidden)
    losses = [head(features).mean() + head.bias.mean() * hidden.mean() for head in model.heads]
    step = MTLStep(model.trunk.parameters(), "emtl")
    with pytest.raises(ValueError, match=r"features\[1\] is computed from another feature"):
        step.backward(losses, features=[hidden, features])


def test_a_loss_reaching_the_trunk_other_than_through_the_features_is_named():
    model = ToyMultiTask()
    inputs, targets = toy_batch()
    features, losses = model.features_and_losses(inputs, targets)
    losses[2] = losses[2] + model.trunk[0](inputs).mean()
    step = MTLStep(model.trunk.parameters(), "emtl")
    with pytest.raises(ValueError, match="loss 2 reaches the shared parameter of shape"):
        step.backward(losses, features=features)
    assert all(p.grad is None for p in model.parameters())


def test_features_with_norm_params_raise():
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), "emtl", norm_params=model.trunk[2].parameters())
    with pytest.raises(ValueError, match="features and norm_params"):
        features_step(model, step)


def test_a_loss_that_reaches_no_feature_keeps_weight_one_and_is_reported():
    model = ToyMultiTask()
    features, losses = model.features_and_losses(*toy_batch())
    extra = nn.Parameter(torch.ones(()))
    step = MTLStep(model.trunk.parameters(), "emtl")
    with pytest.warns(UserWarning, match="loss 3 has no path to the features"):
        weights = step.backward([*losses, extra.square()], features=features)
    assert weights[3] == 1 and step.last.zero_gradient.tolist() == [False, False, False, True]
    torch.testing.assert_close(extra.grad, torch.tensor(2.0))


def test_retain_graph_keeps_the_graph_for_a_second_backward():
    model = ToyMultiTask()
    features, losses = model.features_and_losses(*toy_batch())
    step = MTLStep(model.trunk.parameters(), "emtl")
    step.backward(losses, features=features, retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    step.backward(losses, features=features)
    for p, once in zip(model.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * once)
