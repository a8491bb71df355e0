"""The in-order searcher: the same seed proposes the same configs, whatever order trials finish in.
Real Optuna samplers behind Ray's OptunaSearch; no Ray runtime."""

from __future__ import annotations

import optuna
import pytest
from ray.tune.search.optuna import OptunaSearch

from search.sweep.searcher import InOrderSearcher
from trainables.names import METRIC, MODE


def space(trial: optuna.Trial) -> None:
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_int("width", 8, 64, log=True)


def searcher(window: int, num_samples: int) -> InOrderSearcher:
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2, constant_liar=True)
    return InOrderSearcher(OptunaSearch(space, METRIC, MODE, sampler=sampler), window, num_samples)


def score(config: dict) -> float:
    return -abs(config["lr"] - 0.01) - abs(config["width"] - 32) / 1000


def sweep(finish_order: list[int], window: int = 2, num_samples: int = 8) -> list[dict]:
    """Proposes as a sweep of `window` slots would, finishing the trials under way in the given order
    of preference; returns the configs proposed, in proposal order."""
    wrapper = searcher(window, num_samples)
    proposed: dict[str, dict] = {}
    running: list[str] = []
    preference = iter(finish_order * num_samples)
    while len(proposed) < num_samples or running:
        while len(proposed) < num_samples and len(running) < window:
            trial_id = f"t{len(proposed)}"
            config = wrapper.suggest(trial_id)
            if config is None:
                break  # the wrapper waits for an earlier trial: a real sweep would too
            proposed[trial_id] = config
            running.append(trial_id)
        finishing = running.pop(next(preference) % len(running))
        wrapper.on_trial_complete(finishing, {METRIC: score(proposed[finishing])})
    return list(proposed.values())


def test_the_same_seed_proposes_the_same_configs_whatever_order_trials_finish_in():
    in_order = sweep(finish_order=[0])  # the oldest trial always finishes first
    out_of_order = sweep(finish_order=[1, 0, 1])  # later trials often overtake earlier ones
    assert out_of_order == in_order
    assert len({(config["lr"], config["width"]) for config in in_order}) == len(in_order)


def test_a_trial_waits_for_the_one_a_window_before_it():
    wrapper = searcher(window=2, num_samples=4)
    assert wrapper.suggest("t0") is not None and wrapper.suggest("t1") is not None
    assert wrapper.suggest("t2") is None  # t0 has not finished: proposing now would depend on timing
    wrapper.on_trial_complete("t1", {METRIC: 0.5})  # a later trial finishing does not release t2
    assert wrapper.suggest("t2") is None
    wrapper.on_trial_complete("t0", {METRIC: 0.4})
    assert wrapper.suggest("t2") is not None


@pytest.mark.parametrize("window", [1, 3])
def test_every_window_proposes_exactly_the_budget(window):
    assert len(sweep(finish_order=[0], window=window, num_samples=5)) == 5
