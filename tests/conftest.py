"""Shared fixtures and helpers: small real image folders, a real local Ray runtime, real MLflow servers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("red", "green", "blue")  # each class is an image with one strong colour channel
# The files that take longest (minutes each) run first: pytest-xdist hands files to its two
# workers in collection order, and one of these started last would leave the other worker idle.
LONGEST_FILES = (
    "test_survival.py",
    "test_tracking_outage.py",
    "test_search_bench.py",
    "test_end_to_end.py",
    "test_mlflow_server.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    longest = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: longest.get(item.path.name, len(LONGEST_FILES)))  # stable: the rest as found


def write_image_folder(
    root: Path, per_class: int, test_per_class: int = 0, size: int = 32, suffix: str = ".png", seed: int = 0
) -> Path:
    """An ImageFolder tree of real image files: the class shifts one colour channel up, amid noise.

    Learnable, but not at once, so the configs of a sweep score differently.
    """
    rng = np.random.default_rng(seed)
    splits = {"train": per_class, "test": test_per_class}
    for split, count in splits.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
                pixels[..., label] += 55
                Image.fromarray(pixels).save(folder / f"{index:04d}{suffix}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 training and 6 test images per class, as PNG files."""
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=30, test_per_class=6)


@pytest.fixture(scope="session")
def ray_runtime():
    """A real local Ray runtime, started once for the tests that sweep."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def small_sweep(image_folder: Path, workdir: Path, **overrides: Any) -> Any:
    """SweepSettings shrunk for a test: the small image folder, 2 one-epoch trials, a SQLite store and
    Tune storage inside `workdir`, no progress line. Any field can be overridden."""
    from search.sweep.settings import SweepSettings
    from trainables.config import DataSettings

    values: dict[str, Any] = {
        "space": "nesterov",
        "data": DataSettings(source=str(image_folder), root=str(workdir / "cache"), val_size=9),
        "epochs": 1,
        "num_samples": 2,
        "tracking_uri": f"sqlite:///{workdir}/mlflow.db",
        "storage_path": str(workdir / "ray"),
        "name": "test",
        "output": "quiet",
    }
    return SweepSettings(**{**values, **overrides})


def sweep_args(settings: Any) -> list[str]:
    """The `search.run` arguments that make the same sweep as `settings` (from `small_sweep`)."""
    data = settings.data
    args = ["--space", settings.space, "--data", data.source, "--data-root", data.root]
    args += ["--val-size", str(data.val_size), "--num-samples", str(settings.num_samples)]
    args += [
        "--epochs",
        str(settings.epochs),
        "--scheduler",
        settings.scheduler,
        "--seed",
        str(settings.seed),
        "--recipe",
        settings.recipe.name,  # the named recipe, as it is: its parts unchanged
        "--top-rung",
        settings.top_rung,
    ]
    args += ["--tracking-uri", settings.tracking_uri, "--storage-path", settings.storage_path]
    if settings.experiment is not None:
        args += ["--experiment", settings.experiment]
    args += [arg for range_ in settings.ranges for arg in ("--range", str(range_))]
    args += [arg for name, value in settings.fixed for arg in ("--fix", f"{name}={value}")]
    return [*args, "--name", settings.sweep_name]


def trial_runs(settings: Any) -> list:
    """The sweep's child runs in MLflow, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    query = f"tags.role = 'trial' and tags.sweep = '{settings.sweep_name}'"
    return client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time ASC"])


def sweep_parent(settings: Any) -> Any:
    """The sweep's parent run in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    query = f"tags.role = 'sweep' and tags.sweep = '{settings.sweep_name}'"
    (parent,) = client.search_runs([experiment.experiment_id], query)
    return parent


def reported_epochs(tracking_uri: str, run: Any, metric: str = "val_acc") -> list[float]:
    """How far the trial had trained (in epochs) at each report that logged the metric, in order:
    a run's steps count images seen, its `epoch` metric says the same in epochs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    # The metric first: a report's metrics land in one batch, so a sweep still writing cannot have
    # logged a step of it that the epochs read after it lack.
    reports = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda point: point.step)
    epochs = {point.step: point.value for point in client.get_metric_history(run.info.run_id, "epoch")}
    return [epochs[point.step] for point in reports]


def assert_ended_trials_keep_their_best_and_latest_checkpoints_only(settings: Any) -> None:
    """Each trial folder of a finished sweep holds at most two checkpoints: the one of its best
    epoch (what MLflow uploads) and its latest (what a resume would restore), both named in the
    trial's own results (Tune's result.json)."""
    from search.storage import trial_results

    folders = list(Path(settings.sweep_location).glob("*/result.json"))
    assert folders
    for results_file in folders:
        saved = [
            result for result in trial_results(results_file.parent) or [] if result.get("checkpoint_dir_name")
        ]
        kept = {path.name for path in results_file.parent.glob("checkpoint_*")}
        if not saved:  # stopped before its first epoch's end
            assert not kept, (results_file.parent, kept)
            continue
        best = max(saved, key=lambda result: result["val_acc"])["checkpoint_dir_name"]
        assert {best, saved[-1]["checkpoint_dir_name"]} == kept, (results_file.parent, kept)


def optuna_trials(settings: Any) -> list:
    """The sweep's Optuna study, as Optuna itself stored it, read through Optuna's public API."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(settings.optuna_journal))
    return optuna.load_study(study_name=settings.sweep_name, storage=storage).trials


def run_module(
    module: str, *args: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` to its end, output captured, with no tracking URI from the caller's shell."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**(os.environ if env is None else env), "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": ""},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_search_run(args: list[str], cwd: Path) -> subprocess.Popen:
    """`python -m search.run ARGS` as a user would start it, in its own process group (so a test
    can signal it, or kill it together with the Ray processes it started)."""
    return subprocess.Popen(
        [sys.executable, "-m", "search.run", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_process_group(process: subprocess.Popen) -> None:
    """Kills what a test started with `start_search_run` and whatever it left running, if anything."""
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` on loopback over a store in a folder: it can be killed and started again.

    With a login (user, password), it is MLflow's basic-auth app, with that admin user.
    """

    def __init__(self, folder: Path, login: tuple[str, str] | None = None) -> None:
        self.folder = folder
        self.login = login
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db", "--workers", "1"]
        command += ["--artifacts-destination", str(self.folder / "artifacts")]
        log = open(self.folder / "server.log", "a")  # noqa: SIM115 (lives as long as the server)
        # MLflow 3 also starts a job runner for its GenAI features, which none of this needs.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.login is not None:
            command += ["--app-name", "basic-auth"]  # its user store, basic_auth.db, goes in cwd
            env.update(
                {"MLFLOW_AUTH_ADMIN_PASSWORD": self.login[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only"}
            )
        self.process = subprocess.Popen(
            command, stdout=log, stderr=log, env=env, cwd=self.folder, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise AssertionError(
            f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}"
        )

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A real `mlflow server` of the test's own, on SQLite in its folder, killed afterwards."""
    folder = tmp_path / "server"
    folder.mkdir()
    server = MlflowServer(folder)
    server.start()
    yield server
    server.kill()
