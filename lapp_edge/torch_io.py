"""PyTorch file I/O: atomic torch saves and bounded, `weights_only` checkpoint loading.

Kept apart from `fileio` so that nothing on the deploy side imports torch.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes, check_nesting, open_regular_under

# torch.save stores its records uncompressed, so what torch.load allocates is about the file's
# own size. A record that inflates (a deflated zip member) is how a 2 MB file asks for 2 GiB.
MAX_INFLATION = 1.5              # uncompressed records / bytes on disk, all records together
INFLATION_SLACK = 1 << 20        # plus this much (small files: zip headers, the pickle)
MAX_CHECKPOINT_BYTES = 16 << 30  # no checkpoint of ours comes near this (ResNet-50 + momentum: ~0.4 GB)
MAX_RECORDS = 100_000
MAX_PLAIN_VALUES = 2_000_000     # containers and scalars besides tensors (a pickle-memo bomb is refused)


def atomic_torch_save(path: str | os.PathLike[str], payload: Any) -> None:
    """`torch.save(payload)` into `path` atomically (temporary file, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def check_torch_zip(stream: Any, where: str) -> None:
    """UserError unless the open file `stream` is a torch zip whose records, as declared in its
    central directory (what torch.load allocates by), fit MAX_INFLATION x its size on disk."""
    size = os.fstat(stream.fileno()).st_size
    try:
        with zipfile.ZipFile(stream) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as error:
        raise UserError(f"checkpoint {where} is corrupt or unsafe and was not loaded: not a torch zip file ({str(error)[:100]})") from None
    finally:
        stream.seek(0)
    if len(records) > MAX_RECORDS:
        raise UserError(f"checkpoint {where} holds {len(records)} records; refusing it (at most {MAX_RECORDS})")
    declared = sum(record.file_size for record in records)
    if declared > min(MAX_CHECKPOINT_BYTES, MAX_INFLATION * size + INFLATION_SLACK):
        raise UserError(f"checkpoint {where} would inflate to {declared} bytes from {size} on disk; refusing it (a zip bomb?)")
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED and record.file_size > INFLATION_SLACK:
            raise UserError(f"checkpoint {where}: record {record.filename[:60]!r} is compressed; torch.save never writes that, refusing it")


def safe_torch_load(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Any:
    """Load a checkpoint with weights_only=True: tensors and plain containers only, so a
    file crafted to run code when unpickled is refused instead of executed. The zip's
    declared record sizes are checked against its size on disk before anything is inflated,
    and the plain data around the tensors is bounded (a pickle-memo bomb is refused).

    With `root`, `path` is a file inside that directory, opened without following links.
    Raises UserError when the file is missing, corrupt, too large for its size, or holds
    anything but plain data."""
    where = str(Path(root) / path) if root is not None else str(path)
    try:
        if root is not None:
            handle = open_regular_under(root, str(path), str(root))
        else:
            handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"checkpoint {where} does not exist") from None
    except OSError as error:
        raise UserError(f"checkpoint {where} cannot be read: {error.strerror}") from None
    with os.fdopen(handle, "rb") as stream:
        check_torch_zip(stream, where)
        try:
            payload = torch.load(stream, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"checkpoint {where} is corrupt or unsafe and was not loaded: {first_line[:200]}") from None
    check_nesting(payload, f"checkpoint {where}", budget=MAX_PLAIN_VALUES)
    return payload
