"""Shared fixtures: small real image folders, and one real local Ray runtime per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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
