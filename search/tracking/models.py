"""Final models in MLflow's pytorch flavor: logged with a signature, an input example and their test
accuracy, and registered by name.

A retrain logs its model in its own run; `search.export --register` logs the sweep's best trial's,
as a model of that trial's run, which it leaves as it was (MLflow 3's logged models name their
source run).
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from matplotlib.figure import Figure
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from search.tracking.store import get_or_create_experiment
from trainables.names import MODEL_ARTIFACT, SOURCE_RUN_ID_TAG, SWEEP_TAG, TEST_ACC, TEST_LOSS
from trainables.stats import wilson_interval


def log_pytorch_model(
    module: nn.Module, example: Tensor, register: str | None, model_id: str | None = None
) -> Any:
    """The module in MLflow's pytorch flavor, with its signature and an input example, under the
    active run or as the logged model `model_id`; registered when named. MLflow's ModelInfo."""
    with torch.no_grad():
        signature = infer_signature(example.numpy(), module(example).numpy())
    with warnings.catch_warnings():  # torch.export's notes on how MLflow packs the weights
        warnings.simplefilter("ignore")
        return mlflow.pytorch.log_model(
            module,
            name=MODEL_ARTIFACT,
            signature=signature,
            input_example=example.numpy(),
            registered_model_name=register,
            model_id=model_id,
        )


def register_trial_model(
    tracking_uri: str,
    experiment: str,
    trial: dict[str, str],  # run_id and sweep of the trial the model comes from
    module: nn.Module,
    example: Tensor,
    name: str,
    tested: TestResult | None,
) -> tuple[str, str]:
    """Logs a trial's model as a model of the trial's run and registers it under `name`, with its
    test accuracy, when there is one, on the model and on the model version. Its URI and version."""
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment)
    logged = mlflow.initialize_logged_model(
        name=MODEL_ARTIFACT, source_run_id=trial["run_id"], experiment_id=experiment_id
    )
    info = log_pytorch_model(module, example, name, model_id=logged.model_id)
    version = str(info.registered_model_version)
    tags = {SOURCE_RUN_ID_TAG: trial["run_id"], SWEEP_TAG: trial["sweep"]}
    if tested is not None:
        for key, value in tested.metrics().items():
            mlflow.log_metric(key, value, model_id=logged.model_id, run_id=trial["run_id"])
        tags.update({key: f"{value:.4f}" for key, value in tested.metrics().items()})
        tags["test_images"] = str(len(tested.labels))
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return info.model_uri, version


class TestResult:
    """A model's scores on the test images: accuracy, loss, each class's accuracy, the confusion matrix."""

    def __init__(self, scores: Tensor, labels: Tensor, classes: tuple[str, ...]) -> None:
        self.classes = classes
        self.labels = labels
        self.predicted = scores.argmax(dim=1)
        self.loss = float(torch.nn.functional.cross_entropy(scores.float(), labels))
        self.accuracy = float((self.predicted == labels).float().mean())
        count = len(classes)
        self.confusion = torch.bincount(labels * count + self.predicted, minlength=count * count).view(
            count, count
        )

    def metrics(self) -> dict[str, float]:
        """Accuracy with its 95% Wilson interval, and the loss."""
        low, high = wilson_interval(self.accuracy, len(self.labels))
        return {
            TEST_ACC: self.accuracy,
            f"{TEST_ACC}_low": low,
            f"{TEST_ACC}_high": high,
            TEST_LOSS: self.loss,
        }

    def summary(self) -> str:
        """The accuracy and its interval, in one line."""
        metrics = self.metrics()
        low, high = metrics[f"{TEST_ACC}_low"], metrics[f"{TEST_ACC}_high"]
        interval = f"95% interval {low:.4f}-{high:.4f}"
        return f"test accuracy {self.accuracy:.4f} ({interval}) on {len(self.labels)} images"

    def per_class(self) -> dict[str, float]:
        hits, totals = self.confusion.diagonal(), self.confusion.sum(dim=1).clamp_min(1)
        return {name: float(hit / total) for name, hit, total in zip(self.classes, hits, totals, strict=True)}

    def per_class_markdown(self) -> str:
        totals = self.confusion.sum(dim=1).tolist()
        rows = ["| class | test images | accuracy |", "|---|---|---|"]
        rows += [
            f"| {name} | {total} | {accuracy:.4f} |"
            for (name, accuracy), total in zip(self.per_class().items(), totals, strict=True)
        ]
        return "\n".join(rows) + "\n"

    def confusion_figure(self) -> Figure:
        """Rows: the true class; columns: the predicted one; each cell the share of its row."""
        shares = (self.confusion / self.confusion.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
        figure = Figure(figsize=(7, 6), layout="constrained")
        axes = figure.add_subplot()
        image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        figure.colorbar(image, ax=axes, label="share of the true class")
        ticks = range(len(self.classes))
        axes.set_xticks(ticks, self.classes, rotation=45, ha="right")
        axes.set_yticks(ticks, self.classes)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        for row in ticks:
            for column in ticks:
                color = "white" if shares[row, column] > 0.5 else "black"
                axes.text(
                    column,
                    row,
                    f"{shares[row, column]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=color,
                )
        axes.set_title(f"Test accuracy {self.accuracy:.4f} on {len(self.labels)} images")
        return figure
