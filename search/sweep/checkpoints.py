"""Which of a trial's checkpoints a sweep keeps on disk: while it trains, all; once it ended, two.

Tune keeps every epoch's checkpoint (see the engine for why it may not prune them itself). Once
a trial has ended, a resume needs at most its latest checkpoint (should the sweep be killed before
Tune's snapshot records the end, the resume restores the trial from it and finds nothing left to
train), and MLflow needs its best (uploaded from disk, perhaps later, when the server comes back).
The others go. A trial that failed keeps all of them: a resume retries it from its latest.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from ray import tune

from search.sweep.storage import is_uri
from trainables.names import METRIC


def needless_checkpoints(trial_folder: Path) -> list[Path]:
    """The checkpoints of an ended trial that neither a resume nor MLflow needs.

    Read from the trial's own results (Tune's result.json): each names the checkpoint it came with.
    """
    results_file = trial_folder / "result.json"
    if not results_file.exists():
        return []
    results = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    saved = [result for result in results if result.get("checkpoint_dir_name")]
    scored = [(result.get(METRIC, -math.inf), result["checkpoint_dir_name"]) for result in saved]
    if not scored:
        return []
    # The first to reach the best accuracy is the one MLflow takes (a later tie is not better).
    best = max(scored, key=lambda score: score[0])[1]
    latest = scored[-1][1]
    return [trial_folder / name for _, name in scored if name not in (best, latest)]


class PruneEndedTrials(tune.Callback):
    """Deletes each ended trial's needless checkpoints, on local storage (a URI is left alone)."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if is_uri(trial.path):
            return
        for folder in needless_checkpoints(Path(trial.path)):
            shutil.rmtree(folder, ignore_errors=True)
