"""The config schema refuses what it does not understand."""

from __future__ import annotations

import pytest

from trainables.config import TrialConfig
from trainables.errors import InputError


def test_defaults_are_the_assignments_part_iv():
    config = TrialConfig()
    assert (config.model, config.optimizer, config.lr, config.momentum) == (
        "sequential",
        "nesterov",
        1e-2,
        0.5,
    )
    assert (config.channel_1, config.channel_2, config.kernel_1, config.kernel_2) == (32, 16, 5, 3)
    assert (config.weight_decay, config.batch_size) == (1e-4, 64)


def test_round_trips_through_a_dict():
    config = TrialConfig(lr=0.03, channel_1=48)
    assert TrialConfig.from_dict(config.to_dict()) == config


def test_whole_floats_are_accepted_for_integer_fields():
    assert TrialConfig.from_dict({"channel_1": 64.0}).channel_1 == 64


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": 0.1}, "unknown config keys: learning_rate"),
        ({"lr": 0}, "lr must be > 0"),
        ({"lr": "fast"}, "must be a number"),
        ({"momentum": 1.0}, "momentum must be in [0, 1)"),
        ({"kernel_1": 4}, "kernel_1 must be odd"),
        ({"channel_2": 2.5}, "whole number"),
        ({"model": "resnet"}, "model must be one of"),
        ({"model": "barebones", "optimizer": "nesterov"}, "plain SGD only"),
        ({"momentum": 0.0}, "nesterov needs momentum > 0"),
    ],
)
def test_bad_values_are_refused_with_a_message(values, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace(")", r"\)")):
        TrialConfig.from_dict(values)
