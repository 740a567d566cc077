"""Dataset readers that need no torch: Fashion-MNIST (IDX files) and CIFAR-10/100 (python
pickles, read by a numpy-only unpickler) as uint8 numpy arrays, plus each dataset's facts
(`DatasetInfo`: channels, classes, input size, mean/std).

The deploy side (bench, int8 calibration sets) reads its images through this module; the
training side wraps the same arrays in `lapp_edge.data.torch_data`.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lapp_edge.errors import UserError
from lapp_edge.fileio import missing_text

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


# What an IDX file may declare before anything is allocated: Fashion-MNIST is 60,000 x 28 x 28
# (47 MB); EMNIST, the largest of its kind, ~700,000 images. A gzip file cannot honestly hold
# more than MAX_GZIP_RATIO times its own size of image data (Fashion-MNIST: 1.8x, MNIST: 6x);
# an all-zero "dataset" that compresses 1000x is a decompression bomb, not data.
MAX_IDX_ITEMS = 1_000_000
MAX_IDX_BYTES = 1 << 30
MAX_GZIP_RATIO = 100
_READ_CHUNK = 1 << 20


def _idx_header(head: bytes, path: Path) -> tuple[int, ...]:
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08 or not 1 <= head[3] <= 4 or len(head) < 4 + 4 * head[3]:
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    shape = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(head[3]))
    if shape[0] > MAX_IDX_ITEMS or any(d > 1 << 16 for d in shape[1:]):
        raise UserError(f"{path} declares {list(shape)}; refusing more than {MAX_IDX_ITEMS} items or sides above 65536")
    return shape


def _read_exactly(stream: object, count: int, path: Path) -> bytes:
    """`count` bytes from `stream` read in chunks (memory grows only as data really arrives),
    then one more read that must find the end: a file longer than its header says is refused
    after reading at most `count` + 1 bytes."""
    chunks, got = [], 0
    while got < count:
        chunk = stream.read(min(_READ_CHUNK, count - got))  # type: ignore[attr-defined]
        if not chunk:
            raise UserError(f"{path} is truncated: expected {count} values, found {got}")
        chunks.append(chunk)
        got += len(chunk)
    if stream.read(1):  # type: ignore[attr-defined]
        raise UserError(f"{path} is longer than its header declares ({count} values); refusing it")
    return b"".join(chunks)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (plain or .gz) as a uint8 array. The header is read first; the declared size
    is checked against MAX_IDX_ITEMS / MAX_IDX_BYTES and against the file's size on disk (x1
    for a plain file, x MAX_GZIP_RATIO for gzip) before the body is read, incrementally."""
    compressed = path.suffix == ".gz"
    try:
        on_disk = path.stat().st_size
        with (gzip.open if compressed else open)(path, "rb") as handle:
            head = handle.read(4)
            if len(head) == 4 and 1 <= head[3] <= 4:
                head += handle.read(4 * head[3])
            shape = _idx_header(head, path)
            count = math.prod(shape)
            limit = MAX_GZIP_RATIO * on_disk if compressed else on_disk - len(head)
            if count > MAX_IDX_BYTES or (count > limit and compressed):
                raise UserError(f"{path} declares {list(shape)} ({count} bytes) from {on_disk} bytes on disk; refusing it "
                                f"(at most {MAX_IDX_BYTES} bytes, {MAX_GZIP_RATIO}x the compressed size)")
            data = _read_exactly(handle, count, path)
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    if (directory / "train").is_dir():            # an ImageFolder tree given without --dataset imagefolder
        raise UserError(f"Fashion-MNIST file {stem}(.gz) not found in {directory}, which holds a train/ folder: for an "
                        "ImageFolder tree (train/<class>/<image>) pass --dataset imagefolder")
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


# The official files: data_batch_N 31 MB (10,000 images), CIFAR-100 train 155 MB (50,000).
MAX_CIFAR_FILE_BYTES = 512 << 20
MAX_CIFAR_BATCH = 60_000


def _read_cifar_pickle(path: Path) -> dict[str, object]:
    try:
        if path.stat().st_size > MAX_CIFAR_FILE_BYTES:
            raise UserError(f"{path} is larger than {MAX_CIFAR_FILE_BYTES} bytes; not a CIFAR python pickle")
        with open(path, "rb") as stream:
            payload = _ArrayOnlyUnpickler(stream, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path} not found: unpack the CIFAR python archive (cifar-*-python.tar.gz) into --data-dir") from None
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad or unsafe file
        raise UserError(f"{path} is not a CIFAR python pickle or is unsafe: {str(error)[:200]}") from None
    if not isinstance(payload, dict) or len(payload) > 100:
        raise UserError(f"{path} is not a CIFAR python pickle")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key)[:100]: value for key, value in payload.items()}


def _cifar_labels(values: object, count: int, path: Path, label_key: str) -> np.ndarray:
    """`count` integer labels from a batch, checked before anything is expanded: a list whose
    items are ints, or a 1-D integer array. (A pickle can make one small list stand for 9**k
    labels by sharing references; such a list is refused by its length or item types.)"""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or len(values) != count or values.dtype.kind not in "iu":
            raise UserError(f"{path}: '{label_key}' must hold {count} integer labels, one per image")
        return values.astype(np.int64)
    if not isinstance(values, list) or len(values) != count:
        size = len(values) if isinstance(values, (list, tuple)) else "no list of"
        raise UserError(f"{path}: '{label_key}' holds {size} labels for {count} images")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise UserError(f"{path}: '{label_key}' must hold integers only")
    if values and not all(-(1 << 31) <= v < 1 << 31 for v in values):
        raise UserError(f"{path}: '{label_key}' holds labels outside any class range")
    return np.asarray(values, dtype=np.int64)


def _cifar_split(paths: list[Path], label_key: str) -> InMemorySplit:
    images, labels = [], []
    for path in paths:
        batch = _read_cifar_pickle(path)
        data = batch.get("data")
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32
                or not 0 < data.shape[0] <= MAX_CIFAR_BATCH):
            raise UserError(f"{path} does not hold CIFAR images (N x 3072 uint8, 0 < N <= {MAX_CIFAR_BATCH}) and '{label_key}'")
        labels.append(_cifar_labels(batch.get(label_key), data.shape[0], path, label_key))
        images.append(data.reshape(-1, 3, 32, 32))
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
    if not isinstance(names, list) or len(names) != classes or any(
            not isinstance(n, (str, bytes)) or len(n) > 256 for n in names):
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
        raise UserError(f"data directory {directory} for {name} {missing_text(directory)}: {hint}pass --data-dir")
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
