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
from trainables.config import trial_config
from trainables.data import ImageSplits
from trainables.loop import Report, Training
from trainables.model import learning_rate, training_flops_per_image
from trainables.names import (
    DIVERGED,
    EPOCH,
    EPOCH_TIME_S,
    IMAGES_SEEN,
    LEARNING_RATE,
    METRIC,
    PARAMETERS,
    PRECISION,
    TRAIN_ACC,
    TRAIN_IMAGES_PER_S,
    TRAIN_LOSS,
    TRAIN_TFLOP,
    TRIAL_SECONDS,
    VAL_LOSS,
)
from trainables.recipe import Recipe

WORST_ACCURACY = 0.0  # what a diverged trial reports, finite so ASHA and Optuna can rank it


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares besides the data."""

    max_epochs: int
    seed: int  # initial weights and batch order, the same for every trial of a sweep
    recipe: Recipe  # over all of max_epochs: the sweep's, no default here
    precision: str = "auto"  # one of trainables.config.PRECISIONS
    # Where a trial reports besides each epoch's end, as fractions of all its training: the
    # scheduler's rungs, so it can stop a weak trial after a ninth of an epoch, say.
    rungs: tuple[float, ...] = ()

    def rung_points(self, epoch_images: int) -> list[int]:
        """Images seen at each rung: where a trial is scored to be compared with the others."""
        return sorted({round(fraction * self.max_epochs * epoch_images) for fraction in self.rungs})

    def report_points(self, epoch_images: int, at_rungs: bool = True) -> list[int]:
        """Images seen at each report: every epoch's end, and every rung unless told not to."""
        ends = {epoch * epoch_images for epoch in range(1, self.max_epochs + 1)}
        return sorted(ends | set(self.rung_points(epoch_images) if at_rungs else ()))


# Ray logs every persisted and every restored checkpoint at INFO level, to the console; a resumed
# trial is restored before this function runs, so the levels are set when a trial's process
# imports this module.
for _logger in ("ray.train._internal.storage", "ray.tune.trainable.trainable"):
    logging.getLogger(_logger).setLevel(logging.WARNING)


def train_convnet(config: dict[str, Any], splits: ImageSplits, settings: TrialSettings) -> None:
    """Trains one config to the sweep's end, reporting at each rung and epoch's end; a checkpoint
    at each epoch's end only, which is where a resumed trial goes on from."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _use_assigned_cpus()
    trial, final_of = trial_config(config)
    spec = ModelSpec(trial, splits.input_shape, splits.classes, splits.mean, splits.std)
    training = Training(
        spec,
        splits,
        settings.seed,
        device,
        settings.precision,
        recipe=settings.recipe,
        epochs=settings.max_epochs,
    )
    flops = training_flops_per_image(spec.config, spec.input_shape, spec.num_classes)
    about = {
        PRECISION: training.precision,
        PARAMETERS: sum(weight.numel() for weight in training.model.parameters()),
    }
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            training.load(load_checkpoint(Path(directory)))

    # A final trial trains the search's best to the end: no rung decides it, so it reports at epoch
    # ends only, and no decay branches off to score it.
    at_rungs = final_of is None
    points = settings.report_points(training.epoch_images, at_rungs)
    rungs = settings.rung_points(training.epoch_images) if at_rungs else []
    for report in training.reports(points, scored=rungs):
        cost = {TRAIN_TFLOP: flops * training.images_trained / 1e12, TRIAL_SECONDS: training.seconds_trained}
        results = {**_metrics(report), **cost, LEARNING_RATE: learning_rate(training.optimizer), **about}
        if report.diverged:
            tune.report({**results, METRIC: WORST_ACCURACY, DIVERGED: 1.0})
            return
        if not report.at_epoch_end:
            tune.report(results)
            continue
        with tempfile.TemporaryDirectory() as directory:
            training.save(Path(directory), int(report.epoch), report.scored_state)
            tune.report(results, checkpoint=tune.Checkpoint.from_directory(directory))


def _metrics(report: Report) -> dict[str, float]:
    train, val = report.train, report.val
    metrics = {
        TRAIN_LOSS: train.loss,
        TRAIN_ACC: train.accuracy,
        TRAIN_IMAGES_PER_S: train.images_per_s,
        EPOCH_TIME_S: report.seconds,
        EPOCH: report.epoch,
        IMAGES_SEEN: report.images_seen,
        DIVERGED: 0.0,
    }
    if val is not None:  # a sweep always validates, but for a diverged stretch
        metrics.update({METRIC: val.accuracy, VAL_LOSS: val.loss})
    return metrics


def _use_assigned_cpus() -> None:
    """One torch thread per CPU Ray gave this trial, so parallel trials do not oversubscribe."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
