"""`python -m search.bench`: how fast a trial trains, and how well a sweep fills the machine.

In one process, on one device, with the same data (the assignment's Part IV
model and settings, batch 64), each section measures side by side:

- epochs: the project's loop (uint8 tensors on the device, batched
  normalization, a device-side permutation) against the usual pipeline (a
  torchvision dataset with per-image ToTensor and Normalize, a shuffling
  DataLoader with a worker per core), alternated, each one's best epoch kept.
  On CUDA also each part of the fast path switched off on its own.
- memory (CUDA): what a CUDA process holds outside PyTorch's allocator, and
  what one trial holds, for Part IV and for the widest config of the sweep space.
- stacked: K trials trained as one in one process (vmap over stacked weights).
- accuracy: Part IV for one epoch over several seeds, in fp32 and in bf16.
- sweeps: real FIFO sweeps; wall time over the ideal (the sum of the trials'
  epoch times over the trials at once; 1.0 is ideal), each trial's start-up cost,
  and the images trained a second by all trials together. On CUDA one sweep per
  packing level (trials sharing the GPU).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
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

from search.bench_devices import (
    CUDA_VARIANTS,
    PART_IV,
    StackedTrials,
    epoch_seconds,
    gpu_memory_used_bytes,
    part_iv_spec,
    synchronize,
    time_variant,
)
from search.cli import EXIT_OK, OneLineParser, non_negative_int, positive_int, run_command
from search.gpu_packing import MEMORY_HEADROOM, trial_peak_bytes
from search.settings import SweepSettings
from search.sweep import run_sweep
from search.tracking import child_runs
from spaces import get_space
from trainables.config import CIFAR10, DataSettings
from trainables.data import ImageSplits, load_splits, split_indices
from trainables.errors import InputError
from trainables.loop import Acceleration, Training, resolve_precision
from trainables.model import build_model, build_optimizer

PROG = "search.bench"
SECTIONS = ("epochs", "memory", "stacked", "accuracy", "sweeps")
DEFAULT_SECTIONS = {"cpu": "epochs,sweeps", "cuda": "epochs,memory,stacked,sweeps"}
STACKED_STEPS = {"cpu": 5, "cuda": 200}  # timed steps of a stack: enough to be steady on each device


@dataclass
class SweepTiming:
    trials: int
    concurrent: int
    wall_s: float
    train_s: float  # sum of the trials' epoch times
    overhead: float  # wall_s / (train_s / concurrent); 1.0 is ideal
    startup_s: list[float]  # per trial: from its start to its first epoch, less that epoch
    images_per_s: float  # images trained by all trials, over the wall time
    training_images_per_s: float  # the same, over the span from the first epoch's start to the last's end
    store_create_s: float  # creating the MLflow store, once per store, before the clock


def baseline_epoch(data: DataSettings, splits: ImageSplits, device: torch.device, seed: int) -> float:
    """Images per second of one epoch through a torchvision dataset and a DataLoader, as tutorials do.

    Always fp32 and eager: this is the pipeline users start from.
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


def measure_epochs(
    data: DataSettings, splits: ImageSplits, device: torch.device, repeats: int, seed: int
) -> dict[str, Any]:
    images = len(splits.train_labels)
    precision = resolve_precision("auto", device)
    print(f"Best epoch of {repeats}, Part IV, batch 64, {images} images, on {device}:", flush=True)
    # Alternated, each pipeline's best epoch kept: on a shared machine a slow moment then
    # lowers one measurement of each, not every measurement of one pipeline.
    baseline, project = [], []
    for _ in range(repeats):
        baseline.append(baseline_epoch(data, splits, device, seed))
        project.append(images / epoch_seconds(splits, device, Acceleration(), epochs=1, seed=seed)[0])
    figures: dict[str, Any] = {
        "baseline_img_per_s": max(baseline),
        "baseline_precision": "fp32",
        "project_img_per_s": max(project),
        "project_precision": precision,
        "baseline_epochs_img_per_s": baseline,
        "project_epochs_img_per_s": project,
    }
    figures["speedup"] = figures["project_img_per_s"] / figures["baseline_img_per_s"]
    print(f"  torchvision dataset + DataLoader (fp32): {figures['baseline_img_per_s']:9.0f} images/s")
    print(f"  project loop ({precision}):                {figures['project_img_per_s']:9.0f} images/s")
    print(f"  speedup:                                 {figures['speedup']:9.2f}x", flush=True)
    if device.type == "cuda":
        print("Each part of the CUDA fast path (first epoch includes building, tuning and capture):")
        figures["cuda_variants"] = {}
        for name, acceleration in CUDA_VARIANTS.items():
            timing = time_variant(splits, device, acceleration)
            figures["cuda_variants"][name] = asdict(timing)
            print(
                f"  {name:32s} first epoch {timing.first_epoch_s:6.3f} s, then {timing.epoch_s:6.3f} s "
                f"({timing.images_per_s:8.0f} images/s)",
                flush=True,
            )
    return figures


def measure_memory(
    splits: ImageSplits, device: torch.device, used_before_cuda: int | None, space: str
) -> dict[str, Any]:
    """Bytes a trial holds on the GPU: the process's fixed part, and the allocator's peak."""
    figures: dict[str, Any] = {}
    used_now = gpu_memory_used_bytes()
    if used_before_cuda is not None and used_now is not None:
        overhead = used_now - used_before_cuda - torch.cuda.memory_reserved(device)
        figures["cuda_process_overhead_bytes"] = overhead
        print(f"CUDA process overhead (context, cuDNN, cuBLAS): {overhead / 2**20:.0f} MiB")
    widest = get_space(space).widest()
    for name, config in (("part_iv", PART_IV), (f"widest_{space}", widest)):
        peak, total = trial_peak_bytes(part_iv_spec(splits, config), splits, Acceleration())
        figures[f"trial_peak_bytes_{name}"] = peak
        figures["gpu_bytes"] = total
        print(f"  trial peak in PyTorch's allocator, {name} ({config.channel_1}/{config.channel_2}): "
              f"{peak / 2**20:.0f} MiB of {total / 2**30:.0f} GiB")  # fmt: skip
    if "cuda_process_overhead_bytes" in figures:
        trial = figures["cuda_process_overhead_bytes"] + figures[f"trial_peak_bytes_widest_{space}"]
        figures["trials_per_gpu_by_memory"] = int(MEMORY_HEADROOM * figures["gpu_bytes"] // trial)
        print(f"  widest trial all told {trial / 2**20:.0f} MiB: {figures['trials_per_gpu_by_memory']} fit")
    return figures


def measure_stacked(splits: ImageSplits, device: torch.device, counts: list[int]) -> dict[str, Any]:
    precision = resolve_precision("auto", device)
    graphs = device.type == "cuda"
    print(f"Stacked trials in one process (vmap, {precision}, CUDA graphs {'on' if graphs else 'off'}):")
    figures: dict[str, Any] = {"stacked_precision": precision, "stacked_img_per_s": {}}
    for count in counts:
        try:
            rate = StackedTrials(splits, device, count, precision).images_per_s(
                STACKED_STEPS[device.type], graphs
            )
        except Exception as error:  # an experiment, not a feature: report why it failed and go on
            figures["stacked_img_per_s"][str(count)] = None
            print(f"  {count:3d} trials: failed ({str(error).splitlines()[0]})", flush=True)
            continue
        figures["stacked_img_per_s"][str(count)] = rate
        print(f"  {count:3d} trials: {rate:10.0f} images/s together", flush=True)
    return figures


def measure_accuracy(splits: ImageSplits, device: torch.device, seeds: int) -> dict[str, Any]:
    """Part IV's validation accuracy after one epoch, per seed, in each precision."""
    print(f"Part IV, 1 epoch, {len(splits.train_labels)} / {len(splits.val_labels)} images, {seeds} seeds:")
    figures: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        accuracies = []
        for seed in range(seeds):
            training = Training(part_iv_spec(splits), splits, seed, device, Acceleration(precision=precision))
            (report,) = training.epochs(1, 1)
            accuracies.append(report.val.accuracy)
        spread = statistics.stdev(accuracies) if seeds > 1 else 0.0
        figures[f"val_acc_{precision}"] = accuracies
        figures[f"val_acc_{precision}_mean"], figures[f"val_acc_{precision}_sd"] = (
            statistics.mean(accuracies),
            spread,
        )
        each = ", ".join(f"{accuracy:.4f}" for accuracy in accuracies)
        print(f"  {precision}: {statistics.mean(accuracies):.4f} ± {spread:.4f}  ({each})", flush=True)
    return figures


def sweep_timing(
    data: DataSettings,
    space: str,
    trials: int,
    seed: int,
    train_images: int,
    gpus_per_trial: float | None = None,
    max_concurrent: int | None = None,
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
            gpus_per_trial=gpus_per_trial,
            max_concurrent=max_concurrent,
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
    images = len(runs) * train_images  # one epoch each
    window = max(end for _, end in spans) - min(start for start, _ in spans)
    return SweepTiming(
        len(runs), concurrent, wall, sum(epoch_times), wall / ideal, startups, images / wall, images / window,
        store_create_s,
    )  # fmt: skip


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def measure_sweeps(data: DataSettings, device: torch.device, args: Any, train_images: int) -> dict[str, Any]:
    """One sweep on CPU (trials as the cores allow); on CUDA one per packing level."""
    owns_ray = not ray.is_initialized()
    started = time.perf_counter()
    if owns_ray:
        ray.init(include_dashboard=False, logging_level="WARNING")
    figures: dict[str, Any] = {"ray_start_s": time.perf_counter() - started}
    try:
        if device.type == "cpu":
            timing = sweep_timing(data, args.sweep_space, args.sweep_trials, args.seed, train_images)
            figures.update({f"sweep_{key}": value for key, value in asdict(timing).items()})
            _print_sweep(f"Sweep of {timing.trials} one-epoch trials, {timing.concurrent} at once:", timing)
        else:
            if ray.cluster_resources().get("GPU", 0) < 1:
                raise InputError("Ray sees no GPU on this machine: the packing sweeps would wait forever")
            figures["packing"] = {}
            for level in args.packing:
                trials = max(args.sweep_trials, 2 * level)  # every slot runs at least two trials
                share = int(10_000 / level) / 10_000  # Ray counts GPU shares to four decimals
                timing = sweep_timing(data, args.sweep_space, trials, args.seed, train_images, share, level)
                figures["packing"][str(level)] = asdict(timing)
                _print_sweep(f"Sweep of {trials} one-epoch trials, {level} to the GPU:", timing)
            single = figures["packing"].get("1")
            for level, timing in figures["packing"].items():
                if single is not None:
                    timing["images_per_s_vs_one"] = timing["images_per_s"] / single["images_per_s"]
                    print(
                        f"  {level:>2} to the GPU: {timing['images_per_s_vs_one']:5.2f}x the images/s of one"
                    )
    finally:
        if owns_ray:
            ray.shutdown()
    return figures


def _print_sweep(title: str, timing: SweepTiming) -> None:
    startups = statistics.median(timing.startup_s)
    print(title)
    print(f"  wall {timing.wall_s:.1f} s, epochs {timing.train_s:.1f} s in all, {timing.concurrent} at once")
    print(f"  overhead {timing.overhead:.2f} (1.0 is ideal); start-up per trial, median {startups:.2f} s")
    print(
        f"  {timing.images_per_s:.0f} images/s over the wall time, "
        f"{timing.training_images_per_s:.0f} while trials trained; MLflow store creation "
        f"{timing.store_create_s:.1f} s before the clock",
        flush=True,
    )


def _counts(text: str) -> list[int]:
    """A comma-separated list of whole numbers >= 1."""
    values = [positive_int(part) for part in text.split(",")]
    return [int(value) for value in values]


def _sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise InputError(f"unknown --sections {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=CIFAR10, help="'cifar10' or an image folder")
    parser.add_argument("--data-root", default="data", help="download and cache folder (default: ./data)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is one")
    parser.add_argument("--val-size", type=positive_int, default=1000, help="held out, as in a sweep")
    parser.add_argument("--max-train-images", type=positive_int, help="time on fewer images")
    parser.add_argument(
        "--sections", help=f"comma-separated, of {', '.join(SECTIONS)} (default: {DEFAULT_SECTIONS})"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=2, help="epochs of each pipeline, alternated (default: 2)"
    )
    parser.add_argument("--stacked", type=_counts, default=[1, 4, 16, 64], help="trials to a stack")
    parser.add_argument("--accuracy-seeds", type=positive_int, default=3, help="seeds of the accuracy check")
    parser.add_argument("--sweep-trials", type=positive_int, default=4, help="trials of a timed sweep")
    parser.add_argument(
        "--sweep-space",
        default="sgd",
        help="space of the timed sweeps (default sgd: fixed widths, even trials)",
    )
    parser.add_argument(
        "--packing", type=_counts, default=[1, 4, 8, 16], help="CUDA: trials to the GPU, one sweep each"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no CUDA device")
    sections = _sections(args.sections or DEFAULT_SECTIONS[device.type])
    if "memory" in sections and device.type != "cuda":
        raise InputError("--sections memory measures GPU memory: it needs --device cuda")
    get_space(args.sweep_space)
    used_before_cuda = gpu_memory_used_bytes() if device.type == "cuda" else None
    data = DataSettings(
        source=args.data, root=args.data_root, val_size=args.val_size, max_train_images=args.max_train_images
    )
    splits = load_splits(data)
    figures: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "train_images": len(splits.train_labels),
        "sections": sections,
    }
    if "epochs" in sections:
        figures.update(measure_epochs(data, splits, device, args.repeats, args.seed))
    if "memory" in sections:
        figures.update(measure_memory(splits, device, used_before_cuda, args.sweep_space))
    if "stacked" in sections:
        figures.update(measure_stacked(splits, device, args.stacked))
    if "accuracy" in sections:
        figures.update(measure_accuracy(splits, device, args.accuracy_seeds))
    if "sweeps" in sections:
        figures.update(measure_sweeps(data, device, args, len(splits.train_labels)))
    if args.json:
        print(json.dumps(figures))
    return EXIT_OK


def _cpu_name() -> str:
    """The processor's model name, from Linux's /proc/cpuinfo; platform's answer elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
