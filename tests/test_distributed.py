"""DistributedMTLStep against float64 single-process computations of what it must give.

Two gloo ranks on localhost run every multi-rank scenario in one spawn (spawning is the slow
part); one-rank checks and bad-input errors run in this process on a one-rank gloo group.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_ranks import SCENARIOS, STALL_TIMEOUT_S, WEIGHTING, local_batch, run_ranks
from multitask_models import (
    CountedTrunk,
    FeaturesToy,
    ToyMultiTask,
    float64_twin,
    shared_gradients64,
    toy_batch,
    weighted_sum_gradients64,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from emtl_kernels import MTLStep, available_backends, gradnorm_scaling_weights
from emtl_kernels.distributed import DistributedMTLStep
from emtl_kernels.distributed.buckets import fill_bucket, plan_buckets
from emtl_kernels.task_gradients import TaskGradients
from emtl_kernels.weightings import gls_weights

WORLD = 2


def assert_float32_close(actual, expected, tol=2e-5):
    """Tensor by tensor, ‖a − e‖ ≤ tol·‖e‖ (float32 rounding is relative to the whole gradient)."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert (a.double() - e.double()).norm() <= tol * e.double().norm() + 1e-12


def weights64(losses, gram):
    return gradnorm_scaling_weights(losses, gram, target=WEIGHTING["target"])


def expectation_from(model64, losses: list[torch.Tensor], gram: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float64 losses, ``gram``, the weights of that G and the gradient of Σ_i w_i L_i."""
    weights = weights64(torch.stack(losses).detach(), gram)
    return {
        "losses": torch.stack(losses).detach(),
        "gram": gram,
        "weights": weights,
        "grads": weighted_sum_gradients64(model64, losses, weights),
    }


def global_batch_expectation():
    """One process on the concatenated batch, float64: losses, G, weights, every parameter's gradient."""
    model64 = float64_twin(ToyMultiTask())
    losses = model64(*toy_batch(dtype=torch.float64))
    jacobian = shared_gradients64(model64, losses)
    return expectation_from(model64, losses, jacobian @ jacobian.T)


def local_mode_expectation():
    """Local mode's definition, float64: weights from the rank-mean losses and rank-mean Gram
    matrices, then every rank's local combination, averaged as DDP averages it."""
    model64 = float64_twin(ToyMultiTask())
    per_rank = []
    for rank in range(WORLD):
        inputs, targets = local_batch(rank, WORLD)
        losses = model64(inputs.double(), targets.double())
        jacobian = shared_gradients64(model64, losses)
        per_rank.append((losses, jacobian @ jacobian.T))
    mean_losses = torch.stack([torch.stack(losses).detach() for losses, _ in per_rank]).mean(0)
    mean_gram = torch.stack([gram for _, gram in per_rank]).mean(0)
    weights = weights64(mean_losses, mean_gram)
    grads = [weighted_sum_gradients64(model64, losses, weights) for losses, _ in per_rank]
    return {
        "losses": mean_losses,
        "gram": mean_gram,
        "weights": weights,
        "grads": [sum(g) / WORLD for g in zip(*grads, strict=True)],
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every two-rank scenario, run once: ``{scenario: [rank 0's result, rank 1's]}``."""
    return run_ranks(list(SCENARIOS), tmp_path_factory.mktemp("ranks"), world_size=WORLD)


#: Bytes the first call's check that the ranks agree gathers: 6 int64 numbers from each rank (T,
#: the shared tensors, P, whether a seed was given, the seed, and rank 0's proposal of one).
FIRST_CALL_AGREEMENT = 8 * 6 * WORLD


def successful(results):
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('traceback', result['error'])}"
    return results


def assert_matches(result, expected):
    torch.testing.assert_close(result["weights"].double(), expected["weights"], rtol=1e-4, atol=0)
    torch.testing.assert_close(result["losses"].double(), expected["losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(result["gram"].double(), expected["gram"], rtol=1e-4, atol=1e-9)
    assert_float32_close(result["grads"], expected["grads"])


@pytest.mark.parametrize("scenario", ["ddp_exact", "ddp_memory_exact", "fsdp_exact"])
def test_exact_mode_is_one_process_on_the_global_batch(ranks, scenario):
    expected = global_batch_expectation()
    for result in successful(ranks[scenario]):
        assert_matches(result, expected)


@pytest.mark.parametrize("scenario", ["ddp_local", "ddp_memory_local"])
def test_local_mode_matches_its_definition(ranks, scenario):
    expected = local_mode_expectation()
    for result in successful(ranks[scenario]):
        assert_matches(result, expected)
    # Averaged local Gram matrices count each rank's sampling noise: the norms come out larger.
    exact = global_batch_expectation()
    assert torch.all(expected["gram"].diagonal() > exact["gram"].diagonal())


def features_expectation(sync: str):
    """Features mode on the global batch, float64: G_z exact (its ranks' blocks side by side),
    W times it in local mode; the weights of that G_z; the gradient of Σ_i w_i L_i."""
    model64 = float64_twin(ToyMultiTask())
    features, losses = model64.features_and_losses(*toy_batch(dtype=torch.float64))
    rows = torch.stack([torch.autograd.grad(loss, features, retain_graph=True)[0].reshape(-1) for loss in losses])
    return expectation_from(model64, losses, rows @ rows.T * (WORLD if sync == "local" else 1))


@pytest.mark.parametrize("sync", ["exact", "local"])
def test_features_mode_on_ranks_is_features_mode_on_the_global_batch(ranks, sync):
    expected = features_expectation(sync)
    for result in successful(ranks["ddp_features"]):
        assert_matches(result[sync], expected)
        # Plain DDP plus one all-reduce of the losses and G_z's upper triangle, one of the skip flag
        # (and, on the first call, the check that ranks agree).
        assert result[sync]["payload"] == {"all_reduce": 4 * (3 + 6 + 1), "all_gather": FIRST_CALL_AGREEMENT}


def test_features_mode_skips_on_every_rank(ranks):
    for result in successful(ranks["features_nan_on_one_rank"]):
        assert result["skipped"] and result["grads_unchanged"]


def test_fsdp2_matches_ddp(ranks):
    for ddp, fsdp in zip(successful(ranks["ddp_exact"]), successful(ranks["fsdp_exact"]), strict=True):
        torch.testing.assert_close(fsdp["weights"], ddp["weights"], rtol=1e-5, atol=0)
        assert_float32_close(fsdp["grads"], ddp["grads"], tol=1e-5)


def test_communication_is_counted_from_the_collectives_issued(ranks):
    num_tasks, shared, heads, scalars = 3, 248, 27, 3 + 6  # ToyMultiTask: P = 248, 3 heads of 9
    exact = successful(ranks["ddp_exact"])[0]["second_step_payload"]
    assert exact == {
        "reduce_scatter": 4 * num_tasks * shared,
        "all_gather": 4 * shared,
        "all_reduce": 4 * (heads + scalars),
    }
    # Local mode checks each rank's own values: one more all-reduce, of one number, agrees on the skip.
    assert successful(ranks["ddp_local"])[0]["second_step_payload"] == {"all_reduce": 4 * (scalars + 1)}
    # The first step adds the check that ranks agree.
    assert successful(ranks["ddp_exact"])[0]["payload"]["all_gather"] == 4 * shared + FIRST_CALL_AGREEMENT


@pytest.mark.parametrize("sync", ["exact", "local"])
def test_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(ranks, sync):
    for result in successful(ranks["nan_on_one_rank"]):
        assert result[sync]["skipped"]
        assert torch.equal(result[sync]["weights"], torch.zeros(3))
        assert result[sync]["grads_unchanged"]


@pytest.mark.parametrize("wrap", ["exact", "local", "fsdp"])
def test_an_inf_gradient_on_one_rank_skips_the_step_on_every_rank(ranks, wrap):
    for result in successful(ranks["inf_head_gradient_on_one_rank"]):
        assert result[wrap]["skipped"]
        assert result[wrap]["reasons"] == ["update"]
        assert result[wrap]["grads_unchanged"]


def loss_weighting_expectation():
    """GLS on the global batch, float64: the losses, their weights, and 7 (every .grad before the
    step) plus the gradient of Σ_i w_i L_i on every parameter."""
    model64 = float64_twin(CountedTrunk())
    losses = model64(*toy_batch(dtype=torch.float64))
    loss_vector = torch.stack(losses).detach()
    weights = gls_weights(loss_vector, torch.full((3, 3), float("nan"), dtype=torch.float64))
    grads = weighted_sum_gradients64(model64, losses, weights)
    return {"losses": loss_vector, "weights": weights, "grads": [7.0 + g for g in grads]}


@pytest.mark.parametrize("wrap", ["exact", "local", "fsdp"])
def test_a_loss_weighting_runs_one_backward_of_the_global_batch_weighted_sum(ranks, wrap):
    expected = loss_weighting_expectation()
    for result in successful(ranks["loss_weighting"]):
        run = result[wrap]
        assert run["backwards"] == 1 and not run["skipped"] and run["gram"] is None
        torch.testing.assert_close(run["losses"].double(), expected["losses"], rtol=1e-5, atol=0)
        torch.testing.assert_close(run["weights"].double(), expected["weights"], rtol=1e-5, atol=0)
        assert_float32_close(run["grads"], expected["grads"])
        ((handed_losses, handed_skipped),) = run["handed"]
        assert torch.equal(handed_losses, run["losses"]) and not handed_skipped
        # Plain DDP's (or FSDP's) own reduction, plus one all-reduce of the T losses and one of the
        # skip flag (and, on the first call, the check that ranks agree).
        assert run["payload"] == {"all_reduce": 4 * (3 + 1), "all_gather": FIRST_CALL_AGREEMENT}


@pytest.mark.parametrize("wrap", ["exact", "local", "fsdp"])
def test_a_loss_weighting_skips_a_nan_loss_on_one_rank_on_every_rank(ranks, wrap):
    for result in successful(ranks["loss_weighting_nan_on_one_rank"]):
        run = result[wrap]
        assert run["skipped"] and torch.equal(run["weights"], torch.zeros(3))
        assert all(bool((g == 7.0).all()) for g in run["grads"])
        assert [skipped for _, skipped in run["handed"]] == [True]


def test_ranks_disagreeing_on_the_number_of_tasks_raise_on_every_rank(ranks):
    for result in ranks["ranks_disagree_on_tasks"]:
        assert "ValueError: ranks disagree" in result["error"]
        assert "rank 0: T=3" in result["error"] and "rank 1: T=2" in result["error"]


def test_weightings_that_draw_draw_alike_on_every_rank(ranks):
    first, second = successful(ranks["random_draws"])
    for name in ("rlw", "pcgrad"):
        for mine, theirs in zip(first[name], second[name], strict=True):
            torch.testing.assert_close(mine["weights"], theirs["weights"], rtol=0, atol=0)
            torch.testing.assert_close(mine["grads"], theirs["grads"], rtol=0, atol=0)
    # Draws, not one fixed answer: RLW's two steps weigh differently.
    assert not torch.equal(first["rlw"][0]["weights"], first["rlw"][1]["weights"])
    for result in (first, second):
        assert "ranks disagree" in result["seeded_apart"] and "rank 1: T=3" in result["seeded_apart"]
        assert "seed 0" in result["seeded_apart"] and "seed 1" in result["seeded_apart"]


def test_a_rank_that_raises_does_not_hang_the_others(ranks):
    survivor, failed = ranks["rank_raises"]
    assert "rank 1 failed" in failed["error"]
    assert survivor.get("raised"), survivor  # its collective failed: the peer is gone


def test_a_rank_that_stalls_ends_the_others_by_the_group_timeout(ranks):
    survivor, _stalled = successful(ranks["rank_stalls"])
    assert survivor["raised"], survivor
    assert STALL_TIMEOUT_S <= survivor["waited_s"] < 4 * STALL_TIMEOUT_S


# One rank, in this process: the distributed step must reduce to MTLStep, and reject bad input.
def test_without_a_process_group_the_step_says_so():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    model = ToyMultiTask()
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedMTLStep(model, model.trunk.parameters())


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fsdp_model(model_class=ToyMultiTask):
    model = model_class()
    for layer in (model.trunk[0], model.trunk[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def single_process_result(weighting=WEIGHTING, **options):
    model = ToyMultiTask()
    step = MTLStep(model.trunk.parameters(), **weighting, **options)
    weights = step.backward(model(*toy_batch()))
    return weights, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("wrap,sync", [("ddp", "exact"), ("ddp", "local"), ("fsdp", "exact")])
def test_one_rank_equals_mtlstep_and_adds_to_existing_gradients(one_rank_group, wrap, sync, backend):
    model = fsdp_model() if wrap == "fsdp" else ToyMultiTask()
    wrapped = model if wrap == "fsdp" else DistributedDataParallel(model)
    before = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p, b in zip(model.parameters(), before, strict=True):
        p.grad = b.clone()
    step = DistributedMTLStep(
        wrapped, model.trunk.parameters(), sync=sync, backend=backend, bucket_cap_mb=1e-4, **WEIGHTING
    )
    weights = step.backward(wrapped(*toy_batch()))
    expected_weights, expected_grads = single_process_result(backend="reference")
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=0)
    grads = [p.grad.full_tensor() if wrap == "fsdp" else p.grad for p in model.parameters()]
    before = [b.full_tensor() if wrap == "fsdp" else b for b in before]
    assert_float32_close([g - b for g, b in zip(grads, before, strict=True)], expected_grads, tol=1e-5)
    assert step.communication.sent_bytes == 0


@pytest.mark.parametrize("sync", ["exact", "local"])
@pytest.mark.parametrize("head_gradients", ["weighted", "unweighted"])
def test_one_rank_memory_mode_equals_mtlstep_speed_mode(one_rank_group, sync, head_gradients):
    model = ToyMultiTask()
    wrapped = DistributedDataParallel(model)
    step = DistributedMTLStep(
        wrapped, model.trunk.parameters(), "upgrad", sync=sync, mode="memory", head_gradients=head_gradients
    )
    weights = step.backward(wrapped(*toy_batch()))
    expected_weights, expected_grads = single_process_result({"weighting": "upgrad"}, head_gradients=head_gradients)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-4, atol=1e-6)
    assert_float32_close([p.grad for p in model.parameters()], expected_grads, tol=1e-5)


# GLS reads the losses only: one backward of Σ_i w_i L_i, and one more of Σ_i L_i for the heads.
@pytest.mark.parametrize("weighting", [WEIGHTING, {"weighting": "gls"}], ids=["gradnorm_scaling", "gls"])
@pytest.mark.parametrize("wrap,sync", [("ddp", "exact"), ("ddp", "local"), ("fsdp", "exact")])
def test_one_rank_with_unweighted_heads_equals_mtlstep(one_rank_group, wrap, sync, weighting):
    model = fsdp_model() if wrap == "fsdp" else ToyMultiTask()
    wrapped = model if wrap == "fsdp" else DistributedDataParallel(model)
    step = DistributedMTLStep(wrapped, model.trunk.parameters(), sync=sync, head_gradients="unweighted", **weighting)
    weights = step.backward(wrapped(*toy_batch()))
    expected_weights, expected_grads = single_process_result(weighting, head_gradients="unweighted")
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=0)
    grads = [p.grad.full_tensor() if wrap == "fsdp" else p.grad for p in model.parameters()]
    assert_float32_close(grads, expected_grads, tol=1e-5)


@pytest.mark.parametrize("sync", ["exact", "local"])
def test_one_rank_features_mode_equals_mtlstep(one_rank_group, sync):
    model, reference = FeaturesToy(), FeaturesToy()
    ddp = DistributedDataParallel(model)
    step = DistributedMTLStep(ddp, model.trunk.parameters(), sync=sync, **WEIGHTING)
    features, losses = ddp(*toy_batch())
    weights = step.backward(losses, features=features)
    features, losses = reference(*toy_batch())
    expected = MTLStep(reference.trunk.parameters(), **WEIGHTING).backward(losses, features=features)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=0)
    assert_float32_close([p.grad for p in model.parameters()], [p.grad for p in reference.parameters()], tol=1e-5)


def test_features_mode_under_fsdp_raises(one_rank_group):
    model = fsdp_model(FeaturesToy)
    step = DistributedMTLStep(model, model.trunk.parameters(), **WEIGHTING)
    features, losses = model(*toy_batch())
    with pytest.raises(ValueError, match="features mode runs under DistributedDataParallel only"):
        step.backward(losses, features=features)


class SparseHeadModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(3, 4)
        self.head = torch.nn.Embedding(5, 4, sparse=True)

    def forward(self, inputs, ids):
        features = self.trunk(inputs)
        return [features.square().mean(), (features * self.head(ids)).sum()]


def test_a_sparse_head_is_refused_by_name_before_anything_is_written(one_rank_group):
    model = SparseHeadModel()
    ddp = DistributedDataParallel(model)
    step = DistributedMTLStep(ddp, model.trunk.parameters(), **WEIGHTING)
    with pytest.raises(ValueError, match=r"'module\.head\.weight' gets a sparse gradient"):
        step.backward(ddp(torch.randn(6, 3), torch.tensor([0, 2, 4, 1, 1, 3])))
    assert all(p.grad is None for p in model.parameters())


def test_buckets_cut_at_the_cap_and_pad_to_the_world_size():
    buckets = plan_buckets((5, 3, 7, 2), world_size=3, cap_elements=8)
    assert [b.indices for b in buckets] == [(0, 1), (2,), (3,)]
    assert [b.padded for b in buckets] == [9, 9, 3]
    rows = [[torch.full((n,), 10.0 * i + k) for k, n in enumerate((5, 3, 7, 2))] for i in range(2)]
    buffer = fill_bucket(buckets[0], TaskGradients(rows))
    assert buffer.tolist() == [[0.0] * 5 + [1.0] * 3 + [0.0], [10.0] * 5 + [11.0] * 3 + [0.0]]


def bad_construction_cases():
    yield "plain module", lambda m: DistributedMTLStep(m, m.trunk.parameters()), TypeError, "DistributedDataParallel"
    yield (
        "sync",
        lambda m: DistributedMTLStep(DistributedDataParallel(m), m.trunk.parameters(), sync="fast"),
        ValueError,
        "sync",
    )
    yield (
        "bucket",
        lambda m: DistributedMTLStep(DistributedDataParallel(m), m.trunk.parameters(), bucket_cap_mb=0),
        ValueError,
        "bucket_cap_mb",
    )
    outside = torch.nn.Parameter(torch.ones(4))
    yield (
        "not covered",
        lambda m: DistributedMTLStep(DistributedDataParallel(m), [*m.trunk.parameters(), outside]),
        ValueError,
        r"shapes \[\(4,\)\] that are not",
    )
    yield "ignored by ddp", lambda m: ignored_shared(m), ValueError, "not trainable parameters"
    yield "fsdp memory", lambda m: fsdp_step(mode="memory"), ValueError, "mode='speed' only"
    yield "fsdp local", lambda m: fsdp_step(sync="local"), ValueError, "sync='exact' only"
    yield "fsdp batched", lambda m: fsdp_step(batched_backward=True), ValueError, "without batched_backward"


def fsdp_step(**options):
    model = fsdp_model()
    return DistributedMTLStep(model, model.trunk.parameters(), **options)


def ignored_shared(model):
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["trunk.0.weight"])
    return DistributedMTLStep(DistributedDataParallel(model), model.trunk.parameters())


@pytest.mark.parametrize(
    "name,make,error,match", list(bad_construction_cases()), ids=[c[0] for c in bad_construction_cases()]
)
def test_bad_construction_raises(one_rank_group, name, make, error, match):
    with pytest.raises(error, match=match):
        make(ToyMultiTask())


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_a_reached_tensor_outside_the_wrapped_model_raises(one_rank_group, wrap):
    model = fsdp_model() if wrap == "fsdp" else ToyMultiTask()
    wrapped = model if wrap == "fsdp" else DistributedDataParallel(model)
    stray = torch.nn.Parameter(torch.tensor(2.0))
    losses = wrapped(*toy_batch())
    losses[2] = losses[2] * stray
    step = DistributedMTLStep(wrapped, model.trunk.parameters(), **WEIGHTING)
    match = "not trainable parameters" if wrap == "ddp" else "did not reduce"
    with pytest.raises(ValueError, match=match):
        step.backward(losses)


class KinkBelowFeatures(FeaturesToy):
    """FeaturesToy whose features pass through sqrt at 0 of a shared parameter: finite features and
    cotangents, an infinite derivative below them."""

    def __init__(self):
        super().__init__()
        self.kink = torch.nn.Parameter(torch.zeros(8))

    def features_and_losses(self, inputs, targets):
        features, _ = super().features_and_losses(inputs, targets)
        features = features + self.kink.sqrt()
        return features, [
            (head(features).squeeze(-1) - targets[:, i]).square().mean() for i, head in enumerate(self.heads)
        ]


@pytest.mark.parametrize("held", [None, 7.0])
def test_features_mode_skips_when_the_trunk_gradient_below_the_features_is_not_finite(one_rank_group, held):
    model = KinkBelowFeatures()
    for p in model.parameters():
        p.grad = None if held is None else torch.full_like(p, held)
    ddp = DistributedDataParallel(model)
    step = DistributedMTLStep(ddp, [*model.trunk.parameters(), model.kink], **WEIGHTING)
    features, losses = ddp(*toy_batch())
    weights = step.backward(losses, features=features)
    assert step.last.why_skipped() == ["update"] and torch.equal(weights, torch.zeros(3))
    for p in model.parameters():
        assert bool((p.grad == (0.0 if held is None else held)).all())
