"""One trial's training, epoch after epoch: plain PyTorch, no Ray and no MLflow.

`Training` is the one training path: the Tune trainable, retrain and the
benchmark all build one. It puts the model, the optimizer and the uint8 images
on the device once; each batch is picked by a device-side permutation and
normalized there, so there are no DataLoader workers and no per-image Python.

Its precision is set apart from what it trains: bf16 autocast where the device
does bf16 natively, with fp32 master weights, optimizer and loss.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import math
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.augment import WeightAverage, augment
from trainables.checkpoint import LoadedCheckpoint, ModelSpec, save_checkpoint
from trainables.config import PRECISIONS
from trainables.data import ImageSplits
from trainables.errors import InputError
from trainables.model import build_optimizer, set_learning_rate
from trainables.recipe import AS_THE_ASSIGNMENT_TRAINED, Recipe, decayed

# Checking the loss costs a host sync; every few steps is soon enough to stop a diverged run.
DIVERGENCE_CHECK_STEPS = 25
EVAL_BATCH = 1000
# glibc's mallopt parameters (malloc.h), and the most it takes for the mmap threshold on 64 bits.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 32 * 2**20


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 or bf16: auto becomes bf16 only where the hardware computes in bf16 natively."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def keep_freed_memory() -> None:
    """Asks glibc's allocator to keep the large blocks a training step frees, for the next step.

    By default it hands blocks over 128 kB back to the OS when freed and maps them again
    on the next step, a page fault per page touched, every step: measured on CPU, a
    process's first bf16 training ran 35% slower (fp32: 20%) until its heap had grown by
    chance. Once per process; elsewhere than glibc, nothing to do.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
        libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)


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
class Report:
    """Where training stands at a report: how far it has trained, and how it did since the last one."""

    images_seen: int  # in all, across epochs
    epoch: float  # the same in epochs: whole at an epoch's end
    train: EpochResult  # over the images since the last report
    val: EpochResult | None  # None without validation images, or when training diverged
    # The weights that scored `val`, where they are not the run's own: a wsd run scored at a point
    # of its stable stretch is scored after a decay that branched off there (Training.reports).
    scored_state: dict[str, Tensor] | None = None

    @property
    def diverged(self) -> bool:
        return self.train.diverged or (self.val is not None and self.val.diverged)

    @property
    def seconds(self) -> float:
        """Training and validation: the time the report's stretch took."""
        return self.train.seconds + (self.val.seconds if self.val is not None else 0.0)

    @property
    def at_epoch_end(self) -> bool:
        return self.epoch == int(self.epoch)


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


class Training:
    """A model, its optimizer and its images on one device; `epochs` and `reports` train them.

    The seed fixes the initial weights and every epoch's batch order, so a run
    resumed from a checkpoint sees the batches it would have seen. Training can
    stop and report anywhere in an epoch (a scheduler decides after a ninth of
    one, say) and go on from there.
    """

    def __init__(
        self,
        spec: ModelSpec,
        splits: ImageSplits,
        seed: int,
        device: torch.device,
        precision: str = "auto",
        recipe: Recipe = AS_THE_ASSIGNMENT_TRAINED,
        epochs: int = 1,  # all the training ahead, for a recipe's learning-rate schedule
    ) -> None:
        self.spec, self.seed, self.device, self.recipe = spec, seed, device, recipe
        self.precision = resolve_precision(precision, device)
        if device.type == "cpu":
            keep_freed_memory()
        self.batch_size = spec.config.batch_size
        self.model = spec.build(seed=seed, device=device)
        self.optimizer = build_optimizer(self.model, spec.config)
        self.normalize = Normalizer(spec.mean, spec.std, device)
        self.train_images = place_images(splits.train_images, device)
        self.train_labels = splits.train_labels.to(device)
        self.val_images = place_images(splits.val_images, device)
        self.val_labels = splits.val_labels.to(device)
        self.epoch_images = len(self.train_labels)
        self.images_seen = 0  # in all, across epochs
        self.images_trained = 0  # every image a step trained on, a scoring decay's too: the cost
        self.steps_taken = 0  # in all: where the recipe's learning-rate schedule stands
        self.seconds_trained = 0.0  # training and validation in all, a resumed run's before it too
        self.epoch_steps = math.ceil(self.epoch_images / self.batch_size)
        self.total_steps = self.epoch_steps * epochs
        self.average = WeightAverage(self.model.state_dict(), recipe.ema_decay) if recipe.ema_decay else None
        self.peak_lr = recipe.peak_lr(spec.config.lr, spec.config.momentum)
        self._order: tuple[int, Tensor] | None = None  # an epoch and its batch order, made once
        self._augmentation = torch.Generator()  # the crops and flips, seeded with each epoch's order
        self._branch: tuple[int, int, float] | None = None  # a scoring decay: first step, steps, start rate
        # Running sums of a stretch of training, kept on the device: read once, at its end.
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)

    def load(self, checkpoint: LoadedCheckpoint) -> int:
        """Continues from a checkpoint (taken at an epoch's end); returns the next epoch."""
        self.model.load_state_dict(checkpoint.model_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.images_seen = checkpoint.epoch * self.epoch_images
        self.steps_taken = checkpoint.epoch * self.epoch_steps
        self.seconds_trained = checkpoint.seconds_trained
        self.images_trained = checkpoint.images_trained or self.images_seen
        return checkpoint.epoch + 1

    def save(self, directory: Path, epoch: int, scored_state: dict[str, Tensor] | None = None) -> None:
        save_checkpoint(
            directory,
            self.spec,
            self.model,
            self.optimizer,
            epoch,
            self.seconds_trained,
            self.images_trained,
            scored_state,
        )

    def epochs(self, first: int, last: int) -> Iterator[Report]:
        """Trains and validates epochs first..last; a diverged epoch is the last one reported."""
        self.images_seen = (first - 1) * self.epoch_images
        return self.reports([epoch * self.epoch_images for epoch in range(first, last + 1)])

    def reports(self, points: Sequence[int], scored: Collection[int] = ()) -> Iterator[Report]:
        """Trains on to each point (images seen in all, rounded up to a whole batch), validating at
        each; a point is reached within one epoch at most, so each epoch's end is also a point. A
        diverged stretch is the last one reported.

        Under a wsd recipe, a point in `scored` that falls in the stable stretch is scored as the
        end of a run of its own: a decay to 0 branches off there, as long as the final decay of a run
        whose stable stretch ended at that point, and is validated; the run then goes on from
        before the decay, so the branch changes nothing that follows. Every run is thus compared
        at such a point annealed, as the finished model it would be, not mid-stride at its peak.
        """
        for point in sorted(points):
            if point <= self.images_seen:
                continue
            train = self.train_to(point)
            val, scored_state = None, None
            if len(self.val_labels) and not train.diverged:
                if point in scored and self._in_stable_stretch():
                    val, scored_state = self._score_annealed()
                else:
                    val = self.evaluate()
            report = Report(self.images_seen, self.images_seen / self.epoch_images, train, val, scored_state)
            self.seconds_trained += report.seconds
            yield report
            if train.diverged:
                return

    def _in_stable_stretch(self) -> bool:
        return self.recipe.schedule == "wsd" and self.steps_taken < self.recipe.decay_start(self.total_steps)

    def _score_annealed(self) -> tuple[EpochResult, dict[str, Tensor]]:
        """The validation of the run decayed from here, and the decayed weights; the run's own state,
        batch order and augmentation are as they were before the decay."""
        started = time.perf_counter()
        kept = (
            {name: value.clone() for name, value in self.model.state_dict().items()},
            copy.deepcopy(self.optimizer.state_dict()),
            None if self.average is None else {k: v.clone() for k, v in self.average.average.items()},
            self.images_seen,
            self.steps_taken,
            self._order,
            self._augmentation.get_state(),
        )
        steps = self.recipe.branch_steps(self.steps_taken)
        rate = self.recipe.learning_rate(self.peak_lr, self.steps_taken, self.total_steps)
        self._branch = (self.steps_taken, steps, rate)
        try:
            while self.steps_taken < kept[4] + steps:
                epoch_end = (self.images_seen // self.epoch_images + 1) * self.epoch_images
                wanted = self.images_seen + (kept[4] + steps - self.steps_taken) * self.batch_size
                if self.train_to(min(wanted, epoch_end)).diverged:
                    break
            val = self.evaluate()
            decayed_state = {name: value.clone() for name, value in self.model.state_dict().items()}
        finally:
            self._branch = None
            model, optimizer, average, self.images_seen, self.steps_taken, self._order, generator = kept
            self.model.load_state_dict(model)
            self.optimizer.load_state_dict(optimizer)
            if average is not None and self.average is not None:
                self.average.average = average
            self._augmentation.set_state(generator)
        elapsed = time.perf_counter() - started
        return dataclasses.replace(val, seconds=elapsed), decayed_state

    def train_epoch(self, epoch: int) -> EpochResult:
        """One whole epoch, whatever was trained before."""
        self.images_seen = (epoch - 1) * self.epoch_images
        return self.train_to(epoch * self.epoch_images)

    def train_to(self, point: int) -> EpochResult:
        """Trains in the current epoch's order until `point` images have been seen in all (or the
        epoch ends): the result of that stretch.

        Stops early when the loss is no longer finite: more steps would only spread
        NaN through the weights.
        """
        self.model.train()
        started = time.perf_counter()
        epoch = self.images_seen // self.epoch_images + 1
        position = self.images_seen - (epoch - 1) * self.epoch_images
        stop = min(point - (epoch - 1) * self.epoch_images, self.epoch_images)
        order = self._epoch_order(epoch)
        self.loss_sum.zero_()
        self.correct.zero_()
        seen = 0
        step = 0
        while position < stop:
            batch = order[position : position + self.batch_size]
            self.step(batch)
            position += len(batch)
            seen += len(batch)
            step += 1
            if step % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(self.loss_sum):
                break
        self.images_seen += seen
        self.images_trained += seen
        return _result(self.loss_sum, self.correct, seen, started)

    def _epoch_order(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            order = torch.randperm(self.epoch_images, generator=batch_order(self.seed, epoch))
            self._order = (epoch, order.to(self.device))
            # The epoch's crops and flips, as reproducible as its order.
            self._augmentation = torch.Generator().manual_seed(
                batch_order(self.seed, epoch).initial_seed() + 1
            )
        return self._order[1]

    def step(self, batch: Tensor) -> None:
        """One SGD step on the training images the index tensor picks, as the recipe says."""
        recipe = self.recipe
        if self._branch is not None:
            first, steps, rate = self._branch
            set_learning_rate(self.optimizer, decayed(rate, self.steps_taken - first, steps))
        elif recipe.schedule != "constant":
            set_learning_rate(
                self.optimizer, recipe.learning_rate(self.peak_lr, self.steps_taken, self.total_steps)
            )
        labels, images = self.train_labels[batch], self.train_images[batch]
        if recipe.augment:
            images = augment(images, self._augmentation, recipe.crop_padding)
        with self.autocast():
            scores = self.model(self.normalize(images))
        # The loss in fp32 whatever the precision.
        loss = F.cross_entropy(scores.float(), labels, label_smoothing=recipe.label_smoothing)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.average is not None:
            self.average.update(self.model.state_dict())
        self.steps_taken += 1
        self.loss_sum += loss.detach() * len(batch)
        self.correct += (scores.detach().argmax(dim=1) == labels).sum()

    def final_state(self) -> dict[str, Tensor]:
        """The weights to keep: their average where the recipe takes one, else the last."""
        return dict(self.average.average) if self.average is not None else self.model.state_dict()

    @torch.no_grad()
    def evaluate(self, images: Tensor | None = None, labels: Tensor | None = None) -> EpochResult:
        """Loss and accuracy on the validation images, or on the given (CPU, uint8) ones."""
        if images is None or labels is None:
            images, labels = self.val_images, self.val_labels
        else:
            images, labels = place_images(images, self.device), labels.to(self.device)
        with self._averaged_weights():
            return self._evaluate(images, labels)

    def _scores(self, images: Tensor) -> Iterator[Tensor]:
        """The model's fp32 scores for images on the device, a batch at a time."""
        self.model.eval()
        for start in range(0, len(images), EVAL_BATCH):
            with self.autocast():
                yield self.model(self.normalize(images[start : start + EVAL_BATCH])).float()

    @contextlib.contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """The average of the weights in the model for a while, where the recipe keeps one."""
        if self.average is None:
            yield
            return
        current = {name: value.clone() for name, value in self.model.state_dict().items()}
        self.model.load_state_dict(self.average.average)
        try:
            yield
        finally:
            self.model.load_state_dict(current)

    def _evaluate(self, images: Tensor, labels: Tensor) -> EpochResult:
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for start, scores in zip(range(0, len(labels), EVAL_BATCH), self._scores(images), strict=True):
            batch_labels = labels[start : start + EVAL_BATCH]
            loss_sum += F.cross_entropy(scores, batch_labels, reduction="sum")
            correct += (scores.argmax(dim=1) == batch_labels).sum()
        return _result(loss_sum, correct, len(labels), started)

    def autocast(self) -> torch.autocast:
        """bf16 compute for the model's layers; master weights and optimizer stay fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


@torch.no_grad()
def predict(module: nn.Module, spec: ModelSpec, images: Tensor) -> Tensor:
    """The scores of a model as it is logged (an fp32 nn.Module on the CPU) for (CPU, uint8) images,
    a batch at a time: what a user who loads it from MLflow gets."""
    normalize = Normalizer(spec.mean, spec.std, torch.device("cpu"))
    module.eval()
    return torch.cat(
        [module(normalize(images[start : start + EVAL_BATCH])) for start in range(0, len(images), EVAL_BATCH)]
    )


def _result(loss_sum: Tensor, correct: Tensor, seen: int, started: float) -> EpochResult:
    loss, hits = loss_sum.item(), correct.item()  # the one host sync of the pass
    elapsed = time.perf_counter() - started
    return EpochResult(loss=loss / seen, accuracy=hits / seen, images_per_s=seen / elapsed, seconds=elapsed)
