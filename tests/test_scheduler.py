"""ASHA with decisions the seed fixes: trial k is judged at a rung only against the trials that ended
before the searcher proposed it, so the order results arrive in changes nothing. Real Tune trials
(stubs of Tune's own Trial class) and the scheduler itself; no Ray runtime."""

from __future__ import annotations

import itertools

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from search.sweep.scheduler import InOrderASHA
from trainables.config import FINAL_OF
from trainables.names import IMAGES_SEEN, METRIC

RUNGS, END = [100, 300], 900  # a ninth and a third of a 900-image epoch
WINDOW = 3


def scheduler(trials: list[Trial]) -> InOrderASHA:
    asha = InOrderASHA(RUNGS, max_t=END, reduction_factor=3, window=WINDOW, epoch_images=END)
    for trial in trials:  # in the order proposed, as Tune adds them
        asha.on_trial_add(None, trial)
    return asha


def report(asha: InOrderASHA, trial: Trial, images_seen: int, accuracy: float) -> str:
    return asha.on_trial_result(None, trial, {IMAGES_SEEN: images_seen, METRIC: accuracy})


def test_the_first_trials_of_a_window_go_on_and_a_later_weak_one_stops_at_its_first_rung():
    trials = [Trial("train_convnet", stub=True) for _ in range(5)]
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
        trials = [Trial("train_convnet", stub=True) for _ in accuracies]
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


def test_a_retried_trial_is_not_judged_twice_at_a_rung():
    trials = [Trial("train_convnet", stub=True) for _ in range(4)]
    asha = scheduler(trials)
    for trial in trials[:3]:
        report(asha, trial, 100, 0.5)
    assert report(asha, trials[3], 100, 0.6) == TrialScheduler.CONTINUE
    asha.on_trial_add(None, trials[3])  # Tune adds a crashed trial again before it retries
    assert report(asha, trials[3], 100, 0.1) == TrialScheduler.CONTINUE  # its first verdict stands


def test_in_a_sweep_of_many_epochs_a_trial_with_nothing_to_be_judged_against_stops_past_the_first_epoch():
    """Going on blindly is cheap within the first epoch, and costs whole final runs beyond it."""
    asha = InOrderASHA([100, 300], max_t=2700, reduction_factor=3, window=WINDOW, epoch_images=900)
    trials = [Trial("train_convnet", stub=True) for _ in range(WINDOW)]
    for trial in trials:
        asha.on_trial_add(None, trial)
    for trial in trials:  # the first window: nothing ended before them
        assert report(asha, trial, 100, 0.5) == TrialScheduler.CONTINUE  # the next rung, 300: blindly on
        assert report(asha, trial, 300, 0.5) == TrialScheduler.STOP  # the next point, 2700: not blindly


def test_a_final_trial_goes_on_whatever_it_scores():
    asha = InOrderASHA(RUNGS, max_t=300, reduction_factor=3, window=1, epoch_images=900)
    trials = [Trial("train_convnet", stub=True, config=config) for config in ({}, {FINAL_OF: "t0"})]
    for trial in trials:
        asha.on_trial_add(None, trial)
    assert report(asha, trials[0], 100, 0.9) == TrialScheduler.CONTINUE
    assert report(asha, trials[0], 300, 0.9) == TrialScheduler.STOP  # the search's top
    assert report(asha, trials[1], 100, 0.1) == TrialScheduler.CONTINUE  # below trial 0, and on
    assert report(asha, trials[1], 900, 0.1) == TrialScheduler.CONTINUE  # past the search's top
