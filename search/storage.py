"""Where a sweep keeps its Tune state: a local folder, or any URI that pyarrow's filesystems read.

A multi-node sweep needs storage that every node sees: an NFS path, or a cloud URI such
as s3://bucket/sweeps or gs://bucket/sweeps (pyarrow resolves the scheme and the
credentials, exactly as Tune does with the same string).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from trainables.errors import InputError


def is_uri(location: str) -> bool:
    return "://" in location


def check_storage(location: str) -> None:
    """A URI no filesystem opens is refused (for s3:// and the like, this asks the network)."""
    if is_uri(location):
        try:
            pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            raise InputError(f"--storage-path {location} cannot be opened: {error}") from None


def make_local_folder(location: str) -> None:
    """Creates a local storage folder, or refuses it in one line (a file in the way, no permission):
    before the sweep's MLflow run exists, so a bad path leaves nothing behind."""
    if is_uri(location):
        return
    try:
        Path(location).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"--storage-path {location} cannot be made a folder ({error.strerror}: {error.filename})"
        ) from None


def resolve_storage(location: str) -> str:
    """A URI as given; a local path made absolute, so every process reads the same folder."""
    if is_uri(location):
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def trial_results(trial_folder: Path) -> list[dict[str, Any]] | None:
    """A trial's results as Tune keeps them in its local folder (result.json, one a line), those
    at an epoch's end naming their checkpoint; None where Tune wrote no such file.

    A line that does not decode is skipped: a kill during Tune's copy of the file leaves half a
    line, which a resumed trial's results then follow.
    """
    results_file = trial_folder / "result.json"
    if not results_file.exists():
        return None
    results = []
    for line in results_file.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            result = json.loads(line) if line.strip() else None
            if isinstance(result, dict):
                results.append(result)
    return results


def trial_number(trial: Any) -> int:
    """The order Tune created a trial in, from 1: the start of the experiment tag it gave the
    trial, which a restore keeps."""
    return int(trial.experiment_tag.split("_", 1)[0])


class StoredFile:
    """A small text file at a local path or a filesystem URI; it keeps only its location."""

    def __init__(self, location: str) -> None:
        self.location = location

    def __str__(self) -> str:
        return self.location

    def _resolved(self) -> tuple[pafs.FileSystem, str]:
        if is_uri(self.location):
            return pafs.FileSystem.from_uri(self.location)
        return pafs.LocalFileSystem(), self.location

    def exists(self) -> bool:
        filesystem, path = self._resolved()
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def read_text(self) -> str:
        filesystem, path = self._resolved()
        with filesystem.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text_atomically(self, text: str) -> None:
        """Written beside, then moved over the file: a reader sees the old text or the new, never half."""
        filesystem, path = self._resolved()
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        partial = f"{path}.partial"
        with filesystem.open_output_stream(partial) as stream:
            stream.write(text.encode())
        filesystem.move(partial, path)

    def set_aside(self) -> str:
        """Renames the file out of the way, keeping it for a person to look at; returns its new location."""
        filesystem, path = self._resolved()
        suffix = f".unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        filesystem.move(path, path + suffix)
        return self.location + suffix

    def unlink(self) -> None:
        filesystem, path = self._resolved()
        filesystem.delete_file(path)
