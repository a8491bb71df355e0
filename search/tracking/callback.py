"""`SweepTracker`: the Tune callback that turns a sweep's events into MLflow writes, on the driver.

Each Tune trial is a child run of the sweep's parent run, found again by its
`trial_id` tag, so a restored sweep reuses its runs instead of duplicating them.
Writing from the driver alone keeps SQLite stores safe from many writers. The
writes themselves are `search.tracking.writer`'s operations; the queue in
`search.tracking.journal` applies them, or keeps them on disk while MLflow fails.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

from ray import tune

from search.storage import StoredFile, is_uri, trial_number, trial_results
from search.tracking.journal import Journal, WriteQueue
from search.tracking.store import TRACKING_ERRORS
from search.tracking.writer import (
    EndTrial,
    FinishSweep,
    LogCheckpoint,
    LogParams,
    LogReport,
    MlflowWriter,
    StartTrial,
    SweepRun,
    TagTrial,
)
from spaces import SearchSpace
from trainables.config import trial_config
from trainables.names import (
    DIVERGED,
    EPOCH,
    ERROR_TAG,
    IMAGES_SEEN,
    METRIC,
    REPORTED_METRICS,
    RETRIES_TAG,
    RUN_PARAMS,
    TRAIN_TFLOP,
)


def trained_tflop(trials: list) -> float:
    """The training the sweep's trials did so far, from their last reports."""
    return sum(float((trial.last_result or {}).get(TRAIN_TFLOP, 0.0)) for trial in trials)


def final_status(trial: Any, max_epochs: int) -> str:
    """How a trial's end in Tune shows in MLflow.

    After a Ctrl-C, Tune stops the trials under way and they too end up TERMINATED
    (the snapshot it saved first still has them running, so a resume continues them).
    A trial really finished when its last result says done (a scheduler's stop), it
    trained every epoch, or it diverged; `done` alone is not kept across a restore.
    """
    if trial.status == "ERROR":
        return "FAILED"
    last = trial.last_result or {}
    ended = last.get("done") or last.get(EPOCH, 0) >= max_epochs or last.get(DIVERGED)
    return "FINISHED" if trial.status == "TERMINATED" and ended else "KILLED"


def run_name(trial: Any, space: SearchSpace) -> str:
    """The trial's MLflow run name, also used in the progress lines: its number and searched values.

    The number is the order Tune created the trial in (the start of its experiment
    tag), which a resume keeps: the name is unique in its sweep, and stable.
    """
    config, final_of = trial_config(trial.config)
    searched = space.searched_values(config)
    number = trial_number(trial)
    label = [f"{number:03d}", "final"] if final_of is not None else [f"{number:03d}"]
    return " ".join([*label, *(f"{name}={_short(searched[name])}" for name in sorted(searched))])


def run_params(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """The trial's MLflow params: its config, and the values its space searched where the config
    holds them only derived (nesterov's effective_step), so the MLflow UI sorts and plots by them."""
    searched = space.searched_values(trial_config(trial.config)[0])
    return {**searched, **trial.config}


def _short(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


class SweepTracker(tune.Callback):
    """Submits one operation per event; the queue writes it, or journals it while MLflow fails.

    Picklable on purpose: Tune saves it with the experiment and brings it back on
    restore; run ids are found again in MLflow by tag, never trusted from memory.
    """

    def __init__(
        self,
        tracking_uri: str,
        sweep: SweepRun,
        space: SearchSpace,
        num_samples: int,
        max_epochs: int,
        journal: StoredFile,
        grace_s: float,
        rebuild: bool = False,
        deadline: float | None = None,
        compute_budget: float = math.inf,
    ) -> None:
        self.settings = {
            "tracking_uri": tracking_uri,
            "sweep": sweep,
            "space": space,
            "num_samples": num_samples,
            "max_epochs": max_epochs,
            "journal": journal,
            "rebuild": rebuild,
            "deadline": deadline,
            "compute_budget": compute_budget,
            "grace_s": grace_s,
        }
        self.grace_s = grace_s  # at the end, how long a restarting server is waited for
        self.deadline = deadline  # when the time budget ends: fewer trials then is no interruption
        self.compute_budget = compute_budget  # TFLOP: nor is it once the trials trained this much
        self.space = space
        self.num_samples = num_samples  # fewer trials at the end means the sweep was cut off
        self.max_epochs = max_epochs
        # At the end, write again from Tune's own records whatever MLflow lacks: on a resume, and
        # whenever the journal of an earlier run was unreadable.
        self.rebuild = rebuild
        self.queue = WriteQueue(MlflowWriter(tracking_uri, sweep, space), Journal(journal))
        self.open_trials: dict[str, None] = {}  # started and not ended, in the order they started
        self.errors: list[str] = []  # the errors of the trials that failed in this run
        self.params_logged: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return self.settings

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def pending_writes(self) -> int:
        return len(self.queue.pending)

    def setup(self, **info: Any) -> None:
        self.queue.load()
        self.rebuild = self.rebuild or self.queue.journal.set_aside

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.queue.flush()  # catch up once MLflow is back, even between results

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.open_trials[trial.trial_id] = None
        self.queue.submit(
            StartTrial(trial.trial_id, run_name(trial, self.space), run_params(trial, self.space))
        )

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step = int(result.get(IMAGES_SEEN, result.get("training_iteration", 0)))
        if trial.trial_id not in self.params_logged:  # what it tells once, of itself
            self.params_logged.add(trial.trial_id)
            params = {name: str(result[name]) for name in RUN_PARAMS if name in result}
            self.queue.submit(LogParams(trial.trial_id, params))
        self.queue.submit(LogReport(trial.trial_id, step, _finite_metrics(result), int(time.time() * 1000)))
        if result.get(DIVERGED):
            self.queue.submit(TagTrial(trial.trial_id, {DIVERGED: "true"}))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        accuracy = trial.last_result.get(METRIC)
        if accuracy is not None:
            step = int(trial.last_result.get(IMAGES_SEEN, 0))
            self.queue.submit(LogCheckpoint(trial.trial_id, checkpoint.path, accuracy, step))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.open_trials.pop(trial.trial_id, None)
        self.queue.submit(EndTrial(trial.trial_id, "FINISHED"))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A crash Tune will retry from the last checkpoint: the run says so, and stays RUNNING."""
        tags = {RETRIES_TAG: str(trial.run_metadata.num_failures), ERROR_TAG: _error_text(trial)}
        self.queue.submit(TagTrial(trial.trial_id, tags))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.open_trials.pop(trial.trial_id, None)
        self.errors.append(_error_text(trial))
        self.queue.submit(TagTrial(trial.trial_id, {ERROR_TAG: self.errors[-1]}))
        self.queue.submit(EndTrial(trial.trial_id, "FAILED"))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Tune calls this at the end, after a Ctrl-C too; unfinished trials mean an interruption."""
        if self.rebuild:
            for trial in trials:
                self._rebuild_from_tune(trial)
        statuses = {trial.trial_id: final_status(trial, self.max_epochs) for trial in trials}
        for trial_id, status in statuses.items():
            self.queue.submit(EndTrial(trial_id, status, only_if_started=True))
        self.open_trials.clear()
        budget_spent = (self.deadline is not None and time.time() >= self.deadline) or (
            trained_tflop(trials) >= self.compute_budget
        )
        interrupted = "KILLED" in statuses.values() or (len(trials) < self.num_samples and not budget_spent)
        self._finish(interrupted, list(statuses))

    def finish_after_a_crash(self) -> None:
        """When Tune itself failed (its storage full, or Ray gone under a stop signal) and so never
        called `on_experiment_end`: the trials under way are KILLED, and so is the sweep."""
        for trial_id in self.open_trials:
            self.queue.submit(EndTrial(trial_id, "KILLED", only_if_started=True))
        self.open_trials.clear()
        self._finish(interrupted=True)

    def abandon(self) -> None:
        """From the stop watchdog's thread, when Tune is stuck for good (Ray went down with a stop
        signal): the trials under way and the sweep are KILLED, written straight to MLflow, since
        the queue belongs to the stuck thread. What cannot be written now, a resume rebuilds."""
        writer = MlflowWriter(self.settings["tracking_uri"], self.settings["sweep"], self.space)
        for trial_id in list(self.open_trials):
            with contextlib.suppress(*TRACKING_ERRORS, LookupError):
                writer.apply(EndTrial(trial_id, "KILLED", only_if_started=True))
        with contextlib.suppress(*TRACKING_ERRORS):
            writer.client.set_terminated(self.settings["sweep"].run_id, "KILLED")

    def _finish(self, interrupted: bool, trial_ids: list[str] | None = None) -> None:
        self.queue.submit(FinishSweep(interrupted, trial_ids))
        # The last chance in this run: give a restarting server a little time.
        deadline = time.monotonic() + self.grace_s
        while self.queue.pending and time.monotonic() < deadline:
            time.sleep(2.0)
            self.queue.flush(force=True)
        if self.queue.only_uploads_wait:  # the parent says so, rather than stay RUNNING
            with contextlib.suppress(*TRACKING_ERRORS):
                self.queue.writer.close_while_uploads_wait(self.queue.waiting())

    def _rebuild_from_tune(self, trial: Any) -> None:
        """Writes again, from the results and checkpoints Tune keeps in the trial's folder (the
        source of truth), whatever its run lacks. Each write is skipped where MLflow has it."""
        results = None if is_uri(trial.path) else trial_results(Path(trial.path))
        if results is None:
            return  # never reported, or on remote storage: only a live trial's writes reach MLflow
        self.queue.submit(
            StartTrial(
                trial.trial_id, run_name(trial, self.space), run_params(trial, self.space), reopen=False
            )
        )
        for result in results:
            step = int(result.get(IMAGES_SEEN, 0))
            timestamp_ms = int(result["timestamp"] * 1000)
            self.queue.submit(LogReport(trial.trial_id, step, _finite_metrics(result), timestamp_ms))
            if result.get(DIVERGED):
                self.queue.submit(TagTrial(trial.trial_id, {DIVERGED: "true"}))
            if result.get("checkpoint_dir_name"):  # logged if still on disk and the best so far
                checkpoint = Path(trial.path) / result["checkpoint_dir_name"]
                self.queue.submit(LogCheckpoint(trial.trial_id, str(checkpoint), result[METRIC], step))


def _finite_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The reported metrics of a result; MLflow cannot store an infinite or NaN loss."""
    metrics = {name: float(result[name]) for name in REPORTED_METRICS if name in result}
    return {name: value for name, value in metrics.items() if math.isfinite(value)}


def _error_text(trial: Any) -> str:
    path = trial.error_file
    if path and Path(path).exists():
        return Path(path).read_text().strip()
    return "(no error text was saved)"
