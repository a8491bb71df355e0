"""The MLflow run of a retrain: its settings, its metrics per epoch, its test result and its model."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from search.tracking.best import BestTrial
from search.tracking.store import ImageDataset, get_or_create_experiment, log_datasets
from trainables.checkpoint import ModelSpec
from trainables.config import DataSettings
from trainables.names import (
    MODEL_ARTIFACT,
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

    def log_settings(self, spec: ModelSpec, epochs: int, seed: int, data: DataSettings) -> None:
        mlflow.log_params({**spec.config.to_dict(), "epochs": epochs, "seed": seed})
        mlflow.log_params({f"data_{key}": value for key, value in dataclasses.asdict(data).items()})

    def log_datasets(self, datasets: Sequence[ImageDataset]) -> None:
        log_datasets(MlflowClient(self.tracking_uri), self.run_id, datasets)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        mlflow.log_metrics(dict(metrics), step=step)

    def log_model(self, module: nn.Module, spec: ModelSpec, example: np.ndarray, register: str | None) -> str:
        """The model in MLflow's pytorch flavor, with its input example; registered when named."""
        info: Any = mlflow.pytorch.log_model(
            module, name=MODEL_ARTIFACT, input_example=example, registered_model_name=register
        )
        mlflow.log_dict(spec.to_dict(), SPEC_FILE)
        return info.model_uri
