"""Sweeps that survive Ctrl-C and kill -9: nothing lost, nothing duplicated, in-flight trials continue."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, start_search_run, write_image_folder
from mlflow.tracking import MlflowClient

from trainables.names import IMPORTANCE_JSON, METRIC

pytestmark = pytest.mark.slow

NUM_SAMPLES = 3
EPOCHS = 12


@pytest.fixture(scope="module")
def slow_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images that an epoch takes a noticeable moment, so a signal lands mid-trial."""
    return write_image_folder(tmp_path_factory.mktemp("slow-images"), per_class=200)


def start_sweep(images: Path, workdir: Path, *extra: str) -> subprocess.Popen:
    args = ["--space", "nesterov", "--data", str(images), "--data-root", str(workdir / "cache")]
    args += ["--val-size", "30", "--num-samples", str(NUM_SAMPLES), "--epochs", str(EPOCHS)]
    args += [
        "--scheduler",
        "fifo",
        "--max-concurrent",
        "2",
        "--tracking-uri",
        f"sqlite:///{workdir}/mlflow.db",
    ]
    args += ["--storage-path", str(workdir / "ray"), "--name", "survivor", *extra]
    return start_search_run(args, cwd=workdir)


def runs(workdir: Path) -> list:
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("cifar10-nesterov")
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=100)


def wait_for_epochs(workdir: Path, epochs: int, timeout: float = 240) -> None:
    """Until some trial has logged this many epochs to MLflow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = [
                len(child_history(workdir, run))
                for run in runs(workdir)
                if run.data.tags.get("role") == "trial"
            ]
        except Exception:  # the store is being created
            done = []
        if done and max(done) >= epochs:
            return
        time.sleep(0.5)
    raise AssertionError(f"no trial logged {epochs} epochs in {timeout} s")


def child_history(workdir: Path, run) -> list[int]:
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    return [point.step for point in client.get_metric_history(run.info.run_id, METRIC)]


def assert_complete_sweep(workdir: Path, parent_id: str) -> None:
    all_runs = runs(workdir)
    parents = [run for run in all_runs if run.data.tags.get("role") == "sweep"]
    children = [run for run in all_runs if run.data.tags.get("role") == "trial"]
    assert [parent.info.run_id for parent in parents] == [parent_id]  # reused, not recreated
    assert parents[0].info.status == "FINISHED"
    assert len(children) == NUM_SAMPLES  # no duplicates
    assert len({child.data.tags["trial_id"] for child in children}) == NUM_SAMPLES
    for child in children:
        assert child.info.status == "FINISHED"
        steps = child_history(workdir, child)
        assert steps == list(range(1, EPOCHS + 1)), steps  # every epoch once: continued, not restarted
    # The parent's report was written again at the end of the resumed run, over every trial.
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    importance = client.download_artifacts(parent_id, IMPORTANCE_JSON, str(workdir / "report"))
    assert json.loads(Path(importance).read_text())["trials"] == NUM_SAMPLES


def resume_to_the_end(images: Path, workdir: Path) -> None:
    """`search.run ... --resume` with the same arguments, which must finish the sweep."""
    resumed = start_sweep(images, workdir, "--resume")
    try:
        _, stderr = resumed.communicate(timeout=600)
    finally:
        stop_process_group(resumed)
    assert resumed.returncode == 0, stderr[-2000:]


def stop_process_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)


def test_ctrl_c_stops_quickly_marks_runs_killed_and_a_resume_completes(slow_images, tmp_path):
    process = start_sweep(slow_images, tmp_path)
    try:
        wait_for_epochs(tmp_path, 2)
        process.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        assert time.monotonic() - interrupted_at < 30
    finally:
        stop_process_group(process)
    assert process.returncode == 130
    resume = stderr.strip().splitlines()[-1].strip()  # the last line says how to go on
    assert " -m search.run " in resume and resume.endswith("--name survivor --resume")
    parent = next(run for run in runs(tmp_path) if run.data.tags.get("role") == "sweep")
    assert parent.info.status == "KILLED"
    children = [run for run in runs(tmp_path) if run.data.tags.get("role") == "trial"]
    assert "RUNNING" not in {child.info.status for child in children}
    assert "KILLED" in {child.info.status for child in children}

    resumed = subprocess.run(
        [sys.executable, *shlex.split(resume)[1:]],  # the printed command, run by this interpreter
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_complete_sweep(tmp_path, parent.info.run_id)


def test_kill_9_then_resume_finishes_without_duplicates_or_restarts(slow_images, tmp_path):
    process = start_sweep(slow_images, tmp_path)
    try:
        wait_for_epochs(tmp_path, 3)
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started, without warning
        process.wait(timeout=30)
    finally:
        stop_process_group(process)
    parent = next(run for run in runs(tmp_path) if run.data.tags.get("role") == "sweep")
    epochs_before = [
        len(child_history(tmp_path, c)) for c in runs(tmp_path) if c.data.tags.get("role") == "trial"
    ]
    assert any(0 < done < EPOCHS for done in epochs_before)  # the kill came with a trial under way

    resume_to_the_end(slow_images, tmp_path)
    assert_complete_sweep(tmp_path, parent.info.run_id)
    resumed_at = [
        int(c.data.tags["resumed_at_epoch"]) for c in runs(tmp_path) if "resumed_at_epoch" in c.data.tags
    ]
    assert resumed_at and min(resumed_at) > 1  # in-flight trials continued from a checkpoint, not epoch 1


def test_a_second_ctrl_c_exits_at_once_and_a_resume_still_works(slow_images, tmp_path):
    process = start_sweep(slow_images, tmp_path)
    try:
        wait_for_epochs(tmp_path, 2)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)  # impatient: do not wait for the clean stop
        interrupted_at = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        assert time.monotonic() - interrupted_at < 10
    finally:
        stop_process_group(process)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1].strip().endswith("--name survivor --resume")
    parent = next(run for run in runs(tmp_path) if run.data.tags.get("role") == "sweep")

    resume_to_the_end(slow_images, tmp_path)
    assert_complete_sweep(tmp_path, parent.info.run_id)
