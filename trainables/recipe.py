"""How a config is trained, as opposed to what it is: the learning rate over time, augmentation,
label smoothing and an average of the weights. Plain PyTorch, no Ray and no MLflow.

A sweep's trials train with `sweep_recipe`: by default one cycle over each trial's whole
budget, peaking at the config's learning rate (`--schedule constant` gives the assignment's
constant rate). A long retrain takes `LONG_RUN`, which a config's learning rate is the starting
point of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.config import SCHEDULES
from trainables.errors import InputError


@dataclass(frozen=True)
class Recipe:
    schedule: str = "constant"  # constant, or onecycle: a warm-up to the peak, then a cosine decay to 0
    peak_lr_factor: float = 1.0  # the peak learning rate, as a multiple of the config's
    # The most the peak may be as an effective step, lr / (1 - momentum): a config whose one-epoch
    # step was already large is not multiplied into the steps where training falls apart.
    max_effective_step: float | None = None
    warmup_fraction: float = 0.15  # of all steps, for the warm-up of onecycle
    augment: bool = False  # a random crop of the padded image, and a horizontal flip
    crop_padding: int = 4  # pixels of zeros around the image to crop from; 0: flips only
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # an exponential average of the weights, evaluated and kept

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (self.peak_lr_factor > 0 and math.isfinite(self.peak_lr_factor)):
            raise InputError(f"the peak learning rate factor must be > 0, got {self.peak_lr_factor}")
        if self.max_effective_step is not None and not self.max_effective_step > 0:
            raise InputError(f"the largest effective step must be > 0, got {self.max_effective_step}")
        if not 0 <= self.warmup_fraction < 1:
            raise InputError(f"the warm-up fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.crop_padding < 0:
            raise InputError(f"the crop padding must be >= 0 pixels, got {self.crop_padding}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise InputError(f"the weight average's decay must be in (0, 1), got {self.ema_decay}")

    def peak_lr(self, config_lr: float, momentum: float) -> float:
        """The highest learning rate of the run, from the config's (its best constant one-epoch rate)."""
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
        progress = (step - warmup) / max(1, total_steps - warmup)
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


ASSIGNMENT = Recipe()


def sweep_recipe(schedule: str) -> Recipe:
    """How a sweep trains each trial: `schedule` over all of the trial's budget (the sweep's --epochs),
    peaking at the config's learning rate, nothing else.

    One cycle anneals a trial that trains to the end, so its final score is that of a finished
    model and not of one still taking large steps; a trial stopped at a rung is judged mid-cycle,
    as is every other trial at that rung. In one-epoch audits (README) it lifted the same configs
    by 3-7 points over the constant rate.
    """
    return Recipe(schedule=schedule)


# Measured on a holdout of the training images (see the README): one cycle peaking at 4 times the
# config's rate (x1, x2, x4, x8 trained to 66%, 68%, 69%, 48% in 10 epochs; x4 there was an effective
# step of 0.11, x8 one of 0.22), flips and crops of a 2-pixel padding (4 pixels: 69%, 2: 70%, flips
# alone: 66%; this model has no pooling, so large shifts are hard for it), label smoothing. A weight
# average did not help.
LONG_RUN = Recipe(
    schedule="onecycle",
    peak_lr_factor=4.0,
    max_effective_step=0.12,
    augment=True,
    crop_padding=2,
    label_smoothing=0.1,
)


def augment(images: Tensor, generator: torch.Generator, padding: int) -> Tensor:
    """Random crops of the images padded with zeros, half of them flipped: one batched gather on the
    images' device, no per-image Python. uint8 in, uint8 out."""
    count, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    top = torch.randint(0, 2 * padding + 1, (count,), generator=generator).to(device)
    left = torch.randint(0, 2 * padding + 1, (count,), generator=generator).to(device)
    flip = torch.rand(count, generator=generator).to(device) < 0.5
    columns = torch.arange(width, device=device)
    columns = torch.where(flip[:, None], width - 1 - columns, columns)  # a flip is a reversed column order
    rows = top[:, None] + torch.arange(height, device=device)
    columns = left[:, None] + columns
    picked = padded[
        torch.arange(count, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]
    return picked.contiguous(memory_format=torch.channels_last)


class WeightAverage:
    """An exponential moving average of the model's weights, updated after every step."""

    def __init__(self, state: dict[str, Tensor], decay: float) -> None:
        self.decay = decay
        self.average = {name: value.detach().clone() for name, value in state.items()}

    @torch.no_grad()
    def update(self, state: dict[str, Tensor]) -> None:
        for name, value in state.items():
            self.average[name].lerp_(value.detach(), 1 - self.decay)
