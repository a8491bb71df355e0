"""`python -m search.bench --final`: which pipeline leads to the best final model for the same compute.

A user sweeps, then ships a model: a pipeline is judged by that model's accuracy on the audit
split (search.bench.audit), against all the compute it took, sweep and final training together.
Per seed, in this order:

- today: the default one-epoch sweep, then `search.retrain --recipe long --epochs E` of its pick
  on all the sweep's images (its validation images too), the final model;
- final-budget GP: `search.run --recipe long --epochs E --top-rung best`, given as its
  --compute-budget what today's pipeline spent on the same seed; its final trial, the search's
  best trained to E, is the final model, registered by `search.export --register` with no retrain;
- final-budget random: the same with --sampler random.

Each pipeline's result is kept in OUT/final_benchmark_runs.json as soon as it is measured, so a run
that stops goes on where it was, and seeds can be added one run at a time.
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

from matplotlib.figure import Figure
from optuna.distributions import distribution_to_json

from search.bench.audit import AUDIT_SEED, KeptResults, hold_out_audit
from search.export import register_best
from search.retrain import RetrainSettings, retrain
from search.sweep.engine import SweepOutcome, run_sweep, start_ray
from search.sweep.settings import SweepSettings
from search.tracking.best import BestTrial, best_trial
from search.tracking.store import SweepRuns, read_sweep
from spaces import get_space
from trainables.config import FINAL_OF, DataSettings
from trainables.model import training_flops_per_image
from trainables.names import TRAIN_TFLOP, TRIAL_SECONDS
from trainables.recipe import LONG, recipe_named
from trainables.stats import wilson_interval

SPACE = "nesterov"  # Part IV, the space a user sweeps first
FINAL_EPOCHS = 10  # the default of --final-epochs: see the README for why not 20
TODAY, FINAL_GP, FINAL_RANDOM = "today", "final-budget GP", "final-budget random"
PIPELINES = (TODAY, FINAL_GP, FINAL_RANDOM)


@dataclass
class PipelineResult:
    pipeline: str
    seed: int
    audit_accuracy: float  # the final model's, on the audit split
    audit_interval_95: list[float]
    sweep_tflop: float  # the search: every trial of the sweep but a final one
    final_tflop: float  # the final model's training: the retrain, or the sweep's final trial
    total_tflop: float
    sweep_wall_s: float  # the sweep, less its final trial's training where it has one
    final_wall_s: float  # the retrain, or the final trial's training
    wall_s: float
    configs: int  # trials of the search
    pick: dict[str, Any]  # the final model's config
    pick_val_accuracy: float  # as its sweep scored it
    compute_budget: float  # TFLOP: the sweep's --compute-budget
    settings: dict[str, Any]  # what makes the pipeline what it is: its sweep's identity, its retrain's recipe


def run_final_benchmark(
    data: DataSettings, seeds: list[int], epochs: int, out: Path, audit_images: int
) -> dict[str, Any]:
    """Runs each pipeline on each seed, then prints the table and writes it with the plot."""
    conditions = {
        "data": asdict(data),
        "audit_images": audit_images,
        "audit_seed": AUDIT_SEED,
        "final_epochs": epochs,
        "space": {
            name: distribution_to_json(distribution)
            for name, distribution in get_space(SPACE).distributions().items()
        },
    }
    record = KeptResults(out / "final_benchmark_runs.json", conditions)
    results = []
    owns_ray = start_ray(address=None, output="quiet")
    try:
        with tempfile.TemporaryDirectory(prefix="final-bench-") as links:
            _, folder = hold_out_audit(data, audit_images, Path(links))
            sweep_data = dataclasses.replace(data, source=str(folder))
            for seed in seeds:
                settings = _today_settings(sweep_data, seed, Path("."))
                identity = _today_identity(settings)
                today = _kept(record, TODAY, identity, settings.compute_budget) or _keep(
                    record, _today(sweep_data, seed, epochs)
                )
                budget = today.total_tflop  # what the finals may spend: today's, sweep and retrain
                for pipeline, sampler in ((FINAL_GP, "gp"), (FINAL_RANDOM, "random")):
                    final_settings = _final_budget_settings(
                        sweep_data, seed, epochs, sampler, budget, Path(".")
                    )
                    final = _kept(record, pipeline, _identity(final_settings), budget) or _keep(
                        record, _final_budget(pipeline, sweep_data, seed, epochs, sampler, budget)
                    )
                    results.append(final)
                results.append(today)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    figures = _table(results, seeds, epochs, audit_images)
    _plot(results).savefig(out / "final_benchmark.png", dpi=100)
    (out / "final_benchmark.json").write_text(
        json.dumps({"figures": figures, "runs": [asdict(r) for r in results]}, indent=2)
    )
    return figures


def _kept(
    record: KeptResults, pipeline: str, settings: dict[str, Any], budget: float
) -> PipelineResult | None:
    """The pipeline's result under these settings and compute budget, if one was kept: a change to one
    pipeline's defaults leaves the others' results in use."""
    kept = record.find(pipeline=pipeline, settings=json.loads(json.dumps(settings)), compute_budget=budget)
    if kept is None:
        return None
    result = PipelineResult(**kept)
    _print(result)
    return result


def _keep(record: KeptResults, result: PipelineResult) -> PipelineResult:
    record.add(asdict(result))
    _print(result)
    return result


def _print(result: PipelineResult) -> None:
    low, high = result.audit_interval_95
    print(
        f"  seed {result.seed}, {result.pipeline}: audit {result.audit_accuracy:.4f} ({low:.4f}-{high:.4f}), "
        f"{result.total_tflop:.0f} TFLOP ({result.sweep_tflop:.0f} + {result.final_tflop:.0f}), "
        f"{result.wall_s / 60:.1f} min, {result.configs} configs",
        flush=True,
    )


def _sweep(settings: SweepSettings) -> tuple[SweepOutcome, SweepRuns, BestTrial, float]:
    started = time.perf_counter()
    outcome = run_sweep(settings)
    wall_s = time.perf_counter() - started
    sweep = read_sweep(outcome.tracking_uri, outcome.parent_run_id)
    return outcome, sweep, best_trial(sweep.client, sweep.parent, sweep.children), wall_s


def _today_settings(data: DataSettings, seed: int, workdir: Path) -> SweepSettings:
    return SweepSettings(
        space=SPACE,
        data=dataclasses.replace(data, seed=seed),
        seed=seed,
        warm_start=False,  # each sweep starts from nothing: a fair comparison
        tracking_uri=f"sqlite:///{workdir}/mlflow.db",
        storage_path=f"{workdir}/ray",
        name=f"today-{seed}",
        output="quiet",
    )


def _identity(settings: SweepSettings) -> dict[str, Any]:
    """What makes a pipeline's sweep what it is, but its folder of images: one for each run of the
    benchmark, where the images are the conditions' own."""
    # Nor its space's record, which the kept runs predate: the space is the pipeline's own, by name.
    return {flag: value for flag, value in settings.identity().items() if flag not in ("--data", "space")}


def _today_identity(settings: SweepSettings) -> dict[str, Any]:
    """Today's pipeline: its sweep, and the recipe its retrain trains the pick with."""
    return {**_identity(settings), "retrain": recipe_named("long", settings.recipe).to_record()}


def _today(data: DataSettings, seed: int, epochs: int) -> PipelineResult:
    """The default one-epoch sweep, then its pick retrained with the long recipe on all its images."""
    with tempfile.TemporaryDirectory() as workdir:
        settings = _today_settings(data, seed, Path(workdir))
        outcome, sweep, best, sweep_wall_s = _sweep(settings)
        recipe = recipe_named("long", best.recipe)
        started = time.perf_counter()
        metrics = retrain(best, best.data, best.tracking_uri, RetrainSettings(epochs, recipe))
        retrain_wall_s = time.perf_counter() - started
    spec = best.spec
    images = metrics["train_images"]
    retrain_tflop = (
        training_flops_per_image(spec.config, spec.input_shape, spec.num_classes) * images * epochs
    )
    return PipelineResult(
        pipeline=TODAY,
        seed=seed,
        audit_accuracy=metrics["test_acc"],
        audit_interval_95=metrics["test_acc_interval_95"],
        sweep_tflop=outcome.trained_tflop,
        final_tflop=retrain_tflop / 1e12,
        total_tflop=outcome.trained_tflop + retrain_tflop / 1e12,
        sweep_wall_s=sweep_wall_s,
        final_wall_s=retrain_wall_s,
        wall_s=sweep_wall_s + retrain_wall_s,
        configs=len(sweep.children),
        pick=spec.config.to_dict(),
        pick_val_accuracy=best.val_acc,
        compute_budget=settings.compute_budget,
        settings=_today_identity(settings),
    )


def _final_budget_settings(
    data: DataSettings, seed: int, epochs: int, sampler: str, budget: float, workdir: Path
) -> SweepSettings:
    return SweepSettings(
        space=SPACE,
        data=dataclasses.replace(data, seed=seed),
        epochs=epochs,
        recipe=LONG,
        top_rung="best",
        sampler=sampler,  # and search.run's own --num-samples: the budget ends it sooner
        compute_budget_tflop=budget,
        seed=seed,
        warm_start=False,
        tracking_uri=f"sqlite:///{workdir}/mlflow.db",
        storage_path=f"{workdir}/ray",
        name=f"final-{sampler}-{seed}",
        output="quiet",
    )


def _final_budget(
    pipeline: str, data: DataSettings, seed: int, epochs: int, sampler: str, budget: float
) -> PipelineResult:
    """A sweep at the final budget whose final trial is the final model, registered with no retrain."""
    with tempfile.TemporaryDirectory() as workdir:
        settings = _final_budget_settings(data, seed, epochs, sampler, budget, Path(workdir))
        outcome, sweep, best, wall_s = _sweep(settings)
        registered = register_best(sweep, best, f"bench-{sampler}-{seed}", best.data)
    assert registered.tested is not None, "the benchmark's folder has the audit images as its test split"
    final = next(run for run in sweep.children if run.info.run_id == best.run_id)
    final_tflop = final.data.metrics.get(TRAIN_TFLOP, 0.0) if FINAL_OF in final.data.params else 0.0
    final_wall_s = final.data.metrics.get(TRIAL_SECONDS, 0.0) if FINAL_OF in final.data.params else 0.0
    metrics = registered.tested.metrics()
    return PipelineResult(
        pipeline=pipeline,
        seed=seed,
        audit_accuracy=registered.tested.accuracy,
        audit_interval_95=[metrics["test_acc_low"], metrics["test_acc_high"]],
        sweep_tflop=outcome.trained_tflop - final_tflop,
        final_tflop=final_tflop,
        total_tflop=outcome.trained_tflop,
        sweep_wall_s=wall_s - final_wall_s,
        final_wall_s=final_wall_s,
        wall_s=wall_s,
        configs=len(sweep.children) - (1 if final_tflop else 0),
        pick=best.spec.config.to_dict(),
        pick_val_accuracy=best.val_acc,
        compute_budget=budget,
        settings=_identity(settings),
    )


def _table(results: list[PipelineResult], seeds: list[int], epochs: int, audited: int) -> dict[str, Any]:
    print(f"\nFinal models ({epochs} epochs), scored on {audited} audit images, {len(seeds)} seeds:")
    figures: dict[str, Any] = {}
    today = {r.seed: r.audit_accuracy for r in results if r.pipeline == TODAY}
    for pipeline in PIPELINES:
        mine = sorted((r for r in results if r.pipeline == pipeline), key=lambda r: r.seed)
        if not mine:
            continue
        audits = [r.audit_accuracy for r in mine]
        mean = statistics.mean(audits)
        row = {
            "audit_mean": mean,
            "audit_sd": statistics.stdev(audits) if len(audits) > 1 else 0.0,
            "audit_per_seed": audits,
            "audit_interval_of_the_mean_95": list(wilson_interval(mean, audited * len(audits))),
            "against_today_per_seed": [r.audit_accuracy - today[r.seed] for r in mine if r.seed in today],
            "total_tflop_mean": statistics.mean(r.total_tflop for r in mine),
            "wall_s_mean": statistics.mean(r.wall_s for r in mine),
            "configs_mean": statistics.mean(r.configs for r in mine),
            "picks": [r.pick for r in mine],
        }
        figures[pipeline] = row
        each = ", ".join(f"{accuracy:.4f}" for accuracy in audits)
        against = ", ".join(f"{difference:+.4f}" for difference in row["against_today_per_seed"])
        print(f"  {pipeline}: audit {mean:.4f} ± {row['audit_sd']:.4f} ({each}); against today {against}")
        print(
            f"    {row['total_tflop_mean']:.0f} TFLOP, {row['wall_s_mean'] / 60:.1f} min, "
            f"{row['configs_mean']:.0f} configs"
        )
    return figures


def _plot(results: list[PipelineResult]) -> Figure:
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    for pipeline, color in zip(PIPELINES, ("tab:gray", "tab:blue", "tab:orange"), strict=True):
        mine = [r for r in results if r.pipeline == pipeline]
        if not mine:
            continue
        axes.errorbar(
            [r.total_tflop for r in mine],
            [r.audit_accuracy for r in mine],
            yerr=[
                [r.audit_accuracy - r.audit_interval_95[0] for r in mine],
                [r.audit_interval_95[1] - r.audit_accuracy for r in mine],
            ],
            fmt="o",
            color=color,
            capsize=3,
            label=pipeline,
        )
        for r in mine:
            axes.annotate(f"seed {r.seed}", (r.total_tflop, r.audit_accuracy), fontsize=7, xytext=(4, 2),
                          textcoords="offset points")  # fmt: skip
    axes.set_xlabel("total compute (TFLOP of training: sweep and final model)")
    axes.set_ylabel("final model's audit accuracy (95% interval)")
    axes.set_title("Final model against total compute, one point per pipeline and seed")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure
