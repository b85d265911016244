"""The step on a model of real size: every path side by side, × the plain backward, peak memory.

    python -m bench.large_model_steps [--config gpu|cpu|memory|one-backward|tiny] [--out DIR]

Configurations (:data:`CONFIGS`):

- ``gpu``: a GPT-2-small-sized trunk (12 pre-norm encoder layers at d = 768, about 85 M shared
  parameters), T ∈ {2, 4, 8} linear heads, float32 and bfloat16 autocast; sized to finish in
  under 5 minutes of one H100's time.
- ``cpu``: the 4-layer, d = 256 transformer trunk (3.16 M shared parameters, batch 8 × 64
  tokens), T ∈ {4, 8}, float32, EMTL and UPGrad.
- ``memory``: the same trunk at T ∈ {4, 8, 16}: the memory-saving routes to the exact Gram
  matrix against speed mode: UPGrad (reads all of G) in speed and memory mode, EMTL (reads the
  norms) in speed mode, memory mode by T passes and memory mode by the vectorised backward
  ("memory+batched"), and TorchJD 0.18's two memory-saving forms for UPGrad: ``jac_to_grad``
  with ``optimize_gramian_computation`` ("gramian") and the autogram engine ("autogram").
- ``one-backward``: the same trunk at T = 8, the weightings that read no gradients (equal and
  the loss-based ones), each on its one-backward path against the floor.
- ``tiny``: a one-layer trunk that runs in seconds; the smoke test runs it so that the script
  cannot rot.

Paths (:func:`bench.steps.make_paths`, interleaved in one run): the floor (``sum(losses).backward()``),
MTLStep with equal weighting (one backward), and for EMTL, gradient-norm scaling, IMTL-G and UPGrad:
MTLStep in speed mode, memory mode (for those that read only norms), features mode and
``norm_params`` (the last shared layer); the library-style path and TorchJD 0.18 (both forms) for
EMTL. Each row holds the step's median time, its ratio to the floor's of the same T and dtype,
for speed mode the share of the step after its T backward passes, and the peak memory.

As a suite of ``python -m bench`` (:mod:`bench.extras`), ``results(preset, device)`` runs ``tiny``
for the tiny preset and otherwise ``gpu`` on a GPU, ``cpu`` on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .environment import describe
from .presets import TrunkSpec
from .steps import StepPath, make_paths, measure_paths
from .trunks import MultiTaskModel, build_model

RESULTS_DIR = Path(__file__).parent / "results"
WEIGHTINGS = ("emtl", "gradnorm_scaling", "imtl_g", "upgrad")
VARIANTS = ("speed", "memory", "features", "norm_params")
NO_AUTOCAST = "float32"


@dataclass(frozen=True)
class Config:
    """One configuration: the trunk, the task counts and the dtypes (``"float32"``, or a dtype the
    forward runs in under autocast), and how many timed steps."""

    trunk: TrunkSpec
    task_counts: tuple[int, ...]
    dtypes: tuple[str, ...]
    weightings: tuple[str, ...]
    warmup: int
    repeats: int
    variants: tuple[str, ...] = VARIANTS
    #: Weightings that read no gradients, each timed on its one-backward path.
    one_backward: tuple[str, ...] = ("equal",)
    #: TorchJD's forms, for the first weighting (see :func:`bench.steps.make_paths`).
    torchjd_variants: tuple[str | None, ...] = (None, "gramian")


def _transformer(d_model: int, layers: int, heads: int, seq_len: int, batch: int) -> TrunkSpec:
    options = {"d_model": d_model, "layers": layers, "heads": heads, "seq_len": seq_len}
    return TrunkSpec("transformer", batch=batch, options=options)


CONFIGS = {
    "gpu": Config(_transformer(768, 12, 12, 256, 16), (2, 4, 8), (NO_AUTOCAST, "bfloat16"), WEIGHTINGS, 2, 5),
    # Two weightings, one that reads norms only and one that reads all of G, to keep a loaded
    # 2-core machine's run in minutes.
    "cpu": Config(_transformer(256, 4, 4, 64, 8), (4, 8), (NO_AUTOCAST,), ("emtl", "upgrad"), 1, 9),
    "memory": Config(
        _transformer(256, 4, 4, 64, 8),
        (4, 8, 16),
        (NO_AUTOCAST,),
        ("upgrad", "emtl"),
        1,
        5,
        variants=("speed", "memory", "memory+batched"),
        one_backward=(),
        torchjd_variants=("gramian", "autogram"),
    ),
    # The weightings that read no gradients, on the cpu trunk at T = 8: one backward each.
    "one-backward": Config(
        _transformer(256, 4, 4, 64, 8),
        (8,),
        (NO_AUTOCAST,),
        (),
        2,
        # A few per cent is the verdict here: more steps than elsewhere, at 60 ms a step still seconds.
        41,
        variants=(),
        one_backward=("equal", "uw", "dwa", "famo", "gls", "imtl_l", "rlw", "stch", "cosmos", "pbi"),
    ),
    "tiny": Config(_transformer(32, 1, 2, 8, 2), (2,), (NO_AUTOCAST,), ("emtl",), 0, 1),
}


def config_paths(config: Config, model: MultiTaskModel) -> list[StepPath]:
    """The paths ``config`` measures on ``model``, on the auto backend."""
    return make_paths(
        model,
        ["auto"],
        weightings=config.weightings,
        mtlstep_variants=config.variants,
        batched_variant=False,
        baselines_for=config.weightings[:1],
        one_backward=config.one_backward,
        torchjd_variants=config.torchjd_variants,
    )


def measure(config: Config, device: torch.device) -> list[dict]:
    """One row a path, T and dtype, with its ratio to the floor of the same T and dtype."""
    rows = []
    for dtype in config.dtypes:
        for num_tasks in config.task_counts:
            model, batch = build_model(config.trunk, num_tasks, device)
            model.autocast_dtype = None if dtype == NO_AUTOCAST else getattr(torch, dtype)
            paths = config_paths(config, model)
            print(f"{dtype}, T={num_tasks}: {len(paths)} paths", file=sys.stderr, flush=True)
            measured = measure_paths(model, batch, paths, device, warmup=config.warmup, repeats=config.repeats)
            rows += [_summary(row, measured, dtype) for row in measured]
    return rows


def _summary(row: dict, same_run: list[dict], dtype: str) -> dict:
    floor = next(other for other in same_run if other["path"] == "floor")
    step = row["times"]["step"]["median"] if row["error"] is None else None
    post = row["times"]["post_backward"]["median"] if row["error"] is None else None
    return {
        "path": row["key"],
        "tasks": row["tasks"],
        "shared_numel": row["shared_numel"],
        "autocast": dtype,
        "step_ms": None if step is None else 1e3 * step,
        "x_floor": None if step is None else step / floor["times"]["step"]["median"],
        "after_task_gradients": None if post is None or post != post else post / step,
        "peak_mib": None if row.get("peak_bytes") is None else row["peak_bytes"] / 2**20,
        "error": row["error"],
    }


def results(preset: str, device: torch.device) -> list[dict]:
    """The suite entry point of :mod:`bench.extras`."""
    name = "tiny" if preset == "tiny" else ("gpu" if device.type == "cuda" else "cpu")
    return [{"config": name, **row} for row in measure(CONFIGS[name], device)]


def markdown(rows: list[dict], meta: dict, config: str) -> str:
    """The report: one table a dtype, rows by T then path."""
    lines = [
        f"# The step on a model of real size ({config})",
        "",
        f"{meta['device']} · torch {meta['torch']} · commit {meta['commit']}"
        f"{' (uncommitted changes)' if meta['dirty'] else ''} · {meta['threads']} threads · {meta['date']} · "
        f"load average {meta['load_average_start']} at the start (the machine is shared: ratios are taken "
        "within one interleaved run).",
        "",
        "`× floor`: median step time over `sum(losses).backward()`'s at the same T. `after T passes`: share of "
        "the step after the task gradients (speed mode). The bound of T backward passes is (2T + 1)/3 × floor.",
    ]
    for dtype in dict.fromkeys(row["autocast"] for row in rows):
        lines += ["", f"## {dtype}", "", "| T | path | step (ms) | × floor | after T passes | peak (MiB) |"]
        lines.append("|---|---|---|---|---|---|")
        for row in (row for row in rows if row["autocast"] == dtype):
            cells = [
                str(row["tasks"]),
                row["path"],
                _number(row["step_ms"], "{:.1f}"),
                _number(row["x_floor"], "{:.2f}×"),
                _number(row["after_task_gradients"], "{:.1%}"),
                _number(row["peak_mib"], "{:.0f}"),
            ]
            lines.append("| " + " | ".join(cells if row["error"] is None else cells[:2] + [row["error"]] * 4) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, form: str) -> str:
    return "—" if value is None else form.format(value)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="folder for the report (default: bench/results/<device>)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.config == "gpu" else "cpu")
    meta = describe(device)
    rows = measure(CONFIGS[args.config], device)
    out = args.out or RESULTS_DIR / meta["device_slug"]
    out.mkdir(parents=True, exist_ok=True)
    stem = f"large_model_steps_{args.config}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    report = out / f"{stem}.md"
    report.write_text(markdown(rows, meta, args.config))
    print(report.read_text())
    return report


if __name__ == "__main__":
    main()
