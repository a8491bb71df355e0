"""The one training path learns, notices divergence, is deterministic, and resumes where it stopped."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainables import loop
from trainables.checkpoint import ModelSpec, load_checkpoint
from trainables.config import TrialConfig
from trainables.data import ImageSplits
from trainables.errors import InputError
from trainables.loop import Training, resolve_precision

CPU = torch.device("cpu")


def separable_splits(count: int, seed: int = 0) -> ImageSplits:
    """Three classes told apart by which colour channel is bright: easy for any convnet."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    images = torch.randint(0, 90, (count, 3, 8, 8), generator=generator, dtype=torch.uint8)
    images[torch.arange(count), labels] += 140
    return ImageSplits(
        images, labels, images, labels, ("r", "g", "b"), (0.5,) * 3, (0.25,) * 3, f"separable-{count}"
    )


def training_for(
    config: TrialConfig, splits: ImageSplits, seed: int = 0, precision: str = "fp32"
) -> Training:
    spec = ModelSpec(config, splits.input_shape, splits.classes, splits.mean, splits.std)
    return Training(spec, splits, seed, CPU, precision)


SMALL = {"channel_1": 8, "channel_2": 4}


def test_it_learns_a_separable_set():
    training = training_for(TrialConfig(**SMALL, lr=0.01, batch_size=16), separable_splits(300))
    before = training.evaluate()
    reports = list(training.epochs(1, 3))
    after = reports[-1].val
    assert [report.epoch for report in reports] == [1, 2, 3]
    assert after.accuracy > 0.95 and after.loss < before.loss
    last = reports[-1].train  # every image counted, the last partial batch of 12 too
    assert last.images_per_s == pytest.approx(300 / last.seconds) and not reports[-1].diverged


@pytest.mark.parametrize(
    ("style", "optimizer"), [("barebones", "sgd"), ("module", "sgd"), ("sequential", "nesterov")]
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_style_learns_in_each_precision(style, optimizer, precision):
    config = TrialConfig(model=style, optimizer=optimizer, **SMALL, lr=0.01, batch_size=16)
    training = training_for(config, separable_splits(300), precision=precision)
    *_, last = training.epochs(1, 3)
    assert last.val.accuracy > 0.9


def test_bf16_keeps_fp32_master_weights_and_momentum():
    training = training_for(TrialConfig(**SMALL), separable_splits(64), precision="bf16")
    training.train_epoch(1)
    assert all(weight.dtype == torch.float32 for weight in training.model.parameters())
    assert len(training.optimizer.state) == len(list(training.model.parameters()))
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in training.optimizer.state.values())


def test_a_huge_learning_rate_is_reported_as_diverged_and_ends_the_epochs():
    config = TrialConfig(**SMALL, lr=50.0, momentum=0.9, weight_decay=0.0, batch_size=16)
    reports = list(training_for(config, separable_splits(800)).epochs(1, 5))
    assert len(reports) == 1 and reports[0].diverged


def test_the_same_seed_gives_the_same_epoch():
    results = []
    for _ in range(2):
        training = training_for(TrialConfig(**SMALL, batch_size=16), separable_splits(200), seed=3)
        trained = training.train_epoch(1)
        results.append((trained.loss, trained.accuracy, training.model.state_dict()["fc.weight"]))
    assert results[0][:2] == results[1][:2]
    assert torch.equal(results[0][2], results[1][2])


def test_a_resumed_run_matches_one_that_never_stopped(tmp_path: Path):
    config, splits = TrialConfig(**SMALL, batch_size=16), separable_splits(200)
    straight = training_for(config, splits)
    *_, straight_last = straight.epochs(1, 3)

    first = training_for(config, splits)
    *_, stopped = first.epochs(1, 2)
    first.save(tmp_path, stopped.epoch)
    resumed = training_for(config, splits, seed=0)
    next_epoch = resumed.load(load_checkpoint(tmp_path))
    (resumed_last,) = resumed.epochs(next_epoch, 3)
    assert next_epoch == 3
    assert resumed_last.train.loss == straight_last.train.loss
    # The time trained goes on from the checkpoint's, so a resumed trial's cost counts its start.
    assert resumed.seconds_trained == first.seconds_trained + resumed_last.seconds > resumed_last.seconds
    torch.testing.assert_close(resumed.model.state_dict(), straight.model.state_dict(), rtol=0, atol=0)


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    for flags, expected in ((set(), "fp32"), ({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16")):
        monkeypatch.setattr(loop, "_cpu_flags", lambda flags=frozenset(flags): flags)
        assert resolve_precision("auto", CPU) == expected
    with pytest.raises(InputError, match="precision must be one of"):
        resolve_precision("fp16", CPU)


def test_fp32_reproduces_its_numbers_bit_for_bit_and_bf16_trains_to_a_finite_loss():
    runs = []
    for precision in ("fp32", "fp32", "bf16"):
        training = training_for(
            TrialConfig(**SMALL, batch_size=16), separable_splits(200), seed=4, precision=precision
        )
        *_, last = training.epochs(1, 2)
        runs.append((last.train.loss, last.val.loss, training.model.state_dict()))
    (
        (fp32_loss, fp32_val, fp32_state),
        (again_loss, again_val, again_state),
        (bf16_loss, bf16_val, bf16_state),
    ) = runs
    assert (fp32_loss, fp32_val) == (again_loss, again_val)
    assert all(torch.equal(fp32_state[name], again_state[name]) for name in fp32_state)
    assert math.isfinite(bf16_loss) and math.isfinite(bf16_val)
    assert not all(
        torch.equal(fp32_state[name], bf16_state[name]) for name in fp32_state
    )  # it did run in bf16
