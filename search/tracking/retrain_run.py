"""The MLflow run of a retrain: its settings, its metrics per epoch, its test result and its model."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from search.tracking.best import BestTrial
from search.tracking.models import TestResult, log_pytorch_model
from search.tracking.store import ImageDataset, get_or_create_experiment, log_datasets
from trainables.checkpoint import ModelSpec
from trainables.config import DataSettings
from trainables.names import (
    BEST_JSON,
    CONFUSION_PNG,
    PER_CLASS_JSON,
    PER_CLASS_MD,
    RETRAIN_ROLE,
    ROLE_TAG,
    SOURCE_RUN_ID_TAG,
    SOURCE_RUN_STATE_TAG,
    SPACE_TAG,
    SPEC_FILE,
    SWEEP_TAG,
)


def _lifecycle(client: MlflowClient, run_id: str) -> str:
    """active, deleted, or missing (not in this store)."""
    try:
        return client.get_run(run_id).info.lifecycle_stage
    except MlflowException:
        return "missing"


class RetrainRun:
    """A run in the best trial's experiment, tagged with the trial it retrains; FAILED if training fails."""

    def __init__(self, tracking_uri: str, best: BestTrial) -> None:
        self.tracking_uri = tracking_uri
        self.best = best
        self.run_id = ""

    def __enter__(self) -> RetrainRun:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its notes on registering, each a line
        mlflow.set_tracking_uri(self.tracking_uri)
        client = MlflowClient(self.tracking_uri)
        experiment_id = get_or_create_experiment(client, self.best.experiment)
        tags = {
            ROLE_TAG: RETRAIN_ROLE,
            SOURCE_RUN_ID_TAG: self.best.run_id,
            SWEEP_TAG: self.best.sweep,
            SPACE_TAG: self.best.space,
        }
        source = _lifecycle(client, self.best.run_id)
        if source != "active":  # best.json holds all a retrain needs, but the link now leads nowhere
            tags[SOURCE_RUN_STATE_TAG] = source
            print(
                f"note: the trial best.json came from, run {self.best.run_id}, is {source} in "
                f"{self.tracking_uri}; the retrain goes on from best.json alone",
                file=sys.stderr,
            )
        run = mlflow.start_run(experiment_id=experiment_id, run_name=f"retrain-{self.best.sweep}", tags=tags)
        self.run_id = run.info.run_id
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        mlflow.end_run("FINISHED" if kind is None else "FAILED")

    def log_settings(
        self, spec: ModelSpec, epochs: int, seed: int, data: DataSettings, recipe: Mapping[str, Any]
    ) -> None:
        """The config, the data and the whole recipe, as params."""
        mlflow.log_params({**spec.config.to_dict(), "epochs": epochs, "seed": seed, **recipe})
        mlflow.log_params({f"data_{key}": value for key, value in dataclasses.asdict(data).items()})

    def log_best_json(self, best: BestTrial) -> None:
        """The best.json the retrain came from, as it was read."""
        mlflow.log_dict(best.to_json(), BEST_JSON)

    def log_datasets(self, datasets: Sequence[ImageDataset]) -> None:
        log_datasets(MlflowClient(self.tracking_uri), self.run_id, datasets)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        mlflow.log_metrics(dict(metrics), step=step)

    def log_test(self, tested: TestResult, step: int) -> None:
        """Test accuracy with its 95% interval, the accuracy of each class, the confusion matrix."""
        mlflow.log_metrics(tested.metrics(), step=step)
        mlflow.log_dict(tested.per_class(), PER_CLASS_JSON)
        mlflow.log_text(tested.per_class_markdown(), PER_CLASS_MD)
        figure = tested.confusion_figure()
        mlflow.log_figure(figure, CONFUSION_PNG)

    def log_model(self, module: nn.Module, spec: ModelSpec, example: Tensor, register: str | None) -> str:
        """The model in MLflow's pytorch flavor, with its signature and an input example; registered
        when named."""
        info = log_pytorch_model(module, example, register)
        mlflow.log_dict(spec.to_dict(), SPEC_FILE)
        return info.model_uri
