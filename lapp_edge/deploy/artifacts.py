"""Derived artifacts (quantized models, optimized-graph dumps) kept in a scratch directory
(`bench --work-dir DIR`), which is not trusted: someone else may have planted files or
links in it, or copied it from elsewhere.

- The work directory must be a directory, not a symbolic link (it is created 0700 if absent).
- Nothing is written through a name that already exists in it: every file is created under
  a fresh name (mkstemp, O_EXCL) and renamed into place, and a rename replaces a planted link
  itself, never the file it points to.
- An artifact is reused only if its sidecar `<name>.sha256.json` (a regular file, read without
  following links) records the content key it was made from and the sha256 of each of its
  files, authenticated by an HMAC-SHA256 under this user's key (`artifact_key_file()`, 0600),
  and every file still has that sha256. Anyone can compute the content key (sha256 of the
  model and the calibration images) and the hash of a file they plant; without the user's
  key they cannot write a sidecar that passes, so a planted artifact is rebuilt, not run.
- The checked bytes are copied into a private directory (0700, made by this process) and
  the runtime loads that copy, so what was checked is what runs. New artifacts are built in
  such a private directory too and published to the work directory afterwards.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from lapp_edge.errors import UserError
from lapp_edge.fileio import atomic_write_bytes, open_regular_under, parse_json, read_bounded

SIDECAR_SUFFIX = ".sha256.json"
SIDECAR_FORMAT = 1
MAX_SIDECAR_BYTES = 64 << 10
MAX_ARTIFACT_BYTES = 2 << 30
KEY_BYTES = 32

_private_root: Path | None = None
_process_key: bytes | None = None


def work_directory(path: str | os.PathLike[str]) -> Path:
    """`path` as a usable work directory: created (0700) if absent; UserError if it is a
    symbolic link or not a directory."""
    directory = Path(path)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass
    except OSError as error:
        raise UserError(f"cannot use the work directory {directory}: {error.strerror}") from None
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        raise UserError(f"the work directory {directory} is a symbolic link; pass the directory it points to, "
                        f"if you trust it, or another one")
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"the work directory {directory} is not a directory")
    return directory


def private_directory() -> Path:
    """A fresh directory only this process writes to (0700, removed when the process exits)."""
    global _private_root
    if _private_root is None or not _private_root.is_dir():
        _private_root = Path(tempfile.mkdtemp(prefix="lapp-edge-private-"))
        atexit.register(shutil.rmtree, _private_root, True)
    return Path(tempfile.mkdtemp(dir=_private_root))


def artifact_key_file() -> Path:
    """Where this user's artifact key lives: $LAPP_EDGE_KEY_FILE, else
    $XDG_CACHE_HOME/lapp-edge/artifact.key (~/.cache/lapp-edge/artifact.key)."""
    explicit = os.environ.get("LAPP_EDGE_KEY_FILE")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "lapp-edge" / "artifact.key"


def _user_key() -> bytes:
    """This user's secret for sidecar HMACs, created on first use (O_EXCL, 0600). A key file
    that is a link, not ours, readable by others or of the wrong size is not used; then a
    key for this process only is (artifacts are still checked, just not reused across runs)."""
    global _process_key
    path = artifact_key_file()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(handle, "wb") as stream:
                stream.write(secrets.token_bytes(KEY_BYTES))
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(handle, "rb") as stream:
            info = os.fstat(stream.fileno())
            key = stream.read(KEY_BYTES + 1)
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077 and len(key) == KEY_BYTES:
            return key
    except OSError:
        pass
    if _process_key is None:
        _process_key = secrets.token_bytes(KEY_BYTES)
    return _process_key


def _mac(key: str, files: dict[str, str]) -> str:
    message = json.dumps({"format": SIDECAR_FORMAT, "key": key, "files": files}, sort_keys=True).encode()
    return hmac.new(_user_key(), message, hashlib.sha256).hexdigest()


def sidecar_name(name: str) -> str:
    return f"{name}{SIDECAR_SUFFIX}"


def fetch(work_dir: Path, name: str, key: str, members: tuple[str, ...]) -> dict[str, Path] | None:
    """The artifact `name` made from content `key` (files `members` in `work_dir`) as private,
    checked copies, or None when it is absent or anything about it does not check out (then the
    caller builds it afresh)."""
    try:
        sidecar = parse_json(read_bounded(open_regular_under(work_dir, sidecar_name(name), str(work_dir)), MAX_SIDECAR_BYTES,
                                          sidecar_name(name)), sidecar_name(name))
    except UserError:
        return None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT or sidecar.get("key") != key:
        return None
    files = sidecar.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(members) or not all(isinstance(v, str) for v in files.values()):
        return None
    mac = sidecar.get("mac")
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, files)):
        return None
    private = private_directory()
    copies = {}
    for member in members:
        try:
            data = read_bounded(open_regular_under(work_dir, member, str(work_dir)), MAX_ARTIFACT_BYTES, member)
        except UserError:
            return None
        if hashlib.sha256(data).hexdigest() != files[member]:
            return None
        (private / member).write_bytes(data)
        copies[member] = private / member
    return copies


def publish(work_dir: Path, name: str, key: str, built: dict[str, Path]) -> None:
    """Copy the files of a freshly built artifact (in a private directory) into `work_dir`
    atomically, then its authenticated sidecar (written last: an artifact without one is never reused)."""
    files = {}
    for member, path in sorted(built.items()):
        data = path.read_bytes()
        atomic_write_bytes(work_dir / member, data)
        files[member] = hashlib.sha256(data).hexdigest()
    payload: dict[str, Any] = {"format": SIDECAR_FORMAT, "key": key, "files": files, "mac": _mac(key, files)}
    atomic_write_bytes(work_dir / sidecar_name(name), (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
