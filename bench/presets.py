"""What a run measures: sizes, repeats and trunks of each preset.

- ``quick``: a CPU in minutes; trunks of a few million parameters, P up to 2²².
- ``full``: a GPU; trunks of tens of millions of parameters, P from 2¹⁶ up to the largest that
  fits (2²⁷ and beyond), and the task gradients of GPT-2 small's 148 parameter tensors.
- ``tiny``: seconds; proves the benchmark code runs end to end (the smoke test uses it), its
  figures mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrunkSpec:
    """A shared trunk: ``kind`` ("mlp", "convnet" or "transformer"), its ``options`` (see
    :mod:`bench.trunks`) and the batch size of a step."""

    kind: str
    batch: int
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TransformerShapes:
    """The parameter tensors of a GPT-2-style decoder (``name``): token and position embeddings,
    ``layers`` blocks of width ``width`` (layer norms, fused QKV, attention output, a 4·width MLP),
    a final layer norm; the output projection is tied to the token embedding."""

    name: str
    width: int
    layers: int
    vocab: int
    context: int

    def shapes(self) -> list[tuple[int, ...]]:
        """The tensors' shapes in the order ``named_parameters()`` lists them."""
        width = self.width
        block = [
            (width,),
            (width,),
            (3 * width, width),
            (3 * width,),
            (width, width),
            (width,),
            (width,),
            (width,),
            (4 * width, width),
            (4 * width,),
            (width, 4 * width),
            (width,),
        ]
        return [(self.vocab, width), (self.context, width)] + block * self.layers + [(width,), (width,)]


@dataclass(frozen=True)
class KernelPlan:
    """Kernel passes over a ``[T, P]`` matrix: every T with every P = 2^k, for each dtype; and
    over the task gradients of a transformer's parameter tensors (``multi_tensor``, one ``[T, n]``
    block per tensor) for each of ``multi_tensor_tasks``. A size is measured only where its
    working set fits ``memory_fraction`` of the free memory."""

    tasks: tuple[int, ...]
    log2_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    multi_tensor: TransformerShapes
    multi_tensor_tasks: tuple[int, ...]
    warmup: int
    repeats: int
    memory_fraction: float = 0.6


@dataclass(frozen=True)
class StepPlan:
    """Training steps on each trunk with ``tasks`` task heads."""

    trunks: tuple[TrunkSpec, ...]
    tasks: int
    warmup: int
    repeats: int


@dataclass(frozen=True)
class ScalingPlan:
    """Step cost against T (on ``trunk``) and against P (MLPs of ``depth`` layers, each width of
    ``widths`` in turn, ``tasks`` heads, batches of ``batch``)."""

    trunk: TrunkSpec
    task_counts: tuple[int, ...]
    widths: tuple[int, ...]
    depth: int
    tasks: int
    batch: int
    warmup: int
    repeats: int


@dataclass(frozen=True)
class DistributedPlan:
    """The distributed step on gloo ranks (:mod:`bench.bench_distributed`): a tanh MLP trunk of
    ``width`` with ``tasks`` heads, ``batch`` samples a rank, for each of ``world_sizes``."""

    world_sizes: tuple[int, ...]
    tasks: int
    width: int
    batch: int
    warmup: int
    steps: int


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    kernels: KernelPlan
    steps: StepPlan
    scaling: ScalingPlan
    distributed: DistributedPlan


GPT2_SMALL = TransformerShapes("GPT-2 small", width=768, layers=12, vocab=50257, context=1024)


QUICK = Preset(
    name="quick",
    description="CPU in minutes: trunks of a few million parameters, kernel passes up to P = 2^22",
    kernels=KernelPlan(
        tasks=(2, 4, 8, 16, 32),
        log2_sizes=(16, 18, 20, 22),
        dtypes=("float32", "bfloat16", "float16"),
        multi_tensor=TransformerShapes(
            "GPT-2 shapes, width 256, 4 layers", width=256, layers=4, vocab=8192, context=256
        ),
        multi_tensor_tasks=(2, 8),
        warmup=2,
        repeats=7,
    ),
    steps=StepPlan(
        trunks=(
            TrunkSpec("mlp", batch=128, options={"in_features": 512, "width": 1024, "depth": 4}),
            TrunkSpec("convnet", batch=16, options={"channels": (64, 128, 256, 256), "image_size": 32}),
            TrunkSpec("transformer", batch=8, options={"d_model": 256, "layers": 4, "heads": 4, "seq_len": 32}),
        ),
        tasks=4,
        warmup=1,
        repeats=5,
    ),
    scaling=ScalingPlan(
        trunk=TrunkSpec("mlp", batch=64, options={"in_features": 256, "width": 512, "depth": 3}),
        task_counts=(2, 4, 8, 16, 32),
        widths=(128, 256, 512, 1024),
        depth=3,
        tasks=4,
        batch=64,
        warmup=1,
        repeats=3,
    ),
    distributed=DistributedPlan(world_sizes=(1, 2), tasks=4, width=512, batch=64, warmup=3, steps=30),
)

FULL = Preset(
    name="full",
    description="GPU: trunks of tens of millions of parameters, kernel passes up to the largest P that fits",
    kernels=KernelPlan(
        tasks=(2, 4, 8, 16),
        log2_sizes=tuple(range(16, 31)),
        dtypes=("float32", "bfloat16"),
        multi_tensor=GPT2_SMALL,
        multi_tensor_tasks=(2, 8, 16),
        warmup=5,
        repeats=20,
        memory_fraction=0.75,
    ),
    steps=StepPlan(
        trunks=(
            TrunkSpec("mlp", batch=1024, options={"in_features": 1024, "width": 4096, "depth": 4}),
            TrunkSpec("convnet", batch=64, options={"channels": (256, 512, 1024, 1024), "image_size": 64}),
            TrunkSpec("transformer", batch=16, options={"d_model": 1024, "layers": 8, "heads": 16, "seq_len": 256}),
        ),
        tasks=8,
        warmup=3,
        repeats=20,
    ),
    scaling=ScalingPlan(
        trunk=TrunkSpec("mlp", batch=512, options={"in_features": 1024, "width": 2048, "depth": 4}),
        task_counts=(2, 4, 8, 16, 32),
        widths=(256, 512, 1024, 2048, 4096),
        depth=3,
        tasks=8,
        batch=512,
        warmup=3,
        repeats=10,
    ),
    distributed=DistributedPlan(world_sizes=(1, 2), tasks=8, width=1024, batch=128, warmup=3, steps=30),
)

TINY = Preset(
    name="tiny",
    description="seconds: proves the benchmark code runs; its figures mean nothing",
    kernels=KernelPlan(
        tasks=(2, 4),
        log2_sizes=(10, 12),
        dtypes=("float32", "bfloat16"),
        multi_tensor=TransformerShapes("GPT-2 shapes, width 16, 1 layer", width=16, layers=1, vocab=64, context=8),
        multi_tensor_tasks=(2,),
        warmup=1,
        repeats=2,
    ),
    steps=StepPlan(
        trunks=(
            TrunkSpec("mlp", batch=8, options={"in_features": 16, "width": 32, "depth": 2}),
            TrunkSpec("convnet", batch=4, options={"channels": (4, 8), "image_size": 8}),
            TrunkSpec("transformer", batch=2, options={"d_model": 16, "layers": 1, "heads": 2, "seq_len": 4}),
        ),
        tasks=3,
        warmup=1,
        repeats=2,
    ),
    scaling=ScalingPlan(
        trunk=TrunkSpec("mlp", batch=8, options={"in_features": 16, "width": 32, "depth": 2}),
        task_counts=(2, 4),
        widths=(16, 32),
        depth=2,
        tasks=2,
        batch=8,
        warmup=1,
        repeats=2,
    ),
    distributed=DistributedPlan(world_sizes=(1, 2), tasks=2, width=32, batch=8, warmup=1, steps=3),
)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (QUICK, FULL, TINY)}
