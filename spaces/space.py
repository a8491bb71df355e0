"""What a search space is: a define-by-run function, with the command line's --range and --fix."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from trainables.config import TrialConfig
from trainables.errors import InputError

# A define-by-run space: calls trial.suggest_* for what it searches, and returns the rest of the
# config: the constants, and whatever it derives from what it searched.
DefineByRun = Callable[[optuna.Trial], dict[str, Any]]
CONFIG_FIELDS = frozenset(TrialConfig().to_dict())


def _config_fields(config: TrialConfig) -> dict[str, Any]:
    return config.to_dict()


@dataclass(frozen=True)
class Range:
    """`--range NAME=LOW:HIGH[:log]`: the range a searched parameter is sampled from instead."""

    name: str
    low: float
    high: float
    log: bool = False

    def __str__(self) -> str:
        return f"{self.name}={self.low:g}:{self.high:g}" + (":log" if self.log else "")


@dataclass(frozen=True)
class SearchSpace:
    """A define-by-run space with fixed ranges, so Optuna's samplers model every parameter jointly."""

    name: str  # the function's: in the default experiment and sweep names
    summary: str
    define: DefineByRun
    # Settings for the searched parameters, evaluated first; the assignment's spaces start from the
    # assignment's own, so no sweep ends worse than the assignment did.
    first_point: dict[str, Any] = field(default_factory=dict)
    # A config's searched parameters, where the space searches something other than config fields
    # (nesterov searches the effective step lr / (1 - momentum)); by default the fields themselves.
    params_of: Callable[[TrialConfig], dict[str, Any]] = _config_fields
    # What --space named, resolved (a short name, /abs/file.py:function, module:function): a space
    # pickles as this and its overrides, and is loaded again from them (spaces.loading).
    reference: str = ""
    ranges: tuple[Range, ...] = ()  # --range: searched parameters sampled from other ranges
    fixed: tuple[tuple[str, Any], ...] = ()  # --fix: parameters or constants pinned to a value
    notes: tuple[str, ...] = ()  # what the overrides changed in the first point, for the user

    def __reduce__(self) -> tuple[Any, ...]:
        from spaces.loading import load_space  # which imports this module

        return load_space, (self.reference, self.ranges, self.fixed)

    def config_for(self, trial: optuna.Trial) -> TrialConfig:
        """What a trial of this space trains: its suggestions plus what the space returns."""
        overridden = Overridden(trial, self)
        decided = self.define(overridden)  # type: ignore[arg-type]
        searched = {name: value for name, value in overridden.params.items() if name in CONFIG_FIELDS}
        # A --fix the function did not ask for pins a constant of it (only a config field can be).
        pinned, fixed = overridden.pinned, self.fixed
        constants = {name: value for name, value in fixed if name in CONFIG_FIELDS and name not in pinned}
        return TrialConfig.from_dict({**searched, **decided, **constants})

    def distributions(self) -> dict[str, BaseDistribution]:
        """What the space searches, and the range of each: as one pass of its function meets them,
        at its first point (a conditional space's other branches are not seen)."""
        recorder = RecordingTrial(self.first_point)
        self.define(Overridden(recorder, self))  # type: ignore[arg-type]
        return recorder.distributions

    def searched_at(self, config: TrialConfig) -> dict[str, BaseDistribution]:
        """The distributions of the parameters the space searched for this config."""
        recorder = RecordingTrial(self.params_of(config))
        with warnings.catch_warnings():  # a config from an older, wider space: its caller decides
            warnings.filterwarnings("ignore", "The value .* is out of the range", UserWarning)
            self.define(Overridden(recorder, self))  # type: ignore[arg-type]
        return recorder.distributions

    def searched_values(self, config: TrialConfig) -> dict[str, Any]:
        """The values the space searched for this config, by parameter name."""
        params = self.params_of(config)
        return {name: _on_its_edge(params[name], range_) for name, range_ in self.searched_at(config).items()}

    def builds(self, config: TrialConfig) -> bool:
        """Whether the space, given the values it would have searched for this config, builds it: a
        trial of another space that searched the same names, with other constants, does not."""
        try:
            rebuilt = self.config_for(optuna.trial.FixedTrial(self.searched_values(config))).to_dict()  # type: ignore[arg-type]
        except (InputError, ValueError):  # its values build nothing valid here
            return False
        return all(_same(rebuilt[name], value) for name, value in config.to_dict().items())


def _same(a: Any, b: Any) -> bool:
    return math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) else a == b


def _on_its_edge(value: Any, distribution: BaseDistribution) -> Any:
    """A value that `params_of` derived back (nesterov's step, from lr / (1 - momentum)) is exact only
    up to rounding: one the sampler put on its range's edge (GP often does) reads back on it, not a
    hair outside, where Optuna would refuse it."""
    if isinstance(distribution, FloatDistribution):
        for edge in (distribution.low, distribution.high):
            if math.isclose(value, edge, rel_tol=1e-9):
                return edge
    return value


class RecordingTrial:
    """Stands in for an Optuna trial to see what a space searches: each suggestion returns the given
    value for its name (else its range's low end, or first choice) and records its distribution."""

    number = 0  # what a function may read of an Optuna trial, besides its suggestions

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.distributions: dict[str, BaseDistribution] = {}
        self.params: dict[str, Any] = {}
        self.user_attrs: dict[str, Any] = {}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return self._suggest(name, FloatDistribution(low, high, step=step, log=log), low)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._suggest(name, IntDistribution(low, high, step=step, log=log), low)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._suggest(name, CategoricalDistribution(choices), next(iter(choices)))

    def _suggest(self, name: str, distribution: BaseDistribution, default: Any) -> Any:
        value = self.values.get(name, default)
        self.distributions[name], self.params[name] = distribution, value
        return value


class Overridden:
    """A trial as the space's function sees it under --range and --fix: a pinned parameter returns its
    value unsearched; a ranged one is sampled from the command line's range."""

    def __init__(self, trial: Any, space: SearchSpace) -> None:
        self.trial = trial
        self.ranges = {range_.name: range_ for range_ in space.ranges}
        self.fixed = dict(space.fixed)
        self.pinned: dict[str, Any] = {}  # the --fix values the function asked for, by name

    def __getattr__(self, name: str) -> Any:  # number, user attributes, ...: the trial's own
        return getattr(self.trial, name)

    @property
    def params(self) -> dict[str, Any]:
        return {**self.trial.params, **self.pinned}

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        if name in self.fixed:
            return self._pin(name)
        low, high, log = self._range(name, low, high, log)
        return self.trial.suggest_float(name, low, high, step=step, log=log)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        if name in self.fixed:
            return self._pin(name)
        low, high, log = self._range(name, low, high, log)
        return self.trial.suggest_int(name, int(low), int(high), step=step, log=log)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        if name in self.fixed:
            return self._pin(name)
        return self.trial.suggest_categorical(name, choices)

    def _pin(self, name: str) -> Any:
        self.pinned[name] = self.fixed[name]
        return self.fixed[name]

    def _range(self, name: str, low: Any, high: Any, log: bool) -> tuple[Any, Any, bool]:
        range_ = self.ranges.get(name)
        return (low, high, log) if range_ is None else (range_.low, range_.high, range_.log)


def register_space(
    summary: str,
    first_point: dict[str, Any],
    params_of: Callable[[TrialConfig], dict[str, Any]] = _config_fields,
) -> Callable[[DefineByRun], DefineByRun]:
    """Marks a define-by-run function as a search space, with a summary and a first point to
    evaluate; `search.run --space FILE:FUNCTION` (or MODULE:FUNCTION) finds it. A plain function
    of an Optuna trial is a space too, with its docstring's first line as its summary."""

    def mark(define: DefineByRun) -> DefineByRun:
        define.search_space = SearchSpace(define.__name__, summary, define, first_point, params_of)  # type: ignore[attr-defined]
        return define

    return mark
