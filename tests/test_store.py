"""The MLflow store as sweeps meet it: created by two at once, and named in commands a user pastes."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

from conftest import REPO
from mlflow.tracking import MlflowClient

from search import run
from search.sweep.engine import SweepOutcome

CREATE_AT_ONCE = """
import sys, time
from search.tracking.store import open_store
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start at the same moment
open_store(sys.argv[1]).create_experiment(sys.argv[3])
"""


def test_sweeps_creating_one_new_sqlite_store_at_the_same_moment_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path}/new store/mlflow.db"
    (tmp_path / "new store").mkdir()
    start = time.time() + 3  # after every interpreter has loaded MLflow
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE_AT_ONCE, uri, str(start), f"sweep-{index}"],
            env={"PYTHONPATH": str(REPO)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(4)
    ]
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, errors
    names = {experiment.name for experiment in MlflowClient(uri).search_experiments()}
    assert {f"sweep-{index}" for index in range(4)} <= names


def test_the_printed_commands_survive_a_paste_with_spaces_in_their_paths(capsys):
    store = "sqlite:////tmp/my sweeps/mlflow.db"
    outcome = SweepOutcome(
        sweep="first try", experiment="cifar10 nesterov", tracking_uri=store, parent_run_id="p",
        best_run_id="b", best_accuracy=0.5, val_size=1000, best_config={"lr": 0.01},
        trial_statuses={"FINISHED": 1}, interrupted=False, failures={}, diverged=0, trained_tflop=1.5,
        compute_budget=60.0,
    )  # fmt: skip
    run.print_summary(outcome)
    printed = [line.split(":", 1) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    lines = {name.strip(): command for name, command in printed}
    assert shlex.split(lines["browse"]) == ["mlflow", "ui", "--backend-store-uri", store]
    export = shlex.split(lines["export"])
    assert export[export.index("--experiment") + 1] == "cifar10 nesterov"
    assert (
        export[export.index("--tracking-uri") + 1] == store
        and export[export.index("--sweep") + 1] == "first try"
    )
    resume = shlex.split(
        run.resume_command(["--space", "nesterov", "--data", "/data/my images"], "first try")
    )
    assert resume[resume.index("--data") + 1] == "/data/my images" and resume[-3:] == [
        "--name",
        "first try",
        "--resume",
    ]


def test_a_sweep_tracked_on_a_server_is_browsed_at_its_page_there(capsys):
    outcome = SweepOutcome(
        sweep="s", experiment="e", tracking_uri="http://10.0.0.5:5000/", parent_run_id="p1",
        best_run_id=None, best_accuracy=None, val_size=1000, best_config={}, trial_statuses={},
        interrupted=False, failures={}, diverged=0, trained_tflop=0.0, compute_budget=60.0,
        experiment_id="7",
    )  # fmt: skip
    run.print_summary(outcome)
    (browse,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  browse:")]
    assert browse == "  browse:  http://10.0.0.5:5000/#/experiments/7/runs/p1"
