"""`python -m search.bench`: how fast a trial trains, against the usual Tune-tutorial pipeline.

In one process, on one device, with the same data, model and optimizer (the
assignment's Part IV settings, batch 64), it times:

1. epochs through the project's loop (uint8 tensors on the device, batched
   normalization, a device-side permutation), and through the usual pipeline (a
   torchvision dataset with per-image ToTensor and Normalize, and a shuffling
   DataLoader with a worker per core), alternated, each one's best epoch kept;
2. a short real sweep: its wall time divided by the ideal, the sum of its
   trials' epoch times over the number of trials that ran at once (1.0 is
   ideal), and each trial's start-up cost.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from search.cli import EXIT_OK, OneLineParser, non_negative_int, positive_int, run_command
from search.settings import SweepSettings
from search.sweep import run_sweep
from search.tracking import child_runs
from trainables.config import CIFAR10, DataSettings, TrialConfig
from trainables.data import ImageSplits, load_splits, split_indices
from trainables.errors import InputError
from trainables.loop import Normalizer, batch_order, place_images, train_epoch
from trainables.model import build_model, build_optimizer

PROG = "search.bench"
PART_IV = TrialConfig()  # the defaults are the assignment's Part IV settings


@dataclass
class SweepTiming:
    trials: int
    concurrent: int
    wall_s: float
    train_s: float  # sum of the trials' epoch times
    overhead: float  # wall_s / (train_s / concurrent); 1.0 is ideal
    startup_s: list[float]  # per trial: from its start to its first epoch, less that epoch
    store_create_s: float  # creating the MLflow store, once per store, before the clock


def project_epoch(splits: ImageSplits, device: torch.device, seed: int) -> float:
    """Images per second of one epoch through the project's own loop."""
    model = build_model(PART_IV, splits.input_shape, splits.num_classes, seed, device)
    optimizer = build_optimizer(model, PART_IV)
    images, labels = place_images(splits.train_images, device), splits.train_labels.to(device)
    normalize = Normalizer(splits.mean, splits.std, device)
    _synchronize(device)
    started = time.perf_counter()
    train_epoch(model, optimizer, images, labels, normalize, PART_IV.batch_size, batch_order(seed, 1))
    _synchronize(device)
    return len(labels) / (time.perf_counter() - started)


def baseline_epoch(data: DataSettings, splits: ImageSplits, device: torch.device, seed: int) -> float:
    """Images per second of one epoch through a torchvision dataset and a DataLoader, as tutorials do."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(splits.mean, splits.std)])
    if data.source == CIFAR10:
        dataset = datasets.CIFAR10(data.root, train=True, transform=transform)
        labels = torch.tensor(dataset.targets)
    else:
        dataset = datasets.ImageFolder(str(Path(data.source) / "train"), transform=transform)
        labels = torch.tensor(dataset.targets)
    # The same training images the project's loop sees: the same split of the same ordering.
    _, train_index = split_indices(labels, data)
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
    _synchronize(device)
    started = time.perf_counter()
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _synchronize(device)
    return len(train_index) / (time.perf_counter() - started)


def sweep_overhead(data: DataSettings, space: str, trials: int, seed: int) -> SweepTiming:
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
            tracking_uri=f"sqlite:///{workdir}/mlflow.db",
            storage_path=f"{workdir}/ray",
            name="bench",
            output="quiet",  # the benchmark prints its own figures
        )
        started = time.perf_counter()
        MlflowClient(settings.tracking_uri).search_experiments()  # creates the SQLite store
        store_create_s = time.perf_counter() - started
        started = time.perf_counter()
        outcome = run_sweep(settings)
        wall = time.perf_counter() - started
        client = MlflowClient(outcome.tracking_uri)
        runs = child_runs(client, client.get_run(outcome.parent_run_id))
        epoch_times, startups, spans = [], [], []
        for run in runs:
            epoch_time = run.data.metrics["epoch_time_s"]
            first_report = client.get_metric_history(run.info.run_id, "epoch_time_s")[0].timestamp / 1000
            epoch_times.append(epoch_time)
            startups.append(first_report - run.info.start_time / 1000 - epoch_time)
            spans.append((first_report - epoch_time, first_report))  # when it trained
    concurrent = _most_at_once(spans)
    ideal = sum(epoch_times) / concurrent
    return SweepTiming(len(runs), concurrent, wall, sum(epoch_times), wall / ideal, startups, store_create_s)


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=CIFAR10, help="'cifar10' or an image folder")
    parser.add_argument("--data-root", default="data", help="download and cache folder (default: ./data)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is one")
    parser.add_argument("--val-size", type=positive_int, default=1000, help="held out, as in a sweep")
    parser.add_argument("--max-train-images", type=positive_int, help="time on fewer images")
    parser.add_argument("--sweep-trials", type=positive_int, default=4, help="trials of the timed sweep")
    parser.add_argument(
        "--sweep-space",
        default="sgd",
        help="space of the timed sweep (default sgd: fixed widths, even trials)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=2, help="epochs of each pipeline, alternated (default: 2)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no CUDA device")
    data = DataSettings(
        source=args.data, root=args.data_root, val_size=args.val_size, max_train_images=args.max_train_images
    )
    splits = load_splits(data)
    figures: dict[str, Any] = {"device": str(device), "train_images": len(splits.train_labels)}
    images = len(splits.train_labels)
    print(f"Best epoch of {args.repeats}, Part IV, batch 64, {images} images, on {device}:", flush=True)
    # Alternated, each pipeline's best epoch kept: on a shared machine a slow moment then
    # lowers one measurement of each, not every measurement of one pipeline.
    baseline, project = [], []
    for _ in range(args.repeats):
        baseline.append(baseline_epoch(data, splits, device, args.seed))
        project.append(project_epoch(splits, device, args.seed))
    figures["baseline_img_per_s"], figures["project_img_per_s"] = max(baseline), max(project)
    figures["baseline_epochs_img_per_s"], figures["project_epochs_img_per_s"] = baseline, project
    print(f"  torchvision dataset + DataLoader: {figures['baseline_img_per_s']:9.0f} images/s", flush=True)
    print(f"  project loop:                     {figures['project_img_per_s']:9.0f} images/s", flush=True)
    figures["speedup"] = figures["project_img_per_s"] / figures["baseline_img_per_s"]
    print(f"  speedup:                          {figures['speedup']:9.2f}x", flush=True)

    owns_ray = not ray.is_initialized()
    started = time.perf_counter()
    if owns_ray:
        ray.init(include_dashboard=False, logging_level="WARNING")
    figures["ray_start_s"] = time.perf_counter() - started
    try:
        timing = sweep_overhead(data, args.sweep_space, args.sweep_trials, args.seed)
    finally:
        if owns_ray:
            ray.shutdown()
    figures.update({f"sweep_{key}": value for key, value in asdict(timing).items() if key != "overhead"})
    figures["sweep_overhead"] = timing.overhead
    startups = ", ".join(f"{seconds:.1f}" for seconds in timing.startup_s)
    print(f"Sweep of {timing.trials} one-epoch trials, {timing.concurrent} at once:")
    print(f"  wall {timing.wall_s:.1f} s, epochs {timing.train_s:.1f} s in all")
    print(f"  overhead {timing.overhead:.2f} (1.0 is ideal); start-up per trial {startups} s")
    apart = f"Ray start {figures['ray_start_s']:.1f} s, MLflow store creation {timing.store_create_s:.1f} s"
    print(f"  before the clock: {apart}")
    if args.json:
        print(json.dumps(figures))
    return EXIT_OK


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
