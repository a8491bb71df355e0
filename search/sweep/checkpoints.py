"""Which of a trial's checkpoints a sweep keeps on disk: while it trains, all; once it ended, two.

Tune keeps every epoch's checkpoint (see the engine for why it may not prune them itself). Once
a trial has ended, MLflow needs its best checkpoint (uploaded from disk, perhaps later, when the
server comes back) and a resume its latest; the others go, but only once Tune's stored snapshot
records the end. Until then a kill -9 resumes the trial from the checkpoint that snapshot names,
which can be any of its recent ones. A trial that failed keeps all of them: a resume retries it
from its latest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ray import tune

from search.storage import is_uri, trial_results
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


def ended_in_snapshot(snapshot: Path) -> set[str]:
    """The ids of the trials that one of Tune's stored snapshots records as ended.

    Read from Tune's own file (experiment_state-*.json): should its format change, no trial
    reads as ended and checkpoints are pruned only at the sweep's end.
    """
    try:
        trials = [json.loads(state) for state, _ in json.loads(snapshot.read_text())["trial_data"]]
        return {trial["trial_id"] for trial in trials if trial.get("status") == "TERMINATED"}
    except (OSError, ValueError, KeyError, TypeError):  # half written, or another format
        return set()


def newest_snapshot(experiment_folder: Path) -> Path | None:
    """The snapshot a resume restores: one per run of the sweep, named by when that run began
    (the time a name holds sorts as text; the files' own times do not: Tune copies them all again)."""
    return max(experiment_folder.glob("experiment_state-*.json"), key=lambda path: path.name, default=None)


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # replaced while we looked
        return 0.0


class PruneEndedTrials(tune.Callback):
    """Deletes each ended trial's needless checkpoints, on local storage (a URI is left alone):
    once Tune's snapshot records its end, or at the sweep's end, after Tune's final snapshot."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}  # checkpoint path: its validation accuracy
        self.ended: dict[str, Path] = {}  # trial id: its folder, for trials not pruned yet
        self.snapshot_checked = 0.0  # the modification time of the snapshot read last
        self.started = False  # whether the first step of this run has been seen

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        accuracy = trial.last_result.get(METRIC)
        if accuracy is not None:
            self.seen[checkpoint.path] = accuracy

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not is_uri(trial.path):
            self.ended[trial.trial_id] = Path(trial.path)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.started:  # a resumed sweep: trials ended in the snapshot it was restored from
            self.started = True
            restored = [trial for trial in trials if trial.status == "TERMINATED"]
            for trial in restored:
                self.on_trial_complete(iteration, trials, trial)
            self._prune({trial.trial_id for trial in restored} & set(self.ended))
        if not self.ended:
            return
        snapshot = newest_snapshot(next(iter(self.ended.values())).parent)
        modified = _modified(snapshot) if snapshot is not None else 0.0
        if snapshot is not None and modified > self.snapshot_checked:  # each version read once
            self.snapshot_checked = modified
            self._prune(ended_in_snapshot(snapshot) & set(self.ended))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._prune(set(self.ended))  # Tune wrote its final snapshot just before this call

    def _prune(self, trial_ids: set[str]) -> None:
        for trial_id in trial_ids:
            for folder in needless_checkpoints(self.ended.pop(trial_id), self.seen):
                shutil.rmtree(folder, ignore_errors=True)
