"""The convnet factory: three styles, one function."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from trainables.config import TrialConfig
from trainables.model import (
    build_model,
    build_optimizer,
    classify,
    initial_parameters,
    training_flops_per_image,
)

INPUT_SHAPE = (3, 32, 32)
STYLES = ("barebones", "module", "sequential")


def config_for(style: str, **overrides) -> TrialConfig:
    optimizer = "sgd" if style == "barebones" else "nesterov"
    return TrialConfig(model=style, optimizer=optimizer, **overrides)


def test_the_three_styles_compute_the_same_function_from_the_same_seed():
    images = torch.randn(8, *INPUT_SHAPE)
    outputs = [build_model(config_for(style), INPUT_SHAPE, 10, seed=3)(images) for style in STYLES]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_classifier_is_flatten_then_linear_in_either_memory_layout(layout):
    features = torch.randn(4, 6, 5, 7).contiguous(memory_format=layout).requires_grad_()
    weight, bias = torch.randn(3, 6 * 5 * 7, requires_grad=True), torch.randn(3, requires_grad=True)
    by_convolution = classify(features, weight, bias)
    by_linear = F.linear(features.flatten(1), weight, bias)
    torch.testing.assert_close(by_convolution, by_linear)
    upstream = torch.randn(4, 3)  # the same gradient arriving from the loss
    gradients = torch.autograd.grad(by_convolution, (features, weight, bias), upstream)
    expected = torch.autograd.grad(by_linear, (features, weight, bias), upstream)
    for gradient, reference in zip(gradients, expected, strict=True):
        torch.testing.assert_close(gradient, reference)


def test_different_seeds_give_different_weights():
    first = build_model(config_for("module"), INPUT_SHAPE, 10, seed=1).state_dict()
    second = build_model(config_for("module"), INPUT_SHAPE, 10, seed=2).state_dict()
    assert not torch.equal(first["conv1.weight"], second["conv1.weight"])


def test_weights_are_kaiming_normal_and_biases_zero():
    config = TrialConfig(channel_1=64, channel_2=32)
    parameters = initial_parameters(config, INPUT_SHAPE, 10, seed=0)
    for layer in ("conv1", "conv2", "fc"):
        weight = parameters[f"{layer}.weight"]
        expected_std = math.sqrt(2.0 / math.prod(weight.shape[1:]))
        assert weight.std().item() == pytest.approx(expected_std, rel=0.05)
        assert weight.mean().item() == pytest.approx(0.0, abs=expected_std * 0.05)
        assert torch.count_nonzero(parameters[f"{layer}.bias"]) == 0


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(("kernel_1", "kernel_2", "shape"), [(5, 3, (3, 32, 32)), (3, 7, (1, 28, 20))])
def test_padding_keeps_the_spatial_size_for_any_odd_kernel_and_input_shape(style, kernel_1, kernel_2, shape):
    config = config_for(style, kernel_1=kernel_1, kernel_2=kernel_2, channel_1=8, channel_2=4)
    model = build_model(config, shape, num_classes=7)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_the_hand_written_sgd_step_matches_torch_sgd():
    images, labels = torch.randn(16, *INPUT_SHAPE), torch.randint(0, 10, (16,))
    settings = {"lr": 0.05, "weight_decay": 0.01}
    barebones = build_model(TrialConfig(model="barebones", optimizer="sgd", **settings), INPUT_SHAPE, 10)
    module = build_model(TrialConfig(model="module", optimizer="sgd", **settings), INPUT_SHAPE, 10)
    for model, config in ((barebones, "barebones"), (module, "module")):
        optimizer = build_optimizer(model, TrialConfig(model=config, optimizer="sgd", **settings))
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    for name, value in module.state_dict().items():
        torch.testing.assert_close(barebones.state_dict()[name], value)


def test_a_state_dict_moves_between_styles():
    sequential = build_model(config_for("sequential"), INPUT_SHAPE, 10, seed=5)
    barebones = build_model(config_for("barebones"), INPUT_SHAPE, 10, seed=6)
    barebones.load_state_dict(sequential.state_dict())
    images = torch.randn(4, *INPUT_SHAPE)
    torch.testing.assert_close(barebones(images), sequential(images))


def test_nesterov_uses_momentum_and_plain_sgd_does_not():
    nesterov = build_optimizer(
        build_model(config_for("sequential"), INPUT_SHAPE, 10), config_for("sequential")
    )
    plain_config = TrialConfig(model="module", optimizer="sgd")
    plain = build_optimizer(build_model(plain_config, INPUT_SHAPE, 10), plain_config)
    assert nesterov.param_groups[0]["nesterov"] and nesterov.param_groups[0]["momentum"] == 0.5
    assert plain.param_groups[0]["momentum"] == 0


def test_a_training_step_of_part_iv_is_about_39_mflop_an_image():
    # forward 7.34 M multiply-adds; backward twice that, less the first conv's input gradient
    flops = training_flops_per_image(TrialConfig(), INPUT_SHAPE, 10)
    forward = 32 * 32 * (32 * 3 * 25 + 16 * 32 * 9) + 16 * 32 * 32 * 10
    assert flops == 2 * (3 * forward - 32 * 32 * 32 * 3 * 25) == 39_124_992


# Under bf16 autocast, oneDNN's AMX matmul killed the process with SIGFPE for these (batch, channel_2):
# an epoch's last batch of 32 images with channel_2 = 48 (44,000 training images) ended such trials.
AMX_CRASH_SHAPES = "32x48 24x64 16x96 12x128"
BF16_STEPS = """
import sys, torch
from trainables.config import TrialConfig
from trainables.model import build_model
torch.set_num_threads(1)  # as a CPU trial runs
style, optimizer = sys.argv[1], "sgd" if sys.argv[1] == "barebones" else "nesterov"
for shape in sys.argv[2:]:
    batch, channel_2 = map(int, shape.split("x"))
    config = TrialConfig(model=style, optimizer=optimizer, channel_2=channel_2)
    images = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = build_model(config, (3, 32, 32), 10)(images)
    scores.float().sum().backward()
    print(shape, scores.dtype, flush=True)
"""


@pytest.mark.parametrize("style", STYLES)
def test_a_bf16_step_survives_the_shapes_that_crashed_amx_matmul(style):
    # In a child process: a SIGFPE would end pytest itself.
    steps = subprocess.run(
        [sys.executable, "-c", BF16_STEPS, style, *AMX_CRASH_SHAPES.split()],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )  # fmt: skip
    assert steps.returncode == 0, (steps.returncode, steps.stdout, steps.stderr[-500:])
    # Every shape ran, its classifier in fp32.
    expected = [f"{shape} torch.float32" for shape in AMX_CRASH_SHAPES.split()]
    assert steps.stdout.splitlines() == expected
