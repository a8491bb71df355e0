"""The train loop learns, notices divergence, and is deterministic."""

from __future__ import annotations

import torch

from trainables.config import TrialConfig
from trainables.loop import Normalizer, batch_order, evaluate, train_epoch
from trainables.model import build_model, build_optimizer


def separable_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by which colour channel is bright: easy for any convnet."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    images = torch.randint(0, 90, (count, 3, 8, 8), generator=generator, dtype=torch.uint8)
    images[torch.arange(count), labels] += 140
    return images, labels


def small_model(config: TrialConfig):
    model = build_model(config, (3, 8, 8), num_classes=3, seed=0)
    return model, build_optimizer(model, config)


NORMALIZE = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))


def test_it_learns_a_separable_set():
    config = TrialConfig(channel_1=8, channel_2=4, lr=0.01, batch_size=16)
    model, optimizer = small_model(config)
    images, labels = separable_images(300)
    before = evaluate(model, images, labels, NORMALIZE)
    for epoch in range(1, 4):
        trained = train_epoch(model, optimizer, images, labels, NORMALIZE, 16, batch_order(0, epoch))
    after = evaluate(model, images, labels, NORMALIZE)
    assert after.accuracy > 0.95 and after.loss < before.loss
    assert trained.images_per_s > 0 and not trained.diverged


def test_every_style_learns():
    images, labels = separable_images(300)
    for style, optimizer in (("barebones", "sgd"), ("module", "sgd"), ("sequential", "nesterov")):
        config = TrialConfig(model=style, optimizer=optimizer, channel_1=8, channel_2=4, lr=0.01)
        model, step = small_model(config)
        for epoch in range(1, 4):
            train_epoch(model, step, images, labels, NORMALIZE, 16, batch_order(0, epoch))
        assert evaluate(model, images, labels, NORMALIZE).accuracy > 0.9, style


def test_a_huge_learning_rate_is_reported_as_diverged():
    config = TrialConfig(channel_1=8, channel_2=4, lr=50.0, momentum=0.9, weight_decay=0.0)
    model, optimizer = small_model(config)
    images, labels = separable_images(800)
    result = train_epoch(model, optimizer, images, labels, NORMALIZE, 16, batch_order(0, 1))
    assert result.diverged


def test_the_same_seed_gives_the_same_epoch():
    images, labels = separable_images(200)
    results = []
    for _ in range(2):
        model, optimizer = small_model(TrialConfig(channel_1=8, channel_2=4))
        trained = train_epoch(model, optimizer, images, labels, NORMALIZE, 16, batch_order(3, 1))
        results.append((trained.loss, trained.accuracy, model.state_dict()["fc.weight"]))
    assert results[0][:2] == results[1][:2]
    assert torch.equal(results[0][2], results[1][2])
