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

A sweep's final trial (trainables.config.FINAL_OF) trains to the end: it is the search's best,
chosen at the rungs already.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

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
        # Tune adds trials in the order the searcher proposed them, again after a crash or a
        # restore: the first time counts.
        self.numbers.setdefault(trial.trial_id, len(self.numbers))

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if IMAGES_SEEN not in result or METRIC not in result or FINAL_OF in trial.config:
            return TrialScheduler.CONTINUE
        seen = result[IMAGES_SEEN]
        if seen >= self.max_t:
            return TrialScheduler.STOP
        passed = [rung for rung in self.rungs if rung <= seen]
        if not passed:
            return TrialScheduler.CONTINUE
        number = self.numbers[trial.trial_id]
        recorded = self.recorded[passed[-1]]
        if number in recorded:  # decided at this rung already: a retried or resumed trial
            return TrialScheduler.CONTINUE
        score = float(result[METRIC]) if MODE == "max" else -float(result[METRIC])
        recorded[number] = score
        above = [rung for rung in self.rungs if rung > passed[-1]]
        next_point = above[0] if above else self.max_t
        cutoff = self.cutoff(recorded, number, blind=next_point <= self.blind_until)
        return TrialScheduler.STOP if score < cutoff else TrialScheduler.CONTINUE

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
