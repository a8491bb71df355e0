"""Checkpoints hold tensors only, load with weights_only=True, and are checked against their config."""

from __future__ import annotations

import json
import os

import pytest
import torch

from search.storage import trial_results
from search.sweep.checkpoints import needless_checkpoints
from trainables.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from trainables.config import TrialConfig
from trainables.errors import InputError
from trainables.model import build_optimizer
from trainables.names import CHECKPOINT_FILE, SPEC_FILE

SPEC = ModelSpec(TrialConfig(), (3, 32, 32), tuple("abcdefghij"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def saved(tmp_path):
    """A model and its Nesterov optimizer one step into training (so the optimizer has momentum)."""
    model = SPEC.build(seed=1)
    optimizer = build_optimizer(model, SPEC.config)
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    save_checkpoint(tmp_path, SPEC, model, optimizer, epoch=3, seconds_trained=12.5)
    return model, optimizer


def test_a_checkpoint_round_trips_with_its_optimizer_state_epoch_and_time_trained(tmp_path):
    model, optimizer = saved(tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.epoch == 3 and loaded.spec == SPEC and loaded.seconds_trained == 12.5
    rebuilt = loaded.spec.build()
    rebuilt.load_state_dict(loaded.model_state)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(images), model(images))
    restored = build_optimizer(rebuilt, SPEC.config)
    restored.load_state_dict(loaded.optimizer_state)
    assert restored.param_groups[0]["lr"] == SPEC.config.lr
    for before, after in zip(optimizer.state.values(), restored.state.values(), strict=True):
        assert torch.equal(before["momentum_buffer"], after["momentum_buffer"])


def test_plain_pytorch_reads_it_with_weights_only(tmp_path):
    saved(tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert set(state["model"]) == {
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "fc.weight",
        "fc.bias",
    }


class Payload:
    """Unpickling this runs code: what a tampered checkpoint could carry."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path):
    model, _ = saved(tmp_path)
    torch.save(
        {"model": model.state_dict(), "optimizer": {}, "epoch": 1, "extra": Payload()},
        tmp_path / CHECKPOINT_FILE,
    )
    with pytest.raises(
        InputError, match=f"refusing {tmp_path / CHECKPOINT_FILE}: it holds more than tensors"
    ):
        load_checkpoint(tmp_path)


def test_tensor_shapes_that_do_not_match_the_config_are_named(tmp_path):
    saved(tmp_path)
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    spec["config"]["channel_2"] = 24  # the tensors were saved for 16
    (tmp_path / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(
        InputError, match=r"conv2.weight has shape \[16, 32, 3, 3\], but its config builds \[24, 32, 3, 3\]"
    ):
        load_checkpoint(tmp_path)


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    saved(tmp_path)
    data = (tmp_path / CHECKPOINT_FILE).read_bytes()
    (tmp_path / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_from_before_the_time_trained_was_kept_reads_as_none_trained(tmp_path):
    model, optimizer = saved(tmp_path)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2}
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    assert load_checkpoint(tmp_path).seconds_trained == 0.0


@pytest.mark.parametrize(
    "field, value",
    [("epoch", "2"), ("epoch", float("nan")), ("seconds_trained", "12.5"), ("seconds_trained", [1.0])],
)
def test_a_checkpoint_with_a_field_of_the_wrong_kind_is_refused_in_one_line(tmp_path, field, value):
    model, optimizer = saved(tmp_path)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2, field: value}
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(InputError, match="is not a checkpoint of this project"):
        load_checkpoint(tmp_path)


def test_a_half_written_result_line_is_skipped_and_the_results_after_it_kept(tmp_path):
    whole = json.dumps({"val_acc": 0.4, "checkpoint_dir_name": "checkpoint_000000"})
    # A kill during Tune's copy of result.json cut its last line; the resumed trial wrote on after it.
    (tmp_path / "result.json").write_text(f"{whole}\n{whole[:20]}{json.dumps({'val_acc': 0.5})}\n\n")
    assert trial_results(tmp_path) == [json.loads(whole)]
    (tmp_path / "result.json").write_text(f"{whole}\n{whole[:20]}\n{json.dumps({'val_acc': 0.5})}\n")
    assert trial_results(tmp_path) == [json.loads(whole), {"val_acc": 0.5}]


def test_an_ended_trial_keeps_only_its_first_best_and_its_latest_checkpoint(tmp_path):
    reports = [  # as Tune's result.json has them: rungs inside an epoch come without a checkpoint
        {"val_acc": 0.30},
        {"val_acc": 0.40, "checkpoint_dir_name": "checkpoint_000000"},
        {"val_acc": 0.55, "checkpoint_dir_name": "checkpoint_000001"},
        {"val_acc": 0.55, "checkpoint_dir_name": "checkpoint_000002"},  # a tie is not better
        {"val_acc": 0.50, "checkpoint_dir_name": "checkpoint_000003"},
    ]
    (tmp_path / "result.json").write_text("".join(json.dumps(report) + "\n" for report in reports))
    for index in range(6):
        (tmp_path / f"checkpoint_{index:06d}").mkdir()
    # The last checkpoint's result may not be in result.json yet: the run's callbacks saw it.
    seen = {str(tmp_path / "checkpoint_000004"): 0.45, str(tmp_path / "checkpoint_000005"): 0.35}
    needless = needless_checkpoints(tmp_path, seen)
    assert [path.name for path in needless] == [
        "checkpoint_000000", "checkpoint_000002", "checkpoint_000003", "checkpoint_000004",
    ]  # fmt: skip


def test_a_checkpoint_of_unknown_accuracy_is_kept(tmp_path):
    for index in range(3):
        (tmp_path / f"checkpoint_{index:06d}").mkdir()
    assert needless_checkpoints(tmp_path, {str(tmp_path / "checkpoint_000001"): 0.5}) == []
    assert needless_checkpoints(tmp_path / "never-reported", {}) == []
