"""Datasets for training: the in-memory arrays of `readers` as torch batches, and ImageFolder trees.

Small datasets are held in memory as uint8 arrays and augmented batch-wise on the
training device (random crop with zero padding, horizontal flip), which on a 2-core CPU
is far cheaper than per-image PIL transforms. ImageFolder trees use torchvision's
per-image transforms and a DataLoader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lapp_edge.data.readers import (
    DATASETS, DEFAULT_DATA_DIRS, Dataset, DatasetInfo, InMemorySplit, data_directory, load_arrays,
)
from lapp_edge.errors import UserError

__all__ = [
    "DATASETS", "DEFAULT_DATA_DIRS", "Dataset", "DatasetInfo", "InMemorySplit", "TensorSplit", "augment", "batch_count",
    "iterate_batches", "load_dataset", "normalize", "shard_split", "split_device", "subset_split", "to_device",
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
        train = ImageFolder(str(directory / "train"), transform=train_tf)
        test = ImageFolder(str(directory / "val"), transform=test_tf)
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
    mean, std = _mean_std(tuple(info.mean), tuple(info.std), images.device)
    return (images.float() / 255.0 - mean) / std


_MEAN_STD: dict[tuple[tuple[float, ...], tuple[float, ...], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std as 1 x C x 1 x 1 tensors on `device`, made once: building them from Python lists
    on a GPU is a host-to-device copy that waits for the GPU, once per batch otherwise."""
    key = (mean, std, device)
    if key not in _MEAN_STD:
        _MEAN_STD[key] = (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))
    return _MEAN_STD[key]


def augment(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator,
            drawn: tuple[int, slice] | None = None) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a uint8 batch, one draw per image.

    Draws are made on the generator's device (a CUDA generator for data held on the GPU: no
    host round-trip per batch). `drawn=(count, share)`: this batch holds the rows `share` of a batch
    of `count` images (one process's share of a global batch, `distributed.py`): the draws are
    made for all `count` images and this share's rows taken, so the generator advances alike
    in every process and each image gets the draw a single process would give it."""
    count, _, height, width = images.shape
    draw_count, share = drawn if drawn is not None else (count, slice(None))

    def draw(high: int) -> torch.Tensor:
        return torch.randint(0, high, (draw_count,), generator=generator, device=generator.device)[share].to(images.device)

    if info.crop_padding:
        pad = info.crop_padding
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = draw(2 * pad + 1)
        dx = draw(2 * pad + 1)
        rows = (dy[:, None] + torch.arange(height, device=images.device)[None]).view(count, 1, height, 1)
        cols = (dx[:, None] + torch.arange(width, device=images.device)[None]).view(count, 1, 1, width)
        batch_index = torch.arange(count, device=images.device).view(count, 1, 1, 1)
        channel_index = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
        images = padded[batch_index, channel_index, rows, cols]
    if info.horizontal_flip:
        flip = (torch.rand(draw_count, generator=generator, device=generator.device)[share] < 0.5).to(images.device)
        images = torch.where(flip.view(count, 1, 1, 1), images.flip(3), images)
    return images


@dataclass
class TensorSplit:
    """An in-memory split as torch tensors on a device (uint8 N x C x H x W images, int64 labels):
    the GPU-resident input pipeline moves a whole split once and then only indexes it."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def to_device(split: object, device: torch.device) -> object:
    """An in-memory split moved whole to `device` as a TensorSplit (uint8 stays uint8: 47 MB for
    Fashion-MNIST's training split, 150 MB for CIFAR's); any other split, or device cpu, unchanged."""
    if isinstance(split, InMemorySplit) and device.type != "cpu":
        return TensorSplit(torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device, torch.long))
    return split


def split_device(split: object) -> torch.device:
    """Where a split's images live (cpu for everything but a TensorSplit)."""
    return split.images.device if isinstance(split, TensorSplit) else torch.device("cpu")


def shard_split(split: object, rank: int, world: int) -> object:
    """Every `world`-th image from `rank` on (evaluation sharded over processes: the shards cover
    the split exactly once). The split itself when world is 1."""
    if world <= 1:
        return split
    if isinstance(split, InMemorySplit):
        return InMemorySplit(split.images[rank::world], split.labels[rank::world])
    if isinstance(split, TensorSplit):
        return TensorSplit(split.images[rank::world], split.labels[rank::world])
    return torch.utils.data.Subset(split, range(rank, len(split), world))  # type: ignore[arg-type]


def iterate_batches(
    split: object,
    info: DatasetInfo,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    train: bool = False,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (and, for training, shuffled and augmented) batches on `device`.

    `rank`/`world` (training with several processes, `training/distributed.py`): every process
    draws the same permutation; each global batch of `batch_size * world` images is shared out
    strided (process r takes its images r, r + world, ...), so `batch_size` is per process. A last
    global batch with fewer than `world` images is left out (every process must take a step)."""
    if isinstance(split, (InMemorySplit, TensorSplit)):
        on_device = isinstance(split, TensorSplit)
        if train:
            assert generator is not None
            order = torch.randperm(len(split), generator=generator, device=generator.device)
        else:
            order = torch.arange(len(split))
        if on_device:
            order = order.to(split_device(split))
        global_batch = batch_size * world
        rows = slice(rank, None, world)
        for start in range(0, len(split), global_batch):
            chunk = order[start : start + global_batch]
            if len(chunk) < world:
                break
            index = chunk[rows]
            if isinstance(split, TensorSplit):
                images, labels = split.images[index].to(device), split.labels[index].to(device)
            else:
                picked = index.cpu().numpy()
                images = torch.from_numpy(split.images[picked]).to(device, non_blocking=True)
                labels = torch.from_numpy(split.labels[picked]).to(device, non_blocking=True)
            if train:
                assert generator is not None
                images = augment(images, info, generator, (len(chunk), rows) if world > 1 else None)
            yield normalize(images, info), labels
        return
    if world > 1:
        # each process: a strided share of one seeded permutation (drawn alike everywhere), in order
        if train:
            assert generator is not None
            order = torch.randperm(len(split), generator=generator)  # type: ignore[arg-type]
        else:
            order = torch.arange(len(split))  # type: ignore[arg-type]
        order = order[: len(order) - len(order) % world][rank::world]
        split = torch.utils.data.Subset(split, order.tolist())  # type: ignore[arg-type]
        loader = DataLoader(split, batch_size=batch_size, shuffle=False, num_workers=workers)
    else:
        loader = DataLoader(split, batch_size=batch_size, shuffle=train, generator=generator, num_workers=workers)  # type: ignore[arg-type]
    for images, labels in loader:
        yield normalize(images.to(device), info), labels.to(device)


def batch_count(split: object, batch_size: int, world: int = 1) -> int:
    """Batches `iterate_batches` yields per process (the same number in every process)."""
    size = len(split)  # type: ignore[arg-type]
    if world <= 1:
        return -(-size // batch_size)
    full, rest = divmod(size, batch_size * world)
    return full + (1 if rest >= world else 0)
