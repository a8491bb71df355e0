"""The benchmark runs for real on small data and reports its figures; it judges no speed itself."""

from __future__ import annotations

import datetime
import json

import pytest
import torch

from search.bench.__main__ import main as bench_main
from trainables.config import TrialConfig
from trainables.loop import resolve_precision
from trainables.model import training_flops_per_image

pytestmark = pytest.mark.slow


def test_the_benchmark_prints_its_figures_as_json(image_folder, tmp_path, capsys):
    code = bench_main(
        ["--data", str(image_folder), "--data-root", str(tmp_path), "--device", "cpu"]
        + ["--val-size", "9", "--sweep-trials", "2", "--sections", "epochs,parallel,accuracy,sweeps"]
        + ["--accuracy-seeds", "2", "--json"]
    )
    assert code == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["train_images"] == 81 and figures["date"] == datetime.date.today().isoformat()
    # Figures counted from facts the benchmark does not measure: the model, the data, the machine.
    flops = training_flops_per_image(TrialConfig(), (3, 32, 32), num_classes=3)  # 3 classes, not 10
    assert figures["train_mflop_per_image"] == pytest.approx(flops / 1e6)
    default = resolve_precision("auto", torch.device("cpu"))
    assert figures["default_precision"] == default and figures["parallel_precision"] == default
    assert figures["project_img_per_s"] == figures[f"project_{default}_img_per_s"]
    for precision in ("fp32", "bf16"):
        rate = figures[f"project_{precision}_img_per_s"]
        assert figures[f"project_{precision}_gflop_per_s"] == pytest.approx(rate * flops / 1e9)
        # The fraction of the peak measured in the same run. Not bounded by 1 here: the peak and the
        # loop are timed at different moments, and tests share this machine's two cores.
        peak = figures[f"peak_{precision}_gflop_per_s"]
        assert peak > 0
        assert figures[f"project_{precision}_of_peak"] == pytest.approx(rate * flops / 1e9 / peak)
        assert len(figures[f"val_acc_{precision}"]) == 2
    # A one-epoch trial reports at each default rung within the epoch and at its end, each
    # report a validation: what that costs beside reporting at the end only.
    assert figures["rung_reports"] == 3
    assert figures["rung_reports_cost"] == pytest.approx(
        figures["epoch_reported_at_rungs_s"] / figures["epoch_reported_at_end_s"] - 1
    )
    for trials in (1, 2):
        assert figures[f"parallel_{trials}_of_peak"] > 0
    assert figures["sweep_trials"] == 2 and len(figures["sweep_startup_s"]) == 2
    assert 1 <= figures["sweep_concurrent"] <= 2
