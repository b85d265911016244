"""The benchmark code works: the runner's tiny preset end to end, the baseline paths' updates
against float64, and the measuring tools on known inputs. No timing is asserted."""

import json
import math
import re

import pytest
import torch

from bench.kernels import pass_bytes
from bench.library_path import LibraryStyleStep
from bench.memory import cpu_peak_increase, peak_bytes
from bench.presets import TINY
from bench.run import main, run, save
from bench.scaling import loglog_slope
from bench.steps import torchjd_installed
from bench.trunks import build_model
from emtl_kernels import available_backends, emtl_weights

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
    sizes = {(row["dtype"], row["tasks"], row["numel"]) for row in kernel_rows}
    assert len(sizes) == len(TINY.kernels.dtypes) * len(TINY.kernels.tasks) * len(TINY.kernels.log2_sizes)
    for row in kernel_rows:
        assert row["error"] is None
        assert row["bytes"] == pass_bytes(row["pass"], row["tasks"], row["numel"], row["element_size"])
        assert row["gbps"] == pytest.approx(row["bytes"] / row["times"]["median"] / 1e9)
        assert row["gbps"] > 0 and row["times"]["samples"] == TINY.kernels.repeats

    step_rows = saved["steps"]
    backends = available_backends("cpu")
    per_trunk = 1 + 2 * (1 + 2 * torchjd_installed() + 2 * len(meta["backends"])) + 1
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

    text = report.read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (tmp_path / image).stat().st_size > 0
    assert "steps_overhead.png" in text and "## Targets" in text and meta["commit"] in text
    rebuilt = main(["--report-only", str(tmp_path / "results.json")])
    assert rebuilt.read_text() == text


def _float64_update(model32, batch32, weights_of):
    """∇ Σ w_i L_i on the trunk in float64, with w from the float64 task-gradient Gram matrix."""
    model = model32.double()
    batch = tuple(t.double() for t in batch32)
    _, losses = model(batch)
    shared = list(model.trunk.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, shared, retain_graph=True)]) for l in losses]
    jacobian = torch.stack(rows)
    weights = weights_of(torch.stack([l.detach() for l in losses]), jacobian @ jacobian.T)
    grads = torch.autograd.grad(sum(w * l for w, l in zip(weights, losses)), shared)
    return torch.cat([g.reshape(-1) for g in grads]), weights


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("spec", TINY.steps.trunks, ids=lambda spec: spec.kind)
@pytest.mark.parametrize("path", ["library", "torchjd", "torchjd_gramian"])
def test_baseline_paths_write_the_weighted_update(spec, path, one_thread):
    if path.startswith("torchjd") and not torchjd_installed():
        pytest.skip("torchjd is not installed")
    model, batch = build_model(spec, 3, CPU)
    model.eval()  # batch norm from running statistics: the float64 twin then sees the same function
    heads = [head.parameters() for head in model.heads]
    features, losses = model(batch)
    if path == "library":
        step = LibraryStyleStep(model.trunk.parameters(), heads, "emtl", lam=1.0)
        step.backward(losses)
    else:
        from bench.torchjd_path import TorchJDStep

        step = TorchJDStep(model.trunk.parameters(), heads, "emtl", lam=1.0, optimize_gramian_computation=path != "torchjd")
        step.backward(features, losses)
    update = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()]).double()
    expected, weights = _float64_update(model, batch, lambda l, g: emtl_weights(l, g, lam=1.0))
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
