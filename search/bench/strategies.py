"""`python -m search.bench --search`: which search strategy picks the best config for the same compute.

Each strategy sweeps the same images with several seeds. The default sweeps as
`search.run` would, to its compute budget; the baselines then get, as their own
--compute-budget, the TFLOP the default trained on the same seed, so that they spend
the same compute (counted from the model's multiply-adds: an epoch of a wide config
costs several of a narrow one). Each sweep ends at the first trial past its budget,
so a baseline spends a little more than the default, never less.
A strategy is judged by what it picked, not by its own best validation accuracy:
the maximum of many noisy estimates is biased upward, and the more configs a sweep
tries, the more. So 5,000 of the training images are held out of every sweep's
reach (the audit split); each sweep's pick is trained again for one epoch with
another seed, as its sweep trained it, on the sweep's own training images, and
scored on the audit split.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from optuna.distributions import distribution_to_json

from search.bench.audit import AUDIT_SEED, KeptResults, hold_out_audit
from search.cli import default
from search.sweep.engine import run_sweep, start_ray
from search.sweep.settings import SweepSettings
from search.tracking.store import best_child_run, read_sweep
from spaces import get_space
from trainables.checkpoint import ModelSpec
from trainables.config import DataSettings, TrialConfig
from trainables.data import (
    ImageSplits,
    LabeledImages,
    load_splits,
)
from trainables.loop import Training
from trainables.names import BEST_METRIC, EPOCH, METRIC, TRAIN_TFLOP
from trainables.recipe import ASSIGNMENT, Recipe
from trainables.stats import wilson_interval

SPACE = "nesterov"  # Part IV, the space a user sweeps first
RETRAIN_SEED_OFFSET = 1000  # the pick is trained again from other initial weights and batch order


@dataclass(frozen=True)
class Strategy:
    name: str
    sampler: str
    rungs: int  # 1: ASHA decides at epoch ends only; 3: also after a ninth and a third of an epoch
    schedule: str  # each trial's learning rate, and the audit's retrain of the pick
    # True: trials until the TFLOP the default trained on the same seed (BASELINE_MOST_TRIALS at
    # most); False: search.run's own --num-samples and --compute-budget.
    matches_default_compute: bool

    @property
    def is_default(self) -> bool:
        """Whether this is what `search.run` does unless told otherwise."""
        defaults = SweepSettings(space=SPACE)
        own = (defaults.sampler, defaults.rungs, defaults.recipe.schedule)
        return (self.sampler, self.rungs, self.schedule) == own and not self.matches_default_compute

    @property
    def recipe(self) -> Recipe:
        """The assignment's training at the strategy's schedule."""
        return dataclasses.replace(ASSIGNMENT, schedule=self.schedule)


BASELINE_MOST_TRIALS = 200  # far more than a baseline's compute buys: its budget ends it
# What ran before rungs within the epoch: one-epoch trials at the assignment's constant rate, ASHA
# deciding at epoch ends only (so, with one epoch, never). Each gets the compute that the default spends.
_SAMPLER, _RUNGS = default(SweepSettings, "sampler"), SweepSettings(space=SPACE).rungs
STRATEGIES = (  # the names key the kept sweeps: docs/search_benchmark_sweeps.json has these
    Strategy("GP, rungs within the epoch, one cycle", _SAMPLER, _RUNGS, "onecycle", False),
    Strategy(
        "random, epoch-level ASHA", "random", rungs=1, schedule="constant", matches_default_compute=True
    ),
    Strategy("TPE, epoch-level ASHA (the previous default)", "tpe", 1, "constant", True),
)


@dataclass
class SweepResult:
    strategy: str
    seed: int
    audit_accuracy: float  # the pick, trained again, on the audit split
    best_val_accuracy: float  # what the sweep itself reported for its pick
    configs: int  # trials the sweep started
    epochs_spent: float  # all the images its trials trained on, in epochs
    tflop_spent: float  # compute: the arithmetic of all its trials' training
    compute_budget: float  # TFLOP: its --compute-budget (a baseline's, the default's tflop_spent)
    wall_s: float
    pick: dict[str, Any]
    curve: list[tuple[float, float]]  # (TFLOP spent, best full-fidelity validation accuracy so far)


def run_search_benchmark(
    data: DataSettings, seeds: list[int], strategies: tuple[Strategy, ...], out: Path, audit_images: int
) -> dict[str, Any]:
    """Sweeps with each strategy and seed, then prints the table and writes it with the plot.

    The full benchmark takes hours on a small machine, so each sweep's result is written to
    OUT/search_benchmark_sweeps.json as soon as it is measured, and a later run under the same
    conditions reuses those it finds there instead of sweeping again: a run that was stopped
    goes on where it was, and seeds can be added one run at a time. Delete the file to start over.
    """
    conditions = {
        "data": asdict(data),
        "audit_images": audit_images,
        "audit_seed": AUDIT_SEED,
        "strategies": [asdict(strategy) for strategy in strategies],
        # What makes a sweep what it is; its space as below (kept records predate the identity's).
        "defaults": {
            flag: value for flag, value in SweepSettings(space=SPACE).identity().items() if flag != "space"
        },
        "space": {  # and what it searches: a record made over other ranges is not reused
            name: distribution_to_json(distribution)
            for name, distribution in get_space(SPACE).distributions().items()
        },
    }
    record = KeptResults(out / "search_benchmark_sweeps.json", conditions)
    with tempfile.TemporaryDirectory(prefix="search-bench-") as links:
        audit, sweep_folder = hold_out_audit(data, audit_images, Path(links))
        results = _sweep_each(strategies, seeds, data, audit, sweep_folder, record)
    figures = _table(results, strategies, seeds, data.val_size, audit_images)
    _plot_curves(results, strategies).savefig(out / "search_benchmark.png", dpi=100)
    (out / "search_benchmark.json").write_text(
        json.dumps({"figures": figures, "sweeps": [asdict(r) for r in results]}, indent=2)
    )
    return figures


def _sweep_each(
    strategies: tuple[Strategy, ...],
    seeds: list[int],
    data: DataSettings,
    audit: LabeledImages,
    sweep_folder: Path,
    record: KeptResults,
) -> list[SweepResult]:
    sweep_data = DataSettings(
        source=str(sweep_folder),
        root=data.root,
        val_size=data.val_size,
        max_train_images=data.max_train_images,
    )
    results = []
    owns_ray = start_ray(address=None, output="quiet")
    try:
        for seed in seeds:
            default_spent = None  # the default runs first: the TFLOP it trained on this seed
            for strategy in sorted(strategies, key=lambda strategy: strategy.matches_default_compute):
                if strategy.matches_default_compute:
                    if default_spent is None:
                        raise ValueError(f"{strategy.name} matches the default's compute: run it too")
                    budget = default_spent
                else:
                    budget = SweepSettings(space=SPACE).compute_budget
                kept = record.find(strategy=strategy.name, seed=seed, compute_budget=budget)
                if kept is None:
                    result = _sweep_and_audit(strategy, seed, budget, sweep_data, audit)
                    record.add(asdict(result))
                else:
                    result = SweepResult(**{**kept, "curve": [tuple(point) for point in kept["curve"]]})
                if strategy.is_default:
                    default_spent = result.tflop_spent
                results.append(result)
                print(
                    f"  seed {seed}, {strategy.name}: audit {result.audit_accuracy:.4f}, best validation "
                    f"{result.best_val_accuracy:.4f}, {result.configs} configs, {result.tflop_spent:.1f} "
                    f"TFLOP ({result.epochs_spent:.1f} epochs), {result.wall_s:.0f} s",
                    flush=True,
                )
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    return results


def _sweep_and_audit(
    strategy: Strategy, seed: int, budget: float, data: DataSettings, audit: LabeledImages
) -> SweepResult:
    most_trials = {"num_samples": BASELINE_MOST_TRIALS} if strategy.matches_default_compute else {}
    with tempfile.TemporaryDirectory() as workdir:
        settings = SweepSettings(
            space=SPACE,
            data=DataSettings(**{**asdict(data), "seed": seed}),
            epochs=1,
            **most_trials,
            compute_budget_tflop=budget,
            rungs=strategy.rungs,
            sampler=strategy.sampler,
            recipe=strategy.recipe,
            warm_start=False,  # each sweep starts from nothing: a fair comparison
            seed=seed,
            tracking_uri=f"sqlite:///{workdir}/mlflow.db",
            storage_path=f"{workdir}/ray",
            name=f"{strategy.sampler}-{strategy.rungs}-{seed}",
            output="quiet",
        )
        started = time.perf_counter()
        outcome = run_sweep(settings)
        wall_s = time.perf_counter() - started
        children = read_sweep(settings.tracking_uri, outcome.parent_run_id).children
        pick = best_child_run(children)
        assert pick is not None, f"no trial of {settings.sweep_name} trained to the end"
        config = TrialConfig.from_params(pick.data.params)
        splits = load_splits(settings.data)
        curve, tflop, epochs, best = [], 0.0, 0.0, 0.0
        for run in sorted(children, key=lambda run: run.info.end_time or 0):
            tflop += run.data.metrics.get(TRAIN_TFLOP, 0.0)
            epochs += run.data.metrics.get(EPOCH, 0.0)  # how far the trial trained
            if BEST_METRIC in run.data.metrics:
                best = max(best, run.data.metrics[BEST_METRIC])
            curve.append((tflop, best))
    audit_accuracy = _audit(config, strategy.recipe, splits, audit, seed + RETRAIN_SEED_OFFSET)
    return SweepResult(
        strategy=strategy.name,
        seed=seed,
        audit_accuracy=audit_accuracy,
        best_val_accuracy=pick.data.metrics[BEST_METRIC],
        configs=len(children),
        epochs_spent=epochs,
        tflop_spent=tflop,
        compute_budget=budget,
        wall_s=wall_s,
        pick=config.to_dict(),
        curve=curve,
    )


def _audit(
    config: TrialConfig, recipe: Recipe, splits: ImageSplits, audit: LabeledImages, seed: int
) -> float:
    """The config trained for one epoch as its sweep trained it, on the sweep's training images,
    scored on the audit split."""
    audit_images = audit.images.contiguous(memory_format=torch.channels_last)
    audited = ImageSplits(
        splits.train_images, splits.train_labels, audit_images, audit.labels,
        splits.classes, splits.mean, splits.std, "audit",
    )  # fmt: skip
    spec = ModelSpec(config, audited.input_shape, audited.classes, audited.mean, audited.std)
    training = Training(spec, audited, seed, torch.device("cpu"), recipe=recipe, epochs=1)
    (report,) = training.epochs(1, 1)
    return 0.0 if report.diverged or report.val is None else report.val.accuracy


def _table(
    results: list[SweepResult],
    strategies: tuple[Strategy, ...],
    seeds: list[int],
    val_size: int,
    audited: int,
) -> dict[str, Any]:
    print(f"\nPicks trained again for one epoch, scored on {audited} audit images, {len(seeds)} seeds:")
    figures = {}
    for strategy in strategies:
        mine = [result for result in results if result.strategy == strategy.name]
        audits = [result.audit_accuracy for result in mine]
        best = [result.best_val_accuracy for result in mine]
        spread = statistics.stdev(audits) if len(audits) > 1 else 0.0
        low, high = wilson_interval(statistics.mean(best), val_size)
        row = {
            "audit_mean": statistics.mean(audits),
            "audit_sd": spread,
            "audit_median": statistics.median(audits),
            "audit_per_seed": audits,
            "best_val_mean": statistics.mean(best),
            "best_val_interval_95": [low, high],
            "configs_mean": statistics.mean(result.configs for result in mine),
            "epochs_spent_mean": statistics.mean(result.epochs_spent for result in mine),
            "tflop_spent_mean": statistics.mean(result.tflop_spent for result in mine),
            "wall_s_mean": statistics.mean(result.wall_s for result in mine),
        }
        figures[strategy.name] = row
        each = ", ".join(f"{accuracy:.4f}" for accuracy in audits)
        print(f"  {strategy.name}{' (the default)' if strategy.is_default else ''}:")
        print(f"    audit {row['audit_mean']:.4f} ± {spread:.4f} (median {row['audit_median']:.4f}; {each})")
        print(f"    best validation {row['best_val_mean']:.4f} (95% interval {low:.4f}-{high:.4f})")
        print(
            f"    {row['configs_mean']:.0f} configs, {row['tflop_spent_mean']:.0f} TFLOP "
            f"({row['epochs_spent_mean']:.1f} epochs), {row['wall_s_mean']:.0f} s"
        )
    return figures


def _plot_curves(results: list[SweepResult], strategies: tuple[Strategy, ...]) -> Figure:
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    for color, strategy in zip(
        ("tab:gray", "tab:blue", "tab:olive", "tab:orange", "tab:green"), strategies, strict=False
    ):
        for index, result in enumerate(r for r in results if r.strategy == strategy.name):
            spent, best = zip(*result.curve, strict=True) if result.curve else ((), ())
            axes.step(
                spent, best, where="post", color=color, alpha=0.8, label=strategy.name if index == 0 else None
            )
    axes.set_xlabel("compute spent (TFLOP of training, all trials)")
    axes.set_ylabel(f"best {METRIC} so far (full fidelity)")
    axes.set_title("Best-so-far against compute, one line per seed")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure
