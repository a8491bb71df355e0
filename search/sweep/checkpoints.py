"""Which of a trial's checkpoints a sweep keeps on disk: while it trains, all; once it ended, two.

Tune keeps every epoch's checkpoint (see the engine for why it may not prune them itself). Once
a trial has ended, a resume needs at most its latest checkpoint (should the sweep be killed before
Tune's snapshot records the end, the resume restores the trial from it and finds nothing left to
train), and MLflow needs its best (uploaded from disk, perhaps later, when the server comes back).
The others go. A trial that failed keeps all of them: a resume retries it from its latest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ray import tune

from search.sweep.storage import is_uri, trial_results
from trainables.names import METRIC


def needless_checkpoints(trial_folder: Path, seen: dict[str, float]) -> list[Path]:
    """The checkpoints of an ended trial that neither a resume nor MLflow needs.

    Each checkpoint's accuracy comes from `seen` (path: accuracy, as this run's callbacks saw
    them) or else from the trial's own results (Tune's result.json, which also holds those of
    earlier runs of a resumed sweep). A checkpoint whose accuracy neither says is kept.
    """
    on_disk = sorted(trial_folder.glob("checkpoint_*"))  # Tune numbers them in order
    if not on_disk:
        return []
    scores = {
        trial_folder / result["checkpoint_dir_name"]: result[METRIC]
        for result in trial_results(trial_folder) or []
        if result.get("checkpoint_dir_name") and METRIC in result
    }
    scores.update({Path(path): accuracy for path, accuracy in seen.items()})
    scored = [path for path in on_disk if path in scores]
    if not scored:
        return []
    # The first to reach the best accuracy is the one MLflow takes (a later tie is not better).
    best = max(scored, key=lambda path: scores[path])
    return [path for path in scored if path not in (best, on_disk[-1])]


class PruneEndedTrials(tune.Callback):
    """Deletes each ended trial's needless checkpoints, on local storage (a URI is left alone)."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}  # checkpoint path: its validation accuracy

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        accuracy = trial.last_result.get(METRIC)
        if accuracy is not None:
            self.seen[checkpoint.path] = accuracy

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if is_uri(trial.path):
            return
        for folder in needless_checkpoints(Path(trial.path), self.seen):
            shutil.rmtree(folder, ignore_errors=True)
