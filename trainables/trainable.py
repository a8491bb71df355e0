"""The Tune trainable: a trial's config in, one report with a checkpoint per epoch out.

It is the only place in trainables/ that knows about Ray. The training itself is
`trainables.loop.Training`, shared with retrain and the benchmark; the images arrive through Ray's
object store (`tune.with_parameters`), so no trial reads or decodes files.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from trainables.checkpoint import ModelSpec, load_checkpoint
from trainables.config import TrialConfig
from trainables.data import ImageSplits
from trainables.loop import EpochReport, Training
from trainables.names import (
    DIVERGED,
    EPOCH,
    EPOCH_TIME_S,
    METRIC,
    PRECISION,
    TRAIN_ACC,
    TRAIN_IMAGES_PER_S,
    TRAIN_LOSS,
    VAL_LOSS,
)

WORST_ACCURACY = 0.0  # what a diverged trial reports, finite so ASHA and Optuna can rank it


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares besides the data."""

    max_epochs: int
    seed: int  # initial weights and batch order, the same for every trial of a sweep
    precision: str = "auto"  # one of trainables.config.PRECISIONS


def train_convnet(config: dict[str, Any], splits: ImageSplits, settings: TrialSettings) -> None:
    # Ray logs every persisted and every restored checkpoint at INFO level, to the console.
    for logger in ("ray.train._internal.storage", "ray.tune.trainable.trainable"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _use_assigned_cpus()
    spec = ModelSpec(
        TrialConfig.from_dict(config), splits.input_shape, splits.classes, splits.mean, splits.std
    )
    training = Training(spec, splits, settings.seed, device, settings.precision)

    first_epoch = 1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            first_epoch = training.load(load_checkpoint(Path(directory)))

    for report in training.epochs(first_epoch, settings.max_epochs):
        if report.diverged:
            tune.report(
                {METRIC: WORST_ACCURACY, DIVERGED: 1.0, EPOCH: report.epoch, PRECISION: training.precision}
            )
            return
        with tempfile.TemporaryDirectory() as directory:
            training.save(Path(directory), report.epoch)
            results = {**_epoch_metrics(report), PRECISION: training.precision}
            tune.report(results, checkpoint=tune.Checkpoint.from_directory(directory))


def _epoch_metrics(report: EpochReport) -> dict[str, float]:
    train, val = report.train, report.val
    return {
        METRIC: val.accuracy,
        VAL_LOSS: val.loss,
        TRAIN_LOSS: train.loss,
        TRAIN_ACC: train.accuracy,
        TRAIN_IMAGES_PER_S: train.images_per_s,
        EPOCH_TIME_S: train.seconds + val.seconds,
        EPOCH: report.epoch,
        DIVERGED: 0.0,
    }


def _use_assigned_cpus() -> None:
    """One torch thread per CPU Ray gave this trial, so parallel trials do not oversubscribe."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
