"""MTLStep under torch.amp.GradScaler: weights of the unscaled losses, gradients unscaled by the
scaler, and a skipped step counted as an overflow, on the CPU (GradScaler("cpu"))."""

from __future__ import annotations

import copy

import pytest
import torch
from _weighting_cases import fresh_weighting
from multitask_models import ToyMultiTask, toy_batch

from emtl_kernels import WEIGHTINGS, MTLStep, make_weighting
from emtl_kernels.amp import Unscaled, scaler_step, unscaled

SCALE = 2.0**16


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_unscaled_weighting_of_scaled_losses_gives_the_unscaled_step(name):
    """Weights and, once the scaler has divided them by S, gradients of a step on S·L equal those
    of the plain step on L. S is a power of two, so dividing by it is exact: the two differ only by
    the rounding of the scaled backward (none in float32 short of overflow or underflow)."""
    model = ToyMultiTask()
    scaled_model = copy.deepcopy(model)
    expected = MTLStep(model.trunk.parameters(), fresh_weighting(name)).backward(model.losses(*toy_batch(3)))

    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    step = MTLStep(scaled_model.trunk.parameters(), unscaled(fresh_weighting(name), scaler))
    weights = step.backward(scaler.scale(torch.stack(scaled_model.losses(*toy_batch(3)))))
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7 * float(expected.abs().max()))
    scaler.unscale_(torch.optim.SGD(scaled_model.parameters(), lr=0.1))
    for ours, theirs in zip(scaled_model.parameters(), model.parameters(), strict=True):
        assert (ours.grad - theirs.grad).norm() <= 1e-6 * theirs.grad.norm()
    torch.testing.assert_close(step.last.losses, SCALE * torch.stack(model.losses(*toy_batch(3))).detach())


def test_emtl_on_scaled_losses_without_unscaling_is_nearly_equal_weighting():
    """Why the wrapper exists: EMTL's w_i − 1 divides by the gradient norms, so a common factor S
    on the losses divides it by S (unclamped weights; float32 resolves 1 + x to 1.2e-7)."""
    model = ToyMultiTask()
    losses = torch.stack(model.losses(*toy_batch(3)))
    plain = MTLStep(model.trunk.parameters(), "emtl", lam=1.0, min_weight=None).backward(losses, retain_graph=True)
    model.zero_grad()
    scaled = MTLStep(model.trunk.parameters(), "emtl", lam=1.0, min_weight=None).backward(SCALE * losses)
    assert (plain - 1).abs().max() > 1
    torch.testing.assert_close(scaled - 1, (plain - 1) / SCALE, rtol=1e-2, atol=2.4e-7)


def test_unscaled_keeps_what_the_weighting_reads_and_a_disabled_scaler_changes_nothing():
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    weighting = unscaled("gradnorm_scaling", scaler, target="sum_norm")
    assert isinstance(weighting, Unscaled) and weighting.gram_use == "diagonal_and_total"
    assert unscaled("emtl", scaler).reads_losses and not unscaled("upgrad", scaler).reads_losses
    assert unscaled("upgrad", scaler).gram_use == "full"
    losses = torch.tensor([0.5, 2.0, 3.0])
    gram = torch.tensor([[4.0, 1.0, 0.0], [1.0, 9.0, 2.0], [0.0, 2.0, 1.0]])
    expected = make_weighting("emtl", lam=0.5)(losses, gram)
    torch.testing.assert_close(unscaled("emtl", scaler, lam=0.5)(losses, gram), expected)


def float16_autocast_losses(model: ToyMultiTask, batch) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.float16):
        return torch.stack(model.losses(*batch))


def train_with_backward(model, batches, scaler):
    """The reference: GradScaler's own loop around sum(losses).backward()."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scales = []
    for batch in batches:
        optimizer.zero_grad()
        scaler.scale(float16_autocast_losses(model, batch).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def train_with_step(model, batches, scaler):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = MTLStep(model.trunk.parameters(), unscaled("equal", scaler))
    scales, skipped = [], []
    for batch in batches:
        optimizer.zero_grad()
        step.backward(scaler.scale(float16_autocast_losses(model, batch)))
        skipped.append(bool(step.last.skipped))
        scaler_step(step, scaler, optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, skipped


def test_float16_overflow_skips_the_step_and_backs_the_scale_off_as_backward_does():
    """From a scale at which float16 gradients overflow, GradScaler around backward() skips and
    backs off until they fit, then trains. The step (equal weighting: the same update) must skip
    the same steps, leave the scale at the same values and end at the same parameters. The
    backoff factor 2⁻⁸ keeps every scale far from the overflow threshold, where summing the task
    gradients in another order could tip one way or the other."""
    batches = [toy_batch(3, seed=seed) for seed in range(8)]
    options = {"init_scale": 2.0**40, "backoff_factor": 2.0**-8, "growth_interval": 1000}
    reference, model = ToyMultiTask(), ToyMultiTask()
    expected_scales = train_with_backward(reference, batches, torch.amp.GradScaler("cpu", **options))
    scales, skipped = train_with_step(model, batches, torch.amp.GradScaler("cpu", **options))
    assert scales == expected_scales
    # An overflow shows as a scale backed off; the step skips only there (where a head's gradient
    # alone overflows it may still write, and scaler_step leaves that to the scaler's own check).
    overflowed = [after < before for before, after in zip([2.0**40, *scales[:-1]], scales, strict=True)]
    assert overflowed[0] and not all(overflowed)
    assert skipped[0] and all(overflow or not skip for skip, overflow in zip(skipped, overflowed, strict=True))
    # The two moved the parameters alike: float16 rounds the task gradients summed by autograd and
    # the ones combined by the step differently, by about 1e-3 relative.
    initial = torch.cat([p.detach().reshape(-1) for p in ToyMultiTask().parameters()])
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - initial
    expected_moved = torch.cat([p.detach().reshape(-1) for p in reference.parameters()]) - initial
    assert expected_moved.norm() > 1e-2
    assert (moved - expected_moved).norm() <= 1e-2 * expected_moved.norm()


def test_a_skipped_step_does_not_move_the_optimizer_and_a_taken_one_does():
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    model = ToyMultiTask()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    step = MTLStep(model.trunk.parameters(), unscaled("emtl", scaler))
    before = [p.detach().clone() for p in model.parameters()]
    losses = torch.stack(model.losses(*toy_batch(3)))
    step.backward(scaler.scale(torch.cat([losses[:2], torch.full((1,), torch.inf) * losses[2]])))
    assert bool(step.last.skipped)
    scaler_step(step, scaler, optimizer)
    scaler.update()
    assert scaler.get_scale() == SCALE / 2 and not optimizer.state
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))

    optimizer.zero_grad()
    step.backward(scaler.scale(torch.stack(model.losses(*toy_batch(3)))))
    scaler_step(step, scaler, optimizer)
    scaler.update()
    assert scaler.get_scale() == SCALE / 2 and optimizer.state
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_scaler_step_before_any_backward_says_so():
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), "emtl")
    with pytest.raises(RuntimeError, match="no backward"):
        scaler_step(step, torch.amp.GradScaler("cpu"), torch.optim.SGD(model.parameters(), lr=0.1))
