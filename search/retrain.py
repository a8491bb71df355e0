"""`python -m search.retrain best.json`: train the exported config, test it, log the model to MLflow."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch

from search.best_config import BestTrial, read_best
from search.cli import EXIT_OK, OneLineParser, positive_int, run_command
from search.settings import check_tracking_uri
from search.tracking import get_or_create_experiment
from trainables.checkpoint import ModelSpec
from trainables.config import METRIC, DataSettings
from trainables.data import load_images, load_splits
from trainables.errors import InputError
from trainables.loop import Training
from trainables.model import as_module

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

    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = get_or_create_experiment(mlflow.MlflowClient(tracking_uri), best.experiment)
    tags = {"role": "retrain", "source_run_id": best.run_id, "sweep": best.sweep, "space": best.space}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"retrain-{best.sweep}", tags=tags) as run:
        mlflow.log_params({**spec.config.to_dict(), "epochs": epochs, "seed": best.seed})
        mlflow.log_params({f"data_{key}": value for key, value in dataclasses.asdict(data).items()})
        for report in training.epochs(1, epochs):
            if report.diverged:
                raise InputError(
                    f"training diverged in epoch {report.epoch}: the config's learning rate is too high"
                )
            trained, val = report.train, report.val
            mlflow.log_metrics(
                {
                    "train_loss": trained.loss,
                    "train_acc": trained.accuracy,
                    METRIC: val.accuracy,
                    "val_loss": val.loss,
                },
                step=report.epoch,
            )
            print(
                f"epoch {report.epoch}/{epochs}: train loss {trained.loss:.4f}, "
                f"validation accuracy {val.accuracy:.4f}"
            )
        tested = training.evaluate(test.images, test.labels)
        mlflow.log_metrics({"test_acc": tested.accuracy, "test_loss": tested.loss}, step=epochs)
        module = as_module(training.model, spec.config, spec.input_shape, spec.num_classes).cpu().eval()
        example = training.normalize(test.images[:2].to(device)).cpu().numpy()
        model_info = mlflow.pytorch.log_model(
            module, name="model", input_example=example, registered_model_name=register
        )
        mlflow.log_dict(spec.to_dict(), "model.json")
    return {
        "test_acc": tested.accuracy,
        "test_loss": tested.loss,
        METRIC: val.accuracy,
        "epochs": epochs,
        "run_id": run.info.run_id,
        "model_uri": model_info.model_uri,
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
        f"Test accuracy {metrics['test_acc']:.4f} after {metrics['epochs']} epochs; "
        f"model {metrics['model_uri']}"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
