"""Bad input: one line on stderr, exit code 2 (as the README says), no traceback, and nothing written."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import time

import pytest
from conftest import free_port, run_module
from mlflow.tracking import MlflowClient

from search.cli import EXIT_BAD_INPUT


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--space", "adam"], "unknown space 'adam'; known spaces: barebones, nesterov, sgd"),
        (["--space", "nesterov", "--data", "no/such/folder"], "data folder not found: no/such/folder"),
        (["--space", "nesterov", "--epochs", "0"], "argument --epochs: 0 must be >= 1"),
        (
            ["--space", "nesterov", "--num-samples", "many"],
            "argument --num-samples: 'many' is not a whole number",
        ),
        (["--space", "nesterov", "--gpus-per-trial", "-0.5"], "argument --gpus-per-trial: -0.5 must be >= 0"),
        (["--space", "nesterov", "--cpus-per-trial", "0"], "argument --cpus-per-trial: 0 must be > 0"),
        (["--space", "nesterov", "--cpus-per-trial", "nan"], "argument --cpus-per-trial: nan must be > 0"),
        (["--space", "nesterov", "--val-size", "1.5"], "argument --val-size: '1.5' is not a whole number"),
        (["--space", "nesterov", "--max-failures", "-1"], "argument --max-failures: -1 must be >= 0"),
        (["--space", "nesterov", "--schedule", "cosine"], "argument --schedule: invalid choice: 'cosine'"),
        (["--space", "nesterov", "--max-concurrent", "0"], "argument --max-concurrent: 0 must be >= 1"),
        (["--space", "nesterov", "--max-train-images", "0"], "argument --max-train-images: 0 must be >= 1"),
        (["--space", "nesterov", "--seed", "-3"], "argument --seed: -3 must be >= 0"),
        (["--space", "nesterov", "--seed", "x"], "argument --seed: 'x' is not a whole number"),
        (
            ["--space", "nesterov", "--compute-budget", "0"],
            "argument --compute-budget: 0 must be more than 0",
        ),
        (
            ["--space", "nesterov", "--compute-budget", "lots"],
            "argument --compute-budget: 'lots' is not a number of TFLOP, or none",
        ),
        (["--space", "nesterov", "--gpus-per-trial", "inf"], "argument --gpus-per-trial: inf must be >= 0"),
        (["--space", "nesterov", "--scheduler", "pbt"], "argument --scheduler: invalid choice: 'pbt'"),
        (["--space", "nesterov", "--tracking-uri", "ftp://host/x"], "unknown tracking URI scheme 'ftp'"),
        (["--space", "nesterov", "--resume"], "--resume needs the --name of the sweep to resume"),
        (["--space", "nesterov", "--address", "headnode"], "--address must be HOST:PORT, got 'headnode'"),
        (
            ["--space", "nesterov", "--storage-path", "nosuch://x/y"],
            "--storage-path nosuch://x/y cannot be opened",
        ),
        (
            ["--space", "nesterov", "--resume", "--name", "ghost", "--storage-path", "."],
            "no sweep named ghost",
        ),
        ([], "the following arguments are required: --space"),
        (["--space", "sgd", "--name", "../elsewhere"], "--name must be a plain name (no '/', not starting"),
        (["--space", "sgd", "--name", "a/b"], "--name must be a plain name"),
        (["--space", "sgd", "--experiment", ""], "--experiment must not be empty"),
        (
            ["--space", "sgd", "--tracking-uri", "sqlite:///no/such/dir/m.db"],
            "cannot create MLflow store sqlite:///no/such/dir/m.db: folder",
        ),
    ],
)
def test_search_run_refuses(args, message, tmp_path):
    result = run_module("search.run", *args, cwd=tmp_path)
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no results folder, no cache


def test_an_unreachable_tracking_server_fails_within_ten_seconds_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # a port that nothing listens on
    started = time.monotonic()
    result = run_module("search.run", "--space", "sgd", "--tracking-uri", uri, cwd=tmp_path)
    assert_one_line_error(result, f"MLflow tracking server {uri} is unreachable")
    # the interpreter's imports take a few seconds of that; the check itself, under one
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []


def test_an_address_where_no_ray_cluster_listens_fails_fast_naming_it(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_module("search.run", "--space", "sgd", "--address", address, cwd=tmp_path)
    assert_one_line_error(result, f"no Ray cluster answers at {address} (ConnectionRefusedError)")
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []


def test_a_blackholed_tracking_server_times_out_within_ten_seconds(tmp_path):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        result = run_module("search.run", "--space", "sgd", "--tracking-uri", uri, cwd=tmp_path)
        elapsed = time.monotonic() - started
    assert_one_line_error(result, f"MLflow tracking server {uri} is unreachable (ReadTimeout)")
    assert elapsed < 10  # a 3 s timeout, plus the interpreter's start
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "no train/ folder in"),
        ({"train/cat": 0}, "no images in"),
        ({"train/cat": 3}, "holds images of one class only"),
    ],
)
def test_an_unusable_image_folder_is_refused(layout, message, tmp_path):
    from conftest import write_image_folder

    folder = tmp_path / "images"
    folder.mkdir()
    for path, count in layout.items():
        (folder / path).mkdir(parents=True)
        source = write_image_folder(tmp_path / "source", per_class=max(count, 1))
        for image in sorted((source / "train" / "red").iterdir())[:count]:
            image.rename(folder / path / image.name)
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = run_module("search.run", "--space", "sgd", "--data", str(folder), cwd=workdir)
    assert_one_line_error(result, message)
    assert list(workdir.iterdir()) == []


def test_an_image_folder_with_a_broken_image_names_the_file(tmp_path):
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "images", per_class=3)
    broken = folder / "train" / "red" / "0002.png"
    broken.write_bytes(b"\x89PNG truncated")
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = run_module("search.run", "--space", "sgd", "--data", str(folder), cwd=workdir)
    assert_one_line_error(result, f"cannot read image {broken}")
    assert list(workdir.iterdir()) == []


VALID_BEST = {
    "schema_version": 1,
    "space": "nesterov",
    "sweep": "s",
    "experiment": "e",
    "model": {
        "model": "sequential",
        "channel_1": 32,
        "channel_2": 16,
        "kernel_1": 5,
        "kernel_2": 3,
        "input_shape": [3, 32, 32],
        "classes": ["a", "b"],
    },
    "optimizer": {"optimizer": "nesterov", "lr": 0.01, "weight_decay": 0.0001, "momentum": 0.5},
    "training": {"batch_size": 64, "epochs": 1, "seed": 0},
    "data": {
        "source": "no/such/folder",
        "root": "data",
        "val_size": 10,
        "max_train_images": None,
        "seed": 0,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
    },
    "val_acc": 0.5,
    "mlflow": {
        "tracking_uri": "sqlite:///x.db",
        "run_id": "r",
        "parent_run_id": "p",
        "checkpoint_uri": "runs:/r/c",
    },
}


def without(values: dict, *path: str) -> dict:
    copy = json.loads(json.dumps(values))
    target = copy
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return copy


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps(VALID_BEST)[:200], "is not valid JSON"),
        (json.dumps({**VALID_BEST, "schema_version": 3}), "schema_version 3 is not supported"),
        (json.dumps(without(VALID_BEST, "optimizer", "lr")), "missing key 'lr'"),
        (json.dumps(without(VALID_BEST, "training")), "missing key 'training'"),
        (json.dumps({**VALID_BEST, "optimizer": {**VALID_BEST["optimizer"], "lr": -1}}), "lr must be > 0"),
        ("[1, 2]", "does not hold a JSON object"),
        (json.dumps(VALID_BEST), "data folder not found: no/such/folder"),
    ],
)
def test_search_retrain_refuses_a_bad_best_json(content, message, tmp_path):
    best = tmp_path / "best.json"
    best.write_text(content)
    result = run_module("search.retrain", str(best), cwd=tmp_path)
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == [best]


def test_search_retrain_refuses_a_missing_file(tmp_path):
    assert_one_line_error(
        run_module("search.retrain", "nothing.json", cwd=tmp_path), "nothing.json not found"
    )


def test_search_export_refuses_a_missing_store_without_creating_one(tmp_path):
    store = f"sqlite:///{tmp_path}/m.db"
    result = run_module(
        "search.export", "--experiment", "ghost", "--tracking-uri", store, "--out", "b.json", cwd=tmp_path
    )
    assert_one_line_error(result, f"no MLflow store at {tmp_path}/m.db")
    assert list(tmp_path.iterdir()) == []


def test_search_export_refuses_an_unknown_experiment_naming_the_known_ones(tmp_path):
    store = f"sqlite:///{tmp_path}/m.db"
    MlflowClient(store).create_experiment("cifar10-sgd")
    result = run_module(
        "search.export", "--experiment", "ghost", "--tracking-uri", store, "--out", "b.json", cwd=tmp_path
    )
    assert_one_line_error(result, f"no experiment 'ghost' in {store} (known: cifar10-sgd, Default)")
    assert not (tmp_path / "b.json").exists()


def test_a_sweep_recorded_before_schedules_resumes_only_at_the_constant_rate_it_trained_at(tmp_path):
    from search.sweep.settings import SweepSettings, recipe_flags
    from trainables.errors import InputError
    from trainables.recipe import AS_THE_ASSIGNMENT_TRAINED

    old = SweepSettings(space="nesterov", storage_path=str(tmp_path), name="old", resume=True)
    newer = {*recipe_flags(old.recipe), "--top-rung"}  # what sweeps recorded since
    before_schedules = {flag: value for flag, value in old.identity().items() if flag not in newer}
    old.identity_file.write_text_atomically(json.dumps(before_schedules))
    with pytest.raises(InputError, match="its --schedule was 'constant', now 'onecycle'"):
        old.check_resumes_the_same_sweep()
    SweepSettings(**{**vars(old), "recipe": AS_THE_ASSIGNMENT_TRAINED}).check_resumes_the_same_sweep()


def test_a_resume_with_another_recipe_is_refused_naming_the_part_that_changed(tmp_path):
    from search.sweep.settings import SweepSettings
    from trainables.errors import InputError
    from trainables.recipe import LONG

    first = SweepSettings(space="nesterov", storage_path=str(tmp_path), name="long", recipe=LONG, epochs=3)
    first.identity_file.write_text_atomically(json.dumps(first.identity()))
    again = SweepSettings(**{**vars(first), "resume": True})
    again.check_resumes_the_same_sweep()  # the same recipe: allowed
    smoothed = SweepSettings(**{**vars(again), "recipe": dataclasses.replace(LONG, label_smoothing=0.2)})
    with pytest.raises(InputError, match=r"its --label-smoothing was 0\.1, now 0\.2"):
        smoothed.check_resumes_the_same_sweep()
    with pytest.raises(InputError, match="its --top-rung was 'asha', now 'best'"):
        SweepSettings(**{**vars(again), "top_rung": "best"}).check_resumes_the_same_sweep()


def test_a_storage_path_that_cannot_be_a_folder_is_refused_before_mlflow_hears_of_it(tmp_path):
    in_the_way = tmp_path / "results"
    in_the_way.write_text("a file, not a folder")
    result = run_module("search.run", "--space", "sgd", "--storage-path", str(in_the_way), cwd=tmp_path)
    assert_one_line_error(result, f"--storage-path {in_the_way} cannot be made a folder (File exists")
    assert list(tmp_path.iterdir()) == [in_the_way]  # no MLflow store, so no run left RUNNING


@pytest.mark.parametrize("resource", ["--cpus-per-trial", "--gpus-per-trial"])
def test_a_trial_bigger_than_the_local_ray_is_refused_not_left_waiting(resource, image_folder, tmp_path):
    """The local Ray has all it will ever have: Tune would wait forever for the resources."""
    args = ["--space", "sgd", "--data", str(image_folder), "--val-size", "10", resource, "1000"]
    result = run_module("search.run", *args, "--storage-path", str(tmp_path / "results"), cwd=tmp_path)
    name = "CPUs" if resource == "--cpus-per-trial" else "GPUs"
    assert_one_line_error(result, f"{resource} 1000 asks for more than the")
    assert f"{name} of Ray here: no trial could start" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["search.export", "--experiment", "cifar10-sgd", "--out", "no/such/folder/best.json"],
        [
            "search.export",
            "--experiment",
            "cifar10-sgd",
            "--out",
            "b.json",
            "--trials",
            "no/such/folder/t.pq",
        ],
        ["search.retrain", "best.json", "--out", "no/such/folder/metrics.json"],
    ],
)
def test_an_output_file_in_a_folder_that_does_not_exist_is_refused_before_any_work(command, tmp_path):
    """A retrain would otherwise train for hours and fail writing its last file."""
    result = run_module(*command, cwd=tmp_path)
    assert_one_line_error(result, "folder no/such/folder does not exist")
    assert list(tmp_path.iterdir()) == []
