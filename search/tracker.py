"""`SweepTracker`: the Tune callback that writes a sweep to MLflow, from the driver only.

Each Tune trial is a child run of the sweep's parent run, found again by its
`trial_id` tag, so a restored sweep reuses its runs instead of duplicating them.
Writing from the driver alone keeps SQLite stores safe from many writers.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune

from search.report import write_sweep_report
from search.storage import StoredFile
from search.tracking import (
    BEST_METRIC,
    CHECKPOINT_ARTIFACT,
    ERROR_TAG,
    ERROR_TAG_CHARS,
    ROLE_TAG,
    SWEEP_TAG,
    TRACKING_ERRORS,
    TRIAL_ID_TAG,
    as_params,
    best_child_run,
    child_runs,
)
from trainables.config import METRIC
from trainables.errors import first_line
from trainables.trainable import DIVERGED, REPORTED_METRICS


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
    ended = last.get("done") or last.get("epoch", 0) >= max_epochs or last.get(DIVERGED)
    return "FINISHED" if trial.status == "TERMINATED" and ended else "KILLED"


class Operation(NamedTuple):
    """One write to MLflow, replayable after a restart: trial ids, not run ids."""

    kind: str  # start | metrics | tags | checkpoint | status | finish
    trial_id: str
    details: dict[str, Any]


class SweepTracker(tune.Callback):
    """Writes each trial to its own child run of the sweep's parent run, from the driver.

    Every write is a small operation keyed by trial id, applied in order. When
    MLflow fails, training goes on: the operations wait in memory and in a
    journal file in the sweep's folder, are retried every RETRY_AFTER_S, and
    are written once MLflow is back, at the end, or by `--resume`.

    Picklable on purpose: Tune saves it with the experiment and brings it back
    on restore; run ids are found again in MLflow by tag, never trusted from memory.
    """

    RETRY_AFTER_S = 15.0
    END_GRACE_S = 30.0

    def __init__(
        self, tracking_uri: str, parent_run_id: str, num_samples: int, max_epochs: int, journal: StoredFile
    ) -> None:
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.num_samples = num_samples  # fewer trials at the end means the sweep was cut off
        self.max_epochs = max_epochs
        self.journal = journal  # where writes wait while MLflow is failing
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}  # trial id -> child run id
        self._best: dict[str, float] = {}  # trial id -> best accuracy logged
        self._last_step: dict[str, int] = {}  # trial id -> last epoch logged
        self._resumed_from: dict[str, int] = {}  # trial id -> first epoch after a resume (0: none yet)
        self._configs: dict[str, dict[str, Any]] = {}  # trial id -> config, to create its run
        self._pending: list[Operation] = []
        self._retry_at = 0.0  # no MLflow write before this time (after a failure)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.tracking_uri,
            "parent_run_id": self.parent_run_id,
            "num_samples": self.num_samples,
            "max_epochs": self.max_epochs,
            "journal": self.journal,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    # Tune's hooks: each queues operations and tries to write them -------------

    def setup(self, **info: Any) -> None:
        """At the start and on every resume: first what an earlier run could not write."""
        if self.journal.exists():
            self._pending = [Operation(*entry) for entry in json.loads(self.journal.read_text())]
            self._flush()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._pending:
            self._flush()  # catch up once MLflow is back, even between results

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._configs[trial.trial_id] = dict(trial.config)
        self._submit(Operation("start", trial.trial_id, {}))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [
            [name, float(result[name]), now, step]
            for name in REPORTED_METRICS
            if name in result and math.isfinite(float(result[name]))
        ]
        self._submit(Operation("metrics", trial.trial_id, {"metrics": metrics}))
        if result.get(DIVERGED):
            self._submit(Operation("tags", trial.trial_id, {DIVERGED: "true"}))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        accuracy = trial.last_result.get(METRIC)
        if accuracy is not None:
            step = int(trial.last_result.get("epoch", 0))
            details = {"path": checkpoint.path, "accuracy": accuracy, "step": step}
            self._submit(Operation("checkpoint", trial.trial_id, details))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(Operation("status", trial.trial_id, {"status": "FINISHED"}))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A crash Tune will retry from the last checkpoint: the run says so, and stays RUNNING."""
        tags = {"retries": str(trial.run_metadata.num_failures), ERROR_TAG: _error_text(trial)}
        self._submit(Operation("tags", trial.trial_id, tags))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(Operation("tags", trial.trial_id, {ERROR_TAG: _error_text(trial)}))
        self._submit(Operation("status", trial.trial_id, {"status": "FAILED"}))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Tune calls this at the end, after a Ctrl-C too; unfinished trials mean an interruption."""
        statuses = {trial.trial_id: final_status(trial, self.max_epochs) for trial in trials}
        for trial_id, status in statuses.items():
            self._submit(Operation("status", trial_id, {"status": status, "if_started": True}))
        interrupted = "KILLED" in statuses.values() or len(trials) < self.num_samples
        self._submit(Operation("finish", "", {"interrupted": interrupted}))
        # The last chance in this run: give a restarting server a little time.
        deadline = time.monotonic() + self.END_GRACE_S
        while self._pending and time.monotonic() < deadline:
            self._retry_at = 0.0
            self._flush()
            if self._pending:
                time.sleep(2.0)

    # Writing -----------------------------------------------------------------

    def _submit(self, operation: Operation) -> None:
        self._pending.append(operation)
        self._flush()

    def _flush(self) -> None:
        if time.monotonic() < self._retry_at:
            return
        was_failing = self.journal.exists()
        while self._pending:
            try:
                self._apply(self._pending[0])
            except TRACKING_ERRORS as error:
                if not was_failing:
                    print(f"MLflow at {self.tracking_uri} failed ({first_line(error)[:200]}); "
                          f"training goes on, writes wait in {self.journal}", file=sys.stderr)  # fmt: skip
                self._retry_at = time.monotonic() + self.RETRY_AFTER_S
                self.journal.write_text(json.dumps([list(operation) for operation in self._pending]))
                return
            self._pending.pop(0)
        if was_failing:
            self.journal.unlink()
            print(f"MLflow at {self.tracking_uri} is back; the waiting writes are written", file=sys.stderr)

    def _apply(self, operation: Operation) -> None:
        kind, trial_id, details = operation
        if kind == "finish":
            self._finish_sweep(details["interrupted"])
            return
        if kind == "status" and details.get("if_started"):
            run_id = self._find_run(trial_id)  # a trial that never started has no run to close
            # Only a change: set_terminated would also move the run's end time to now.
            if run_id is not None and self.client.get_run(run_id).info.status != details["status"]:
                self.client.set_terminated(run_id, details["status"])
            return
        run_id = self._run_of(trial_id)
        if kind == "start":
            # A restored trial's run is RUNNING again, not the KILLED it was left as.
            self.client.update_run(run_id, status="RUNNING")
            if self._last_step.get(trial_id, 0) > 0:  # it had epochs before: a resumed trial
                self._resumed_from.setdefault(trial_id, 0)
        elif kind == "metrics":
            self._log_epoch(run_id, trial_id, details["metrics"])
        elif kind == "tags":
            tags = [RunTag(key, value[-ERROR_TAG_CHARS:]) for key, value in details.items()]
            self.client.log_batch(run_id, tags=tags)
        elif kind == "checkpoint":
            self._log_if_best(run_id, trial_id, details)
        elif kind == "status":
            self.client.set_terminated(run_id, details["status"])

    def _log_epoch(self, run_id: str, trial_id: str, metrics: list[list]) -> None:
        """Logs an epoch's metrics once: an epoch the run already has is skipped.

        A hard stop can come after an epoch reached MLflow but before Tune saved its
        checkpoint; the resumed trial then trains that epoch again.
        """
        step = metrics[0][3] if metrics else 0
        if self._resumed_from.get(trial_id) == 0:  # the first epoch since this trial was resumed
            self._resumed_from[trial_id] = step
            self.client.set_tag(run_id, "resumed_at_epoch", str(step))
        if step <= self._last_step.get(trial_id, 0):
            return
        self.client.log_batch(run_id, metrics=[Metric(*values) for values in metrics])
        self._last_step[trial_id] = step

    def _log_if_best(self, run_id: str, trial_id: str, details: dict[str, Any]) -> None:
        """Uploads the checkpoint when it is the trial's best so far; Tune keeps that one on disk."""
        if details["accuracy"] <= self._best.get(trial_id, -math.inf):
            return
        if not Path(details["path"]).exists():
            return  # superseded and deleted by Tune while MLflow was down: a later write has the best
        self.client.log_artifacts(run_id, details["path"], CHECKPOINT_ARTIFACT)
        best = Metric(BEST_METRIC, details["accuracy"], int(time.time() * 1000), details["step"])
        self.client.log_batch(run_id, metrics=[best])
        self._best[trial_id] = details["accuracy"]

    def _finish_sweep(self, interrupted: bool) -> None:
        """Summarizes the sweep on its parent run and closes it: KILLED when interrupted."""
        parent = self.client.get_run(self.parent_run_id)
        children = child_runs(self.client, parent)
        best = best_child_run(children)
        if best is not None:
            self.client.log_batch(
                self.parent_run_id,
                metrics=[Metric(BEST_METRIC, best.data.metrics[BEST_METRIC], int(time.time() * 1000), 0)],
                tags=[
                    RunTag("best_run_id", best.info.run_id),
                    RunTag("best_trial_id", best.data.tags.get(TRIAL_ID_TAG, "")),
                ],
            )
        write_sweep_report(self.client, parent, children)
        self.client.set_terminated(self.parent_run_id, "KILLED" if interrupted else "FINISHED")

    # Child runs ---------------------------------------------------------------

    def _run_of(self, trial_id: str) -> str:
        """The trial's child run: found again if it has one (after a restore), else created."""
        return self._find_run(trial_id) or self._create_run(trial_id)

    def _find_run(self, trial_id: str) -> str | None:
        if trial_id not in self._runs:
            found = self.client.search_runs(
                [self._experiment_id()],
                f"tags.{TRIAL_ID_TAG} = '{trial_id}' "
                f"and tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'",
                max_results=1,
            )
            if not found:
                return None
            run_id = found[0].info.run_id
            self._runs[trial_id] = run_id
            self._best[trial_id] = found[0].data.metrics.get(BEST_METRIC, -math.inf)
            self._last_step[trial_id] = max(
                (p.step for p in self.client.get_metric_history(run_id, METRIC)), default=0
            )
        return self._runs[trial_id]

    def _create_run(self, trial_id: str) -> str:
        parent = self.client.get_run(self.parent_run_id)
        run = self.client.create_run(
            parent.info.experiment_id,
            run_name=f"trial-{trial_id}",
            tags={
                MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                ROLE_TAG: "trial",
                TRIAL_ID_TAG: trial_id,
                SWEEP_TAG: parent.data.tags.get(SWEEP_TAG, ""),
            },
        )
        self.client.log_batch(run.info.run_id, params=as_params(self._configs.get(trial_id, {})))
        self._runs[trial_id] = run.info.run_id
        return run.info.run_id

    def _experiment_id(self) -> str:
        return self.client.get_run(self.parent_run_id).info.experiment_id


def _error_text(trial: Any) -> str:
    path = trial.error_file
    if path and Path(path).exists():
        return Path(path).read_text().strip()[-ERROR_TAG_CHARS:]
    return "(no error text was saved)"
