"""Loading, caching and splitting real image files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, write_image_folder

from trainables import data
from trainables.config import DataSettings
from trainables.data import channel_statistics, load_images, load_splits, stratified_split
from trainables.errors import InputError


def settings(folder: Path, tmp_path: Path, **overrides) -> DataSettings:
    return DataSettings(source=str(folder), root=str(tmp_path / "cache"), **overrides)


def test_a_folder_loads_as_uint8_tensors_with_labels_in_class_order(image_folder, tmp_path):
    images = load_images(settings(image_folder, tmp_path), "train")
    assert images.images.dtype == torch.uint8 and images.images.shape == (90, 3, 32, 32)
    assert images.classes == tuple(sorted(CLASSES))
    assert torch.bincount(images.labels).tolist() == [30, 30, 30]
    # "red" images are red: the label matches the folder the file came from
    red = images.labels == images.classes.index("red")
    assert images.images[red, 0].float().mean() > images.images[red, 1].float().mean() + 40


def test_the_second_load_reads_the_cache_instead_of_decoding(image_folder, tmp_path, monkeypatch):
    first = load_images(settings(image_folder, tmp_path), "train")
    assert list((tmp_path / "cache").rglob("*.pt"))

    def decoding_is_not_allowed(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(data, "_decode", decoding_is_not_allowed)
    second = load_images(settings(image_folder, tmp_path), "train")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_a_changed_folder_is_decoded_again(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=4)
    assert len(load_images(settings(folder, tmp_path), "train")) == 12
    write_image_folder(tmp_path / "images", per_class=5, seed=1)
    assert len(load_images(settings(folder, tmp_path), "train")) == 15


def test_the_split_is_stratified_seeded_disjoint_and_exact():
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 50, 50, 50, 50, 50, 50, 50, 50, 55]))
    val, train = stratified_split(labels, 100, seed=7)
    assert len(val) == 100 and len(train) == len(labels) - 100
    assert not set(val.tolist()) & set(train.tolist())
    assert torch.bincount(labels[val], minlength=10).tolist() == [10] * 10
    # Shares of 3.2, 3.2 and 3.5: the largest leftover fraction gets the last place.
    uneven_labels = torch.arange(3).repeat_interleave(torch.tensor([50, 50, 55]))
    uneven, _ = stratified_split(uneven_labels, 10, seed=0)
    assert torch.bincount(uneven_labels[uneven]).tolist() == [3, 3, 4]
    again, _ = stratified_split(labels, 100, seed=7)
    other, _ = stratified_split(labels, 100, seed=8)
    assert torch.equal(val, again) and not torch.equal(val, other)


def test_a_sorted_folder_is_not_split_by_taking_the_last_files(image_folder, tmp_path):
    splits = load_splits(settings(image_folder, tmp_path, val_size=9))
    assert torch.bincount(splits.val_labels).tolist() == [3, 3, 3]
    assert torch.bincount(splits.train_labels).tolist() == [27, 27, 27]


def test_fewer_training_images_keeps_the_validation_set(image_folder, tmp_path):
    full = load_splits(settings(image_folder, tmp_path, val_size=9))
    small = load_splits(settings(image_folder, tmp_path, val_size=9, max_train_images=12))
    assert len(small.train_labels) == 12 and torch.bincount(small.train_labels).tolist() == [4, 4, 4]
    assert torch.equal(small.val_images, full.val_images)


def test_normalization_comes_from_the_training_split_only(image_folder, tmp_path):
    splits = load_splits(settings(image_folder, tmp_path, val_size=9))
    mean, std = channel_statistics(splits.train_images)
    assert splits.mean == pytest.approx(mean) and splits.std == pytest.approx(std)
    pixels = splits.train_images.double() / 255
    assert splits.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist())
    assert splits.std == pytest.approx(pixels.std(dim=(0, 2, 3), correction=0).tolist(), rel=1e-4)
    everything, _ = channel_statistics(torch.cat([splits.train_images, splits.val_images]))
    assert everything != pytest.approx(splits.mean, abs=1e-6)  # not taken before the split


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "data folder not found"),
        (lambda root: root, "no train/ folder"),
        (lambda root: (root / "train" / "only").mkdir(parents=True) or root, "no images in"),
    ],
)
def test_unusable_folders_are_refused(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        load_images(settings(make(tmp_path), tmp_path), "train")


def test_one_class_only_is_refused(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=3)
    for name in CLASSES[1:]:
        shutil.rmtree(folder / "train" / name)
    with pytest.raises(InputError, match="one class only"):
        load_images(settings(folder, tmp_path), "train")


def test_an_empty_class_folder_is_refused_rather_than_shifting_every_label(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=3)
    (folder / "train" / "aardvark").mkdir()  # sorts first: as a class, it would move every label up one
    with pytest.raises(InputError, match=r"class folder .*aardvark holds no images"):
        load_images(settings(folder, tmp_path), "train")


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=3)
    plain = load_images(settings(folder, tmp_path / "plain"), "train")
    checkpoints = folder / "train" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    shutil.copy(folder / "train" / "red" / "0000.png", checkpoints / "0000-checkpoint.png")
    shutil.copy(folder / "train" / "red" / "0000.png", folder / "train" / "green" / ".0000.png")
    with_hidden = load_images(settings(folder, tmp_path / "hidden"), "train")
    assert with_hidden.classes == plain.classes == tuple(sorted(CLASSES))
    assert torch.equal(with_hidden.labels, plain.labels)


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_a_corrupt_image_cache_is_rebuilt_from_the_files(tmp_path, damage, capsys):
    folder = write_image_folder(tmp_path / "images", per_class=3)
    first = load_images(settings(folder, tmp_path), "train")
    (cache,) = (tmp_path / "cache" / "cache").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2] if damage == "truncate" else b"")
    again = load_images(settings(folder, tmp_path), "train")
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert "is unreadable" in capsys.readouterr().err
    third = load_images(settings(folder, tmp_path), "train")  # the rebuilt cache now loads
    assert torch.equal(third.images, first.images)
    assert "is unreadable" not in capsys.readouterr().err


def test_an_unreadable_image_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=3)
    broken = folder / "train" / "green" / "0001.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError, match=f"cannot read image {broken}"):
        load_images(settings(folder, tmp_path), "train")


def test_images_of_another_size_are_named(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=3)
    write_image_folder(tmp_path / "odd", per_class=1, size=16)
    odd = folder / "train" / "blue" / "0009.png"
    (tmp_path / "odd" / "train" / "blue" / "0000.png").rename(odd)
    with pytest.raises(InputError, match=f"{odd} is 16x16"):
        load_images(settings(folder, tmp_path), "train")


def test_a_validation_set_as_large_as_the_data_is_refused(image_folder, tmp_path):
    with pytest.raises(InputError, match="leaves no training images"):
        load_splits(settings(image_folder, tmp_path, val_size=90))


def test_fewer_training_images_than_classes_are_refused(image_folder, tmp_path):
    with pytest.raises(InputError, match="--max-train-images 2 is fewer than the 3 classes"):
        load_splits(settings(image_folder, tmp_path, val_size=9, max_train_images=2))


def test_what_changed_in_a_folder_is_said_class_by_class(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=10)
    settings = DataSettings(source=str(images), root=str(tmp_path))
    before = data.image_inventory(settings)
    assert data.inventory_changes(before, data.image_inventory(settings)) == ""  # listed again: the same
    for index in range(3):
        shutil.copy(images / "train" / "red" / "0000.png", images / "train" / "red" / f"new-{index}.png")
    for name in ("0000.png", "0001.png"):
        (images / "train" / "green" / name).unlink()
    replaced = images / "train" / "blue" / "0005.png"
    replaced.write_bytes(replaced.read_bytes() + b"\0")
    assert data.inventory_changes(before, data.image_inventory(settings)) == (
        "1 image changed in blue, 2 images removed from green, 3 images added to red"
    )
    shutil.copytree(images / "train" / "red", images / "train" / "yellow")
    shutil.rmtree(images / "train" / "blue")
    assert data.inventory_changes(before, data.image_inventory(settings)) == (
        "class blue removed, class yellow added (13 images), 2 images removed from green, "
        "3 images added to red"
    )


def test_cifar10_has_no_inventory_of_files():
    assert data.image_inventory(DataSettings()) is None
