"""How a config is trained: the learning rate over a run, augmentation done on the device, a
weight average. Plain PyTorch, no Ray and no MLflow."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from trainables.augment import WeightAverage, augment
from trainables.errors import InputError
from trainables.recipe import (
    AS_THE_ASSIGNMENT_TRAINED,
    ASSIGNMENT,
    LONG,
    LONG_FROM_ANOTHER_RECIPE,
    Recipe,
    recipe_named,
)


def test_the_assignments_own_recipe_keeps_the_configs_learning_rate_throughout():
    recipe = AS_THE_ASSIGNMENT_TRAINED
    peak = recipe.peak_lr(0.01, momentum=0.5)
    assert {recipe.learning_rate(peak, step, 100) for step in range(100)} == {0.01}
    assert not recipe.augment and recipe.label_smoothing == 0 and recipe.ema_decay is None
    assert dataclasses.replace(recipe, schedule="onecycle") == ASSIGNMENT  # a sweep's, by default


def test_wsd_warms_up_holds_its_peak_then_decays_linearly_to_zero():
    recipe = Recipe(schedule="wsd", warmup_fraction=0.1, decay_fraction=0.2)
    rates = [recipe.learning_rate(0.1, step, 1000) for step in range(1000)]
    assert all(a < b for a, b in itertools.pairwise(rates[:100]))  # warming up
    assert set(rates[99:800]) == {0.1}  # stable at the peak until the last fifth
    assert all(a > b for a, b in itertools.pairwise(rates[800:]))  # then falling, evenly
    assert rates[800] - rates[801] == pytest.approx(rates[998] - rates[999])
    assert rates[-1] == pytest.approx(0.1 / 200)  # the last step, close to 0
    # A point of the stable stretch is scored after a decay as long as a run ending there would take.
    assert recipe.branch_steps(400) == 100 and recipe.decay_start(1000) == 800


def test_one_cycle_warms_up_to_its_peak_then_decays_towards_zero():
    recipe = Recipe(schedule="onecycle", peak_lr_factor=2.0, warmup_fraction=0.1)
    rates = [recipe.learning_rate(recipe.peak_lr(0.01, momentum=0.9), step, 1000) for step in range(1000)]
    peak = rates.index(max(rates))
    assert max(rates) == pytest.approx(0.02) and peak == 99  # the end of the warm-up, 10% in
    assert all(a < b for a, b in itertools.pairwise(rates[: peak + 1]))  # rising
    assert all(a >= b for a, b in itertools.pairwise(rates[peak:]))  # then falling
    assert rates[0] == pytest.approx(0.02 / 100) and rates[-1] < 0.02 * 1e-4  # close to 0 at the end


def test_the_peak_is_a_multiple_of_the_configs_rate_up_to_the_largest_effective_step():
    recipe = Recipe(schedule="onecycle", peak_lr_factor=4.0, max_effective_step=0.12)
    assert recipe.peak_lr(0.005, momentum=0.75) == pytest.approx(0.02)  # a step of 0.08: x4 stands
    assert recipe.peak_lr(0.01, momentum=0.75) == pytest.approx(0.03)  # x4 would be a step of 0.16
    assert recipe.peak_lr(0.05, momentum=0.0) == pytest.approx(0.12)  # plain SGD: the step is the rate


def test_crops_and_flips_move_pixels_and_never_invent_them():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding shows as 0
    augmented = augment(images, generator, 4)
    assert augmented.shape == images.shape and augmented.dtype == torch.uint8
    assert augmented.is_contiguous(memory_format=torch.channels_last)
    for original, moved in zip(images, augmented, strict=True):
        inside = moved[:, moved.sum(dim=(0, 2)) > 0][:, :, moved.sum(dim=(0, 1)) > 0]  # the padding cut off
        rows, columns = inside.shape[1:]
        assert rows >= 28 and columns >= 28  # at most 4 pixels of padding on a side
        window = [
            original[:, top : top + rows, left : left + columns]
            for top in (0, 32 - rows)
            for left in (0, 32 - columns)
        ]
        assert any(torch.equal(inside, part) or torch.equal(inside, part.flip(-1)) for part in window)
    # Half of the images, roughly, are flipped; and another generator state gives other crops.
    assert not torch.equal(augment(images, generator, 4), augmented)


def test_the_weight_average_moves_a_small_way_towards_each_new_state():
    start = {"w": torch.zeros(3)}
    average = WeightAverage(start, decay=0.9)
    average.update({"w": torch.ones(3)})
    assert torch.allclose(average.average["w"], torch.full((3,), 0.1))
    assert torch.equal(start["w"], torch.zeros(3))  # the model's own weights are not the average's


@pytest.mark.parametrize(
    "change",
    [{"schedule": "cosine-ish"}, {"peak_lr_factor": 0.0}, {"max_effective_step": 0.0},
     {"warmup_fraction": 1.0}, {"label_smoothing": 1.0}, {"ema_decay": 1.0}, {"name": "short"},
     {"decay_fraction": 0.0}, {"warmup_fraction": 0.5, "decay_fraction": 0.6}],
)  # fmt: skip
def test_a_recipe_out_of_range_is_refused_in_words(change):
    with pytest.raises(InputError):
        Recipe(**{**LONG.__dict__, **change})


def test_a_recipe_reads_back_from_its_record_and_from_mlflow_params_which_are_strings():
    changed = dataclasses.replace(LONG, label_smoothing=0.05, ema_decay=0.999)
    assert Recipe.from_record(changed.to_record()) == changed
    assert Recipe.from_params({name: str(value) for name, value in changed.as_params().items()}) == changed
    # Sweeps from before recipes recorded a schedule only, of the assignment's training.
    assert Recipe.from_params({"schedule": "onecycle", "epochs": "1"}) == ASSIGNMENT
    assert Recipe.from_record({}) == AS_THE_ASSIGNMENT_TRAINED


def test_the_long_recipe_peaks_at_the_searched_rate_unless_the_rate_was_searched_under_another():
    assert recipe_named("long", LONG) == LONG and LONG.peak_lr(0.02, momentum=0.9) == 0.02
    bridged = recipe_named("long", ASSIGNMENT)  # a one-epoch sweep's pick: the long run as calibrated
    assert bridged == dataclasses.replace(LONG, **LONG_FROM_ANOTHER_RECIPE)
    assert bridged.peak_lr(0.005, momentum=0.75) == pytest.approx(0.02)
    assert recipe_named("assignment", LONG) == ASSIGNMENT
