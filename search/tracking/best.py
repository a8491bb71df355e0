"""best.json: a sweep's best trial, self-describing, written by export and the report, read by retrain."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from search.tracking.store import best_child_run, is_diverged, load_json_artifact, status_counts
from trainables.checkpoint import ModelSpec
from trainables.config import DataSettings, TrialConfig
from trainables.errors import InputError
from trainables.names import (
    BEST_METRIC,
    CHECKPOINT_ARTIFACT,
    METRIC,
    SPACE_TAG,
    SPEC_FILE,
    SWEEP_SETTINGS_ARTIFACT,
    SWEEP_TAG,
)
from trainables.recipe import Recipe
from trainables.stats import wilson_interval

SCHEMA_VERSION = 2  # 2: training.recipe, every part of it; 1 held only training.schedule
READABLE_VERSIONS = (1, 2)

# How the flat TrialConfig is grouped in the file; together the groups name every field once.
MODEL_FIELDS = ("model", "channel_1", "channel_2", "kernel_1", "kernel_2")
OPTIMIZER_FIELDS = ("optimizer", "lr", "weight_decay", "momentum")
TRAINING_FIELDS = ("batch_size",)
assert sorted(MODEL_FIELDS + OPTIMIZER_FIELDS + TRAINING_FIELDS) == sorted(TrialConfig().to_dict())


@dataclass(frozen=True)
class BestTrial:
    space: str
    sweep: str
    experiment: str
    spec: ModelSpec  # config, input shape, classes, normalization
    epochs: int  # what the trial trained for at most
    seed: int
    recipe: Recipe  # how the trials trained over those epochs
    data: DataSettings
    val_acc: float
    tracking_uri: str
    run_id: str
    parent_run_id: str
    checkpoint_uri: str

    def to_json(self) -> dict[str, Any]:
        config = self.spec.config.to_dict()
        return {
            "schema_version": SCHEMA_VERSION,
            "space": self.space,
            "sweep": self.sweep,
            "experiment": self.experiment,
            "model": {
                **{name: config[name] for name in MODEL_FIELDS},
                "input_shape": list(self.spec.input_shape),
                "classes": list(self.spec.classes),
            },
            "optimizer": {name: config[name] for name in OPTIMIZER_FIELDS},
            "training": {
                **{name: config[name] for name in TRAINING_FIELDS},
                "epochs": self.epochs,
                "seed": self.seed,
                "recipe": self.recipe.to_record(),
            },
            "data": {
                **asdict(self.data),
                "normalization": {"mean": list(self.spec.mean), "std": list(self.spec.std)},
            },
            METRIC: self.val_acc,
            f"{METRIC}_interval_95": list(wilson_interval(self.val_acc, self.data.val_size)),
            "mlflow": {
                "tracking_uri": self.tracking_uri,
                "run_id": self.run_id,
                "parent_run_id": self.parent_run_id,
                "checkpoint_uri": self.checkpoint_uri,
            },
        }

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> BestTrial:
        version = values.get("schema_version")
        if version not in READABLE_VERSIONS:
            readable = ", ".join(map(str, READABLE_VERSIONS))
            raise InputError(f"schema_version {version!r} is not supported (this version reads {readable})")
        try:
            model, optimizer, training = values["model"], values["optimizer"], values["training"]
            config = {name: model[name] for name in MODEL_FIELDS}
            config.update({name: optimizer[name] for name in OPTIMIZER_FIELDS})
            config.update({name: training[name] for name in TRAINING_FIELDS})
            data = dict(values["data"])
            normalization = data.pop("normalization")
            spec = ModelSpec.from_dict(
                {
                    "config": config,
                    "input_shape": model["input_shape"],
                    "classes": model["classes"],
                    "normalization": normalization,
                }
            )
            return cls(
                space=str(values["space"]),
                sweep=str(values["sweep"]),
                experiment=str(values["experiment"]),
                spec=spec,
                epochs=int(training["epochs"]),
                seed=int(training["seed"]),
                # Version 1 recorded the schedule alone, of the assignment's training.
                recipe=Recipe.from_record(training.get("recipe") or {"schedule": training.get("schedule")}),
                data=DataSettings(**data),
                val_acc=float(values[METRIC]),
                tracking_uri=str(values["mlflow"]["tracking_uri"]),
                run_id=str(values["mlflow"]["run_id"]),
                parent_run_id=str(values["mlflow"]["parent_run_id"]),
                checkpoint_uri=str(values["mlflow"]["checkpoint_uri"]),
            )
        except KeyError as error:
            raise InputError(f"missing key {error.args[0]!r}") from None
        except TypeError as error:
            raise InputError(f"malformed value: {error}") from None


def best_trial(client: MlflowClient, parent: Run, children: list[Run]) -> BestTrial:
    """What best.json holds for a sweep: its best trial's model, training settings and MLflow runs."""
    best = best_child_run(children)
    sweep_name = parent.data.tags[SWEEP_TAG]
    if best is None:
        raise InputError(f"no trial of sweep {sweep_name} has a best checkpoint: {why_no_best(children)}")
    settings = load_json_artifact(client, parent.info.run_id, SWEEP_SETTINGS_ARTIFACT)
    spec = ModelSpec.from_dict(
        load_json_artifact(client, best.info.run_id, f"{CHECKPOINT_ARTIFACT}/{SPEC_FILE}")
    )
    data = DataSettings(
        **{key[len("data_") :]: value for key, value in settings.items() if key.startswith("data_")}
    )
    return BestTrial(
        space=parent.data.tags[SPACE_TAG],
        sweep=sweep_name,
        experiment=client.get_experiment(parent.info.experiment_id).name,
        spec=spec,
        epochs=int(settings["epochs"]),
        seed=int(settings["seed"]),
        recipe=Recipe.from_params(settings),
        data=data,
        val_acc=best.data.metrics[BEST_METRIC],
        tracking_uri=client.tracking_uri,
        run_id=best.info.run_id,
        parent_run_id=parent.info.run_id,
        checkpoint_uri=f"runs:/{best.info.run_id}/{CHECKPOINT_ARTIFACT}",
    )


def why_no_best(children: list[Run]) -> str:
    """In words, why no trial has a best checkpoint: none ran, all diverged, failed, or were stopped."""
    if not children:
        return "no trial has started"
    diverged = sum(map(is_diverged, children))
    if diverged == len(children):
        return f"all {diverged} diverged (their loss stopped being finite): try lower learning rates"
    counts = status_counts(children)
    said = ", ".join(f"{count} {status.lower()}" for status, count in sorted(counts.items()))
    return f"none finished an epoch ({said}{f', {diverged} diverged' if diverged else ''})"


def write_best(best: BestTrial, path: Path) -> None:
    path.write_text(json.dumps(best.to_json(), indent=2) + "\n")


def read_best(path: Path) -> BestTrial:
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(values, dict):
        raise InputError(f"{path} does not hold a JSON object")
    try:
        return BestTrial.from_json(values)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
