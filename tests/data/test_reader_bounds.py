"""Issue 15, kinds 2 and 4 for the dataset readers: what a small file declares is checked
before anything is allocated (IDX header vs caps and vs the gzip file's size, read
incrementally; CIFAR batch and label counts before a label list is expanded; an image's
pixel count before it is decoded), and malformed fields are one line. Peak allocations are
measured with tracemalloc, which sees numpy's buffers too."""

from __future__ import annotations

import pickle
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from lapp_edge.data import readers
from lapp_edge.data.image_files import open_rgb_image
from lapp_edge.data.readers import load_arrays
from lapp_edge.errors import UserError

MB = 1 << 20


def peak_of(call) -> tuple[int, BaseException | None]:  # noqa: ANN001
    tracemalloc.start()
    error = None
    try:
        call()
    except BaseException as caught:  # noqa: BLE001
        error = caught
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


def idx_header(shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)


def fmnist_dir(directory: Path, train_images: bytes | None = None, gz: bool = True) -> Path:
    """A Fashion-MNIST directory with 8 train / 4 test images; `train_images` replaces the train
    image file's bytes (gzipped already when gz)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 8), ("t10k", 4)):
        images = idx_header((count, 28, 28)) + rng.integers(0, 256, count * 784, dtype=np.uint8).tobytes()
        labels = idx_header((count,)) + rng.integers(0, 10, count, dtype=np.uint8).tobytes()
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
        if prefix == "train" and train_images is not None:
            (directory / (f"{prefix}-images-idx3-ubyte" + (".gz" if gz else ""))).write_bytes(train_images)
        else:
            (directory / f"{prefix}-images-idx3-ubyte").write_bytes(images)
    return directory


def gzip_stream(header: bytes, zeros: int) -> bytes:
    """gzip of `header` + `zeros` zero bytes, compressed incrementally (never held inflated)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(header)]
    block = bytes(MB)
    for _ in range(zeros // MB):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(bytes(zeros % MB)))
    parts.append(compressor.flush())
    return b"".join(parts)


def test_idx_gzip_bomb_longer_than_its_header_is_refused_reading_at_most_the_declared_size(tmp_path: Path) -> None:
    # the 08 reproducer's shape: a valid header for 1,000 images, then 64 MiB of zeros (~64 KB on disk)
    data = fmnist_dir(tmp_path / "fm", gzip_stream(idx_header((1000, 28, 28)), 64 * MB))
    peak, error = peak_of(lambda: load_arrays("fashion-mnist", data))
    assert isinstance(error, UserError) and "longer than its header" in str(error), error
    assert peak < 8 * MB, peak                                 # ~0.8 MB declared, not 64 MiB inflated


def test_idx_declaring_more_than_the_gzip_can_hold_is_refused_before_reading(tmp_path: Path) -> None:
    # 600,000 images declared (470 MB) in a 100 KB file: more than MAX_GZIP_RATIO x its size
    data = fmnist_dir(tmp_path / "fm", gzip_stream(idx_header((600_000, 28, 28)), 100 * MB))
    peak, error = peak_of(lambda: load_arrays("fashion-mnist", data))
    assert isinstance(error, UserError) and "refusing it" in str(error) and "compressed size" in str(error), error
    assert peak < 4 * MB, peak


@pytest.mark.parametrize("shape", [(2_000_000, 28, 28), (1, 70000, 70000), (10, 1 << 16, 1 << 16, 1 << 16)])
def test_idx_header_dims_above_the_caps_are_refused(shape: tuple[int, ...], tmp_path: Path) -> None:
    data = fmnist_dir(tmp_path / "fm", idx_header(shape) + bytes(64), gz=False)
    peak, error = peak_of(lambda: load_arrays("fashion-mnist", data))
    assert isinstance(error, UserError), error
    assert peak < 4 * MB, peak


def test_plain_idx_shorter_or_longer_than_declared(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="truncated"):
        load_arrays("fashion-mnist", fmnist_dir(tmp_path / "a", idx_header((8, 28, 28)) + bytes(100), gz=False))
    with pytest.raises(UserError, match="longer than its header"):
        load_arrays("fashion-mnist", fmnist_dir(tmp_path / "b", idx_header((8, 28, 28)) + bytes(8 * 784 + 1), gz=False))


def cifar_tree(root: Path, labels: object, data_rows: int = 4, names: object = None) -> Path:
    """CIFAR-10 pickles where data_batch_1 has `data_rows` images and `labels` (the 11 reproducer)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [int(x) for x in rng.integers(0, 10, 4)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    batch = {b"data": rng.integers(0, 256, (data_rows, 3072), dtype=np.uint8), b"labels": labels}
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    meta_names = names if names is not None else [f"c{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": meta_names}, protocol=2))
    return root


def memo_bomb(levels: int, leaf: object = 1) -> list:
    bomb = [leaf] * 9
    for _ in range(levels - 1):
        bomb = [bomb] * 9
    return bomb


def test_cifar_pickle_memo_bomb_labels_are_refused_without_expanding(tmp_path: Path) -> None:
    # the 11 reproducer uses 9 levels (387M labels); 7 (4.8M, ~40 MB expanded) shows the same and stays
    # harmless if the check is ever removed
    root = cifar_tree(tmp_path, memo_bomb(7))
    assert (root / "cifar-10-batches-py" / "data_batch_1").stat().st_size < 20_000
    peak, error = peak_of(lambda: load_arrays("cifar10", root))
    assert isinstance(error, UserError) and "labels for 4 images" in str(error), error
    assert peak < 16 * MB, peak


def test_cifar_memo_bomb_of_the_right_length_is_refused_by_item_type(tmp_path: Path) -> None:
    root = cifar_tree(tmp_path, [memo_bomb(7)] * 4)                # 4 labels, each 9**7 nested ints
    with pytest.raises(UserError, match="integers only"):
        load_arrays("cifar10", root)


def test_cifar_class_names_that_are_memo_bombs_are_refused(tmp_path: Path) -> None:
    root = cifar_tree(tmp_path, [1, 2, 3, 4], names=[memo_bomb(6, "xxxxxxxx")] * 10)   # 10 x 9**6 strings once printed
    peak, error = peak_of(lambda: load_arrays("cifar10", root))
    assert isinstance(error, UserError) and "class names" in str(error), error
    assert peak < 16 * MB, peak


@pytest.mark.parametrize(("labels", "rows", "message"), [
    ([1, 2, 3, 4, 5], 4, "5 labels for 4 images"),          # more labels than images (90-unfriendly)
    ([1, 2, 3], 4, "3 labels for 4 images"),
    ([1, 2, "3", 4], 4, "integers only"),
    ([1, 2, 3.0, 4], 4, "integers only"),
    ([1, 2, 10**30, 4], 4, "outside any class range"),
    ([1, 2, 3, 10], 4, "outside 0..9"),
    (np.zeros((2, 2), np.int64), 4, "integer labels"),
    ([1, 2, 3, 4], 5, "4 labels for 5 images"),
])
def test_malformed_cifar_batches_are_one_line(labels: object, rows: int, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        load_arrays("cifar10", cifar_tree(tmp_path, labels, data_rows=rows))


def test_oversized_cifar_file_is_refused_before_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = cifar_tree(tmp_path, [1, 2, 3, 4])
    monkeypatch.setattr(readers, "MAX_CIFAR_FILE_BYTES", 1000)
    with pytest.raises(UserError, match="larger than 1000 bytes"):
        load_arrays("cifar10", root)


def png_bomb(path: Path, side: int) -> None:
    """A 1-bit grayscale PNG of side x side zero pixels, streamed through zlib (tiny on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + bytes((side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 20_000])   # 100 MP (Pillow would only warn), 400 MP (Pillow's own error)
def test_decompression_bomb_png_is_refused_before_decoding(side: int, tmp_path: Path) -> None:
    png_bomb(tmp_path / "bomb.png", side)
    peak, error = peak_of(lambda: open_rgb_image(tmp_path / "bomb.png"))
    assert isinstance(error, UserError) and "pixels" in str(error) and "bomb" in str(error), error
    assert "\n" not in str(error)
    assert peak < 16 * MB, peak


def test_imagefolder_tree_with_a_bomb_or_garbage_image_is_one_line(tmp_path: Path) -> None:
    from PIL import Image

    from lapp_edge.data.torch_data import load_dataset

    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 40, np.uint8)).save(tmp_path / split / label / "0.png")
    png_bomb(tmp_path / "train" / "a" / "bomb.png", 20_000)
    (tmp_path / "train" / "b" / "garbage.png").write_bytes(b"\x89PNG not really")
    # every image header is read before training (tests/data/test_imagefolder.py): refused up front, one line each
    with pytest.raises(UserError) as bomb:
        load_dataset("imagefolder", tmp_path)
    assert "\n" not in str(bomb.value) and "bomb.png" in str(bomb.value) and "pixels" in str(bomb.value)
    (tmp_path / "train" / "a" / "bomb.png").unlink()
    with pytest.raises(UserError) as garbage:
        load_dataset("imagefolder", tmp_path)
    assert "\n" not in str(garbage.value) and "garbage.png" in str(garbage.value)
