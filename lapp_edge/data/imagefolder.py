"""ImageFolder trees (`train/<class>/<image>`, `val/<class>/<image>`) read without torch: the
scan (classes, labels, what is skipped), the image layout the data itself suggests, and the
decoding of images into uint8 N x C x S x S arrays (an `InMemorySplit`).

Rules, as torchvision users expect them and where torchvision is silent or surprising:
- classes are train/'s sub-directories, sorted; val/ is labelled with *train's* class index
  (torchvision indexes val/ on its own, so a class missing from val/ shifts every later label).
  A val/ class that train/ lacks is refused (the model cannot predict it); a train/ class with no
  val/ images is allowed and said (it is not evaluated).
- hidden entries (names starting with '.': .ipynb_checkpoints, .DS_Store, ._* AppleDouble files)
  and files without an image extension (notes.txt, an editor's img.png~) are skipped, counted and
  named in the decisions; a class directory without any image is refused.
- every image's header is read before training (unreadable or non-image content is refused,
  naming the file); images are fully decoded before training where the tree fits in memory.
- preprocessing, the same for evaluation, bench, verify and calibration: convert to L (all
  images grayscale) or RGB, resize the shorter side to `resize` (PIL bilinear, as
  torchvision's Resize on PIL images), centre crop S x S (torchvision's CenterCrop rounding).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lapp_edge.data.readers import InMemorySplit
from lapp_edge.data.image_files import MAX_IMAGE_PIXELS
from lapp_edge.errors import UserError

AUGMENTATIONS = ("auto", "small", "imagenet", "none")   # TrainConfig --augment (applied in data.torch_data)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# modes whose pixels do not fit 8 bits: PIL's convert to L or RGB clips them to 255 (a 16-bit scan turns
# almost white), so they are refused, as the device runner refuses them
WIDE_MODES = {"I": "32-bit integer", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit",
              "F": "32-bit float"}
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SMALL_IMAGES = 64            # augment auto: small-image augmentation up to this side, ImageNet-style above
LARGEST_AUTO_SIZE = 224      # input size auto: the median shorter side, at most this (ImageNet's)
IMAGENET_RESIZE = 256 / 224  # ImageNet-style evaluation: resize the shorter side to 256/224 x S, crop S
IN_MEMORY_LIMIT = 2 << 30    # bytes of uint8 arrays (train + val) held in memory at most


@dataclass
class FolderSplit:
    root: Path
    paths: list[Path]
    labels: np.ndarray                    # int64, train's class index
    classes_present: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Skipped:
    """What a scan left out, by kind, with a few example names."""

    hidden: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = []
        for kind, names in (("hidden entries", self.hidden), ("files without an image extension", self.not_images)):
            if names:
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                lines.append(f"skipped {len(names)} {kind} ({shown})")
        return lines


@dataclass
class FolderLayout:
    """How a tree's images become the network's input: C x S x S after resizing the shorter side
    to `resize` and a centre crop. Recorded in the run's config and the package's manifest."""

    size: int
    channels: int
    resize: int

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "image_mode": self.mode}


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(directory: Path, skipped: Skipped, root: Path) -> list[Path]:
    """Image files under `directory` (recursively, sorted), skipping hidden entries and non-images."""
    found = []
    for current, dirs, files in os.walk(directory):
        for name in sorted(dirs):
            if _hidden(name):
                skipped.hidden.append(str((Path(current) / name).relative_to(root)) + "/")
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(files):
            relative = str((Path(current) / name).relative_to(root))
            if _hidden(name):
                skipped.hidden.append(relative)
            elif not _is_image(name):
                skipped.not_images.append(relative)
            else:
                found.append(Path(current) / name)
    return found


def scan_split(root: Path, classes: list[str] | None = None, skipped: Skipped | None = None) -> tuple[FolderSplit, list[str]]:
    """The images of one split directory and its classes. With `classes` (train's), its class
    directories are labelled with that index and one it lacks is refused; without, the split's own
    sorted class directories are the classes (train). UserError for an empty or unusable tree."""
    skipped = skipped if skipped is not None else Skipped()
    if not root.is_dir():
        raise UserError(f"ImageFolder layout needs {root}/<class>/<image> directories")
    class_dirs: dict[str, list[Path]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        relative = str(Path(entry.path).relative_to(root.parent))
        if _hidden(entry.name):
            skipped.hidden.append(relative + ("/" if entry.is_dir() else ""))
        elif entry.is_dir():
            class_dirs[entry.name] = _images_under(Path(entry.path), skipped, root.parent)
        else:
            skipped.not_images.append(relative)      # a stray file beside the class directories
    split_name = root.name
    if not class_dirs:
        raise UserError(f"{root} holds no class directories ({split_name}/<class>/<image>)")
    empty = [name for name, files in class_dirs.items() if not files]
    if classes is None:
        if empty:
            raise UserError(f"{split_name}/ class director{'y' if len(empty) == 1 else 'ies'} {', '.join(empty[:5])} "
                            f"hold{'s' if len(empty) == 1 else ''} no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "add images or remove the directory")
        classes = sorted(class_dirs)
        if len(classes) < 2:
            raise UserError(f"{split_name}/ holds one class directory ({classes[0]}): a classifier needs at least two "
                            f"classes ({split_name}/<class>/<image>)")
    else:
        unknown = sorted(set(class_dirs) - set(classes))
        if unknown:
            raise UserError(f"{split_name}/ has class director{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown[:5])} that "
                            f"train/ does not have (train classes: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}): "
                            "the model cannot predict them; rename or remove them")
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in sorted(class_dirs, key=lambda n: index[n]):
        paths += class_dirs[name]
        labels += [index[name]] * len(class_dirs[name])
    if not paths:
        raise UserError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    present = [name for name in classes if class_dirs.get(name)]
    return FolderSplit(root, paths, np.asarray(labels, dtype=np.int64), present), classes


@dataclass
class FolderTree:
    directory: Path
    classes: list[str]
    train: FolderSplit
    val: FolderSplit
    skipped: Skipped

    @property
    def missing_in_val(self) -> list[str]:
        return [name for name in self.classes if name not in self.val.classes_present]


def scan_tree(directory: Path) -> FolderTree:
    """Scan train/ and val/ of an ImageFolder tree (val/ labelled with train's class index)."""
    for split in ("train", "val"):
        if not (directory / split).is_dir():
            raise UserError(f"ImageFolder layout needs {directory / split}/<class>/<image> directories")
    skipped = Skipped()
    train, classes = scan_split(directory / "train", None, skipped)
    val, _ = scan_split(directory / "val", classes, skipped)
    return FolderTree(directory, classes, train, val, skipped)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as error:
        raise UserError(f"reading ImageFolder images needs Pillow, which cannot be imported here ({error})") from None
    return Image


def image_header(path: Path) -> tuple[int, int, str]:
    """(width, height, mode) of an image, reading its header only. UserError naming the file otherwise."""
    Image = _pil()
    try:
        with Image.open(path) as image:
            width, height, mode = int(image.width), int(image.height), str(image.mode)
    except Exception as error:  # noqa: BLE001 - any failure to read an image is bad input, named
        raise UserError(f"cannot read image {path}: {str(error).splitlines()[0][:200] if str(error) else type(error).__name__}") from None
    check_pixels(path, width, height)
    check_depth(path, mode)
    return width, height, mode


def check_depth(path: Path, mode: str) -> None:
    """UserError for an image whose pixels do not fit 8 bits (WIDE_MODES), for training and evaluation alike."""
    if mode in WIDE_MODES:
        raise UserError(f"image {path} has {WIDE_MODES[mode]} pixels (mode {mode}); lapp-edge reads 8-bit images (1, L, LA, P, "
                        "RGB, RGBA, CMYK, YCbCr) and would clip these to 255: convert the tree to 8 bits first, scaling as the "
                        "data needs (for 16-bit, value // 256)")


def check_pixels(path: Path, width: int, height: int) -> None:
    """UserError for an image whose header declares more than MAX_IMAGE_PIXELS pixels (a
    decompression bomb), before anything is decoded."""
    if width * height > MAX_IMAGE_PIXELS:
        raise UserError(f"image {path} declares {width}x{height} pixels (more than {MAX_IMAGE_PIXELS}); refusing to decode it "
                        "(a decompression bomb?): remove it from the tree, then run again")


def decide_layout(headers: list[tuple[int, int, str]], input_size: int, augment: str) -> FolderLayout:
    """The layout the images suggest: 1 channel if every image is grayscale, else 3; side S =
    `input_size`, or (0) the median shorter side of the images, at most 224; the shorter side is
    resized to S before the centre crop, or to 256/224 x S for ImageNet-style augmentation."""
    channels = 1 if all(mode in GRAY_MODES for _, _, mode in headers) else 3
    size = input_size or min(LARGEST_AUTO_SIZE, int(statistics.median(min(w, h) for w, h, _ in headers)))
    return FolderLayout(size, channels, eval_resize(size, augment))


def eval_resize(size: int, augment: str) -> int:
    """The shorter side images are resized to before the centre crop of `size`."""
    return int(round(size * IMAGENET_RESIZE)) if augment == "imagenet" else size


def resolve_augment(augment: str, size: int) -> str:
    """auto -> small for images up to SMALL_IMAGES pixels, imagenet above."""
    if augment != "auto":
        return augment
    return "small" if size <= SMALL_IMAGES else "imagenet"


def open_converted(path: Path, mode: str) -> Any:
    """The image at `path`, fully decoded and converted to `mode`. UserError naming the file on a
    truncated or corrupt image."""
    Image = _pil()
    try:
        with Image.open(path) as image:
            check_pixels(path, int(image.width), int(image.height))
            check_depth(path, str(image.mode))
            image.load()
            converted = image.convert(mode) if image.mode != mode else image.copy()
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoding failure is bad input, named
        first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"cannot decode image {path}: {first}") from None
    return converted


def resize_and_crop(image: Any, layout: FolderLayout) -> np.ndarray:
    """Resize the shorter side to layout.resize (bilinear), centre crop S x S -> uint8 C x S x S."""
    Image = _pil()
    width, height = image.size
    if min(width, height) != layout.resize:          # torchvision's Resize(int) arithmetic
        new = (layout.resize, int(layout.resize * height / width)) if width <= height else \
              (int(layout.resize * width / height), layout.resize)
        image = image.resize(new, Image.BILINEAR)
        width, height = image.size
    top, left = int(round((height - layout.size) / 2.0)), int(round((width - layout.size) / 2.0))
    image = image.crop((left, top, left + layout.size, top + layout.size))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def load_image(path: Path, layout: FolderLayout) -> np.ndarray:
    """One image as the network's uint8 C x S x S input (evaluation preprocessing)."""
    return resize_and_crop(open_converted(path, layout.mode), layout)


def decode_split(split: FolderSplit, layout: FolderLayout, count: int | None = None) -> InMemorySplit:
    """The first `count` (all) images of a split decoded into memory."""
    paths = split.paths if count is None else split.paths[:count]
    images = np.empty((len(paths), layout.channels, layout.size, layout.size), dtype=np.uint8)
    for index, path in enumerate(paths):
        images[index] = load_image(path, layout)
    return InMemorySplit(images, split.labels[: len(paths)].copy())


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 N x C x H x W images, as pixels / 255."""
    pixels = images.astype(np.float64) / 255.0
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3))
    return [float(v) for v in mean], [float(v) for v in std]


def layout_from_manifest(manifest: dict[str, Any]) -> FolderLayout:
    """The layout a package's images need (manifest `data`; packages before it: the input shape, no extra resize)."""
    channels, size, _ = manifest["input"]["shape"]
    data = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
    resize = data.get("resize_shorter_side") if isinstance(data, dict) else None
    return FolderLayout(int(size), int(channels), int(resize) if isinstance(resize, int) and resize > 0 else int(size))


def load_eval_split(directory: Path, classes: list[str], layout: FolderLayout, count: int | None = None) -> InMemorySplit:
    """val/ of a tree, labelled with `classes` (a package's class names), decoded with `layout`."""
    split, _ = scan_split(directory / "val", list(classes))
    return decode_split(split, layout, count)
