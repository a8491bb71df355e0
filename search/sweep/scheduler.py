"""How a sweep stops weak trials: asynchronous successive halving whose decisions the seed fixes.

ASHA stops a trial at a rung unless its score there is in the top 1 / reduction_factor
of the trials recorded at that rung. Ray's `ASHAScheduler` compares it with whichever
trials reached the rung first, so with trials in parallel, timing decides which
trials go on, and so what Optuna hears, and so the configs it proposes next.

`InOrderASHA` compares trial k only with trials 0 .. k - window, the trials that the
sweep's searcher (`search.sweep.searcher`) waits for before it proposes trial k: they
have all ended by the time trial k reports, so the set is the same in every run of the
seed. The price is a comparison set `window - 1` trials behind the newest.

The first trials have nothing to be judged against. They go on blindly only while the next rung
is within the first epoch: in a one-epoch sweep, to the end, as ASHA's stopping rule has them;
in a sweep of many epochs they stop where a blind promotion would cost more than an epoch, since
with twenty epochs the first window of trials would otherwise train three whole final runs.

A resumed sweep decides as the uninterrupted one would: Tune restores its trials but not the
scheduler, so each trial's verdicts are read back from the results Tune kept of it (on a local
storage path; on a URI, the trials that had ended before the stop are not compared again).

A sweep's final trial (trainables.config.FINAL_OF) trains to the end: it is the search's best,
chosen at the rungs already.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.storage import trial_number, trial_results
from trainables.config import FINAL_OF
from trainables.names import IMAGES_SEEN, METRIC, MODE


class InOrderASHA(FIFOScheduler):
    def __init__(
        self, rungs: Sequence[int], max_t: int, reduction_factor: int, window: int, epoch_images: int
    ) -> None:
        super().__init__()
        self.rungs = sorted(rungs)  # images seen at each decision below the end
        self.max_t = max_t  # images seen when a trial of the search has trained to its end
        self.reduction_factor = reduction_factor
        self.window = window
        self.blind_until = epoch_images  # how far a trial with nothing to be judged against goes on
        self.numbers: dict[str, int] = {}  # Tune trial id -> its place in the order proposed
        self.recorded: dict[int, dict[int, float]] = {
            rung: {} for rung in self.rungs
        }  # rung -> number -> score

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metric and mode are the sweep's own, fixed

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        # The number is the one Tune gave the trial when the searcher proposed it: a restore keeps
        # it, though it adds the trials back latest result first. The scheduler itself is not
        # restored, so a restored trial's verdicts come back from the results Tune kept of it.
        number = self.numbers[trial.trial_id] = trial_number(trial) - 1
        if trial.storage is not None and trial.storage.trial_dir_name:  # a new trial has no folder yet
            for result in trial_results(Path(trial.path)) or []:
                self._record(number, result)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if IMAGES_SEEN not in result or METRIC not in result or FINAL_OF in trial.config:
            return TrialScheduler.CONTINUE
        if result[IMAGES_SEEN] >= self.max_t:
            return TrialScheduler.STOP
        number = self.numbers[trial.trial_id]
        rung = self._record(number, result)
        if rung is None:
            return TrialScheduler.CONTINUE
        # Judged on its first score at the rung, against trials that had ended before it was
        # proposed: a trial that reports there again (retried, or resumed from an earlier
        # checkpoint) gets the verdict it had.
        above = [higher for higher in self.rungs if higher > rung]
        next_point = above[0] if above else self.max_t
        cutoff = self.cutoff(self.recorded[rung], number, blind=next_point <= self.blind_until)
        return TrialScheduler.STOP if self.recorded[rung][number] < cutoff else TrialScheduler.CONTINUE

    def _record(self, number: int, result: dict) -> int | None:
        """The highest rung this result passed, None below the first, recording trial `number`'s
        score there unless it has one already."""
        if IMAGES_SEEN not in result or METRIC not in result or result[IMAGES_SEEN] >= self.max_t:
            return None
        passed = [rung for rung in self.rungs if rung <= result[IMAGES_SEEN]]
        if not passed:
            return None
        score = float(result[METRIC]) if MODE == "max" else -float(result[METRIC])
        self.recorded[passed[-1]].setdefault(number, score)
        return passed[-1]

    def cutoff(self, recorded: dict[int, float], number: int, blind: bool = True) -> float:
        """The score trial `number` must reach at a rung: ASHA's quantile over the trials that ended
        before it was proposed; while there are none, nothing (-inf) where it may go on `blind`."""
        earlier = [score for other, score in recorded.items() if other <= number - self.window]
        if not earlier:
            return -np.inf if blind else np.inf
        return float(np.nanpercentile(earlier, (1 - 1 / self.reduction_factor) * 100))

    def debug_string(self) -> str:
        decided = ", ".join(f"{rung}: {len(scores)}" for rung, scores in self.recorded.items())
        return f"In-order ASHA, trials recorded at each rung (images seen): {decided}"
