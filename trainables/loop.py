"""Train one epoch and evaluate: plain functions, no Ray and no MLflow.

The images stay uint8 on the model's device; each batch is picked by a
device-side permutation and normalized there, so there are no DataLoader
workers and no per-image Python work.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.model import ConvNet, Optimizer

# Checking the loss costs a host sync; every few steps is soon enough to stop a diverged run.
DIVERGENCE_CHECK_STEPS = 25


@dataclass(frozen=True)
class EpochResult:
    loss: float  # mean cross-entropy per image; inf or nan when training diverged
    accuracy: float
    images_per_s: float
    seconds: float  # wall time of the pass

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.loss)


def place_images(images: Tensor, device: torch.device) -> Tensor:
    """A split's uint8 images on the device, once, in the channels-last layout the models use."""
    return images.to(device).contiguous(memory_format=torch.channels_last)


def batch_order(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's batch order: a resumed run sees the batches it would have seen."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class Normalizer:
    """uint8 images to normalized floats, as one fused multiply-add on the device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        std_tensor = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_tensor)
        self.shift = -torch.tensor(mean, device=device).view(1, -1, 1, 1) / std_tensor

    def __call__(self, images: Tensor) -> Tensor:
        return torch.addcmul(self.shift, images.float(), self.scale)


def train_epoch(
    model: ConvNet,
    optimizer: Optimizer,
    images: Tensor,
    labels: Tensor,
    normalize: Normalizer,
    batch_size: int,
    generator: torch.Generator,
) -> EpochResult:
    """One pass over the images in a random order drawn from the generator.

    Stops early when the loss is no longer finite: more steps would only
    spread NaN through the weights.
    """
    model.train()
    started = time.perf_counter()
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    seen = 0
    for step, start in enumerate(range(0, len(order), batch_size), start=1):
        batch = order[start : start + batch_size]
        batch_labels = labels[batch]
        scores = model(normalize(images[batch]))
        loss = F.cross_entropy(scores, batch_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(batch)
        correct += (scores.detach().argmax(dim=1) == batch_labels).sum()
        seen += len(batch)
        if step % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(loss_sum):
            break
    return _result(loss_sum, correct, seen, started)


@torch.no_grad()
def evaluate(
    model: ConvNet, images: Tensor, labels: Tensor, normalize: Normalizer, batch_size: int = 1000
) -> EpochResult:
    model.eval()
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start : start + batch_size]
        scores = model(normalize(images[start : start + batch_size]))
        loss_sum += F.cross_entropy(scores, batch_labels, reduction="sum")
        correct += (scores.argmax(dim=1) == batch_labels).sum()
    return _result(loss_sum, correct, len(labels), started)


def _result(loss_sum: Tensor, correct: Tensor, seen: int, started: float) -> EpochResult:
    loss, hits = loss_sum.item(), correct.item()  # the one host sync of the pass
    elapsed = time.perf_counter() - started
    return EpochResult(loss=loss / seen, accuracy=hits / seen, images_per_s=seen / elapsed, seconds=elapsed)
