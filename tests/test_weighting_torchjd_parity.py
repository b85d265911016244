"""The weightings TorchJD 0.18 also has (FairGrad, Krum, GradVac, PCD, CR-MOGM, ConFIG) against
TorchJD's, on the same Gram matrix (ConFIG, an aggregator there: Jᵀw against its output on J), at
T ∈ {1, 2, 3, 8, 16} in float64 and float32; the stateful ones over several steps, their state
compared too."""

from __future__ import annotations

import pytest
import torch
from torchjd.aggregation import ConFIG as TorchJDConFIG
from torchjd.aggregation import (
    CRMOGMWeighting,
    FairGradWeighting,
    GradVacWeighting,
    KrumWeighting,
    PCDWeighting,
    UPGradWeighting,
)

from emtl_kernels.weightings import CRMOGM, PCD, GradVac, config_weights, fairgrad_weights, krum_weights

NUM_TASKS = [1, 2, 3, 8, 16]
DTYPES = [torch.float64, torch.float32]
STEPS = 4


def gradients(num_tasks: int, seed: int, numel: int = 50) -> torch.Tensor:
    """J [T, P] float64: Gaussian rows of norms spread over a decade (TorchJD's FairGrad, a
    SciPy least-squares solve with its default tolerances, stops short of the solution when
    they spread over several: see test_weighting_zoo_references for ours there)."""
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(num_tasks, numel, generator=generator, dtype=torch.float64)
    return jacobian * torch.empty(num_tasks, 1, dtype=torch.float64).uniform_(0.3, 3, generator=generator)


def gram_of(num_tasks: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    jacobian = gradients(num_tasks, seed)
    return torch.ones(num_tasks, dtype=dtype), (jacobian @ jacobian.T).to(dtype)


def assert_weights_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    assert actual.dtype == expected.dtype
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * max(scale, 1e-30))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", NUM_TASKS)
@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_fairgrad_matches_torchjd(p, num_tasks, dtype):
    """Both solve (Gα)_i = α_i^(−1/p); the difference is SciPy's stopping tolerance (about 1e-8)
    and our ridge (1e-8 relative), carried through the condition of the Newton system."""
    losses, gram = gram_of(num_tasks, seed=num_tasks, dtype=dtype)
    expected = FairGradWeighting(alpha=p)(gram)
    assert_weights_close(fairgrad_weights(losses, gram, p=p), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", [3, 8, 16])
@pytest.mark.parametrize("n_byzantine,n_selected", [(0, 1), (1, 1), (0, 3), (1, 2)])
def test_krum_matches_torchjd(n_byzantine, n_selected, num_tasks, dtype):
    if num_tasks < n_byzantine + 3:
        with pytest.raises(ValueError, match="needs at least"):
            krum_weights(*gram_of(num_tasks, seed=0, dtype=dtype), n_byzantine=n_byzantine)
        return
    for seed in range(3):
        losses, gram = gram_of(num_tasks, seed=seed, dtype=dtype)
        expected = KrumWeighting(n_byzantine, n_selected)(gram)
        assert torch.equal(krum_weights(losses, gram, n_byzantine=n_byzantine, n_selected=n_selected), expected)


@pytest.mark.parametrize("num_tasks", [1, 2])
def test_krum_refuses_too_few_tasks(num_tasks):
    losses, gram = gram_of(num_tasks, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs at least 3 tasks"):
        krum_weights(losses, gram)


def torchjd_orders(num_tasks: int, seed: int) -> torch.Tensor:
    """The orders TorchJD's GradVac draws after ``torch.manual_seed(seed)``: for each task i in
    turn, ``torch.randperm(T − 1)`` of the others; as rows of ours, task i first (skipped)."""
    torch.manual_seed(seed)
    rows = []
    for task in range(num_tasks):
        others = [j for j in range(num_tasks) if j != task]
        rows.append([task] + [others[k] for k in torch.randperm(len(others)).tolist()])
    return torch.tensor(rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", NUM_TASKS)
@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_gradvac_matches_torchjd_over_steps(beta, num_tasks, dtype):
    """Same corrections, batched over the tasks here, one by one there: the same operations on
    each (i, j) pair, so the weights and targets agree to rounding."""
    ours, theirs = GradVac(beta=beta), GradVacWeighting(beta=beta)
    for step in range(STEPS):
        losses, gram = gram_of(num_tasks, seed=100 + step, dtype=dtype)
        orders = torchjd_orders(num_tasks, seed=step)
        torch.manual_seed(step)
        expected = theirs(gram)
        assert_weights_close(
            ours.weights(losses, gram, orders=orders), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12
        )
        torch.testing.assert_close(ours.targets, theirs._phi_t, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert float(ours.targets.abs().max()) > 0.01 or num_tasks == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", NUM_TASKS)
@pytest.mark.parametrize("tau", [0.02, 0.5])
def test_pcd_matches_torchjd_over_steps(tau, num_tasks, dtype):
    """The same QP, solved exactly by an active set there and by the interior point here: the
    weights agree to the interior point's accuracy. The moving average is float64 in both."""
    ours, theirs = PCD(tau=tau, beta=0.9), PCDWeighting(tau=tau, beta=0.9)
    for step in range(STEPS):
        jacobian = gradients(num_tasks, seed=200 + step)
        jacobian = jacobian * 10.0 ** torch.randint(
            -2, 3, (num_tasks, 1), generator=torch.Generator().manual_seed(step)
        )
        gram = (jacobian @ jacobian.T).to(dtype)
        expected = theirs(gram)
        assert_weights_close(ours(torch.ones(num_tasks, dtype=dtype), gram), expected, rtol=1e-7)
        torch.testing.assert_close(ours.sq_norm_average, theirs._sq_norm_ema, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "secondary",
    [
        [[0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]],  # opposite secondaries: infeasible
        [[0.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],  # a zero secondary gradient
        [[2.0, 2.0, 0.0], [-3.0, -3.0, 0.0], [0.0, 0.0, 1.0]],  # dependent, opposite
    ],
)
@pytest.mark.parametrize("primary", [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
def test_pcd_degenerate_cases_match_torchjd(primary, secondary):
    jacobian = torch.tensor([primary, *secondary], dtype=torch.float64)
    gram = jacobian @ jacobian.T
    expected = PCDWeighting(tau=0.5)(gram)
    assert_weights_close(PCD(tau=0.5)(torch.ones(4, dtype=torch.float64), gram), expected, rtol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", NUM_TASKS)
@pytest.mark.parametrize("initial", [False, True])
def test_cr_mogm_around_upgrad_matches_torchjd_over_steps(initial, num_tasks, dtype):
    """Around UPGrad with TorchJD's norm_eps. Our UPGrad agrees with its quadprog solve to about
    1e-10 in float64; in float32 both carry G's rounding through their solves, which differ (3e-4
    of the largest weight seen at T = 16): the average itself adds no error."""
    initial_weights = torch.linspace(0.5, 1.5, num_tasks, dtype=dtype) if initial else None
    ours = CRMOGM("upgrad", alpha=0.7, initial_weights=initial_weights, norm_eps=1e-4)
    theirs = CRMOGMWeighting(UPGradWeighting(), alpha=0.7, initial_weights=initial_weights)
    for step in range(STEPS):
        losses, gram = gram_of(num_tasks, seed=300 + step, dtype=dtype)
        expected = theirs(gram)
        assert_weights_close(ours(losses, gram), expected, rtol=1e-3 if dtype == torch.float32 else 1e-8)


def assert_config_matches_torchjd(jacobian: torch.Tensor, rtol: float, preference=None) -> None:
    """Jᵀw from our weights on G = JJᵀ against TorchJD's ConFIG on J, relative to ‖Σ_i |g_i|‖."""
    losses = torch.ones(jacobian.shape[0], dtype=jacobian.dtype)
    weights = config_weights(losses, jacobian @ jacobian.T, preference=preference)
    assert weights.dtype == jacobian.dtype and torch.isfinite(weights).all()
    pref_vector = None if preference is None else torch.as_tensor(preference, dtype=jacobian.dtype)
    expected = TorchJDConFIG(pref_vector)(jacobian)
    scale = float(jacobian.abs().sum(0).norm())
    torch.testing.assert_close(jacobian.T @ weights, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", NUM_TASKS)
def test_config_matches_torchjd(num_tasks, dtype):
    """The pseudo-inverse of U there, of C = UUᵀ here (float64): the same update to rounding."""
    for seed in range(3):
        jacobian = gradients(num_tasks, seed=400 + seed).to(dtype)
        preference = torch.linspace(0.5, 2.0, num_tasks).tolist() if seed == 2 else None
        assert_config_matches_torchjd(jacobian, 1e-5 if dtype == torch.float32 else 1e-12, preference)


@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # a zero gradient: left out
        [[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]],  # opposite: the unit gradients cancel, update 0
        [[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 1.0, 1.0]],  # parallel pair: C singular
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # no gradient at all
    ],
)
def test_config_degenerate_cases_match_torchjd(rows):
    assert_config_matches_torchjd(torch.tensor(rows, dtype=torch.float64), rtol=1e-12)


def test_config_zero_gradient_task_gets_the_mean_weight():
    jacobian = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    weights = config_weights(torch.ones(3, dtype=torch.float64), jacobian @ jacobian.T)
    torch.testing.assert_close(weights, torch.ones(3, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_config_on_adversarial_gram_is_finite_and_matches_torchjd(dtype):
    """Norms over twelve decades, a duplicated and a negated task, rank below T: C, not G, is
    inverted, so the update still matches in float64 and stays finite in float32."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    jacobian = torch.cat([base, base[:1], -base[1:2]]) * 10.0 ** torch.arange(-6, 6, 1.5, dtype=torch.float64)[:, None]
    if dtype == torch.float64:
        assert_config_matches_torchjd(jacobian, rtol=1e-9)
    gram = (jacobian @ jacobian.T).to(dtype)
    assert torch.isfinite(config_weights(torch.ones(8, dtype=dtype), gram)).all()


def test_config_jacobi_sweeps_give_the_lapack_weights():
    """The eigen-solver of devices other than the CPU, run here: the same C⁺, to float64 rounding."""
    jacobian = gradients(8, seed=9) * torch.logspace(-3, 3, 8, dtype=torch.float64)[:, None]
    losses, gram = torch.ones(8, dtype=torch.float64), jacobian @ jacobian.T
    expected = config_weights(losses, gram, eigen_solver="lapack")
    assert_weights_close(config_weights(losses, gram, eigen_solver="jacobi"), expected, rtol=1e-12)
