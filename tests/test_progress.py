"""What `search.run` shows while it sweeps: one status line, Tune's tables with --verbose, or nothing."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_module, small_sweep, sweep_args

from search.sweep.progress import SweepStatus

TUNE_TABLE = "Trial status"  # the heading of Tune's own progress tables
TUNE_HEADER = "Configuration for experiment"


def test_the_status_line_counts_trials_and_shows_the_best_config_and_the_remaining_time():
    status = SweepStatus(
        done=3, running=2, pending=1, failed=1, diverged=1,
        best_accuracy=0.5712, best_trial="003 channel_1=49 lr=0.0069",
        elapsed_s=151, remaining_s=3725,
    )  # fmt: skip
    assert status.line() == (
        "[2m31s] trials: 3 done, 2 running, 1 pending, 1 failed, 1 diverged | ETA ~1h02m"
        " | best val_acc 0.5712 (003 channel_1=49 lr=0.0069)"
    )


def test_before_any_result_the_line_says_the_remaining_time_is_unknown():
    status = SweepStatus(0, 0, 4, 0, 0, None, "", elapsed_s=3, remaining_s=None)
    assert status.line() == "[3s] trials: 0 done, 0 running, 4 pending, 0 failed, 0 diverged | ETA ?"


def test_with_a_compute_budget_the_line_shows_how_much_of_it_is_spent():
    status = SweepStatus(4, 2, 19, 0, 0, None, "", 75, remaining_s=60, tflop=23.44, compute_budget=60)
    assert status.line().endswith("| ETA ~1m00s | 23.4 of 60 TFLOP")


def test_on_a_narrow_terminal_the_short_line_keeps_the_best_accuracy_in_view():
    status = SweepStatus(
        done=2, running=2, pending=0, failed=0, diverged=0,
        best_accuracy=0.4120, best_trial="001 channel_1=32 channel_2=16 effective_step=0.02 momentum=0.5",
        elapsed_s=62, remaining_s=41, tflop=3.2, compute_budget=60,
    )  # fmt: skip
    assert len(status.line()) > 80
    assert status.line(width=80) == "[1m02s] 2 done, 2 running | best 0.4120 (001) | ETA ~41s | 3.2/60 TFLOP"
    assert status.line(width=200) == status.line()  # a wide terminal gets the whole line
    cut = status.line(width=130)  # wide enough for all but the end of the best trial's config
    assert cut == status.line()[:129] and cut.endswith("best val_acc 0.4120 (001 channe")


def test_the_short_line_still_counts_every_kind_of_trial_there_is():
    status = SweepStatus(12, 2, 10, 1, 3, None, "", elapsed_s=3700, remaining_s=None)
    assert status.line(width=70) == "[1h01m] 12 done, 2 running, 10 pending, 1 failed, 3 diverged | ETA ?"


def two_trials(image_folder: Path, workdir: Path) -> list[str]:
    return sweep_args(small_sweep(image_folder, workdir))


def sweep_to_a_pipe(image_folder: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_module("search.run", *two_trials(image_folder, workdir), *extra, cwd=workdir, timeout=300)


@pytest.mark.slow
def test_into_a_pipe_it_prints_plain_status_lines_and_no_tune_tables(image_folder, tmp_path):
    result = sweep_to_a_pipe(image_folder, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    status_lines = [line for line in lines if "] trials: " in line]
    events = [line for line in status_lines if line[:4] in ("001 ", "002 ")]  # named as in MLflow
    assert len(events) == 2 and all(" finished at epoch 1: val_acc " in line for line in events)
    assert "trials: 2 done, 0 running, 0 pending, 0 failed, 0 diverged" in status_lines[-1]
    assert "best val_acc " in status_lines[-1] and "| ETA ~0s |" in status_lines[-1]  # the end: none left
    assert "\r" not in result.stdout and "\x1b[" not in result.stdout
    assert TUNE_TABLE not in result.stdout and TUNE_HEADER not in result.stdout


@pytest.mark.slow
def test_on_a_terminal_it_rewrites_one_line_in_place(image_folder, tmp_path):
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "search.run", *two_trials(image_folder, tmp_path)],
        cwd=tmp_path,
        env=env,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    assert text.count("\r\x1b[K[") >= 2  # the status line was redrawn in place
    assert "trials: 2 done" in text and TUNE_TABLE not in text


@pytest.mark.slow
def test_quiet_prints_only_the_final_summary(image_folder, tmp_path):
    result = sweep_to_a_pipe(image_folder, tmp_path, "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.lstrip().startswith("Sweep ") and "] trials: " not in result.stdout
    assert result.stderr == ""


@pytest.mark.slow
def test_verbose_brings_back_tunes_own_tables(image_folder, tmp_path):
    result = sweep_to_a_pipe(image_folder, tmp_path, "--verbose")
    assert result.returncode == 0, result.stderr
    assert TUNE_TABLE in result.stdout and "] trials: " not in result.stdout


def test_verbose_and_quiet_cannot_be_combined(tmp_path):
    result = run_module("search.run", "--space", "sgd", "--verbose", "--quiet", cwd=tmp_path)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
