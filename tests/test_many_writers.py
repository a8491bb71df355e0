"""Many short trials on one SQLite store: every metric recorded, no "database is locked"."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import reported_epochs, small_sweep, trial_runs

from search.sweep.engine import run_sweep
from trainables.names import REPORTED_METRICS

pytestmark = pytest.mark.slow

TRIALS, EPOCHS = 16, 2


def test_sixteen_short_trials_record_every_metric(image_folder, tmp_path, ray_runtime, capfd):
    settings = small_sweep(image_folder, tmp_path, space="sgd", epochs=EPOCHS, num_samples=TRIALS)
    settings = replace(settings, scheduler="fifo", data=replace(settings.data, max_train_images=30))
    outcome = run_sweep(settings)
    assert outcome.trial_statuses == {"FINISHED": TRIALS}
    children = trial_runs(settings)
    assert len(children) == TRIALS
    for child in children:
        for name in REPORTED_METRICS:
            assert reported_epochs(settings.tracking_uri, child, name) == list(range(1, EPOCHS + 1)), name
    output = capfd.readouterr()
    assert "database is locked" not in output.out + output.err
    assert not settings.journal.exists()  # nothing left waiting
