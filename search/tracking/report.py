"""The sweep explains itself: what its parent run holds once the sweep ends, and again after a resume.

- importance.json / importance.png: how much each searched hyperparameter mattered for the
  validation accuracy at the first report, which every trial reaches (so all stand at one
  fidelity), by Optuna's fANOVA and PED-ANOVA evaluators over the sweep's trials;
- accuracy_by_hyperparameter.png: each trial's validation accuracy at its first report against each
  searched hyperparameter (Optuna's slice plot, on a log axis where the space samples on a log scale);
- learning_curves.png: validation accuracy against images seen of the top trials, named by their
  run numbers (Optuna's intermediate values);
- trials.parquet (one row a trial), summary.md, and best.json (the file `search.export` writes).

The report rebuilds the sweep as an in-memory Optuna study, so Optuna's own
evaluators and plots read it; only the importance chart, which sets two
evaluators side by side, is drawn here.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import optuna
import optuna.visualization.matplotlib as optuna_plots
import pyarrow.parquet as pq
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

from search.tracking.best import best_trial, write_best
from search.tracking.store import is_diverged, status_counts, trial_table
from spaces import SearchSpace
from trainables.config import TrialConfig
from trainables.errors import InputError
from trainables.names import (
    ACCURACY_PNG,
    BEST_JSON,
    BEST_METRIC,
    CURVES_PNG,
    IMPORTANCE_JSON,
    IMPORTANCE_PNG,
    METRIC,
    SPACE_TAG,
    SUMMARY_MD,
    SWEEP_TAG,
    TRIAL_TABLE_ARTIFACT,
)
from trainables.stats import wilson_interval

TOP_TRIALS = 5  # learning curves and summary rows
# What importance and the slice plot rank: every trial reaches its first report, at one fidelity.
FIRST_REPORT = f"{METRIC} at the first report"
DPI = 100


def importance_evaluators() -> dict[str, optuna.importance.BaseImportanceEvaluator]:
    """fANOVA, Optuna's default, seeded so a report is repeatable; PED-ANOVA, which copes better
    with the few trials a sweep of this size has."""
    return {"fanova": FanovaImportanceEvaluator(seed=0), "ped_anova": PedAnovaImportanceEvaluator()}


@dataclass(frozen=True)
class ScoredTrial:
    """A child run that reported at least once, with what the report needs of it."""

    run: Run
    searched: dict[str, Any]  # the values the space searched for it
    history: list[tuple[int, float]]  # (images seen, validation accuracy) at each report
    diverged: bool

    @property
    def name(self) -> str:
        return self.run.info.run_name

    @property
    def first(self) -> float:
        """At the first report, which every trial reaches: a score at the same fidelity for all."""
        return self.history[0][1]

    @property
    def accuracy(self) -> float:
        """The best epoch's (the checkpoint's), or for a trial stopped before an epoch's end its last."""
        return self.run.data.metrics.get(BEST_METRIC, self.history[-1][1])


def write_sweep_report(
    client: MlflowClient,
    parent: Run,
    children: list[Run],
    space: SearchSpace,
    upload: Callable[[str, str], None],
) -> None:
    """Computes the report from the sweep's runs over the space they searched, and uploads it,
    `upload(run_id, folder)`, as artifacts of the parent run."""
    distributions = space.distributions()
    # Those that searched what the space's first pass does (a conditional space has other branches).
    scored = [
        trial for trial in scored_trials(client, space, children) if set(trial.searched) == set(distributions)
    ]
    top = sorted(scored, key=lambda trial: (-trial.accuracy, trial.run.info.start_time))[:TOP_TRIALS]
    val_size = int(parent.data.params.get("data_val_size", 0))
    with _quiet_optuna():
        study = sweep_study(scored, distributions)
        importance = param_importance(study, distributions)
        curves = sweep_study(top, distributions)
        with tempfile.TemporaryDirectory() as directory:
            folder = Path(directory)
            (folder / IMPORTANCE_JSON).write_text(json.dumps(importance, indent=2) + "\n")
            plot_importance(importance).savefig(folder / IMPORTANCE_PNG)
            slices = optuna_plots.plot_slice(study, target_name=FIRST_REPORT)
            _save_optuna_plot(slices, folder / ACCURACY_PNG)
            _save_optuna_plot(
                label_curves(optuna_plots.plot_intermediate_values(curves), curves), folder / CURVES_PNG
            )
            pq.write_table(trial_table(children), folder / TRIAL_TABLE_ARTIFACT)
            try:
                write_best(best_trial(client, parent, children), folder / BEST_JSON)
                best_note = f"`{BEST_JSON}` holds the best config, as `search.export` writes it."
            except InputError as error:  # no trial has a best checkpoint
                best_note = f"No `{BEST_JSON}`: {error}."
            summary = summary_markdown(parent, children, top, distributions, importance, best_note, val_size)
            (folder / SUMMARY_MD).write_text(summary)
            upload(parent.info.run_id, str(folder))


def scored_trials(client: MlflowClient, space: SearchSpace, children: list[Run]) -> list[ScoredTrial]:
    trials = []
    for run in children:
        points = client.get_metric_history(run.info.run_id, METRIC)
        history = sorted((point.step, point.value) for point in points)
        if history:
            searched = space.searched_values(TrialConfig.from_params(run.data.params))
            trials.append(ScoredTrial(run, searched, history, is_diverged(run)))
    return trials


def sweep_study(trials: list[ScoredTrial], distributions: dict[str, BaseDistribution]) -> optuna.Study:
    """The trials as an in-memory Optuna study: each valued at its first report, where all trials
    stand at the same fidelity, with its later reports as intermediate values."""
    study = optuna.create_study(direction="maximize")
    for trial in trials:
        study.add_trial(
            optuna.trial.create_trial(
                params={name: trial.searched[name] for name in distributions},
                distributions=distributions,
                value=trial.first,
                intermediate_values=dict(trial.history),
                user_attrs={"run_name": trial.name},
            )
        )
    return study


def param_importance(study: optuna.Study, distributions: dict[str, BaseDistribution]) -> dict[str, Any]:
    """Importances by each evaluator (they sum to 1), with notes where one could not say."""
    report: dict[str, Any] = {
        "target": FIRST_REPORT,
        "trials": len(study.trials),
        "params": sorted(distributions),
        "evaluators": {},
        "notes": [],
    }
    if len(study.trials) < 2 or not distributions:
        report["notes"].append("importance needs at least 2 trials with a result and a searched parameter")
        return report
    for name, evaluator in importance_evaluators().items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                values = optuna.importance.get_param_importances(study, evaluator=evaluator)
            except RuntimeError as error:  # e.g. every trial scored the same
                report["notes"].append(f"{name}: {error}")
                continue
        report["evaluators"][name] = {param: float(value) for param, value in values.items()}
        report["notes"] += [
            f"{name}: {warning.message}"
            for warning in caught
            if not issubclass(warning.category, ExperimentalWarning)
        ]
    return report


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """The throwaway studies' INFO lines, and the plots' warnings (an empty study's, after an early
    Ctrl-C), would land in the middle of the sweep's output."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # matplotlib's, on a plot of one or two trials
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


# Plots ---------------------------------------------------------------------


def plot_importance(importance: dict[str, Any]) -> Figure:
    evaluators: dict[str, dict[str, float]] = importance["evaluators"]
    params = importance["params"]
    figure = Figure(figsize=(7, 1.2 + 0.5 * max(1, len(params))), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(f"Hyperparameter importance for {importance['target']} ({importance['trials']} trials)")
    if not evaluators:
        axes.text(0.5, 0.5, "\n".join(importance["notes"]), ha="center", va="center", wrap=True)
        axes.set_axis_off()
        return figure
    first = next(iter(evaluators.values()))
    params = sorted(params, key=lambda param: first.get(param, 0.0))  # most important on top
    height = 0.8 / len(evaluators)
    for index, (name, values) in enumerate(evaluators.items()):
        positions = [row + index * height for row in range(len(params))]
        axes.barh(positions, [values.get(param, 0.0) for param in params], height=height, label=name)
    axes.set_yticks([row + 0.4 - height / 2 for row in range(len(params))], params)
    axes.set_xlim(0, 1)
    axes.set_xlabel("importance (each evaluator's values sum to 1)")
    axes.legend(loc="lower right")
    return figure


def label_curves(axes: Axes, study: optuna.Study) -> Axes:
    """Optuna names each curve Trial<number> of its own study; the sweep's runs are numbered
    001, 002, ... in MLflow, so the legend and axes say what the sweep calls them."""
    for line in axes.get_lines():
        number = line.get_label().removeprefix("Trial")
        if number.isdigit():  # else a later Optuna's own label stays
            line.set_label(study.trials[int(number)].user_attrs["run_name"].split()[0])
    axes.set_title(f"{METRIC} of the top {len(study.trials)} trials")
    axes.set_xlabel("images seen")
    axes.set_ylabel(METRIC)
    if len(study.trials) >= 2:
        axes.legend(bbox_to_anchor=(1.05, 1), loc="upper left", borderaxespad=0.0)
    return axes


def _save_optuna_plot(axes: Any, path: Path) -> None:
    """Saves the figure of one of Optuna's plots (an Axes, or an array of them) and closes it."""
    figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    figure.savefig(path, format="png", dpi=DPI)
    plt.close(figure)


# Summary ---------------------------------------------------------------------


def summary_markdown(
    parent: Run,
    children: list[Run],
    top: list[ScoredTrial],
    distributions: dict[str, BaseDistribution],
    importance: dict[str, Any],
    best_note: str,
    val_size: int,
) -> str:
    diverged = sum(map(is_diverged, children))
    statuses = sorted(status_counts(children).items())
    counts = ", ".join(f"{count} {status.lower()}" for status, count in statuses)
    lines = [
        f"# Sweep `{parent.data.tags.get(SWEEP_TAG, parent.info.run_name)}`",
        "",
        f"Space `{parent.data.tags[SPACE_TAG]}`; {len(children)} trials: {counts or 'none'}"
        + (f"; {diverged} diverged" if diverged else "")
        + ".",
        "",
    ]
    params = sorted(distributions)
    if top:
        best = top[0]
        low, high = wilson_interval(best.accuracy, val_size)
        run = f"run `{best.name}` ({best.run.info.run_id})"
        lines += [f"Best validation accuracy: **{best.accuracy:.4f}** (95% interval {low:.4f}-{high:.4f} "
                  f"on {val_size} images), {run}."]  # fmt: skip
        close = [trial for trial in top[1:] if trial.accuracy >= low]
        if close:
            lines += [f"The top {len(close) + 1} trials are within noise of each other: their accuracies "
                      "fall in the best one's interval, so the validation set cannot rank them."]  # fmt: skip
        lines += ["", "## Top trials", "", _row(["rank", "run", BEST_METRIC, *params])]
        lines.append(_row(["---"] * (3 + len(params))))
        for rank, trial in enumerate(top, start=1):
            cells = [
                str(rank),
                trial.name,
                f"{trial.accuracy:.4f}",
                *(_fmt(trial.searched[p]) for p in params),
            ]
            lines.append(_row(cells))
        lines.append("")
    evaluators = importance["evaluators"]
    lines += ["## Hyperparameter importance", ""]
    if evaluators:
        lines += [_row(["parameter", *evaluators]), _row(["---"] * (1 + len(evaluators)))]
        order = sorted(params, key=lambda p: -next(iter(evaluators.values())).get(p, 0.0))
        lines += [_row([p, *(f"{values.get(p, 0.0):.3f}" for values in evaluators.values())]) for p in order]
        lines.append("")
    lines += [f"- {note}" for note in importance["notes"]]
    lines += ["", best_note, ""]
    plots = ", ".join(f"`{name}`" for name in (IMPORTANCE_PNG, ACCURACY_PNG, CURVES_PNG))
    lines += [f"Plots: {plots}; every trial: `{TRIAL_TABLE_ARTIFACT}`.", ""]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
