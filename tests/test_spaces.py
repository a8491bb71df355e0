"""Every registered space samples, builds and trains, and starts from the assignment's point."""

from __future__ import annotations

import optuna
import pytest
import torch
import torch.nn.functional as F

from spaces import get_space, space_names
from spaces.assignment import EFFECTIVE_STEP
from trainables.config import TrialConfig
from trainables.errors import InputError
from trainables.model import build_model, build_optimizer

optuna.logging.set_verbosity(optuna.logging.WARNING)

ASSIGNMENT_POINTS = {
    "barebones": {"lr": 3e-3},
    "sgd": {"lr": 3e-3, "weight_decay": 1e-4},
    "nesterov": {"lr": 1e-2, "momentum": 0.5, "weight_decay": 1e-4},
}


def test_the_assignments_three_parts_are_registered():
    assert {"barebones", "sgd", "nesterov"} <= set(space_names())


def test_an_unknown_space_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown space 'adam'; known spaces: barebones, nesterov, sgd"):
        get_space("adam")


@pytest.mark.parametrize("name", space_names())
def test_a_sampled_config_builds_and_takes_a_step(name):
    space = get_space(name)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(3):
        trial = study.ask()
        config = space.config_for(trial)
        model = build_model(config, (3, 32, 32), num_classes=10)
        optimizer = build_optimizer(model, config)
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        before = model.state_dict()["fc.weight"].clone()
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        assert not torch.equal(model.state_dict()["fc.weight"], before)
        study.tell(trial, 0.5)


@pytest.mark.parametrize("name", space_names())
def test_the_first_point_is_the_assignments_setting(name):
    space = get_space(name)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(space.first_point)
    config = space.config_for(study.ask())
    assert (config.channel_1, config.channel_2, config.kernel_1, config.kernel_2) == (32, 16, 5, 3)
    assert config.batch_size == 64
    for key, value in ASSIGNMENT_POINTS.get(name, {}).items():
        assert getattr(config, key) == value


def test_the_spaces_use_the_assignments_model_styles():
    styles = {}
    for name in ("barebones", "sgd", "nesterov"):
        study = optuna.create_study()
        styles[name] = get_space(name).config_for(study.ask())
    assert (styles["barebones"].model, styles["barebones"].optimizer) == ("barebones", "sgd")
    assert (styles["sgd"].model, styles["sgd"].optimizer) == ("module", "sgd")
    assert (styles["nesterov"].model, styles["nesterov"].optimizer) == ("sequential", "nesterov")
    assert isinstance(styles["nesterov"], TrialConfig)


@pytest.mark.parametrize("momentum", [0.5, 0.7, 0.9, 0.95])
@pytest.mark.parametrize("step", EFFECTIVE_STEP)
def test_a_config_on_the_edge_of_the_step_band_reads_back_inside_it(momentum, step):
    """GP often proposes a range's very edge; the step derived back from lr must stay in range, or
    the report's study and a warm start would refuse the trial."""
    space = get_space("nesterov")
    trial = optuna.trial.FixedTrial({"momentum": momentum, "effective_step": step, "weight_decay": 1e-4,
                                     "channel_1": 128, "channel_2": 128})  # fmt: skip
    values = space.searched_values(space.config_for(trial))
    assert values["effective_step"] == step
    # As the report and a warm start hand it to Optuna, which refuses a value outside its range.
    optuna.trial.create_trial(params=values, distributions=space.distributions(), value=0.5)


def test_a_config_from_a_wider_band_still_reads_as_outside_it():
    space = get_space("nesterov")
    config = TrialConfig(model="sequential", optimizer="nesterov", lr=0.3 * (1 - 0.5), momentum=0.5)
    assert space.searched_values(config)["effective_step"] == pytest.approx(0.3)
