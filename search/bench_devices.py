"""What `search.bench` times inside one process: epochs of the project's loop, and stacked trials.

Kept apart from the command so that each measurement reads as one function.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, stack_module_state, vmap

from trainables.checkpoint import ModelSpec
from trainables.config import TrialConfig
from trainables.data import ImageSplits
from trainables.loop import Acceleration, GraphedStep, Normalizer, Training, batch_order, place_images

PART_IV = TrialConfig()  # the defaults are the assignment's Part IV settings


def part_iv_spec(splits: ImageSplits, config: TrialConfig = PART_IV) -> ModelSpec:
    return ModelSpec(config, splits.input_shape, splits.classes, splits.mean, splits.std)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(
    splits: ImageSplits, device: torch.device, acceleration: Acceleration, epochs: int, seed: int = 0
) -> list[float]:
    """Wall seconds of each of `epochs` epochs of one Part IV training, from building it on."""
    seconds = []
    started = time.perf_counter()
    training = Training(part_iv_spec(splits), splits, seed, device, acceleration)
    for epoch in range(1, epochs + 1):
        training.train_epoch(epoch)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
    return seconds


# The CUDA variants the benchmark compares: each of the fast path's parts switched off alone.
CUDA_VARIANTS = {
    "eager_fp32": Acceleration(precision="fp32", cuda_graphs=False),
    "eager_bf16": Acceleration(precision="bf16", cuda_graphs=False),
    "graphed_fp32": Acceleration(precision="fp32"),
    "graphed_bf16": Acceleration(precision="bf16"),
    "graphed_bf16_no_channels_last": Acceleration(precision="bf16", channels_last=False),
    "graphed_bf16_no_cudnn_benchmark": Acceleration(precision="bf16", cudnn_benchmark=False),
}


@dataclass
class VariantTiming:
    first_epoch_s: float  # building the training, cuDNN's tuning and the graph's capture included
    epoch_s: float  # the fastest later epoch
    images_per_s: float  # of that epoch


def time_variant(splits: ImageSplits, device: torch.device, acceleration: Acceleration) -> VariantTiming:
    first, *later = epoch_seconds(splits, device, acceleration, epochs=3)
    return VariantTiming(first, min(later), len(splits.train_labels) / min(later))


def gpu_memory_used_bytes() -> int | None:
    """The GPU's memory in use, all processes, as nvidia-smi reports it; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    answer = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(answer.stdout.split()[0]) * 2**20 if answer.returncode == 0 else None


class StackedTrials:
    """K Part IV trials trained as one: `vmap` over their stacked weights, one shared batch.

    The sweep's trials share a seed, so they see the same batches; only their
    weights and hyperparameters differ. Each has its own learning rate here,
    spread around Part IV's, so the stack does what K different trials would.
    """

    def __init__(self, splits: ImageSplits, device: torch.device, count: int, precision: str) -> None:
        spec = part_iv_spec(splits)
        models = [spec.build(seed=index, device=device) for index in range(count)]
        params, _ = stack_module_state(models)
        self.params = {name: value.detach() for name, value in params.items()}
        self.momentum = {name: torch.zeros_like(value) for name, value in self.params.items()}
        self.lr = PART_IV.lr * torch.logspace(-0.5, 0.5, count, device=device)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.images = place_images(splits.train_images, device)
        self.labels = splits.train_labels.to(device)
        self.normalize = Normalizer(splits.mean, splits.std, device)
        self.device, self.count, self.precision = device, count, precision
        self.gradients = vmap(grad(self._loss), in_dims=(0, None, None))

    def _loss(self, params: dict[str, Tensor], images: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(self.device.type, torch.bfloat16, self.precision == "bf16", cache_enabled=False):
            scores = functional_call(self.base, params, (images,))
        return F.cross_entropy(scores.float(), labels)

    def step(self, batch: Tensor) -> None:
        """Nesterov SGD with weight decay, each trial at its own learning rate."""
        gradients = self.gradients(self.params, self.normalize(self.images[batch]), self.labels[batch])
        momentum, decay = PART_IV.momentum, PART_IV.weight_decay
        with torch.no_grad():
            for name, weight in self.params.items():
                direction = gradients[name].add(weight, alpha=decay)
                buffer = self.momentum[name].mul_(momentum).add_(direction)
                lr = self.lr.view(-1, *[1] * (weight.dim() - 1))
                weight.sub_(lr * direction.add(buffer, alpha=momentum))

    def images_per_s(self, steps: int, graphs: bool) -> float:
        """Images a second, all K trials together, over `steps` steps after a warm-up."""
        runner = GraphedStep(self.step, PART_IV.batch_size, self.device) if graphs else None
        order = torch.randperm(len(self.labels), generator=batch_order(0, 1)).to(self.device)
        size = PART_IV.batch_size
        batches = [order[start : start + size] for start in range(0, len(order) - size + 1, size)]
        run = runner.step if runner is not None else self.step
        for batch in batches[:5]:  # warm-up (and the graph's capture)
            run(batch)
        synchronize(self.device)
        started = time.perf_counter()
        for index in range(steps):
            run(batches[index % len(batches)])
        synchronize(self.device)
        return self.count * steps * PART_IV.batch_size / (time.perf_counter() - started)
