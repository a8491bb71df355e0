"""ASHA with decisions the seed fixes: trial k is judged at a rung only against the trials that ended
before the searcher proposed it, so the order results arrive in changes nothing. Real Tune trials
(stubs of Tune's own Trial class) and the scheduler itself; no Ray runtime."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from search.sweep.scheduler import InOrderASHA
from trainables.config import FINAL_OF
from trainables.names import IMAGES_SEEN, METRIC

RUNGS, END = [100, 300], 900  # a ninth and a third of a 900-image epoch
WINDOW = 3


def proposed(count: int, configs: list[dict] | None = None, storage: Path | None = None) -> list[Trial]:
    """Trials as Tune makes them for a searcher's proposals: numbered from 1 in their experiment tag,
    each with its own folder where a storage path is given."""
    trials = []
    for k in range(count):
        context = None
        if storage is not None:
            context = StorageContext(str(storage), "sweep", trial_dir_name=f"trial_{k + 1}")
        config = configs[k] if configs else {}
        trials.append(
            Trial("train_convnet", stub=True, config=config, experiment_tag=f"{k + 1}_x", storage=context)
        )
    return trials


def scheduler(trials: list[Trial]) -> InOrderASHA:
    asha = InOrderASHA(RUNGS, max_t=END, reduction_factor=3, window=WINDOW, epoch_images=END)
    for trial in trials:  # in the order proposed, as Tune adds them
        asha.on_trial_add(None, trial)
    return asha


def report(asha: InOrderASHA, trial: Trial, images_seen: int, accuracy: float) -> str:
    return asha.on_trial_result(None, trial, {IMAGES_SEEN: images_seen, METRIC: accuracy})


def test_the_first_trials_of_a_window_go_on_and_a_later_weak_one_stops_at_its_first_rung():
    trials = proposed(5)
    asha = scheduler(trials)
    for trial, accuracy in zip(trials[:3], (0.30, 0.50, 0.40), strict=True):
        assert report(asha, trial, 100, accuracy) == TrialScheduler.CONTINUE  # nothing ended before them
    # Trial 3 is judged against trial 0 only, trial 4 against trials 0 and 1.
    assert report(asha, trials[3], 100, 0.29) == TrialScheduler.STOP
    assert report(asha, trials[4], 100, 0.45) == TrialScheduler.CONTINUE  # above 0.30 and 0.50's cut
    assert report(asha, trials[4], 300, 0.10) == TrialScheduler.CONTINUE  # no earlier trial at rung 2
    assert report(asha, trials[4], END, 0.55) == TrialScheduler.STOP  # trained to the end


def test_decisions_do_not_depend_on_the_order_results_arrive_in():
    accuracies = [0.30, 0.50, 0.40, 0.20, 0.45, 0.35, 0.60, 0.33]

    def decisions(order: list[int]) -> list[str]:
        trials = proposed(len(accuracies))
        asha = scheduler(trials)
        made = {}
        # Trial k reports only once trials 0 .. k - WINDOW have ended: the searcher's rule.
        for number in order:
            made[number] = report(asha, trials[number], 100, accuracies[number])
        return [made[number] for number in range(len(accuracies))]

    in_order = decisions(list(range(len(accuracies))))
    for shuffled in itertools.permutations(range(len(accuracies))):
        if all(
            shuffled.index(k) > max(shuffled.index(j) for j in range(k - WINDOW + 1))
            for k in range(WINDOW, 8)
        ):
            assert decisions(list(shuffled)) == in_order
    assert TrialScheduler.STOP in in_order and TrialScheduler.CONTINUE in in_order


def test_a_trial_that_reports_at_a_rung_again_keeps_its_verdict_there():
    trials = proposed(5)
    asha = scheduler(trials)
    for trial in trials[:3]:
        report(asha, trial, 100, 0.5)
    assert report(asha, trials[3], 100, 0.6) == TrialScheduler.CONTINUE
    asha.on_trial_add(None, trials[3])  # Tune adds a crashed trial again before it retries
    assert report(asha, trials[3], 100, 0.1) == TrialScheduler.CONTINUE  # its first verdict stands
    # Stopped, then killed before Tune's snapshot said so: resumed from before the rung, it stops again.
    assert report(asha, trials[4], 100, 0.2) == TrialScheduler.STOP
    assert report(asha, trials[4], 100, 0.9) == TrialScheduler.STOP


def test_in_a_sweep_of_many_epochs_a_trial_with_nothing_to_be_judged_against_stops_past_the_first_epoch():
    """Going on blindly is cheap within the first epoch, and costs whole final runs beyond it."""
    asha = InOrderASHA([100, 300], max_t=2700, reduction_factor=3, window=WINDOW, epoch_images=900)
    trials = proposed(WINDOW)
    for trial in trials:
        asha.on_trial_add(None, trial)
    for trial in trials:  # the first window: nothing ended before them
        assert report(asha, trial, 100, 0.5) == TrialScheduler.CONTINUE  # the next rung, 300: blindly on
        assert report(asha, trial, 300, 0.5) == TrialScheduler.STOP  # the next point, 2700: not blindly


def test_a_final_trial_goes_on_whatever_it_scores():
    asha = InOrderASHA(RUNGS, max_t=300, reduction_factor=3, window=1, epoch_images=900)
    trials = proposed(2, [{}, {FINAL_OF: "t0"}])
    for trial in trials:
        asha.on_trial_add(None, trial)
    assert report(asha, trials[0], 100, 0.9) == TrialScheduler.CONTINUE
    assert report(asha, trials[0], 300, 0.9) == TrialScheduler.STOP  # the search's top
    assert report(asha, trials[1], 100, 0.1) == TrialScheduler.CONTINUE  # below trial 0, and on
    assert report(asha, trials[1], 900, 0.1) == TrialScheduler.CONTINUE  # past the search's top


def test_a_resumed_sweep_decides_as_the_uninterrupted_one(tmp_path):
    """Tune restores trials, not the scheduler, and adds them back latest result first: the
    verdicts come from the results each trial's folder keeps, and the numbers from its tag."""
    rng = random.Random(0)
    scores = {k: [rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.7)] for k in range(9)}

    def straight(trials: list[Trial], asha: InOrderASHA, numbers: range) -> dict[tuple[int, int], str]:
        made = {}
        for k in numbers:  # in turn: each trial reports once the window before it has ended
            for rung, score in zip(RUNGS, scores[k], strict=True):
                made[k, rung] = report(asha, trials[k], rung, score)
                if made[k, rung] == TrialScheduler.STOP:
                    break
        return made

    trials = proposed(9)
    uninterrupted = straight(trials, scheduler(trials), range(9))

    before = proposed(9, storage=tmp_path)
    asha = scheduler(before)
    made = straight(before, asha, range(5))
    for k, trial in enumerate(before[:5]):  # the results Tune kept in each trial's folder
        folder = Path(trial.path)
        folder.mkdir(parents=True)
        kept = [
            {IMAGES_SEEN: rung, METRIC: scores[k][i]} for i, rung in enumerate(RUNGS) if (k, rung) in made
        ]
        (folder / "result.json").write_text("".join(json.dumps(result) + "\n" for result in kept))
    restored = InOrderASHA(RUNGS, max_t=END, reduction_factor=3, window=WINDOW, epoch_images=END)
    for trial in reversed(before):  # latest result first, as Tune's restore adds them
        restored.on_trial_add(None, trial)
    restored.on_trial_add(
        None,
        Trial(
            "train_convnet", stub=True, experiment_tag="10_x", storage=StorageContext(str(tmp_path), "sweep")
        ),
    )  # a new trial: no folder yet
    made |= straight(before, restored, range(5, 9))
    assert made == uninterrupted
    assert TrialScheduler.STOP in made.values() and TrialScheduler.CONTINUE in made.values()
