"""The Tune trainable: a trial's config in, one report with a checkpoint per epoch out.

It is the only place in trainables/ that knows about Ray. Model, optimizer and
loop come from the factory and loop modules; the images arrive through Ray's
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

from trainables.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from trainables.config import METRIC, TrialConfig
from trainables.data import ImageSplits
from trainables.loop import EpochResult, Normalizer, batch_order, evaluate, place_images, train_epoch
from trainables.model import build_optimizer

DIVERGED = "diverged"  # result key: 1.0 when the loss stopped being finite
WORST_ACCURACY = 0.0  # what a diverged trial reports, finite so ASHA and Optuna can rank it
# The per-epoch metrics a trial reports; trackers log these and nothing else.
REPORTED_METRICS = (
    METRIC,
    "val_loss",
    "train_loss",
    "train_acc",
    "train_images_per_s",
    "epoch_time_s",  # training plus validation: the time a trial spends on its real work
    DIVERGED,
)


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares besides the data."""

    max_epochs: int
    seed: int  # initial weights and batch order, the same for every trial of a sweep


def train_convnet(config: dict[str, Any], splits: ImageSplits, settings: TrialSettings) -> None:
    # Ray logs every persisted checkpoint at INFO level: one line a trial an epoch, to the console.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial_config = TrialConfig.from_dict(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _use_assigned_cpus()
    spec = ModelSpec(trial_config, splits.input_shape, splits.classes, splits.mean, splits.std)
    model = spec.build(seed=settings.seed, device=device)
    optimizer = build_optimizer(model, trial_config)

    first_epoch = 1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = load_checkpoint(Path(directory))
        model.load_state_dict(saved.model_state)
        optimizer.load_state_dict(saved.optimizer_state)
        first_epoch = saved.epoch + 1

    train_images, train_labels = place_images(splits.train_images, device), splits.train_labels.to(device)
    val_images, val_labels = place_images(splits.val_images, device), splits.val_labels.to(device)
    normalize = Normalizer(splits.mean, splits.std, device)

    for epoch in range(first_epoch, settings.max_epochs + 1):
        order = batch_order(settings.seed, epoch)
        train = train_epoch(
            model, optimizer, train_images, train_labels, normalize, trial_config.batch_size, order
        )
        val = evaluate(model, val_images, val_labels, normalize) if not train.diverged else train
        if val.diverged:
            tune.report({METRIC: WORST_ACCURACY, DIVERGED: 1.0, "epoch": epoch})
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(Path(directory), spec, model, optimizer, epoch)
            tune.report(
                _epoch_metrics(epoch, train, val),
                checkpoint=tune.Checkpoint.from_directory(directory),
            )


def _epoch_metrics(epoch: int, train: EpochResult, val: EpochResult) -> dict[str, float]:
    return {
        METRIC: val.accuracy,
        "val_loss": val.loss,
        "train_loss": train.loss,
        "train_acc": train.accuracy,
        "train_images_per_s": train.images_per_s,
        "epoch_time_s": train.seconds + val.seconds,
        "epoch": epoch,
        DIVERGED: 0.0,
    }


def _use_assigned_cpus() -> None:
    """One torch thread per CPU Ray gave this trial, so parallel trials do not oversubscribe."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
