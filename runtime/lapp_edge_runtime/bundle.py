"""Reading a bundle: refuse unsafe or tampered archives, then unpack into a private directory.

A bundle is a tar archive (plain or gzip) of regular files only, with `bundle.json` and
every file that `bundle.json` lists under `files` (relative POSIX path -> sha256 hex).
Nothing else may be in it. `open_bundle` checks, before it writes anything:

* every member is a regular file (no symlink, hardlink, device, FIFO or directory);
* every member name is a plain relative path: not absolute, no `..` or `.` part, no
  backslash, no empty part, no duplicate;
* the members are exactly `bundle.json` plus the files it lists, each matching its
  sha256; the total size is below `MAX_BUNDLE_BYTES`;
* `bundle.json` has the fields and types of format `FORMAT` (see docs/SHIP.md).

Any failure is a `RunnerError` (one line). Files are written by this module itself
(never `tarfile.extract*`), so a member can never land outside the directory given.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

FORMAT = 1
KIND = "lapp-edge-bundle"
MANIFEST = "bundle.json"
RUNTIMES = ("onnxruntime", "openvino")
IMAGE_MODES = {1: "L", 3: "RGB"}
MAX_BUNDLE_BYTES = 2 << 30          # 2 GiB unpacked: far above any CNN bundle, well below a decompression bomb
MAX_JSON_BYTES = 1 << 20            # bundle.json and latency JSON: a real one is a few KiB
LATENCY_KIND = "lapp-edge-bundle-latency"


class RunnerError(Exception):
    """A problem with the bundle, an input or the runtime: one line on stderr, exit code 2."""


def one_line(text: object) -> str:
    """The first non-empty line of `text` (runtime errors are often multi-line)."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return type(text).__name__ if not isinstance(text, str) else "unknown error"


def printable(text: str) -> str:
    """`text` with control characters (line breaks included) shown escaped: an error is one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_member_name(name: str) -> None:
    """Refuse a member name that is not a plain relative path inside the bundle."""
    if not name or "\\" in name or "\x00" in name:
        raise RunnerError(f"member {name!r} has an unsafe name")
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise RunnerError(f"member {name!r} is an absolute path (it would escape the bundle directory)")
    parts = name.split("/")
    if ".." in parts:
        raise RunnerError(f"member {name!r} contains '..' (it would escape the bundle directory)")
    if any(part in ("", ".") for part in parts):
        raise RunnerError(f"member {name!r} is not a plain relative path")


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    if member.isdir():
        return "a directory"
    return "a device, FIFO or other special file"


def _require(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise RunnerError(f"{MANIFEST}: {where}{key} is missing")
    value = mapping[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RunnerError(f"{MANIFEST}: {where}{key} has the wrong type ({type(value).__name__})")
    return value


def validate_manifest(manifest: Any) -> None:
    """Raise RunnerError unless `manifest` is a bundle.json of format FORMAT with consistent fields."""
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise RunnerError(f"{MANIFEST} is not a lapp-edge bundle manifest")
    if manifest.get("format") != FORMAT:
        raise RunnerError(f"{MANIFEST} has format {manifest.get('format')!r}; this runner reads format {FORMAT}")
    _require(manifest, "name", str, "")
    target = _require(manifest, "target", dict, "")
    for key in ("name", "backend", "precision"):
        _require(target, key, str, "target.")
    _require(target, "threads", int, "target.")
    batches = _require(target, "batch_sizes", list, "target.")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in batches):
        raise RunnerError(f"{MANIFEST}: target.batch_sizes must be positive integers")
    protocol = _require(target, "latency_protocol", dict, "target.")
    for key in ("warmup_iterations", "min_iterations"):
        _require(protocol, key, int, "target.latency_protocol.")
    for key in ("min_seconds", "max_seconds"):
        _require(protocol, key, (int, float), "target.latency_protocol.")
    runtime = _require(manifest, "runtime", dict, "")
    if _require(runtime, "module", str, "runtime.") not in RUNTIMES:
        raise RunnerError(f"{MANIFEST}: runtime.module must be one of {', '.join(RUNTIMES)}")
    _require(runtime, "model", str, "runtime.")
    _require(runtime, "settings", dict, "runtime.")
    _require(runtime, "inference_precision", str, "runtime.")
    model = _require(manifest, "model", dict, "")
    _require(model, "input_name", str, "model.")
    classes = _require(model, "num_classes", int, "model.")
    pre = _require(manifest, "preprocessing", dict, "")
    shape = _require(pre, "shape", list, "preprocessing.")
    if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in shape):
        raise RunnerError(f"{MANIFEST}: preprocessing.shape must be [C, H, W] of positive integers")
    if shape[0] not in IMAGE_MODES or _require(pre, "image_mode", str, "preprocessing.") != IMAGE_MODES[shape[0]]:
        raise RunnerError(f"{MANIFEST}: preprocessing takes 1 (L) or 3 (RGB) channels with the matching image_mode")
    for key in ("mean", "std"):
        values = _require(pre, key, list, "preprocessing.")
        if len(values) != shape[0] or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise RunnerError(f"{MANIFEST}: preprocessing.{key} must hold one number per channel")
    if any(v <= 0 for v in pre["std"]):
        raise RunnerError(f"{MANIFEST}: preprocessing.std must be positive")
    names = _require(manifest, "class_names", list, "")
    if len(names) != classes or not all(isinstance(n, str) for n in names):
        raise RunnerError(f"{MANIFEST}: class_names must list model.num_classes names")
    samples = _require(manifest, "samples", dict, "")
    for key in ("images", "labels", "expected_outputs"):
        _require(samples, key, str, "samples.")
    tolerance = _require(manifest, "tolerance", dict, "")
    for key in ("rtol", "atol"):
        if _require(tolerance, key, (int, float), "tolerance.") < 0:
            raise RunnerError(f"{MANIFEST}: tolerance.{key} must not be negative")
    files = _require(manifest, "files", dict, "")
    for name, digest in files.items():
        check_member_name(name)
        if name == MANIFEST or not isinstance(digest, str) or len(digest) != 64:
            raise RunnerError(f"{MANIFEST}: files[{name!r}] is not a sha256 of another member")
    referenced = [runtime["model"], runtime.get("weights"), samples["images"], samples["labels"],
                  samples["expected_outputs"], manifest.get("expected_latency")]
    for name in referenced:
        if name is not None and name not in files:
            raise RunnerError(f"{MANIFEST} refers to {name!r}, which its files list does not hold")


@dataclass
class Bundle:
    """An unpacked, verified bundle: `directory` holds every member, `manifest` is bundle.json."""

    archive: Path
    directory: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def runtime(self) -> dict[str, Any]:
        return dict(self.manifest["runtime"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["preprocessing"]["shape"]
        return int(c), int(h), int(w)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    def path(self, member: str) -> Path:
        return self.directory / member

    def samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uint8 images N x C x H x W, int64 labels N, float32 expected outputs N x classes)."""
        spec = self.manifest["samples"]
        try:
            images = np.load(self.path(spec["images"]), allow_pickle=False)
            labels = np.load(self.path(spec["labels"]), allow_pickle=False)
            expected = np.load(self.path(spec["expected_outputs"]), allow_pickle=False)
        except (OSError, ValueError) as error:
            raise RunnerError(f"bundle {self.archive}: cannot read its samples: {one_line(error)}") from None
        count = len(images)
        if (images.dtype != np.uint8 or images.shape[1:] != self.input_shape or labels.shape != (count,)
                or expected.shape != (count, len(self.class_names)) or count == 0):
            raise RunnerError(f"bundle {self.archive}: its samples do not match the input shape and class count")
        return images, labels.astype(np.int64), expected.astype(np.float32)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = archive.extractfile(member)
    if stream is None:
        raise RunnerError(f"member {member.name!r} cannot be read")
    with stream:
        return stream.read()


def open_bundle(path: str | Path, directory: str | Path) -> Bundle:
    """Verify the archive at `path` and unpack it into the existing, empty `directory`.

    Raises RunnerError (one line) for a missing file, a file that is not a tar archive,
    an unsafe member (see the module docstring), a manifest that is not a bundle
    manifest, a missing or extra member, or a member whose sha256 does not match."""
    archive_path = Path(path)
    if not archive_path.exists():
        raise RunnerError(f"bundle {archive_path} does not exist")
    if not archive_path.is_file():
        raise RunnerError(f"bundle {archive_path} is not a file (a bundle is a .tar or .tar.gz archive)")
    try:
        archive = tarfile.open(archive_path, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise RunnerError(f"{archive_path} is not a bundle: not a tar archive ({one_line(error)})") from None
    try:
        with archive:
            members = archive.getmembers()
            seen: set[str] = set()
            total = 0
            for member in members:
                check_member_name(member.name)
                if not member.isreg():
                    raise RunnerError(f"member {member.name!r} is {_member_kind(member)}; bundles hold regular files only")
                if member.name in seen:
                    raise RunnerError(f"member {member.name!r} appears twice")
                seen.add(member.name)
                total += member.size
                if total > MAX_BUNDLE_BYTES:
                    raise RunnerError(f"the bundle unpacks to more than {MAX_BUNDLE_BYTES >> 30} GiB")
            by_name = {member.name: member for member in members}
            if MANIFEST not in by_name:
                raise RunnerError(f"{archive_path} is not a bundle: it has no {MANIFEST}")
            if by_name[MANIFEST].size > MAX_JSON_BYTES:
                raise RunnerError(f"{MANIFEST} is larger than {MAX_JSON_BYTES} bytes")
            try:
                manifest = json.loads(_read_member(archive, by_name[MANIFEST]).decode("utf-8"))
            except RecursionError:
                raise RunnerError(f"{MANIFEST} nests too deep") from None
            except (UnicodeDecodeError, ValueError) as error:
                raise RunnerError(f"{MANIFEST} is not valid JSON: {one_line(error)}") from None
            validate_manifest(manifest)
            files: dict[str, str] = manifest["files"]
            missing = sorted(set(files) - set(by_name))
            if missing:
                raise RunnerError(f"the bundle lacks {missing[0]}, which {MANIFEST} lists")
            extra = sorted(set(by_name) - set(files) - {MANIFEST})
            if extra:
                raise RunnerError(f"member {extra[0]!r} is not listed in {MANIFEST} (not part of the bundle)")
            root = Path(directory)
            for name in sorted(files):
                data = _read_member(archive, by_name[name])
                if sha256_bytes(data) != files[name]:
                    raise RunnerError(f"{name} does not match its sha256 in {MANIFEST} (tampered or corrupt)")
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            (root / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise RunnerError(f"{archive_path} is not a bundle: damaged archive ({one_line(error)})") from None
    except OSError as error:
        raise RunnerError(f"cannot unpack {archive_path}: {one_line(error)}") from None
    return Bundle(archive_path, Path(directory), manifest)
