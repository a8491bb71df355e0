"""The registry of search spaces: `--space NAME` picks one, tests sweep them all."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution

from trainables.config import TrialConfig
from trainables.errors import InputError

# A define-by-run space: calls trial.suggest_* for what it searches, and returns the rest of the
# config: the constants, and whatever it derives from what it searched.
DefineByRun = Callable[[optuna.Trial], dict[str, Any]]
CONFIG_FIELDS = frozenset(TrialConfig().to_dict())


def _config_fields(config: TrialConfig) -> dict[str, Any]:
    return config.to_dict()


@dataclass(frozen=True)
class SearchSpace:
    """A define-by-run space with fixed ranges, so Optuna's samplers model every parameter jointly."""

    name: str
    summary: str
    define: DefineByRun
    # The assignment's own settings for the searched parameters, evaluated first,
    # so no sweep ends worse than the assignment did.
    first_point: dict[str, Any] = field(default_factory=dict)
    # A config's searched parameters, where the space searches something other than config fields
    # (nesterov searches the effective step lr / (1 - momentum)); by default the fields themselves.
    params_of: Callable[[TrialConfig], dict[str, Any]] = _config_fields

    def config_for(self, trial: optuna.Trial) -> TrialConfig:
        """What a trial of this space trains: its suggestions plus what the space returns."""
        decided = self.define(trial)
        searched = {name: value for name, value in trial.params.items() if name in CONFIG_FIELDS}
        return TrialConfig.from_dict({**searched, **decided})

    def distributions(self) -> dict[str, BaseDistribution]:
        """What the space searches, and the range of each."""
        return self.searched_at(TrialConfig.from_dict(self.define(optuna.trial.FixedTrial(self.first_point))))

    def searched_at(self, config: TrialConfig) -> dict[str, BaseDistribution]:
        """The distributions of the parameters the space searched for this config."""
        trial = optuna.trial.FixedTrial(self.params_of(config))
        with warnings.catch_warnings():  # a config from an older, wider space: its caller decides
            warnings.filterwarnings("ignore", "The value .* is out of the range", UserWarning)
            self.define(trial)
        return trial.distributions

    def searched_values(self, config: TrialConfig) -> dict[str, Any]:
        """The values the space searched for this config, by parameter name."""
        params = self.params_of(config)
        return {name: _on_its_edge(params[name], range_) for name, range_ in self.searched_at(config).items()}


def _on_its_edge(value: Any, distribution: BaseDistribution) -> Any:
    """A value that `params_of` derived back (nesterov's step, from lr / (1 - momentum)) is exact only
    up to rounding: one the sampler put on its range's edge (GP often does) reads back on it, not a
    hair outside, where Optuna would refuse it."""
    if isinstance(distribution, FloatDistribution):
        for edge in (distribution.low, distribution.high):
            if math.isclose(value, edge, rel_tol=1e-9):
                return edge
    return value


_SPACES: dict[str, SearchSpace] = {}


def register_space(
    summary: str,
    first_point: dict[str, Any],
    params_of: Callable[[TrialConfig], dict[str, Any]] = _config_fields,
) -> Callable[[DefineByRun], DefineByRun]:
    """Registers the decorated define-by-run function under its own name."""

    def register(define: DefineByRun) -> DefineByRun:
        name = define.__name__
        if name in _SPACES:
            raise ValueError(f"search space {name!r} is registered twice")
        _SPACES[name] = SearchSpace(name, summary, define, first_point, params_of)
        return define

    return register


def get_space(name: str) -> SearchSpace:
    if name not in _SPACES:
        raise InputError(f"unknown space {name!r}; known spaces: {', '.join(space_names())}")
    return _SPACES[name]


def space_names() -> list[str]:
    return sorted(_SPACES)
