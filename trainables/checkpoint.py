"""Checkpoints plain PyTorch can read: tensors in checkpoint.pt, the recipe in model.json.

checkpoint.pt holds only tensors and numbers, so `torch.load(..., weights_only=True)`
reads it; model.json holds what rebuilds the model (config, input shape,
classes, normalization). Loading never unpickles code and checks every tensor
shape against the model the recipe builds.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainables.config import TrialConfig
from trainables.errors import InputError, first_line
from trainables.model import ConvNet, Optimizer, as_module, build_model
from trainables.names import CHECKPOINT_FILE, SPEC_FILE


@dataclass(frozen=True)
class ModelSpec:
    """A trial's config plus what the data fixed: enough to rebuild and feed the model."""

    config: TrialConfig
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def build(self, seed: int = 0, device: torch.device | str = "cpu") -> ConvNet:
        return build_model(self.config, self.input_shape, self.num_classes, seed, device)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "input_shape": list(self.input_shape),
            "classes": list(self.classes),
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        try:
            return cls(
                config=TrialConfig.from_dict(values["config"]),
                input_shape=tuple(int(size) for size in values["input_shape"]),  # type: ignore[arg-type]
                classes=tuple(str(name) for name in values["classes"]),
                mean=tuple(float(v) for v in values["normalization"]["mean"]),
                std=tuple(float(v) for v in values["normalization"]["std"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"model description is incomplete or malformed: {error!r}") from None


def save_checkpoint(
    directory: Path,
    spec: ModelSpec,
    model: ConvNet,
    optimizer: Optimizer,
    epoch: int,
    seconds_trained: float = 0.0,
    images_trained: int = 0,
    scored_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """`scored_state`: the weights whose validation the checkpoint's report gave, where they are not
    the run's own (a wsd run scored after a decay branch); the run's own go on from `model`."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": int(epoch),
        "seconds_trained": float(seconds_trained),
        "images_trained": int(images_trained),
    }
    if scored_state is not None:
        state["scored_model"] = scored_state
    torch.save(state, directory / CHECKPOINT_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))


@dataclass
class LoadedCheckpoint:
    spec: ModelSpec
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    epoch: int
    seconds_trained: float  # training and validation up to this checkpoint, across resumes
    images_trained: int  # every image trained on up to it, scoring decays too (0: not recorded)
    scored_state: dict[str, torch.Tensor]  # the weights that scored its report: the model's, or a decay's


def load_checkpoint(directory: Path) -> LoadedCheckpoint:
    """Reads a checkpoint safely: tensors only, shapes checked against its own model.json."""
    try:
        spec = ModelSpec.from_dict(json.loads((directory / SPEC_FILE).read_text()))
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read {directory / SPEC_FILE}: {error}") from None
    path = directory / CHECKPOINT_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(f"refusing {path}: it holds more than tensors ({first_line(error)})") from None
    except (OSError, RuntimeError, EOFError) as error:
        raise InputError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch"} <= set(state):
        raise InputError(f"{path} is not a checkpoint of this project")
    # Checkpoints written before the training time was kept in them have none: 0 seconds.
    epoch, seconds_trained = state["epoch"], state.get("seconds_trained", 0.0)
    images_trained = state.get("images_trained", 0)
    numbers = (epoch, seconds_trained, images_trained)
    if not all(isinstance(number, (int, float)) for number in numbers) or not float(epoch).is_integer():
        raise InputError(f"{path} is not a checkpoint of this project")
    scored = state.get("scored_model", state["model"])
    check_shapes(state["model"], spec)
    check_shapes(scored, spec)
    return LoadedCheckpoint(
        spec,
        state["model"],
        state["optimizer"],
        int(epoch),
        float(seconds_trained),
        int(images_trained),
        scored,
    )


def scored_module(checkpoint: LoadedCheckpoint) -> nn.Module:
    """The model that scored the checkpoint's report, as an fp32 nn.Module on the CPU, for MLflow."""
    spec = checkpoint.spec
    model = spec.build()
    model.load_state_dict(checkpoint.scored_state)
    return as_module(model, spec.config, spec.input_shape, spec.num_classes).cpu().float().eval()


def check_shapes(model_state: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    expected = {name: tuple(t.shape) for name, t in spec.build().state_dict().items()}
    found = {name: tuple(t.shape) for name, t in model_state.items()}
    if set(found) != set(expected):
        raise InputError(f"checkpoint tensors {sorted(found)} do not match the model's {sorted(expected)}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise InputError(
                f"checkpoint tensor {name} has shape {list(found[name])}, but its config builds {list(shape)}"
            )
