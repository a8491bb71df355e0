"""The assignment's three parts as define-by-run spaces.

Each only suggests and returns constants: no computation, so Optuna can call
it as often as it likes. Every first point is the assignment's own setting.
"""

from __future__ import annotations

from typing import Any

import optuna

from spaces.space import register_space
from trainables.config import TrialConfig

# The band of lr / (1 - momentum) that the nesterov space searches (see there). Up to 0.05 while
# sweeps trained at a constant rate; one cycle put every pick at that edge, and under the long
# recipe the config's rate is its peak, which trained best near 0.11 in 10 epochs (README).
EFFECTIVE_STEP = (0.006, 0.2)

# The assignment's architecture and batch size, shared by every part.
ASSIGNMENT_SHAPE = {"channel_1": 32, "channel_2": 16, "kernel_1": 5, "kernel_2": 3, "batch_size": 64}


@register_space(
    summary="Part II: learning rate of plain SGD, hand-written, on the barebones model",
    first_point={"lr": 3e-3},
)
def barebones(trial: optuna.Trial) -> dict[str, Any]:
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    return {
        "model": "barebones",
        "optimizer": "sgd",
        "weight_decay": 0.0,
        "momentum": 0.0,
        **ASSIGNMENT_SHAPE,
    }


@register_space(
    summary="Part III: learning rate and weight decay of optim.SGD on the nn.Module model",
    first_point={"lr": 3e-3, "weight_decay": 1e-4},
)
def sgd(trial: optuna.Trial) -> dict[str, Any]:
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    return {"model": "module", "optimizer": "sgd", "momentum": 0.0, **ASSIGNMENT_SHAPE}


def _with_effective_step(config: TrialConfig) -> dict[str, Any]:
    return {**config.to_dict(), "effective_step": config.lr / (1 - config.momentum)}


@register_space(
    summary="Part IV: effective step, weight decay, Nesterov momentum and widths of the nn.Sequential model",
    first_point={
        "momentum": 0.5,
        "effective_step": 0.02,
        "weight_decay": 1e-4,
        "channel_1": 32,
        "channel_2": 16,
    },
    params_of=_with_effective_step,
)
def nesterov(trial: optuna.Trial) -> dict[str, Any]:
    momentum = trial.suggest_float("momentum", 0.5, 0.95)
    # What moves the weights is the effective step lr / (1 - momentum), not lr alone: at a constant
    # rate, one-epoch trials of steps 0.06-0.09 scored 14-45%; warmed up and annealed, a step of 0.1
    # trained well. Searching the step (and deriving lr) keeps every range fixed, so the sampler
    # can model all the parameters together.
    step = trial.suggest_float("effective_step", *EFFECTIVE_STEP, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
    trial.suggest_int("channel_1", 16, 128, log=True)
    # channel_2 also sizes the linear layer (channel_2 x H x W inputs): wider helps most.
    trial.suggest_int("channel_2", 16, 128, log=True)
    return {
        "lr": step * (1 - momentum),
        "model": "sequential",
        "optimizer": "nesterov",
        "kernel_1": 5,
        "kernel_2": 3,
        "batch_size": 64,
    }
