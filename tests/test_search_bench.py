"""The search benchmarks run for real on small images. The strategies' (--search): each pick is trained
again and scored on an audit split no sweep sees, the strategies spend the same compute, and a second
run reuses the first. The pipelines' (--final): each final model is scored on the audit split, and
the sweeps at the final budget spend what today's pipeline spent, sweep and retrain together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from search.bench.audit import KeptResults
from search.bench.final import FINAL_GP, FINAL_RANDOM, PIPELINES, TODAY, run_final_benchmark
from search.bench.strategies import BASELINE_MOST_TRIALS, STRATEGIES, run_search_benchmark
from search.sweep.settings import SweepSettings
from trainables.config import DataSettings

pytestmark = pytest.mark.slow


def test_each_pick_is_scored_on_the_audit_split_at_equal_compute_and_kept_for_reuse(
    image_folder, tmp_path, ray_runtime, capsys
):
    data = DataSettings(source=str(image_folder), root=str(tmp_path / "cache"), val_size=9)
    (default,) = [strategy for strategy in STRATEGIES if strategy.is_default]
    random_search = STRATEGIES[1]  # one-epoch trials, until they trained what the default did
    assert random_search.matches_default_compute
    figures = run_search_benchmark(data, [0], (default, random_search), tmp_path, audit_images=15)
    printed = capsys.readouterr().out
    assert "Audit split: 15 images held out; sweeps see the other 75" in printed

    sweeps = {
        sweep["strategy"]: sweep
        for sweep in json.loads((tmp_path / "search_benchmark.json").read_text())["sweeps"]
    }
    assert set(sweeps) == {default.name, random_search.name}
    # On 75 images the default's compute budget is far away: its --num-samples ends it.
    assert sweeps[default.name]["configs"] == SweepSettings(space="nesterov").num_samples
    # Random search gets the TFLOP the default trained as its budget, and stops at the first trial
    # past it: the same compute or a little more, in one-epoch trials.
    spent = sweeps[default.name]["tflop_spent"]
    assert sweeps[random_search.name]["compute_budget"] == spent
    assert spent <= sweeps[random_search.name]["tflop_spent"]
    assert sweeps[random_search.name]["configs"] < BASELINE_MOST_TRIALS
    assert sweeps[random_search.name]["epochs_spent"] == pytest.approx(sweeps[random_search.name]["configs"])
    for strategy in (default, random_search):
        sweep, row = sweeps[strategy.name], figures[strategy.name]
        assert 0 <= sweep["audit_accuracy"] <= 1 and sweep["audit_accuracy"] * 15 == pytest.approx(
            round(sweep["audit_accuracy"] * 15)
        )  # a share of the 15 audit images
        assert row["audit_per_seed"] == [sweep["audit_accuracy"]]
        low, high = row["best_val_interval_95"]
        assert low <= sweep["best_val_accuracy"] <= high
        assert sweep["tflop_spent"] > 0 and sweep["curve"][-1][0] == pytest.approx(sweep["tflop_spent"])
    assert Image.open(tmp_path / "search_benchmark.png").format == "PNG"

    # Run again under the same conditions: nothing is swept again, the figures are the same.
    again = run_search_benchmark(data, [0], (default, random_search), tmp_path, audit_images=15)
    assert "Reusing 2 results measured before" in capsys.readouterr().out
    assert again == figures


def test_a_record_made_under_other_conditions_is_not_reused(tmp_path):
    record_file = tmp_path / "search_benchmark_sweeps.json"
    record_file.write_text(json.dumps({"conditions": {"audit_images": 15}, "results": [{"strategy": "x"}]}))
    assert KeptResults(Path(record_file), {"audit_images": 30}).results == []
    assert KeptResults(Path(record_file), {"audit_images": 15}).find(strategy="x") == {"strategy": "x"}


def test_each_pipelines_final_model_is_scored_on_the_audit_split_for_the_same_total_compute(
    image_folder, tmp_path, ray_runtime, capsys
):
    data = DataSettings(source=str(image_folder), root=str(tmp_path / "cache"), val_size=9)
    figures = run_final_benchmark(data, [0], epochs=2, out=tmp_path, audit_images=15)
    runs = {
        run["pipeline"]: run for run in json.loads((tmp_path / "final_benchmark.json").read_text())["runs"]
    }
    assert set(runs) == set(figures) == set(PIPELINES)
    today = runs[TODAY]
    # Today's total is its sweep and its retrain (2 epochs of all 75 images, a share of the 15 audited).
    assert today["total_tflop"] == pytest.approx(today["sweep_tflop"] + today["final_tflop"])
    assert today["final_tflop"] > 0 and today["final_wall_s"] > 0
    for pipeline in (FINAL_GP, FINAL_RANDOM):
        final = runs[pipeline]
        # Given today's total as its budget: its final trial is its model, counted in its sweep.
        assert final["compute_budget"] == today["total_tflop"]
        assert final["total_tflop"] == pytest.approx(final["sweep_tflop"] + final["final_tflop"])
        assert final["final_tflop"] > 0 and final["configs"] >= 1
    for run in runs.values():
        low, high = run["audit_interval_95"]
        assert low <= run["audit_accuracy"] <= high
        assert run["audit_accuracy"] * 15 == pytest.approx(round(run["audit_accuracy"] * 15))
    assert figures[FINAL_GP]["against_today_per_seed"] == [
        runs[FINAL_GP]["audit_accuracy"] - today["audit_accuracy"]
    ]
    assert Image.open(tmp_path / "final_benchmark.png").format == "PNG"
    # Run again: each pipeline's result is reused, the figures are the same.
    capsys.readouterr()
    assert run_final_benchmark(data, [0], epochs=2, out=tmp_path, audit_images=15) == figures
    assert "Reusing 3 results measured before" in capsys.readouterr().out
