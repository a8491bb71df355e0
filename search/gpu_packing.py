"""How many trials share a GPU by default: as many as its memory and the node's cores allow.

One trial of this model uses a small part of a modern GPU (an epoch of the
assignment's model is well under a second on an H100), so trials are packed
several to a GPU through a fractional `gpus_per_trial`. The memory bound comes
from measuring one trial of the space's widest config on the GPU; the CPU bound
from the cores each GPU has to share among its trials.
"""

from __future__ import annotations

import dataclasses
import math

import ray
import torch

from spaces import SearchSpace
from trainables.checkpoint import ModelSpec
from trainables.data import ImageSplits
from trainables.loop import Acceleration, Training

# What a CUDA process holds outside PyTorch's allocator: the context, cuDNN and cuBLAS handles.
# search.bench measures it (cuda_process_overhead_bytes).
CUDA_PROCESS_OVERHEAD_BYTES = 600 * 2**20
MEMORY_HEADROOM = 0.9  # of the GPU's memory, the share trials may fill
PROBE_IMAGES = 2048  # training images the probe trains on; the rest of the data is counted, not placed
PROBE_GPU_SHARE = 0.01  # the probe runs alone before the trials, but may sit beside other sweeps


@dataclasses.dataclass(frozen=True)
class TrialMemory:
    trial_bytes: int  # what one trial of the widest config holds on its GPU, all told
    gpu_bytes: int  # the GPU's memory


def default_gpus_per_trial(
    space: SearchSpace, splits: ImageSplits, acceleration: Acceleration, cpus_per_trial: float
) -> tuple[float, TrialMemory | None]:
    """The GPU share of a trial, 1/n for the n trials that fit a GPU; 0 on a cluster with no GPU."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if not gpus:
        return 0.0, None
    memory = measure_trial_memory(space, splits, acceleration)
    by_memory = int(MEMORY_HEADROOM * memory.gpu_bytes // memory.trial_bytes)
    by_cores = int(resources.get("CPU", 1) / gpus // cpus_per_trial)
    per_gpu = max(1, min(by_memory, by_cores))
    # Ray counts GPU shares to four decimals: round down, so n shares never add up past one GPU.
    return math.floor(10_000 / per_gpu) / 10_000, memory


def measure_trial_memory(space: SearchSpace, splits: ImageSplits, acceleration: Acceleration) -> TrialMemory:
    """Trains the space's widest config for an epoch on a few images, on a GPU of the cluster."""
    probe_splits = dataclasses.replace(
        splits,
        train_images=splits.train_images[:PROBE_IMAGES],
        train_labels=splits.train_labels[:PROBE_IMAGES],
    )
    spec = ModelSpec(space.widest(), splits.input_shape, splits.classes, splits.mean, splits.std)
    probe = ray.remote(trial_peak_bytes).options(num_cpus=1, num_gpus=PROBE_GPU_SHARE)
    peak_bytes, gpu_bytes = ray.get(probe.remote(spec, probe_splits, acceleration))
    unplaced_bytes = splits.train_images.numel() - probe_splits.train_images.numel()  # uint8: a byte each
    return TrialMemory(CUDA_PROCESS_OVERHEAD_BYTES + peak_bytes + unplaced_bytes, gpu_bytes)


def trial_peak_bytes(spec: ModelSpec, splits: ImageSplits, acceleration: Acceleration) -> tuple[int, int]:
    """The allocator's peak over one epoch and a validation of a trial, and the GPU's memory."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    training = Training(spec, splits, seed=0, device=device, acceleration=acceleration)
    list(training.epochs(1, 1))
    return torch.cuda.max_memory_reserved(device), torch.cuda.get_device_properties(device).total_memory
