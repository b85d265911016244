"""The benchmark code works: the runner's tiny preset end to end (kernels with their torch
baselines and the multi-tensor case, steps, scaling, the distributed and weighting suites), the
weighting suite's rows, the candidates and baseline paths against float64, the targets' verdicts
on known figures, and the measuring tools on known inputs. No timing is asserted."""

import json
import math
import re
import statistics

import pytest
import torch

from bench import bench_weightings, cheap_modes_accuracy, large_model_steps, roofline
from bench.backends import measured_backends
from bench.environment import caption
from bench.extras import SUITES
from bench.kernel_cases import (
    BASELINES,
    FOREACH_NORM,
    MATMUL_COMBINE,
    MATMUL_GRAM,
    MV_INTO_OUT,
    SQUARE_SUM,
    Candidate,
    KernelCase,
)
from bench.kernel_limits import ROOFLINE_REFERENCE, TWIN_REFERENCE
from bench.kernels import MATRIX, pass_bytes
from bench.library_path import LibraryStyleStep
from bench.memory import cpu_peak_increase, peak_bytes
from bench.presets import TINY
from bench.run import main, run, save
from bench.scaling import loglog_slope
from bench.steps import measure_paths, torchjd_installed
from bench.targets import distance_table, evaluate
from bench.trunks import build_model
from emtl_kernels import WEIGHTINGS, available_backends, emtl_weights

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_preset_runs_end_to_end_and_the_report_rebuilds_from_json(tmp_path, one_thread):
    results = run(TINY, CPU, ["kernels", "steps", "scaling", "extras"])
    report = save(results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    meta = saved["meta"]
    assert meta["device_type"] == "cpu" and meta["torch"] == torch.__version__ and meta["preset"] == "tiny"
    assert {"commit", "dirty", "date", "threads", "load_average_start", "load_average_end"} <= set(meta)

    kernel_rows = saved["kernels"]
    kernels = TINY.kernels
    shapes = kernels.multi_tensor.shapes()
    expected_cases = {
        ("matrix", 1, dtype, tasks, 2**log2)
        for dtype in kernels.dtypes
        for tasks in kernels.tasks
        for log2 in kernels.log2_sizes
    } | {
        (kernels.multi_tensor.name, len(shapes), dtype, tasks, sum(math.prod(shape) for shape in shapes))
        for dtype in kernels.dtypes
        for tasks in kernels.multi_tensor_tasks
    }
    candidates = (
        {("copy", None, None)}
        | {(kernel_pass, backend, None) for kernel_pass in ("gram", "combine") for backend in meta["backends"]}
        | {(kernel_pass, None, name) for kernel_pass, names in BASELINES.items() for name in names}
    )
    limit_rows = [row for row in kernel_rows if row.get("reference")]
    kernel_rows = [row for row in kernel_rows if not row.get("reference")]
    for layout, tensors, dtype, tasks, numel in expected_cases:
        case_rows = [
            row
            for row in kernel_rows
            if (row["layout"], row["tensors"], row["dtype"], row["tasks"], row["numel"])
            == (layout, tensors, dtype, tasks, numel)
        ]
        assert {(row["pass"], row["backend"], row["baseline"]) for row in case_rows} == candidates
        copy = next(row for row in case_rows if row["pass"] == "copy")
        for row in case_rows:
            assert row["error"] is None, row["error"]
            assert row["bytes"] == pass_bytes(row["pass"], row["tasks"], row["numel"], row["element_size"])
            assert row["gbps"] == pytest.approx(row["bytes"] / row["times"]["median"] / 1e9)
            assert row["copy_ratio"] == pytest.approx(row["gbps"] / copy["gbps"])
            assert row["gbps"] > 0 and row["times"]["samples"] == kernels.repeats
    assert len(kernel_rows) == len(expected_cases) * len(candidates)
    # beside each native CPU matrix job: the FMA probe, and the float32 twin of a 16-bit J
    matrix_cases = [case for case in expected_cases if case[0] == MATRIX]
    probes = [row for row in limit_rows if row["reference"] == ROOFLINE_REFERENCE]
    twins = [row for row in limit_rows if row["reference"] == TWIN_REFERENCE]
    if roofline.unavailable_reason() is None:
        assert len(probes) == len(matrix_cases)
        assert all(row["fma_per_s"] > 0 and row["fmas"] == roofline.fmas_per_sample(row["threads"]) for row in probes)
    half_cases = [case for case in matrix_cases if case[2] != "float32"]
    assert len(twins) == 3 * len(half_cases)
    for row in twins:
        assert row["dtype"] == "float32" and row["twin_of"] == "bfloat16" and row["layout"] == MATRIX
        assert row["bytes"] == pass_bytes(row["pass"], row["tasks"], row["numel"], 4) and row["gbps"] > 0

    step_rows = saved["steps"]
    backends = available_backends("cpu")
    # the floor, the one-backward equal step; per weighting the library path, TorchJD's two forms,
    # MTLStep's speed, memory and features mode a backend; the batched variant
    per_trunk = 2 + 2 * (1 + 2 * torchjd_installed() + 3 * len(meta["backends"])) + 1
    assert len(step_rows) == per_trunk * len(TINY.steps.trunks)
    for row in step_rows:
        assert row["error"] is None, row["error"]
        assert row["times"]["step"]["median"] > 0 and row["peak_bytes"] > 0
        separable = row["path"] in ("library", "torchjd") or row["variant"] in ("speed", "speed+batched")
        post = row["times"]["post_backward"]["median"]
        assert (post is not None) == separable, row["key"]
        if separable:
            assert row["times"]["task_gradients"]["median"] > 0
            assert post == pytest.approx(
                row["times"]["backward_and_update"]["median"] - row["times"]["task_gradients"]["median"], abs=0.05
            )
    assert set(meta["backends"]) <= set(backends)

    sweeps = {(row["sweep"], row["tasks"], row["shared_numel"]) for row in saved["scaling"]}
    assert len({key[:2] for key in sweeps if key[0] == "tasks"}) == len(TINY.scaling.task_counts)
    assert len({key[2] for key in sweeps if key[0] == "size"}) == len(TINY.scaling.widths)

    distributed = [row for row in saved["extras"] if row["suite"] == "bench_distributed"]
    plan = TINY.distributed
    assert [(row["world_size"], row["method"]) for row in distributed] == [
        (world_size, method)
        for world_size in plan.world_sizes
        for method in ("ddp", "exact", "local") + (("mtlstep",) if world_size == 1 else ())
    ]
    for row in distributed:
        tasks, shared, heads, ranks = row["tasks"], row["shared_numel"], row["head_numel"], row["world_size"]
        assert row["step_ms"] >= row["fastest_ms"] > 0
        # the payloads of README's table, in float32 elements; nothing leaves a single rank
        payload = {
            "ddp": shared + heads,
            "exact": (tasks + 1) * shared + heads + tasks * (tasks + 3) // 2,
            "local": shared + heads + tasks * (tasks + 3) // 2 + 1,  # + 1: the ranks agree on the skip
            "mtlstep": 0,
        }[row["method"]]
        assert row["payload_bytes"] == 4 * payload
        if row["method"] == "ddp":
            assert row["sent_bytes"] == pytest.approx(2 * (ranks - 1) / ranks * 4 * payload)
        if ranks == 1:
            assert row["sent_bytes"] == 0
    left_out = meta["notes"].get("extra suites left out", [])
    for suite in SUITES:  # measured, or named as left out
        assert any(row.get("suite") == suite for row in saved["extras"]) or any(n.startswith(suite) for n in left_out)

    text = report.read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / image).stat().st_size > 0
    for heading in (
        "## Targets",
        "## Steps",
        "## Kernels",
        "### Multi-tensor",
        "## Scaling",
        "## Distributed",
        "## Weighting solvers",
    ):
        assert heading in text
    assert "steps_overhead.png" in text and "kernels_gram_float32.png" in text and meta["commit"] in text
    captions, figures, tables = text.count(f"*{caption(meta)}*"), text.count("!["), len(re.findall(r"(?m)^\|---", text))
    assert captions == 1 + figures + tables  # under the title, and under every figure and table
    rebuilt = main(["--report-only", str(tmp_path / "results.json")])
    assert rebuilt.read_text() == text


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_kernel_candidates_compute_their_pass(dtype_name, one_thread):
    sizes = [math.prod(shape) for shape in TINY.kernels.multi_tensor.shapes()]
    case = KernelCase.make(dtype_name, 3, sizes, CPU)
    matrix = torch.cat([block.double() for block in case.blocks], dim=1)
    gram = matrix @ matrix.T
    combined = case.weights_like.double() @ matrix
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype_name == "float32" else {"rtol": 2e-2, "atol": 2e-2}

    def close(actual, expected):
        torch.testing.assert_close(actual.double(), expected, **tolerance)

    def written():
        return torch.cat(case.outs).double()

    calls = case.calls(measured_backends(CPU)[0])
    for candidate, call in calls.items():
        case.outs[0].zero_()
        result = call()
        if candidate.kernel_pass == "copy":
            assert torch.equal(case.destination, torch.cat([block.reshape(-1) for block in case.blocks]))
        elif candidate.baseline == FOREACH_NORM:
            norms = torch.stack(result).view(3, len(sizes)).double()
            close(norms.square().sum(1), gram.diagonal())
        elif candidate.baseline == SQUARE_SUM:
            close(result, gram.diagonal())
        elif candidate.kernel_pass == "gram":  # the backends and J @ J.T
            close(result, gram)
        elif candidate.baseline == MATMUL_COMBINE:
            close(torch.cat(result), combined)
        else:  # the backends and torch.mv write into the outputs
            assert candidate.backend or candidate.baseline == MV_INTO_OUT
            close(written(), combined)
    assert Candidate("gram", baseline=MATMUL_GRAM) in calls


def _kernel_row(
    kernel_pass, gbps, *, backend=None, baseline=None, dtype="float32", tasks=8, numel=2**22, copy_ratio=0.5
):
    return {
        "pass": kernel_pass,
        "backend": backend,
        "baseline": baseline,
        "layout": "matrix",
        "dtype": dtype,
        "tasks": tasks,
        "numel": numel,
        "gbps": gbps,
        "copy_ratio": copy_ratio,
        "times": {"median": 1.0},
    }


def _verdicts(device_type, backends, kernel_rows):
    judged = evaluate({"meta": {"device_type": device_type, "backends": backends}, "kernels": kernel_rows})
    kernel_targets = [t for t in judged if "kernel" in t["target"] or "native" in t["target"]]
    return {(t["target"], t["threshold"]): (t["measured"], t["verdict"]) for t in kernel_targets}


def test_native_cpu_target_is_judged_on_the_ratios_of_one_run():
    rows = []
    for dtype, combine_gbps in (("float32", 16.0), ("bfloat16", 14.0)):
        rows += [
            _kernel_row("gram", 10.0, backend="native", dtype=dtype),
            _kernel_row("gram", 2.5, baseline=MATMUL_GRAM, dtype=dtype),
            _kernel_row("gram", 12.0, baseline=FOREACH_NORM, dtype=dtype),
            _kernel_row("combine", combine_gbps, backend="native", dtype=dtype),
            _kernel_row("combine", 10.0, baseline=MATMUL_COMBINE, dtype=dtype),
            _kernel_row("gram", 10.0, backend="native", dtype=dtype, tasks=4),  # another T: not judged
        ]
    verdicts = _verdicts("cpu", ["native"], rows)
    where = "CPU, float32, T=8, P=2^22"
    assert verdicts[(f"native gram pass: speed-up vs {MATMUL_GRAM} ({where})", "≥ 3×")] == ("4.00×", "met")
    assert verdicts[(f"native gram pass: read bandwidth vs {FOREACH_NORM} ({where})", "≥ 80 %")] == (
        "83 % (10.0 vs 12.0 GB/s)",
        "met",
    )
    assert verdicts[(f"native combine pass: speed-up vs {MATMUL_COMBINE} ({where})", "≥ 1.5×")] == ("1.60×", "met")
    bf16 = "CPU, bfloat16, T=8, P=2^22"
    assert verdicts[(f"native combine pass: speed-up vs {MATMUL_COMBINE} ({bf16})", "≥ 1.5×")] == ("1.40×", "missed")
    on_gpu = _verdicts("cuda", ["native"], rows)
    assert {verdict for (target, _), (_, verdict) in on_gpu.items() if target.startswith("native")} == {"not judged"}


def test_gpu_kernel_target_needs_copy_bandwidth_and_a_lead_over_every_baseline():
    big = 2**24
    rows = [
        _kernel_row("gram", 900.0, backend="triton", numel=big, copy_ratio=0.95),
        _kernel_row("gram", 600.0, baseline=MATMUL_GRAM, numel=big),
        _kernel_row("combine", 850.0, backend="triton", numel=big, copy_ratio=0.92),
        _kernel_row("combine", 880.0, baseline=MV_INTO_OUT, numel=big),
        _kernel_row("gram", 100.0, backend="triton", numel=2**20, copy_ratio=0.2),  # below 2^24: not judged
    ]
    verdicts = _verdicts("cuda", ["triton", "reference"], rows)
    copy_target = verdicts[("kernel passes at P ≥ 2^24 (triton)", "≥ 90 % of copy bandwidth (GPU)")]
    assert copy_target == ("92 % (worst: combine, float32, T=8, P=2^24)", "met")
    lead = verdicts[("kernel passes at P ≥ 2^24 (triton)", "ahead of every torch baseline (GPU)")]
    assert lead == (f"0.97× (worst: vs {MV_INTO_OUT}, combine, float32, T=8, P=2^24)", "missed")
    assert not any("(reference)" in target for target, _ in verdicts)
    on_cpu = _verdicts("cpu", ["triton"], rows)
    assert on_cpu[("kernel passes at P ≥ 2^24 (triton)", "≥ 90 % of copy bandwidth (GPU)")][1] == "not judged"


def _float64_update(model32, batch32, weights_of):
    """∇ Σ w_i L_i on the trunk in float64, with w from the float64 task-gradient Gram matrix."""
    model = model32.double()
    batch = tuple(t.double() for t in batch32)
    _, losses = model(batch)
    shared = list(model.trunk.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    jacobian = torch.stack(rows)
    weights = weights_of(torch.stack([loss.detach() for loss in losses]), jacobian @ jacobian.T)
    grads = torch.autograd.grad(sum(w * loss for w, loss in zip(weights, losses, strict=True)), shared)
    return torch.cat([g.reshape(-1) for g in grads]), weights


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("spec", TINY.steps.trunks, ids=lambda spec: spec.kind)
@pytest.mark.parametrize("path", ["library", "torchjd", "torchjd_gramian", "torchjd_autogram"])
def test_baseline_paths_write_the_weighted_update(spec, path, one_thread):
    if path.startswith("torchjd") and not torchjd_installed():
        pytest.skip("torchjd is not installed")
    model, batch = build_model(spec, 3, CPU)
    model.eval()  # batch norm from running statistics: the float64 twin then sees the same function
    heads = [head.parameters() for head in model.heads]
    features, losses = model(batch)
    if path == "torchjd_autogram":
        from bench.torchjd_path import AutogramStep

        autogram = AutogramStep(model, "emtl", lam=1.0)
        autogram.backward(autogram.forward(batch)[1])
        model = autogram.model  # the copy its engine hooks holds the update
    elif path == "library":
        step = LibraryStyleStep(model.trunk.parameters(), heads, "emtl", lam=1.0)
        step.backward(losses)
    else:
        from bench.torchjd_path import TorchJDStep

        step = TorchJDStep(
            model.trunk.parameters(), heads, "emtl", lam=1.0, optimize_gramian_computation=path != "torchjd"
        )
        step.backward(features, losses)
    update = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()]).double()
    expected, weights = _float64_update(model, batch, lambda losses, gram: emtl_weights(losses, gram, lam=1.0))
    assert not torch.allclose(weights, torch.ones_like(weights), atol=1e-3)  # the weighting did something
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_cpu_peak_memory_is_the_largest_rise_of_live_tensor_bytes():
    def allocate():
        first = torch.empty(1_000_000)  # 4 MB
        second = torch.empty(2_000_000)  # 12 MB live
        del first
        third = torch.empty(500_000)  # 10 MB live
        del second, third

    assert cpu_peak_increase(allocate) == 12_000_000
    resident = torch.empty(250)
    assert peak_bytes(allocate, CPU, resident=[resident, resident[10:]]) == 12_001_000


def test_loglog_slope_recovers_a_power_law():
    xs = [2, 4, 8, 16, 32]
    assert loglog_slope(xs, [3.0 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert math.isnan(loglog_slope([4], [1.0]))


def test_pass_bytes_follow_the_cost_model():
    assert pass_bytes("gram", 8, 1000, 2) == 8 * 1000 * 2
    assert pass_bytes("combine", 8, 1000, 2) == (8 + 1) * 1000 * 2
    assert pass_bytes("copy", 8, 1000, 4) == 2 * 8 * 1000 * 4


def test_weighting_suite_times_every_weighting_beside_the_gram_pass(one_thread):
    _, gram = bench_weightings.solver_inputs(2, CPU)
    assert gram[0, 1] < 0  # the two tasks conflict
    plan = bench_weightings.PLANS["tiny"]
    rows = bench_weightings.results("tiny", CPU)
    assert [(row["weighting"], row["num_tasks"]) for row in rows] == [
        (name, num_tasks) for num_tasks in plan.task_counts for name in WEIGHTINGS
    ]
    for row in rows:
        if row["weighting"] == "krum" and row["num_tasks"] < 3:  # Krum needs three tasks: the row says so
            assert "needs at least 3 tasks" in row["error"]
            continue
        assert row["error"] is None, row["error"]
        assert math.isfinite(row["median_us"]) and row["median_us"] >= row["min_us"] > 0
        assert row["gram_numel"] == 2**plan.gram_log2_numel and row["gram_pass_us"] > 0
        assert row["vs_gram_pass"] == pytest.approx(row["median_us"] / row["gram_pass_us"])
        assert "graph_median_us" not in row  # CUDA graphs are captured on a GPU only
    if torchjd_installed():  # each method TorchJD 0.18 has is timed beside ours
        compared = {row["weighting"] for row in rows if math.isfinite(row.get("vs_torchjd", math.nan))}
        assert {"upgrad", "nash_mtl", "fairgrad", "krum", "pcd", "gradvac", "cr_mogm", "config", "pcgrad"} <= compared


def test_kernel_sizes_replace_the_presets(tmp_path, one_thread):
    main(
        [
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--sections",
            "kernels",
            "--kernel-sizes",
            "9,11",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads((tmp_path / "results.json").read_text())["kernels"]
    matrix_sizes = {row["numel"] for row in rows if row["layout"] == MATRIX}
    assert {2**9, 2**11} <= matrix_sizes and 2**10 not in matrix_sizes
    for bad in ("20,x", "0", ""):
        with pytest.raises(SystemExit):
            main(["--kernel-sizes", bad])


def _timed_row(kernel_pass, seconds, *, dtype="float32", tasks=8, numel=2**22, backend=None, baseline=None, **extra):
    """A kernel row of a CPU matrix job timed at ``seconds`` (quartiles ±10 %)."""
    element_size = 4 if dtype == "float32" else 2
    moved = pass_bytes(kernel_pass, tasks, numel, element_size)
    row = _kernel_row(kernel_pass, moved / seconds / 1e9, backend=backend, baseline=baseline, dtype=dtype, tasks=tasks)
    row.update(numel=numel, element_size=element_size, bytes=moved, **extra)
    row["times"] = {"median": seconds, "p25": 0.9 * seconds, "p75": 1.1 * seconds}
    return row


def _job_rows(dtype, tasks, *, gram, combine, mv, fma_per_s=50e9, twin_gram=None, twin_combine=None):
    probe = {"pass": "fma", "backend": None, "baseline": None, "reference": ROOFLINE_REFERENCE, "layout": "matrix"}
    probe.update(dtype=dtype, tasks=tasks, numel=2**22, fma_per_s=fma_per_s, times={"median": 0.01})
    rows = [
        _timed_row("gram", gram, dtype=dtype, tasks=tasks, backend="native"),
        _timed_row("combine", combine, dtype=dtype, tasks=tasks, backend="native"),
        probe,
    ]
    if dtype == "float32":
        return [*rows, _timed_row("combine", mv, tasks=tasks, baseline=MV_INTO_OUT)]
    twin = {"reference": TWIN_REFERENCE, "twin_of": dtype}
    return [
        *rows,
        _timed_row("combine", mv, tasks=tasks, baseline=MV_INTO_OUT, **twin),
        _timed_row("gram", twin_gram, tasks=tasks, backend="native", **twin),
        _timed_row("combine", twin_combine, tasks=tasks, backend="native", **twin),
    ]


def test_cpu_limit_targets_hold_each_pass_to_its_limit_in_its_own_job():
    rows = _job_rows("float32", 8, gram=0.012, combine=0.009, mv=0.010)
    # T = 32: torch.mv reads 2^29 bytes in 40 ms; the roofline is the FMA units' (50e9 / 528 columns/s)
    rows += _job_rows("float32", 32, gram=0.060, combine=0.030, mv=0.040)
    rows += _job_rows("bfloat16", 8, gram=0.0049, combine=0.006, mv=0.010, twin_gram=0.009, twin_combine=0.009)
    results = {"meta": {"device_type": "cpu", "backends": ["native"]}, "kernels": rows}
    verdicts = {t["target"]: (t["measured"], t["verdict"]) for t in evaluate(results)}
    combine = verdicts["native combine vs torch.mv(J.T, w, out=g) (CPU, float32)"]
    assert combine == ("worst 1.11× (quartiles 0.91–1.36) at float32, T=8, P=2^22; 2 of 2 cases met", "met")
    gram = verdicts["native Gram pass vs torch.mv's read rate, T < 16 (CPU, float32)"]
    assert gram == ("worst 0.83× (quartiles 0.68–1.02) at float32, T=8, P=2^22; 0 of 1 cases met", "missed")
    roof = (2**22 / 0.060) / (50e9 / 528)
    assert verdicts["native Gram pass vs its roofline, T ≥ 16 (CPU, float32)"][0].startswith(f"worst {roof:.2f}×")
    assert verdicts["native Gram pass vs its roofline, T ≥ 16 (CPU, float32)"][1] == "met"
    half_gram = verdicts["16-bit native Gram pass, T < 16: bytes/s vs float32 (CPU, bfloat16)"]
    assert half_gram[0].startswith(f"worst {0.009 / 0.0049 / 2:.2f}×") and half_gram[1] == "met"
    half_combine = verdicts["16-bit native combine: bytes/s vs float32 (CPU, bfloat16)"]
    assert half_combine[0].startswith("worst 0.75×") and half_combine[1] == "missed"
    assert verdicts["native Gram pass vs its roofline, T ≥ 16 (CPU, float16)"][1] == "not judged"

    distances = {(d["pass"], d["dtype"], d["tasks"]): d for d in distance_table(results)}
    assert distances[("combine", "float32", 8)]["distance"] == pytest.approx(0.010 / 0.009)
    assert distances[("gram", "float32", 8)]["bound"] == "memory"
    assert distances[("gram", "float32", 32)]["bound"] == "FMA"
    assert distances[("gram", "float32", 32)]["distance"] == pytest.approx(roof)
    # a 16-bit pass is held to the float32 torch.mv's bytes a second
    assert distances[("gram", "bfloat16", 8)]["distance"] == pytest.approx(0.010 / 0.0049 / 2)
    gpu = {"meta": {"device_type": "cuda", "backends": ["native"]}, "kernels": rows}
    assert not distance_table(gpu)
    assert all(t["verdict"] == "not judged" for t in evaluate(gpu) if "(CPU," in t["target"])


def _with_rounds(row, rounds):
    row["times"] = {"median": statistics.median(rounds), "p25": min(rounds), "p75": max(rounds), "rounds": rounds}
    return row


def test_cpu_limit_ratios_pair_the_candidates_round_by_round():
    # The machine's memory rate flips between 0.006 s and 0.009 s a twin pass; the 16-bit combine
    # reads at 0.9x its twin's bytes a second in the same state, but ran in the other state in
    # rounds 3 and 4. Medians alone (0.006 and 0.005 s) would say 0.6x.
    rows = _job_rows("bfloat16", 8, gram=0.0049, combine=0.005, mv=0.010, twin_gram=0.009, twin_combine=0.009)
    half = next(r for r in rows if r["pass"] == "combine" and r["backend"] == "native" and "twin_of" not in r)
    twin = next(r for r in rows if r["pass"] == "combine" and r["backend"] == "native" and "twin_of" in r)
    _with_rounds(twin, [0.006, 0.009, 0.006, 0.009, 0.006])
    _with_rounds(half, [0.006 / 1.8, 0.009 / 1.8, 0.006 / 1.8, 0.009 / 1.2, 0.006 / 1.2])
    # T = 32 float32: the probe reaches 2x the FMAs in the rounds where the pass runs 2x faster
    # (the two threads on two cores rather than one), so the pass sits at 0.8x its roofline in
    # every round; its median and the probe's median come from different rounds.
    rows += _job_rows("float32", 32, gram=0.060, combine=0.030, mv=0.040)
    gram = next(r for r in rows if r["pass"] == "gram" and r["tasks"] == 32)
    probe = next(r for r in rows if r["pass"] == "fma" and r["tasks"] == 32)
    mv = next(r for r in rows if r.get("baseline") == MV_INTO_OUT and r["tasks"] == 32)
    probe["fmas"] = 50e9 * 0.01
    one_core = 2**22 * 528 / (0.8 * 50e9)  # seconds of the pass at 0.8x a 50e9 FMA/s roofline
    _with_rounds(gram, [one_core, one_core, one_core / 2, one_core / 2, one_core / 2])
    _with_rounds(probe, [0.01, 0.01, 0.005, 0.005, 0.005])
    _with_rounds(mv, [0.01] * 5)  # far above the FMA limit
    results = {"meta": {"device_type": "cpu", "backends": ["native"]}, "kernels": rows}
    verdicts = {t["target"]: (t["measured"], t["verdict"]) for t in evaluate(results)}
    half_combine = verdicts["16-bit native combine: bytes/s vs float32 (CPU, bfloat16)"]
    assert half_combine[0].startswith("worst 0.90× (quartiles 0.60–0.90)") and half_combine[1] == "met"
    roofline = verdicts["native Gram pass vs its roofline, T ≥ 16 (CPU, float32)"]
    assert roofline[0].startswith("worst 0.80× (quartiles 0.80–0.80)") and roofline[1] == "met"
    del probe["times"]["rounds"]  # without rounds: the medians, 0.8x of the slower probe's rate / 2
    verdicts = {t["target"]: (t["measured"], t["verdict"]) for t in evaluate(results)}
    assert verdicts["native Gram pass vs its roofline, T ≥ 16 (CPU, float32)"][0].startswith("worst 1.60×")


def test_large_model_step_script_runs_its_cpu_configuration(tmp_path, one_thread):
    """The GPU script's tiny configuration: every path measured, ratios to the floor of its run."""
    report = large_model_steps.main(["--config", "tiny", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "large_model_steps_tiny.json").read_text())["rows"]
    paths = {row["path"] for row in rows}
    assert {"floor", "mtlstep/one-backward/equal/auto", "mtlstep/features/emtl/auto"} <= paths
    assert {"mtlstep/speed/emtl/auto", "mtlstep/memory/emtl/auto", "mtlstep/norm_params/emtl/auto"} <= paths
    for row in rows:
        assert row["error"] is None, row["error"]
        assert row["x_floor"] > 0 and row["peak_mib"] >= 0
    assert next(row for row in rows if row["path"] == "floor")["x_floor"] == 1
    assert "| 2 | mtlstep/features/emtl/auto |" in report.read_text()


def test_cheap_modes_accuracy_script_compares_with_the_exact_step(tmp_path, one_thread):
    report = cheap_modes_accuracy.main(
        ["--epochs", "1", "--seeds", "1", "--weightings", "mgda", "--out", str(tmp_path)]
    )
    rows = json.loads((tmp_path / "cheap_modes_accuracy.json").read_text())["rows"]
    assert [row["mode"] for row in rows] == ["exact", "features", "norm_params"]
    for row in rows[1:]:
        assert -1 <= row["cosine_min"] <= row["cosine_p10"] <= row["cosine_median"] <= 1 + 1e-9
        assert 0 <= row["weight_error_median"] <= row["weight_error_p90"]
    assert all(0 <= row["digit_mean"] <= 1 for row in rows)
    assert (tmp_path / "cheap_modes_accuracy.png").stat().st_size > 0
    assert "| mgda | features |" in report.read_text()


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_memory_configuration_paths_run_and_memory_batched_is_left_out_where_it_is_memory_mode(one_thread):
    spec = next(spec for spec in TINY.steps.trunks if spec.kind == "transformer")
    model, batch = build_model(spec, 2, CPU)
    paths = large_model_steps.config_paths(large_model_steps.CONFIGS["memory"], model)
    keys = {path.key for path in paths}
    assert {"mtlstep/memory/upgrad/auto", "mtlstep/memory+batched/emtl/auto"} <= keys
    assert "mtlstep/memory+batched/upgrad/auto" not in keys  # UPGrad's memory mode is that path already
    assert torchjd_installed() <= ("torchjd/autogram/upgrad" in keys)
    rows = measure_paths(model, batch, paths, CPU, warmup=0, repeats=1, memory=False)
    assert all(row["error"] is None for row in rows), [row["error"] for row in rows]
