"""The MLflow writes of a sweep, one small class per kind, and the writer that applies them.

An operation names its trial by Tune's trial id, never by MLflow run id, so it
can wait in the journal and be applied after a restart: the writer finds the
trial's run again by its tags. Applying an operation twice leaves the store as
applying it once, so a journal replayed after a crash never duplicates a metric.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mlflow.entities import Metric, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from search.tracking.report import write_sweep_report
from search.tracking.store import (
    TRACKING_ERRORS,
    SweepRun,
    as_params,
    best_child_run,
    child_runs,
    close_orphan,
    failure_cause,
    log_datasets,
)
from spaces import SearchSpace
from trainables.names import (
    BEST_METRIC,
    BEST_RUN_ID_TAG,
    BEST_TRIAL_ID_TAG,
    CHECKPOINT_ARTIFACT,
    EPOCH,
    METRIC,
    RESUMED_AT_TAG,
    ROLE_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    TRIAL_ROLE,
    WAITING_UPLOADS_TAG,
)
from trainables.stats import wilson_interval

ERROR_TAG_CHARS = 4000  # MLflow's limit on a tag value is larger; the end of a traceback says enough
LOST_TRIAL = (
    "its trial was lost: a hard stop came after this run was made and before Tune saved the trial, "
    "and no resume made the trial again"
)


@dataclass
class TrialRun:
    """A trial's child run, and what the writer has logged to it."""

    run_id: str
    best: float = -math.inf  # the best accuracy whose checkpoint is logged
    steps: set[int] = dataclasses.field(default_factory=set)  # the steps (images seen) logged
    resumed: bool = False  # restarted on a run that already has epochs: tag where it went on


class UploadFailed(Exception):
    """The artifact store failed to take an upload: the writes that need it wait, the others go on
    (a server's artifact store can fail while its tracking store works)."""


class MlflowWriter:
    """Applies operations to the store, finding each trial's run once and remembering it."""

    def __init__(self, tracking_uri: str, sweep: SweepRun, space: SearchSpace) -> None:
        self.tracking_uri = tracking_uri
        self.sweep = sweep
        self.space = space  # what the sweep searched: the report's ranges
        self._client: MlflowClient | None = None
        self._trials: dict[str, TrialRun] = {}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:  # made on first use: the writer is built before MLflow is needed
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def apply(self, operation: Operation) -> None:
        operation.apply(self)

    def trial(self, trial_id: str) -> TrialRun:
        found = self.find(trial_id)
        if found is None:  # an operation of a trial whose StartTrial has not been applied
            raise LookupError(f"trial {trial_id} has no MLflow run yet")
        return found

    def find(self, trial_id: str) -> TrialRun | None:
        """The trial's child run, looked up by its tags once (so a resumed sweep finds it again)."""
        if trial_id not in self._trials:
            query = f"tags.{TRIAL_ID_TAG} = '{trial_id}' "
            query += f"and tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.sweep.run_id}'"
            found = self.client.search_runs([self.sweep.experiment_id], query, max_results=1)
            if not found:
                return None
            self._remember(trial_id, found[0])
        return self._trials[trial_id]

    def _remember(self, trial_id: str, run: Run) -> TrialRun:
        """The trial's run as the writer keeps it: what it has logged, read once."""
        history = self.client.get_metric_history(run.info.run_id, METRIC)
        self._trials[trial_id] = TrialRun(
            run_id=run.info.run_id,
            best=run.data.metrics.get(BEST_METRIC, -math.inf),
            steps={point.step for point in history},
        )
        return self._trials[trial_id]

    def adopt(self, trial_id: str, run_name: str) -> TrialRun | None:
        """The child run of a trial that a hard stop lost: its run reached MLflow, but Tune's snapshot
        never held it. A resume creates the trial again, under its number and config (so its name)
        and a new trial ID; the run is re-tagged with that ID, and keeps what it has."""
        quote = '"' if "'" in run_name else "'"  # MLflow's filter takes either; a name has one at most
        query = f"attributes.run_name = {quote}{run_name}{quote} "
        query += f"and tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.sweep.run_id}'"
        found = self.client.search_runs([self.sweep.experiment_id], query, max_results=1)
        if not found:
            return None
        self.client.set_tag(found[0].info.run_id, TRIAL_ID_TAG, trial_id)
        return self._remember(trial_id, found[0])

    def add(self, trial_id: str, run_id: str) -> TrialRun:
        self._trials[trial_id] = TrialRun(run_id)
        return self._trials[trial_id]

    def upload(self, run_id: str, folder: str, artifact_path: str | None = None) -> None:
        """Logs a folder's files as the run's artifacts; a failure is the artifact store's."""
        try:
            self.client.log_artifacts(run_id, folder, artifact_path)
        except TRACKING_ERRORS as error:
            raise UploadFailed(failure_cause(error)) from error

    def close_while_uploads_wait(self, waiting: str) -> None:
        """At the end of a run with uploads still waiting: the parent is FAILED, not left RUNNING,
        and says what waits; the FinishSweep that waits with them closes it for good."""
        self.client.set_tag(self.sweep.run_id, WAITING_UPLOADS_TAG, waiting)
        self.client.set_terminated(self.sweep.run_id, "FAILED")


class Operation:
    """One write; `apply` performs it through the writer. Subclasses are frozen dataclasses."""

    KINDS: ClassVar[dict[str, type[Operation]]] = {}
    needs_uploads: ClassVar[bool] = False  # waits while the artifact store fails

    def __init_subclass__(cls) -> None:
        Operation.KINDS[cls.__name__] = cls

    def apply(self, writer: MlflowWriter) -> None:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @staticmethod
    def from_json(values: dict[str, Any]) -> Operation:
        fields = dict(values)
        return Operation.KINDS[fields.pop("kind")](**fields)


@dataclass(frozen=True)
class StartTrial(Operation):
    """Creates the trial's run, or reopens it when a resumed sweep restarts the trial."""

    trial_id: str
    run_name: str
    # The run's params (callback.run_params): the config and its searched values. Named config
    # still, since journals written before keep the field under that name.
    config: dict[str, Any]
    reopen: bool = True  # False when rebuilding a run from Tune's records: create it if missing, no more

    def apply(self, writer: MlflowWriter) -> None:
        existing = writer.find(self.trial_id) or writer.adopt(self.trial_id, self.run_name)
        if existing is not None:
            if self.reopen:  # a restored trial: RUNNING again, not the KILLED it was left as
                writer.client.update_run(existing.run_id, status="RUNNING")
                existing.resumed = bool(existing.steps)
            return
        run = writer.client.create_run(
            writer.sweep.experiment_id,
            run_name=self.run_name,
            tags={
                MLFLOW_PARENT_RUN_ID: writer.sweep.run_id,
                ROLE_TAG: TRIAL_ROLE,
                TRIAL_ID_TAG: self.trial_id,
                SWEEP_TAG: writer.sweep.sweep,
            },
        )
        writer.client.log_batch(run.info.run_id, params=as_params(self.config))
        log_datasets(writer.client, run.info.run_id, writer.sweep.datasets)
        writer.add(self.trial_id, run.info.run_id)


@dataclass(frozen=True)
class LogReport(Operation):
    """A report's metrics, at its step (the images seen), logged once: a step the run has is skipped.

    A hard stop can come after a report reached MLflow but before Tune saved its
    checkpoint; the resumed trial then trains that stretch again. And a rebuild from
    Tune's records may bring earlier reports after later ones.
    """

    trial_id: str
    step: int
    metrics: dict[str, float]
    timestamp_ms: int

    def apply(self, writer: MlflowWriter) -> None:
        trial = writer.trial(self.trial_id)
        if trial.resumed:  # the first report since this trial was resumed
            trial.resumed = False
            writer.client.set_tag(trial.run_id, RESUMED_AT_TAG, f"{self.metrics.get(EPOCH, 0):g}")
        if self.step in trial.steps:
            return
        metrics = [Metric(name, value, self.timestamp_ms, self.step) for name, value in self.metrics.items()]
        writer.client.log_batch(trial.run_id, metrics=metrics)
        trial.steps.add(self.step)


@dataclass(frozen=True)
class LogParams(Operation):
    """Params a trial learns as it runs (its precision, resolved on its own device); logging a param
    again with the same value is allowed, so a replay is harmless."""

    trial_id: str
    params: dict[str, str]

    def apply(self, writer: MlflowWriter) -> None:
        writer.client.log_batch(writer.trial(self.trial_id).run_id, params=as_params(self.params))


@dataclass(frozen=True)
class TagTrial(Operation):
    trial_id: str
    tags: dict[str, str]

    def apply(self, writer: MlflowWriter) -> None:
        tags = [RunTag(key, value[-ERROR_TAG_CHARS:]) for key, value in self.tags.items()]
        writer.client.log_batch(writer.trial(self.trial_id).run_id, tags=tags)


@dataclass(frozen=True)
class LogCheckpoint(Operation):
    """Uploads a checkpoint when it is the trial's best so far; Tune keeps that one on disk."""

    needs_uploads: ClassVar[bool] = True
    trial_id: str
    path: str
    accuracy: float
    step: int

    def apply(self, writer: MlflowWriter) -> None:
        trial = writer.trial(self.trial_id)
        if self.accuracy <= trial.best:
            return
        if not Path(self.path).exists():
            return  # superseded and deleted by Tune while MLflow was down: a later write has the best
        writer.upload(trial.run_id, self.path, CHECKPOINT_ARTIFACT)
        best = Metric(BEST_METRIC, self.accuracy, int(time.time() * 1000), self.step)
        writer.client.log_batch(trial.run_id, metrics=[best])
        trial.best = self.accuracy


@dataclass(frozen=True)
class EndTrial(Operation):
    """Sets the run's final status, only when it changes (which would move its end time to now)."""

    trial_id: str
    status: str  # FINISHED, FAILED or KILLED
    only_if_started: bool = False  # at the sweep's end: a trial that never started has no run

    def apply(self, writer: MlflowWriter) -> None:
        trial = writer.find(self.trial_id) if self.only_if_started else writer.trial(self.trial_id)
        if trial is not None and writer.client.get_run(trial.run_id).info.status != self.status:
            writer.client.set_terminated(trial.run_id, self.status)


@dataclass(frozen=True)
class FinishSweep(Operation):
    """Summarizes the sweep on its parent run and closes it: KILLED when interrupted. It waits for
    the checkpoint uploads before it: the best it names has its checkpoint in MLflow."""

    needs_uploads: ClassVar[bool] = True
    interrupted: bool
    # Every trial Tune holds, at a sweep's end: a child run of none of them is a lost trial's (see
    # MlflowWriter.adopt) that no resume made again, closed as an orphan. None in older journals.
    trial_ids: list[str] | None = None

    def apply(self, writer: MlflowWriter) -> None:
        client, parent_id = writer.client, writer.sweep.run_id
        parent = client.get_run(parent_id)
        children = child_runs(client, parent)
        if not self.interrupted and self.trial_ids is not None:
            for lost in [run for run in children if run.data.tags.get(TRIAL_ID_TAG) not in self.trial_ids]:
                close_orphan(client, lost.info.run_id, LOST_TRIAL)
                children.remove(lost)
        best = best_child_run(children)
        if best is not None:
            accuracy, now = best.data.metrics[BEST_METRIC], int(time.time() * 1000)
            low, high = wilson_interval(accuracy, int(parent.data.params.get("data_val_size", 0)))
            client.log_batch(
                parent_id,
                metrics=[
                    Metric(BEST_METRIC, accuracy, now, 0),
                    Metric(f"{BEST_METRIC}_low", low, now, 0),  # its 95% interval
                    Metric(f"{BEST_METRIC}_high", high, now, 0),
                ],
                tags=[
                    RunTag(BEST_RUN_ID_TAG, best.info.run_id),
                    RunTag(BEST_TRIAL_ID_TAG, best.data.tags.get(TRIAL_ID_TAG, "")),
                ],
            )
        write_sweep_report(client, parent, children, writer.space, writer.upload)
        if WAITING_UPLOADS_TAG in parent.data.tags:  # they waited, and are written now
            client.delete_tag(parent_id, WAITING_UPLOADS_TAG)
        client.set_terminated(parent_id, "KILLED" if self.interrupted else "FINISHED")
