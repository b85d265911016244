"""Step level: the cost of one training step on a realistic trunk, for every way of taking it.

The paths, all on the same model and batch:

1. ``floor``: equal weighting, ``sum(losses).backward()``: the least any multi-task step costs.
2. ``library``: the usual library path (:mod:`bench.library_path`): a loop of ``autograd.grad``,
   ``torch.cat`` into T×P, norms, weighted sum, split and copy into ``.grad``.
3. ``torchjd``: TorchJD's ``mtl_backward`` and ``jac_to_grad`` (:mod:`bench.torchjd_path`), in
   its default form and with ``optimize_gramian_computation`` ("gramian"), when installed; on
   request its autogram engine ("autogram": the Gramian from per-module hooks, then one backward
   of Σ_i w_i L_i), which hooks the forward: it runs on its own copy of the model.
4. ``mtlstep``: :class:`emtl_kernels.MTLStep` in speed and memory mode and in features mode
   (``backward(losses, features=...)``), for each measured backend (and speed mode with one
   vectorised backward, "speed+batched"); on request, norms on the last shared layer
   ("norm_params"), and memory mode with ``batched_backward`` ("memory+batched": the exact G
   from one vectorised backward for a weighting that reads only the norms; a weighting that
   reads all of G gets it so in plain memory mode).
5. ``mtlstep/one-backward/equal``: MTLStep with equal weighting, which reads no gradients and
   runs one backward of the sum: its cost over the floor is the step's own.

Paths 2 to 4 run for each weighting (EMTL and gradient-norm scaling by default).

What a sample times (``clock``: CUDA events on a GPU, ``perf_counter`` on a CPU): ``step`` from
before the forward pass to the end of the update; ``forward``; ``backward_and_update`` (all after
the forward); ``task_gradients``: the time inside the calls that compute the T task gradients
(each ``autograd.grad`` of path 2, ``mtl_backward`` of path 3, MTLStep's task-gradient call in
speed mode); ``post_backward`` = ``backward_and_update`` − ``task_gradients``: Gram or norms,
weights, combination, writing ``.grad``, and each path's own host work. Memory mode interleaves its
norms with the backward passes and the floor has no such part: NaN there. Peak memory is measured
in a separate, untimed step (:mod:`bench.memory`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from emtl_kernels import MTLStep, make_weighting

from .library_path import LibraryStyleStep
from .memory import peak_bytes
from .plan import Job
from .presets import Preset, TrunkSpec
from .timing import Clock, Sampler, first_run, measure_interleaved
from .trunks import MultiTaskModel, build_model

WEIGHTINGS = ("emtl", "gradnorm_scaling")

#: (features, losses, clock) -> the (start, end) timestamps of the task-gradient calls, or None
#: where the path has no separate post-backward part.
PathRun = Callable[[Tensor, list[Tensor], Clock], "list[tuple] | None"]


def torchjd_installed() -> bool:
    return importlib.util.find_spec("torchjd") is not None


@dataclass
class StepPath:
    """One way of taking a step: ``family`` (floor, library, torchjd, mtlstep) and its options."""

    family: str
    run: PathRun
    weighting: str | None = None
    variant: str | None = None
    backend: str | None = None
    #: The forward the path needs instead of the model's own, ``batch -> (features, losses)``.
    forward: Callable[[tuple[Tensor, Tensor]], tuple[Tensor, list[Tensor]]] | None = None

    @property
    def key(self) -> str:
        return "/".join(part for part in (self.family, self.variant, self.weighting, self.backend) if part)

    def describe(self) -> dict:
        return {"path": self.family, "variant": self.variant, "weighting": self.weighting, "backend": self.backend}


class _MarkedMTLStep(MTLStep):
    """An MTLStep that timestamps the call computing its T task gradients, so that the
    post-backward part of the real step can be told apart without re-implementing it."""

    clock: Clock | None = None
    gradient_interval: tuple | None = None

    def _task_gradients(self, *args, **kwargs):
        start = self.clock.now()
        grads = super()._task_gradients(*args, **kwargs)
        self.gradient_interval = (start, self.clock.now())
        return grads


def _floor_path() -> StepPath:
    def run(features, losses, clock):
        sum(losses).backward()
        return None

    return StepPath("floor", run)


#: MTLStep's variants: speed and memory mode, speed mode with one vectorised backward, features
#: mode, and norms on the last shared layer.
MTLSTEP_VARIANTS = ("speed", "memory", "speed+batched", "memory+batched", "features", "norm_params")


def _mtlstep_path(model: MultiTaskModel, weighting: str, variant: str, backend: str) -> StepPath:
    if variant not in MTLSTEP_VARIANTS:
        raise ValueError(f"unknown MTLStep variant {variant!r}; known: {', '.join(MTLSTEP_VARIANTS)}")
    step = _MarkedMTLStep(
        model.trunk.parameters(),
        weighting,
        backend=backend,
        mode="memory" if variant.startswith("memory") else "speed",
        batched_backward=variant.endswith("+batched"),
        norm_params=model.last_shared_layer().parameters() if variant == "norm_params" else None,
    )
    # Only speed mode's task gradients end where its post-backward part starts: the other
    # variants run a backward after them.
    separable = variant in ("speed", "speed+batched")

    def run(features, losses, clock):
        step.clock, step.gradient_interval = clock, None
        step.backward(losses, features=features if variant == "features" else None)
        return [step.gradient_interval] if separable and step.gradient_interval is not None else None

    return StepPath("mtlstep", run, weighting, variant, backend)


def _one_backward_path(model: MultiTaskModel, backend: str, weighting: str) -> StepPath:
    step = MTLStep(model.trunk.parameters(), weighting, backend=backend)

    def run(features, losses, clock):
        step.backward(losses)
        return None

    return StepPath("mtlstep", run, weighting, "one-backward", backend)


def _same_as_memory_mode(weighting: str, variant: str) -> bool:
    """Whether ``variant`` is plain memory mode under another name: a weighting that reads all of
    G gets it from the vectorised backward in memory mode, ``batched_backward`` or not."""
    return variant == "memory+batched" and make_weighting(weighting).gram_use == "full"


def _library_path(model: MultiTaskModel, weighting: str) -> StepPath:
    step = LibraryStyleStep(model.trunk.parameters(), [head.parameters() for head in model.heads], weighting)
    return StepPath("library", lambda features, losses, clock: step.backward(losses, clock), weighting)


def _torchjd_path(model: MultiTaskModel, weighting: str, variant: str | None) -> StepPath:
    if variant == "autogram":
        from .torchjd_path import AutogramStep

        autogram = AutogramStep(model, weighting)
        return StepPath(
            "torchjd",
            lambda features, losses, clock: autogram.backward(losses),
            weighting,
            variant,
            forward=autogram.forward,
        )
    from .torchjd_path import TorchJDStep

    step = TorchJDStep(
        model.trunk.parameters(),
        [head.parameters() for head in model.heads],
        weighting,
        optimize_gramian_computation=variant == "gramian",
    )
    return StepPath(
        "torchjd", lambda features, losses, clock: step.backward(features, losses, clock), weighting, variant
    )


def make_paths(
    model: MultiTaskModel,
    backends: Sequence[str],
    *,
    weightings: Sequence[str] = WEIGHTINGS,
    torchjd_variants: Sequence[str | None] = (None, "gramian"),
    mtlstep_variants: Sequence[str] = ("speed", "memory", "features"),
    batched_variant: bool = True,
    baselines_for: Sequence[str] | None = None,
    one_backward: Sequence[str] = ("equal",),
) -> list[StepPath]:
    """Every path to measure on ``model``: the floor and the one-backward steps of the weightings
    ``one_backward`` (which read no gradients) first, then, per weighting, the library path,
    TorchJD (when installed) and MTLStep in each variant that serves it on each backend. The
    batched variant runs for the first weighting only, on the first backend; the library path and
    TorchJD for ``baselines_for`` (every weighting by default)."""
    paths = [_floor_path()]
    if backends:
        paths += [_one_backward_path(model, backends[0], weighting) for weighting in one_backward]
    for index, weighting in enumerate(weightings):
        if baselines_for is None or weighting in baselines_for:
            paths.append(_library_path(model, weighting))
            if torchjd_installed():
                paths += [_torchjd_path(model, weighting, variant) for variant in torchjd_variants]
        for backend in backends:
            paths += [
                _mtlstep_path(model, weighting, variant, backend)
                for variant in mtlstep_variants
                if not _same_as_memory_mode(weighting, variant)
            ]
        if batched_variant and index == 0 and backends:
            paths.append(_mtlstep_path(model, weighting, "speed+batched", backends[0]))
    return paths


def _one_step(model: MultiTaskModel, batch, path: StepPath, clock: Clock) -> dict[str, float]:
    start = clock.now()
    features, losses = (path.forward or model)(batch)
    forward_end = clock.now()
    intervals = path.run(features, losses, clock)
    end = clock.now()
    clock.sync()
    after_forward = clock.seconds(forward_end, end)
    gradients = math.nan if intervals is None else sum(clock.seconds(a, b) for a, b in intervals)
    return {
        "step": clock.seconds(start, end),
        "forward": clock.seconds(start, forward_end),
        "backward_and_update": after_forward,
        "task_gradients": gradients,
        "post_backward": after_forward - gradients,
    }


def step_sampler(model: MultiTaskModel, batch, path: StepPath, clock: Clock) -> Sampler:
    """A sampler of one step of ``path`` on ``model``, gradients reset before it."""

    def sample():
        model.zero_grad(set_to_none=True)
        return _one_step(model, batch, path, clock)

    return sample


def measure_paths(
    model: MultiTaskModel,
    batch,
    paths: Sequence[StepPath],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    memory: bool = True,
) -> list[dict]:
    """Time ``paths`` interleaved on ``model`` and, when ``memory``, measure each one's peak
    memory; one row per path."""
    clock = Clock(device)
    samplers = {path.key: step_sampler(model, batch, path, clock) for path in paths}
    first = {key: first_run(sample) for key, sample in samplers.items()}
    working = {key: sample for key, sample in samplers.items() if first[key][1] is None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already recorded by the first run
        timings = measure_interleaved(working, warmup=max(warmup - 1, 0), repeats=repeats)
    parameter = next(model.parameters())
    common = {
        "trunk": model.spec.kind,
        "trunk_options": model.spec.options,
        "batch": model.spec.batch,
        "tasks": model.num_tasks,
        "shared_numel": model.shared_numel,
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "element_size": parameter.element_size(),
    }
    rows = []
    resident = [*model.parameters(), *model.buffers(), *batch]
    for path in paths:
        warned, error = first[path.key]
        row = {**common, **path.describe(), "key": path.key, "warnings": warned, "error": error}
        if error is None:
            row["times"] = {name: summary.as_dict() for name, summary in timings[path.key].items()}
            if memory:
                model.zero_grad(set_to_none=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row["peak_bytes"] = peak_bytes(
                        functools.partial(_one_step, model, batch, path, clock), device, resident
                    )
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


def trunk_job(spec: TrunkSpec, num_tasks: int, backends: Sequence[str], device: torch.device, preset: Preset) -> Job:
    def run() -> list[dict]:
        model, batch = build_model(spec, num_tasks, device)
        paths = make_paths(model, backends)
        return measure_paths(model, batch, paths, device, warmup=preset.steps.warmup, repeats=preset.steps.repeats)

    return Job("steps", f"steps: {spec.kind}, T={num_tasks}", run)


def plan(preset: Preset, device: torch.device, backends: Sequence[str]) -> list[Job]:
    """One job a trunk of the preset."""
    return [trunk_job(spec, preset.steps.tasks, backends, device, preset) for spec in preset.steps.trunks]
