"""The MLflow store: finding and creating experiments and runs, and reading them back.

A sweep is one parent run; each Tune trial is one child run under it
(`mlflow.parentRunId`), tagged with its `trial_id`. The writer
(`search.tracking.writer`) writes them during a sweep; export, retrain and the
report read them here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import socket
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import requests
from mlflow.entities import Dataset, DatasetInput, InputTag, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from search.tracking.uri import check_tracking_uri, sqlite_file
from spaces import SearchSpace, space_record
from trainables.config import CIFAR10, FINAL_OF, DataSettings, TrialConfig
from trainables.errors import InputError, first_line
from trainables.names import (
    BEST_METRIC,
    CHECKPOINT_ARTIFACT,
    DIVERGED,
    LAST_WORDS_TXT,
    ORPHAN_TAG,
    REPORTED_METRICS,
    ROLE_TAG,
    SEARCHED_TAG,
    SPACE_ARTIFACT,
    SPACE_TAG,
    SWEEP_HOST_PARAM,
    SWEEP_LOCATION_PARAM,
    SWEEP_ROLE,
    SWEEP_SETTINGS_ARTIFACT,
    SWEEP_TAG,
    TRIAL_ID_TAG,
)

# Progress bars from artifact transfers would interleave with Tune's own output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# The tracker runs on Tune's event loop: a server that is down must not stall it for minutes
# (MLflow's defaults retry 7 times with backoff, 120 s each).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def check_store_exists(uri: str) -> str:
    """For readers: a SQLite store that is not there is a typo, not an empty store to create."""
    database = sqlite_file(check_tracking_uri(uri))
    if database is not None and not database.exists():
        raise InputError(f"no MLflow store at {database} (from {uri})")
    return uri


def default_tracking_uri() -> str:
    """MLflow's own default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return mlflow.get_tracking_uri()


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    database = sqlite_file(client.tracking_uri)
    if database is not None:  # keep artifacts beside the database, not in the working directory
        artifact_location = (database.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def find_sweep_run(client: MlflowClient, experiment_id: str, sweep: str | None) -> Run | None:
    """The parent run of the named sweep, or of the latest sweep when no name is given; never an
    orphan closed by `close_orphan`."""
    query = f"tags.{ROLE_TAG} = '{SWEEP_ROLE}'"
    if sweep is not None:
        query += f" and tags.{SWEEP_TAG} = '{sweep}'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=50)
    return next((run for run in runs if ORPHAN_TAG not in run.data.tags), None)


def claim_sweep_name(
    tracking_uri: str, experiment: str, sweep: str, location: str, has_tune_state: Callable[[str], bool]
) -> str | None:
    """One name, one sweep in an experiment, whatever --storage-path says: trials of two sweeps under
    one parent would be mixed in every reader. A new sweep (Tune state to go in `location`) under a
    taken name is refused. Only an orphan is passed by: a parent still RUNNING, with no trial, that
    never got its params (the store failed as it was made) or whose Tune state was to be in this same
    `location` and is not; it is closed FAILED, never adopted. Returns the orphan's run ID.

    It writes nothing but that: a store or experiment not there yet holds no name."""
    database = sqlite_file(tracking_uri)
    if database is not None and not database.exists():
        return None
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    parent = find_sweep_run(client, found.experiment_id, sweep) if found is not None else None
    if parent is None:
        return None
    recorded = parent.data.params.get(SWEEP_LOCATION_PARAM)
    never_began = not parent.data.params  # its params are logged right after it is made
    # The same place: a local folder of another machine is another place.
    here = recorded == location and parent.data.params.get(SWEEP_HOST_PARAM) == socket.gethostname()
    gone = here and not has_tune_state(location)
    if parent.info.status == "RUNNING" and (never_began or gone) and not child_runs(client, parent):
        where = f"in {location}" if gone else "(the store failed as its parent run was made)"
        close_orphan(client, parent.info.run_id, f"its sweep stopped before Tune saved any state {where}")
        return parent.info.run_id
    taken = f"the name {sweep} is taken in experiment {experiment!r} by a {parent.info.status} sweep, parent "
    taken += f"run {parent.info.run_id}"
    if gone:  # nothing a resume could continue
        raise InputError(f"{taken}, whose Tune state in {location} is gone: give another --name")
    storage = shlex.quote(recorded.rsplit("/", 1)[0]) if recorded else None
    continue_it = f"--resume --storage-path {storage}" if storage else "--resume and its --storage-path"
    raise InputError(f"{taken}: continue it with {continue_it}, or give another --name")


def close_orphan(client: MlflowClient, run_id: str, reason: str) -> None:
    """Closes a run that is no part of a sweep (a parent whose sweep never began, a lost trial's run),
    FAILED, saying why; readers then pass it by."""
    client.set_tag(run_id, ORPHAN_TAG, reason)
    client.set_terminated(run_id, "FAILED")


@dataclass(frozen=True)
class SweepRuns:
    """A sweep as MLflow holds it: its parent run and its trials' runs, and the client that read them."""

    client: MlflowClient
    parent: Run
    children: list[Run]


def find_sweep(tracking_uri: str, experiment: str, sweep: str | None) -> SweepRuns:
    """The named sweep (default: the experiment's latest), for a reader: a store, an experiment or a
    sweep that is not there is refused in one line."""
    client = MlflowClient(check_store_exists(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise InputError(f"no experiment {experiment!r} in {tracking_uri} (known: {known})")
    parent = find_sweep_run(client, found.experiment_id, sweep)
    if parent is None:
        raise InputError(f"no sweep {sweep or ''} in experiment {experiment!r}".replace("  ", " "))
    return SweepRuns(client, parent, child_runs(client, parent))


def read_sweep(tracking_uri: str, parent_run_id: str) -> SweepRuns:
    """A sweep that has run, by its parent run's id."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    return SweepRuns(client, parent, child_runs(client, parent))


def first_logged_s(client: MlflowClient, run_id: str, metric: str) -> float:
    """When a run first logged a metric, in seconds since the epoch."""
    return client.get_metric_history(run_id, metric)[0].timestamp / 1000


def download_checkpoint(client: MlflowClient, run_id: str, directory: Path) -> Path:
    """A trial's best checkpoint, downloaded into the directory: the folder that holds its files."""
    try:
        return Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(directory)))
    except MlflowException:
        raise InputError(f"run {run_id} has no {CHECKPOINT_ARTIFACT}/ artifact to register") from None


@dataclass(frozen=True)
class ImageDataset:
    """One split of images as MLflow records it: the UI's Dataset column shows name and digest."""

    name: str  # e.g. "images-train"
    digest: str  # changes when the images or the split change
    source: str  # the folder, or CIFAR-10's download location
    split: str  # "train", "validation" or "test": the input's context in MLflow
    num_images: int

    @classmethod
    def of(cls, data: DataSettings, split: str, fingerprint: str, num_images: int) -> ImageDataset:
        """The images of one split, named after their folder (or CIFAR-10), digested by their files."""
        if data.source == CIFAR10:
            name, source = CIFAR10, str(Path(data.root).resolve())
        else:
            name, source = Path(data.source).resolve().name, str(Path(data.source).resolve())
        digest = hashlib.sha256(f"{fingerprint}:{split}".encode()).hexdigest()[:16]
        return cls(f"{name}-{split}", digest, source, split, num_images)


def log_datasets(client: MlflowClient, run_id: str, datasets: Sequence[ImageDataset]) -> None:
    if not datasets:
        return
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                Dataset(
                    name=dataset.name,
                    digest=dataset.digest,
                    source_type="local",
                    source=json.dumps({"uri": dataset.source}),
                    profile=json.dumps({"num_images": dataset.num_images, "split": dataset.split}),
                ),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, dataset.split)],
            )
            for dataset in datasets
        ],
    )


@dataclass(frozen=True)
class SweepRun:
    """The sweep's parent run, known once, when the sweep starts."""

    run_id: str
    experiment_id: str
    sweep: str
    datasets: tuple[ImageDataset, ...]  # what every trial trains and validates on


def searched_tag(space: SearchSpace) -> str:
    """What a parent's SEARCHED_TAG holds: warm start finds sweeps of other names by it."""
    return ",".join(sorted(space.distributions()))


def start_sweep_run(
    client: MlflowClient,
    experiment: str,
    sweep: str,
    space: SearchSpace,
    params: Mapping[str, Any],
    datasets: tuple[ImageDataset, ...],
) -> SweepRun:
    """The sweep's parent run: reused when the sweep already has one, so a resume adds no duplicate."""
    experiment_id = get_or_create_experiment(client, experiment)
    existing = find_sweep_run(client, experiment_id, sweep)
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        return SweepRun(existing.info.run_id, experiment_id, sweep, datasets)
    run = client.create_run(
        experiment_id,
        run_name=sweep,
        tags={
            ROLE_TAG: SWEEP_ROLE,
            SWEEP_TAG: sweep,
            SPACE_TAG: space.reference,
            SEARCHED_TAG: searched_tag(space),
        },
    )
    try:
        client.log_batch(run.info.run_id, params=as_params(params))
        client.log_dict(run.info.run_id, dict(params), SWEEP_SETTINGS_ARTIFACT)
        client.log_dict(run.info.run_id, space_record(space), SPACE_ARTIFACT)
        log_datasets(client, run.info.run_id, datasets)
    except TRACKING_ERRORS as error:  # the sweep will not begin: its parent is closed, not left RUNNING
        with contextlib.suppress(*TRACKING_ERRORS):
            close_orphan(client, run.info.run_id, f"its sweep never began: {failure_cause(error)}")
        raise
    return SweepRun(run.info.run_id, experiment_id, sweep, datasets)


def load_json_artifact(client: MlflowClient, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory() as directory:
        try:
            local = client.download_artifacts(run_id, path, directory)
        except MlflowException:
            raise InputError(f"run {run_id} has no artifact {path}") from None
        return json.loads(Path(local).read_text())


def child_runs(client: MlflowClient, parent_run: Run) -> list[Run]:
    """The sweep's trial runs, oldest first; a lost trial's, closed as an orphan, is none of them."""
    runs = client.search_runs(
        [parent_run.info.experiment_id],
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10_000,
    )
    return [run for run in runs if ORPHAN_TAG not in run.data.tags]


def best_child_run(children: list[Run]) -> Run | None:
    """The child with the highest best-epoch accuracy (the epoch whose checkpoint was kept); in a
    sweep with a final trial (--top-rung best), that trial: the search's best, trained to the end,
    is the sweep's model, whatever a trial stopped at a lower rung scored on the validation images.

    Ties go to the trial that started first, so the answer never depends on listing order.
    """
    ranked = [run for run in children if BEST_METRIC in run.data.metrics]
    finals = [run for run in ranked if FINAL_OF in run.data.params]
    ranked = finals or ranked
    return max(ranked, key=lambda run: (run.data.metrics[BEST_METRIC], -run.info.start_time), default=None)


def is_diverged(run: Run) -> bool:
    return run.data.tags.get(DIVERGED) == "true"


def status_counts(children: list[Run]) -> Counter[str]:
    """How many trials ended in each MLflow status (FINISHED, FAILED, KILLED, RUNNING)."""
    return Counter(run.info.status for run in children)


def trial_table(children: list[Run]) -> pa.Table:
    """One row a trial: its config, final and best metrics, status."""
    rows = []
    for run in children:
        row: dict[str, Any] = {
            "trial_id": run.data.tags.get(TRIAL_ID_TAG),
            "run_id": run.info.run_id,
            "status": run.info.status,
            "diverged": is_diverged(run),
            **TrialConfig.from_params(run.data.params).to_dict(),
        }
        row.update({f"final_{name}": run.data.metrics.get(name) for name in REPORTED_METRICS})
        row[BEST_METRIC] = run.data.metrics.get(BEST_METRIC)
        rows.append(row)
    return pa.Table.from_pylist(rows)


class TrackingFailed(Exception):
    """MLflow failed after the training ran: the results are safe in Tune's storage, and the MLflow
    writes wait in the sweep's journal for --resume."""


# What a failing tracking store raises: MLflow's own errors, HTTP and file-system ones.
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)


def failure_cause(error: BaseException) -> str:
    """What a failed MLflow call comes down to, in one short line: the status a server answered
    with (MLflow's retries otherwise bury it under "Max retries exceeded"), else the error itself."""
    response = getattr(error, "response", None)  # a requests.HTTPError carries the server's answer
    if response is not None:
        return f"the server answered {response.status_code} {response.reason}: {response.text.strip()[:200]}"
    text = first_line(error)
    retried = re.search(r"too many (\d{3}) error responses", text)
    if retried:
        status = HTTPStatus(int(retried[1]))
        return f"the server answered {status.value} {status.phrase} to every try, its log says why"
    return text[:200]


def log_last_words(tracking_uri: str, parent_run_id: str, text: str) -> None:
    """The lines a sweep ended with, on its parent run, where MLflow takes them: the copy beside
    the sweep's folder stands either way."""
    with contextlib.suppress(*TRACKING_ERRORS):
        MlflowClient(tracking_uri).log_text(parent_run_id, text, LAST_WORDS_TXT)


def open_store(uri: str) -> MlflowClient:
    """A client of the store. A new SQLite store is created under a lock on its folder: two sweeps
    creating one at the same moment would both create its tables, and one would fail."""
    database = sqlite_file(uri)
    if database is None:
        return MlflowClient(uri)
    folder = os.open(database.resolve().parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the tables are created by the first use
        return client
    finally:
        os.close(folder)  # and with it the lock


def as_params(values: Mapping[str, Any]) -> list[Param]:
    """MLflow params (strings), in a stable order."""
    return [Param(key, str(value)) for key, value in sorted(values.items())]
