"""`python -m search.bench --fidelity`: how the long recipe's schedule should meet ASHA's rungs.

A sweep at a final model's budget compares trials at rungs far below it. The scores there must be
comparable, and rank the configs as their final scores would. Two ways, measured on the same
configs, each trained through to the end with both:

- onecycle: one cycle over the whole budget, each rung scored mid-cycle, at whatever rate the
  cycle has reached there;
- wsd: warm-up, stable, decay; at each rung a decay branches off and is scored, as the end of a
  run of its own, and the run goes on from before it.

For each: every config's final score (is one schedule's final model better?) and, at each rung, the
rank correlation of the rung's scores with the final ones (does the rung predict the end?).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from scipy.stats import kendalltau, spearmanr

from trainables.checkpoint import ModelSpec
from trainables.config import DataSettings, TrialConfig
from trainables.data import load_splits
from trainables.loop import Training
from trainables.recipe import LONG, Recipe

EPOCHS = 6  # the budget each config trains to: long enough for a final decay, short enough for ten
CONFIGS = 10
CONFIG_SEED = 7  # the configs drawn, the same on every run
TRAINING_SEED = 1
RUNGS_PER_ETA = (4, 3, 2, 1)  # rungs at EPOCHS / 3**k: from a sixth of an epoch's eighth up to 2 epochs
SCHEDULES = {
    "onecycle": dataclasses.replace(LONG, schedule="onecycle", warmup_fraction=0.15),
    "wsd": LONG,
}


def draw_configs() -> list[TrialConfig]:
    """Configs across the region a long run trains in, log-uniformly: momentum, effective step (0.02 to
    0.3), weight decay, and widths of 16 to 64, so that twenty runs of six epochs stay affordable."""
    rng = random.Random(CONFIG_SEED)
    configs = []
    for _ in range(CONFIGS):
        momentum = rng.uniform(0.5, 0.95)
        step = math.exp(rng.uniform(math.log(0.02), math.log(0.3)))
        weight_decay = math.exp(rng.uniform(math.log(1e-5), math.log(1e-3)))
        channel_1 = round(math.exp(rng.uniform(math.log(16), math.log(64))))
        channel_2 = round(math.exp(rng.uniform(math.log(16), math.log(64))))
        configs.append(
            TrialConfig(
                momentum=momentum,
                lr=step * (1 - momentum),
                weight_decay=weight_decay,
                channel_1=channel_1,
                channel_2=channel_2,
            )
        )
    return configs


def _train(job: tuple[DataSettings, TrialConfig, Recipe]) -> dict[int, float]:
    """One config trained to the end with one schedule, on one thread: its score at each report."""
    data, config, recipe = job
    torch.set_num_threads(1)
    splits = load_splits(data)
    images = len(splits.train_labels)
    rungs = [round(EPOCHS * images / 3**k) for k in RUNGS_PER_ETA]
    points = sorted(set(rungs) | {epoch * images for epoch in range(1, EPOCHS + 1)})
    spec = ModelSpec(config, splits.input_shape, splits.classes, splits.mean, splits.std)
    training = Training(spec, splits, TRAINING_SEED, torch.device("cpu"), "bf16", recipe, EPOCHS)
    return {
        report.images_seen: 0.0 if report.val is None else report.val.accuracy
        for report in training.reports(points, scored=rungs)
    }


def run_fidelity_benchmark(data: DataSettings) -> dict[str, Any]:
    """Trains every config with each schedule, a process per core, and prints what they show."""
    configs = draw_configs()
    jobs = [(data, config, recipe) for config in configs for recipe in SCHEDULES.values()]
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # a fork would copy this process's thread pools
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        scores = list(pool.map(_train, jobs))
    by_schedule = {name: scores[index :: len(SCHEDULES)] for index, name in enumerate(SCHEDULES)}
    figures: dict[str, Any] = {"configs": [config.to_dict() for config in configs], "epochs": EPOCHS}
    images = load_splits(data).train_labels.numel()
    for name, runs in by_schedule.items():
        final = [run[max(run)] for run in runs]
        mean = sum(final) / len(final)
        correlations = {}
        for seen in sorted(runs[0])[:-1]:
            at = [run[seen] for run in runs]
            correlations[f"{seen / images:.3f}"] = {
                "spearman": float(spearmanr(at, final).statistic),
                "kendall": float(kendalltau(at, final).statistic),
            }
        figures[name] = {"final": final, "final_mean": mean, "rank_correlation": correlations}
        print(f"  {name}: final scores {', '.join(f'{score:.3f}' for score in final)} (mean {mean:.4f})")
        for epochs, rank in correlations.items():
            print(f"    at {epochs} epochs: Spearman {rank['spearman']:+.2f}, Kendall {rank['kendall']:+.2f}")
    paired = [w - o for w, o in zip(figures["wsd"]["final"], figures["onecycle"]["final"], strict=True)]
    figures["wsd_minus_onecycle"] = paired
    print(f"  wsd less onecycle, config by config: {', '.join(f'{d:+.3f}' for d in paired)}")
    figures["wall_s"] = time.perf_counter() - started
    return figures
