"""Demo: three tasks on one trunk, trained with equal weighting, gradient-norm scaling and EMTL.

    python -m emtl_kernels.demo [--epochs 30] [--plot contributions.png]

The data is scikit-learn's handwritten digits (1,797 8×8 images, shipped with the package). One
shared MLP trunk feeds three heads:

- ``digit``: which digit, 10 classes (cross-entropy, about 2 at the start);
- ``large``: is the digit 5 or more (binary cross-entropy, about 0.7);
- ``ink``: the image's total ink in raw pixel units (mean squared error, about 10⁵ at the start).

The ink loss is five orders of magnitude above the others, so under equal weighting its gradient
owns the trunk. Each method trains the same initial networks on the same batches, once per seed;
the table shows each task's test metric (mean ± standard deviation over the seeds) and the
relative contributions r_i = L_i / ‖∇_θ L_i‖ at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .step import MTLStep

TASKS = ("digit", "large", "ink")
METHODS = ("equal", "gradnorm_scaling", "emtl")


def _require(module: str, extra: str = "demo"):
    try:
        return __import__(module)
    except ImportError:
        sys.exit(f"the demo needs {module}: pip install --no-build-isolation -e '.[{extra}]'")


@dataclass
class Split:
    images: Tensor
    digits: Tensor
    ink: Tensor

    def losses(self, outputs: tuple[Tensor, Tensor, Tensor]) -> list[Tensor]:
        logits, large_logit, ink = outputs
        return [
            F.cross_entropy(logits, self.digits),
            F.binary_cross_entropy_with_logits(large_logit, (self.digits >= 5).float()),
            F.mse_loss(ink, self.ink),
        ]

    def batches(self, size: int, generator: torch.Generator):
        order = torch.randperm(len(self.digits), generator=generator)
        for start in range(0, len(order), size):
            index = order[start : start + size]
            yield Split(self.images[index], self.digits[index], self.ink[index])


def load_digits(seed: int) -> tuple[Split, Split]:
    """Train and test splits (80/20), images standardised with the train statistics."""
    datasets = _require("sklearn.datasets").datasets
    data = datasets.load_digits()
    images = torch.tensor(data.data, dtype=torch.float32)
    digits = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    train, test = order[:cut], order[cut:]
    mean, std = images[train].mean(0), images[train].std(0).clamp_min(1e-3)

    def split(index: Tensor) -> Split:
        return Split((images[index] - mean) / std, digits[index], images[index].sum(1))

    return split(train), split(test)


class DigitsMultiTask(nn.Module):
    """A shared two-layer MLP trunk and one linear head per task."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.digit = nn.Linear(32, 10)
        self.large = nn.Linear(32, 1)
        self.ink = nn.Linear(32, 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.trunk(images)
        return self.digit(features), self.large(features).squeeze(1), self.ink(features).squeeze(1)


@torch.no_grad()
def evaluate(model: DigitsMultiTask, test: Split) -> dict[str, float]:
    """digit and large: accuracy; ink: R², the share of the ink variance explained."""
    logits, large_logit, ink = model(test.images)
    residual = (ink - test.ink).square().sum() / (test.ink - test.ink.mean()).square().sum()
    return {
        "digit": (logits.argmax(1) == test.digits).float().mean().item(),
        "large": ((large_logit > 0) == (test.digits >= 5)).float().mean().item(),
        "ink": 1 - residual.item(),
    }


def train(method: str, seed: int, args, train_split: Split, test: Split, progress) -> dict:
    """Train one fresh network (the same for every method) and return its metrics and history."""
    torch.manual_seed(seed)
    model = DigitsMultiTask()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = MTLStep(model.trunk.parameters(), method, backend=args.backend, mode=args.mode)
    generator = torch.Generator().manual_seed(seed)
    history, started = [], time.perf_counter()
    for _ in range(args.epochs):
        for batch in train_split.batches(args.batch_size, generator):
            optimizer.zero_grad()
            step.backward(batch.losses(model(batch.images)))
            step.optimizer_step(optimizer)
        if step.last is not None:
            history.append(step.last.relative_contributions.tolist())
        progress.update(1)
    seconds = time.perf_counter() - started
    return {
        "metrics": evaluate(model, test),
        "history": history,
        "weights": [] if step.last is None else step.last.weights.tolist(),
        "seconds": seconds,
    }


def print_results(results: dict[str, list[dict]]) -> None:
    """One row a method: each task's metric as mean ± std over the seeds, and the mean relative
    contributions and weights of the last step."""
    header = f"{'method':<18}" + "".join(f"{name:>16}" for name in ("digit acc", "large acc", "ink R²"))
    print(header)
    print("-" * len(header))
    for method, runs in results.items():
        cells = []
        for task in TASKS:
            values = torch.tensor([run["metrics"][task] for run in runs])
            spread = values.std().item() if len(values) > 1 else 0.0
            cells.append(f"{values.mean().item():>9.3f} ± {spread:.3f}")
        print(f"{method:<18}" + "".join(f"{cell:>16}" for cell in cells))
    print(f"\nat the end (mean over {len(next(iter(results.values())))} seeds; tasks digit, large, ink):")
    for method, runs in results.items():
        ratios = torch.tensor([run["history"][-1] for run in runs]).mean(0).tolist()
        weights = torch.tensor([run["weights"] for run in runs]).mean(0).tolist()
        seconds = sum(run["seconds"] for run in runs)
        print(
            f"{method:<18}relative contributions {', '.join(f'{r:.3g}' for r in ratios):<24}"
            f"weights {', '.join(f'{w:.3g}' for w in weights):<26}({seconds:.1f} s)"
        )


def plot(results: dict[str, list[dict]], path: str) -> None:
    """Relative contributions over training, one panel a method (first seed)."""
    pyplot = _require("matplotlib.pyplot").pyplot
    figure, axes = pyplot.subplots(1, len(results), figsize=(4 * len(results), 3.2), sharey=True, squeeze=False)
    for axis, (method, runs) in zip(axes[0], results.items(), strict=True):
        history = torch.tensor(runs[0]["history"])
        for task, series in zip(TASKS, history.T, strict=True):
            axis.plot(range(1, len(series) + 1), series, label=task)
        axis.set(title=method, xlabel="epoch", yscale="log")
    axes[0, 0].set_ylabel("relative contribution L / ‖∇θ L‖")
    axes[0, 0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3, help="train each method this many times")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--mode", default="speed", choices=("speed", "memory"))
    parser.add_argument("--plot", metavar="PNG", help="write the relative contributions over training here")
    args = parser.parse_args(argv)
    tqdm = _require("tqdm").tqdm
    train_split, test = load_digits(seed=0)
    print(f"digits: {len(train_split.digits)} train / {len(test.digits)} test images, tasks: {', '.join(TASKS)}")
    results: dict[str, list[dict]] = {method: [] for method in args.methods}
    with tqdm(total=args.epochs * args.seeds * len(args.methods), unit="epoch", file=sys.stdout) as progress:
        for method in args.methods:
            progress.set_description(method)
            for seed in range(args.seeds):
                results[method].append(train(method, seed, args, train_split, test, progress))
    print_results(results)
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
