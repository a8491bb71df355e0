"""The tensor work of a recipe's parts: crops and flips batched on the device, a weight average.

Apart from trainables.recipe, which is plain Python, so that the commands can parse and check a
recipe before they load torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
