"""`python -m search.bench`, its default sections: how fast a trial trains, against the tutorial
pipeline and the machine.

In one run, on one device, with the same data (the assignment's Part IV model and
settings, batch 64), each section measures side by side:

- epochs: the project's training path (uint8 tensors on the device, batched
  normalization, a device-side permutation) in fp32 and in bf16, against the usual
  pipeline (a torchvision dataset with per-image ToTensor and Normalize, a
  shuffling DataLoader with a worker per core, fp32), alternated, each one's best
  epoch kept; the loop's GFLOP/s, counted from the model's multiply-adds, against
  the machine's peak, measured by a large matrix product in each precision; and
  what a one-epoch trial pays for reporting (a validation each) at the default
  rungs within the epoch, against reporting at its end only.
- parallel: one trial of one thread alone, then two at once in two processes,
  as a CPU sweep runs them: do they scale?
- accuracy: Part IV for one epoch over several seeds, in fp32 and in bf16.
- sweeps: a real FIFO sweep; its wall time over the ideal (the sum of the
  trials' epoch times over the trials at once; 1.0 is ideal), each trial's
  start-up cost, and the images trained a second by all trials together.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
import torch.nn.functional as F

from search.sweep.engine import run_sweep, start_ray
from search.sweep.settings import SweepSettings
from search.tracking.store import first_logged_s, open_store, read_sweep
from spaces import get_space
from trainables.checkpoint import ModelSpec
from trainables.config import CIFAR10, DataSettings, TrialConfig
from trainables.data import ImageSplits, load_splits, split_indices
from trainables.errors import InputError
from trainables.loop import Training, resolve_precision
from trainables.model import build_model, build_optimizer, training_flops_per_image
from trainables.names import EPOCH_TIME_S
from trainables.trainable import TrialSettings

PART_IV = TrialConfig()  # the defaults are the assignment's Part IV settings
SECTIONS = ("epochs", "parallel", "accuracy", "sweeps")
DEFAULT_SECTIONS = "epochs,parallel,sweeps"
PEAK_MATRIX_SIZE = 2048  # large enough that a product runs at the machine's peak, small enough to be quick


@dataclass
class SweepTiming:
    trials: int
    concurrent: int
    wall_s: float
    train_s: float  # sum of the trials' epoch times
    overhead: float  # wall_s / (train_s / concurrent); 1.0 is ideal
    startup_s: list[float]  # per trial: from its start to its first epoch, less that epoch
    images_per_s: float  # images trained by all trials, over the wall time
    store_create_s: float  # creating the MLflow store, once per store, before the clock


def part_iv_spec(splits: ImageSplits) -> ModelSpec:
    return ModelSpec(PART_IV, splits.input_shape, splits.classes, splits.mean, splits.std)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def project_epoch(splits: ImageSplits, device: torch.device, seed: int, precision: str) -> float:
    """Images per second of one epoch through the project's own training path."""
    training = Training(part_iv_spec(splits), splits, seed, device, precision)
    synchronize(device)
    started = time.perf_counter()
    training.train_epoch(1)
    synchronize(device)
    return len(splits.train_labels) / (time.perf_counter() - started)


def baseline_epoch(data: DataSettings, splits: ImageSplits, device: torch.device, seed: int) -> float:
    """Images per second of one epoch through a torchvision dataset and a DataLoader, as tutorials do.

    Always fp32: this is the pipeline users start from.
    """
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(splits.mean, splits.std)])
    if data.source == CIFAR10:
        dataset = datasets.CIFAR10(data.root, train=True, transform=transform)
    else:
        dataset = datasets.ImageFolder(str(Path(data.source) / "train"), transform=transform)
    # The same training images the project's loop sees: the same split of the same ordering.
    _, train_index = split_indices(torch.tensor(dataset.targets), data)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, train_index.tolist()),
        batch_size=PART_IV.batch_size,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    model = build_model(PART_IV, splits.input_shape, splits.num_classes, seed, device)
    optimizer = build_optimizer(model, PART_IV)
    synchronize(device)
    started = time.perf_counter()
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    synchronize(device)
    return len(train_index) / (time.perf_counter() - started)


def peak_gflop_per_s(device: torch.device, dtype: torch.dtype, bursts: int = 3, repeats: int = 5) -> float:
    """The machine's matrix-product rate in one precision: the ceiling a training step can reach.

    The best of a few bursts: on a shared machine a busy moment lowers one burst, and a peak
    taken low would raise every fraction of it in the run.
    """
    size = PEAK_MATRIX_SIZE
    left = torch.randn(size, size, device=device).to(dtype)
    right = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):  # warm-up: thread pools, kernel choice
        left @ right
    fastest = float("inf")
    for _ in range(bursts):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            left @ right
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - started)
    return 2 * size**3 * repeats / fastest / 1e9


def measure_epochs(
    data: DataSettings, splits: ImageSplits, device: torch.device, repeats: int, seed: int, precision: str
) -> dict[str, Any]:
    images = len(splits.train_labels)
    default = resolve_precision(precision, device)
    print(f"Best epoch of {repeats}, Part IV, batch 64, {images} images, on {device}:", flush=True)
    # Alternated, each pipeline's best epoch kept: on a shared machine a slow moment then
    # lowers one measurement of each, not every measurement of one pipeline.
    epochs: dict[str, list[float]] = {"baseline": [], "fp32": [], "bf16": []}
    for _ in range(repeats):
        epochs["baseline"].append(baseline_epoch(data, splits, device, seed))
        for precision in ("fp32", "bf16"):
            epochs[precision].append(project_epoch(splits, device, seed, precision))
    flops = training_flops_per_image(PART_IV, splits.input_shape, splits.num_classes)
    figures: dict[str, Any] = {
        "default_precision": default,
        "baseline_precision": "fp32",
        "baseline_img_per_s": max(epochs["baseline"]),
        "baseline_epochs_img_per_s": epochs["baseline"],
        "train_mflop_per_image": flops / 1e6,
    }
    print(f"  torchvision dataset + DataLoader, fp32: {figures['baseline_img_per_s']:9.0f} images/s")
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate = max(epochs[precision])
        achieved, peak = rate * flops / 1e9, peak_gflop_per_s(device, dtype)
        figures.update(
            {
                f"project_{precision}_img_per_s": rate,
                f"project_{precision}_epochs_img_per_s": epochs[precision],
                f"project_{precision}_speedup": rate / figures["baseline_img_per_s"],
                f"project_{precision}_gflop_per_s": achieved,
                f"peak_{precision}_gflop_per_s": peak,
                f"project_{precision}_of_peak": achieved / peak,
            }
        )
        print(
            f"  project loop, {precision}:                 {rate:9.0f} images/s, "
            f"{rate / figures['baseline_img_per_s']:.2f}x the tutorial; {achieved:.0f} GFLOP/s "
            f"= {achieved / peak:.1%} of the {peak:.0f} GFLOP/s {precision} peak",
            flush=True,
        )
    figures["project_img_per_s"] = figures[f"project_{default}_img_per_s"]
    figures["speedup"] = figures[f"project_{default}_speedup"]
    print(f"  speedup at the default precision ({default}):   {figures['speedup']:9.2f}x", flush=True)
    return figures


def reported_epoch_s(
    splits: ImageSplits, device: torch.device, seed: int, precision: str, points: list[int]
) -> float:
    """Seconds of one epoch as a trial trains it: to each report point, validating at each."""
    training = Training(part_iv_spec(splits), splits, seed, device, precision)
    synchronize(device)
    started = time.perf_counter()
    for _ in training.reports(points):
        pass
    synchronize(device)
    return time.perf_counter() - started


def measure_rung_reports(
    splits: ImageSplits, device: torch.device, repeats: int, seed: int, precision: str
) -> dict[str, Any]:
    """What a one-epoch trial pays for reporting at the default rungs within the epoch (a validation
    at each) against reporting at the epoch's end only: alternated, each one's best epoch kept."""
    epoch_images = len(splits.train_labels)
    sweep = SweepSettings(space="nesterov")  # the default's rungs; no space changes them
    trial = TrialSettings(max_epochs=1, seed=seed, recipe=sweep.recipe, rungs=sweep.rung_fractions)
    points = {"end": [epoch_images], "rungs": trial.report_points(epoch_images)}
    seconds: dict[str, list[float]] = {name: [] for name in points}
    for _ in range(repeats):
        for name, at in points.items():
            seconds[name].append(reported_epoch_s(splits, device, seed, precision, at))
    end, at_rungs = min(seconds["end"]), min(seconds["rungs"])
    figures = {
        "rung_reports": len(points["rungs"]),
        "epoch_reported_at_end_s": end,
        "epoch_reported_at_rungs_s": at_rungs,
        "rung_reports_cost": at_rungs / end - 1,
    }
    print(
        f"  one epoch reported at its end only: {end:.2f} s; at the {len(points['rungs'])} default "
        f"rungs: {at_rungs:.2f} s ({figures['rung_reports_cost']:+.1%})",
        flush=True,
    )
    return figures


def measure_parallel(splits: ImageSplits, seed: int, precision: str) -> dict[str, Any]:
    """Aggregate images a second of one one-thread trial alone, and of two at once (CPU)."""
    device = torch.device("cpu")
    precision = resolve_precision(precision, device)
    flops = training_flops_per_image(PART_IV, splits.input_shape, splits.num_classes)
    peak = peak_gflop_per_s(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    print(f"Trials of one thread each, {precision}, side by side in their own processes:")
    figures: dict[str, Any] = {"parallel_precision": precision}
    for trials in (1, 2):
        rate = _trials_at_once(splits, seed, precision, trials)
        figures[f"parallel_{trials}_img_per_s"] = rate
        figures[f"parallel_{trials}_of_peak"] = rate * flops / 1e9 / peak
        print(f"  {trials} at once: {rate:8.0f} images/s together, {rate * flops / 1e9 / peak:.1%} of the "
              f"{peak:.0f} GFLOP/s peak", flush=True)  # fmt: skip
    figures["parallel_scaling"] = figures["parallel_2_img_per_s"] / figures["parallel_1_img_per_s"]
    return figures


def _trials_at_once(splits: ImageSplits, seed: int, precision: str, trials: int) -> float:
    """Starts `trials` processes, each training one epoch on one thread from the same moment."""
    context = multiprocessing.get_context("spawn")  # a fork would copy this process's thread pools
    start, results = context.Barrier(trials + 1), context.Queue()
    workers = [
        context.Process(target=_one_thread_epoch, args=(splits, seed, precision, start, results))
        for _ in range(trials)
    ]
    for worker in workers:
        worker.start()
    start.wait()
    started = time.perf_counter()
    finished = [results.get() for _ in workers]
    elapsed = max(finished) - started
    for worker in workers:
        worker.join()
    return trials * len(splits.train_labels) / elapsed


def _one_thread_epoch(splits: ImageSplits, seed: int, precision: str, start: Any, results: Any) -> None:
    torch.set_num_threads(1)
    training = Training(part_iv_spec(splits), splits, seed, torch.device("cpu"), precision)
    training.train_epoch(1)  # warm-up: the first epoch of a process pays for oneDNN's kernel choice
    start.wait()
    training.train_epoch(2)
    results.put(time.perf_counter())


def measure_accuracy(splits: ImageSplits, device: torch.device, seeds: int) -> dict[str, Any]:
    """Part IV's validation accuracy after one epoch, per seed, in each precision."""
    print(f"Part IV, 1 epoch, {len(splits.train_labels)} / {len(splits.val_labels)} images, {seeds} seeds:")
    figures: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        accuracies = []
        for seed in range(seeds):
            (report,) = Training(part_iv_spec(splits), splits, seed, device, precision).epochs(1, 1)
            accuracies.append(report.val.accuracy if report.val is not None else 0.0)
        mean, spread = statistics.mean(accuracies), statistics.stdev(accuracies) if seeds > 1 else 0.0
        figures[f"val_acc_{precision}"] = accuracies
        figures[f"val_acc_{precision}_mean"], figures[f"val_acc_{precision}_sd"] = mean, spread
        each = ", ".join(f"{accuracy:.4f}" for accuracy in accuracies)
        print(f"  {precision}: {mean:.4f} ± {spread:.4f}  ({each})", flush=True)
    return figures


def sweep_timing(
    data: DataSettings, space: str, trials: int, seed: int, train_images: int, precision: str
) -> SweepTiming:
    """Runs a real FIFO sweep and compares its wall time with the time its trials spent training.

    The wall time runs from the call to the summary: loading the data, the MLflow runs,
    starting the trials, every report, checkpoint and upload, the sweep's report. Ray is
    started before, as a cluster would be, and the MLflow store is created before, as it is
    for every sweep after the first; both costs are reported apart.
    """
    with tempfile.TemporaryDirectory() as workdir:
        settings = SweepSettings(
            space=space,
            data=data,
            epochs=1,
            num_samples=trials,
            scheduler="fifo",
            seed=seed,
            precision=precision,
            tracking_uri=f"sqlite:///{workdir}/mlflow.db",
            storage_path=f"{workdir}/ray",
            name="bench",
            output="quiet",  # the benchmark prints its own figures
        )
        started = time.perf_counter()
        open_store(settings.tracking_uri)  # creates the SQLite store
        store_create_s = time.perf_counter() - started
        started = time.perf_counter()
        outcome = run_sweep(settings)
        wall = time.perf_counter() - started
        sweep = read_sweep(outcome.tracking_uri, outcome.parent_run_id)
        runs = sweep.children
        epoch_times, startups, spans = [], [], []
        for run in runs:
            epoch_time = run.data.metrics[EPOCH_TIME_S]
            first_report = first_logged_s(sweep.client, run.info.run_id, EPOCH_TIME_S)
            epoch_times.append(epoch_time)
            startups.append(first_report - run.info.start_time / 1000 - epoch_time)
            spans.append((first_report - epoch_time, first_report))  # when it trained
    concurrent = _most_at_once(spans)
    ideal = sum(epoch_times) / concurrent
    images = len(runs) * train_images  # one epoch each
    return SweepTiming(
        len(runs), concurrent, wall, sum(epoch_times), wall / ideal, startups, images / wall, store_create_s
    )


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def measure_sweeps(
    data: DataSettings, space: str, trials: int, seed: int, train_images: int, precision: str
) -> dict[str, Any]:
    started = time.perf_counter()
    owns_ray = start_ray(address=None, output="progress")
    figures: dict[str, Any] = {"ray_start_s": time.perf_counter() - started}
    try:
        timing = sweep_timing(data, space, trials, seed, train_images, precision)
    finally:
        if owns_ray:
            ray.shutdown()
    figures.update({f"sweep_{key}": value for key, value in asdict(timing).items()})
    startups = ", ".join(f"{seconds:.1f}" for seconds in timing.startup_s)
    print(f"Sweep of {timing.trials} one-epoch trials, {timing.concurrent} at once:")
    print(f"  wall {timing.wall_s:.1f} s, epochs {timing.train_s:.1f} s in all")
    print(f"  {timing.images_per_s:.0f} images/s by all trials together, over the wall time")
    print(f"  overhead {timing.overhead:.2f} (1.0 is ideal); start-up per trial {startups} s")
    apart = f"Ray start {figures['ray_start_s']:.1f} s, MLflow store creation {timing.store_create_s:.1f} s"
    print(f"  before the clock: {apart}", flush=True)
    return figures


def _processor_name() -> str:
    """The processor's model name, from Linux's /proc/cpuinfo; the platform's answer elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_speed_benchmark(
    data: DataSettings,
    device: torch.device,
    sections: list[str],
    repeats: int,
    seed: int,
    precision: str,
    accuracy_seeds: int,
    sweep_space: str,
    sweep_trials: int,
) -> dict[str, Any]:
    """The sections asked for, on one device and the same data: their figures, printed as they come."""
    if "parallel" in sections and device.type != "cpu":
        raise InputError("--sections parallel times one-thread CPU trials: it needs --device cpu")
    get_space(sweep_space)  # an unknown space fails now, not after the epochs
    splits = load_splits(data)
    figures: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _processor_name(),
        "torch": torch.__version__,
        "train_images": len(splits.train_labels),
    }
    if "epochs" in sections:
        figures.update(measure_epochs(data, splits, device, repeats, seed, precision))
        figures.update(measure_rung_reports(splits, device, repeats, seed, precision))
    if "parallel" in sections:
        figures.update(measure_parallel(splits, seed, precision))
    if "accuracy" in sections:
        figures.update(measure_accuracy(splits, device, accuracy_seeds))
    if "sweeps" in sections:
        figures.update(
            measure_sweeps(data, sweep_space, sweep_trials, seed, len(splits.train_labels), precision)
        )
    return figures
