"""Datasets for training: the in-memory arrays of `readers` as torch batches, and ImageFolder trees.

Small datasets are held in memory as uint8 arrays and augmented batch-wise on the
training device (random crop with zero padding, horizontal flip), which on a 2-core CPU
is far cheaper than per-image PIL transforms. ImageFolder trees use torchvision's
per-image transforms and a DataLoader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lapp_edge.data.readers import (
    DATASETS, DEFAULT_DATA_DIRS, Dataset, DatasetInfo, InMemorySplit, data_directory, load_arrays,
)
from lapp_edge.data.image_files import open_rgb_image
from lapp_edge.errors import UserError

__all__ = [
    "DATASETS", "DEFAULT_DATA_DIRS", "Dataset", "DatasetInfo", "InMemorySplit", "augment", "batch_count",
    "iterate_batches", "load_dataset", "normalize", "subset_split",
]


def subset_split(split: object, count: int, seed: int) -> object:
    """A seeded random subset of `count` images of an in-memory split (the split itself when
    `count` is 0 or covers it, or for splits that are not in memory)."""
    if not isinstance(split, InMemorySplit) or count <= 0 or count >= len(split):
        return split
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(split), generator=generator)[:count].numpy()
    return InMemorySplit(split.images[index], split.labels[index])


def load_imagefolder(directory: Path, input_size: int = 224) -> Dataset:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip(), transforms.PILToTensor(),
    ])
    test_tf = transforms.Compose([
        transforms.Resize(int(input_size * 256 / 224)), transforms.CenterCrop(input_size), transforms.PILToTensor(),
    ])
    for split in ("train", "val"):
        if not (directory / split).is_dir():
            raise UserError(f"ImageFolder layout needs {directory / split}/<class>/<image> directories")
    try:
        train = ImageFolder(str(directory / "train"), transform=train_tf, loader=open_rgb_image)
        test = ImageFolder(str(directory / "val"), transform=test_tf, loader=open_rgb_image)
    except (FileNotFoundError, RuntimeError) as error:
        raise UserError(f"bad ImageFolder tree in {directory}: {error}") from None
    info = DatasetInfo("imagefolder", 3, len(train.classes), input_size, mean, std, list(train.classes))
    return Dataset(info, train, test)


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Dataset `name` from `data_dir` (default: its standard place): in-memory arrays for
    Fashion-MNIST and CIFAR, torchvision ImageFolder datasets for `imagefolder`.
    Raises UserError for an unknown name, a missing directory or unreadable files."""
    if name == "imagefolder":
        return load_imagefolder(data_directory(name, data_dir))
    return load_arrays(name, data_dir)


def normalize(images: torch.Tensor | np.ndarray, info: DatasetInfo) -> torch.Tensor:
    """uint8 N x C x H x W (tensor or array) -> float tensor, scaled to [0, 1] and standardised
    with the dataset's mean/std."""
    images = torch.as_tensor(images)
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def augment(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a uint8 batch, one draw per image."""
    count, _, height, width = images.shape
    if info.crop_padding:
        pad = info.crop_padding
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (count,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * pad + 1, (count,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(height, device=images.device)[None]).view(count, 1, height, 1)
        cols = (dx[:, None] + torch.arange(width, device=images.device)[None]).view(count, 1, 1, width)
        batch_index = torch.arange(count, device=images.device).view(count, 1, 1, 1)
        channel_index = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
        images = padded[batch_index, channel_index, rows, cols]
    if info.horizontal_flip:
        flip = (torch.rand(count, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip.view(count, 1, 1, 1), images.flip(3), images)
    return images


def iterate_batches(
    split: object,
    info: DatasetInfo,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    train: bool = False,
    workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (and, for training, shuffled and augmented) batches on `device`."""
    if isinstance(split, InMemorySplit):
        order = torch.randperm(len(split), generator=generator) if train else torch.arange(len(split))
        for start in range(0, len(split), batch_size):
            index = order[start : start + batch_size].numpy()
            images = torch.from_numpy(split.images[index]).to(device, non_blocking=True)
            if train:
                assert generator is not None
                images = augment(images, info, generator)
            yield normalize(images, info), torch.from_numpy(split.labels[index]).to(device, non_blocking=True)
        return
    loader = DataLoader(split, batch_size=batch_size, shuffle=train, generator=generator, num_workers=workers)  # type: ignore[arg-type]
    for images, labels in loader:
        yield normalize(images.to(device), info), labels.to(device)


def batch_count(split: object, batch_size: int) -> int:
    return -(-len(split) // batch_size)  # type: ignore[arg-type]
