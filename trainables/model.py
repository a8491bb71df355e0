"""The convnet factory: conv(k1) -> ReLU -> conv(k2) -> ReLU -> flatten -> linear.

One architecture written the assignment's three ways. All three name their
parameters alike (conv1.*, conv2.*, fc.*), start from the same Kaiming-normal
weights for a given seed, and so compute the same function: a checkpoint of
one loads into the others.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.config import TrialConfig

ImageShape = tuple[int, int, int]  # channels, height, width


def initial_parameters(
    config: TrialConfig, input_shape: ImageShape, num_classes: int, seed: int
) -> dict[str, Tensor]:
    """Kaiming-normal weights (std = sqrt(2 / fan_in)) and zero biases, drawn in a fixed order."""
    channels, height, width = input_shape
    weight_shapes = {
        "conv1": (config.channel_1, channels, config.kernel_1, config.kernel_1),
        "conv2": (config.channel_2, config.channel_1, config.kernel_2, config.kernel_2),
        "fc": (num_classes, config.channel_2 * height * width),  # "same" padding keeps H x W
    }
    generator = torch.Generator().manual_seed(seed)
    parameters: dict[str, Tensor] = {}
    for layer, shape in weight_shapes.items():
        fan_in = math.prod(shape[1:])
        parameters[f"{layer}.weight"] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        parameters[f"{layer}.bias"] = torch.zeros(shape[0])
    return parameters


def classify(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Flatten, then the linear layer: one convolution whose kernel covers the whole feature map.

    The same sums as `F.linear(features.flatten(1), weight, bias)`, with the weight read in
    flatten's order, but taken in whatever memory layout the features have: channels-last
    features need no copy into flatten's order, and the gradient comes back channels-last, so
    the ReLU before runs its backward on one layout. A step of Part IV is 6-10% faster on two
    threads in bf16, 2-4% on one, 14% on two in fp32 (measured 2026-12-03).

    In fp32 whatever the autocast: under bf16 autocast, oneDNN's AMX matmul killed the process
    with SIGFPE (in its blocking heuristics) for some shapes (32 images of 48x32x32 features,
    24 of 64x32x32, 16 of 96x32x32, with torch 2.15 on a Xeon), which an epoch's last, partial
    batch meets. The layer is about 3% of a step's arithmetic, so fp32 costs little.
    """
    kernel = weight.view(weight.shape[0], *features.shape[1:])
    with torch.autocast(features.device.type, enabled=False):
        return F.conv2d(features.float(), kernel, bias).flatten(1)


class Classifier(nn.Linear):
    """Flatten and nn.Linear in one, computed by `classify`; its parameters and their names are
    nn.Linear's, so a state dict moves between the styles."""

    def forward(self, features: Tensor) -> Tensor:
        return classify(features, self.weight, self.bias)


class BarebonesConvNet:
    """Part II: explicit weight tensors and functional ops, no nn.Module."""

    def __init__(self, parameters: dict[str, Tensor], config: TrialConfig) -> None:
        self.params = {name: value.clone().requires_grad_() for name, value in parameters.items()}
        self.paddings = (config.kernel_1 // 2, config.kernel_2 // 2)

    def __call__(self, images: Tensor) -> Tensor:
        p = self.params
        hidden = F.relu(F.conv2d(images, p["conv1.weight"], p["conv1.bias"], padding=self.paddings[0]))
        hidden = F.relu(F.conv2d(hidden, p["conv2.weight"], p["conv2.bias"], padding=self.paddings[1]))
        return classify(hidden, p["fc.weight"], p["fc.bias"])

    def parameters(self) -> Iterator[Tensor]:
        return iter(self.params.values())

    def to(self, device: torch.device) -> BarebonesConvNet:
        self.params = {n: v.detach().to(device).requires_grad_() for n, v in self.params.items()}
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return {name: value.detach().clone() for name, value in self.params.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, value in self.params.items():
                value.copy_(state[name])

    def train(self) -> None:
        """Nothing to switch: the model has no dropout or batch norm."""

    def eval(self) -> None:
        """Nothing to switch: the model has no dropout or batch norm."""


class ThreeLayerConvNet(nn.Module):
    """Part III: the same network as an nn.Module."""

    def __init__(self, config: TrialConfig, input_shape: ImageShape, num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, config.channel_1, config.kernel_1, padding=config.kernel_1 // 2)
        self.conv2 = nn.Conv2d(
            config.channel_1, config.channel_2, config.kernel_2, padding=config.kernel_2 // 2
        )
        self.fc = Classifier(config.channel_2 * height * width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        hidden = F.relu(self.conv1(images))
        hidden = F.relu(self.conv2(hidden))
        return self.fc(hidden)


def _sequential(config: TrialConfig, input_shape: ImageShape, num_classes: int) -> nn.Sequential:
    """Part IV: the same network as an nn.Sequential, its layers named like the Module's."""
    channels, height, width = input_shape
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(channels, config.channel_1, config.kernel_1, padding=config.kernel_1 // 2),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(
                config.channel_1, config.channel_2, config.kernel_2, padding=config.kernel_2 // 2
            ),
            relu2=nn.ReLU(),
            fc=Classifier(config.channel_2 * height * width, num_classes),
        )
    )


ConvNet = BarebonesConvNet | nn.Module


def build_model(
    config: TrialConfig,
    input_shape: ImageShape,
    num_classes: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ConvNet:
    """The config's model style, with the seed's initial weights, on the device."""
    parameters = initial_parameters(config, input_shape, num_classes, seed)
    if config.model == "barebones":
        return BarebonesConvNet(parameters, config).to(torch.device(device))
    if config.model == "module":
        model: nn.Module = ThreeLayerConvNet(config, input_shape, num_classes)
    else:
        model = _sequential(config, input_shape, num_classes)
    model.load_state_dict(parameters)
    # channels-last convolutions run faster (measured on CPU: +10% a thread, +23% with two)
    return model.to(device, memory_format=torch.channels_last)


def training_flops_per_image(config: TrialConfig, input_shape: ImageShape, num_classes: int) -> int:
    """Floating-point operations of one training step, per image, counted from multiply-adds.

    The backward pass computes each layer's weight gradient and its input gradient,
    each as many multiply-adds as the forward pass, except that the first
    convolution needs no input gradient. A multiply-add is two operations.
    """
    channels, height, width = input_shape
    conv1 = height * width * config.channel_1 * channels * config.kernel_1**2
    conv2 = height * width * config.channel_2 * config.channel_1 * config.kernel_2**2
    linear = config.channel_2 * height * width * num_classes
    forward = conv1 + conv2 + linear
    return 2 * (forward + forward + (forward - conv1))


def as_module(model: ConvNet, config: TrialConfig, input_shape: ImageShape, num_classes: int) -> nn.Module:
    """An nn.Module computing the same function, for tools that need one (MLflow's model flavor)."""
    if isinstance(model, nn.Module):
        return model
    module = ThreeLayerConvNet(config, input_shape, num_classes)
    module.load_state_dict(model.state_dict())
    return module


class HandWrittenSGD:
    """The assignment's update, w -= lr * (dw + weight_decay * w), written out by hand."""

    def __init__(self, parameters: Iterator[Tensor], lr: float, weight_decay: float) -> None:
        self.parameters = list(parameters)
        self.lr = lr
        self.weight_decay = weight_decay

    def zero_grad(self) -> None:
        for weight in self.parameters:
            weight.grad = None

    def step(self) -> None:
        with torch.no_grad():
            for weight in self.parameters:
                weight -= self.lr * (weight.grad + self.weight_decay * weight)

    def state_dict(self) -> dict[str, float]:
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Plain SGD keeps no state between steps; the config already sets lr and weight decay."""


Optimizer = HandWrittenSGD | torch.optim.Optimizer


def set_learning_rate(optimizer: Optimizer, lr: float) -> None:
    if isinstance(optimizer, HandWrittenSGD):
        optimizer.lr = lr
    else:
        for group in optimizer.param_groups:
            group["lr"] = lr


def learning_rate(optimizer: Optimizer) -> float:
    """The learning rate the last step took."""
    return optimizer.lr if isinstance(optimizer, HandWrittenSGD) else optimizer.param_groups[0]["lr"]


def build_optimizer(model: ConvNet, config: TrialConfig) -> Optimizer:
    if config.model == "barebones":
        return HandWrittenSGD(model.parameters(), config.lr, config.weight_decay)
    if config.optimizer == "nesterov":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
