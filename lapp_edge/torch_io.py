"""PyTorch file I/O: atomic torch saves and `weights_only` checkpoint loading.

Kept apart from `fileio` so that nothing on the deploy side imports torch.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes


def atomic_torch_save(path: str | os.PathLike[str], payload: Any) -> None:
    """`torch.save(payload)` into `path` atomically (temporary file, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint with weights_only=True: tensors and plain containers only, so a
    file crafted to run code when unpickled is refused instead of executed.

    Raises UserError when the file is missing, corrupt or holds anything but plain data."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"checkpoint {path} is corrupt or unsafe and was not loaded: {first_line[:200]}") from None
