"""One name, one sweep in an experiment: a second sweep under a taken name is refused, whatever its
--storage-path, and a parent run left RUNNING by a sweep that never began is closed, not adopted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_module, small_sweep, sweep_args, trial_runs
from mlflow.tracking import MlflowClient

from search import run
from search.tracking.store import get_or_create_experiment
from trainables.names import ORPHAN_TAG, ROLE_TAG, SPACE_TAG, SWEEP_ROLE, SWEEP_TAG

pytestmark = pytest.mark.slow


def parents(settings) -> list:
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    query = f"tags.{ROLE_TAG} = '{SWEEP_ROLE}' and tags.{SWEEP_TAG} = '{settings.sweep_name}'"
    return client.search_runs([experiment.experiment_id], query)


def test_a_taken_name_is_refused_in_one_line_whatever_the_storage_path(image_folder, tmp_path, ray_runtime):
    first = small_sweep(image_folder, tmp_path, name="c1", storage_path=str(tmp_path / "ray-1"))
    assert run.main(sweep_args(first)) == 0
    (parent,) = parents(first)
    children = {child.info.run_id for child in trial_runs(first)}

    elsewhere = small_sweep(image_folder, tmp_path, name="c1", storage_path=str(tmp_path / "ray-2"))

    def refused() -> None:
        result = run_module("search.run", *sweep_args(elsewhere), cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (
            f"search.run: error: the name c1 is taken in experiment 'cifar10-nesterov' by a FINISHED sweep, "
            f"parent run {parent.info.run_id}: continue it with --resume --storage-path {first.storage}, "
            "or give another --name"
        )

    refused()  # with another storage path
    shutil.rmtree(first.sweep_location)  # the README allows it once nothing will resume the sweep
    refused()  # with the first sweep's folder gone
    again = run_module("search.run", *sweep_args(first), cwd=tmp_path)  # its own storage: nothing to resume
    assert again.returncode == 2 and again.stderr.strip() == (
        f"search.run: error: the name c1 is taken in experiment 'cifar10-nesterov' by a FINISHED sweep, "
        f"parent run {parent.info.run_id}, whose Tune state in {first.sweep_location} is gone: give another "
        "--name"
    )
    assert [run.info.run_id for run in parents(first)] == [parent.info.run_id]  # nothing was written
    assert {child.info.run_id for child in trial_runs(first)} == children
    assert not Path(elsewhere.sweep_location).exists()


def test_a_parent_left_running_by_a_sweep_that_never_began_is_closed_failed_not_adopted(
    image_folder, tmp_path, ray_runtime, capsys
):
    settings = small_sweep(image_folder, tmp_path, name="c8")
    # What a tracking server that died as the sweep began leaves: a parent run, RUNNING, no params.
    client = MlflowClient(settings.tracking_uri)
    experiment_id = get_or_create_experiment(client, settings.experiment_name)
    tags = {ROLE_TAG: SWEEP_ROLE, SWEEP_TAG: "c8", SPACE_TAG: "nesterov"}
    orphan = client.create_run(experiment_id, run_name="c8", tags=tags).info.run_id

    assert run.main(sweep_args(settings)) == 0
    closed = client.get_run(orphan)
    assert closed.info.status == "FAILED" and "before Tune saved any state" in closed.data.tags[ORPHAN_TAG]
    assert f"Closed run {orphan} FAILED" in capsys.readouterr().out
    new = [parent for parent in parents(settings) if parent.info.run_id != orphan]
    assert [parent.info.status for parent in new] == ["FINISHED"]
    children = trial_runs(settings)
    assert len(children) == settings.num_samples
    assert {child.data.tags["mlflow.parentRunId"] for child in children} == {new[0].info.run_id}
