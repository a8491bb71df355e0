"""Diverging and crashing trials: stopped or retried, recorded in MLflow, and the sweep goes on."""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    REPO,
    optuna_trials,
    reported_epochs,
    run_module,
    small_sweep,
    sweep_args,
    sweep_parent,
    trial_runs,
)
from optuna.trial import TrialState
from ray import tune

from search import run
from search.sweep.engine import run_sweep
from search.sweep.settings import SweepSettings
from spaces import register_space
from trainables.names import METRIC
from trainables.trainable import train_convnet

pytestmark = pytest.mark.slow
EPOCHS = 3


@register_space(summary="test only", first_point={"lr": 5000.0})
def exploding(trial: optuna.Trial) -> dict:
    """Learning rates far too high for plain SGD, even a tenth of them (one cycle's first steps warm
    up from a ninth of the peak): every trial's loss leaves the finite numbers."""
    trial.suggest_float("lr", 2000.0, 20000.0, log=True)
    return {
        "model": "module",
        "optimizer": "sgd",
        "momentum": 0.0,
        "channel_1": 8,
        "channel_2": 4,
        "batch_size": 4,
    }


EXPLODING = f"{__file__}:exploding"  # this file, as a user's space file is named


def sweep_settings(image_folder: Path, workdir: Path, space: str, **overrides) -> SweepSettings:
    return small_sweep(
        image_folder, workdir, **{"space": space, "epochs": EPOCHS, "num_samples": 3, **overrides}
    )


def test_diverging_trials_stop_at_once_show_in_mlflow_and_tell_optuna_a_finite_value(
    image_folder, tmp_path, ray_runtime
):
    settings = sweep_settings(image_folder, tmp_path, EXPLODING)  # ASHA, max_t = 3 epochs
    outcome = run_sweep(settings)
    assert outcome.diverged == 3 and outcome.trial_statuses == {"FINISHED": 3}
    assert outcome.best_accuracy is None and "all 3 diverged" in outcome.no_best_reason
    children = trial_runs(settings)
    assert len(children) == 3
    for child in children:
        (epoch,) = reported_epochs(settings.tracking_uri, child)  # one report, not carried on to max_t
        # By the first rung, a ninth of the first epoch rounded up to a whole batch, the loss was gone.
        train_images, batch = 81, 4  # 90 images less 9 for validation; the space's batch size
        assert epoch == math.ceil(train_images / 9 / batch) * batch / train_images
        assert child.data.tags["diverged"] == "true" and child.data.metrics["diverged"] == 1.0
        assert child.data.metrics[METRIC] == 0.0

    study_trials = optuna_trials(settings)
    assert len(study_trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.value == 0.0 for t in study_trials)

    # Export still writes every trial, and says why there is no best config to export.
    trials = tmp_path / "trials.parquet"
    export_args = ["--experiment", settings.experiment_name, "--tracking-uri", settings.tracking_uri]
    export_args += ["--out", str(tmp_path / "best.json"), "--trials", str(trials)]
    exported = run_module("search.export", *export_args, cwd=tmp_path)
    assert exported.returncode == 2 and "all 3 diverged" in exported.stderr
    assert pq.read_table(trials).num_rows == 3 and not (tmp_path / "best.json").exists()


def crash_once_after_the_first_epoch():
    """The real trainable, with an out-of-memory crash once a first checkpoint exists."""

    def trainable(config, splits, settings):
        if tune.get_checkpoint() is None:
            train_convnet(config, splits, replace(settings, max_epochs=1))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        train_convnet(config, splits, settings)

    return trainable


def test_a_crashed_trial_is_retried_from_its_last_checkpoint(image_folder, tmp_path, ray_runtime):
    # FIFO: under ASHA the slower of two trials may be stopped at epoch 1, which is no retry's doing.
    settings = sweep_settings(
        image_folder, tmp_path, "nesterov", num_samples=2, max_failures=1, scheduler="fifo"
    )
    outcome = run_sweep(settings, trainable=crash_once_after_the_first_epoch())
    assert outcome.trial_statuses == {"FINISHED": 2} and not outcome.failures
    assert run.exit_code(outcome) == 0
    children = trial_runs(settings)
    assert len(children) == 2
    for child in children:
        assert reported_epochs(settings.tracking_uri, child) == [1, 2, 3]  # epoch 1 was not trained again
        assert child.data.tags["retries"] == "1"
        assert "CUDA out of memory (simulated)" in child.data.tags["error"]


def crash_the_assignments_point():
    """Trials at the assignment's point crash after one epoch, every time; the others train."""

    def trainable(config, splits, settings):
        if config["lr"] == 1e-2 and config["channel_2"] == 16:
            train_convnet(config, splits, replace(settings, max_epochs=1))
            raise ValueError("boom: a bug in the trial")
        train_convnet(config, splits, settings)

    return trainable


def test_a_trial_that_keeps_crashing_fails_after_its_retries_and_the_sweep_goes_on(
    image_folder, tmp_path, ray_runtime, capsys, monkeypatch
):
    settings = sweep_settings(image_folder, tmp_path, "nesterov", max_failures=1, scheduler="fifo")
    outcome = run_sweep(settings, trainable=crash_the_assignments_point())
    assert outcome.trial_statuses == {"FAILED": 1, "FINISHED": 2}
    failed = next(child for child in trial_runs(settings) if child.info.status == "FAILED")
    assert "ValueError: boom: a bug in the trial" in failed.data.tags["error"]
    assert failed.data.params["lr"] == "0.01"
    crashed, *others = optuna_trials(settings)  # the first is the assignment's point
    assert crashed.state == TrialState.FAIL and crashed.value is None  # Optuna hears it crashed
    assert [trial.state for trial in others] == [TrialState.COMPLETE] * 2
    (failed_name, error_line), *_ = outcome.failures.items()
    assert failed_name == failed.info.run_name and "boom" in error_line

    run.print_summary(outcome)
    printed = capsys.readouterr().out
    assert "1 failed, 2 finished" in printed and f"failed: {failed_name}: " in printed
    assert run.exit_code(outcome) == 1


def test_a_full_disk_under_the_storage_path_ends_with_the_summary_and_exit_4(image_folder, tmp_path):
    """A real 256 kB tmpfs under --storage-path, which no checkpoint fits, in a mount namespace of the
    test's own."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine cannot give a test a mount namespace of its own (unshare --mount)")
    full = tmp_path / "full"
    full.mkdir()
    settings = small_sweep(image_folder, tmp_path, space="sgd", epochs=3, storage_path=str(full / "ray"))
    run = shlex.join([sys.executable, "-m", "search.run", *sweep_args(settings)])
    script = f"mount -t tmpfs -o size=256k tmpfs {full} && exec {run} > out.log 2> err.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": ""}
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    code = subprocess.run(command, cwd=tmp_path, env=env, timeout=600).returncode

    stderr, stdout = (tmp_path / "err.log").read_text(), (tmp_path / "out.log").read_text()
    assert code == 4, stderr[-3000:]
    assert "Traceback" not in stderr
    error = f"search.run: error: Tune's storage {full / 'ray'} failed ("
    assert any(line.startswith(error) and "No space left on device" in line for line in stderr.splitlines())
    assert stderr.strip().splitlines()[-1].strip().endswith(" --resume")
    assert "\nSweep test: " in stdout and "No space left on device" in stdout  # the summary, naming why
    assert sweep_parent(settings).info.status == "KILLED"
    assert "RUNNING" not in {child.info.status for child in trial_runs(settings)}
