"""Dataset readers that need no torch: Fashion-MNIST (IDX files) and CIFAR-10/100 (python
pickles, read by a numpy-only unpickler) as uint8 numpy arrays, plus each dataset's facts
(`DatasetInfo`: channels, classes, input size, mean/std).

The deploy side (bench, int8 calibration sets) reads its images through this module; the
training side wraps the same arrays in `lapp_edge.data.torch_data`.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lapp_edge.errors import UserError

DEFAULT_DATA_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "cifar10": "data/cifar10",
    "cifar100": "data/cifar100",
    "imagefolder": "data/imagefolder",
}
DATASETS = tuple(DEFAULT_DATA_DIRS)
IN_MEMORY_DATASETS = ("fashion-mnist", "cifar10", "cifar100")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


@dataclass
class DatasetInfo:
    name: str
    in_channels: int
    num_classes: int
    input_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str]
    crop_padding: int = 0
    horizontal_flip: bool = False


@dataclass
class InMemorySplit:
    """A split held in memory as numpy arrays."""

    images: np.ndarray              # uint8, N x C x H x W
    labels: np.ndarray              # int64, N

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    info: DatasetInfo
    train: object                    # InMemorySplit, or a torch Dataset (ImageFolder, built by data.torch_data)
    test: object
    extra: dict[str, object] = field(default_factory=dict)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4 or len(data) < 4 + 4 * data[3]:
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}: install it with "
        "'apt-get install dataset-fashion-mnist' or pass --data-dir"
    )


def load_fashion_mnist(directory: Path) -> Dataset:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"Fashion-MNIST {split} files in {directory} do not match each other")
        if images.shape[1:] != (28, 28) or len(images) == 0:
            raise UserError(f"Fashion-MNIST {split} images in {directory} are {list(images.shape)}, not N x 28 x 28 with N > 0")
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise UserError(f"Fashion-MNIST {split} labels in {directory} hold class {labels.max()}; classes are 0-9")
        splits[split] = InMemorySplit(images[:, None].copy(), labels.astype(np.int64))
    info = DatasetInfo("fashion-mnist", 1, 10, 28, [0.2860], [0.3530], FASHION_MNIST_CLASSES, 2, True)
    return Dataset(info, splits["train"], splits["test"])


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: CIFAR's python pickles need nothing
    else, and a crafted file in --data-dir must not be able to run code when it is read."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes; a pure function
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as stream:
            payload = _ArrayOnlyUnpickler(stream, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path} not found: unpack the CIFAR python archive (cifar-*-python.tar.gz) into --data-dir") from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad or unsafe file
        raise UserError(f"{path} is not a CIFAR python pickle or is unsafe: {str(error)[:200]}") from None
    if not isinstance(payload, dict):
        raise UserError(f"{path} is not a CIFAR python pickle")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in payload.items()}


def _cifar_split(paths: list[Path], label_key: str) -> InMemorySplit:
    images, labels = [], []
    for path in paths:
        batch = _read_cifar_pickle(path)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or batch_labels is None:
            raise UserError(f"{path} does not hold CIFAR images (N x 3072 uint8) and '{label_key}'")
        images.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return InMemorySplit(np.concatenate(images), np.concatenate(labels))


def load_cifar(directory: Path, classes: int) -> Dataset:
    """CIFAR-10/100 from the official python pickles (the unpacked archive's folder, or its parent)."""
    folder_name = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    folder = directory / folder_name if (directory / folder_name).is_dir() else directory
    if classes == 10:
        train = _cifar_split([folder / f"data_batch_{i}" for i in range(1, 6)], "labels")
        test = _cifar_split([folder / "test_batch"], "labels")
        names = _read_cifar_pickle(folder / "batches.meta").get("label_names")
        mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    else:
        train = _cifar_split([folder / "train"], "fine_labels")
        test = _cifar_split([folder / "test"], "fine_labels")
        names = _read_cifar_pickle(folder / "meta").get("fine_label_names")
        mean, std = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]
    if not isinstance(names, list) or len(names) != classes:
        raise UserError(f"the CIFAR-{classes} meta file in {folder} does not list {classes} class names")
    for split in (train, test):
        if len(split) == 0 or int(split.labels.min()) < 0 or int(split.labels.max()) >= classes:
            raise UserError(f"CIFAR-{classes} labels in {folder} are outside 0..{classes - 1}")
    class_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    info = DatasetInfo(f"cifar{classes}", 3, classes, 32, mean, std, class_names, 4, True)
    return Dataset(info, train, test)


def data_directory(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of dataset `name` (`data_dir`, else its standard place); UserError if unknown or absent."""
    if name not in DEFAULT_DATA_DIRS:
        raise UserError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    directory = Path(data_dir or DEFAULT_DATA_DIRS[name])
    if not directory.is_dir():
        hint = "install it with 'apt-get install dataset-fashion-mnist' or " if name == "fashion-mnist" else ""
        raise UserError(f"data directory {directory} for {name} does not exist: {hint}pass --data-dir")
    return directory


def load_arrays(name: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """An in-memory dataset (Fashion-MNIST, CIFAR-10/100) as numpy arrays. ImageFolder trees
    are read per image by `lapp_edge.data.torch_data.load_dataset`; here they are a UserError."""
    directory = data_directory(name, data_dir)
    if name == "fashion-mnist":
        return load_fashion_mnist(directory)
    if name in ("cifar10", "cifar100"):
        return load_cifar(directory, 10 if name == "cifar10" else 100)
    raise UserError(f"{name} is not an in-memory dataset; only {', '.join(IN_MEMORY_DATASETS)} are")
