"""The benchmark runs for real on small data and reports its figures; it judges no speed itself."""

from __future__ import annotations

import json

import pytest

from search import bench

pytestmark = pytest.mark.slow


def test_the_benchmark_prints_its_figures_as_json(image_folder, tmp_path, capsys):
    code = bench.main(
        ["--data", str(image_folder), "--data-root", str(tmp_path), "--device", "cpu"]
        + ["--val-size", "9", "--sweep-trials", "2", "--json"]
    )
    assert code == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("project_img_per_s", "baseline_img_per_s", "speedup", "sweep_overhead", "device"):
        assert key in figures
    assert figures["device"] == "cpu" and figures["train_images"] == 81
    assert figures["speedup"] == pytest.approx(figures["project_img_per_s"] / figures["baseline_img_per_s"])
    assert figures["sweep_trials"] == 2 and len(figures["sweep_startup_s"]) == 2
    assert figures["sweep_overhead"] >= 1.0  # a sweep cannot beat the time its trials spent training
