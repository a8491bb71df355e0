"""The search benchmark runs for real on small images: each pick is trained again and scored on an
audit split no sweep sees, the strategies spend the same compute, and a second run reuses the first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from search.search_bench import BASELINE_MOST_TRIALS, STRATEGIES, run_search_benchmark
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
    assert "Reusing 2 sweeps measured before" in capsys.readouterr().out
    assert again == figures


def test_a_record_made_under_other_conditions_is_not_reused(tmp_path):
    from search.search_bench import SweepRecord

    record_file = tmp_path / "search_benchmark_sweeps.json"
    record_file.write_text(json.dumps({"conditions": {"audit_images": 15}, "sweeps": [{"strategy": "x"}]}))
    record = SweepRecord(Path(record_file), {"audit_images": 30})
    assert record.results == []
