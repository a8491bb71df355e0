"""What a sweep is asked to do, validated, and fast checks that the places it names answer.

Light on purpose: `search.run` rejects bad options and unreachable servers in about a
second, before it loads torch, Ray and MLflow.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from search.sweep.storage import StoredFile, check_storage, is_uri, join, resolve_storage
from spaces import get_space
from trainables.config import CIFAR10, PRECISIONS, SCHEDULES, UNRECORDED_SCHEDULE, DataSettings
from trainables.errors import InputError

SCHEDULERS = ("asha", "fifo")
SAMPLERS = ("tpe", "gp", "random")  # Optuna's multivariate TPE, its Gaussian-process sampler, random search
# What `search.run` shows while it sweeps: one status line (default), Tune's own tables
# (--verbose), or nothing but the final summary (--quiet).
OUTPUTS = ("progress", "verbose", "quiet")
# The default --compute-budget, per epoch a trial may train: about what the first default sweep
# (8 one-epoch trials, drawn at random over the nesterov space) trained, 29-65 TFLOP over six seeds,
# mean 50. With bf16 this machine trains it in about half the 10m39s that sweep took in fp32.
COMPUTE_BUDGET_TFLOP_PER_EPOCH = 60.0


@dataclass(frozen=True)
class SweepSettings:
    """Every option of `search.run`, validated; the CLI builds one from its arguments."""

    space: str
    data: DataSettings = field(default_factory=DataSettings)
    epochs: int = 1  # most epochs a trial gets (ASHA's max_t)
    # The most trials; on the nesterov space the compute budget ends a sweep first (13-16 trials in
    # the search benchmark). With ASHA's rungs at a ninth, a third and all of an epoch, the first
    # trials (one window, see search.sweep.scheduler) train to the end, most later ones stop at a ninth.
    num_samples: int = 25
    scheduler: str = "asha"
    rungs: int = 3  # ASHA's: each reduction_factor times the last, the last at all the training
    reduction_factor: int = 3  # of the trials at a rung, 1 in this many goes on to the next
    # One of SAMPLERS: GP's picks scored best on the mean in the search benchmark (README; within noise).
    sampler: str = "gp"
    # One of SCHEDULES, over each trial's whole budget (trainables.recipe.sweep_recipe).
    # One cycle's picks scored higher on the audit split than the constant rate's (README).
    schedule: str = "onecycle"
    warm_start: bool = True  # start from the finished trials of earlier sweeps like this one
    time_budget_s: float | None = None  # after this, no new trial starts; those under way end
    # After this much training (TFLOP), no new trial starts; those under way end. None:
    # COMPUTE_BUDGET_TFLOP_PER_EPOCH for each of --epochs; inf: no budget (--num-samples alone).
    compute_budget_tflop: float | None = None
    seed: int = 0
    precision: str = "auto"  # one of trainables.loop.PRECISIONS
    gpus_per_trial: float | None = None  # None: search.sweep's GPUS_PER_TRIAL_WHEN_PRESENT with GPUs
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None  # None: as many as the resources allow
    max_failures: int = 0  # retries of a crashed trial, from its last checkpoint
    tracking_uri: str | None = None  # None: MLflow's default
    # At the end, how long writes still waiting for MLflow are retried (a server restarting)
    # before they are left in the journal for --resume.
    tracking_grace_s: float = 30.0
    experiment: str | None = None  # None: "cifar10-<space>"
    storage_path: str = "~/ray_results"
    name: str | None = None  # None: "<space>-<timestamp>"
    resume: bool = False
    address: str | None = None  # an existing Ray cluster; None: a local one
    output: str = "progress"  # one of OUTPUTS: a status line, Tune's own tables, or nothing

    def __post_init__(self) -> None:
        get_space(self.space)  # an unknown name fails here, with the known ones
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.data.val_size >= 1, f"--val-size must be >= 1, got {self.data.val_size}"),
            (self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}"),
            (self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.rungs >= 1, f"--rungs must be >= 1, got {self.rungs}"),
            (self.reduction_factor >= 2, f"--reduction-factor must be >= 2, got {self.reduction_factor}"),
            (self.time_budget_s is None or self.time_budget_s > 0, "--time-budget must be more than 0"),
            (self.compute_budget > 0, f"--compute-budget must be more than 0, got {self.compute_budget}"),
            (self.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}"),
            (self.max_failures >= 0, f"--max-failures must be >= 0, got {self.max_failures}"),
            (self.tracking_grace_s >= 0, "--tracking-grace must be >= 0"),
            (self.max_concurrent is None or self.max_concurrent >= 1, "--max-concurrent must be >= 1"),
            (self.gpus_per_trial is None or self.gpus_per_trial >= 0, "--gpus-per-trial must be >= 0"),
            (not self.resume or self.name is not None, "--resume needs the --name of the sweep to resume"),
            (  # the name is a folder in the storage: it must stay one, inside it
                self.name is None
                or (bool(self.name) and "/" not in self.name and not self.name.startswith(".")),
                f"--name must be a plain name (no '/', not starting with '.'), got {self.name!r}",
            ),
            (self.experiment is None or self.experiment.strip() != "", "--experiment must not be empty"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.output in OUTPUTS, f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        if self.tracking_uri is not None:
            check_tracking_uri(self.tracking_uri)
        check_storage(self.storage_path)  # a URI no filesystem reads fails here, before any work
        if self.name is None:  # fixed once, so every reader sees the same name
            object.__setattr__(self, "name", f"{self.space}-{time.strftime('%Y%m%d-%H%M%S')}")

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"cifar10-{self.space}"

    @property
    def storage(self) -> str:
        """Tune's storage: an absolute local folder, or a filesystem URI as given."""
        return resolve_storage(self.storage_path)

    @property
    def sweep_location(self) -> str:
        return join(self.storage, self.sweep_name)

    @property
    def journal(self) -> StoredFile:
        """MLflow writes that wait while MLflow fails: written later, or by --resume.

        Beside the sweep's folder, not in it: Tune copies that folder down when it restores
        a sweep and back up as it runs, which would bring back a journal already written.
        """
        return StoredFile(join(self.storage, f"{self.sweep_name}.mlflow-pending.json"))

    @property
    def compute_budget(self) -> float:
        """The TFLOP of training after which the sweep starts no new trial (inf: none)."""
        if self.compute_budget_tflop is None:
            return COMPUTE_BUDGET_TFLOP_PER_EPOCH * self.epochs
        return self.compute_budget_tflop

    @property
    def rung_fractions(self) -> tuple[float, ...]:
        """Where ASHA decides, below the end, as fractions of a trial's training (none under FIFO)."""
        if self.scheduler != "asha":
            return ()
        return tuple(self.reduction_factor**-level for level in range(self.rungs - 1, 0, -1))

    @property
    def identity_file(self) -> StoredFile:
        """What the sweep is (`identity`), recorded beside its folder when it starts."""
        return StoredFile(join(self.storage, f"{self.sweep_name}.sweep.json"))

    def identity(self) -> dict[str, Any]:
        """The settings that make the sweep what it is: a --resume may not change them.

        Those that only change how it runs (output, resources, the tracking URI, where
        the images are cached) are left out.
        """
        data = self.data
        source = data.source if data.source == CIFAR10 else str(Path(data.source).resolve())
        return {
            "--space": self.space,
            "--data": source,
            "--val-size": data.val_size,
            "--max-train-images": data.max_train_images,
            "--seed": self.seed,
            "--epochs": self.epochs,
            "--num-samples": self.num_samples,
            "--scheduler": self.scheduler,
            "--rungs": self.rungs,
            "--reduction-factor": self.reduction_factor,
            "--sampler": self.sampler,
            "--schedule": self.schedule,
            "--experiment": self.experiment_name,
        }

    def check_resumes_the_same_sweep(self) -> None:
        """A --resume may change how the sweep runs, never what it is (its recorded `identity`)."""
        if not self.resume or not self.identity_file.exists():
            return
        recorded = json.loads(self.identity_file.read_text())
        recorded.setdefault("--schedule", UNRECORDED_SCHEDULE)
        changed = [(flag, value) for flag, value in recorded.items() if self.identity().get(flag) != value]
        if changed:
            flag, value = changed[0]
            raise InputError(
                f"--resume cannot change what sweep {self.sweep_name} is: its {flag} was {value!r}, "
                f"now {self.identity().get(flag)!r} (start a new sweep with another --name instead)"
            )

    @property
    def optuna_journal(self) -> str | None:
        """The sweep's Optuna study, as a file beside its folder; None (in memory) on remote storage,
        since Optuna's journal needs a local file's locks."""
        return None if is_uri(self.storage) else join(self.storage, f"{self.sweep_name}.optuna.log")

    @property
    def sweep_name(self) -> str:
        assert self.name is not None  # set in __post_init__
        return self.name


KNOWN_SCHEMES = {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks"}


def check_tracking_uri(uri: str) -> str:
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in KNOWN_SCHEMES:
        known = ", ".join(sorted(s for s in KNOWN_SCHEMES if s))
        raise InputError(f"unknown tracking URI scheme {scheme!r} in {uri} (known: {known})")
    return uri


def check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Fails fast, naming the URI, when the store cannot be reached or created.

    MLflow's own client would retry an unreachable server for minutes before failing.
    """
    database = sqlite_file(uri)
    if database is not None and not database.resolve().parent.is_dir():
        raise InputError(
            f"cannot create MLflow store {uri}: folder {database.resolve().parent} does not exist"
        )
    if urlparse(uri).scheme in {"http", "https"}:
        try:
            response = requests.get(
                f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                params={"max_results": 1},
                timeout=timeout_s,
                **_credentials(),
            )
        except requests.RequestException as error:
            raise InputError(
                f"MLflow tracking server {uri} is unreachable ({type(error).__name__})"
            ) from None
        if response.status_code in (401, 403):
            raise InputError(
                f"MLflow at {uri} refused the login (HTTP {response.status_code}): "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            )
        if response.status_code >= 500:
            raise InputError(f"MLflow tracking server {uri} answered HTTP {response.status_code}")


def _credentials() -> dict[str, Any]:
    """The login MLflow's own client would send, from the same environment variables."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"auth": (user, password)}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"headers": {"Authorization": f"Bearer {token}"}} if token else {}


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (sqlite:///rel.db, sqlite:////abs.db), else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def check_ray_address(address: str | None, timeout_s: float = 3.0) -> None:
    """Fails fast, naming the address, when no Ray head listens there.

    Ray itself would retry for tens of seconds, printing a warning every second.
    """
    if address is None or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        raise InputError(f"--address must be HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise InputError(f"no Ray cluster answers at {address} ({error.__class__.__name__})") from None
