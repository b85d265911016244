"""Scaling: step cost against the number of tasks T and against the shared size P.

- Against T: the preset's scaling trunk with T = 2 … 32 heads.
- Against P: MLP trunks of each width of the preset (P grows as width²), with a fixed T.

Each point times, interleaved, the floor, the library path, TorchJD (its default form, when
installed) and MTLStep in speed mode (each backend) and memory mode, all with EMTL; no peak
memory. The report fits log(time) = a + b·log(x) by least squares and states the slope b: 1 means
the cost grows in proportion to T (or P).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .plan import Job
from .presets import Preset, TrunkSpec
from .steps import make_paths, measure_paths
from .trunks import build_model


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x) over the points where both are positive and
    finite; NaN with fewer than two such points."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0 and math.isfinite(y)]
    if len(points) < 2:
        return math.nan
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return math.nan
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def _point_job(
    sweep: str, spec: TrunkSpec, num_tasks: int, backends: Sequence[str], device: torch.device, preset: Preset
) -> Job:
    def run() -> list[dict]:
        model, batch = build_model(spec, num_tasks, device)
        paths = make_paths(model, backends, weightings=("emtl",), torchjd_variants=(None,), batched_variant=False)
        scaling = preset.scaling
        rows = measure_paths(model, batch, paths, device, warmup=scaling.warmup, repeats=scaling.repeats, memory=False)
        return [{**row, "sweep": sweep} for row in rows]

    point = f"T={num_tasks}" if sweep == "tasks" else f"width {spec.options['width']}"
    return Job("scaling", f"scaling against {'T' if sweep == 'tasks' else 'P'}: {spec.kind}, {point}", run)


def plan(preset: Preset, device: torch.device, backends: Sequence[str]) -> list[Job]:
    """A job per point of the T sweep, then per point of the P sweep."""
    scaling = preset.scaling
    jobs = [_point_job("tasks", scaling.trunk, tasks, backends, device, preset) for tasks in scaling.task_counts]
    for width in scaling.widths:
        spec = TrunkSpec(
            "mlp", batch=scaling.batch, options={"in_features": width, "width": width, "depth": scaling.depth}
        )
        jobs.append(_point_job("size", spec, scaling.tasks, backends, device, preset))
    return jobs
