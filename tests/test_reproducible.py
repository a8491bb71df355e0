"""The same seed, space and data give the same configs and, on CPU, the same first reports."""

from __future__ import annotations

import pytest
from conftest import optuna_trials, small_sweep, trial_runs
from mlflow.tracking import MlflowClient

from search.sweep.engine import run_sweep
from trainables.names import METRIC, TRAIN_LOSS, VAL_LOSS

pytestmark = pytest.mark.slow


def sweep_record(image_folder, workdir, seed: int) -> tuple[list[dict], list[tuple]]:
    """The configs Optuna proposed, in order, and each trial's config with its first report's metrics."""
    workdir.mkdir()
    # Six trials: past TPE's random warm-up, so the model-based proposals are compared too.
    settings = small_sweep(image_folder, workdir, epochs=2, num_samples=6, seed=seed, name="repro")
    run_sweep(settings)
    proposals = [trial.params for trial in optuna_trials(settings)]  # Optuna's own order
    client = MlflowClient(settings.tracking_uri)
    trials = []
    for child in trial_runs(settings):
        first_report = {
            name: min(client.get_metric_history(child.info.run_id, name), key=lambda point: point.step).value
            for name in (METRIC, VAL_LOSS, TRAIN_LOSS)
        }
        trials.append((sorted(child.data.params.items()), first_report))
    # Parallel trials start and end in any order: compare them as a set, by config.
    return proposals, sorted(trials, key=lambda trial: trial[0])


def test_the_same_seed_gives_the_same_configs_and_first_reports(image_folder, tmp_path, ray_runtime):
    first_proposals, first_trials = sweep_record(image_folder, tmp_path / "a", seed=5)
    second_proposals, second_trials = sweep_record(image_folder, tmp_path / "b", seed=5)
    assert len(first_proposals) == 6 and first_proposals == second_proposals
    assert len(first_trials) == 6 and first_trials == second_trials


def test_another_seed_gives_other_configs(image_folder, tmp_path, ray_runtime):
    first_proposals, _ = sweep_record(image_folder, tmp_path / "a", seed=5)
    other_proposals, _ = sweep_record(image_folder, tmp_path / "c", seed=6)
    assert first_proposals[0] == other_proposals[0]  # the assignment's point, whatever the seed
    assert first_proposals[1:] != other_proposals[1:]
