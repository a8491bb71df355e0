"""One sweep: data loaded once, Optuna proposes, ASHA prunes, Tune runs, MLflow records.

`run_sweep` is what `python -m search.run` calls, and what tests call with a
shrunken `SweepSettings`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.storage import make_local_folder
from search.sweep.checkpoints import PruneEndedTrials
from search.sweep.progress import SweepProgress
from search.sweep.scheduler import InOrderASHA
from search.sweep.searcher import TrialCost, make_searcher, warm_start_trials
from search.sweep.settings import SweepSettings, check_ray_address
from search.sweep.signals import StopSignals, deferred_stops, held_back, keeping_stop_handlers
from search.tracking.best import why_no_best
from search.tracking.callback import SweepTracker
from search.tracking.history import finished_trials
from search.tracking.store import (
    TRACKING_ERRORS,
    ImageDataset,
    TrackingFailed,
    best_child_run,
    claim_sweep_name,
    default_tracking_uri,
    failure_cause,
    get_or_create_experiment,
    is_diverged,
    open_store,
    read_sweep,
    start_sweep_run,
    status_counts,
)
from search.tracking.uri import check_reachable
from spaces import SearchSpace
from trainables.config import FINAL_OF
from trainables.data import ImageSplits, image_inventory, load_splits
from trainables.errors import InputError, first_line
from trainables.names import (
    BEST_METRIC,
    ERROR_TAG,
    METRIC,
    MODE,
    SWEEP_HOST_PARAM,
    SWEEP_LOCATION_PARAM,
    TRAIN_TFLOP,
)
from trainables.trainable import TrialSettings, train_convnet

# Tune's snapshot of the sweep (what a resume after kill -9 restores) at most a second old, not
# its default 10 s: trials under way then continue from a recent epoch. Read when the sweep starts.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # a trial's own lines, each with its trial's name

GPUS_PER_TRIAL_WHEN_PRESENT = 0.25  # a trial of this model uses a small part of a modern GPU


@dataclass
class SweepOutcome:
    sweep: str
    experiment: str
    tracking_uri: str
    parent_run_id: str
    best_run_id: str | None
    best_accuracy: float | None
    val_size: int  # the validation images the accuracies were measured on
    best_config: dict[str, Any]
    trial_statuses: dict[str, int]
    interrupted: bool  # stopped by Ctrl-C or a stop signal before every trial ended
    failures: dict[str, str]  # run name -> the last line of its error
    diverged: int  # trials stopped because their loss stopped being finite
    trained_tflop: float  # the compute all its trials spent, counted from the model's multiply-adds
    compute_budget: float  # the TFLOP after which no trial was to start (inf: none)
    no_best_reason: str = ""  # when no trial has a best checkpoint: why, in words
    stop_signal: int | None = None  # SIGTERM or SIGHUP, when one stopped the sweep
    warm_start: int = 0  # earlier sweeps' finished trials the sampler started from
    warm_start_skipped: int = 0  # those left out, their params outside the space's current ranges
    storage_error: str | None = None  # Tune's storage failed (a full disk, say): what it said
    ended_by: str | None = None  # the budget after which no trial started, before --num-samples did
    final_trial: str | None = None  # under --top-rung best: the final trial's run name, once it started
    no_final_reason: str = ""  # under --top-rung best, when the sweep ended with no final trial: why
    experiment_id: str = ""  # the experiment's MLflow ID, for a link to the sweep on a server
    closed_orphan: str | None = None  # the run ID of an earlier parent of this name closed as an orphan


# A function trainable with train_convnet's signature and contract (reports METRIC per epoch).
Trainable = Callable[[dict[str, Any], ImageSplits, TrialSettings], None]

# What a full or failing disk under --storage-path looks like, in a trial's error.
STORAGE_FULL = ("No space left on device", "Disk quota exceeded")


def run_sweep(
    settings: SweepSettings,
    trainable: Trainable = train_convnet,
    stop: StopSignals | None = None,
) -> SweepOutcome:
    """Runs (or resumes) the sweep to its end and reads its outcome back from MLflow.

    `stop`: search.run's, in effect since it started, whose `on_abandon` prints the resume
    command when a stop signal took Ray down; None: one of its own, for this call.
    """
    space = settings.search_space
    tracking_uri = settings.tracking_uri or default_tracking_uri()
    make_local_folder(settings.storage)
    _check_resume(settings)
    _quiet_libraries(settings.output)
    check_reachable(tracking_uri)
    orphan = None if settings.resume else _claim_name(settings, tracking_uri)
    check_ray_address(settings.address)
    splits = load_splits(settings.data)  # once, on the driver; trials get it from the object store
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(StopSignals())
        with held_back():  # from the Ray processes started here: a signal to the group is ours
            if not ray.is_initialized():
                # Before the start: a Ray left to the process's exit crashes it there (SIGSEGV in
                # its core worker's teardown), so a stop during the start, acted on at its end,
                # shuts it down too. The shutdown also flushes the workers' last log lines before
                # the summary is printed.
                stack.callback(shut_down_ray)
                with deferred_stops():  # which also keeps Ray's own handlers out: ours stay
                    start_ray(settings.address, settings.output)
        try:
            outcome = _sweep(settings, space, tracking_uri, splits, trainable, stop)
        finally:
            stop.over()  # from here on (Ray's shutdown too) a stop signal changes nothing
        outcome.closed_orphan = orphan
        return outcome


def shut_down_ray() -> None:
    """Ray's shutdown, with our stop-signal handlers kept: its C++ logger resets SIGTERM to the
    default as it begins, behind Python's back, and a SIGTERM in the seconds it then takes killed
    the sweep before its summary (found by the chaos test)."""
    with keeping_stop_handlers():
        ray.shutdown()


def _claim_name(settings: SweepSettings, tracking_uri: str) -> str | None:
    """Before Ray starts: a new sweep's name must be free in its experiment (claim_sweep_name)."""
    try:
        return claim_sweep_name(
            tracking_uri,
            settings.experiment_name,
            settings.sweep_name,
            settings.sweep_location,
            tune.Tuner.can_restore,
        )
    except TRACKING_ERRORS as error:
        raise _failed_before_the_sweep(tracking_uri, error) from None


def _failed_before_the_sweep(tracking_uri: str, error: Exception) -> InputError:
    """Nothing has run yet: a store that refuses us is bad input."""
    return InputError(f"MLflow at {tracking_uri} failed before the sweep began: {failure_cause(error)}")


def tune_saved(settings: SweepSettings) -> bool:
    """Whether Tune has saved this sweep's state, which a resume continues."""
    return tune.Tuner.can_restore(settings.sweep_location)


def _check_resume(settings: SweepSettings) -> None:
    """A resume continues a sweep that exists, as it was; a new sweep takes a name not yet used."""
    exists = tune_saved(settings)
    if settings.resume and not exists:
        raise InputError(f"no sweep named {settings.sweep_name} in {settings.storage}")
    if exists and not settings.resume:  # a second sweep under one name would mix their runs
        raise InputError(
            f"a sweep named {settings.sweep_name} is already in {settings.storage}: "
            "add --resume to continue it, or give another --name"
        )
    settings.check_resumes_the_same_sweep()


def _sweep(
    settings: SweepSettings,
    space: SearchSpace,
    tracking_uri: str,
    splits: ImageSplits,
    trainable: Trainable,
    stop: StopSignals,
) -> SweepOutcome:
    gpus_per_trial = settings.gpus_per_trial
    if gpus_per_trial is None:
        gpus_per_trial = GPUS_PER_TRIAL_WHEN_PRESENT if ray.cluster_resources().get("GPU", 0) else 0.0
    trials_at_once = _trials_at_once(settings, gpus_per_trial)  # refuses a trial too big for Ray here
    plan = SearchPlan.of(settings, splits)
    datasets = (
        ImageDataset.of(settings.data, "train", splits.fingerprint, len(splits.train_labels)),
        ImageDataset.of(settings.data, "validation", splits.fingerprint, len(splits.val_labels)),
    )
    params = _sweep_params(settings, gpus_per_trial, tracking_uri)
    try:
        client = open_store(tracking_uri)
        past = []
        if settings.warm_start and not settings.resume:  # a resume's study has them already
            experiment_id = get_or_create_experiment(client, settings.experiment_name)
            past = finished_trials(
                client, experiment_id, space, settings.sweep_name, params, datasets[0], plan.complete_at
            )
        warm_start, skipped = warm_start_trials(space, past)
        params.update(warm_start_trials=len(warm_start), warm_start_skipped=skipped)
        sweep_run = start_sweep_run(
            client, settings.experiment_name, settings.sweep_name, space, params, datasets
        )
    except TRACKING_ERRORS as error:
        raise _failed_before_the_sweep(tracking_uri, error) from None
    if not settings.resume:
        try:
            settings.identity_file.write_text_atomically(json.dumps(settings.identity()))
            # What a resume must find again (SweepSettings.check_resumes_the_same_sweep); null: CIFAR-10.
            settings.images_file.write_text_atomically(json.dumps(image_inventory(settings.data)))
        except OSError as error:  # a full disk, a quota: its parent, left RUNNING, is an orphan then
            raise InputError(f"Tune's storage {settings.storage} cannot be written ({error})") from None
    deadline = time.time() + settings.time_budget_s if settings.time_budget_s is not None else None

    resources = _trial_resources(settings, gpus_per_trial, trials_at_once)
    resourced = tune.with_resources(
        tune.with_parameters(trainable, splits=splits, settings=plan.trial), resources
    )
    # Trial k is proposed, and judged at a rung, only against trials 0 .. k - window: one more than
    # fit at once, so a proposal is ready whenever a slot frees.
    window = trials_at_once + 1
    tracker = SweepTracker(
        tracking_uri,
        sweep_run,
        space,
        settings.num_samples,
        settings.epochs,
        settings.journal,
        rebuild=settings.resume,
        deadline=deadline,
        compute_budget=settings.compute_budget,
        grace_s=settings.tracking_grace_s,
    )
    stop.on_abandon.insert(0, lambda signum: tracker.abandon())  # the runs first, the resume line last
    callbacks: list[tune.Callback] = [tracker, PruneEndedTrials()]
    if settings.output == "progress":
        budget = settings.compute_budget
        callbacks.append(SweepProgress(space, settings.num_samples, settings.epochs, budget))
    verbose = 2 if settings.output == "verbose" else 0
    if settings.resume:
        tuner = tune.Tuner.restore(settings.sweep_location, resourced, resume_errored=True)
        # Tune brings back the callbacks and verbosity it pickled at the start; this run's own
        # replace them, so a resume can change --verbose/--quiet. The tracker keeps nothing that
        # matters in memory (it finds its runs in MLflow), so a fresh one is the same tracker.
        # There is no public API for this yet (ray-project/ray#41364).
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks = callbacks
        run_config.verbose = verbose
    else:
        tuner = tune.Tuner(
            resourced,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=make_searcher(
                    space,
                    settings,
                    window,
                    warm_start,
                    deadline,
                    plan.cost,
                    plan.complete_at,
                    plan.final_rungs,
                ),
                scheduler=_scheduler(settings, plan, window),
                num_samples=settings.num_samples,
                # Also lets Tune start that many trials at once: with a searcher it would
                # otherwise start one, wait for it to run, then start the next.
                max_concurrent_trials=trials_at_once,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=settings.sweep_name,
                storage_path=settings.storage,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    # Tune keeps every checkpoint of a trial that trains: it deletes a pruned one
                    # at once but records the next in its snapshot only later, so a kill -9 in
                    # between left a resume naming a checkpoint that was gone, and the trial
                    # failed. PruneEndedTrials deletes the needless ones once the snapshot records
                    # that a trial ended.
                    num_to_keep=None,
                ),
                verbose=verbose,
            ),
        )
    storage_error = None
    try:
        tuner.fit()
    except Exception as error:
        storage_failed = _storage_failure(error)
        if stop.received is None and storage_failed is None:
            raise
        # Tune's storage failed (it then fails reading back what it half wrote), or a stop signal
        # took Ray down with the sweep: either way Tune never ended it, so the tracker does.
        tracker.finish_after_a_crash()
        storage_error = storage_failed
    if settings.journal.exists():
        raise TrackingFailed(tracker.queue.waiting())
    try:
        outcome = _outcome(settings, tracking_uri, sweep_run.run_id)
    except TRACKING_ERRORS as error:
        raise TrackingFailed(first_line(error)) from None
    outcome.stop_signal = stop.received
    outcome.warm_start, outcome.warm_start_skipped = len(warm_start), skipped
    # A trial's own ENOSPC says more than the EOFError Tune then meets reading back its files.
    full = next((error for error in tracker.errors if any(words in error for words in STORAGE_FULL)), None)
    outcome.storage_error = first_line(full.strip().splitlines()[-1]) if full else storage_error
    if settings.top_rung == "best" and outcome.final_trial is None and not outcome.interrupted:
        outcome.no_final_reason = "no trial of the search reached its first rung"
    if not outcome.interrupted and sum(outcome.trial_statuses.values()) < settings.num_samples:
        if deadline is not None and time.time() >= deadline:
            outcome.ended_by = f"its --time-budget of {settings.time_budget_s:g} s"
        elif outcome.trained_tflop >= settings.compute_budget:
            outcome.ended_by = f"its --compute-budget of {settings.compute_budget:g} TFLOP"
    return outcome


@dataclass(frozen=True)
class SearchPlan:
    """Where the search's trials report and stop, and what a trial costs at most."""

    trial: TrialSettings
    epoch_images: int
    rung_points: list[int]  # images seen at each rung below the sweep's end
    search_top: int  # images seen where a trial of the search ends: the sweep's end, or under
    # --top-rung best the highest rung, above which only the final trial trains
    final_rungs: tuple[int, ...]  # under --top-rung best, the search's rungs; else none
    cost: TrialCost

    @property
    def complete_at(self) -> float:
        """The epochs after which a trial of the search has trained to its end."""
        return self.search_top / self.epoch_images

    @classmethod
    def of(cls, settings: SweepSettings, splits: ImageSplits) -> SearchPlan:
        trial = TrialSettings(
            max_epochs=settings.epochs,
            seed=settings.seed,
            precision=settings.precision,
            recipe=settings.recipe,
            rungs=settings.rung_fractions,
        )
        epoch_images = len(splits.train_labels)
        every_image = settings.epochs * epoch_images
        rung_points = trial.rung_points(epoch_images)
        final_rungs = tuple(rung_points) if settings.top_rung == "best" else ()
        search_top = rung_points[-1] if final_rungs else every_image
        cost = TrialCost(
            splits.input_shape,
            len(splits.classes),
            images=search_top + settings.recipe.scoring_images(rung_points, every_image),
            final_images=every_image,
        )
        return cls(trial, epoch_images, rung_points, search_top, final_rungs, cost)


def _storage_failure(error: BaseException) -> str | None:
    """What went wrong, when an error from Tune is its storage failing: an OS error writing it, or a
    truncated file read back from it. None for any other error."""
    while error is not None:
        if isinstance(error, OSError | EOFError | pickle.UnpicklingError):
            return f"{type(error).__name__}: {first_line(error)}"
        error = error.__cause__ or error.__context__
    return None


def _trials_at_once(settings: SweepSettings, gpus_per_trial: float) -> int:
    """How many trials the cluster runs side by side, as the resources and --max-concurrent allow.

    On the local Ray, which has all it will ever have, a trial that asks for more would wait
    forever: refused. (A cluster's autoscaler may still add the nodes a trial asks for.)
    """
    resources = ray.cluster_resources()
    fits = settings.num_samples if settings.max_concurrent is None else settings.max_concurrent
    for name, asked, flag in (
        ("CPU", settings.cpus_per_trial, "--cpus-per-trial"),
        ("GPU", gpus_per_trial, "--gpus-per-trial"),
    ):
        if asked == 0:  # no GPU asked for
            continue
        has = resources.get(name, 0.0)
        if asked > has and settings.address is None:
            raise InputError(
                f"{flag} {asked:g} asks for more than the {has:g} {name}s of Ray here: no trial could start"
            )
        fits = min(fits, int(has // asked))
    return max(1, min(fits, settings.num_samples))


def _scheduler(settings: SweepSettings, plan: SearchPlan, window: int) -> TrialScheduler:
    """ASHA deciding at the rungs (counted in images seen, so they can fall inside an epoch), a trial
    of the search stopping at its top."""
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    rungs = [point for point in plan.rung_points if point < plan.search_top]
    return InOrderASHA(rungs, plan.search_top, settings.reduction_factor, window, plan.epoch_images)


def _trial_resources(
    settings: SweepSettings, gpus_per_trial: float, trials_at_once: int
) -> Callable[[dict[str, Any]], PlacementGroupFactory]:
    """What each trial asks Ray for; on the local Ray, a final trial (--top-rung best), which runs
    alone once the search has ended, asks for what all the trials at once had."""

    def resources(config: dict[str, Any]) -> PlacementGroupFactory:
        share = trials_at_once if FINAL_OF in config and settings.address is None else 1
        return PlacementGroupFactory(
            [{"CPU": settings.cpus_per_trial * share, "GPU": gpus_per_trial * share}]
        )

    return resources


def start_ray(address: str | None, output: str) -> bool:
    """Connects to Ray unless this process already is; says whether it did."""
    if ray.is_initialized():
        return False
    level = logging.ERROR if output == "quiet" else logging.WARNING
    # A local Ray turns token authentication on by default, and says so on every start, as the
    # first line a user would see: keep that line for a log file, not the console.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=level)
    except ConnectionError as error:
        raise InputError(
            f"cannot join the Ray cluster at {address} ({first_line(error)}); a cluster started by "
            f"`ray start` checks a token: set RAY_AUTH_MODE=token (see the README)"
        ) from None
    return True


def _quiet_libraries(output: str) -> None:
    """Below --verbose, Tune, Optuna and MLflow keep their progress lines to themselves.

    Tune's newer output engine prints its header even when told to be silent; its legacy
    engine, at verbose=0, prints nothing. The variable is read when the sweep starts.
    """
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if output == "verbose" else "0"
    if output != "verbose":
        # Tune logs its failures with tracebacks, and its stops with how to restore in Python; the
        # summary names each failed trial (its traceback is in its MLflow run), and the resume
        # command comes last.
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        # Tune uploads to its storage through Ray Train's syncer, which logs a failed upload with its
        # traceback whenever the next one waits on it (so only sometimes): the sweep reports a
        # storage failure itself, in one line, and exits 4.
        logging.getLogger("ray.train").setLevel(logging.CRITICAL)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # MLflow prints "View run ... at: URL" whenever a run on a server ends: a line per trial,
        # amid the status line; the summary gives the sweep's page once.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def _sweep_params(settings: SweepSettings, gpus_per_trial: float, tracking_uri: str) -> dict[str, Any]:
    """The settings as the sweep's parent run records them, with each default resolved to the value
    the sweep used."""
    params = {
        key: value
        for key, value in asdict(settings).items()
        if key not in {"data", "recipe", "resume", "output"}
    }
    params.update({f"data_{key}": value for key, value in asdict(settings.data).items()})
    params.update(settings.recipe.as_params())
    params["gpus_per_trial"] = gpus_per_trial
    params["compute_budget_tflop"] = settings.compute_budget
    params["experiment"] = settings.experiment_name
    params["tracking_uri"] = tracking_uri
    params[SWEEP_LOCATION_PARAM] = settings.sweep_location  # resolved: where an orphan is told apart
    params[SWEEP_HOST_PARAM] = socket.gethostname()  # and on which machine
    return params


def _outcome(settings: SweepSettings, tracking_uri: str, parent_run_id: str) -> SweepOutcome:
    """The summary, read back from MLflow: what the user will see there is what we print."""
    sweep = read_sweep(tracking_uri, parent_run_id)
    parent, children = sweep.parent, sweep.children
    best = best_child_run(children)
    return SweepOutcome(
        sweep=settings.sweep_name,
        experiment=settings.experiment_name,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        best_run_id=best.info.run_id if best else None,
        best_accuracy=best.data.metrics[BEST_METRIC] if best else None,
        val_size=settings.data.val_size,
        best_config=dict(best.data.params) if best else {},
        trial_statuses=dict(status_counts(children)),
        interrupted=parent.info.status == "KILLED",
        failures={
            run.info.run_name: (run.data.tags.get(ERROR_TAG, "").strip().splitlines() or ["?"])[-1]
            for run in children
            if run.info.status == "FAILED"
        },
        diverged=sum(map(is_diverged, children)),
        trained_tflop=sum(run.data.metrics.get(TRAIN_TFLOP, 0.0) for run in children),
        compute_budget=settings.compute_budget,
        no_best_reason=why_no_best(children) if best is None else "",
        final_trial=next((run.info.run_name for run in children if FINAL_OF in run.data.params), None),
        experiment_id=parent.info.experiment_id,
    )
