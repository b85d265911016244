"""How far the cheap modes stray from the exact step, measured over real training runs.

    python -m bench.cheap_modes_accuracy [--epochs 4] [--seeds 2] [--out DIR]

On the demo's digits tasks (:mod:`emtl_kernels.demo`: digit, large, ink; a shared MLP trunk),
for EMTL, gradient-norm scaling, IMTL-G, MGDA and UPGrad, two cheap modes of
:class:`~emtl_kernels.MTLStep` are compared with the exact step (speed mode, G over every shared
parameter):

- ``features``: G_z of the task gradients on the trunk's output (``backward(losses, features=z)``);
- ``norm_params``: G over the last shared layer only.

Two measurements a weighting and seed:

1. Along the exact step's own training run: at every step, on the same parameters and batch, each
   mode's weights and update on the shared parameters against the exact step's: the cosine of the
   updates and the relative error of the weights ‖w − w_exact‖ / ‖w_exact‖.
2. Each mode trained on its own (the same initial network and batches): the tasks' test metrics
   at the end (digit and large: accuracy; ink: R²).

The demo's model is small: everything runs on the CPU, whatever the bench's device.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from emtl_kernels import MTLStep
from emtl_kernels.demo import TASKS, DigitsMultiTask, Split, evaluate, load_digits

from .environment import describe

RESULTS_DIR = Path(__file__).parent / "results"
WEIGHTINGS = ("emtl", "gradnorm_scaling", "imtl_g", "mgda", "upgrad")
CHEAP_MODES = ("features", "norm_params")
MODES = ("exact", *CHEAP_MODES)


@dataclass(frozen=True)
class Plan:
    epochs: int
    seeds: int
    weightings: tuple[str, ...]
    batch_size: int = 64
    lr: float = 3e-3


PLANS = {"full": Plan(epochs=4, seeds=2, weightings=WEIGHTINGS), "tiny": Plan(epochs=1, seeds=1, weightings=("emtl",))}


def make_step(model: DigitsMultiTask, weighting: str, mode: str) -> MTLStep:
    norm_params = model.trunk[2].parameters() if mode == "norm_params" else None
    return MTLStep(model.trunk.parameters(), weighting, norm_params=norm_params)


def step_backward(model: DigitsMultiTask, step: MTLStep, mode: str, batch: Split) -> Tensor:
    """Forward ``batch`` and run ``step``'s backward in ``mode``; returns the weights."""
    features = model.trunk(batch.images)
    outputs = (model.digit(features), model.large(features).squeeze(1), model.ink(features).squeeze(1))
    return step.backward(batch.losses(outputs), features=features if mode == "features" else None)


def shared_update(model: DigitsMultiTask) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()]).double()


def along_exact_run(weighting: str, seed: int, plan: Plan, train: Split) -> dict[str, dict[str, list[float]]]:
    """Per cheap mode, the cosine of its update and the relative error of its weights against the
    exact step's, at every step of the exact step's training run."""
    torch.manual_seed(seed)
    model = DigitsMultiTask()
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr)
    steps = {mode: make_step(model, weighting, mode) for mode in MODES}
    series: dict[str, dict[str, list[float]]] = {mode: {"cosine": [], "weight_error": []} for mode in CHEAP_MODES}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(plan.epochs):
        for batch in train.batches(plan.batch_size, generator):
            updates = {}
            for mode in (*CHEAP_MODES, "exact"):  # exact last: its .grad stays for the optimiser
                optimizer.zero_grad(set_to_none=True)
                weights = step_backward(model, steps[mode], mode, batch).double()
                updates[mode] = (weights, shared_update(model))
            exact_weights, exact_update = updates["exact"]
            for mode in CHEAP_MODES:
                weights, update = updates[mode]
                cosine = torch.nn.functional.cosine_similarity(update, exact_update, dim=0)
                series[mode]["cosine"].append(cosine.item())
                series[mode]["weight_error"].append(((weights - exact_weights).norm() / exact_weights.norm()).item())
            steps["exact"].optimizer_step(optimizer)
    return series


def trained_alone(weighting: str, mode: str, seed: int, plan: Plan, train: Split, test: Split) -> dict[str, float]:
    """The test metrics of a network trained with ``mode`` from the seed's initial network."""
    torch.manual_seed(seed)
    model = DigitsMultiTask()
    optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr)
    step = make_step(model, weighting, mode)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(plan.epochs):
        for batch in train.batches(plan.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            step_backward(model, step, mode, batch)
            step.optimizer_step(optimizer)
    return evaluate(model, test)


def measure(plan: Plan) -> tuple[list[dict], dict]:
    """The summary rows (one a weighting and mode) and the per-step series of the first seed."""
    train, test = load_digits(seed=0)
    rows, curves = [], {}
    for weighting in plan.weightings:
        runs = [along_exact_run(weighting, seed, plan, train) for seed in range(plan.seeds)]
        curves[weighting] = runs[0]
        for mode in MODES:
            metrics = [trained_alone(weighting, mode, seed, plan, train, test) for seed in range(plan.seeds)]
            row: dict = {"weighting": weighting, "mode": mode, "steps_a_run": len(runs[0]["features"]["cosine"])}
            if mode in CHEAP_MODES:
                cosines = [value for run in runs for value in run[mode]["cosine"]]
                errors = [value for run in runs for value in run[mode]["weight_error"]]
                row.update(
                    cosine_median=statistics.median(cosines),
                    cosine_p10=_quantile(cosines, 0.1),
                    cosine_min=min(cosines),
                    weight_error_median=statistics.median(errors),
                    weight_error_p90=_quantile(errors, 0.9),
                )
            for task in TASKS:
                values = [run[task] for run in metrics]
                row[f"{task}_mean"] = statistics.fmean(values)
                row[f"{task}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
    return rows, curves


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def results(preset: str, device: torch.device) -> list[dict]:
    """The suite entry point of :mod:`bench.extras` (CPU whatever ``device``)."""
    return measure(PLANS["tiny" if preset == "tiny" else "full"])[0]


def markdown(rows: list[dict], meta: dict, plan: Plan, plot_name: str) -> str:
    lines = [
        "# Accuracy of the cheap modes against the exact step",
        "",
        f"Digits tasks of `emtl_kernels.demo` (digit, large, ink), {plan.epochs} epochs of Adam (lr {plan.lr}, "
        f"batch {plan.batch_size}), {plan.seeds} seeds. {meta['device']} · torch {meta['torch']} · commit "
        f"{meta['commit']}{' (uncommitted changes)' if meta['dirty'] else ''} · {meta['date']}.",
        "",
        "Cosine and weight error: at every step of the exact step's own run, on its parameters and batch "
        "(all seeds pooled). Metrics: each mode trained alone from the same networks and batches, mean ± std "
        "over the seeds (digit, large: test accuracy; ink: test R²).",
        "",
        "| weighting | mode | update cosine: median (10th pct, min) | weight error: median (90th pct) "
        "| digit acc | large acc | ink R² |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cheap = row["mode"] in CHEAP_MODES
        cosine = f"{row['cosine_median']:.4f} ({row['cosine_p10']:.4f}, {row['cosine_min']:.4f})" if cheap else "1"
        error = f"{row['weight_error_median']:.3f} ({row['weight_error_p90']:.3f})" if cheap else "0"
        metrics = [f"{row[f'{task}_mean']:.3f} ± {row[f'{task}_std']:.3f}" for task in TASKS]
        lines.append("| " + " | ".join([row["weighting"], row["mode"], cosine, error, *metrics]) + " |")
    lines += ["", f"![cosine of the update and weight error over the steps, first seed]({plot_name})", ""]
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> None:
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(2, len(curves), figsize=(3.2 * len(curves), 5.2), squeeze=False, sharex=True)
    for column, (weighting, series) in enumerate(curves.items()):
        for mode in CHEAP_MODES:
            axes[0, column].plot(series[mode]["cosine"], label=mode, linewidth=0.8)
            axes[1, column].plot(series[mode]["weight_error"], label=mode, linewidth=0.8)
        axes[0, column].set_title(weighting)
        axes[1, column].set(xlabel="step", yscale="log")
    axes[0, 0].set_ylabel("cosine to the exact update")
    axes[1, 0].set_ylabel("‖w − w_exact‖ / ‖w_exact‖")
    axes[0, 0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=PLANS["full"].epochs)
    parser.add_argument("--seeds", type=int, default=PLANS["full"].seeds)
    parser.add_argument("--weightings", nargs="+", default=list(WEIGHTINGS), choices=WEIGHTINGS)
    parser.add_argument("--out", type=Path, help="folder for the report (default: bench/results/<cpu>)")
    args = parser.parse_args(argv)
    plan = Plan(epochs=args.epochs, seeds=args.seeds, weightings=tuple(args.weightings))
    meta = describe(torch.device("cpu"))
    rows, curves = measure(plan)
    out = args.out or RESULTS_DIR / meta["device_slug"]
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, out / "cheap_modes_accuracy.png")
    (out / "cheap_modes_accuracy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    report = out / "cheap_modes_accuracy.md"
    report.write_text(markdown(rows, meta, plan, "cheap_modes_accuracy.png"))
    print(report.read_text())
    return report


if __name__ == "__main__":
    main()
