"""Opening one image file of an ImageFolder tree, bounded: the pixel count declared in the
header is checked before anything is decoded (Pillow only warns below 2x its own limit)."""

from __future__ import annotations

import os
import warnings
from typing import Any

from lapp_edge.errors import UserError

# Pillow's own warning threshold (89.5 megapixels, ~270 MB as RGB); real photos are far below.
MAX_IMAGE_PIXELS = 89_478_485


def open_rgb_image(path: str | os.PathLike[str]) -> Any:
    """The image at `path` as an RGB PIL image. UserError (one line naming the file) for a file
    Pillow cannot read or one whose header declares more than MAX_IMAGE_PIXELS pixels."""
    from PIL import Image, UnidentifiedImageError

    bomb = ("refusing to decode it (a decompression bomb?): remove it from the tree, then run again "
            "(--resume continues the run)")
    try:
        with warnings.catch_warnings():   # Pillow's own warning: the size is checked here instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open(path, "rb") as stream, Image.open(stream) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise UserError(f"image {path} declares {width}x{height} pixels (more than {MAX_IMAGE_PIXELS}); {bomb}")
                return image.convert("RGB")
    except Image.DecompressionBombError:
        raise UserError(f"image {path} declares more than {2 * MAX_IMAGE_PIXELS} pixels; {bomb}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"image {path} cannot be read: {first[:200]}: remove or replace it, then run again "
                        "(--resume continues the run)") from None
