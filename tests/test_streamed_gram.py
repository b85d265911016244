"""Memory mode's exact Gram matrix (:mod:`emtl_kernels.streamed_gram`): G and ``.grad`` against
float64 autograd and against speed mode, over models with tied weights, LayerNorm, attention,
embeddings, frozen and unreached parameters; and the memory it saves."""

from __future__ import annotations

import copy

import pytest
import torch
from _asserts import GRAM_RTOL, assert_within, gram64
from multitask_models import ToyMultiTask, toy_batch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.memory import cpu_peak_increase
from emtl_kernels import MTLStep, StreamedGramError, available_backends
from emtl_kernels.sole_use_layers import sole_use_layers
from emtl_kernels.streamed_gram import GramAccumulator, streamed_gram
from emtl_kernels.task_gradients import TaskGradients

LOSS_SCALES = (1.0, 30.0, 0.05, 3.0)
# The float32 model's gradients against its float64 twin's: the backward's own rounding, relative
# to sqrt(G_ii G_jj) (the Gram pass alone stays within GRAM_RTOL of its float32 input).
MODEL_GRAM_RTOL = 1e-4


class TiedTrunk(nn.Module):
    """Token embeddings, self-attention, a LayerNorm and an output projection tied to the
    embedding; a frozen linear layer on the path and a trainable one the forward never uses."""

    def __init__(self, vocab: int = 13, width: int = 8, heads: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.frozen = nn.Linear(width, width).requires_grad_(False)
        self.unreached = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = self.norm(x + torch.tanh(self.frozen(x)))
        return (x @ self.embedding.weight.T).mean(dim=1)


class LinearUsesTrunk(nn.Module):
    """Linear layers in each form the graph may hold them: a bias-free one on a one-hot input (its
    product has nothing but the weight below it), one on a 3-D input and one on a transposed one,
    one applied twice, an output projection tied to the token embedding, and a frozen one."""

    def __init__(self, vocab: int = 13, width: int = 8, hidden: int = 12):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.one_hot = nn.Linear(vocab, width, bias=False)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.twice = nn.Linear(width, width)
        self.frozen = nn.Linear(width, width).requires_grad_(False)
        self.norm = nn.LayerNorm(width)
        self.tied = nn.Linear(width, vocab)
        self.tied.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        one_hot = nn.functional.one_hot(tokens, self.tied.out_features).to(self.one_hot.weight.dtype)
        x = self.embedding(tokens) + self.one_hot(one_hot)
        hidden = torch.tanh(self.up(x))
        x = x + self.down(hidden.transpose(0, 1)).transpose(0, 1)
        x = self.twice(torch.tanh(self.twice(x)))
        return self.tied(self.norm(x + self.frozen(x))).mean(dim=1)


class EmbeddingTrunk(nn.Module):
    """Token embeddings (row 0 for padding) on 2-D indices that repeat, positions looked up by
    ``F.embedding`` on 1-D ones, norm-bounded embeddings whose gradient rows are scaled by the
    tokens' counts, a LayerNorm and an output projection."""

    def __init__(self, vocab: int = 13, width: int = 8, length: int = 5):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(length, width))
        self.scaled = nn.Embedding(vocab, width, max_norm=1.0, scale_grad_by_freq=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = nn.functional.embedding(torch.arange(tokens.shape[1]), self.positions)
        x = self.tokens(tokens) + positions + self.scaled(tokens.flip(0))
        return self.out(self.norm(x)).mean(dim=1)


class TiedMultiTask(nn.Module):
    def __init__(self, num_tasks: int = 4, seed: int = 0, trunk: type[nn.Module] = TiedTrunk):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = trunk()
        self.heads = nn.ModuleList(nn.Linear(13, 1) for _ in range(num_tasks))

    def losses(self, tokens: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(tokens)
        return [
            LOSS_SCALES[i % len(LOSS_SCALES)] * (head(features).squeeze(-1) - targets[:, i]).square().mean()
            for i, head in enumerate(self.heads)
        ]


def tied_batch(num_tasks: int = 4, dtype=torch.float32):
    """Tokens [6, 5] of a vocabulary of 13 (so repeated), row 0 (padding) among them."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 13, (6, 5), generator=generator)
    tokens[0, 0] = 0
    return tokens, torch.randn(6, num_tasks, generator=generator, dtype=torch.float64).to(dtype)


MODELS = {
    "mlp": (ToyMultiTask, lambda dtype=torch.float32: toy_batch(3, dtype=dtype)),
    "tied transformer": (TiedMultiTask, tied_batch),
    "linear uses": (lambda: TiedMultiTask(trunk=LinearUsesTrunk), tied_batch),
    "embeddings": (lambda: TiedMultiTask(trunk=EmbeddingTrunk), tied_batch),
}


def reference_jacobian64(model: nn.Module, batch_of) -> torch.Tensor:
    """J on the trunk's trainable parameters, [T, P], by T float64 backward passes."""
    model64 = copy.deepcopy(model).double()
    losses = model64.losses(*batch_of(dtype=torch.float64))
    shared = [p for p in model64.trunk.parameters() if p.requires_grad]
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def assert_gram_near(gram: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = expected.diagonal().double().sqrt()
    assert_within(gram, expected.double(), rtol * torch.outer(scale, scale) + 1e-30, "Gram matrix")


def forward_under(autocast: torch.dtype | None):
    """CPU autocast to ``autocast`` over the forward, or none."""
    return torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None)


def run(make_model, batch_of, weighting: str, autocast: torch.dtype | None = None, **options):
    model = make_model()
    step = MTLStep(model.trunk.parameters(), weighting, **options)
    with forward_under(autocast):
        losses = model.losses(*batch_of())
    weights = step.backward(losses)
    return step, weights, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("weighting", ["upgrad", "mgda", "cagrad"])
def test_memory_mode_forms_the_exact_gram_matrix_and_writes_speed_modes_update(model_name, weighting):
    make_model, batch_of = MODELS[model_name]
    speed, speed_weights, speed_grads = run(make_model, batch_of, weighting)
    memory, memory_weights, memory_grads = run(make_model, batch_of, weighting, mode="memory")
    assert memory.last.gram is not None
    assert_gram_near(memory.last.gram, gram64(reference_jacobian64(make_model(), batch_of)), MODEL_GRAM_RTOL)
    assert_gram_near(memory.last.gram, speed.last.gram, GRAM_RTOL * 10)
    torch.testing.assert_close(memory_weights, speed_weights, rtol=1e-4, atol=1e-6)
    assert speed_grads.keys() == memory_grads.keys()
    for name, grad in speed_grads.items():
        if grad is None:  # the frozen and the unreached parameters
            assert memory_grads[name] is None, name
            continue
        scale = grad.double().norm()
        assert (memory_grads[name].double() - grad.double()).norm() <= 1e-4 * scale + 1e-12, name


@pytest.mark.parametrize("head_gradients", ["weighted", "unweighted"])
def test_a_weighting_of_the_norms_gets_the_same_step_from_the_vectorised_backward(head_gradients):
    """``batched_backward`` in memory mode: G from the one vectorised backward, not T passes."""
    results = [
        run(TiedMultiTask, tied_batch, "emtl", mode="memory", head_gradients=head_gradients, **options)
        for options in ({}, {"batched_backward": True})
    ]
    (by_passes, passes_weights, passes_grads), (streamed, streamed_weights, streamed_grads) = results
    assert by_passes.last.gram is None
    exact = gram64(reference_jacobian64(TiedMultiTask(), tied_batch))
    assert_gram_near(streamed.last.gram, exact, MODEL_GRAM_RTOL)
    torch.testing.assert_close(streamed.last.sq_norms, by_passes.last.sq_norms, rtol=1e-4, atol=0)
    torch.testing.assert_close(streamed_weights, passes_weights, rtol=1e-4, atol=1e-6)
    for name, grad in passes_grads.items():
        if grad is None:
            assert streamed_grads[name] is None, name
        else:
            torch.testing.assert_close(streamed_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_norm_params_in_memory_mode_take_the_exact_gram_matrix_on_the_subset():
    results = []
    for options in ({}, {"mode": "memory"}):
        model = ToyMultiTask()
        step = MTLStep(model.trunk.parameters(), "upgrad", norm_params=model.trunk[2].parameters(), **options)
        weights = step.backward(model.losses(*toy_batch(3)))
        results.append((step.last.gram, weights, [p.grad for p in model.parameters()]))
    (speed_gram, speed_weights, speed_grads), (memory_gram, memory_weights, memory_grads) = results
    assert_gram_near(memory_gram, speed_gram, GRAM_RTOL * 10)
    torch.testing.assert_close(memory_weights, speed_weights, rtol=1e-4, atol=1e-6)
    for memory_grad, speed_grad in zip(memory_grads, speed_grads, strict=True):
        torch.testing.assert_close(memory_grad, speed_grad, rtol=1e-4, atol=1e-6)


def tied_losses(weight: torch.Tensor, first_use: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Three losses of a weight used twice (an encoder and its transposed decoder); with
    ``first_use``, that tensor stands in for the weight's first use."""
    inputs = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(weight.dtype)
    decoded = torch.tanh(inputs @ (weight if first_use is None else first_use)) @ weight.T
    return [(decoded * scale).sin().sum() for scale in (1.0, -2.0, 0.5)]


def test_a_tied_weight_contributes_the_gram_matrix_of_its_summed_gradient():
    weight = nn.Parameter(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))
    gram, reached = streamed_gram(tied_losses(weight), [weight], backend="auto")
    assert reached == [True]
    weight64 = weight.detach().double().requires_grad_()
    rows = [torch.autograd.grad(loss, weight64, retain_graph=True)[0].reshape(-1) for loss in tied_losses(weight64)]
    exact = gram64(torch.stack(rows))
    assert_gram_near(gram, exact, MODEL_GRAM_RTOL)
    # What summing each use's Gram matrix would give instead: far outside the bound.
    first = weight64.detach().clone().requires_grad_()
    per_use = [torch.autograd.grad(loss, [first, weight64], retain_graph=True) for loss in tied_losses(weight64, first)]
    sum_of_uses = sum(gram64(torch.stack([grads[u].reshape(-1) for grads in per_use])) for u in range(2))
    scale = exact.diagonal().sqrt()
    assert ((sum_of_uses - exact).abs() / torch.outer(scale, scale)).max() > 1e3 * MODEL_GRAM_RTOL


def test_parameters_no_loss_reaches_are_reported_and_left_out():
    model = TiedMultiTask()
    shared = [p for p in model.trunk.parameters() if p.requires_grad]
    gram, reached = streamed_gram(model.losses(*tied_batch()), shared, backend="auto")
    unreached = {id(p) for p in model.trunk.unreached.parameters()}
    assert reached == [id(p) not in unreached for p in shared]
    assert_gram_near(gram, gram64(reference_jacobian64(TiedMultiTask(), tied_batch)), MODEL_GRAM_RTOL)
    assert all(p.grad is None for p in model.parameters())


def test_the_accumulator_reduces_its_pending_blocks_once_they_hold_its_capacity():
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(3, *shape, generator=generator) for shape in [(4,), (2, 3), (5,), (1,), (7,)]]
    accumulator = GramAccumulator(3, capacity=3 * 6, device=torch.device("cpu"), backend="auto")
    pending = []
    for block in blocks:
        accumulator.add(block)
        pending.append(block.numel())
        if sum(pending) >= 18:
            pending = []
        assert accumulator._pending_numel == sum(pending)
    exact = torch.cat([block.reshape(3, -1) for block in blocks], dim=1).double()
    assert_gram_near(accumulator.flush(), gram64(exact), GRAM_RTOL)
    assert accumulator._pending_numel == 0


class ItemInBackward(torch.autograd.Function):
    """Doubles its input; its backward reads a value on the host, which no vmap can batch."""

    @staticmethod
    def forward(ctx, inputs):
        return inputs * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 + 0 * grad.sum().item()


def test_an_op_without_a_batched_form_raises_by_name_and_writes_nothing():
    weight = nn.Parameter(torch.randn(4))
    doubled = ItemInBackward.apply(weight)
    step = MTLStep([weight], "upgrad", mode="memory")
    with pytest.raises(StreamedGramError, match=r"mode='memory'.*\.item\(\)"):
        step.backward([doubled.sum(), doubled.square().sum()])
    assert weight.grad is None and step.last is None


def test_memory_mode_keeps_no_task_gradient_matrix():
    """Peak extra CPU tensor bytes of a step on a deep MLP: speed mode holds T·P·s of task
    gradients; memory mode's exact G at most the update (P·s) and twice T times the largest
    parameter in pending blocks, plus the vectorised backward's activation gradients."""
    num_tasks, width, depth, batch = 8, 192, 6, 16
    peaks = {}
    for mode in ("speed", "memory"):
        torch.manual_seed(0)
        trunk = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])
        heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))
        inputs = torch.randn(batch, width)
        step = MTLStep(trunk.parameters(), "upgrad", mode=mode)

        def one_step(trunk=trunk, heads=heads, inputs=inputs, step=step):
            features = trunk(inputs)
            step.backward([(i + 1) * head(features).square().mean() for i, head in enumerate(heads)])

        peaks[mode] = cpu_peak_increase(one_step)
    shared_bytes = depth * (width * width + width) * 4
    activation_gradients = num_tasks * depth * 2 * batch * width * 4
    assert peaks["speed"] >= num_tasks * shared_bytes
    assert peaks["memory"] <= 0.5 * peaks["speed"]
    assert peaks["memory"] <= shared_bytes + 2 * num_tasks * (width * width) * 4 + activation_gradients


@pytest.mark.parametrize("model_name", ["mlp", "embeddings"])
def test_bfloat16_parameters_get_speed_modes_gram_matrix_within_their_rounding(model_name):
    """The blocks reach the Gram pass in their storage dtype; the vectorised backward rounds its
    bfloat16 gradients in another order than T passes may (one rounding, 2⁻⁸ relative), and an
    embedding's repeated rows are summed in float32, where speed mode sums them in bfloat16."""
    make_model, batch_of = MODELS[model_name]
    grams = []
    for mode in ("speed", "memory"):
        model = make_model().to(torch.bfloat16)
        step = MTLStep(model.trunk.parameters(), "upgrad", mode=mode)
        step.backward(model.losses(*batch_of(dtype=torch.bfloat16)))
        assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
        grams.append(step.last.gram)
    assert grams[1].dtype == torch.float32
    assert_gram_near(grams[1], grams[0], 2**-8)


def norm_of(grads: dict[str, torch.Tensor | None], prefix: str) -> torch.Tensor:
    """The float64 norm of the gradients of the parameters named from ``prefix``, together."""
    parts = [g.double().reshape(-1) for n, g in grads.items() if n.startswith(prefix) and g is not None]
    return torch.cat(parts).norm()


# LinearUsesTrunk's LayerNorm on a bfloat16 input has a backward that vmap cannot run under CPU
# autocast ("expected scalar type BFloat16 but found Float"), on the per-parameter path as well.
@pytest.mark.parametrize("model_name", ["mlp", "tied transformer", "embeddings"])
@pytest.mark.parametrize("weighting", ["upgrad", "mgda", "cagrad"])
def test_under_autocast_memory_mode_gets_speed_modes_step_within_bfloat16_rounding(model_name, weighting):
    """Under CPU autocast to bfloat16 the float32 weights' task gradients are bfloat16 products:
    speed mode's G is that of each rounded to bfloat16, the layer form's that of the unrounded
    products (2⁻⁸ relative at most). The update comes from one bfloat16 backward of Σ w_i L_i in
    memory mode, from the sum of the T widened gradients in speed mode: they differ by a few
    roundings of the terms w_i g_i, plus the terms' share of the weights' difference."""
    make_model, batch_of = MODELS[model_name]
    speed, speed_weights, speed_grads = run(make_model, batch_of, weighting, autocast=torch.bfloat16)
    memory, memory_weights, memory_grads = run(make_model, batch_of, weighting, autocast=torch.bfloat16, mode="memory")
    assert_gram_near(memory.last.gram, speed.last.gram, 2**-8)
    task_norms = speed.last.gram.double().diagonal().sqrt()
    weight_errors = (memory_weights - speed_weights).double().abs()
    assert [n for n, g in memory_grads.items() if g is None] == [n for n, g in speed_grads.items() if g is None]

    differences = {n: memory_grads[n].double() - g.double() for n, g in speed_grads.items() if g is not None}
    # Head i's gradient is w_i h_i: the weights' difference moves it by Δw_i ‖h_i‖, ‖h_i‖ read from
    # whichever mode gave it a nonzero weight (MGDA may give a task none).
    moved_heads = sum(
        weight_errors[i]
        * max(
            (norm_of(grads, f"heads.{i}.") / weights[i].double().abs()).nan_to_num(0.0, posinf=0.0)
            for grads, weights in ((speed_grads, speed_weights), (memory_grads, memory_weights))
        )
        for i in range(len(speed_weights))
    )
    assert (
        norm_of(differences, "trunk.")
        <= 2**-6 * (speed_weights.double().abs() * task_norms).sum() + (weight_errors * task_norms).sum()
    )
    assert norm_of(differences, "heads.") <= 2**-6 * norm_of(speed_grads, "heads.") + moved_heads


@pytest.mark.parametrize("gathering", [None, TaskGradients.from_blocks])
def test_under_autocast_a_linear_layer_forms_the_gram_matrix_of_its_unrounded_products(gathering):
    """The layer form's share is float64's of the same bfloat16 D and X to float32 rounding; the
    per-parameter path's block is D_iᵀ X rounded to bfloat16, then widened."""
    generator = torch.Generator().manual_seed(4)
    layer = nn.Linear(24, 10)
    inputs = torch.randn(16, 24, generator=generator)
    output_grads = torch.randn(3, 16, 10, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = layer(inputs)
    # L_i = ⟨Y, C_i⟩ read in float32: D_i is C_i rounded to bfloat16.
    losses = [(outputs.float() * grads).sum() for grads in output_grads]
    gram, _ = streamed_gram(losses, [layer.weight], backend="auto", gathering=gathering)
    weight_grads = output_grads.bfloat16().double().transpose(1, 2) @ inputs.bfloat16().double()
    assert_gram_near(gram, gram64(weight_grads.reshape(3, -1)), MODEL_GRAM_RTOL if gathering is None else 2**-8)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_every_backend_streams_the_same_gram_matrix(backend):
    """The Gram pass runs inside the vectorised backward, on plain tensors, with any backend."""
    model = TiedMultiTask()
    shared = [p for p in model.trunk.parameters() if p.requires_grad]
    gram, _ = streamed_gram(model.losses(*tied_batch()), shared, backend=backend)
    assert_gram_near(gram, gram64(reference_jacobian64(TiedMultiTask(), tied_batch)), MODEL_GRAM_RTOL)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
def test_only_a_weight_used_once_by_a_linear_product_or_an_embedding_takes_the_layer_form(autocast):
    """The weights on 3-D input (contiguous or not), attention's projections and the untied
    embeddings take it, those at the bottom of the graph captured at their node; the tied, the
    twice-applied weights and the biases do not. Under autocast the same: a linear product takes
    its weight through a cast, which a layer applied twice shares between its two products."""
    runs = {
        LinearUsesTrunk: {"up.weight": True, "down.weight": True, "one_hot.weight": False},
        TiedTrunk: {"attention.in_proj_weight": True, "attention.out_proj.weight": True},
        EmbeddingTrunk: {"tokens.weight": False, "positions": False, "scaled.weight": False, "out.weight": True},
    }
    for trunk, expected in runs.items():
        model = TiedMultiTask(trunk=trunk)
        shared = [(name, p) for name, p in model.trunk.named_parameters() if p.requires_grad]
        with forward_under(autocast):
            losses = model.losses(*tied_batch())
        layers = sole_use_layers([torch.stack(losses)], [p for _, p in shared])
        assert {shared[k][0]: layer.runs for k, layer in layers.items()} == expected


def test_shared_parameters_that_all_take_the_layer_form():
    """No parameter on the per-parameter path: the backward only captures the embedding's input."""
    embedding = nn.Embedding(13, 4, padding_idx=0)
    features = embedding(tied_batch()[0]).mean(dim=1)
    losses = [(features[:, i] * features[:, -1]).sum() for i in range(3)]
    gram, reached = streamed_gram(losses, [embedding.weight], backend="auto")
    assert reached == [True]
    rows = [torch.autograd.grad(loss, embedding.weight, retain_graph=True)[0].reshape(-1) for loss in losses]
    assert_gram_near(gram, gram64(torch.stack(rows).double()), MODEL_GRAM_RTOL)


def test_a_sparse_embedding_keeps_the_per_parameter_path_and_fails_by_name():
    embedding = nn.Embedding(13, 4, sparse=True)
    features = embedding(tied_batch()[0]).sum(dim=(0, 1))
    assert sole_use_layers([features], [embedding.weight]) == {}
    with pytest.raises(StreamedGramError, match="mode='memory'"):
        streamed_gram([features[0], features[1]], [embedding.weight], backend="auto")


def test_a_weight_cast_to_float64_keeps_the_per_parameter_path():
    """The layer form is formed in a dtype of the Gram pass: a float32 weight multiplied in float64
    takes its float32 gradient from the per-parameter path."""
    layer = nn.Linear(6, 4)
    inputs = torch.randn(5, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    outputs = nn.functional.linear(inputs, layer.weight.double())
    assert sole_use_layers([outputs], [layer.weight]) == {}
    losses = [outputs[:, i].sin().sum() for i in range(3)]
    gram, reached = streamed_gram(losses, [layer.weight], backend="auto")
    assert reached == [True]
    rows = [torch.autograd.grad(loss, layer.weight, retain_graph=True)[0].reshape(-1) for loss in losses]
    assert_gram_near(gram, gram64(torch.stack(rows).double()), MODEL_GRAM_RTOL)


class CutGradient(torch.autograd.Function):
    """The identity, whose backward passes no gradient on."""

    @staticmethod
    def forward(ctx, inputs):
        return inputs.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def test_a_layer_no_gradient_reaches_is_reported_unreached():
    """Below a cut, a linear layer (its product runs) and an embedding (captured at its node)."""
    torch.manual_seed(0)
    embedding, cut, kept = nn.Embedding(9, 4), nn.Linear(4, 6), nn.Linear(6, 3)
    features = kept(CutGradient.apply(cut(embedding(torch.tensor([1, 5, 1, 8, 0])))))
    shared = [embedding.weight, cut.weight, cut.bias, kept.weight, kept.bias]
    assert {k: layer.runs for k, layer in sole_use_layers([features], shared).items()} == {0: False, 1: True, 3: True}
    losses = [features[:, i].square().sum() for i in range(3)]
    gram, reached = streamed_gram(losses, shared, backend="auto")
    assert reached == [False, False, False, True, True]
    jacobian = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared[3:], retain_graph=True)])
            for loss in losses
        ]
    )
    assert_gram_near(gram, gram64(jacobian.double()), MODEL_GRAM_RTOL)


class OutputShapes(TorchDispatchMode):
    """The shape of every new tensor (not a view) an op returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and not func.is_view:
            self.shapes.append(tuple(result.shape))
        return result


def wide_trunk(num_tasks: int, vocab: int, width: int, hidden: int, batch: int, autocast: torch.dtype | None = None):
    """Losses of T heads on a trunk of a token embedding and two up and down linear pairs, and the
    trunk's parameters; the forward under CPU autocast to ``autocast``, if given."""
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Embedding(vocab, width),
        *[m for _ in range(2) for m in (nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))],
    )
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))
    with forward_under(autocast):
        features = trunk(torch.randint(0, vocab, (batch,)))
        losses = [(i + 1) * head(features).float().square().mean() for i, head in enumerate(heads)]
    return losses, list(trunk.parameters())


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("gathering", [None, TaskGradients.from_blocks])
def test_the_weight_and_table_gradients_are_formed_only_on_the_per_parameter_path(gathering, autocast):
    """With a gathering the blocks are the weight gradients [T, out, in] and the table's [T, V, d];
    without, the layers never form one (the linear layers' ghost form here, and the direct form's
    tiles hold fewer rows; the embedding's merged rows are [T, N, d]), under autocast as well. The
    task gradients of autograd are bfloat16 products under autocast, the layer form's unrounded."""
    num_tasks, vocab, width, hidden = 4, 50, 96, 160
    losses, shared = wide_trunk(num_tasks, vocab, width, hidden, batch=8, autocast=autocast)
    with OutputShapes() as recorded:
        gram, _ = streamed_gram(losses, shared, backend="auto", gathering=gathering)
    for weight_shapes in ({(hidden, width), (width, hidden)}, {(vocab, width)}):
        formed = [shape for shape in recorded.shapes if shape[-2:] in weight_shapes]
        assert bool(formed) == (gathering is not None), weight_shapes
    jacobian = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    )
    assert_gram_near(gram, gram64(jacobian.double()), MODEL_GRAM_RTOL if autocast is None else 2**-8)


@pytest.mark.parametrize("vocab", [64, 16384])
def test_the_layer_form_saves_the_weight_gradient_blocks(vocab):
    """Peak extra CPU tensor bytes of the streamed Gram matrix on a linear-heavy trunk (forward
    included): the per-parameter path holds at least one block of the largest weight more, the
    [T, V, d] table gradients for a large vocabulary."""
    num_tasks, width, hidden = 8, 128, 512
    peaks = {}
    for gathering in (None, TaskGradients.from_blocks):

        def gram_of_one_batch(gathering=gathering):
            losses, shared = wide_trunk(num_tasks, vocab, width, hidden, batch=64)
            streamed_gram(losses, shared, backend="auto", gathering=gathering)

        peaks[gathering] = cpu_peak_increase(gram_of_one_batch)
    block_bytes = num_tasks * max(hidden, vocab) * width * 4
    assert peaks[None] <= peaks[TaskGradients.from_blocks] - block_bytes


def test_a_layer_norm_of_a_bfloat16_linear_output_under_cpu_autocast_fails_by_name():
    """The limit the README states: torch.func.vmap's LayerNorm backward hands the linear layer
    below it a float32 gradient of its bfloat16 output; speed mode's batched backward serves it.
    Should PyTorch fix it, this fails and the README's sentence goes."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def losses():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = trunk(torch.randn(5, 6))
            return [head(features).float().square().mean() for head in heads]

    with pytest.raises(StreamedGramError, match="expected scalar type BFloat16 but found Float"):
        MTLStep(trunk.parameters(), "upgrad", mode="memory").backward(losses())
    speed = MTLStep(trunk.parameters(), "upgrad", batched_backward=True)
    speed.backward(losses())
    assert torch.isfinite(speed.last.gram).all()
