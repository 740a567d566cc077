"""Dataset readers and batch augmentation."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from lapp_edge.data.torch_data import DatasetInfo, InMemorySplit, augment, iterate_batches, load_dataset
from lapp_edge.errors import UserError


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(directory: Path, train: int = 20, test: int = 10) -> None:
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (count,)))


def test_reads_idx_files_from_a_directory(tmp_path: Path) -> None:
    make_fashion_mnist(tmp_path)
    data = load_dataset("fashion-mnist", tmp_path)
    assert data.train.images.shape == (20, 1, 28, 28) and data.test.labels.shape == (10,)
    assert data.info.num_classes == 10 and data.info.in_channels == 1


def test_truncated_idx_file_is_one_clear_error(tmp_path: Path) -> None:
    make_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(UserError, match="truncated"):
        load_dataset("fashion-mnist", tmp_path)


def test_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("fashion-mnist", tmp_path / "absent")
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("svhn", tmp_path)


def test_augmentation_is_seeded_and_keeps_shape() -> None:
    info = DatasetInfo("x", 1, 10, 8, [0.5], [0.5], [str(i) for i in range(10)], crop_padding=2, horizontal_flip=True)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    first = augment(images, info, torch.Generator().manual_seed(1))
    second = augment(images, info, torch.Generator().manual_seed(1))
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, second) and not torch.equal(first, images)


def test_crop_is_a_shifted_window_of_the_padded_image() -> None:
    info = DatasetInfo("x", 1, 10, 6, [0.0], [1.0], [], crop_padding=1, horizontal_flip=False)
    image = torch.arange(36, dtype=torch.uint8).view(1, 1, 6, 6)
    out = augment(image, info, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
    windows = [padded[..., dy : dy + 6, dx : dx + 6] for dy in range(3) for dx in range(3)]
    assert any(torch.equal(out, w) for w in windows)


def test_batches_cover_the_split_once_in_order_for_evaluation() -> None:
    split = InMemorySplit(np.zeros((10, 1, 4, 4), dtype=np.uint8), np.arange(10))
    info = DatasetInfo("x", 1, 10, 4, [0.0], [1.0], [])
    labels = torch.cat([y for _, y in iterate_batches(split, info, 4, torch.device("cpu"))])
    assert labels.tolist() == list(range(10))


def test_imagefolder_tree(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(2):
                Image.fromarray(np.full((40, 40, 3), 60 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    data = load_dataset("imagefolder", tmp_path)
    assert data.info.class_names == ["cat", "dog"]
    images, labels = next(iterate_batches(data.test, data.info, 4, torch.device("cpu")))
    # the images' own size (40x40), not ImageNet's 224 (issue 14); RGB because the PNGs are RGB
    assert images.shape == (4, 3, 40, 40) and images.dtype == torch.float32
    with pytest.raises(UserError, match="ImageFolder layout"):
        load_dataset("imagefolder", tmp_path / "train")


def write_cifar10(directory: Path, per_batch: int = 4) -> None:
    import pickle

    folder = directory / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, per_batch))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_reads_cifar10_python_pickles(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert data.train.images.shape == (20, 3, 32, 32) and data.test.images.shape == (4, 3, 32, 32)
    assert data.info.class_names[3] == "class3" and data.info.crop_padding == 4


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    import pickle

    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # noqa: ANN204 - pickle protocol
            return (Path.touch, (marker,))

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(UserError, match="unsafe"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
