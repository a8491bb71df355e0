"""A sweep is its images too: a resume on changed images is refused, saying what changed, and a warm
start takes only trials that trained on the same images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import run_module, small_sweep, sweep_args, trial_runs, write_image_folder

from search import run
from search.sweep.engine import run_sweep

pytestmark = pytest.mark.slow


def change(images: Path) -> None:
    """30 images added to one class folder, 10 removed from another, as the issue's user did (scaled)."""
    for index in range(3):
        shutil.copy(images / "train" / "red" / "0000.png", images / "train" / "red" / f"extra-{index}.png")
    for name in ("0000.png", "0001.png"):
        (images / "train" / "green" / name).unlink()


def test_a_resume_on_changed_images_is_refused_in_one_line_saying_what_changed(tmp_path, ray_runtime):
    images = write_image_folder(tmp_path / "images", per_class=30)
    settings = small_sweep(images, tmp_path, name="d1")
    assert run.main(sweep_args(settings)) == 0
    change(images)
    result = run_module("search.run", *sweep_args(settings), "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "search.run: error: --resume cannot change what sweep d1 is: its images changed since it began: "
        "2 images removed from green, 3 images added to red (start a new sweep with another --name instead)"
    )


def digests(settings) -> set[str]:
    """The digests of the training images every trial's MLflow dataset input records."""
    return {
        dataset_input.dataset.digest
        for trial in trial_runs(settings)
        for dataset_input in trial.inputs.dataset_inputs
        if dataset_input.dataset.name.endswith("-train")
    }


def test_a_warm_start_takes_only_the_trials_that_trained_on_the_same_images(tmp_path, ray_runtime):
    images = write_image_folder(tmp_path / "images", per_class=30)
    first = small_sweep(images, tmp_path, name="w1", scheduler="fifo")
    assert run_sweep(first).trial_statuses == {"FINISHED": 2}
    assert run_sweep(small_sweep(images, tmp_path, name="w2", scheduler="fifo")).warm_start == 2

    change(images)
    changed = small_sweep(images, tmp_path, name="w3", scheduler="fifo")
    assert run_sweep(changed).warm_start == 0  # the same folder and settings, other images
    (before,), (after,) = digests(first), digests(changed)
    assert before != after  # and MLflow tells the two apart
