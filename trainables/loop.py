"""One trial's training, epoch after epoch: plain PyTorch, no Ray and no MLflow.

`Training` is the one training path: the Tune trainable, retrain and the
benchmark all build one. It puts the model, the optimizer and the uint8 images
on the device once; each batch is picked by a device-side permutation and
normalized there, so there are no DataLoader workers and no per-image Python.

How fast it runs is set apart from what it trains, in `Acceleration`: bf16
autocast where the device does bf16 natively, the channels-last layout, and on
CUDA a training step captured once as a CUDA graph and replayed for every full
batch (an eager step on this model is bound by kernel launches, not arithmetic).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.checkpoint import LoadedCheckpoint, ModelSpec, save_checkpoint
from trainables.config import PRECISIONS
from trainables.data import ImageSplits
from trainables.errors import InputError
from trainables.model import build_optimizer

# Checking the loss costs a host sync; every few steps is soon enough to stop a diverged run.
DIVERGENCE_CHECK_STEPS = 25
# Eager steps before a CUDA graph is captured: cuDNN picks its kernels, the optimizer makes its
# momentum buffers, and autograd sets itself up, none of which may happen during a capture.
GRAPH_WARMUP_STEPS = 3
EVAL_BATCH = 1000


@dataclass(frozen=True)
class Acceleration:
    """How a trial runs on its device. None of it changes what is trained, only how fast."""

    precision: str = "auto"  # one of PRECISIONS; auto: bf16 where the device has it natively
    channels_last: bool = True  # measured on CPU: +10% a thread, +23% with two
    cuda_graphs: bool = True  # CUDA only: capture a full-batch step once, replay it
    cudnn_benchmark: bool = True  # CUDA only: cuDNN times its kernels once per shape

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 or bf16: auto becomes bf16 only where the hardware computes in bf16 natively."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, from Linux's /proc/cpuinfo; none elsewhere (so auto means fp32)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@dataclass(frozen=True)
class EpochResult:
    loss: float  # mean cross-entropy per image; inf or nan when training diverged
    accuracy: float
    images_per_s: float
    seconds: float  # wall time of the pass

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.loss)


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train: EpochResult
    val: EpochResult  # the training result itself when training diverged: there is nothing to validate

    @property
    def diverged(self) -> bool:
        return self.val.diverged


def place_images(images: Tensor, device: torch.device, channels_last: bool = True) -> Tensor:
    """A split's uint8 images on the device, once, in the layout the models use."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device).contiguous(memory_format=layout)


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


class Training:
    """A model, its optimizer and its images on one device; `epochs` trains them.

    The seed fixes the initial weights and every epoch's batch order, so a run
    resumed from a checkpoint sees the batches it would have seen.
    """

    def __init__(
        self,
        spec: ModelSpec,
        splits: ImageSplits,
        seed: int,
        device: torch.device,
        acceleration: Acceleration = Acceleration(),
    ) -> None:
        self.spec, self.seed, self.device = spec, seed, device
        self.precision = resolve_precision(acceleration.precision, device)
        self.batch_size = spec.config.batch_size
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = acceleration.cudnn_benchmark
        self.model = spec.build(seed=seed, device=device, channels_last=acceleration.channels_last)
        self.optimizer = build_optimizer(self.model, spec.config)
        self.normalize = Normalizer(spec.mean, spec.std, device)
        self.train_images = place_images(splits.train_images, device, acceleration.channels_last)
        self.train_labels = splits.train_labels.to(device)
        self.val_images = place_images(splits.val_images, device, acceleration.channels_last)
        self.val_labels = splits.val_labels.to(device)
        self.channels_last = acceleration.channels_last
        # Running sums of one epoch, kept on the device (a captured graph adds to these very tensors).
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.graph = None
        if acceleration.cuda_graphs and device.type == "cuda":
            self.graph = GraphedStep(self.step, self.batch_size, device)

    def load(self, checkpoint: LoadedCheckpoint) -> int:
        """Continues from a checkpoint (before the first epoch); returns the next epoch."""
        self.model.load_state_dict(checkpoint.model_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        return checkpoint.epoch + 1

    def save(self, directory: Path, epoch: int) -> None:
        save_checkpoint(directory, self.spec, self.model, self.optimizer, epoch)

    def epochs(self, first: int, last: int) -> Iterator[EpochReport]:
        """Trains and validates epochs first..last; a diverged epoch is the last one reported."""
        for epoch in range(first, last + 1):
            train = self.train_epoch(epoch)
            report = EpochReport(epoch, train, train if train.diverged else self.evaluate())
            yield report
            if report.diverged:
                return

    def train_epoch(self, epoch: int) -> EpochResult:
        """One pass over the training images in the epoch's order.

        Stops early when the loss is no longer finite: more steps would only
        spread NaN through the weights.
        """
        self.model.train()
        started = time.perf_counter()
        order = torch.randperm(len(self.train_labels), generator=batch_order(self.seed, epoch))
        order = order.to(self.device)
        self.loss_sum.zero_()
        self.correct.zero_()
        seen = 0
        for step, start in enumerate(range(0, len(order), self.batch_size), start=1):
            batch = order[start : start + self.batch_size]
            if self.graph is not None and len(batch) == self.batch_size:
                self.graph.step(batch)
            else:  # on CPU, and for the last, partial batch (a graph has one fixed shape)
                self.step(batch)
            seen += len(batch)
            if step % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(self.loss_sum):
                break
        return _result(self.loss_sum, self.correct, seen, started)

    def step(self, batch: Tensor) -> None:
        """One SGD step on the training images the index tensor picks, eagerly."""
        labels = self.train_labels[batch]
        with self.autocast():
            scores = self.model(self.normalize(self.train_images[batch]))
        loss = F.cross_entropy(scores.float(), labels)  # the loss in fp32 whatever the precision
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(batch)
        self.correct += (scores.detach().argmax(dim=1) == labels).sum()

    @torch.no_grad()
    def evaluate(self, images: Tensor | None = None, labels: Tensor | None = None) -> EpochResult:
        """Loss and accuracy on the validation images, or on the given (CPU, uint8) ones."""
        if images is None or labels is None:
            images, labels = self.val_images, self.val_labels
        else:
            images, labels = place_images(images, self.device, self.channels_last), labels.to(self.device)
        self.model.eval()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for start in range(0, len(labels), EVAL_BATCH):
            batch_labels = labels[start : start + EVAL_BATCH]
            with self.autocast():
                scores = self.model(self.normalize(images[start : start + EVAL_BATCH])).float()
            loss_sum += F.cross_entropy(scores, batch_labels, reduction="sum")
            correct += (scores.argmax(dim=1) == batch_labels).sum()
        return _result(loss_sum, correct, len(labels), started)

    def autocast(self) -> torch.autocast:
        """bf16 compute for the model's layers; master weights and optimizer stay fp32.

        The cast cache is off: each forward pass casts the weights once anyway, and
        a CUDA graph may not capture a cache that outlives it.
        """
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16", cache_enabled=False
        )


class GraphedStep:
    """A full-batch training step captured once as a CUDA graph, then replayed.

    The first GRAPH_WARMUP_STEPS calls run the step eagerly on a side stream (they
    are real steps); the next one is captured and every later one replays it, with
    the batch's indices copied into the graph's own index tensor. The step must
    update weights, momentum and sums in place, so the graph stays valid for good.
    """

    def __init__(self, step: Callable[[Tensor], None], batch_size: int, device: torch.device) -> None:
        self.eager_step = step
        self.index = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.warmups_left = GRAPH_WARMUP_STEPS
        # Warm-up and capture on one stream: the libraries' handles made in the warm-up are then
        # the ones the capture records.
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def step(self, batch: Tensor) -> None:
        if self.warmups_left > 0:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.eager_step(batch)
            torch.cuda.current_stream().wait_stream(self.stream)
            self.warmups_left -= 1
            return
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):  # records the step; nothing runs yet
                self.eager_step(self.index)
        self.index.copy_(batch)
        self.graph.replay()


def _result(loss_sum: Tensor, correct: Tensor, seen: int, started: float) -> EpochResult:
    loss, hits = loss_sum.item(), correct.item()  # the one host sync of the pass
    elapsed = time.perf_counter() - started
    return EpochResult(loss=loss / seen, accuracy=hits / seen, images_per_s=seen / elapsed, seconds=elapsed)
