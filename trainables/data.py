"""Images in, uint8 tensors out: CIFAR-10 through torchvision, or any ImageFolder tree.

A folder is decoded once and cached as a tensor file under the data root, keyed
by the folder's file list, so later runs skip the JPEG decoding. The split into
train and validation is stratified and seeded; normalization statistics come
from the training images alone.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from trainables.config import CIFAR10, DataSettings
from trainables.errors import InputError, first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class LabeledImages:
    images: Tensor  # uint8, N x C x H x W
    labels: Tensor  # int64, N
    classes: tuple[str, ...]
    fingerprint: str  # changes when the files change

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageSplits:
    """What every trial trains and validates on, loaded once by the driver.

    The images are channels-last, the layout the models train in, so no trial copies
    them into it; and they travel to the trials as numpy arrays, which Ray's object store
    hands to each trial without a copy (measured: 0.3 s a trial, and 0.3 s on the driver).
    """

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, on the 0..1 scale, from the training images
    std: tuple[float, ...]
    fingerprint: str  # changes when the files or the split change

    @property
    def input_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.train_images.shape[1:]
        return channels, height, width

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        tensors = (self.train_images, self.train_labels, self.val_images, self.val_labels)
        rest = (self.classes, self.mean, self.std, self.fingerprint)
        return _splits_from_arrays, (*(_as_array(tensor) for tensor in tensors), *rest)


def _as_array(tensor: Tensor) -> np.ndarray:
    """Images as N x H x W x C, the memory order of channels-last, so the array needs no copy."""
    return tensor.permute(0, 2, 3, 1).numpy() if tensor.dim() == 4 else tensor.numpy()


def _splits_from_arrays(*values: Any) -> ImageSplits:
    with warnings.catch_warnings():  # the object store's arrays are read-only; trials only read them
        warnings.simplefilter("ignore", UserWarning)
        tensors = [torch.from_numpy(array) for array in values[:4]]
    images = [tensor.permute(0, 3, 1, 2) if tensor.dim() == 4 else tensor for tensor in tensors]
    return ImageSplits(*images, *values[4:])


def load_splits(settings: DataSettings) -> ImageSplits:
    """The training images split into train and validation, with their normalization."""
    dataset = load_images(settings, "train")
    val_index, train_index = split_indices(dataset.labels, settings)
    train_images = _channels_last(dataset.images, train_index)
    mean, std = channel_statistics(train_images)
    return ImageSplits(
        train_images=train_images,
        train_labels=dataset.labels[train_index],
        val_images=_channels_last(dataset.images, val_index),
        val_labels=dataset.labels[val_index],
        classes=dataset.classes,
        mean=mean,
        std=std,
        fingerprint=_digest(
            f"{dataset.fingerprint}:{settings.val_size}:{settings.max_train_images}:{settings.seed}"
        ),
    )


def _channels_last(images: Tensor, index: Tensor) -> Tensor:
    """The images the index picks, in the channels-last layout."""
    return images[index].contiguous(memory_format=torch.channels_last)


def split_indices(labels: Tensor, settings: DataSettings) -> tuple[Tensor, Tensor]:
    """Indices of the validation images and of the training images, as the settings pick them."""
    if settings.val_size >= len(labels):
        raise InputError(
            f"a validation set of {settings.val_size} images leaves no training images out of {len(labels)}"
        )
    classes = int(labels.unique().numel())
    if settings.max_train_images is not None and settings.max_train_images < classes:
        raise InputError(
            f"--max-train-images {settings.max_train_images} is fewer than the {classes} classes: "
            "some class would have no training image"
        )
    val_index, train_index = stratified_split(labels, settings.val_size, settings.seed)
    if settings.max_train_images is not None and settings.max_train_images < len(train_index):
        kept, _ = stratified_split(labels[train_index], settings.max_train_images, settings.seed + 1)
        train_index = train_index[kept]
    return val_index, train_index


def load_images(settings: DataSettings, split: str) -> LabeledImages:
    """All images of one split ("train" or "test") as uint8 tensors."""
    if settings.source == CIFAR10:
        return _load_cifar10(Path(settings.root), split)
    return _load_folder_cached(_split_folder(settings, split), Path(settings.root))


def _split_folder(settings: DataSettings, split: str) -> Path:
    folder = Path(settings.source) / split
    if not Path(settings.source).is_dir():
        raise InputError(f"data folder not found: {settings.source}")
    if not folder.is_dir():
        raise InputError(f"no {split}/ folder in {settings.source} (expected {split}/<class>/<image>)")
    return folder


def image_inventory(settings: DataSettings) -> dict[str, list[str]] | None:
    """The training images as a sweep records them, class by class ("name size mtime" each): what a
    resume compares, to say what changed. None for CIFAR-10, whose download torchvision checks."""
    if settings.source == CIFAR10:
        return None
    listing = list_images(_split_folder(settings, "train"))
    inventory: dict[str, list[str]] = {name: [] for name in listing.classes}
    for (label, path), stamp in zip(listing.files, listing.stamps, strict=True):
        inventory[listing.classes[label]].append(f"{os.path.basename(path)} {stamp}")
    return inventory


def inventory_changes(before: dict[str, list[str]], now: dict[str, list[str]]) -> str:
    """What changed between two inventories, in words: "30 images added to cat, 10 removed from dog";
    empty when nothing did."""
    words = [f"class {name} removed" for name in before if name not in now]
    words += [f"class {name} added ({len(now[name])} images)" for name in now if name not in before]
    for name in (name for name in before if name in now):
        was = {entry.rsplit(" ", 2)[0]: entry for entry in before[name]}
        is_ = {entry.rsplit(" ", 2)[0]: entry for entry in now[name]}
        added, removed = len(is_.keys() - was.keys()), len(was.keys() - is_.keys())
        changed = sum(was[image] != is_[image] for image in was.keys() & is_.keys())
        for count, what, where in ((added, "added to", name), (removed, "removed from", name)):
            if count:
                words.append(f"{count} image{'s' * (count != 1)} {what} {where}")
        if changed:
            words.append(f"{changed} image{'s' * (changed != 1)} changed in {name}")
    return ", ".join(words)


def has_test_split(settings: DataSettings) -> bool:
    """Whether the data has test images: CIFAR-10's test set, or an image folder's test/."""
    return settings.source == CIFAR10 or (Path(settings.source) / "test").is_dir()


def stratified_split(labels: Tensor, first_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a seeded sample of first_size images with each class in proportion, and the rest.

    Each class gives floor(share) images, and the leftover places go to the
    classes with the largest fractional shares, so the sizes add up exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels).double()
    shares = first_size * counts / counts.sum()
    quotas = shares.floor().long()
    leftover = first_size - int(quotas.sum())
    quotas[torch.argsort(shares - shares.floor(), descending=True, stable=True)[:leftover]] += 1
    first, rest = [], []
    for label, quota in enumerate(quotas.tolist()):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        first.append(members[:quota])
        rest.append(members[quota:])
    return torch.cat(first), torch.cat(rest)


def channel_statistics(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation on the 0..1 scale, exactly.

    A histogram of each channel's 256 byte values gives the exact sums of values
    and of squares in one pass over the bytes, with no float copy of the images.
    """
    per_channel = images.transpose(0, 1).reshape(images.shape[1], -1)
    counts = torch.stack([torch.bincount(channel, minlength=256) for channel in per_channel]).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    count = per_channel.shape[1]
    mean = counts @ values / count
    variance = counts @ values.square() / count - mean.square()
    return tuple(mean.tolist()), tuple(variance.clamp_min(1e-12).sqrt().tolist())


def _load_cifar10(root: Path, split: str) -> LabeledImages:
    from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10  # heavy import, only when used

    try:
        dataset = TorchvisionCIFAR10(str(root), train=split == "train", download=True)
    except (OSError, RuntimeError) as error:
        raise InputError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({error}); "
            "pass --data PATH to an image folder instead"
        ) from None
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    return LabeledImages(images, torch.tensor(dataset.targets), tuple(dataset.classes), f"cifar10-{split}")


def _load_folder_cached(folder: Path, root: Path) -> LabeledImages:
    listing = list_images(folder)
    classes, files, fingerprint = listing.classes, listing.files, listing.fingerprint
    cache = root / "cache" / f"{folder.parent.name}-{folder.name}-{fingerprint}.pt"
    if cache.exists():
        try:
            saved = torch.load(cache, weights_only=True, mmap=True)  # pages in only what the split takes
            return LabeledImages(saved["images"], saved["labels"], tuple(saved["classes"]), fingerprint)
        except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as error:
            # The cache is only ever a copy of the files: decode them again.
            print(
                f"decoded-image cache {cache} is unreadable ({first_line(error)}); rebuilding it",
                file=sys.stderr,
            )

    dataset = LabeledImages(
        _decode_all([path for _, path in files]),
        torch.tensor([label for label, _ in files]),
        classes,
        fingerprint,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    torch.save({"images": dataset.images, "labels": dataset.labels, "classes": list(classes)}, partial)
    partial.replace(cache)  # atomic, so a crash never leaves a half-written cache
    return dataset


@dataclass(frozen=True)
class _FolderListing:
    classes: tuple[str, ...]  # sorted: a class's label is its place here
    files: list[tuple[int, str]]  # (label, path) of every image
    stamps: list[str]  # "size mtime_ns" of each file, in the order of files
    fingerprint: (
        str  # changes when the folder moves, or any file is added, removed, renamed, resized or touched
    )


def list_images(folder: Path) -> _FolderListing:
    """Every image of the folder, in one pass of os.scandir (3 times faster than a Path per file).

    Hidden folders and files (a Jupyter checkpoint folder, say) are no classes and no
    images; a class folder without images is an error, since it would shift every label.
    """
    with os.scandir(folder) as entries:
        classes = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    digest = hashlib.sha256(str(folder.resolve()).encode())
    files: list[tuple[int, str]] = []
    stamps: list[str] = []
    empty = []
    for label, name in enumerate(classes):
        with os.scandir(folder / name) as entries:
            images = sorted(
                (entry for entry in entries if _is_image(entry.name)), key=lambda entry: entry.name
            )
        if not images:
            empty.append(name)
        for entry in images:
            stat = entry.stat()
            digest.update(f"{label}\0{name}/{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            files.append((label, entry.path))
            stamps.append(f"{stat.st_size} {stat.st_mtime_ns}")
    if not files:
        raise InputError(f"no images in {folder} (expected {folder}/<class>/<image>)")
    if empty:
        raise InputError(f"class folder {folder / empty[0]} holds no images: remove it or add its images")
    if len(classes) < 2:
        raise InputError(f"{folder} holds images of one class only; need at least two")
    return _FolderListing(tuple(classes), files, stamps, digest.hexdigest()[:16])


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _decode_all(paths: list[str]) -> Tensor:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        arrays = list(pool.map(_decode, paths, chunksize=256))
    shape = arrays[0].shape
    for path, array in zip(paths, arrays, strict=True):
        if array.shape != shape:
            raise InputError(
                f"{path} is {array.shape[1]}x{array.shape[0]}, but {paths[0]} is "
                f"{shape[1]}x{shape[0]}: all images must have one size"
            )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _decode(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"cannot read image {path}: {error}") from None
