"""The sweep's searcher: the same seed proposes the same configs whatever order trials finish in, and
Optuna hears honestly how each trial ended. Real Optuna samplers and studies; no Ray runtime."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search.sweep.searcher import SweepSearcher, TrialCost, make_sampler, warm_start_trials
from search.tracking.history import PastTrial
from spaces import get_space
from trainables.config import FINAL_OF, TrialConfig
from trainables.names import DIVERGED, EPOCH, IMAGES_SEEN, METRIC, TRAIN_TFLOP

SPACE = get_space("nesterov")


COST = TrialCost(input_shape=(3, 32, 32), num_classes=10, images=900)  # one epoch of 900 images


def searcher(
    window: int, num_samples: int, sampler: str = "tpe", complete_at: float = 1, budget: float = math.inf
) -> SweepSearcher:
    study = optuna.create_study(
        direction="maximize", sampler=make_sampler(sampler, seed=0, num_samples=num_samples)
    )
    study.enqueue_trial(SPACE.first_point)
    return SweepSearcher(SPACE, study, COST, complete_at, window, num_samples, compute_budget=budget)


def score(config: dict) -> float:
    return 0.6 - abs(config["lr"] - 0.01) - abs(config["channel_2"] - 64) / 1000


def result(config: dict, epoch: float = 1.0, **extra) -> dict:
    tflop = COST.most_tflop(TrialConfig.from_dict(config)) * epoch
    return {METRIC: score(config), EPOCH: epoch, IMAGES_SEEN: int(epoch * 900), TRAIN_TFLOP: tflop, **extra}


def sweep(
    finish_order: list[int],
    window: int = 2,
    num_samples: int = 8,
    sampler: str = "tpe",
    budget: float = math.inf,
) -> list[dict]:
    """Proposes as a sweep of `window` slots would, finishing the trials under way in the given order
    of preference; returns the configs proposed, in proposal order."""
    wrapper = searcher(window, num_samples, sampler, budget=budget)
    proposed: dict[str, dict] = {}
    running: list[str] = []
    preference = iter(finish_order * num_samples)
    finished = False
    while (len(proposed) < num_samples and not finished) or running:
        while len(proposed) < num_samples and len(running) < window and not finished:
            trial_id = f"t{len(proposed)}"
            config = wrapper.suggest(trial_id)
            if config is None:
                break  # the searcher waits for an earlier trial: a real sweep would too
            if config == Searcher.FINISHED:
                finished = True
                break
            proposed[trial_id] = config
            running.append(trial_id)
        if not running:
            break  # the budget is spent and every trial has ended
        finishing = running.pop(next(preference) % len(running))
        wrapper.on_trial_complete(finishing, result(proposed[finishing]))
    return list(proposed.values())


@pytest.mark.parametrize("sampler", ["tpe", "gp", "random"])
def test_the_same_seed_proposes_the_same_configs_whatever_order_trials_finish_in(sampler):
    in_order = sweep(finish_order=[0], sampler=sampler)  # the oldest trial always finishes first
    out_of_order = sweep(finish_order=[1, 0, 1], sampler=sampler)  # later trials often overtake
    assert out_of_order == in_order
    assert in_order[0] == TrialConfig().to_dict()  # the assignment's point comes first
    assert len({(config["lr"], config["channel_1"]) for config in in_order}) == len(in_order)


@pytest.mark.parametrize("budget", [0.2, 1.0])  # TFLOP: 3 and 6 of the 40 trials
def test_a_compute_budget_ends_the_same_seed_at_the_same_trial_whatever_order_trials_finish_in(budget):
    in_order = sweep(finish_order=[0], window=3, num_samples=40, budget=budget)
    out_of_order = sweep(finish_order=[2, 0, 1, 1], window=3, num_samples=40, budget=budget)
    assert out_of_order == in_order and len(in_order) < 40
    # It ends at the first trial that brings it past the budget: no sooner, and no later.
    spent = [COST.most_tflop(TrialConfig.from_dict(config)) for config in in_order]
    assert sum(spent[:-1]) < budget <= sum(spent)


def test_a_trial_waits_for_the_one_a_window_before_it():
    wrapper = searcher(window=2, num_samples=4)
    first, second = wrapper.suggest("t0"), wrapper.suggest("t1")
    assert wrapper.suggest("t2") is None  # t0 has not finished: proposing now would depend on timing
    wrapper.on_trial_complete("t1", result(second))  # a later trial finishing does not release t2
    assert wrapper.suggest("t2") is None
    wrapper.on_trial_complete("t0", result(first))
    assert wrapper.suggest("t2") is not None


def test_optuna_hears_complete_pruned_failed_and_diverged_as_each_is():
    wrapper = searcher(window=5, num_samples=5)
    configs = {
        trial_id: wrapper.suggest(trial_id) for trial_id in ("done", "stopped", "crashed", "nan", "waits")
    }
    wrapper.on_trial_result("stopped", result(configs["stopped"], epoch=1 / 9))
    wrapper.on_trial_complete("done", result(configs["done"], epoch=1.0))
    wrapper.on_trial_complete("stopped", result(configs["stopped"], epoch=1 / 3))  # ASHA's stop at a rung
    wrapper.on_trial_complete("crashed", None, error=True)
    wrapper.on_trial_complete("nan", {METRIC: 0.0, DIVERGED: 1.0, EPOCH: 1 / 9, IMAGES_SEEN: 100})
    wrapper.on_trial_complete("waits", result(configs["waits"]))
    done, stopped, crashed, nan, waits = wrapper.study.trials
    assert done.state == TrialState.COMPLETE and done.value == pytest.approx(score(configs["done"]))
    assert stopped.state == TrialState.PRUNED
    assert stopped.intermediate_values == {100: score(configs["stopped"]), 300: score(configs["stopped"])}
    assert crashed.state == TrialState.FAIL and crashed.value is None
    assert nan.state == TrialState.COMPLETE and nan.value == 0.0  # ranked last, as a finite value
    assert waits.state == TrialState.COMPLETE


def test_earlier_sweeps_trials_seed_the_study_and_those_out_of_range_are_skipped():
    inside = PastTrial("old", TrialConfig(lr=0.008, momentum=0.6, channel_1=40, channel_2=40), 0.55)
    outside = PastTrial("old", TrialConfig(lr=0.008, momentum=0.6, channel_1=256, channel_2=40), 0.57)
    trials, skipped = warm_start_trials(SPACE, [inside, outside])
    assert skipped == 1 and len(trials) == 1
    assert trials[0].value == 0.55 and trials[0].params["effective_step"] == pytest.approx(0.02)
    assert trials[0].user_attrs["warm_start_from"] == "old"


def test_a_searcher_restored_behind_its_study_neither_tells_twice_nor_leaves_a_ghost_running(tmp_path):
    # The study is written at once; Tune snapshots the searcher now and then. A kill -9 between the
    # two leaves a snapshot that has not heard what the study already knows.
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))
    study = optuna.create_study(
        study_name="s", storage=storage, direction="maximize", sampler=make_sampler("tpe", 0, 8)
    )
    live = SweepSearcher(SPACE, study, COST, complete_at=1, window=1, num_samples=8)  # one trial at a time
    first = live.suggest("t0")
    live.save(str(tmp_path / "snapshot.pkl"))  # Tune's last snapshot before the kill
    live.on_trial_complete("t0", result(first))
    live.suggest("t1")  # t0 told to the study, t1 proposed: neither is in the snapshot

    restored = SweepSearcher(SPACE, study, COST, complete_at=1, window=1, num_samples=8)
    restored.restore(str(tmp_path / "snapshot.pkl"))
    restored.on_trial_complete("t0", result(first))  # Tune ends t0 again, from its checkpoint
    assert restored.suggest("t1") is not None
    states = [trial.state for trial in optuna.load_study(study_name="s", storage=storage).trials]
    # t0 told once; the ghost proposal FAIL, since it will never run; t1 proposed anew.
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING]


# Under --top-rung best: the search's rungs at a ninth and a third of a 900-image epoch, its top;
# the final trial trains 3 epochs.
FINAL_RUNGS = (100, 300)
FINAL_COST = TrialCost(input_shape=(3, 32, 32), num_classes=10, images=300, final_images=2700)


def final_searcher(num_samples: int, budget: float = math.inf) -> SweepSearcher:
    study = optuna.create_study(direction="maximize", sampler=make_sampler("gp", seed=0, num_samples=8))
    study.enqueue_trial(SPACE.first_point)
    return SweepSearcher(
        SPACE, study, FINAL_COST, 1 / 3, 1, num_samples, compute_budget=budget, final_rungs=FINAL_RUNGS
    )


def search(wrapper: SweepSearcher, scores: list[float], stop_at_first_rung: set[int]) -> list[dict]:
    """Runs the search one trial at a time, each scored `scores[k]` at each rung it reaches (the
    ones in `stop_at_first_rung` stop at the first); returns what the searcher then proposes."""
    proposed = []
    for number, value in enumerate(scores):
        config = wrapper.suggest(f"t{number}")
        proposed.append(config)
        top = FINAL_RUNGS[0] if number in stop_at_first_rung else FINAL_RUNGS[-1]
        tflop = FINAL_COST.most_tflop(TrialConfig.from_dict(config)) * top / 300
        for seen in FINAL_RUNGS:
            if seen <= top:
                reported = {METRIC: value, EPOCH: seen / 900, IMAGES_SEEN: seen + 4, TRAIN_TFLOP: tflop}
                wrapper.on_trial_result(f"t{number}", reported)
        wrapper.on_trial_complete(f"t{number}", reported)
    return proposed


def test_the_final_trial_trains_the_search_best_at_its_top_rung_and_the_study_models_the_search_alone():
    wrapper = final_searcher(num_samples=5)
    proposed = search(wrapper, scores=[0.3, 0.5, 0.9, 0.4], stop_at_first_rung={2})
    final = wrapper.suggest("t4")
    # Trial 2 scored best, but at the lower rung only: of the trials at the top, trial 1.
    assert final == {**proposed[1], FINAL_OF: "t1"}
    assert wrapper.suggest("t5") == Searcher.FINISHED
    wrapper.on_trial_complete("t4", result(proposed[1], epoch=3.0))
    states = [trial.state for trial in wrapper.study.trials]
    # Those that trained to the search's top are COMPLETE there; the final trial is no trial of it.
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert wrapper.study.trials[1].value == 0.5


def test_the_final_trial_is_the_best_the_budget_left_can_finish():
    dear = TrialConfig(channel_1=128, channel_2=128)  # a final run of it costs far more than the rest
    cheap = TrialConfig(channel_1=16, channel_2=16)
    budget = 3 * FINAL_COST.most_tflop(dear) + FINAL_COST.final_tflop(TrialConfig()) * 1.5
    assert FINAL_COST.final_tflop(dear) > budget
    wrapper = final_searcher(num_samples=4, budget=budget)
    for config in (dear, cheap):  # trials 1 and 2, after the assignment's point
        wrapper.study.enqueue_trial(SPACE.searched_values(config))
    proposed = search(wrapper, scores=[0.3, 0.9, 0.5], stop_at_first_rung=set())
    assert proposed[1]["channel_1"] == 128 and proposed[2]["channel_1"] == 16
    # Trial 1 led the search, but its final run is beyond the budget left: trial 2, the next best.
    assert wrapper.suggest("t3") == {**proposed[2], FINAL_OF: "t2"}
