"""The search: rungs within an epoch, what Optuna hears of each trial, a time budget, a warm start
across sweeps in one MLflow store. Real sweeps on small real image files."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from conftest import optuna_trials, reported_epochs, small_sweep, sweep_parent, trial_runs, write_image_folder
from optuna.trial import TrialState

from search.sweep.engine import run_sweep
from spaces import parse_range, register_space
from trainables.config import DataSettings
from trainables.names import TRAIN_TFLOP
from trainables.recipe import AS_THE_ASSIGNMENT_TRAINED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 images: enough batches of 64 that a ninth and a third of an epoch are apart."""
    return write_image_folder(tmp_path_factory.mktemp("search-images"), per_class=200)


def sweep_of(images: Path, workdir: Path, **overrides):
    data = DataSettings(source=str(images), root=str(workdir / "cache"), val_size=30)
    return small_sweep(images, workdir, data=data, **overrides)


def test_asha_decides_within_the_epoch_and_optuna_hears_pruned_and_complete_trials(
    images, tmp_path, ray_runtime
):
    settings = sweep_of(images, tmp_path, num_samples=9)  # ASHA: rungs at a ninth, a third, all
    outcome = run_sweep(settings)
    assert outcome.trial_statuses == {"FINISHED": 9}
    reports = {
        run.data.tags["trial_id"]: reported_epochs(settings.tracking_uri, run) for run in trial_runs(settings)
    }
    # 570 training images: a ninth is 64 rounded up to a batch (0.11), a third 192 (0.34), then all.
    assert all(epochs[0] == pytest.approx(64 / 570) for epochs in reports.values())
    full = {trial_id for trial_id, epochs in reports.items() if epochs[-1] == 1.0}
    stopped = set(reports) - full
    assert full and stopped  # some stopped at a rung inside the epoch, some trained to its end
    assert all(len(reports[trial_id]) == 3 for trial_id in full)

    studied = optuna_trials(settings)
    states = [trial.state for trial in studied]
    assert states.count(TrialState.COMPLETE) == len(full) and states.count(TrialState.PRUNED) == len(stopped)
    for trial in studied:
        if trial.state == TrialState.PRUNED:  # its reports, as Optuna's intermediate values
            assert (
                1 <= len(trial.intermediate_values) <= 2
                and trial.value == list(trial.intermediate_values.values())[-1]
            )


def test_a_time_budget_stops_new_trials_and_the_sweep_ends_normally(images, tmp_path, ray_runtime):
    settings = sweep_of(images, tmp_path, num_samples=200, scheduler="fifo", time_budget_s=12.0)
    started = time.monotonic()
    outcome = run_sweep(settings)
    assert time.monotonic() - started < 90  # not 200 trials: the budget, the trials under way, the report
    ran = sum(outcome.trial_statuses.values())
    assert 2 <= ran < 200 and outcome.trial_statuses == {"FINISHED": ran}
    assert outcome.ended_by == "its --time-budget of 12 s"  # the summary says why it ended early
    assert not outcome.interrupted and sweep_parent(settings).info.status == "FINISHED"
    assert all(trial.state.is_finished() for trial in optuna_trials(settings))  # all told, none RUNNING


def test_a_compute_budget_ends_the_sweep_at_the_trial_its_seed_fixes(images, tmp_path, ray_runtime):
    budget = 0.3  # TFLOP: a few of the 200 trials (one of 570 images costs 0.02-0.5 TFLOP)
    settings = sweep_of(images, tmp_path, num_samples=200, scheduler="fifo", compute_budget_tflop=budget)
    outcome = run_sweep(settings)
    assert not outcome.interrupted and sweep_parent(settings).info.status == "FINISHED"
    runs = sorted(trial_runs(settings), key=lambda run: run.info.run_name)  # named in the order proposed
    tflop = [run.data.metrics[TRAIN_TFLOP] for run in runs]
    assert 2 <= len(runs) < 200 and outcome.trial_statuses == {"FINISHED": len(runs)}
    assert outcome.trained_tflop == pytest.approx(sum(tflop)) and outcome.trained_tflop >= budget
    assert outcome.ended_by == "its --compute-budget of 0.3 TFLOP"
    # It ends at the first trial that brings it past the budget: no sooner, and no later.
    assert sum(tflop[:-1]) < budget <= sum(tflop)
    assert all(trial.state.is_finished() for trial in optuna_trials(settings))  # all told, none RUNNING


NARROWING = f"{__file__}:narrowing"  # this file, as a user's space file is named


@register_space(summary="test only", first_point={"lr": 1e-2})
def narrowing(trial: optuna.Trial) -> dict:
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    return {"model": "module", "optimizer": "sgd", "momentum": 0.0, "channel_1": 8, "channel_2": 4}


def renamed(trial: optuna.Trial) -> dict:
    """The same space under another name: a warm start takes its sweeps' trials too."""
    return narrowing(trial)


def wider_first_conv(trial: optuna.Trial) -> dict:
    """The same parameter, with another constant: its trials are no points of narrowing."""
    return {**narrowing(trial), "channel_1": 16}


def test_a_second_sweep_starts_from_the_first_and_skips_what_no_longer_fits(images, tmp_path, ray_runtime):
    first = sweep_of(images, tmp_path, space=NARROWING, num_samples=5, scheduler="fifo", name="first")
    run_sweep(first)
    first_lrs = sorted(trial.params["lr"] for trial in optuna_trials(first))

    # Narrowed from the command line: the lowest lr falls outside the new range.
    narrowed = (parse_range(f"lr={first_lrs[1] * 0.999!r}:0.1:log"),)
    second = sweep_of(
        images, tmp_path, space=NARROWING, ranges=narrowed, num_samples=3, scheduler="fifo", name="second"
    )
    outcome = run_sweep(second)
    assert (outcome.warm_start, outcome.warm_start_skipped) == (4, 1)
    warm = [trial for trial in optuna_trials(second) if trial.user_attrs.get("warm_start_from") == "first"]
    assert sorted(trial.params["lr"] for trial in warm) == first_lrs[1:]
    assert all(trial.state == TrialState.COMPLETE for trial in warm)
    # Its own trials are new configs: neither the first point, which the first sweep scored,
    # nor the first sweep's random start-up points drawn again from the same seed.
    own = [trial.params["lr"] for trial in optuna_trials(second) if "warm_start_from" not in trial.user_attrs]
    assert len(own) == 3 and not set(own) & set(first_lrs)
    assert sweep_parent(second).data.params["warm_start_trials"] == "4"

    # Another name for the same space warms from both; the same name with another constant, from none.
    experiment = first.experiment_name
    again = sweep_of(
        images,
        tmp_path,
        space=f"{__file__}:renamed",
        experiment=experiment,
        num_samples=1,
        scheduler="fifo",
        name="again",
    )
    assert run_sweep(again).warm_start == 5 + 3
    other = sweep_of(
        images,
        tmp_path,
        space=f"{__file__}:wider_first_conv",
        experiment=experiment,
        num_samples=1,
        scheduler="fifo",
        name="wider",
    )
    assert run_sweep(other).warm_start == 0

    other_split = DataSettings(source=str(images), root=str(tmp_path / "cache"), val_size=60)
    elsewhere = small_sweep(
        images, tmp_path, data=other_split, space=NARROWING, num_samples=2, scheduler="fifo", name="other"
    )
    assert run_sweep(elsewhere).warm_start == 0  # another validation split: not comparable
    constant = sweep_of(
        images,
        tmp_path,
        space=NARROWING,
        num_samples=1,
        scheduler="fifo",
        recipe=AS_THE_ASSIGNMENT_TRAINED,
        name="c",
    )
    assert run_sweep(constant).warm_start == 0  # trained at another learning-rate schedule: neither
