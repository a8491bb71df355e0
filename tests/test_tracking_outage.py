"""A real MLflow server that dies mid-sweep: training goes on, nothing Tune reported is lost, even
when the sweep is killed during the outage, and every result lands once the server is back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import (
    MlflowServer,
    assert_ended_trials_keep_their_best_and_latest_checkpoints_only,
    reported_epochs,
    run_module,
    small_sweep,
    start_search_run,
    stop_process_group,
    sweep_args,
    sweep_parent,
    trial_runs,
    write_image_folder,
)
from mlflow.tracking import MlflowClient

from search.sweep.settings import SweepSettings
from trainables.config import DataSettings
from trainables.names import (
    BEST_METRIC,
    CHECKPOINT_ARTIFACT,
    CHECKPOINT_FILE,
    METRIC,
    SPEC_FILE,
    SWEEP_SETTINGS_ARTIFACT,
    WAITING_UPLOADS_TAG,
)

pytestmark = pytest.mark.slow

EPOCHS = 8


def outage_sweep(tmp_path: Path, server: MlflowServer, name: str, epochs: int = EPOCHS) -> SweepSettings:
    images = write_image_folder(tmp_path / "images", per_class=200)
    data = DataSettings(source=str(images), root=str(tmp_path / "cache"), val_size=30)
    return small_sweep(
        images, tmp_path, data=data, epochs=epochs, scheduler="fifo", tracking_uri=server.uri, name=name
    )


def wait_for_a_logged_epoch(settings: SweepSettings, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(reported_epochs(settings.tracking_uri, run) for run in _runs_or_none(settings)):
        assert time.monotonic() < deadline, "no epoch reached MLflow"
        time.sleep(0.2)


def _runs_or_none(settings: SweepSettings) -> list:
    try:
        return trial_runs(settings)
    except Exception:  # the experiment is not there yet
        return []


def run_to_the_end(settings: SweepSettings, *extra: str) -> str:
    process = start_search_run([*sweep_args(settings), *extra], cwd=Path(settings.storage_path).parent)
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        stop_process_group(process)
    assert process.returncode == 0, stderr[-3000:]
    # No library lines at the user: Ray's "Restored on ... from checkpoint", MLflow's "View run".
    assert "Restored on" not in stdout + stderr and "View run" not in stdout + stderr
    return stderr


def tunes_best(settings: SweepSettings) -> float:
    """The best validation accuracy in Tune's own records (result.json), the source of truth."""
    results = [
        json.loads(line)
        for path in Path(settings.sweep_location).glob("*/result.json")
        for line in path.read_text().splitlines()
    ]
    return max(result[METRIC] for result in results)


def assert_every_epoch_once_and_the_true_best(settings: SweepSettings) -> None:
    children = trial_runs(settings)
    assert len(children) == settings.num_samples
    client = MlflowClient(settings.tracking_uri)
    for child in children:
        assert reported_epochs(settings.tracking_uri, child) == list(range(1, settings.epochs + 1))
        assert child.info.status == "FINISHED"
        files = {artifact.path for artifact in client.list_artifacts(child.info.run_id, CHECKPOINT_ARTIFACT)}
        assert files == {f"{CHECKPOINT_ARTIFACT}/{CHECKPOINT_FILE}", f"{CHECKPOINT_ARTIFACT}/{SPEC_FILE}"}
    parent = sweep_parent(settings)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[BEST_METRIC] == pytest.approx(tunes_best(settings))
    # The others went once each trial ended, while MLflow was down too: the best stayed for it.
    assert_ended_trials_keep_their_best_and_latest_checkpoints_only(settings)


def test_a_tracking_server_that_dies_mid_sweep_loses_nothing(server, tmp_path):
    settings = outage_sweep(tmp_path, server, "outage")
    sweep = start_search_run(sweep_args(settings), cwd=tmp_path)
    try:
        wait_for_a_logged_epoch(settings)
        server.kill()
        time.sleep(10)  # trials keep training and reporting meanwhile
        assert sweep.poll() is None  # the sweep did not die with its tracking server
        server.start()
        _, stderr = sweep.communicate(timeout=600)
    finally:
        stop_process_group(sweep)
    assert sweep.returncode == 0, stderr[-3000:]
    assert "writes wait in" in stderr and "is back" in stderr
    assert_every_epoch_once_and_the_true_best(settings)


def test_writes_still_waiting_at_the_end_are_made_by_resume(server, tmp_path):
    settings = outage_sweep(tmp_path, server, "late", epochs=3)
    # Nothing will bring the server back: wait for it a moment (the default is 30 s), not long.
    sweep = start_search_run([*sweep_args(settings), "--tracking-grace", "3s"], cwd=tmp_path)
    try:
        wait_for_a_logged_epoch(settings)
        server.kill()  # and it stays down until the sweep is over
        _, stderr = sweep.communicate(timeout=600)
    finally:
        stop_process_group(sweep)
    assert sweep.returncode == 3, stderr[-3000:]
    assert settings.journal.exists()
    resume = stderr.strip().splitlines()[-1].strip()
    assert "--name late" in resume and resume.endswith(" --resume")

    server.start()
    run_to_the_end(settings, "--resume")
    assert not settings.journal.exists()
    assert_every_epoch_once_and_the_true_best(settings)


def test_an_artifact_store_that_fails_holds_back_only_the_uploads(server, tmp_path):
    """The server's tracking store works and its artifact store cannot write: a new sweep is refused,
    its parent closed; mid-sweep, metrics, params and run ends land at once while the uploads wait
    in the journal, and a resume uploads them once the store is mended."""
    artifacts = server.folder / "artifacts"  # where the server keeps artifacts: a file there breaks it
    artifacts.mkdir(exist_ok=True)
    mended = server.folder / "artifacts-mended"

    def break_store() -> None:
        artifacts.rename(mended)
        artifacts.write_text("")  # every upload meets NotADirectoryError on the server

    break_store()
    settings = outage_sweep(tmp_path, server, "refused", epochs=3)
    result = run_module("search.run", *sweep_args(settings), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "failed before the sweep began" in result.stderr
    # What the server answered, not the retries' "HTTPConnectionPool(...): Max retries exceeded".
    assert "the server answered 500 Internal Server Error" in result.stderr
    assert sweep_parent(settings).info.status == "FAILED"  # exit 2 closes what it wrote

    artifacts.unlink()
    mended.rename(artifacts)
    settings = outage_sweep(tmp_path, server, "uploads", epochs=3)
    sweep = start_search_run([*sweep_args(settings), "--tracking-grace", "3s"], cwd=tmp_path)
    try:
        wait_for_the_parent_run(settings)  # its sweep.json uploaded; Ray and the trials start next
        break_store()
        _, stderr = sweep.communicate(timeout=600)
    finally:
        stop_process_group(sweep)
    assert sweep.returncode == 3, stderr[-3000:]
    assert "artifact store failed to take an upload (the server answered 500 Internal Server Error" in stderr
    assert "HTTPConnectionPool" not in stderr
    client = MlflowClient(settings.tracking_uri)
    for child in trial_runs(settings):  # everything but the uploads landed while they failed
        assert child.info.status == "FINISHED"
        assert reported_epochs(settings.tracking_uri, child) == [1, 2, 3]
        assert BEST_METRIC not in child.data.metrics  # logged with its checkpoint, never without
        assert client.list_artifacts(child.info.run_id, CHECKPOINT_ARTIFACT) == []
    parent = sweep_parent(settings)
    assert parent.info.status == "FAILED"  # not left RUNNING: it says what waits
    assert "wait in" in parent.data.tags[WAITING_UPLOADS_TAG]
    waiting = {entry["kind"] for entry in json.loads(settings.journal.read_text())}
    assert waiting == {"LogCheckpoint", "FinishSweep"}

    artifacts.unlink()
    mended.rename(artifacts)
    run_to_the_end(settings, "--resume")
    assert not settings.journal.exists()
    assert_every_epoch_once_and_the_true_best(settings)
    assert WAITING_UPLOADS_TAG not in sweep_parent(settings).data.tags


def wait_for_the_parent_run(settings: SweepSettings, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # the experiment or the run is not there yet
            parent = sweep_parent(settings)
            if any(
                item.path == SWEEP_SETTINGS_ARTIFACT
                for item in MlflowClient(settings.tracking_uri).list_artifacts(parent.info.run_id)
            ):
                return
        assert time.monotonic() < deadline, "the sweep's parent run did not appear"
        time.sleep(0.1)


@pytest.mark.parametrize("journal", ["intact", "half-written"])
def test_a_kill_9_during_an_outage_loses_nothing_that_tune_reported(server, tmp_path, journal):
    settings = outage_sweep(tmp_path, server, "blackout", epochs=4)
    sweep = start_search_run(sweep_args(settings), cwd=tmp_path)
    try:
        wait_for_a_logged_epoch(settings)
        server.kill()
        deadline = time.monotonic() + 240  # until a trial ends with the server down
        while not any(line.count('"epoch": 4') for line in _tune_results(settings)):
            assert time.monotonic() < deadline, "no trial finished during the outage"
            time.sleep(0.5)
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=30)
    finally:
        stop_process_group(sweep)
    assert settings.journal.exists()  # what MLflow did not take is on disk
    if journal == "half-written":  # as a crash in the middle of an in-place rewrite would leave it
        text = settings.journal.read_text()
        Path(str(settings.journal)).write_text(text[: len(text) // 2])

    server.start()
    stderr = run_to_the_end(settings, "--resume")
    if journal == "half-written":
        assert "is unreadable" in stderr and list(
            tmp_path.glob("ray/blackout.mlflow-pending.json.unreadable-*")
        )
    assert_every_epoch_once_and_the_true_best(settings)


def _tune_results(settings: SweepSettings) -> list[str]:
    return [path.read_text() for path in Path(settings.sweep_location).glob("*/result.json")]


def test_a_server_that_needs_a_login_is_refused_in_one_line_and_works_with_one(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    server = MlflowServer(folder, login=("admin", "a-long-enough-password"))
    server.start()
    try:
        settings = small_sweep(
            write_image_folder(tmp_path / "images", per_class=10), tmp_path, tracking_uri=server.uri
        )
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_TRACKING_")}
        started = time.monotonic()
        refused = run_module("search.run", *sweep_args(settings), cwd=tmp_path, env=env)
        assert time.monotonic() - started < 30
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines() == [
            f"search.run: error: MLflow at {server.uri} refused the login (HTTP 401): "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        ]
        assert not Path(settings.storage_path).exists()  # nothing ran, nothing to resume

        login = {
            **env,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": "a-long-enough-password",
        }
        accepted = run_module("search.run", *sweep_args(settings), cwd=tmp_path, env=login, timeout=300)
        assert accepted.returncode == 0, accepted.stderr[-3000:]
        with pytest.MonkeyPatch.context() as patch:
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                patch.setenv(name, login[name])
            assert len(trial_runs(settings)) == settings.num_samples
    finally:
        server.kill()
