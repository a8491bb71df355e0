"""How a sweep proposes its trials: an Optuna study behind Tune, told honestly, in an order the seed fixes.

`SweepSearcher` is Tune's searcher for a sweep. It owns an Optuna study (in an
Optuna storage beside the sweep's folder where that folder is local, so
`optuna.load_study` and optuna-dashboard read it) and tells it what happened to
each trial as Optuna means it:

- COMPLETE with its last value, for a trial that trained to the end (a diverged
  trial too: it ends at once and reports 0.0, a finite value the sampler can rank);
- PRUNED, with its value at each report as intermediate values, for a trial the
  scheduler stopped early: its score at a low fidelity is not a final score;
- FAIL, for a trial that crashed.

In order: with trials running in parallel, a model-based sampler would propose each
trial from whichever trials happen to have finished, so timing would decide the
configs. Here the study hears of finished trials strictly in the order they were
proposed, and trial k is proposed only when trials 0 .. k - window have finished,
from exactly those. So the same seed gives the same configs. The cost: trial k waits
for trial k - window even when a later one has finished; a window of one more than
the trials at once keeps a proposal ready for the next free slot, unless two trials
finish out of order in a row.

The compute budget is decided the same way, so it ends a seed's sweep at the same trial on
any machine: trial k starts while trials 0 .. k - window trained, plus the trials since
counted at their most (all their epochs), less than the budget. When that is too close to
call, trial k waits for every earlier trial to end and starts if they trained less than it.
A sweep thus ends at the first trial that takes it past its budget.

Under --top-rung best the search's trials stop at the search's top rung, below the sweep's end:
one that reaches it has trained to the search's end, and Optuna hears of it as COMPLETE at its
score there. The sweep then ends with one more trial, the final one: the incumbent, trained to the
end. The incumbent is the config that scored best at the highest rung reached by any config whose
final run the budget left can pay for (a wide config can lead the search and still be too dear to
finish; where the budget left pays for none, the cheapest to finish). It is proposed once every
trial of the search has ended, so it is chosen from all of them, the same on any machine. The
budget reserves its cost from the start (the incumbent's so far, or the first trial's before any
has ended, plus the dearest trial of the search yet, since the search ends at the first trial past
its share), so the search stops in time to pay for it. The study does not hear of the final trial:
its score is at another fidelity than the search's, which the sampler models.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState, create_trial
from ray.tune.search import Searcher

from search.sweep.settings import SweepSettings
from search.tracking.history import PastTrial
from spaces import SearchSpace
from trainables.config import FINAL_OF, TrialConfig
from trainables.model import ImageShape, training_flops_per_image
from trainables.names import DIVERGED, EPOCH, IMAGES_SEEN, METRIC, MODE, TRAIN_TFLOP


def make_sampler(name: str, seed: int, num_samples: int) -> optuna.samplers.BaseSampler:
    """The sampler of --sampler, seeded; model-based ones start from random trials in proportion
    to the budget (Optuna's fixed 10 would leave a small sweep entirely random)."""
    startup = min(10, max(2, num_samples // 4))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=startup,
        multivariate=True,  # widths, step and weight decay interact: model them jointly
        constant_liar=True,  # parallel trials: do not propose the same point twice
    )


def warm_start_trials(space: SearchSpace, past: list[PastTrial]) -> tuple[list[FrozenTrial], int]:
    """Earlier sweeps' trials as Optuna's, for the study to learn from; and how many were skipped,
    their params outside the space's current ranges."""
    distributions = space.distributions()
    trials, skipped = [], 0
    for trial in past:
        values = space.searched_values(trial.config)
        if set(values) != set(distributions):  # another branch of a conditional space
            skipped += 1
            continue
        if not all(_within(distributions[name], values.get(name)) for name in distributions):
            skipped += 1
            continue
        if not space.builds(trial.config):
            continue  # a trial of another space that searched the same names, with other constants
        attrs = {"warm_start_from": trial.sweep}
        trials.append(
            create_trial(params=values, distributions=distributions, value=trial.value, user_attrs=attrs)
        )
    return trials, skipped


def _same_point(params: dict[str, Any], point: dict[str, Any]) -> bool:
    """Whether params are the point, up to the rounding of values derived back (nesterov's step)."""
    if not set(point) <= set(params):
        return False
    return all(
        math.isclose(params[name], value, rel_tol=1e-9) if isinstance(value, float) else params[name] == value
        for name, value in point.items()
    )


def _within(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    return value is not None and distribution.low <= value <= distribution.high  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TrialCost:
    """The most compute a trial can spend, at its config's arithmetic per image."""

    input_shape: ImageShape
    num_classes: int
    images: int  # the most images a trial of the search trains on, its scoring decays included
    final_images: int = 0  # those of the final trial (all the epochs), under --top-rung best

    def most_tflop(self, config: TrialConfig) -> float:
        return self._tflop(config, self.images)

    def final_tflop(self, config: TrialConfig) -> float:
        return self._tflop(config, self.final_images)

    def _tflop(self, config: TrialConfig, images: int) -> float:
        return training_flops_per_image(config, self.input_shape, self.num_classes) * images / 1e12


def make_searcher(
    space: SearchSpace,
    settings: SweepSettings,
    window: int,
    history: list[FrozenTrial],
    deadline: float | None,
    cost: TrialCost,
    complete_at: float,
    final_rungs: tuple[int, ...] = (),
) -> SweepSearcher:
    """The sweep's searcher, its study seeded with the space's first point and earlier sweeps' trials.
    `complete_at`: the epochs a trial of the search trains at most; `final_rungs` (images seen at the
    search's rungs) under --top-rung best, else none."""
    journal = settings.optuna_journal  # in the local storage folder, which run_sweep has made
    storage = None if journal is None else JournalStorage(JournalFileBackend(journal))
    # A warm start offsets the seed by the trials it brings: the same seed would draw the random
    # start-up points of the sweep those trials came from again, and train configs already scored.
    seed = settings.seed + len(history)
    study = optuna.create_study(
        study_name=settings.sweep_name,
        storage=storage,
        sampler=make_sampler(settings.sampler, seed, settings.num_samples),
        direction="maximize" if MODE == "max" else "minimize",
    )
    study.add_trials(history)
    if space.first_point and not any(_same_point(trial.params, space.first_point) for trial in history):
        study.enqueue_trial(space.first_point)  # the space's first point, unless a warm start scored it
    return SweepSearcher(
        space,
        study,
        cost,
        complete_at,
        window,
        settings.num_samples,
        deadline,
        settings.compute_budget,
        final_rungs,
    )


@dataclass
class _Ledger:
    """What the searcher keeps besides the study: the order of proposals and what came back."""

    proposed: list[str] = field(default_factory=list)  # Tune trial ids, in the order proposed
    trials: dict[str, optuna.Trial | None] = field(default_factory=dict)  # Tune id -> Optuna's (final: none)
    reports: dict[str, dict[int, float]] = field(default_factory=dict)  # id -> images seen -> value
    finished: dict[str, tuple[dict | None, bool]] = field(default_factory=dict)  # not yet told
    tflop: dict[str, float] = field(default_factory=dict)  # id -> its training so far, in TFLOP
    told_tflop: list[float] = field(default_factory=list)  # what proposed[:told] trained, in order
    most_tflop: list[float] = field(default_factory=list)  # what each proposed trial may train at most
    closed: bool = False  # a budget is spent: nothing more is proposed (but the final trial)
    told: int = 0  # proposed[:told] have been told to the study
    # Under --top-rung best: each proposal's config and Optuna params, in order; the told trials'
    # scores at the search's rungs, by their place in that order; and the final trial, once proposed.
    configs: list[dict] = field(default_factory=list)
    rung_scores: dict[int, dict[int, float]] = field(default_factory=dict)
    final: str | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # a ledger saved by an older version gets the fields it lacks, at their defaults
        self.__dict__.update(state)


class SweepSearcher(Searcher):
    def __init__(
        self,
        space: SearchSpace,
        study: optuna.Study,
        cost: TrialCost,  # what a trial may train at most, for the compute budget
        complete_at: float,  # epochs: a trial that reports this far trained to the search's end
        window: int,
        num_samples: int,
        deadline: float | None = None,
        compute_budget: float = math.inf,
        final_rungs: tuple[int, ...] = (),  # under --top-rung best: the search's rungs, in images seen
    ) -> None:
        super().__init__(metric=METRIC, mode=MODE)
        self.space = space
        self.study = study
        self.complete_at = complete_at
        self.window = window  # proposals that may be out at once: trial k waits for k - window
        self.num_samples = num_samples
        self.deadline = deadline  # wall-clock time after which no trial is proposed (--time-budget)
        self.compute_budget = compute_budget  # TFLOP after which no trial is proposed (--compute-budget)
        self.cost = cost
        self.final_rungs = final_rungs
        self.ledger = _Ledger()

    @property
    def search_samples(self) -> int:
        """The trials of the search: all of --num-samples, but the final trial under --top-rung best."""
        return self.num_samples - 1 if self.final_rungs else self.num_samples

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the metric and mode are the sweep's own, fixed

    def suggest(self, trial_id: str) -> dict | str | None:
        ledger = self.ledger
        must_know = max(0, len(ledger.proposed) - self.window + 1)  # trials 0 .. k - window, for trial k
        self._tell_up_to(must_know)
        out_of_time = self.deadline is not None and time.time() >= self.deadline
        if out_of_time or ledger.closed or (self.final_rungs and len(ledger.proposed) >= self.search_samples):
            return self._close(trial_id)
        if ledger.told < must_know or len(ledger.proposed) >= self.num_samples:
            return None  # Tune asks again once a trial finishes
        within_budget = self._within_budget(must_know)
        if within_budget is None:
            return None  # too close to call until the trials under way end
        if not within_budget:
            return self._close(trial_id)
        trial = self.study.ask()
        config = self.space.config_for(trial)
        return self._propose(trial_id, trial, config.to_dict(), self.cost.most_tflop(config))

    def _propose(self, trial_id: str, trial: optuna.Trial | None, config: dict, most_tflop: float) -> dict:
        ledger = self.ledger
        ledger.most_tflop.append(most_tflop)
        ledger.proposed.append(trial_id)
        ledger.trials[trial_id] = trial
        ledger.reports[trial_id] = {}
        ledger.configs.append(config)
        return config

    def _within_budget(self, must_know: int) -> bool | None:
        """Whether the next trial may start within the compute budget; None: not before the trials
        under way end. Decided from what the seed fixes, never from which trial ended first."""
        ledger = self.ledger
        if math.isinf(self.compute_budget):
            return True
        budget = self.compute_budget - self._final_reserve()
        at_most = sum(ledger.told_tflop[:must_know]) + sum(ledger.most_tflop[must_know:])
        if at_most < budget:
            return True
        self._tell_up_to(len(ledger.proposed))
        if ledger.told < len(ledger.proposed):
            return None
        return sum(ledger.told_tflop) < self.compute_budget - self._final_reserve()

    def _final_reserve(self) -> float:
        """What to keep back for the final trial (0 without one): its cost, as far as the trials told
        so far say, and that of the dearest trial of the search yet, since the search ends at the
        first trial past its share, which then spends into the reserve."""
        if not self.final_rungs or not self.ledger.configs:
            return 0.0
        place = self._incumbent()
        return self._final_cost(0 if place is None else place) + max(self.ledger.most_tflop)

    def _final_cost(self, place: int) -> float:
        return self.cost.final_tflop(TrialConfig.from_dict(self.ledger.configs[place]))

    def _close(self, trial_id: str) -> dict | str | None:
        """No more trials of the search (a budget is spent): the trials under way end, each is told;
        under --top-rung best, the final trial then trains the incumbent to the end."""
        ledger = self.ledger
        ledger.closed = True
        self._tell_up_to(len(ledger.proposed))
        if not self.final_rungs or ledger.final is not None:
            return Searcher.FINISHED
        if ledger.told < len(ledger.proposed):
            return None  # the final trial is chosen from every trial of the search
        place = self._incumbent()
        if place is None:
            return Searcher.FINISHED  # no trial was scored at a rung, or none the budget can finish
        final = {**ledger.configs[place], FINAL_OF: ledger.proposed[place]}
        ledger.final = trial_id
        return self._propose(trial_id, None, final, self._final_cost(place))

    def _incumbent(self) -> int | None:
        """The place (in the order proposed) of the told trial that scored best at the highest rung
        reached by a told trial whose final run the budget left pays for; the earliest among equals.
        Where the budget left pays for none, the cheapest to finish. None while no trial has a score."""
        scored = self.ledger.rung_scores
        left = self.compute_budget - sum(self.ledger.told_tflop)
        scores = {place: mine for place, mine in scored.items() if self._final_cost(place) <= left}
        if not scores and scored:  # a sweep should end with a final model, at the least cost past it
            cheapest = min(scored, key=lambda place: (self._final_cost(place), place))
            scores = {
                place: scored[place]
                for place in scored
                if self._final_cost(place) == self._final_cost(cheapest)
            }
        reached = [rung for rung in self.final_rungs if any(rung in mine for mine in scores.values())]
        if not reached:
            return None
        top = reached[-1]
        sign = 1.0 if MODE == "max" else -1.0
        return max(
            (place for place in scores if top in scores[place]), key=lambda p: (sign * scores[p][top], -p)
        )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.ledger.reports and METRIC in result and IMAGES_SEEN in result:
            self.ledger.reports[trial_id][int(result[IMAGES_SEEN])] = float(result[METRIC])
        if trial_id in self.ledger.reports and TRAIN_TFLOP in result:
            self.ledger.tflop[trial_id] = float(result[TRAIN_TFLOP])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None:  # the last report comes here, not through on_trial_result
            self.on_trial_result(trial_id, result)
        self.ledger.finished[trial_id] = (result, error)
        if self.ledger.closed or len(self.ledger.proposed) >= self.num_samples:  # tell all, in order
            self._tell_up_to(len(self.ledger.proposed))

    def _tell_up_to(self, count: int) -> None:
        ledger = self.ledger
        while ledger.told < count and ledger.proposed[ledger.told] in ledger.finished:
            trial_id = ledger.proposed[ledger.told]
            ledger.told_tflop.append(ledger.tflop.pop(trial_id, 0.0))
            self._tell(trial_id, *ledger.finished.pop(trial_id))
            ledger.told += 1

    def _tell(self, trial_id: str, result: dict | None, error: bool) -> None:
        trial = self.ledger.trials.pop(trial_id)
        reports = self.ledger.reports.pop(trial_id)
        if trial is None:
            return  # the final trial: the study models the search alone
        if self.final_rungs and not error:
            place = self.ledger.proposed.index(trial_id)
            self.ledger.rung_scores[place] = self._at_rungs(reports)
        if self._study_trial(trial.number).state.is_finished():
            return  # told before a kill -9 left Tune's last snapshot of this searcher behind the study
        for images_seen, value in sorted(reports.items()):
            trial.report(value, images_seen)
        state, value = outcome(result, error, self.complete_at)
        self.study.tell(trial, value, state=state)

    def _at_rungs(self, reports: dict[int, float]) -> dict[int, float]:
        """A trial's score at each rung it reached: its first report there, since training reaches a
        point to a whole batch, so a little past it."""
        scores = {}
        for rung, above in zip(self.final_rungs, [*self.final_rungs[1:], math.inf], strict=True):
            past = [seen for seen in sorted(reports) if rung <= seen < above]
            if past:
                scores[rung] = reports[past[0]]
        return scores

    def _study_trial(self, number: int) -> FrozenTrial:
        return self.study.get_trials(deepcopy=False)[number]  # a study numbers its trials 0, 1, ...

    def _fail_orphans(self) -> None:
        """The study is written at once, this searcher only when Tune snapshots the sweep: after a
        kill -9, a trial proposed since the last snapshot is RUNNING in the study, unknown here, and
        will never run. It is told FAIL, so the sampler does not count it as running for ever."""
        known = {trial.number for trial in self.ledger.trials.values() if trial is not None}
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in known:
                self.study.tell(trial.number, state=TrialState.FAIL)

    # Tune saves a searcher with `save` and brings it back on restore with `restore`.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update({"compute_budget": math.inf, **pickle.load(file)})  # saved before budgets
        self._fail_orphans()


def outcome(result: dict | None, error: bool, complete_at: float) -> tuple[TrialState, float | None]:
    """How Optuna should see a trial that Tune finished with this last result."""
    if error:
        return TrialState.FAIL, None
    if result is None or METRIC not in result or not math.isfinite(float(result[METRIC])):
        return TrialState.PRUNED, None  # stopped before it reported anything
    if result.get(DIVERGED):
        return TrialState.COMPLETE, float(result[METRIC])  # 0.0: a finite value, ranked last
    if float(result.get(EPOCH, 0)) < complete_at - 1e-9:
        return TrialState.PRUNED, None  # the scheduler stopped it early: its reports tell how far it got
    return TrialState.COMPLETE, float(result[METRIC])
