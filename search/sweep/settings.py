"""What a sweep is asked to do, validated, and fast checks that the places it names answer.

Light on purpose: `search.run` rejects bad options and unreachable servers in about a
second, before it loads torch, Ray and MLflow.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.distributions import json_to_distribution

from search.storage import StoredFile, check_storage, is_uri, join, resolve_storage
from search.tracking.uri import check_tracking_uri
from spaces import Range, SearchSpace, load_space, space_record
from spaces.loading import describe
from trainables.config import CIFAR10, PRECISIONS, DataSettings
from trainables.errors import InputError
from trainables.names import LAST_WORDS_TXT
from trainables.recipe import ASSIGNMENT, UNRECORDED_SCHEDULE, Recipe

SCHEDULERS = ("asha", "fifo")
# How a sweep fills ASHA's top rung, all of --epochs: asha promotes to it as to any rung; best trains
# only the best trial of the search to it, once the search has ended (search.sweep.searcher).
TOP_RUNGS = ("asha", "best")
# Where the lowest rung goes when --rungs is not given: a ninth of the first epoch, where the
# one-epoch default has stopped most trials since rungs came in (README, *Rungs within an epoch*).
LOWEST_RUNG_EPOCHS = 1 / 9
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

    space: str  # --space: a short name, FILE.py:FUNCTION or MODULE:FUNCTION (spaces.loading)
    ranges: tuple[Range, ...] = ()  # --range: searched parameters sampled from other ranges
    fixed: tuple[tuple[str, Any], ...] = ()  # --fix: parameters or constants pinned, (name, value)
    data: DataSettings = field(default_factory=DataSettings)
    epochs: int = 1  # most epochs a trial gets (ASHA's max_t)
    # The most trials; on the nesterov space the compute budget ends a sweep first (13-16 trials in
    # the search benchmark). With ASHA's rungs at a ninth, a third and all of an epoch, the first
    # trials (one window, see search.sweep.scheduler) train to the end, most later ones stop at a ninth.
    num_samples: int = 25
    scheduler: str = "asha"
    # ASHA's, the last at all the training, each reduction_factor times the one below (under
    # top_rung best, the top reduction_factor squared); None: as many as put the lowest at
    # LOWEST_RUNG_EPOCHS (3 for one epoch: a ninth, a third, all of it).
    rungs: int | None = None
    reduction_factor: int = 3  # of the trials at a rung, 1 in this many goes on to the next
    top_rung: str = "asha"  # one of TOP_RUNGS
    # One of SAMPLERS: GP's picks scored best on the mean in the search benchmark (README; within noise).
    sampler: str = "gp"
    # How every trial trains, over its whole budget (--epochs): the retrain of the best trains so too.
    # The assignment's with one cycle: its picks scored higher on the audit split than the constant
    # rate's (README).
    recipe: Recipe = ASSIGNMENT
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
        object.__setattr__(self, "ranges", tuple(self.ranges))  # hashable: the loaded space is cached
        object.__setattr__(self, "fixed", tuple(tuple(pin) for pin in self.fixed))
        self.search_space  # noqa: B018  (a space that cannot be swept fails here, in one line)
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.data.val_size >= 1, f"--val-size must be >= 1, got {self.data.val_size}"),
            (self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}"),
            (self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}"),
            (self.rungs is None or self.rungs >= 1, f"--rungs must be >= 1, got {self.rungs}"),
            (self.top_rung in TOP_RUNGS, f"--top-rung must be one of {', '.join(TOP_RUNGS)}"),
            (
                self.top_rung == "asha" or self.scheduler == "asha",
                "--top-rung best needs --scheduler asha: the best of the search is chosen at its rungs",
            ),
            (
                self.top_rung == "asha" or self.num_samples >= 2,
                "--top-rung best needs --num-samples 2 or more: a trial to search, and the final one",
            ),
            (
                self.top_rung == "asha" or self.rungs is None or self.rungs >= 2,
                "--top-rung best needs --rungs 2 or more: the search's, and the top",
            ),
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
            object.__setattr__(self, "name", f"{self.search_space.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if self.rungs is None:  # resolved once too: the parent run and the identity record the number
            object.__setattr__(self, "rungs", self._rungs_to_the_lowest())

    @property
    def search_space(self) -> SearchSpace:
        """--space under --range and --fix (spaces.loading loads each once)."""
        return load_space(self.space, self.ranges, self.fixed)

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"cifar10-{self.search_space.name}"

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
        """Where ASHA decides, below the end, as fractions of a trial's training (none under FIFO).

        Under top_rung best, the search's highest rung is reduction_factor squared below the top:
        the final trial alone then costs what that many of the search's top trials do, and a
        compute budget near one final run still pays for a search under it.
        """
        if self.scheduler != "asha":
            return ()
        assert self.rungs is not None  # resolved in __post_init__
        gap = 2 if self.top_rung == "best" else 1
        return tuple(self.reduction_factor**-level for level in range(self.rungs - 2 + gap, gap - 1, -1))

    def _rungs_to_the_lowest(self) -> int:
        """The fewest rungs that put the lowest at or below LOWEST_RUNG_EPOCHS (the top counts one)."""
        gap = 2 if self.top_rung == "best" else 1
        rungs = 2
        while self.epochs * self.reduction_factor ** -(rungs - 2 + gap) > LOWEST_RUNG_EPOCHS + 1e-9:
            rungs += 1
        return rungs

    @property
    def identity_file(self) -> StoredFile:
        """What the sweep is (`identity`), recorded beside its folder when it starts."""
        return StoredFile(join(self.storage, f"{self.sweep_name}.sweep.json"))

    @property
    def last_words_file(self) -> StoredFile:
        """What search.run printed as the sweep ended (search.run's LastWords), beside its folder."""
        return StoredFile(join(self.storage, f"{self.sweep_name}.{LAST_WORDS_TXT}"))

    @property
    def images_file(self) -> StoredFile:
        """The training images it began with (trainables.data.image_inventory), beside its folder."""
        return StoredFile(join(self.storage, f"{self.sweep_name}.images.json"))

    def identity(self) -> dict[str, Any]:
        """The settings that make the sweep what it is: a --resume may not change them.

        Those that only change how it runs (output, resources, the tracking URI, where
        the images are cached) are left out.
        """
        data = self.data
        source = data.source if data.source == CIFAR10 else str(Path(data.source).resolve())
        record = space_record(self.search_space)
        return {
            "--space": record["space"],
            "space": space_identity(record),
            "--data": source,
            "--val-size": data.val_size,
            "--max-train-images": data.max_train_images,
            "--seed": self.seed,
            "--epochs": self.epochs,
            "--num-samples": self.num_samples,
            "--scheduler": self.scheduler,
            "--rungs": self.rungs,
            "--reduction-factor": self.reduction_factor,
            "--top-rung": self.top_rung,
            "--sampler": self.sampler,
            "--experiment": self.experiment_name,
            **recipe_flags(self.recipe),
        }

    def check_resumes_the_same_sweep(self) -> None:
        """A --resume may change how the sweep runs, never what it is (its recorded `identity`)."""
        if not self.resume or not self.identity_file.exists():
            return
        recorded = json.loads(self.identity_file.read_text())
        recorded.setdefault("--top-rung", "asha")  # recorded before it existed
        if "--recipe" not in recorded:  # recorded before recipes: the assignment's, at its --schedule
            legacy = Recipe.from_record({"schedule": recorded.pop("--schedule", UNRECORDED_SCHEDULE)})
            recorded.update(recipe_flags(legacy))
        now = self.identity()
        space_was, space_now = recorded.pop("space", None), now.pop("space")
        changed = [(flag, value) for flag, value in recorded.items() if now.get(flag) != value]
        if changed:  # another --space first, by name
            flag, value = changed[0]
            self._refuse_resume(f"its {flag} was {value!r}, now {now.get(flag)!r}")
        # Recorded since 2026-12-07: what the space searched, and its constants (an edited file).
        changes = space_was and space_changes(space_was, space_now)
        if changes:
            self._refuse_resume(f"its space changed: {changes}")
        if self.images_file.exists():  # recorded since 2026-12-07
            from trainables.data import image_inventory, inventory_changes  # torch: a resume needs it anyway

            began_with = json.loads(self.images_file.read_text())  # null: CIFAR-10's download
            changes = began_with and inventory_changes(began_with, image_inventory(self.data) or {})
            if changes:
                self._refuse_resume(f"its images changed since it began: {changes}")

    def _refuse_resume(self, what_changed: str) -> None:
        raise InputError(
            f"--resume cannot change what sweep {self.sweep_name} is: {what_changed} "
            "(start a new sweep with another --name instead)"
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


def space_identity(record: dict[str, Any]) -> dict[str, Any]:
    """What makes a space what it is, of its record: each searched range, each constant."""
    searched = {name: parameter["distribution"] for name, parameter in record["searched"].items()}
    return {"searched": searched, "constants": record["constants"]}


def space_changes(before: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two identities of a space (space_identity), parameter by parameter."""
    changes = []
    for part in ("searched", "constants"):
        was, new = before.get(part, {}), now.get(part, {})
        for name in sorted(set(was) | set(new)):
            if was.get(name) != new.get(name):
                old_value, new_value = (_as_said(side.get(name), part) for side in (was, new))
                changes.append(f"{name} was {old_value}, now {new_value}")
    return "; ".join(changes)


def _as_said(value: Any, part: str) -> str:
    if value is None:
        return "not searched" if part == "searched" else "unset"
    return describe(json_to_distribution(value)) if part == "searched" else str(value)


def recipe_flags(recipe: Recipe) -> dict[str, Any]:
    """A recipe as the flags that give it: --recipe NAME, --schedule ..., each part."""
    return {
        "--recipe" if part == "name" else f"--{part.replace('_', '-')}": value
        for part, value in recipe.to_record().items()
    }


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
