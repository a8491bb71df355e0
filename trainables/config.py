"""The one definition of a trial's config, of the data settings, and of the metric a sweep optimizes.

Search spaces produce it, the trainable consumes it, checkpoints and exports
store it. Unknown keys and out-of-range values are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainables.errors import InputError

MODEL_STYLES = ("barebones", "module", "sequential")
# Arithmetic of a trial's model: auto is bf16 where the hardware computes in bf16 natively.
PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("sgd", "nesterov")


@dataclass(frozen=True)
class TrialConfig:
    """Everything that builds and trains one convnet. Defaults: the assignment's Part IV."""

    model: str = "sequential"  # barebones | module | sequential
    optimizer: str = "nesterov"  # sgd | nesterov; barebones always takes a hand-written SGD step
    lr: float = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.5  # used by nesterov only
    channel_1: int = 32  # filters of the first conv
    channel_2: int = 16  # filters of the second conv
    kernel_1: int = 5  # odd sizes, so "same" padding keeps 32x32
    kernel_2: int = 3
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.model not in MODEL_STYLES:
            raise InputError(f"model must be one of {', '.join(MODEL_STYLES)}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.model == "barebones" and self.optimizer != "sgd":
            raise InputError("the barebones model trains with plain SGD only")
        _require(self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer == "nesterov":
            _require(self.momentum > 0, "nesterov needs momentum > 0")
        for name in ("channel_1", "channel_2", "batch_size"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kernel_1", "kernel_2"):
            size = getattr(self, name)
            _require(size >= 1 and size % 2 == 1, f"{name} must be odd and >= 1, got {size}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrialConfig:
        known = {field.name: field.type for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(f"unknown config keys: {', '.join(unknown)}")
        typed: dict[str, Any] = {}
        for name, value in values.items():
            kind = {"str": str, "float": float, "int": int}[known[name]]
            if kind is not str and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise InputError(f"config key {name} must be a number, got {value!r}")
            if kind is int and value != int(value):
                raise InputError(f"config key {name} must be a whole number, got {value!r}")
            typed[name] = kind(value)
        return cls(**typed)

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> TrialConfig:
        """From MLflow params, which come back as strings; keys that are not config fields are ignored."""
        kinds = {
            field.name: {"str": str, "float": float, "int": int}[field.type]
            for field in dataclasses.fields(cls)
        }
        try:
            return cls(**{name: kinds[name](value) for name, value in params.items() if name in kinds})
        except ValueError as error:
            raise InputError(f"config params do not parse: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


CIFAR10 = "cifar10"  # --data's default: torchvision's download, instead of a folder


@dataclass(frozen=True)
class DataSettings:
    """Where the images come from and how they are split."""

    source: str = CIFAR10  # "cifar10", or a folder holding train/<class>/* (and test/<class>/*)
    root: str = "data"  # where CIFAR-10 is downloaded and decoded folders are cached
    val_size: int = 1000  # validation images held out of the training split (a sweep needs some)
    max_train_images: int | None = None  # train on fewer images, for quick runs
    seed: int = 0  # fixes the split

    def __post_init__(self) -> None:
        if self.val_size < 0:
            raise InputError(f"the validation set cannot have {self.val_size} images")
        if self.max_train_images is not None and self.max_train_images < 1:
            raise InputError(f"the training set needs at least 1 image, got {self.max_train_images}")


# In a Tune trial's config beside the TrialConfig's keys: marks a sweep's final trial, which trains
# the best config of the search to the end (search.sweep.searcher); its value is the Tune trial id
# of the trial whose config it is.
FINAL_OF = "final_of"


def trial_config(values: Mapping[str, Any]) -> tuple[TrialConfig, str | None]:
    """A Tune trial's config: the TrialConfig, and for a final trial the trial it trains on."""
    values = dict(values)
    final_of = values.pop(FINAL_OF, None)
    return TrialConfig.from_dict(values), None if final_of is None else str(final_of)
