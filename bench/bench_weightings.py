"""Weighting solver times beside the Gram pass: what turning (losses, G) into T weights costs.

Suite of :mod:`bench.extras`: :func:`results` times one call of every weighting of
:data:`emtl_kernels.WEIGHTINGS`, with its default options, for T in :data:`NUM_TASKS` (the tiny
preset: fewer), on ``losses`` ``[T]`` and the float32 Gram matrix ``G = J Jᵀ`` of a random
``J`` ``[T, 256]`` whose tasks conflict (:func:`solver_inputs`). Beside them, interleaved in the
same rounds, it times the Gram pass (``task_gram``, the "auto" backend) over a ``[T, P]`` float32
matrix at the preset's P (:data:`PLANS`), the pass every step runs before its weighting, so that
``vs_gram_pass`` (solver median over the Gram pass's median) says how much the solver adds to the
kernel passes. The Gram pass is timed as the kernels section times it, with the GPU's L2 cache
evicted before each sample; the solvers are not, since in a step they read a G that the Gram pass
has just written.

Where TorchJD is installed, its own weighting of each method (``UPGradWeighting`` and the like,
``NashMTL``'s weighting on J, as it takes no Gram matrix, and its ``ConFIG`` aggregator on J, as it
has no ConFIG weighting) is timed on the same G in the same rounds: ``vs_torchjd`` is TorchJD's
median over ours (above 1: ours is faster).

On a GPU each weighting is also captured once in a CUDA graph and its replay timed
(``graph_*``): what a captured step pays for it; a weighting that does not capture has the error
in ``graph_error`` instead. The eigen-decompositions of IMTL-G and Aligned-MTL run as their
``eigen_solver="auto"`` picks: Jacobi sweeps on a GPU, LAPACK on a CPU.
"""

from __future__ import annotations

import functools
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from emtl_kernels import WEIGHTINGS, TaskGradients, task_gram
from emtl_kernels import backends as emtl_backends

from .timing import Clock, Summary, first_run, measure_interleaved, timed

NUM_TASKS = (2, 4, 8, 16, 32)
#: Columns of the random J the Gram matrix the weightings read is made from.
GRADIENT_WIDTH = 256
#: The share of the rows' mean taken off each row of J: what puts the tasks in conflict.
CONFLICT = 0.5
GRAM_PASS = "gram pass"
GRAPH = " (graph)"
TORCHJD = " (TorchJD)"
#: Warm-up calls of a weighting on a side stream before its capture: first calls allocate and
#: load kernels, which a capture must not see.
CAPTURE_WARMUP = 2


@dataclass(frozen=True)
class WeightingPlan:
    """Sizes of one preset: the task counts T, the Gram pass's P = 2^``gram_log2_numel``, and the
    untimed warm-up and timed rounds of every candidate (after a first call that checks it runs)."""

    task_counts: tuple[int, ...]
    gram_log2_numel: int
    warmup: int
    repeats: int


#: By preset name (:data:`bench.presets.PRESETS`).
PLANS = {
    "quick": WeightingPlan(NUM_TASKS, gram_log2_numel=20, warmup=1, repeats=15),
    "full": WeightingPlan(NUM_TASKS, gram_log2_numel=26, warmup=5, repeats=50),
    "tiny": WeightingPlan((2, 8), gram_log2_numel=10, warmup=0, repeats=1),
}


def torchjd_weightings(num_tasks: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], object]]:
    """TorchJD 0.18's weighting of each method it has, by our name: ``call(gram, jacobian)``, with
    our default options where it has none (FairGrad: ``alpha=1.0``, Krum: ``n_byzantine=0``,
    CR-MOGM: around UPGrad) and its defaults, the same as ours, otherwise (Nash-MTL:
    ``max_norm=1.0``). Empty where TorchJD is missing."""
    try:
        from torchjd import aggregation
    except ImportError:
        return {}
    on_gram = {
        "upgrad": aggregation.UPGradWeighting(),
        "dualproj": aggregation.DualProjWeighting(),
        "mgda": aggregation.MGDAWeighting(),
        "cagrad": aggregation.CAGradWeighting(c=0.5),
        "imtl_g": aggregation.IMTLGWeighting(),
        "aligned_mtl": aggregation.AlignedMTLWeighting(),
        "fairgrad": aggregation.FairGradWeighting(alpha=1.0),
        "krum": aggregation.KrumWeighting(n_byzantine=0),
        "pcd": aggregation.PCDWeighting(),
        "gradvac": aggregation.GradVacWeighting(),
        "cr_mogm": aggregation.CRMOGMWeighting(aggregation.UPGradWeighting()),
        "pcgrad": aggregation.PCGradWeighting(),
    }
    calls = {name: (lambda gram, jacobian, weighting=weighting: weighting(gram)) for name, weighting in on_gram.items()}
    # Stateful: each call warm-starts from the previous weights, which favours it here.
    nash = aggregation.NashMTL(n_tasks=num_tasks).weighting
    calls["nash_mtl"] = lambda gram, jacobian: nash(jacobian)
    # Jᵀw itself, which our ConFIG's weights give: the combine it includes is a [T, 256] product.
    config = aggregation.ConFIG()
    calls["config"] = lambda gram, jacobian: config(jacobian)
    return calls


def results(preset: str, device: torch.device) -> list[dict]:
    """One row per (weighting, T) at the sizes of ``preset``, measured on ``device``."""
    plan = PLANS[preset]
    rows = []
    for num_tasks in tqdm(plan.task_counts, desc="weightings", unit="T", leave=False):
        rows += measure_tasks(num_tasks, plan, device)
    return rows


def solver_inputs(num_tasks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses ``[T]`` and the float32 Gram matrix ``[T, T]`` of :func:`solver_jacobian`, the same
    on every device."""
    losses, jacobian = solver_jacobian(num_tasks)
    return losses.to(device), (jacobian @ jacobian.T).to(device)


def solver_jacobian(num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses ``[T]`` and a random float32 J ``[T, 256]`` on the CPU.

    J's Gaussian rows less half their mean conflict (g_i·g_j < 0) in every pair at T = 2, in most
    at T = 8 and in about two pairs of three at T = 32, so that the gradient-balancing methods have
    conflicts to resolve.
    """
    generator = torch.Generator().manual_seed(num_tasks)
    gaussian = torch.randn(num_tasks, GRADIENT_WIDTH, generator=generator)
    jacobian = gaussian - CONFLICT * gaussian.mean(0)
    losses = torch.rand(num_tasks, generator=generator) + 0.5
    return losses, jacobian


def measure_tasks(num_tasks: int, plan: WeightingPlan, device: torch.device) -> list[dict]:
    """Every weighting at T = ``num_tasks``, and the Gram pass it is compared with, interleaved."""
    losses, gram = solver_inputs(num_tasks, device)
    calls = {name: functools.partial(weighting(), losses, gram) for name, weighting in WEIGHTINGS.items()}
    solver_clock = Clock(device)
    samplers = {name: timed(call, solver_clock) for name, call in calls.items()}
    jacobian = solver_jacobian(num_tasks)[1].to(device)
    for name, call in torchjd_weightings(num_tasks).items():
        samplers[name + TORCHJD] = timed(functools.partial(call, gram, jacobian), solver_clock)
    errors = {name: first_run(sample)[1] for name, sample in samplers.items()}
    if device.type == "cuda":
        captured, capture_errors = _graph_samplers({n: c for n, c in calls.items() if errors[n] is None}, solver_clock)
        samplers.update(captured)
        errors.update(capture_errors)
    matrix = torch.randn(num_tasks, 2**plan.gram_log2_numel, device=device)
    grads = TaskGradients.from_matrix(matrix)
    gram_backend = emtl_backends.AUTO.choose("gram", grads, lambda backend: backend.gram(grads)).name
    samplers[GRAM_PASS] = timed(
        functools.partial(task_gram, grads, backend=gram_backend),
        Clock(device, flush_cache=True),
    )
    working = {name: sample for name, sample in samplers.items() if errors.get(name) is None}
    timings = {
        name: durations["time"]
        for name, durations in measure_interleaved(working, warmup=plan.warmup, repeats=plan.repeats).items()
    }
    gram_pass = timings[GRAM_PASS]
    rows = []
    for name in WEIGHTINGS:
        row = {
            "weighting": name,
            "num_tasks": num_tasks,
            **_times("", timings.get(name), gram_pass),
            "gram_numel": matrix.shape[1],
            "gram_backend": gram_backend,
            "gram_pass_us": 1e6 * gram_pass.median,
            "error": errors[name],
            **_versus_torchjd(timings.get(name), timings.get(name + TORCHJD)),
        }
        if device.type == "cuda":
            row.update(_times("graph_", timings.get(name + GRAPH), gram_pass), graph_error=errors.get(name + GRAPH))
        rows.append(row)
    return rows


def _times(prefix: str, summary: Summary | None, gram_pass: Summary) -> dict[str, float]:
    """Median and fastest call in µs, and the median over the Gram pass's (NaN: not measured)."""
    summary = summary or Summary.of([])
    return {
        f"{prefix}median_us": 1e6 * summary.median,
        f"{prefix}min_us": 1e6 * summary.min,
        f"{prefix}vs_gram_pass": summary.median / gram_pass.median,
    }


def _versus_torchjd(ours: Summary | None, theirs: Summary | None) -> dict[str, float]:
    """TorchJD's median in µs and its ratio to ours (above 1: ours is faster); {} where not timed."""
    if theirs is None:
        return {}
    ratio = theirs.median / ours.median if ours is not None else math.nan
    return {"torchjd_median_us": 1e6 * theirs.median, "vs_torchjd": ratio}


def _graph_samplers(calls: dict[str, Callable[[], object]], clock: Clock) -> tuple[dict, dict[str, str | None]]:
    """A sampler of each call's CUDA-graph replay, by ``name + GRAPH``, and each one's error (None:
    it captured and replayed)."""
    samplers, errors = {}, {}
    for name, call in calls.items():
        try:
            samplers[name + GRAPH] = timed(_graph_replay(call), clock)
            errors[name + GRAPH] = first_run(samplers[name + GRAPH])[1]
        except Exception as error:  # one weighting that does not capture leaves the others measured
            errors[name + GRAPH] = "".join(traceback.format_exception_only(error)).strip()
    return samplers, errors


def _graph_replay(call: Callable[[], object]) -> Callable[[], None]:
    """``call`` captured in a CUDA graph (after warm-up calls on a side stream, as capture
    requires); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay
