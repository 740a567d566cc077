"""Atomic file writes, JSON reading and an output-directory lock (no torch: the deploy side uses it).

Every file the tool writes goes to a temporary file in the same directory, is fsynced and
then renamed over the target (os.replace is atomic on POSIX), so a kill at any moment
leaves either the old file or the new one, never a truncated one. A kill can leave a
temporary `.<name>.<random>.tmp` beside the target; `remove_stale_temporaries` clears them
(a resumed run does so once it holds the directory lock).

Fault injection (tests only; see docs/RELIABILITY.md): with the environment variable
LAPP_EDGE_FAULT_KILL_DURING_WRITE=<file name>[@<n>] the n-th (default: first) atomic write
of a file with that name in this process writes half its bytes to the temporary file,
flushes them and then SIGKILLs its own process, i.e. dies in the middle of the write.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from lapp_edge.errors import UserError


FAULT_KILL_DURING_WRITE = "LAPP_EDGE_FAULT_KILL_DURING_WRITE"
_UMASK = os.umask(0)
os.umask(_UMASK)
_fault_write_counts: dict[str, int] = {}


def _fault_kill_now(name: str) -> bool:
    """True when the fault-injection setting asks to die during this write of `name`."""
    setting = os.environ.get(FAULT_KILL_DURING_WRITE)
    if not setting:
        return False
    wanted, _, nth = setting.partition("@")
    if wanted != name:
        return False
    _fault_write_counts[name] = _fault_write_counts.get(name, 0) + 1
    return _fault_write_counts[name] == (int(nth) if nth.isdigit() else 1)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp makes 0600; written files get the usual mode
        with os.fdopen(handle, "wb") as stream:
            if _fault_kill_now(target.name):
                stream.write(data[: len(data) // 2])
                stream.flush()
                os.fsync(stream.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the `.<name>.<random>.tmp` files a killed atomic write left in `directory`.
    Call only while holding the directory's lock (no live writer is then using them)."""
    removed = []
    for path in Path(directory).glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None


class DirectoryLock:
    """An exclusive lock file in a run directory (O_CREAT | O_EXCL), holding the owner's pid.
    A lock left by a process that no longer exists is taken over."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._owner_alive():
                    raise UserError(f"{self.path.parent} is in use by another run (lock file {self.path})") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as stream:
                stream.write(str(os.getpid()))
            self.held = True
            return
        raise UserError(f"cannot take the lock {self.path}")

    def _owner_alive(self) -> bool:
        try:
            pid = int(self.path.read_text().strip() or "0")
        except (OSError, ValueError):
            return False
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
