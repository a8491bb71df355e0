"""The CUDA fast path: graphed steps train as eager ones do, bf16 learns, trials share a GPU.

These need a GPU and skip without one (CI has none); the device check (.device/check) runs
them on the lent H100.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search.gpu_packing import default_gpus_per_trial
from spaces import get_space
from tests.test_loop import SMALL, separable_splits
from trainables.checkpoint import ModelSpec, load_checkpoint
from trainables.config import TrialConfig
from trainables.loop import Acceleration, Training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
STYLES = [("barebones", "sgd"), ("module", "sgd"), ("sequential", "nesterov")]


def cuda_training(config: TrialConfig, acceleration: Acceleration, count: int = 300) -> Training:
    splits = separable_splits(count)
    spec = ModelSpec(config, splits.input_shape, splits.classes, splits.mean, splits.std)
    return Training(spec, splits, 0, CUDA, acceleration)


@pytest.mark.parametrize(("style", "optimizer"), STYLES)
def test_a_graphed_epoch_trains_as_an_eager_one(style, optimizer):
    config = TrialConfig(model=style, optimizer=optimizer, **SMALL, lr=0.01, batch_size=16)
    # 300 images: 18 full batches (3 eager warm-ups, a capture, 14 replays) and a partial one of 12.
    results = []
    for graphs in (False, True):
        training = cuda_training(
            config, Acceleration(precision="fp32", cuda_graphs=graphs, cudnn_benchmark=False)
        )
        reports = list(training.epochs(1, 2))
        results.append((reports, training.model.state_dict()))
    (eager, eager_state), (graphed, graphed_state) = results
    for eager_report, graphed_report in zip(eager, graphed, strict=True):
        assert graphed_report.train.loss == pytest.approx(eager_report.train.loss, rel=1e-4)
        assert graphed_report.train.accuracy == pytest.approx(eager_report.train.accuracy, abs=1 / 300)
    torch.testing.assert_close(graphed_state, eager_state, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("style", "optimizer"), STYLES)
def test_bf16_graphed_training_learns(style, optimizer):
    config = TrialConfig(model=style, optimizer=optimizer, **SMALL, lr=0.01, batch_size=16)
    *_, last = cuda_training(config, Acceleration(precision="bf16")).epochs(1, 3)
    assert last.val.accuracy > 0.9


def test_a_graphed_run_resumed_from_a_checkpoint_goes_on_from_there(tmp_path: Path):
    config = TrialConfig(**SMALL, lr=0.01, batch_size=16)
    straight = cuda_training(config, Acceleration(precision="fp32", cudnn_benchmark=False))
    *_, straight_last = straight.epochs(1, 3)
    first = cuda_training(config, Acceleration(precision="fp32", cudnn_benchmark=False))
    *_, stopped = first.epochs(1, 2)
    first.save(tmp_path, stopped.epoch)
    resumed = cuda_training(config, Acceleration(precision="fp32", cudnn_benchmark=False))
    (resumed_last,) = resumed.epochs(resumed.load(load_checkpoint(tmp_path)), 3)
    assert resumed_last.epoch == 3
    assert resumed_last.train.loss == pytest.approx(straight_last.train.loss, rel=1e-4)


def test_a_diverging_graphed_run_is_reported_as_diverged():
    config = TrialConfig(**SMALL, lr=50.0, momentum=0.9, weight_decay=0.0, batch_size=16)
    reports = list(cuda_training(config, Acceleration(), count=800).epochs(1, 3))
    assert len(reports) == 1 and reports[0].diverged


def test_trials_share_the_gpu_as_its_cores_and_memory_allow():
    import ray

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        splits = separable_splits(600)
        share, memory = default_gpus_per_trial(
            get_space("nesterov"), splits, Acceleration(), cpus_per_trial=1
        )
    finally:
        ray.shutdown()
    assert memory is not None and 0 < memory.trial_bytes < memory.gpu_bytes
    assert share == 0.25  # four cores for one GPU: cores, not memory, bound these small trials
