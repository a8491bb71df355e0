"""The registry of search spaces: `--space NAME` picks one, tests sweep them all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution

from trainables.config import TrialConfig
from trainables.errors import InputError

# A define-by-run space: calls trial.suggest_* and returns the constants it does not search.
DefineByRun = Callable[[optuna.Trial], dict[str, Any]]


@dataclass(frozen=True)
class SearchSpace:
    name: str
    summary: str
    define: DefineByRun
    # The assignment's own settings for the searched parameters, evaluated first,
    # so no sweep ends worse than the assignment did.
    first_point: dict[str, Any] = field(default_factory=dict)

    def config_for(self, trial: optuna.Trial) -> TrialConfig:
        """What a trial of this space trains: its suggestions plus the space's constants."""
        constants = self.define(trial)
        return TrialConfig.from_dict({**trial.params, **constants})

    def searched_at(self, config: TrialConfig) -> dict[str, BaseDistribution]:
        """The distributions the space draws its parameters from, replayed at this config's point.

        A range may depend on another parameter (nesterov's lr on momentum), hence "at".
        """
        trial = optuna.trial.FixedTrial(config.to_dict())
        self.define(trial)
        return trial.distributions


_SPACES: dict[str, SearchSpace] = {}


def register_space(summary: str, first_point: dict[str, Any]) -> Callable[[DefineByRun], DefineByRun]:
    """Registers the decorated define-by-run function under its own name."""

    def register(define: DefineByRun) -> DefineByRun:
        name = define.__name__
        if name in _SPACES:
            raise ValueError(f"search space {name!r} is registered twice")
        _SPACES[name] = SearchSpace(name, summary, define, first_point)
        return define

    return register


def get_space(name: str) -> SearchSpace:
    if name not in _SPACES:
        raise InputError(f"unknown space {name!r}; known spaces: {', '.join(space_names())}")
    return _SPACES[name]


def space_names() -> list[str]:
    return sorted(_SPACES)
