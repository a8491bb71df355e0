"""`python -m search.retrain best.json`: train the exported config, test it, log the model to MLflow."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from search.cli import EXIT_OK, OneLineParser, positive_int, run_command
from search.sweep.settings import check_tracking_uri
from search.tracking.best import BestTrial, read_best
from search.tracking.retrain_run import RetrainRun
from search.tracking.store import ImageDataset
from trainables.checkpoint import ModelSpec
from trainables.config import DataSettings
from trainables.data import load_images, load_splits
from trainables.errors import InputError
from trainables.loop import Training
from trainables.model import as_module
from trainables.names import METRIC, TEST_ACC, TEST_LOSS, TRAIN_ACC, TRAIN_LOSS, VAL_LOSS

PROG = "search.retrain"


def retrain(
    best: BestTrial, epochs: int, data: DataSettings, tracking_uri: str, register: str | None
) -> dict[str, Any]:
    """Trains best's config from scratch on the training split, then scores it on the test split."""
    splits = load_splits(data)
    test = load_images(data, "test")
    if test.classes != splits.classes:
        raise InputError(
            f"test classes {list(test.classes)} differ from train classes {list(splits.classes)}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = ModelSpec(best.spec.config, splits.input_shape, splits.classes, splits.mean, splits.std)
    training = Training(spec, splits, best.seed, device)

    datasets = (
        ImageDataset.of(data, "train", splits.fingerprint, len(splits.train_labels)),
        ImageDataset.of(data, "validation", splits.fingerprint, len(splits.val_labels)),
        ImageDataset.of(data, "test", test.fingerprint, len(test)),
    )
    with RetrainRun(tracking_uri, best) as run:
        run.log_settings(spec, epochs, best.seed, data)
        run.log_datasets(datasets)
        for report in training.epochs(1, epochs):
            if report.diverged:
                raise InputError(
                    f"training diverged in epoch {report.epoch}: the config's learning rate is too high"
                )
            trained, val = report.train, report.val
            metrics = {
                TRAIN_LOSS: trained.loss,
                TRAIN_ACC: trained.accuracy,
                METRIC: val.accuracy,
                VAL_LOSS: val.loss,
            }
            run.log_metrics(metrics, step=report.epoch)
            print(
                f"epoch {report.epoch}/{epochs}: train loss {trained.loss:.4f}, "
                f"validation accuracy {val.accuracy:.4f}"
            )
        tested = training.evaluate(test.images, test.labels)
        run.log_metrics({TEST_ACC: tested.accuracy, TEST_LOSS: tested.loss}, step=epochs)
        module = as_module(training.model, spec.config, spec.input_shape, spec.num_classes).cpu().eval()
        example = training.normalize(test.images[:2].to(device)).cpu().numpy()
        model_uri = run.log_model(module, spec, example, register)
    return {
        TEST_ACC: tested.accuracy,
        TEST_LOSS: tested.loss,
        METRIC: val.accuracy,
        "epochs": epochs,
        "run_id": run.run_id,
        "model_uri": model_uri,
        "registered_model": register,
    }


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__)
    parser.add_argument("best", type=Path, help="best.json from search.export")
    parser.add_argument("--epochs", type=positive_int, help="epochs (default: the sweep's)")
    parser.add_argument("--data", help="'cifar10' or an image folder (default: the sweep's)")
    parser.add_argument("--data-root", help="download and cache folder (default: the sweep's)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's)")
    parser.add_argument("--register", help="also register the model under this name")
    parser.add_argument("--out", type=Path, help="write the metrics here as JSON")
    args = parser.parse_args(argv)

    best = read_best(args.best)
    data = dataclasses.replace(
        best.data, source=args.data or best.data.source, root=args.data_root or best.data.root
    )
    tracking_uri = check_tracking_uri(args.tracking_uri or best.tracking_uri)
    metrics = retrain(best, args.epochs or best.epochs, data, tracking_uri, args.register)
    print(
        f"Test accuracy {metrics[TEST_ACC]:.4f} after {metrics['epochs']} epochs; "
        f"model {metrics['model_uri']}"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
