"""Shared fixtures and helpers: small real image folders, a real local Ray runtime, real MLflow servers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("red", "green", "blue")  # each class is an image with one strong colour channel


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


def run_module(module: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` to its end, output captured, with no tracking URI from the caller's shell."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": ""},
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` on loopback over a store in a folder: it can be killed and started again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
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
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
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
