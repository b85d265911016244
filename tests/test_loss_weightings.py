"""The loss-based weightings against TorchJD 0.18's scalarizers (and LibMTL's definitions where
TorchJD has none): Σ_i w_i ∇L_i equals the gradient of their scalarised loss, in float64, over
several training steps for the stateful ones; and their state through MTLStep."""

from __future__ import annotations

import math

import pytest
import torch
from multitask_models import ToyMultiTask, toy_batch
from torchjd import scalarization

from emtl_kernels import MTLStep
from emtl_kernels.weightings import COSMOS, DWA, FAMO, GLS, IMTLL, PBI, RLW, STCH, UW, Weighting, stch_weights

NUM_TASKS = 3
NO_SKIP = torch.tensor(False)


def problem(seed: int = 0):
    """Shared θ ``[5]`` and positive float64 losses L_i(θ) = (a_i·θ − b_i)² + c_i of different scales."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(NUM_TASKS, 5, generator=generator, dtype=torch.float64)
    targets = torch.randn(NUM_TASKS, generator=generator, dtype=torch.float64)
    offsets = torch.tensor([0.1, 2.0, 0.5], dtype=torch.float64)
    scales = torch.tensor([1.0, 30.0, 0.05], dtype=torch.float64)
    theta = torch.randn(5, generator=generator, dtype=torch.float64)

    def losses(theta: torch.Tensor, batch: int = 0) -> torch.Tensor:
        shift = 0.1 * batch * torch.arange(NUM_TASKS, dtype=torch.float64)
        return scales * ((matrix @ theta - targets - shift).square() + offsets)

    return theta, losses


def unread(losses: torch.Tensor) -> torch.Tensor:
    """The Gram matrix a one-backward step hands a weighting that reads none of it."""
    return torch.full((losses.numel(), losses.numel()), math.nan, dtype=losses.dtype)


def our_gradient(weighting: Weighting, theta: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i ∇L_i on θ, the weights held constant, and the weighting's after-backward update."""
    weights = weighting(losses.detach(), unread(losses))
    (grad,) = torch.autograd.grad((weights * losses).sum(), theta)
    weighting.after_backward(losses.detach(), NO_SKIP)
    return grad


def their_gradient(scalarizer, theta: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(scalarizer(losses), theta, retain_graph=True)
    return grad


def preference64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("name", ["GLS", "STCH", "STCH_preference", "COSMOS", "COSMOS_linear", "PBI", "PBI_preference"])
def test_stateless_weights_are_the_gradient_of_the_torchjd_scalarisation(name):
    ours, theirs = {
        "GLS": (GLS(), scalarization.GeometricMean()),
        "STCH": (STCH(mu=0.1), scalarization.STCH(0.1)),
        "STCH_preference": (
            STCH(mu=0.5, preference=[0.2, 0.5, 0.3], reference=[0.1, 1.0, 0.0]),
            scalarization.STCH(
                0.5, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.1, 1.0, 0.0]).double()
            ),
        ),
        "COSMOS": (COSMOS(lam=2.0), scalarization.COSMOS(2.0, preference64(1 / 3, 1 / 3, 1 / 3))),
        "COSMOS_linear": (
            COSMOS(lam=0.0, preference=[0.6, 0.1, 0.3]),
            scalarization.COSMOS(0.0, preference64(0.6, 0.1, 0.3)),
        ),
        "PBI": (PBI(), scalarization.PBI(5.0, preference64(1.0, 1.0, 1.0))),
        "PBI_preference": (
            PBI(theta=0.5, preference=preference64(0.2, 0.5, 0.3), reference=[0.05, 1.0, 0.0]),
            scalarization.PBI(0.5, preference64(0.2, 0.5, 0.3), preference64(0.05, 1.0, 0.0)),
        ),
    }[name]
    theta, losses_of = problem()
    for batch in range(3):
        point = (theta + 0.3 * batch).requires_grad_()
        losses = losses_of(point)
        expected = their_gradient(theirs, point, losses)
        torch.testing.assert_close(our_gradient(ours, point, losses), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_pbi_on_the_preference_ray_is_finite_as_torchjd(num_tasks):
    """Losses less z on the ray (always so at T = 1): d₂ = √ε, TorchJD's ε ours too, so the
    gradient is the unit preference, not 0/0. Both divide the rounding of f − d₁d (eps·‖f‖) by
    √ε = 1e-6, so they agree to θ·1e-9, not to float64 rounding."""
    preference = preference64(1.0, 2.0, 3.0)[:num_tasks]
    losses = (0.7 * preference + 0.1).requires_grad_()
    reference = torch.full((num_tasks,), 0.1, dtype=torch.float64)
    (expected,) = torch.autograd.grad(scalarization.PBI(5.0, preference, reference)(losses), losses)
    ours = PBI(preference=preference, reference=reference)(losses.detach(), unread(losses))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-8)
    torch.testing.assert_close(ours, preference / preference.norm(), rtol=0, atol=1e-8)


def test_stch_log_losses_is_libmtl_after_warm_up():
    """LibMTL's STCH past its warm-up: T μ log Σ_i exp(log(L_i / n_i) / μ), n its nadir point;
    our weights are its gradient divided by T (and positive, summing over tasks to E_p[1/L])."""
    losses = torch.tensor([0.3, 20.0, 1.5], dtype=torch.float64, requires_grad=True)
    nadir = torch.tensor([0.5, 10.0, 2.0], dtype=torch.float64)
    mu = 0.2
    libmtl = NUM_TASKS * mu * torch.logsumexp((losses / nadir).log() / mu, dim=0)
    (expected,) = torch.autograd.grad(libmtl, losses)
    ours = stch_weights(losses.detach(), unread(losses), mu=mu, preference=[1.0] * 3, reference=nadir, log_losses=True)
    torch.testing.assert_close(ours, expected / NUM_TASKS, rtol=1e-13, atol=0)


@pytest.mark.parametrize(("ours", "theirs", "parameter"), [("uw", "UW", "log_var"), ("imtl_l", "IMTLL", "log_scale")])
def test_learned_scales_train_as_the_torchjd_scalarizer(ours, theirs, parameter):
    """Five SGD steps of θ and the scales: ours through after_backward's closed-form gradient,
    theirs by autograd through their scalarised loss. Same trajectory in float64."""
    weighting = UW(init=0.0) if ours == "uw" else IMTLL(init=0.0)
    scalarizer = getattr(scalarization, theirs)(NUM_TASKS).double()
    theta, losses_of = problem()
    mine, reference = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    theirs_scales = getattr(scalarizer, parameter)
    their_optimizer = torch.optim.SGD([reference, theirs_scales], lr=0.05)
    weighting(losses_of(mine).detach(), unread(losses_of(mine)))  # makes the lazy scales
    my_optimizer = torch.optim.SGD([mine, *weighting.parameters()], lr=0.05)
    for batch in range(5):
        their_optimizer.zero_grad()
        scalarizer(losses_of(reference, batch)).backward()
        their_optimizer.step()
        my_optimizer.zero_grad()
        mine.grad = our_gradient(weighting, mine, losses_of(mine, batch))
        my_optimizer.step()
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(weighting.scales, theirs_scales, rtol=1e-12, atol=1e-14)
    assert (weighting.scales.detach().abs() > 1e-3).all()  # they moved


def test_dwa_over_epochs_is_the_torchjd_scalarizer():
    """Four epochs of three batches: uniform weights for two epochs, then T·softmax of the ratio
    of the last two epochs' average losses over τ; end_epoch() as TorchJD's step()."""
    ours, theirs = DWA(temperature=2.0), scalarization.DWA(2.0)
    theta, losses_of = problem()
    for epoch in range(4):
        for batch in range(3):
            point = (theta + 0.2 * epoch - 0.1 * batch).requires_grad_()
            losses = losses_of(point, batch)
            expected = their_gradient(theirs, point, losses)
            torch.testing.assert_close(our_gradient(ours, point, losses), expected, rtol=1e-12, atol=1e-14)
        ours.end_epoch()
        theirs.step()
    assert not torch.allclose(ours(losses.detach(), unread(losses)), torch.ones(3, dtype=torch.float64))


def test_dwa_per_step_uses_the_last_two_steps_losses():
    dwa = DWA(temperature=2.0, period="step")
    history = [torch.tensor([1.0, 4.0, 0.5]), torch.tensor([0.5, 3.0, 0.5]), torch.tensor([0.4, 3.5, 0.1])]
    for step, losses in enumerate(history):
        weights = dwa(losses, unread(losses))
        if step < 2:
            assert torch.equal(weights, torch.ones(3))
        dwa.after_backward(losses, NO_SKIP)
    expected = 3 * torch.softmax((history[2] / history[1]) / 2.0, dim=0)
    torch.testing.assert_close(dwa(history[0], unread(history[0])), expected, rtol=1e-6, atol=0)


def test_famo_trains_its_logits_as_the_torchjd_scalarizer():
    """Six steps: backward, SGD step of θ, then the losses of the same batch into
    after_optimizer_step (theirs: update). Same θ and logits in float64."""
    ours, theirs = FAMO(lr=0.025, weight_decay=1e-3), scalarization.FAMO(NUM_TASKS).double()
    theta, losses_of = problem()
    mine, reference = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    my_optimizer, their_optimizer = torch.optim.SGD([mine], lr=0.01), torch.optim.SGD([reference], lr=0.01)
    for batch in range(6):
        their_optimizer.zero_grad()
        theirs(losses_of(reference, batch)).backward()
        their_optimizer.step()
        theirs.update(losses_of(reference, batch).detach())
        my_optimizer.zero_grad()
        mine.grad = our_gradient(ours, mine, losses_of(mine, batch))
        my_optimizer.step()
        ours.after_optimizer_step(losses_of(mine, batch).detach())
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours.logits, theirs._w.detach(), rtol=1e-10, atol=1e-14)
    assert ours.logits.abs().max() > 1e-3  # they moved


def test_rlw_draws_softmax_of_normal_weights_from_its_seeded_generator():
    losses = torch.ones(4)
    rlw = RLW(seed=7)
    generator = torch.Generator().manual_seed(7)
    draws = [rlw(losses, unread(losses)) for _ in range(3)]
    for weights in draws:
        torch.testing.assert_close(weights, torch.softmax(torch.randn(4, generator=generator), dim=0), rtol=0, atol=0)
        assert (weights > 0).all() and abs(float(weights.sum()) - 1) < 1e-6
    assert not torch.equal(draws[0], draws[1])


# Through MTLStep ----------------------------------------------------------------------------


def test_uw_in_the_step_trains_its_log_variances():
    """The step's backward writes ½ − w_i L_i into the log-variances' .grad; an optimiser that
    holds them before the first call (lazy) steps them."""
    model, uw = ToyMultiTask(), UW()
    optimizer = torch.optim.SGD([*model.parameters(), *uw.parameters()], lr=0.1)
    step = MTLStep(model.trunk.parameters(), uw)
    losses = torch.stack(model.losses(*toy_batch(3)))
    weights = step.backward(losses)
    torch.testing.assert_close(weights, torch.full((3,), 0.5))
    torch.testing.assert_close(uw.scales.grad, 0.5 - 0.5 * losses.detach())
    step.optimizer_step(optimizer)
    torch.testing.assert_close(uw.scales.detach(), -0.1 * (0.5 - 0.5 * losses.detach()))


def test_a_skipped_step_leaves_the_state_of_the_loss_weightings_as_it_was():
    """A NaN loss skips the step: no log-variance gradient, no DWA history, no FAMO update."""
    shared = torch.nn.Parameter(torch.ones(3))
    uw, dwa, famo = UW(), DWA(period="step"), FAMO()
    steps = [MTLStep([shared], weighting) for weighting in (uw, dwa, famo)]
    for step in steps:
        step.backward([shared.sum(), 2 * shared.sum()])
    before = (uw.scales.grad.clone(), dwa._history.clone(), famo.logits.clone())
    for step in steps:
        step.backward([shared.sum() * math.nan, 2 * shared.sum()])
        assert "loss" in step.last.why_skipped()
        step.after_optimizer_step(torch.tensor([1.0, 2.0]))
    for old, new in zip(before, (uw.scales.grad, dwa._history, famo.logits), strict=True):
        assert torch.equal(old, new)


def test_famo_hook_through_the_step_moves_its_logits_once_per_step():
    model, famo = ToyMultiTask(), FAMO()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step = MTLStep(model.trunk.parameters(), famo)
    batch = toy_batch(3)
    weights = step.backward(model.losses(*batch))
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    step.optimizer_step(optimizer)
    step.after_optimizer_step(model.losses(*batch))
    moved = famo.logits.clone()
    assert moved.abs().max() > 0
    step.after_optimizer_step(model.losses(*batch))  # no backward since: nothing to learn from
    assert torch.equal(famo.logits, moved)
    with pytest.raises(ValueError, match="T=3"):
        step.after_optimizer_step(torch.ones(2))


def test_bad_options_are_refused():
    for make, error in [
        (lambda: UW(num_tasks=0), "num_tasks"),
        (lambda: IMTLL(init=math.inf), "init"),
        (lambda: DWA(temperature=0), "temperature"),
        (lambda: DWA(period="batch"), "period"),
        (lambda: FAMO(lr=-1), "lr"),
        (lambda: STCH(mu=0), "mu"),
        (lambda: STCH(preference="abc"), "preference"),
        (lambda: COSMOS(lam=-1.0), "lam"),
        (lambda: COSMOS(preference=1.0), "preference"),
        (lambda: PBI(theta=math.nan), "theta"),
        (lambda: PBI(reference="abc"), "reference"),
        (lambda: RLW(seed=1.5), "seed"),
    ]:
        with pytest.raises(ValueError, match=error):
            make()
    with pytest.raises(ValueError, match="T=3"):
        UW(num_tasks=3)(torch.ones(2), torch.eye(2))
    with pytest.raises(ValueError, match="T=2 losses"):
        PBI(preference=[1.0, 2.0, 3.0])(torch.ones(2), torch.eye(2))


def _losses(seed: int) -> torch.Tensor:
    return torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


def test_dwa_reset_forgets_the_loss_history():
    dwa, gram = DWA(period="step"), torch.eye(3, dtype=torch.float64)
    for seed in range(4):
        dwa(_losses(seed), gram)
        dwa.after_backward(_losses(seed), torch.tensor(False))
    moved = dwa(_losses(9), gram)
    assert not torch.allclose(moved, torch.ones(3, dtype=torch.float64))
    history = dwa._history
    dwa.reset()
    assert dwa._history is history  # in place: a captured step still reads it
    torch.testing.assert_close(dwa._history, torch.ones_like(history))
    assert int(dwa._ended) == 0 and int(dwa._count) == 0 and bool((dwa._sum == 0).all())
    fresh = DWA(period="step")
    for seed in (5, 6, 7):
        torch.testing.assert_close(dwa(_losses(seed), gram), fresh(_losses(seed), gram))
        dwa.after_backward(_losses(seed), torch.tensor(False))
        fresh.after_backward(_losses(seed), torch.tensor(False))


def test_famo_reset_puts_the_logits_and_adam_moments_back():
    famo, gram = FAMO(lr=0.1), torch.eye(3, dtype=torch.float64)
    for seed in range(3):
        famo(_losses(seed), gram)
        famo.after_backward(_losses(seed), torch.tensor(False))
        famo.after_optimizer_step(0.8 * _losses(seed + 10))
    assert famo.logits is not None and bool((famo.logits != 0).any())
    logits = famo.logits
    famo.reset()
    assert famo.logits is logits
    torch.testing.assert_close(famo.logits, torch.zeros_like(logits))
    for name in ("first", "second", "step"):
        assert bool((famo._state[name] == 0).all()), name
    fresh = FAMO(lr=0.1)
    for seed in (4, 5):
        torch.testing.assert_close(famo(_losses(seed), gram), fresh(_losses(seed), gram))
        for weighting in (famo, fresh):
            weighting.after_backward(_losses(seed), torch.tensor(False))
            weighting.after_optimizer_step(0.8 * _losses(seed + 10))
    torch.testing.assert_close(famo.logits, fresh.logits)


@pytest.mark.parametrize("num_tasks", [3, None])
def test_uw_reset_writes_init_into_the_same_parameter(num_tasks):
    uw, gram = UW(num_tasks=num_tasks, init=-0.5), torch.eye(3, dtype=torch.float64)
    uw.reset()  # before the scales are made (lazy) or moved: nothing changes
    uw(_losses(0), gram)
    scales = next(uw.parameters())
    optimizer = torch.optim.SGD(uw.parameters(), lr=0.5)
    for seed in range(3):
        optimizer.zero_grad()
        uw(_losses(seed), gram)
        uw.after_backward(_losses(seed), torch.tensor(False))
        optimizer.step()
    assert not torch.allclose(scales.detach(), torch.full_like(scales, -0.5))
    uw.reset()
    assert next(uw.parameters()) is scales and uw.scales is scales
    torch.testing.assert_close(scales.detach(), torch.full_like(scales, -0.5))
    fresh = UW(num_tasks=num_tasks, init=-0.5)
    losses = _losses(7).to(scales.dtype)
    torch.testing.assert_close(uw(losses, gram), fresh(losses, gram))
