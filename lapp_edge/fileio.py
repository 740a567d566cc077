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

import errno
import json
import os
import signal
import stat
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


def missing_text(path: str | os.PathLike[str], kind: str = "dir") -> str:
    """Why `path` is not the `kind` ("dir" or "file") a command wanted, as the end of a sentence:
    "does not exist", "is a file, not a directory" or "is a directory, not a file"."""
    target = Path(path)
    if target.is_symlink() and not target.exists():
        return f"is a symbolic link to {os.readlink(target)}, which does not exist"
    if not os.path.lexists(target):
        return "does not exist"
    if kind == "dir":
        return "is a file, not a directory" if not target.is_dir() else "is a directory"
    return "is a directory, not a file" if target.is_dir() else "is not a regular file"


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (`.` for a relative path with none)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def check_output_location(path: str | os.PathLike[str], where: str, kind: str = "dir", staged_beside: bool = False,
                          probe: bool = True) -> None:
    """Check, before any work, that an output `path` can be written: a directory (`kind` "dir":
    absent, or an existing directory) or a file (`kind` "file": absent, or an existing file). The
    directory the writes go to must be one this process can create files in, which is tried (a probe
    file made and removed; `os.access` says yes for root even on read-only mounts and /proc): the
    output directory's nearest existing ancestor (itself when it exists), or, with `staged_beside`
    (a directory built beside its place and renamed onto it, as export does), its parent's. `probe`
    False checks the kinds only (a process that reads the output but never writes it).

    `where` names the option in the message ("--out"). Raises UserError (one line) otherwise: an
    output refused only after hours of training, or a traceback from the final rename, is what
    this prevents."""
    target = Path(path)
    if str(path) == "":
        raise UserError(f"{where} is empty: give a {'directory' if kind == 'dir' else 'file'} name")
    if kind == "dir" and target.exists() and not target.is_dir():
        raise UserError(f"{where} {target} exists and is not a directory")
    if kind == "file" and target.is_dir():
        raise UserError(f"{where} {target} is a directory: give a file name (for example {target / 'report.json'})")
    existing = _nearest_existing(target if kind == "dir" and not staged_beside else target.parent)
    if existing.is_symlink() and not existing.exists():
        raise UserError(f"{where} {target} cannot be made: {existing} {missing_text(existing)}")
    if not existing.is_dir():
        raise UserError(f"{where} {target} cannot be made: {existing} is a file, not a directory")
    if not probe:
        return
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".lapp-edge-probe-", suffix=".tmp")
    except OSError as error:
        raise UserError(f"{where} {target} cannot be written: cannot create files in {existing} "
                        f"({error.strerror or error})") from None
    os.close(handle)
    os.unlink(probe)


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


# Size limits for the small structured files the tool reads (manifests, specs, configs,
# profiles, latency fits): far above any real one, far below what would hurt. Real sizes:
# manifest ~10 KiB, latency fit ~100 KiB, target profile < 1 KiB.
MAX_JSON_BYTES = 16 << 20
MAX_YAML_BYTES = 256 << 10
MAX_NESTING = 64                 # JSON/YAML nesting depth; ours is at most 5
MAX_TREE_ENTRIES = 10_000        # entries a package or run directory may hold


def check_relative_name(name: object, where: str) -> tuple[str, ...]:
    """The parts of `name` if it is a plain relative POSIX path (no absolute path, no `..`,
    `.` or empty part, no backslash or control character); UserError naming `where` otherwise.
    Decided on the text alone, so the answer never depends on what exists outside."""
    if not isinstance(name, str) or not name or len(name) > 255 or "\\" in name or not name.isprintable():
        raise UserError(f"{where}: {shown(name)} is not a plain relative path inside the directory")
    parts = tuple(name.split("/"))
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise UserError(f"{where}: {shown(name)} is not a plain relative path inside the directory")
    return parts


def shown(value: object, limit: int = 60) -> str:
    """A short, one-line repr of an untrusted value for an error message."""
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
    elif isinstance(value, (int, float, bool, type(None))):
        try:
            text = str(value)
        except ValueError:               # an int too long to print
            text = "a very long integer"
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def open_regular_under(root: str | os.PathLike[str], relative: str, where: str) -> int:
    """A read-only descriptor of the regular file `root/relative`, resolved one component at a
    time without following any link below `root` (UserError for a link, a special file, a
    directory, a name outside `root` or a missing file). `root` itself may be a link: the user named it."""
    parts = check_relative_name(relative, where)
    directory_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        parent = os.open(root, directory_flags)
    except OSError as error:
        raise UserError(f"{where}: cannot open {root}: {error.strerror}") from None
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, directory_flags | os.O_NOFOLLOW, dir_fd=parent)
            except FileNotFoundError:
                raise UserError(f"{where}: {relative} is missing") from None
            except OSError:
                raise UserError(f"{where}: {relative} is not a regular file inside the directory (a link or special file on its way)") from None
            os.close(parent)
            parent = child
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below
            handle = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            raise UserError(f"{where}: {relative} is missing") from None
        except OSError as error:
            kind = "a symbolic link" if error.errno == errno.ELOOP else f"not readable ({error.strerror})"
            raise UserError(f"{where}: {relative} is {kind}; only regular files inside the directory are read") from None
    finally:
        os.close(parent)
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode):
        os.close(handle)
        raise UserError(f"{where}: {relative} is not a regular file; only regular files inside the directory are read")
    os.set_blocking(handle, True)
    return handle


def read_bounded(handle: int, limit: int, where: str) -> bytes:
    """All bytes of the open file `handle` (closed afterwards) if there are at most `limit`."""
    with os.fdopen(handle, "rb") as stream:
        if os.fstat(stream.fileno()).st_size > limit:
            raise UserError(f"{where} is larger than {limit} bytes; refusing to read it")
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{where} is larger than {limit} bytes; refusing to read it")
    return data


def read_file_bytes(path: str | os.PathLike[str], limit: int, where: str | None = None) -> bytes:
    """The bytes of a file the user named (links followed), refused above `limit` bytes."""
    label = where or str(path)
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"{label} does not exist") from None
    except OSError as error:
        raise UserError(f"cannot read {label}: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise UserError(f"{label} is not a regular file")
    os.set_blocking(handle, True)
    return read_bounded(handle, limit, label)


def check_nesting(value: Any, where: str, limit: int = MAX_NESTING, budget: int = 2_000_000) -> None:
    """UserError when `value` (parsed JSON/YAML, or unpickled plain data) nests deeper than
    `limit` or expands to more than `budget` items. Iterative, and it counts shared
    references each time they are reached, so a memo or alias bomb is refused, not expanded."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > budget:
            raise UserError(f"{where} holds more than {budget} values; refusing it")
        if isinstance(item, (dict, list, tuple)):
            if depth >= limit:
                raise UserError(f"{where} nests deeper than {limit} levels; refusing it")
            children = item.values() if isinstance(item, dict) else item
            if isinstance(item, dict):
                seen += len(item)
            stack.extend((child, depth + 1) for child in children)


def parse_json(data: bytes, where: str) -> Any:
    try:
        payload = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise UserError(f"{where} nests deeper than {MAX_NESTING} levels; refusing it") from None
    except (UnicodeDecodeError, ValueError) as error:   # ValueError: JSONDecodeError, or an integer of > 4300 digits
        raise UserError(f"{where} is not valid JSON: {str(error)[:200]}") from None
    check_nesting(payload, where)
    return payload


def read_json(path: str | os.PathLike[str], limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file the user named, at most `limit` bytes and MAX_NESTING deep (UserError otherwise)."""
    return parse_json(read_file_bytes(path, limit), str(path))


def read_json_under(root: str | os.PathLike[str], relative: str, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file inside a package or run directory, opened without following links (see open_regular_under)."""
    where = str(Path(root) / relative)
    return parse_json(read_bounded(open_regular_under(root, relative, str(root)), limit, where), where)


def read_yaml(path: str | os.PathLike[str], limit: int = MAX_YAML_BYTES) -> Any:
    """A YAML file the user named (a target profile, a calibration-set definition): at most
    `limit` bytes, plain YAML only (no anchors, aliases or tags beyond the safe ones), at most
    MAX_NESTING deep. UserError, one line naming the file, otherwise."""
    import yaml

    where = str(path)
    data = read_file_bytes(path, limit, where)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"cannot read {where}: {error}") from None
    try:
        loader = _plain_yaml_loader()(text)
        try:
            payload = loader.get_single_data()
        finally:
            loader.dispose()
    except RecursionError:
        raise UserError(f"{where} nests deeper than {MAX_NESTING} levels; refusing it") from None
    except (yaml.YAMLError, ValueError) as error:     # ValueError: e.g. an integer of > 4300 digits
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{where} is not valid YAML: {first[:200]}") from None
    check_nesting(payload, where)
    return payload


_PLAIN_LOADER: Any = None


def _plain_yaml_loader() -> Any:
    """yaml.SafeLoader that refuses anchors and aliases (so a few hundred bytes cannot stand for
    billions of nodes) before any node is built."""
    global _PLAIN_LOADER
    if _PLAIN_LOADER is None:
        import yaml

        class PlainSafeLoader(yaml.SafeLoader):
            def compose_node(self, parent: Any, index: Any) -> Any:
                event = self.peek_event()
                if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                    raise yaml.YAMLError(f"anchors and aliases are not allowed (line {event.start_mark.line + 1})")
                return super().compose_node(parent, index)

        _PLAIN_LOADER = PlainSafeLoader
    return _PLAIN_LOADER


def regular_files_under(root: str | os.PathLike[str], where: str, skip: tuple[str, ...] = ()) -> list[str]:
    """The relative POSIX names of every regular file under `root` (subdirectories walked
    without following links). UserError, one line, for a symbolic link, a special file, or
    more than MAX_TREE_ENTRIES entries; names in `skip` (top level only) are left out."""
    found: list[str] = []
    pending = [("", Path(root))]
    entries = 0
    while pending:
        prefix, directory = pending.pop()
        try:
            listing = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            raise UserError(f"{where}: cannot list {directory}: {error.strerror}") from None
        for entry in listing:
            entries += 1
            if entries > MAX_TREE_ENTRIES:
                raise UserError(f"{where} holds more than {MAX_TREE_ENTRIES} entries; refusing it")
            name = f"{prefix}{entry.name}"
            if not prefix and entry.name in skip:
                continue
            if entry.is_symlink():
                raise UserError(f"{where}: {shown(name)} is a symbolic link; only regular files are allowed inside")
            if entry.is_dir(follow_symlinks=False):
                pending.append((f"{name}/", Path(entry.path)))
            elif entry.is_file(follow_symlinks=False):
                found.append(name)
            else:
                raise UserError(f"{where}: {shown(name)} is a special file (device, FIFO or socket); only regular files are allowed inside")
    return sorted(found)


class DirectoryLock:
    """The one-writer lock of a run directory: `fcntl.flock(LOCK_EX | LOCK_NB)` on `<dir>/.lock`.

    Why flock and not a pid in the file: the kernel drops the lock when the holder's last
    descriptor closes, i.e. when the process exits however it dies (SIGKILL, OOM kill), so a
    lock is held exactly while its run is alive. A pid file has to guess: a reused pid, a
    zombie or a pid from another machine or container makes a dead run look alive, and a
    garbage file makes a live run look dead. The holder writes its pid into the file, for
    the message only; the file's content never decides anything. `.lock` is opened without
    following links; a `.lock` that is a link, a directory or another special file is
    refused with what to do. The file is removed on release; after a crash it stays, holds no
    lock and is simply reused.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / ".lock"
        self.held = False
        self._handle: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                handle = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            except OSError as error:
                raise UserError(self._unusable(error)) from None
            if not stat.S_ISREG(os.fstat(handle).st_mode):
                os.close(handle)
                raise UserError(f"{self.path} is not a lock file (a special file): remove it and run again")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(handle)
                os.close(handle)
                raise UserError(
                    f"{self.path.parent} is in use by another run{owner}: wait for it to finish or stop it; "
                    f"the lock frees itself when that process exits (do not delete {self.path.name} while it runs)") from None
            # The file we locked must still be the one at the path (a releasing holder unlinks it).
            try:
                same = os.path.samestat(os.fstat(handle), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(handle)
                continue
            os.ftruncate(handle, 0)
            os.write(handle, str(os.getpid()).encode())
            self._handle = handle
            self.held = True
            return
        raise UserError(f"cannot take the lock {self.path}: it keeps being replaced; is another process removing it?")

    def _unusable(self, error: OSError) -> str:
        if error.errno == errno.ELOOP:
            return f"{self.path} is a symbolic link, not a lock file: remove it (rm {self.path}) and run again"
        if error.errno == errno.EISDIR or self.path.is_dir():
            return f"{self.path} is a directory, not a lock file: remove it (rmdir {self.path}) and run again"
        return f"cannot open the lock {self.path}: {error.strerror}"

    @staticmethod
    def _owner(handle: int) -> str:
        """' (pid N)' from the lock file's content, for the message only."""
        try:
            text = os.pread(handle, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return ""
        return f" (pid {text})" if text.isdigit() and len(text) <= 10 else ""

    def release(self) -> None:
        if self.held and self._handle is not None:
            try:
                self.path.unlink(missing_ok=True)   # while still locked: a waiter re-checks the inode
            finally:
                os.close(self._handle)
                self._handle = None
                self.held = False

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
