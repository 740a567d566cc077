"""Image -> network input, from the bundle's preprocessing spec.

    image file --Pillow--> mode L (1 channel) or RGB (3 channels), exactly H x W
      -> uint8 C x H x W -> float32 (pixels / 255 - mean) / std per channel -> N x C x H x W

Nothing is converted or resized: an image in another mode (say RGB or RGBA for a
grayscale model, or 16-bit "I;16") or of another size is refused with one line, because a
silent conversion or resize changes what the network sees and so its answer. Convert or
resize on purpose before calling the runner if that is what you want.

The arithmetic is the training side's (`lapp_edge.calibration.normalize_uint8`), in
float32, so the embedded samples reproduce the build's inputs bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lapp_edge_runtime.bundle import IMAGE_MODES, RunnerError, one_line

MODE_WORDS = {"L": "8-bit grayscale (L)", "RGB": "8-bit RGB"}


def load_image(path: str | Path, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 C x H x W pixels of the image at `path`.

    Raises RunnerError if the file is missing or not an image Pillow can read, or if its
    mode is not the one `shape`'s channel count needs (L for 1, RGB for 3) or its size is
    not W x H."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    mode = IMAGE_MODES[channels]
    file = Path(path)
    if not file.is_file():
        raise RunnerError(f"image {file} does not exist")
    try:
        with Image.open(file) as image:
            if image.mode != mode:
                raise RunnerError(
                    f"image {file} is mode {image.mode}; this bundle takes {MODE_WORDS[mode]} images "
                    f"(no conversion is done: convert it first)")
            if image.size != (width, height):
                raise RunnerError(
                    f"image {file} is {image.size[0]}x{image.size[1]}; this bundle takes {width}x{height} "
                    f"(no resize is done: resize it first)")
            pixels = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise RunnerError(f"image {file} cannot be read as an image: {one_line(error)}") from None
    return pixels[None].copy() if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def normalize(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 N x C x H x W -> float32 N x C x H x W: (pixels / 255 - mean) / std per channel."""
    scale = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    spread = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((images.astype(np.float32) / np.float32(255.0) - scale) / spread).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of N x K logits, in float64 (probabilities sum to 1 per row)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
