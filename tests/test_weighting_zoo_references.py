"""FairGrad, GradNorm and DB-MTL against float64 implementations written from their papers (on the
task gradients themselves where the method is stated on them), adversarial Gram matrices for every
weighting added beside them, and the state semantics of the stateful ones."""

from __future__ import annotations

import pytest
import torch
from _weighting_cases import NUM_TASKS, random_problem

from emtl_kernels.weightings import (
    CRMOGM,
    PCD,
    WEIGHTINGS,
    GradNorm,
    GradVac,
    Krum,
    db_mtl_weights,
    fairgrad_weights,
    make_weighting,
)

DTYPES = [torch.float64, torch.float32]
NEW_WEIGHTINGS = ["fairgrad", "krum", "pcd", "gradvac", "cr_mogm", "gradnorm", "db_mtl"]


# FairGrad ------------------------------------------------------------------------------------


def fairgrad_residual(gram: torch.Tensor, weights: torch.Tensor, p: float) -> float:
    """max_i |(Gα)_i − α_i^(−1/p)| / Σ_j |G_ij| α_j: Equation 4 of the paper, relative to the
    terms (Gα)_i sums, which bound both its rounding and the ridge's shift (G_ii α_i · reg_eps)."""
    return float(((gram @ weights - weights ** (-1 / p)) / (gram.abs() @ weights)).abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", NUM_TASKS)
@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_solves_its_equations(p, num_tasks, dtype):
    """On gradient norms spread over six orders of magnitude, where SciPy's solve in TorchJD stops
    short (relative residuals up to 1 seen) and the α_i span up to twenty orders: the equations
    hold to the ridge, 1e-8 of the terms summed, and the rounding beside it."""
    for seed in range(3):
        losses, jacobian, _ = random_problem(num_tasks, seed=seed)
        gram = (jacobian @ jacobian.T).to(dtype)
        weights = fairgrad_weights(losses.to(dtype), gram, p=p)
        assert weights.dtype == dtype and (weights > 0).all()
        # Float32 weights add their own rounding, carried through α^(−1/p).
        assert fairgrad_residual(gram.double(), weights.double(), p) <= (1e-6 if dtype == torch.float32 else 1e-7)


@pytest.mark.parametrize("p", [0.5, 1.0, 3.0])
def test_fairgrad_weights_follow_a_common_scale_as_the_paper_states(p):
    """G → s²G turns α into s^(−2p/(p+1)) α: (s²G)(cα) = (cα)^(−1/p) with c^(1 + 1/p) = s^(−2)."""
    losses, jacobian, _ = random_problem(5, seed=3)
    gram = jacobian @ jacobian.T
    weights = fairgrad_weights(losses, gram, p=p)
    for scale in (1e-6, 1e3):
        scaled = fairgrad_weights(losses, gram * scale**2, p=p)
        torch.testing.assert_close(scaled, weights * scale ** (-2 * p / (p + 1)), rtol=1e-9, atol=0)


def test_fairgrad_gives_a_zero_gradient_task_the_mean_weight():
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 2.0]], dtype=torch.float64)
    weights = fairgrad_weights(torch.ones(3, dtype=torch.float64), jacobian @ jacobian.T)
    kept = jacobian[[0, 2]]
    expected = fairgrad_weights(torch.ones(2, dtype=torch.float64), kept @ kept.T)
    torch.testing.assert_close(weights[[0, 2]], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(weights[1], expected.mean(), rtol=1e-12, atol=0)


# GradNorm ------------------------------------------------------------------------------------


def gradnorm_loss(logits: torch.Tensor, jacobian: torch.Tensor, losses, initial_losses, alpha: float):
    """L_grad of Chen et al. (Section 3.2) on the task gradients themselves, float64, with
    w = T softmax(θ) as LibMTL parametrises it: Σ_i |‖w_i g_i‖ − mean_j ‖w_j g_j‖ · r_i^α|, the
    target held constant."""
    num_tasks = jacobian.shape[0]
    weights = num_tasks * torch.softmax(logits, 0)
    norms = (weights[:, None] * jacobian).norm(dim=1)
    ratios = losses / initial_losses
    target = (norms.mean() * (ratios / ratios.mean()) ** alpha).detach()
    return (norms - target).abs().sum()


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8])
def test_gradnorm_gradient_is_the_papers_over_steps(num_tasks):
    """Three steps with an SGD update of θ between them: weights T softmax(θ), θ.grad the autograd
    gradient of L_grad (computed on J in float64), L_i(0) the first step's losses."""
    weighting = GradNorm(num_tasks, alpha=1.5)
    (logits,) = weighting.parameters()
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.05)
    reference = torch.zeros(num_tasks, dtype=torch.float64, requires_grad=True)
    initial_losses = None
    for step in range(3):
        jacobian = random_problem(num_tasks, seed=step)[1]
        # Positive losses (random_problem's can be 0): the paper's ratios L_i / L_i(0) need them.
        losses = torch.rand(num_tasks, generator=torch.Generator().manual_seed(step), dtype=torch.float64) + 0.1
        initial_losses = losses if initial_losses is None else initial_losses
        optimizer.zero_grad()
        weights = weighting(losses, jacobian @ jacobian.T)
        # θ is float32: its rounding moves the weights by about 1e-6.
        torch.testing.assert_close(weights, num_tasks * torch.softmax(reference.detach(), 0), rtol=1e-5, atol=1e-6)
        (expected,) = torch.autograd.grad(gradnorm_loss(reference, jacobian, losses, initial_losses, 1.5), reference)
        torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        optimizer.step()
        with torch.no_grad():
            reference -= 0.05 * expected
    assert num_tasks == 1 or float(logits.detach().abs().max()) > 0


def test_gradnorm_makes_its_parameters_at_the_first_step_without_num_tasks():
    weighting = GradNorm()
    with pytest.raises(RuntimeError, match="pass num_tasks"):
        weighting.parameters()
    losses, _, gram = random_problem(3, seed=0)
    weighting(losses.float(), gram)
    assert next(weighting.parameters()).shape == (3,)
    with pytest.raises(ValueError, match="parameters are"):
        weighting(torch.ones(4), torch.eye(4))


def test_gradnorm_accumulates_into_grad_and_reset_forgets_the_first_losses():
    losses, _, gram = random_problem(3, seed=1)
    weighting = GradNorm(3)
    weighting(losses, gram)
    once = next(weighting.parameters()).grad.clone()
    weighting(losses, gram)
    torch.testing.assert_close(next(weighting.parameters()).grad, 2 * once)
    weighting.reset()
    weighting(2 * losses, gram)
    torch.testing.assert_close(weighting.initial_losses, 2 * losses)


# DB-MTL --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", NUM_TASKS)
def test_db_mtl_update_is_the_balanced_sum_of_log_loss_gradients(num_tasks, dtype):
    """LibMTL's DB_MTL with DB_beta = 0, written on J in float64: the gradients of log(L_i + 1e-8),
    each scaled to the largest of their norms, summed."""
    losses, jacobian, _ = random_problem(num_tasks, seed=num_tasks)
    log_gradients = jacobian / (losses[:, None] + 1e-8)
    norms = log_gradients.norm(dim=1)
    expected = ((norms.max() / (norms + 1e-8))[:, None] * log_gradients).sum(0)
    gram = (jacobian @ jacobian.T).to(dtype)
    weights = db_mtl_weights(losses.to(dtype), gram)
    update = jacobian.T @ weights.double()
    assert (update - expected).norm() <= (1e-5 if dtype == torch.float32 else 1e-12) * expected.norm()


def test_db_mtl_gives_a_zero_gradient_task_the_mean_weight():
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 2.0]], dtype=torch.float64)
    losses = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    weights = db_mtl_weights(losses, jacobian @ jacobian.T)
    torch.testing.assert_close(weights[1], weights[[0, 2]].mean())


# Adversarial Gram matrices, every new weighting ----------------------------------------------


def adversarial_jacobians() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    rank_one = torch.randn(1, 6, generator=generator, dtype=torch.float64)
    return {
        "rank_deficient": torch.cat([base[:2], base[:1] + base[1:2], -base[:1]]),
        "rank_one": torch.tensor([[1.0], [2.0], [-3.0], [0.5]], dtype=torch.float64) * rank_one,
        "zero_gradient_task": torch.cat([base[:3], torch.zeros(1, 6, dtype=torch.float64)]),
        "all_zero": torch.zeros(4, 6, dtype=torch.float64),
        "scaled_1e-6_to_1e6": base * torch.tensor([[1e-6], [1e-2], [1e2], [1e6]], dtype=torch.float64),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(adversarial_jacobians()))
@pytest.mark.parametrize("name", NEW_WEIGHTINGS)
def test_adversarial_gram_gives_finite_weights_over_steps(name, case, dtype):
    jacobian = adversarial_jacobians()[case]
    gram = (jacobian @ jacobian.T).to(dtype)
    losses = torch.tensor([0.3, 2.0, 1e-3, 40.0], dtype=dtype)
    weighting = make_weighting(name)
    for scale in (1.0, 1e-3, 1e3):
        weights = weighting(losses, gram * scale)
        assert weights.shape == (4,) and weights.dtype == dtype
        assert torch.isfinite(weights).all(), weights


# State --------------------------------------------------------------------------------------


#: Each stateful weighting, made fresh, with the options of its ``weights`` (GradVac's orders fixed,
#: so that its calls differ by the state alone).
STATEFUL = {
    "pcd": (lambda: PCD(beta=0.9), {}),
    "gradvac": (GradVac, {"orders": torch.tensor([[1, 0, 3, 2], [2, 3, 0, 1], [3, 1, 2, 0], [0, 2, 1, 3]])}),
    "cr_mogm": (lambda: CRMOGM("mgda", alpha=0.5), {}),
    "gradnorm": (lambda: GradNorm(4), {}),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_reset_restarts_and_non_finite_inputs_leave_the_state(name):
    """After reset() a weighting gives what a fresh one gives; a call on a non-finite G (which the
    step skips) changes nothing for the calls after. The state moves between the calls compared."""
    make, options = STATEFUL[name]
    first, second = random_problem(4, seed=1), random_problem(4, seed=2)
    weighting, untouched = make(), make()
    for losses, _, gram in (first, second):
        weighting.weights(losses, gram, **options)
        untouched.weights(losses, gram, **options)
    poisoned = second[2].clone()
    poisoned[0, 1] = poisoned[1, 0] = float("nan")
    weighting.weights(second[0], poisoned, **options)
    after = weighting.weights(first[0], first[2], **options)
    torch.testing.assert_close(after, untouched.weights(first[0], first[2], **options))
    weighting.reset()
    expected = make().weights(second[0], second[2], **options)
    torch.testing.assert_close(weighting.weights(second[0], second[2], **options), expected)
    if name != "gradnorm":  # its weights move with θ, which the optimiser steps, not the state
        assert not torch.allclose(after, make().weights(first[0], first[2], **options))


def test_state_starts_afresh_when_the_number_of_tasks_changes():
    weighting = GradVac(seed=0)
    weighting(*random_problem(3, seed=0)[::2])
    assert weighting.targets is not None and weighting.targets.shape == (3, 3)
    weighting(*random_problem(5, seed=0)[::2])
    assert weighting.targets.shape == (5, 5)


def test_cr_mogm_alpha_zero_is_the_wrapped_weighting_and_one_freezes_the_start():
    problems = [random_problem(3, seed=seed) for seed in range(3)]
    follows, frozen = CRMOGM(Krum(), alpha=0.0), CRMOGM(Krum(), alpha=1.0, initial_weights=torch.ones(3))
    for losses, _, gram in problems:
        torch.testing.assert_close(follows(losses, gram), Krum()(losses, gram))
        torch.testing.assert_close(frozen(losses, gram), torch.ones(3, dtype=torch.float64))


def test_cr_mogm_starts_at_the_first_finite_step():
    """A first step on a non-finite G (an overflow, skipped by the step) must not become λ_0."""
    (losses, _, gram), poisoned = random_problem(3, seed=0), torch.full((3, 3), float("inf"), dtype=torch.float64)
    weighting = CRMOGM("mgda", alpha=0.5)
    weighting(losses, poisoned)
    torch.testing.assert_close(weighting(losses, gram), make_weighting("mgda")(losses, gram))


def test_cr_mogm_takes_what_its_weighting_reads():
    assert CRMOGM("emtl").gram_use == "diagonal" and CRMOGM("emtl").reads_losses
    assert CRMOGM("upgrad").gram_use == "full" and not CRMOGM("upgrad").reads_losses


def test_new_weightings_are_registered():
    assert set(NEW_WEIGHTINGS) <= set(WEIGHTINGS)


@pytest.mark.parametrize(
    "make,error",
    [
        (lambda: fairgrad_weights(torch.ones(2), torch.eye(2), p=0.0), "p must be"),
        (lambda: Krum(n_byzantine=-1), "n_byzantine"),
        (lambda: Krum(n_selected=0), "n_selected"),
        (lambda: PCD(tau=1.5), "tau"),
        (lambda: PCD(beta=1.0), "beta"),
        (lambda: GradVac(beta=2.0), "beta"),
        (lambda: CRMOGM(alpha=-0.1), "alpha"),
        (lambda: CRMOGM("nope"), "unknown weighting"),
        (lambda: GradNorm(num_tasks=0), "num_tasks"),
        (lambda: db_mtl_weights(torch.ones(2), torch.eye(2), eps=-1.0), "eps"),
        (lambda: PCD(tau=torch.ones(3))(torch.ones(3), torch.eye(3)), "tau has"),
    ],
)
def test_bad_options_raise(make, error):
    with pytest.raises(ValueError, match=error):
        make()
