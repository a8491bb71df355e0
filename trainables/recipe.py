"""How a config is trained, as opposed to what it is: the learning rate over time, augmentation,
label smoothing and an average of the weights. Plain Python: no torch, Ray or MLflow.

A recipe is named (`RECIPES`) and its parts can be changed one by one. The sweep's trials and
the retrain of its best train with the same recipe, recorded with the sweep and in best.json:
- assignment: the assignment's training (no augmentation, no label smoothing), one cycle over
  the budget, peaking at the config's learning rate; `schedule="constant"` is the assignment's own
  constant rate;
- long: what a final model trains with: random crops and flips, label smoothing, and a
  warm-up-stable-decay schedule whose peak is the config's learning rate, searched by the sweep.

The tensor work of the parts is in trainables.augment.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainables.errors import InputError

# The learning rate over a run: constant; onecycle, a warm-up then a cosine decay to 0; wsd, a
# warm-up, a stable stretch at the peak, then a linear decay to 0.
SCHEDULES = ("constant", "onecycle", "wsd")


@dataclass(frozen=True)
class Recipe:
    name: str = "assignment"  # the named recipe (RECIPES) it was made from, parts changed or not
    schedule: str = "onecycle"  # one of SCHEDULES
    peak_lr_factor: float = 1.0  # the peak learning rate, as a multiple of the config's
    # The most the peak may be as an effective step, lr / (1 - momentum): a config whose one-epoch
    # step was already large is not multiplied into the steps where training falls apart.
    max_effective_step: float | None = None
    warmup_fraction: float = 0.15  # of all steps, for the warm-up of onecycle and wsd
    decay_fraction: float = 0.2  # of all steps, for the final decay of wsd
    augment: bool = False  # a random crop of the padded image, and a horizontal flip
    crop_padding: int = 2  # pixels of zeros around the image to crop from; 0: flips only
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # an exponential average of the weights, evaluated and kept

    def __post_init__(self) -> None:
        if self.name not in RECIPE_NAMES:
            raise InputError(f"recipe must be one of {', '.join(RECIPE_NAMES)}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (self.peak_lr_factor > 0 and math.isfinite(self.peak_lr_factor)):
            raise InputError(f"the peak learning rate factor must be > 0, got {self.peak_lr_factor}")
        if self.max_effective_step is not None and not self.max_effective_step > 0:
            raise InputError(f"the largest effective step must be > 0, got {self.max_effective_step}")
        if not 0 <= self.warmup_fraction < 1:
            raise InputError(f"the warm-up fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.decay_fraction < 1:
            raise InputError(f"the decay fraction must be in (0, 1), got {self.decay_fraction}")
        if self.schedule == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            raise InputError(
                "the warm-up and the decay of wsd must fit in the run (their fractions sum to > 1)"
            )
        if self.crop_padding < 0:
            raise InputError(f"the crop padding must be >= 0 pixels, got {self.crop_padding}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise InputError(f"the weight average's decay must be in (0, 1), got {self.ema_decay}")

    def peak_lr(self, config_lr: float, momentum: float) -> float:
        """The highest learning rate of the run, from the config's."""
        peak = config_lr * self.peak_lr_factor
        if self.max_effective_step is not None:
            peak = min(peak, self.max_effective_step * (1 - momentum))
        return peak

    def learning_rate(self, peak: float, step: int, total_steps: int) -> float:
        """The learning rate of a step (from 0) out of total_steps, for a run that peaks at `peak`."""
        if self.schedule == "constant":
            return peak
        warmup = max(1, round(self.warmup_fraction * total_steps))
        if step < warmup:
            return peak * (step + 1) / warmup
        if self.schedule == "wsd":
            decay_start = self.decay_start(total_steps)
            if step < decay_start:
                return peak
            return decayed(peak, step - decay_start, total_steps - decay_start)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def decay_start(self, total_steps: int) -> int:
        """The step where wsd's final decay begins: the stable stretch ends there."""
        return round((1 - self.decay_fraction) * total_steps)

    def branch_steps(self, stable_steps: int) -> int:
        """The decay that scores a wsd run after `stable_steps`: as long as the final decay of a run
        whose stable stretch ended there, so every point is scored as the end of a run of its own."""
        return max(1, round(self.decay_fraction / (1 - self.decay_fraction) * stable_steps))

    def scoring_images(self, points: list[int], total_images: int) -> int:
        """The images the scoring decays at these points train on, beyond the run's own (wsd only)."""
        if self.schedule != "wsd":
            return 0
        stable = [point for point in points if point < (1 - self.decay_fraction) * total_images]
        return round(sum(self.decay_fraction / (1 - self.decay_fraction) * point for point in stable))

    def to_record(self) -> dict[str, Any]:
        """Every part, by name: what a sweep, best.json and a retrain run record."""
        return dataclasses.asdict(self)

    def as_params(self) -> dict[str, Any]:
        """The parts as MLflow params, `recipe_<part>`: a run's recipe, filterable in the UI."""
        return {f"{PARAM_PREFIX}{part}": value for part, value in self.to_record().items()}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Recipe:
        """The recipe `as_params` recorded; a run from before recipes has only a `schedule` param."""
        parts = {
            name[len(PARAM_PREFIX) :]: value
            for name, value in params.items()
            if name.startswith(PARAM_PREFIX)
        }
        if not parts and "schedule" in params:
            parts = {"schedule": params["schedule"]}
        return cls.from_record(parts)

    @classmethod
    def from_record(cls, values: Mapping[str, Any]) -> Recipe:
        """From `to_record`'s dict, or MLflow params of it (strings). A record from before recipes
        holds only a schedule: the assignment's training at that schedule (constant, if none)."""
        if "name" not in values:
            return cls(schedule=str(values.get("schedule") or UNRECORDED_SCHEDULE))
        parts: dict[str, Any] = {}
        for part in dataclasses.fields(cls):
            if part.name not in values:
                continue
            parts[part.name] = _typed(part.type, values[part.name], part.name)
        return cls(**parts)


def _typed(kind: Any, value: Any, name: str) -> Any:
    """A part's value from a record, where MLflow gives every param back as a string."""
    if value is None or value == "None":
        return None
    try:
        if "bool" in str(kind):
            return value if isinstance(value, bool) else str(value) == "True"
        if "int" in str(kind):
            return int(value)
        if "float" in str(kind):
            return float(value)
    except ValueError:
        raise InputError(f"recipe part {name} does not parse: {value!r}") from None
    return str(value)


def decayed(start_lr: float, step: int, steps: int) -> float:
    """A linear decay from start_lr to 0 over `steps`: the rate of its `step` (from 0)."""
    return start_lr * (steps - step) / steps


PARAM_PREFIX = "recipe_"
PARTS = tuple(part.name for part in dataclasses.fields(Recipe) if part.name != "name")  # each a flag
UNRECORDED_SCHEDULE = "constant"  # what a sweep recorded before --schedule existed trained at
RECIPE_NAMES = ("assignment", "long")

# One cycle anneals a trial that trains to the end, so its score is that of a finished model, not
# of one still taking large steps: in one-epoch audits (README) it lifted configs 3-7 points over
# the assignment's constant rate.
ASSIGNMENT = Recipe(name="assignment", schedule="onecycle")
AS_THE_ASSIGNMENT_TRAINED = dataclasses.replace(ASSIGNMENT, schedule="constant")  # its own constant rate

# Crops of a 2-pixel padding and flips, and label smoothing: measured on a holdout of the training
# images in 10-epoch runs (README: crops of 4 pixels 69%, of 2 pixels 70%, flips alone 66%; this
# model has no pooling, so large shifts are hard for it). The schedule, wsd, and its parts were
# chosen by the fidelity measurement (README, *How a sweep at the final budget searches*): a
# decay branched off the stable stretch scores a trial at a rung as the run it would be.
LONG = Recipe(
    name="long",
    schedule="wsd",
    warmup_fraction=0.05,
    decay_fraction=0.2,
    augment=True,
    crop_padding=2,
    label_smoothing=0.1,
)
RECIPES = {recipe.name: recipe for recipe in (ASSIGNMENT, LONG)}

# A config searched under another recipe but trained with the long one: its learning rate was
# the best peak of a one-epoch run, and a long run takes a higher peak. Calibrated on 2026-12-01 on a
# holdout (README), with one cycle warming up over 15% of the run: x1, x2, x4, x8 trained to 66%,
# 68%, 69%, 48% in 10 epochs (x4 was an effective step of 0.11, x8 one of 0.22), hence x4 at most an
# effective step of 0.12. So such a retrain trains the long run exactly as calibrated.
LONG_FROM_ANOTHER_RECIPE = {
    "schedule": "onecycle",
    "warmup_fraction": 0.15,
    "peak_lr_factor": 4.0,
    "max_effective_step": 0.12,
}


def recipe_named(name: str, searched_under: Recipe) -> Recipe:
    """The named recipe for a config searched under `searched_under`: the long recipe, for a config
    whose learning rate was not searched under it, is the long run as calibrated for such configs."""
    recipe = RECIPES[name]
    if name == "long" and searched_under.name != "long":
        recipe = dataclasses.replace(recipe, **LONG_FROM_ANOTHER_RECIPE)
    return recipe
