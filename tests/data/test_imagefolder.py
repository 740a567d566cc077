"""Issue 14, kinds 1, 3 and 6 at the data layer: ImageFolder trees are labelled with train/'s class
index, what is not an image class is skipped and said, what cannot be used is refused in one line
naming it, and the images' own size, channels and count drive the defaults. Tiny trees, seconds."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lapp_edge.data.torch_data as torch_data
from lapp_edge.data.imagefolder import FolderLayout, load_image, open_converted, scan_tree
from lapp_edge.data.torch_data import DataOptions, FolderDataset, batch_count, iterate_batches, load_dataset
from lapp_edge.errors import UserError


def write_tree(root: Path, split: str, classes: str, count: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> None:
    """`count` noisy solid-colour images (width x height `size`) per class, like the issue's reproducers."""
    for name in classes.split(","):
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        colour = rng.integers(0, 256, 3)
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = np.clip(colour + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"img{index:03d}.png")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- kind 1: labels ---------------------------------------------------------------------------

def test_val_missing_a_class_keeps_train_labels(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "cat,dog,fox", 3)
    write_tree(tmp_path, "val", "cat,fox", 2)
    data = load_dataset("imagefolder", tmp_path)
    assert data.info.class_names == ["cat", "dog", "fox"]
    assert data.test.labels.tolist() == [0, 0, 2, 2]              # fox is 2 (train's index), not 1
    assert any("val/ has no images of dog" in line for line in data.extra["decisions"])


@pytest.mark.parametrize("val_classes", ["cat,wolf", "Cat,dog", "cat,dog,fox"])
def test_val_class_that_train_lacks_is_refused(tmp_path: Path, val_classes: str) -> None:
    write_tree(tmp_path, "train", "cat,dog", 2)
    write_tree(tmp_path, "val", val_classes, 1)
    with pytest.raises(UserError, match="that train/ does not have") as error:
        load_dataset("imagefolder", tmp_path)
    assert "\n" not in str(error.value)


def test_class_order_is_train_sorted_whatever_val_holds(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "zebra,ant,moth", 2)
    write_tree(tmp_path, "val", "moth,zebra", 1)
    tree = scan_tree(tmp_path)
    assert tree.classes == ["ant", "moth", "zebra"]
    assert dict(zip([p.parent.name for p in tree.val.paths], tree.val.labels.tolist())) == {"moth": 1, "zebra": 2}


def test_hidden_entries_and_non_images_are_skipped_and_said(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "cat,dog", 2)
    write_tree(tmp_path, "val", "cat,dog", 1)
    write_tree(tmp_path, "train/.ipynb_checkpoints", "x", 1)                       # a hidden folder with images inside
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "train" / "labels.csv").write_text("a,b\n")                       # a stray file beside the classes
    (tmp_path / "train" / "cat" / "notes.txt").write_text("n")
    (tmp_path / "train" / "cat" / "img000.png~").write_bytes(b"editor backup")
    (tmp_path / "train" / "dog" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "val" / "cat" / "._img000.png").write_bytes(b"AppleDouble")
    data = load_dataset("imagefolder", tmp_path)
    assert data.info.class_names == ["cat", "dog"] and len(data.train) == 4 and len(data.test) == 2
    text = "\n".join(data.extra["decisions"])
    assert "skipped 4 hidden entries" in text and "skipped 3 files without an image extension" in text


def test_a_class_directory_without_images_is_refused(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "cat,dog", 2)
    write_tree(tmp_path, "val", "cat,dog", 1)
    (tmp_path / "train" / "fox").mkdir()
    (tmp_path / "train" / "fox" / "readme.txt").write_text("later")
    with pytest.raises(UserError, match="fox holds no images"):
        load_dataset("imagefolder", tmp_path)


def test_a_file_that_is_not_an_image_is_refused_naming_it(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "cat,dog", 2)
    write_tree(tmp_path, "val", "cat,dog", 1)
    (tmp_path / "train" / "dog" / "img009.jpg").write_text("not a jpeg")
    with pytest.raises(UserError, match="cannot read image .*img009.jpg"):
        load_dataset("imagefolder", tmp_path)


def test_a_tree_of_one_class_is_refused(tmp_path: Path) -> None:
    # one class trains to 100% top-1 and means nothing: a tree missing its other classes, most likely
    write_tree(tmp_path, "train", "cat", 2)
    write_tree(tmp_path, "val", "cat", 1)
    with pytest.raises(UserError, match=r"train/ holds one class directory \(cat\): a classifier needs at least two"):
        load_dataset("imagefolder", tmp_path)


@pytest.mark.parametrize(("mode", "dtype", "words"), [("I;16", np.uint16, "16-bit"), ("I", np.int32, "32-bit integer"),
                                                      ("F", np.float32, "32-bit float")])
def test_an_image_wider_than_8_bits_is_refused_not_clipped(tmp_path: Path, mode: str, dtype: type, words: str) -> None:
    # PIL's convert to L/RGB clips such pixels to 255 (a 16-bit scan turns almost white), so it is refused
    # naming the file, as the device runner refuses it
    write_tree(tmp_path, "train", "cat,dog", 2)
    write_tree(tmp_path, "val", "cat,dog", 1)
    wide = tmp_path / "train" / "dog" / "scan.tif"
    Image.fromarray(np.full((40, 48), 40000 if mode != "F" else 0.5, dtype=dtype)).save(wide)
    assert Image.open(wide).mode == mode
    with pytest.raises(UserError, match=rf"image .*scan.tif has {words} pixels \(mode {mode}\).*convert the tree to 8 bits"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(UserError, match=rf"scan.tif has {words} pixels"):     # evaluation (verify, bench, ship) reads it so
        open_converted(wide, "L")


# --- kind 3: a truncated image, found before training where the tree is decoded up front ------------

def test_a_truncated_image_is_refused_before_training_naming_it(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "cat,dog", 3)
    write_tree(tmp_path, "val", "cat,dog", 1)
    truncate(tmp_path / "train" / "dog" / "img002.png")
    with pytest.raises(UserError, match="cannot decode image .*dog/img002.png: image file is truncated"):
        load_dataset("imagefolder", tmp_path)


def test_read_per_image_a_truncated_image_is_one_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(tmp_path, "train", "cat,dog", 3)
    write_tree(tmp_path, "val", "cat,dog", 1)
    monkeypatch.setattr(torch_data, "IN_MEMORY_LIMIT", 0)                         # force reading per image
    truncate(tmp_path / "train" / "dog" / "img002.png")                           # headers still read fine
    data = load_dataset("imagefolder", tmp_path, DataOptions(mean="0.5", std="0.25"))  # no images decoded for statistics
    assert isinstance(data.train, FolderDataset) and not data.extra["in_memory"]
    with pytest.raises(UserError, match="cannot decode image .*dog/img002.png"):
        list(iterate_batches(data.train, data.info, 2, torch.device("cpu"), torch.Generator().manual_seed(0), train=True))


def test_a_last_training_batch_of_one_is_dropped_and_nothing_else() -> None:
    from lapp_edge.data.readers import DatasetInfo, InMemorySplit

    info = DatasetInfo("x", 1, 2, 4, [0.0], [1.0], ["a", "b"])
    for size, batch, train_batches in [(129, 128, 1), (130, 128, 2), (128, 128, 1), (5, 2, 2), (3, 1, 3), (2, 8, 1)]:
        split = InMemorySplit(np.zeros((size, 1, 4, 4), dtype=np.uint8), np.zeros(size, dtype=np.int64))
        batches = list(iterate_batches(split, info, batch, torch.device("cpu"), torch.Generator().manual_seed(0), train=True))
        assert len(batches) == batch_count(split, batch, train=True) == train_batches, (size, batch)
        assert all(len(labels) > 1 for _, labels in batches) or batch == 1
        evaluation = list(iterate_batches(split, info, batch, torch.device("cpu")))
        assert sum(len(labels) for _, labels in evaluation) == size                # evaluation drops nothing


# --- kind 6: the data's own properties drive the defaults -------------------------------------------

def test_small_images_keep_their_size_and_get_small_image_augmentation(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "cat,dog", 4, size=(48, 40))
    write_tree(tmp_path, "val", "cat,dog", 2, size=(48, 40))
    data = load_dataset("imagefolder", tmp_path)
    assert data.info.input_size == 40 and data.info.in_channels == 3                # not 224
    assert data.info.crop_padding == 5 and data.info.horizontal_flip and data.extra["in_memory"]
    assert data.train.images.shape == (8, 3, 40, 40) and data.train.images.dtype == np.uint8
    mean = data.train.images.astype(np.float64).mean(axis=(0, 2, 3)) / 255
    assert np.allclose(data.info.mean, mean)                                        # computed from the data
    assert data.extra["resolved"]["augment"] == "small" and data.extra["resolved"]["input_size"] == 40


def test_grayscale_images_give_one_channel(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "a,b", 2, mode="L")
    write_tree(tmp_path, "val", "a,b", 1, mode="L")
    data = load_dataset("imagefolder", tmp_path)
    assert data.info.in_channels == 1 and data.train.images.shape[1] == 1 and len(data.info.mean) == 1


def test_large_images_get_imagenet_augmentation_read_per_image(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "a,b", 2, size=(120, 100))
    write_tree(tmp_path, "val", "a,b", 1, size=(120, 100))
    data = load_dataset("imagefolder", tmp_path)
    assert data.info.input_size == 100 and data.extra["resolved"]["augment"] == "imagenet"
    assert isinstance(data.train, FolderDataset) and data.info.crop_padding == 0
    images, _ = next(iterate_batches(data.train, data.info, 4, torch.device("cpu"), torch.Generator().manual_seed(0), train=True))
    assert images.shape == (4, 3, 100, 100)
    layout = data.extra["layout"]
    assert layout.resize == round(100 * 256 / 224)                                  # ImageNet-style evaluation resize


def test_options_are_applied_or_refused(tmp_path: Path) -> None:
    write_tree(tmp_path, "train", "a,b", 3)
    write_tree(tmp_path, "val", "a,b", 1)
    data = load_dataset("imagefolder", tmp_path, DataOptions(input_size=24, augment="none", mean="0.5", std="0.25,0.25,0.25"))
    assert data.train.images.shape == (6, 3, 24, 24) and data.info.crop_padding == 0 and not data.info.horizontal_flip
    assert data.info.mean == [0.5, 0.5, 0.5] and data.info.std == [0.25, 0.25, 0.25]
    with pytest.raises(UserError, match="--mean needs 3"):
        load_dataset("imagefolder", tmp_path, DataOptions(mean="0.5,0.5"))
    subset = load_dataset("imagefolder", tmp_path, DataOptions(train_subset=4, test_subset=1))     # applied, not ignored
    assert (len(subset.train), len(subset.test)) == (4, 1)
    with pytest.raises(UserError, match="--train-subset 10 is more than"):
        load_dataset("imagefolder", tmp_path, DataOptions(train_subset=10))


def test_in_memory_datasets_refuse_what_they_cannot_apply(fmnist) -> None:  # noqa: ANN001
    from lapp_edge.data.torch_data import configure

    with pytest.raises(UserError, match="--input-size 32: fashion-mnist images are 28x28"):
        configure(fmnist, DataOptions(input_size=32))
    with pytest.raises(UserError, match="--augment imagenet needs full-size images"):
        configure(fmnist, DataOptions(augment="imagenet"))
    plain = configure(fmnist, DataOptions(input_size=28, augment="none", mean="0.5", std="0.5"))
    assert plain.info.crop_padding == 0 and not plain.info.horizontal_flip and plain.info.mean == [0.5]
    assert fmnist.info.crop_padding == 2 and fmnist.info.mean == [0.2860]            # the shared dataset is untouched


@pytest.mark.parametrize(("width", "height", "size", "resize"), [(48, 40, 40, 40), (40, 48, 32, 32), (300, 200, 224, 256), (64, 64, 64, 73)])
def test_evaluation_preprocessing_matches_torchvision(tmp_path: Path, width: int, height: int, size: int, resize: int) -> None:
    from torchvision import transforms

    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    ours = load_image(path, FolderLayout(size, 3, resize))
    expected = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), transforms.PILToTensor()])(
        Image.open(path).convert("RGB")).numpy()
    assert ours.shape == (3, size, size) and np.array_equal(ours, expected)
