"""A real MLflow server that dies mid-sweep: training goes on, and every result lands once it is back."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
from conftest import MlflowServer, start_search_run, write_image_folder
from mlflow.tracking import MlflowClient

from trainables.names import METRIC

pytestmark = pytest.mark.slow

EPOCHS = 8


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    server = MlflowServer(folder)
    server.start()
    yield server
    server.kill()


def trial_histories(uri: str, experiment_name: str = "cifar10-nesterov") -> dict[str, list[int]]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return {}
    children = client.search_runs([experiment.experiment_id], "tags.role = 'trial'")
    return {
        child.info.run_id: [point.step for point in client.get_metric_history(child.info.run_id, METRIC)]
        for child in children
    }


def test_a_tracking_server_that_dies_mid_sweep_loses_nothing(server, tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=200)
    args = ["--space", "nesterov", "--data", str(images), "--data-root", str(tmp_path / "cache")]
    args += ["--val-size", "30", "--num-samples", "2", "--epochs", str(EPOCHS), "--scheduler", "fifo"]
    args += ["--tracking-uri", server.uri, "--storage-path", str(tmp_path / "ray"), "--name", "outage"]
    sweep = start_search_run(args, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not any(trial_histories(server.uri).values()):
            assert time.monotonic() < deadline, "no epoch reached MLflow"
            time.sleep(0.5)
        server.kill()
        time.sleep(10)  # trials keep training and reporting meanwhile
        assert sweep.poll() is None  # the sweep did not die with its tracking server
        server.start()
        _, stderr = sweep.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 0, stderr[-3000:]
    assert "writes wait in" in stderr and "is back" in stderr
    histories = trial_histories(server.uri)
    assert len(histories) == 2
    assert all(steps == list(range(1, EPOCHS + 1)) for steps in histories.values()), histories
    client = MlflowClient(server.uri)
    for run_id in histories:
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(run_id, "checkpoint")]


def test_writes_still_waiting_at_the_end_are_made_by_resume(server, tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=100)
    args = ["--space", "sgd", "--data", str(images), "--data-root", str(tmp_path / "cache")]
    args += ["--val-size", "30", "--num-samples", "2", "--epochs", "3", "--scheduler", "fifo"]
    args += ["--tracking-uri", server.uri, "--storage-path", str(tmp_path / "ray"), "--name", "late"]
    sweep = start_search_run(args, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not any(trial_histories(server.uri, "cifar10-sgd").values()):
            assert time.monotonic() < deadline, "no epoch reached MLflow"
            time.sleep(0.2)
        server.kill()  # and it stays down until the sweep is over
        _, stderr = sweep.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 3, stderr[-3000:]
    journal = tmp_path / "ray" / "late.mlflow-pending.json"
    assert journal.exists()
    resume = stderr.strip().splitlines()[-1].strip()
    assert resume.endswith("--name late --resume")

    server.start()
    resumed = start_search_run([*args, "--resume"], cwd=tmp_path)
    try:
        _, stderr = resumed.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(resumed.pid, signal.SIGKILL)
    assert resumed.returncode == 0, stderr[-3000:]
    assert not journal.exists()
    histories = trial_histories(server.uri, "cifar10-sgd")
    assert len(histories) == 2 and all(steps == [1, 2, 3] for steps in histories.values()), histories
