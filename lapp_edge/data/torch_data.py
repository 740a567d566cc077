"""Datasets for training: the in-memory arrays of `readers` as torch batches, and ImageFolder trees.

Datasets that fit in memory are held as uint8 arrays and augmented batch-wise on the
training device (random crop with zero padding, horizontal flip), which on a 2-core CPU
is far cheaper than per-image PIL transforms. That includes ImageFolder trees whose decoded
images fit (`imagefolder.IN_MEMORY_LIMIT`); larger trees, and ImageNet-style augmentation
(random resized crops need the full image), are read per image through a DataLoader.

The data's own properties drive the defaults (`DataOptions`: input size, augmentation,
mean/std); `load_dataset` returns, with the data, the lines saying what was decided and the
resolved options, which the trainer prints before training and stores in the run's config.
A training epoch drops a last batch of one image (BatchNorm cannot normalise a single value
per channel in training mode); evaluation never drops anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lapp_edge.data.imagefolder import (
    AUGMENTATIONS, IN_MEMORY_LIMIT, FolderLayout, FolderSplit, channel_stats, decide_layout, decode_split, image_header, load_image,
    open_converted, resolve_augment, scan_tree,
)
from lapp_edge.data.readers import (
    DATASETS, DEFAULT_DATA_DIRS, Dataset, DatasetInfo, InMemorySplit, data_directory, load_arrays,
)
from lapp_edge.errors import UserError

__all__ = [
    "AUGMENTATIONS", "DATASETS", "DEFAULT_DATA_DIRS", "DataOptions", "Dataset", "DatasetInfo", "FolderDataset",
    "InMemorySplit", "TensorSplit", "augment", "batch_count", "configure", "iterate_batches", "load_dataset", "normalize",
    "shard_split", "split_device", "subset_split", "to_device",
]


def subset_split(split: object, count: int, seed: int) -> object:
    """A seeded random subset of `count` images of a split (the split itself when `count` is 0 or
    covers it), in memory or read per image."""
    index = _subset_index(len(split), count, seed)  # type: ignore[arg-type]
    if index is None:
        return split
    if isinstance(split, FolderDataset):
        return split.subset(index)
    if not isinstance(split, InMemorySplit):
        raise UserError(f"cannot take a subset of a {type(split).__name__}")
    return InMemorySplit(split.images[index], split.labels[index])


@dataclass(frozen=True)
class DataOptions:
    """How the data is shaped for training (TrainConfig's data fields). 0 / "auto" / "" mean: from the data."""

    input_size: int = 0
    augment: str = "auto"
    mean: str = ""
    std: str = ""
    train_subset: int = 0
    test_subset: int = 0
    seed: int = 0


def parse_stats(text: str, channels: int, flag: str) -> list[float] | None:
    """'0.5,0.4,0.3' -> [0.5, 0.4, 0.3] (one value per channel, or one for all); None for ''."""
    if not text:
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(np.isfinite(values)):
        raise UserError(f"{flag} needs {channels} finite value(s), one per image channel, got {text!r}")
    if flag == "--std" and min(values) <= 0:
        raise UserError(f"--std values must be positive, got {text!r}")
    return values


def _stats_text(values: list[float]) -> str:
    return ",".join(repr(float(v)) for v in values)


def _shown(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _subset_index(size: int, count: int, seed: int) -> np.ndarray | None:
    """subset_split's seeded choice of `count` of `size` items (None: all)."""
    if count <= 0 or count >= size:
        return None
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].numpy()


def configure(dataset: Dataset, options: DataOptions) -> Dataset:
    """An in-memory dataset (Fashion-MNIST, CIFAR) with `options` applied: augmentation and mean/std;
    options the data cannot apply are refused (one line). ImageFolder datasets are configured as
    they load. Returns a new Dataset (the given one is not changed) with `extra['decisions']` and
    `extra['resolved']`."""
    if dataset.extra.get("options") == options:
        return dataset
    if dataset.info.name == "imagefolder":
        raise UserError("an ImageFolder dataset is configured when it is loaded: load it with these options")
    info = replace(dataset.info)
    native = info.input_size
    if options.input_size not in (0, native):
        raise UserError(f"--input-size {options.input_size}: {info.name} images are {native}x{native} and are not resized "
                        "(only imagefolder data is); drop --input-size")
    if options.augment == "imagenet":
        raise UserError(f"--augment imagenet needs full-size images (imagefolder data); {info.name} images are "
                        f"{native}x{native}: use small or none")
    if options.augment not in AUGMENTATIONS:
        raise UserError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {options.augment!r}")
    augment = "small" if options.augment == "auto" else options.augment
    if augment == "none":
        info.crop_padding, info.horizontal_flip = 0, False
    given_mean, given_std = parse_stats(options.mean, info.in_channels, "--mean"), parse_stats(options.std, info.in_channels, "--std")
    info.mean, info.std = given_mean or list(info.mean), given_std or list(info.std)
    configured = Dataset(info, dataset.train, dataset.test, dict(dataset.extra))
    train_bytes = getattr(dataset.train, "images", np.empty(0)).nbytes + getattr(dataset.test, "images", np.empty(0)).nbytes
    augmentation = (f"pad {info.crop_padding} + random {native}x{native} crop" if info.crop_padding else "no crop") + \
        (" + horizontal flip" if info.horizontal_flip else "")
    configured.extra.update(
        options=options,
        decisions=[
            f"data: {info.name}: {len(dataset.train)} train / {len(dataset.test)} test images, "
            f"{info.in_channels}x{native}x{native}, {info.num_classes} classes, in memory ({train_bytes / 2**20:.0f} MB)",
            f"augmentation: {augment} ({augmentation if augment != 'none' else 'none'})"
            + (" [--augment auto]" if options.augment == "auto" else ""),
            f"normalisation: mean {_shown(info.mean)} std {_shown(info.std)} "
            f"({'given' if given_mean or given_std else 'the published values'})",
        ],
        resolved={"input_size": native, "augment": augment, "mean": _stats_text(info.mean), "std": _stats_text(info.std)},
    )
    return configured


class FolderDataset(torch.utils.data.Dataset):
    """ImageFolder images read per item: (uint8 C x S x S tensor, label). Evaluation preprocessing
    (`imagefolder.load_image`), or a random resized crop for ImageNet-style training. A file that
    fails to decode is a UserError naming it (the run stops with one line and stays resumable)."""

    def __init__(self, split: FolderSplit, layout: FolderLayout, random_resized_crop: bool = False) -> None:
        self.split, self.layout, self.random_resized_crop = split, layout, random_resized_crop

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.split.paths[index]
        if self.random_resized_crop:
            from torchvision.transforms import RandomResizedCrop

            image = RandomResizedCrop(self.layout.size)(open_converted(path, self.layout.mode))
            array = np.asarray(image, dtype=np.uint8)
            array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        else:
            array = load_image(path, self.layout)
        return torch.from_numpy(np.ascontiguousarray(array)), int(self.split.labels[index])

    def subset(self, index: np.ndarray) -> "FolderDataset":
        split = FolderSplit(self.split.root, [self.split.paths[i] for i in index], self.split.labels[index], self.split.classes_present)
        return FolderDataset(split, self.layout, self.random_resized_crop)


def _pick(split: FolderSplit, count: int, seed: int) -> FolderSplit:
    index = _subset_index(len(split), count, seed)
    if index is None:
        return split
    return FolderSplit(split.root, [split.paths[i] for i in index], split.labels[index], split.classes_present)


def load_imagefolder(directory: Path, options: DataOptions | None = None) -> Dataset:
    """An ImageFolder tree shaped by its own images (see `lapp_edge.data.imagefolder`): scanned
    (val/ labelled with train's classes), every header read, the layout decided, the subsets
    drawn, then decoded into memory where it fits, else read per image. UserError for every
    problem found before training (one line, naming the file or class)."""
    options = options or DataOptions()
    if options.augment not in AUGMENTATIONS:
        raise UserError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {options.augment!r}")
    tree = scan_tree(directory)
    for flag, count, split in (("--train-subset", options.train_subset, tree.train), ("--test-subset", options.test_subset, tree.val)):
        if count > len(split):
            raise UserError(f"{flag} {count} is more than the {len(split)} images in {split.root}")
    train, val = _pick(tree.train, options.train_subset, options.seed), _pick(tree.val, options.test_subset, options.seed + 1)
    headers = [image_header(path) for path in train.paths + val.paths]
    size = options.input_size or decide_layout(headers, 0, "none").size
    augment = resolve_augment(options.augment, size)
    layout = decide_layout(headers, size, augment)
    footprint = (len(train) + len(val)) * layout.channels * layout.size * layout.size
    in_memory = augment != "imagenet" and footprint <= IN_MEMORY_LIMIT
    if in_memory:
        train_split: object = decode_split(train, layout)
        test_split: object = decode_split(val, layout)
    else:
        train_split = FolderDataset(train, layout, random_resized_crop=augment == "imagenet")
        test_split = FolderDataset(val, layout)
    mean, std = parse_stats(options.mean, layout.channels, "--mean"), parse_stats(options.std, layout.channels, "--std")
    if mean is None or std is None:
        sample = train_split.images if in_memory else decode_split(_pick(train, 1000, options.seed + 2), layout).images  # type: ignore[attr-defined]
        computed_mean, computed_std = channel_stats(sample)
        mean, std = mean or computed_mean, std or [max(v, 1e-3) for v in computed_std]
    padding = max(1, round(layout.size / 8)) if augment == "small" else 0
    info = DatasetInfo("imagefolder", layout.channels, len(tree.classes), layout.size, mean, std, list(tree.classes),
                       crop_padding=padding, horizontal_flip=augment != "none")
    widths = sorted({w for w, _, _ in headers})
    heights = sorted({h for _, h, _ in headers})
    modes = sorted({m for _, _, m in headers})
    sizes = (f"{widths[0]}x{heights[0]}" if len(widths) == len(heights) == 1 else
             f"{widths[0]}-{widths[-1]} wide, {heights[0]}-{heights[-1]} high")
    decisions = [
        f"data: imagefolder {directory}: {len(tree.classes)} classes ({', '.join(tree.classes[:8])}"
        f"{', ...' if len(tree.classes) > 8 else ''}); train {len(train)} images"
        + (f" (--train-subset of {len(tree.train)})" if len(train) < len(tree.train) else "")
        + f", val {len(val)} images" + (f" (--test-subset of {len(tree.val)})" if len(val) < len(tree.val) else ""),
    ]
    if tree.missing_in_val:
        decisions.append(f"  val/ has no images of {', '.join(tree.missing_in_val[:8])}: not evaluated (val/ is labelled "
                         "with train/'s class index)")
    decisions += [f"  {line}" for line in tree.skipped.describe()]
    decisions += [
        f"  images {sizes}, {'/'.join(modes)} -> input {layout.channels}x{layout.size}x{layout.size}: shorter side resized to "
        f"{layout.resize}, centre crop" + (" [--input-size 0: the median shorter side, at most 224]" if not options.input_size else ""),
        (f"  held in memory: {footprint / 2**20:.1f} MB of uint8, decoded before training (limit {IN_MEMORY_LIMIT >> 20} MB)"
         if in_memory else
         f"  read per image from disk ({footprint / 2**20:.0f} MB decoded"
         + (f" > the {IN_MEMORY_LIMIT >> 20} MB in-memory limit" if footprint > IN_MEMORY_LIMIT else "; random resized crops need the full images")
         + "): headers checked before training; an image that fails to decode later stops the run with one line, resumable"),
        f"augmentation: {augment} ("
        + {"small": f"pad {padding} + random {layout.size}x{layout.size} crop + horizontal flip",
           "imagenet": f"random resized crop to {layout.size}x{layout.size} + horizontal flip",
           "none": "none"}[augment] + ")" + (f" [--augment auto: {'up to' if augment == 'small' else 'above'} 64 px]"
                                            if options.augment == "auto" else ""),
        f"normalisation: mean {_shown(mean)} std {_shown(std)} ("
        + ("given" if options.mean and options.std else
           f"computed from {len(train) if in_memory else min(len(train), 1000)} training images"
           + (", partly given" if options.mean or options.std else "")) + ")",
    ]
    dataset = Dataset(info, train_split, test_split)
    dataset.extra.update(options=options, decisions=decisions, layout=layout, in_memory=in_memory,
                         resolved={"input_size": layout.size, "augment": augment, "mean": _stats_text(mean), "std": _stats_text(std)})
    return dataset


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, options: DataOptions | None = None) -> Dataset:
    """Dataset `name` from `data_dir` (default: its standard place), shaped by `options`: in-memory
    arrays for Fashion-MNIST and CIFAR, and for ImageFolder trees that fit (else per-image reading).
    Raises UserError for an unknown name, a missing directory, unreadable files or options the
    data cannot apply."""
    options = options or DataOptions()
    if name == "imagefolder":
        return load_imagefolder(data_directory(name, data_dir), options)
    return configure(load_arrays(name, data_dir), options)


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
    """Normalised (and, for training, shuffled and augmented) batches on `device`. In training a
    last batch of one image is dropped (see the module docstring); `batch_count(train=True)` agrees.

    `rank`/`world` (training with several processes, `training/distributed.py`): every process
    draws the same permutation; each global batch of `batch_size * world` images is shared out
    strided (process r takes its images r, r + world, ...), so `batch_size` is per process. A last
    global batch with fewer than `world` images is left out (every process must take a step)."""
    size = len(split)  # type: ignore[arg-type]
    stop = batch_count(split, batch_size, world, train=True) * batch_size if train else size
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
            if len(chunk) < world or (train and start // global_batch >= stop // batch_size):
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
    for number, (images, labels) in enumerate(loader):
        if number * batch_size >= stop:
            break
        images = images.to(device)
        if train:
            assert generator is not None
            images = augment(images, info, generator)
        yield normalize(images, info), labels.to(device)


def batch_count(split: object, batch_size: int, world: int = 1, train: bool = False) -> int:
    """Batches `iterate_batches` yields per process (the same number in every process); in training
    with one process a last batch of a single image is not made (dropped: BatchNorm cannot train on it)."""
    size = len(split)  # type: ignore[arg-type]
    if world <= 1:
        full, rest = divmod(size, batch_size)
        if train and rest == 1 and full > 0:
            return full
        return full + (rest > 0)
    full, rest = divmod(size, batch_size * world)
    return full + (1 if rest >= world else 0)
