"""`python -m search.retrain best.json`: train the exported config into a final model, test it, log it.

From scratch, on all the training images (a sweep's validation images too), with a
recipe for many epochs when there are many (see trainables.recipe), then scored on
the test images with its 95% interval, a per-class table and a confusion matrix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from search.cli import (
    EXIT_OK,
    OneLineParser,
    add_recipe_options,
    default,
    non_negative_int,
    output_file,
    positive_int,
    recipe_from,
    run_command,
)
from search.tracking.best import BestTrial, read_best
from search.tracking.models import TestResult
from search.tracking.retrain_run import RetrainRun
from search.tracking.store import ImageDataset
from search.tracking.uri import check_tracking_uri
from trainables.checkpoint import ModelSpec
from trainables.config import PRECISIONS, DataSettings
from trainables.data import load_images, load_splits
from trainables.errors import InputError
from trainables.loop import Report, Training, predict
from trainables.model import as_module, learning_rate
from trainables.names import LEARNING_RATE, METRIC, TEST_ACC, TEST_LOSS, TRAIN_ACC, TRAIN_LOSS, VAL_LOSS
from trainables.recipe import PARTS, Recipe, recipe_named

PROG = "search.retrain"


@dataclasses.dataclass(frozen=True)
class RetrainSettings:
    """What `search.retrain` trains, on what, and how."""

    epochs: int
    recipe: Recipe
    holdout: int = 0  # training images kept aside, stratified, to watch validation accuracy per epoch
    max_train_images: int | None = None
    precision: str = "auto"
    register: str | None = None


def retrain(
    best: BestTrial, data: DataSettings, tracking_uri: str, settings: RetrainSettings
) -> dict[str, Any]:
    """Trains best's config from scratch, scores it on the test images, logs the run and the model."""
    split = dataclasses.replace(data, val_size=settings.holdout, max_train_images=settings.max_train_images)
    splits = load_splits(split)
    test = load_images(data, "test")
    if test.classes != splits.classes:
        raise InputError(
            f"test classes {list(test.classes)} differ from train classes {list(splits.classes)}"
        )
    if (splits.classes, splits.input_shape) != (best.spec.classes, best.spec.input_shape):
        these = f"{len(splits.classes)} classes of shape {list(splits.input_shape)}"
        sweeps = f"{len(best.spec.classes)} of {list(best.spec.input_shape)}"
        print(
            f"note: these images ({these}) are not the sweep's ({sweeps}); the model is built for them",
            file=sys.stderr,
        )
    print(what_it_adds(best, settings, len(splits.train_labels)), file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = ModelSpec(best.spec.config, splits.input_shape, splits.classes, splits.mean, splits.std)
    training = Training(spec, splits, best.seed, device, settings.precision, settings.recipe, settings.epochs)
    datasets = [ImageDataset.of(split, "train", splits.fingerprint, len(splits.train_labels))]
    if settings.holdout:
        datasets.append(ImageDataset.of(split, "validation", splits.fingerprint, len(splits.val_labels)))
    datasets.append(ImageDataset.of(data, "test", test.fingerprint, len(test)))

    with RetrainRun(tracking_uri, best) as run:
        run.log_settings(
            spec, settings.epochs, best.seed, split, _recipe_params(settings, training.precision)
        )
        run.log_datasets(datasets)
        run.log_best_json(best)
        started = time.perf_counter()
        for report in training.epochs(1, settings.epochs):
            epoch = round(report.epoch)
            if report.diverged:
                raise InputError(_diverged(best, settings, epoch))
            metrics = {
                TRAIN_LOSS: report.train.loss,
                TRAIN_ACC: report.train.accuracy,
                LEARNING_RATE: learning_rate(training.optimizer),
            }
            if report.val is not None:
                metrics.update({METRIC: report.val.accuracy, VAL_LOSS: report.val.loss})
            run.log_metrics(metrics, step=epoch)
            _progress(epoch, settings.epochs, report, time.perf_counter() - started)
        training.model.load_state_dict(training.final_state())
        module = (
            as_module(training.model, spec.config, spec.input_shape, spec.num_classes).cpu().float().eval()
        )
        # Scored as it is logged, in fp32 on the CPU, so the model a user loads gives the same figure.
        tested = TestResult(predict(module, spec, test.images), test.labels, test.classes)
        run.log_test(tested, step=settings.epochs)
        example = training.normalize(test.images[:2].to(device)).cpu().float()
        model_uri = run.log_model(module, spec, example, settings.register)
    return {
        TEST_ACC: tested.accuracy,
        f"{TEST_ACC}_interval_95": [
            tested.metrics()[f"{TEST_ACC}_low"],
            tested.metrics()[f"{TEST_ACC}_high"],
        ],
        TEST_LOSS: tested.loss,
        "epochs": settings.epochs,
        "train_images": len(splits.train_labels),
        "run_id": run.run_id,
        "model_uri": model_uri,
        "registered_model": settings.register,
        "per_class_accuracy": tested.per_class(),
    }


def _recipe_params(settings: RetrainSettings, precision: str) -> dict[str, Any]:
    return {**settings.recipe.as_params(), "holdout": settings.holdout, "precision": precision}


def _diverged(best: BestTrial, settings: RetrainSettings, epoch: int) -> str:
    peak = settings.recipe.peak_lr(best.spec.config.lr, best.spec.config.momentum)
    return (
        f"training diverged in epoch {epoch} (the loss is no longer finite) at a peak learning rate of "
        f"{peak:.3g}: lower it with --peak-lr-factor (now {settings.recipe.peak_lr_factor:g}), "
        f"or train as the sweep's trials did, with their recipe ({best.recipe.name}: drop --recipe)"
    )


def _progress(epoch: int, epochs: int, report: Report, elapsed_s: float) -> None:
    eta = elapsed_s / epoch * (epochs - epoch)
    trained = f"train loss {report.train.loss:.4f}, accuracy {report.train.accuracy:.4f}"
    watched = f", holdout accuracy {report.val.accuracy:.4f}" if report.val is not None else ""
    print(f"epoch {epoch}/{epochs}: {trained}{watched} | {elapsed_s:.0f}s, ETA {eta:.0f}s", flush=True)


def chosen_recipe(args: argparse.Namespace, best: BestTrial) -> Recipe:
    """The trials' own recipe unless --recipe names another (the long one then peaks by the rule
    for a config searched under another recipe); each part switchable."""
    base = best.recipe if args.recipe is None else recipe_named(args.recipe, best.recipe)
    return recipe_from(args, base)


def what_it_adds(best: BestTrial, settings: RetrainSettings, train_images: int) -> str:
    """In words, how this retrain differs from the sweep's best trial, which is a model already."""
    changes = [f"{train_images} training images (the sweep's validation images among them)"]
    if settings.epochs != best.epochs:
        changes.append(f"{settings.epochs} epochs instead of the trials' {best.epochs}")
    if settings.recipe != best.recipe:
        differ = [
            f"{part} {getattr(settings.recipe, part)!r} (trials: {getattr(best.recipe, part)!r})"
            for part in ("name", *PARTS)
            if getattr(settings.recipe, part) != getattr(best.recipe, part)
        ]
        changes.append("recipe " + ", ".join(differ))
    same = settings.epochs == best.epochs and settings.recipe == best.recipe
    final = "; the best trial itself trained so: `search.export --register` registers it with no retrain"
    return f"note: retraining from scratch on {'; '.join(changes)}{final if same else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("best", type=Path, help="best.json from search.export")
    parser.add_argument("--epochs", type=positive_int, help="epochs (default: the sweep's)")
    parser.add_argument("--data", help="'cifar10' or an image folder (default: the sweep's)")
    parser.add_argument("--data-root", help="download and cache folder (default: the sweep's)")
    parser.add_argument(
        "--holdout", type=non_negative_int, default=0, help="training images set aside to watch"
    )
    parser.add_argument(
        "--max-train-images", type=positive_int, help="train on fewer images, for a quick look"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default(RetrainSettings, "precision"),
        help="model arithmetic; auto: bf16 where the CPU or GPU has it",
    )
    add_recipe_options(
        parser,
        "train with this named recipe instead of the trials' own (recorded in best.json); long, for a "
        "config searched under another recipe, peaks at 4x its lr, at most an effective step of 0.12",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's)")
    parser.add_argument("--register", help="also register the model under this name")
    parser.add_argument("--out", type=output_file, help="write the metrics here as JSON")
    args = parser.parse_args(argv)

    best = read_best(args.best)
    data = dataclasses.replace(
        best.data, source=args.data or best.data.source, root=args.data_root or best.data.root
    )
    args.epochs = args.epochs or best.epochs
    settings = RetrainSettings(
        args.epochs,
        chosen_recipe(args, best),
        args.holdout,
        args.max_train_images,
        args.precision,
        args.register,
    )
    tracking_uri = check_tracking_uri(args.tracking_uri or best.tracking_uri)
    metrics = retrain(best, data, tracking_uri, settings)
    low, high = metrics[f"{TEST_ACC}_interval_95"]
    epochs = f"{metrics['epochs']} epoch{'s' if metrics['epochs'] != 1 else ''}"
    print(f"Test accuracy {metrics[TEST_ACC]:.4f} (95% interval {low:.4f}-{high:.4f}) after {epochs}")
    print(f"Model {metrics['model_uri']}")
    print(
        "Per class: "
        + ", ".join(f"{name} {accuracy:.3f}" for name, accuracy in metrics["per_class_accuracy"].items())
    )
    if args.out is not None:
        args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
