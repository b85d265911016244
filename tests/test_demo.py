"""The demo runs end to end on a short schedule and prints its table."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from emtl_kernels import demo


def test_demo_trains_every_method_and_prints_the_table(capsys, tmp_path):
    plot_path = tmp_path / "contributions.png"
    results = demo.main(["--epochs", "3", "--seeds", "2", "--plot", str(plot_path)])
    output = capsys.readouterr().out
    assert list(results) == list(demo.METHODS)
    for method, runs in results.items():
        assert len(runs) == 2
        assert f"\n{method} " in output
        for run in runs:
            assert 0 <= run["metrics"]["digit"] <= 1 and 0 <= run["metrics"]["large"] <= 1
            assert len(run["history"]) == 3 and all(len(r) == 3 for r in run["history"])
    # Balanced by gradient norm, the digit task learns fast (chance is 0.1).
    assert all(run["metrics"]["digit"] > 0.5 for run in results["gradnorm_scaling"])
    assert "relative contributions" in output
    assert plot_path.stat().st_size > 0
