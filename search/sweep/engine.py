"""One sweep: data loaded once, Optuna proposes, ASHA prunes, Tune runs, MLflow records.

`run_sweep` is what `python -m search.run` calls, and what tests call with a
shrunken `SweepSettings`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import optuna
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from search.sweep.progress import SweepProgress
from search.sweep.searcher import make_searcher
from search.sweep.settings import SweepSettings, check_ray_address, check_reachable
from search.tracking.callback import SweepTracker
from search.tracking.store import (
    ImageDataset,
    WritesPending,
    best_child_run,
    child_runs,
    default_tracking_uri,
    is_diverged,
    start_sweep_run,
    status_counts,
)
from spaces import SearchSpace, get_space
from trainables.data import ImageSplits, load_splits
from trainables.errors import InputError, first_line
from trainables.names import BEST_METRIC, ERROR_TAG, METRIC, MODE
from trainables.trainable import TrialSettings, train_convnet

# A snapshot after every checkpoint is deliberate (num_to_keep=1): it is what lets a resume
# after kill -9 continue trials from their latest epoch. Tune warns about it each time.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
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
    best_config: dict[str, Any]
    trial_statuses: dict[str, int]
    interrupted: bool  # stopped by Ctrl-C before every trial ended
    failures: dict[str, str]  # run name -> the last line of its error
    diverged: int  # trials stopped because their loss stopped being finite


# A function trainable with train_convnet's signature and contract (reports METRIC per epoch).
Trainable = Callable[[dict[str, Any], ImageSplits, TrialSettings], None]


def run_sweep(settings: SweepSettings, trainable: Trainable = train_convnet) -> SweepOutcome:
    space = get_space(settings.space)
    tracking_uri = settings.tracking_uri or default_tracking_uri()
    exists = tune.Tuner.can_restore(settings.sweep_location)
    if settings.resume and not exists:
        raise InputError(f"no sweep named {settings.sweep_name} in {settings.storage}")
    if exists and not settings.resume:  # a second sweep under one name would mix their runs
        raise InputError(
            f"a sweep named {settings.sweep_name} is already in {settings.storage}: "
            "add --resume to continue it, or give another --name"
        )

    _quiet_libraries(settings.output)
    check_reachable(tracking_uri)
    check_ray_address(settings.address)
    splits = load_splits(settings.data)  # once, on the driver; trials get it from the object store
    started_ray = start_ray(settings.address, settings.output)
    try:
        return _sweep(settings, space, tracking_uri, splits, trainable)
    finally:
        if started_ray:  # also flushes the workers' last log lines before the summary is printed
            ray.shutdown()


def _sweep(
    settings: SweepSettings, space: SearchSpace, tracking_uri: str, splits: ImageSplits, trainable: Trainable
) -> SweepOutcome:
    gpus_per_trial = settings.gpus_per_trial
    if gpus_per_trial is None:
        gpus_per_trial = GPUS_PER_TRIAL_WHEN_PRESENT if ray.cluster_resources().get("GPU", 0) else 0.0

    client = MlflowClient(tracking_uri)
    datasets = (
        ImageDataset.of(settings.data, "train", splits.fingerprint, len(splits.train_labels)),
        ImageDataset.of(settings.data, "validation", splits.fingerprint, len(splits.val_labels)),
    )
    params = _sweep_params(settings, gpus_per_trial)
    sweep_run = start_sweep_run(
        client, settings.experiment_name, settings.sweep_name, space.name, params, datasets
    )

    resourced = tune.with_resources(
        tune.with_parameters(
            trainable,
            splits=splits,
            settings=TrialSettings(
                max_epochs=settings.epochs, seed=settings.seed, precision=settings.precision
            ),
        ),
        {"cpu": settings.cpus_per_trial, "gpu": gpus_per_trial},
    )
    trials_at_once = _trials_at_once(settings, gpus_per_trial)
    callbacks: list[tune.Callback] = [
        SweepTracker(
            tracking_uri, sweep_run, space.name, settings.num_samples, settings.epochs, settings.journal
        )
    ]
    if settings.output == "progress":
        callbacks.append(SweepProgress(settings.space, settings.num_samples, settings.epochs))
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
                search_alg=make_searcher(space, settings, trials_at_once),
                scheduler=_scheduler(settings),
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
                    num_to_keep=1,  # the best; Tune also keeps the latest, for resuming
                    checkpoint_score_attribute=METRIC,
                    checkpoint_score_order=MODE,
                ),
                verbose=verbose,
            ),
        )
    tuner.fit()
    if settings.journal.exists():
        raise WritesPending(f"MLflow writes wait in {settings.journal}")
    return _outcome(client, settings, tracking_uri, sweep_run.run_id)


def _trials_at_once(settings: SweepSettings, gpus_per_trial: float) -> int:
    """How many trials the cluster runs side by side, as the resources and --max-concurrent allow."""
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // settings.cpus_per_trial)
    if gpus_per_trial > 0:
        fits = min(fits, int(resources.get("GPU", 0) // gpus_per_trial))
    if settings.max_concurrent is not None:
        fits = min(fits, settings.max_concurrent)
    return max(1, min(fits, settings.num_samples))


def _scheduler(settings: SweepSettings) -> TrialScheduler:
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    # Rungs count epochs, the unit trials report in.
    return ASHAScheduler(time_attr="epoch", max_t=settings.epochs, grace_period=1, reduction_factor=3)


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
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def _sweep_params(settings: SweepSettings, gpus_per_trial: float) -> dict[str, Any]:
    params = {
        key: value for key, value in asdict(settings).items() if key not in {"data", "resume", "output"}
    }
    params.update({f"data_{key}": value for key, value in asdict(settings.data).items()})
    params["gpus_per_trial"] = gpus_per_trial
    return params


def _outcome(
    client: MlflowClient, settings: SweepSettings, tracking_uri: str, parent_run_id: str
) -> SweepOutcome:
    """The summary, read back from MLflow: what the user will see there is what we print."""
    parent = client.get_run(parent_run_id)
    children = child_runs(client, parent)
    best = best_child_run(children)
    return SweepOutcome(
        sweep=settings.sweep_name,
        experiment=settings.experiment_name,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        best_run_id=best.info.run_id if best else None,
        best_accuracy=best.data.metrics[BEST_METRIC] if best else None,
        best_config=dict(best.data.params) if best else {},
        trial_statuses=status_counts(children),
        interrupted=parent.info.status == "KILLED",
        failures={
            run.info.run_name: (run.data.tags.get(ERROR_TAG, "").strip().splitlines() or ["?"])[-1]
            for run in children
            if run.info.status == "FAILED"
        },
        diverged=sum(map(is_diverged, children)),
    )
