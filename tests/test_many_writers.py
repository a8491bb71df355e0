"""Many short trials on one SQLite store: every metric recorded, no "database is locked"."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from search.sweep.engine import run_sweep
from search.sweep.settings import SweepSettings
from trainables.config import DataSettings
from trainables.names import REPORTED_METRICS

pytestmark = pytest.mark.slow

TRIALS, EPOCHS = 16, 2


def test_sixteen_short_trials_record_every_metric(image_folder, tmp_path, ray_runtime, capfd):
    settings = SweepSettings(
        space="sgd",
        data=DataSettings(
            source=str(image_folder), root=str(tmp_path / "cache"), val_size=9, max_train_images=30
        ),
        epochs=EPOCHS,
        num_samples=TRIALS,
        scheduler="fifo",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        storage_path=str(tmp_path / "ray"),
        name="crowd",
    )
    outcome = run_sweep(settings)
    assert outcome.trial_statuses == {"FINISHED": TRIALS}
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    children = client.search_runs([experiment.experiment_id], "tags.role = 'trial'", max_results=100)
    assert len(children) == TRIALS
    for child in children:
        for name in REPORTED_METRICS:
            steps = [point.step for point in client.get_metric_history(child.info.run_id, name)]
            assert steps == list(range(1, EPOCHS + 1)), (name, steps)
    output = capfd.readouterr()
    assert "database is locked" not in output.out + output.err
    assert not settings.journal.exists()  # nothing left waiting
