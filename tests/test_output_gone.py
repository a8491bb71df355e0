"""Output that goes away is never fatal: a pipe whose reader leaves, a full log file, a terminal that
closes. The sweep's last words are kept where a user whose terminal died finds them."""

from __future__ import annotations

import os
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    reported_epochs,
    small_sweep,
    stop_process_group,
    sweep_args,
    sweep_parent,
    trial_runs,
    write_image_folder,
)
from mlflow.tracking import MlflowClient

from trainables.config import DataSettings
from trainables.names import LAST_WORDS_TXT

pytestmark = pytest.mark.slow

NUM_SAMPLES = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=100)


def sweep_of(images: Path, workdir: Path, epochs: int):
    data = DataSettings(source=str(images), root=str(workdir / "cache"), val_size=30)
    return small_sweep(images, workdir, data=data, num_samples=NUM_SAMPLES, epochs=epochs, scheduler="fifo")


def command(settings) -> list[str]:
    return [sys.executable, "-m", "search.run", *sweep_args(settings), "--max-concurrent", "2"]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def last_words(settings) -> tuple[str, str]:
    """What the sweep ended with, from beside its folder and from its parent run."""
    in_folder = settings.last_words_file.read_text()
    client = MlflowClient(settings.tracking_uri)
    on_parent = Path(
        client.download_artifacts(sweep_parent(settings).info.run_id, LAST_WORDS_TXT)
    ).read_text()
    return in_folder, on_parent


def assert_every_trial_finished(settings) -> None:
    assert sweep_parent(settings).info.status == "FINISHED"
    assert [child.info.status for child in trial_runs(settings)] == ["FINISHED"] * NUM_SAMPLES


@pytest.mark.parametrize(
    "redirect",
    # The reader leaves after two lines; a log file on a full disk; started with stdout closed.
    ["| head -2", "> /dev/full", ">&-"],
    ids=["pipe-closes", "log-file-full", "stdout-closed"],
)
def test_output_that_goes_away_leaves_the_sweep_to_finish_quietly_as_under_nohup(images, tmp_path, redirect):
    settings = sweep_of(images, tmp_path, epochs=3)
    stderr = tmp_path / "stderr.txt"
    # A real shell, as a user types it; the exit code kept is search.run's, not head's.
    line = (
        f"{shlex.join(command(settings))} 2> {shlex.quote(str(stderr))} {redirect}; exit ${{PIPESTATUS[0]}}"
    )
    process = subprocess.Popen(["bash", "-c", line], cwd=tmp_path, env=environment(), start_new_session=True)
    try:
        assert process.wait(timeout=300) == 0, stderr.read_text()[-2000:]
    finally:
        stop_process_group(process)
    assert "Traceback" not in stderr.read_text() and "BrokenPipeError" not in stderr.read_text()
    assert_every_trial_finished(settings)
    in_folder, on_parent = last_words(settings)
    assert in_folder == on_parent and f"Sweep test: {NUM_SAMPLES} finished" in in_folder
    assert "export:  python -m search.export" in in_folder


# Run in the child, in a session of its own (setsid): it takes the pseudo-terminal on its stdin as
# its controlling terminal, as a shell in a terminal window has, then becomes search.run.
TAKE_THE_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def test_a_terminal_that_closes_stops_the_sweep_with_129_and_its_resume_command_survives(images, tmp_path):
    settings = sweep_of(images, tmp_path, epochs=30)
    master, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", TAKE_THE_TERMINAL, *command(settings)],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=tmp_path,
        env=environment(),
        start_new_session=True,
    )
    os.close(terminal)
    try:
        deadline = time.monotonic() + 240
        while max(map(len, _reported(settings)), default=0) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "no trial trained 2 epochs"
            shown, _, _ = select.select([master], [], [], 0.5)
            if shown:  # read what the terminal shows, as a window does, so the sweep never blocks on it
                os.read(master, 65536)
        os.close(master)  # the window closes: the kernel hangs the session up, and writes fail (EIO)
        master = -1
        assert process.wait(timeout=90) == 129  # SIGHUP's, and not 1 from a traceback
    finally:
        if master >= 0:
            os.close(master)
        stop_process_group(process)
    assert sweep_parent(settings).info.status == "KILLED"
    assert "RUNNING" not in {child.info.status for child in trial_runs(settings)}
    in_folder, on_parent = last_words(settings)
    assert in_folder == on_parent
    *_, stopped, resume = in_folder.strip().splitlines()
    assert stopped == "Stopped by SIGHUP. Resume with:"
    assert "--name test" in resume and resume.endswith(" --resume")


def _reported(settings) -> list[list[float]]:
    """The epochs each trial has reported to MLflow so far."""
    try:
        return [reported_epochs(settings.tracking_uri, run) for run in trial_runs(settings)]
    except Exception:  # the store or the experiment is still being created, or busy
        return []
