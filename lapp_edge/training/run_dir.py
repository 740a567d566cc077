"""A run directory's state on disk: config, checkpoint, lock and resume, with one writer.

    <out>/config.json      the TrainConfig (written before the first epoch)
    <out>/checkpoint.pt    model, optimizers, LAPP thresholds and RunState, atomically every epoch
    <out>/.lock            held by the one process that writes (see fileio.DirectoryLock)

A run directory is read as a closed tree of regular files: a symbolic link or special file
anywhere in it is refused (`check_entries`) before anything is read, and every file is
opened without following links, so a run copied from elsewhere cannot make a resume or an
export read or hash a file outside it.

Where several processes train together (DistributedDataParallel), only the writer (rank 0)
takes the lock and writes; the others read the same checkpoint to resume. Nothing here
knows about models or training loops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lapp_edge.errors import UserError
from lapp_edge.fileio import (
    DirectoryLock, atomic_write_bytes, check_output_location, atomic_write_json, read_json_under, regular_files_under, remove_stale_temporaries,
)
from lapp_edge.torch_io import atomic_torch_save, safe_torch_load

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
CHECKPOINT_FORMAT = 1
LOCK = ".lock"
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class RunState:
    """Everything a checkpoint restores besides model and optimizer tensors."""

    epoch: int = 0                     # completed epochs
    step: int = 0                      # completed optimizer steps
    phase: str = "dense"               # dense | pruning | slim
    widths: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)   # one EpochRecord dict per completed epoch
    trace_steps: list[int] = field(default_factory=list)
    trace_widths: list[list[int]] = field(default_factory=list)
    freeze: dict[str, Any] | None = None


class RunDirectory:
    """The files of one run. `writer=False` (ranks other than 0) reads but never writes or locks."""

    def __init__(self, path: str | Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def check_usable(self, resume: bool) -> None:
        """A new run needs an empty or absent directory; a resumed one needs its checkpoint or
        config (a run killed before its first checkpoint restarts from epoch 0). UserError otherwise."""
        check_output_location(self.path, "--out", "dir", probe=self.writer)   # a rank that never writes needs no writable directory
        if resume:
            if not self.checkpoint_path.is_file() and not self.config_path.is_file():
                raise UserError(f"nothing to resume: {self.checkpoint_path} does not exist")
            self.check_entries()
            return
        if self.path.is_dir() and any(self.path.iterdir()):
            raise UserError(f"--out {self.path} already holds files; pass --resume to continue that run or choose another --out")

    def check_entries(self) -> list[str]:
        """The regular files of the run (relative names); UserError for a link or special file
        anywhere in it (the lock file is DirectoryLock's to judge)."""
        return regular_files_under(self.path, f"run directory {self.path}", skip=(LOCK,))

    def read_config(self) -> Any:
        """config.json, parsed (bounded, not followed if it is a link)."""
        self.check_entries()
        return read_json_under(self.path, CONFIG, MAX_CONFIG_BYTES)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the directory for the duration (the writer takes the lock and clears stale temporaries)."""
        if not self.writer:
            yield
            return
        with DirectoryLock(self.path):
            remove_stale_temporaries(self.path)  # left by a killed write; we hold the lock, so nobody writes them
            yield

    def write_config(self, config: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.config_path, config)

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        """Write `payload` (plus the format tag) atomically as the run's checkpoint (writer only)."""
        if self.writer:
            atomic_torch_save(self.checkpoint_path, {"format": CHECKPOINT_FORMAT, **payload})

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's payload (weights_only loading). UserError if corrupt or not ours."""
        payload = safe_torch_load(CHECKPOINT, root=self.path)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"checkpoint {self.checkpoint_path} is not a lapp-edge checkpoint")
        return payload

    def write_json(self, name: str, payload: Any) -> None:
        if self.writer:
            atomic_write_json(self.path / name, payload)

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.writer:
            atomic_write_bytes(self.path / name, data)

    def torch_save(self, name: str, payload: Any) -> None:
        if self.writer:
            atomic_torch_save(self.path / name, payload)


def run_state_from(payload: dict[str, Any]) -> RunState:
    """RunState from a checkpoint's `state` dict (TypeError/KeyError on a foreign layout)."""
    return RunState(**payload["state"])


def state_dict_of(state: RunState) -> dict[str, Any]:
    return asdict(state)
