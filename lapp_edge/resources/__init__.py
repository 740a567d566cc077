"""Where the shipped data files live, and the one place that looks them up.

Three kinds of file ship inside the package (so they are found from a wheel as from a
checkout): target profiles (`targets/<name>.yaml`), int8 calibration-set definitions
(`calibration-sets/<name>.yaml`) and latency data (`latency/`: whole-network latency fits
and the dense reference models they were measured against). A user's own files are found
first: a path that exists is taken as it is, then `./targets`, `./calibration-sets` and
`./latency-data` in the working directory are searched before the package's folders.
Imports no runtime and no torch.
"""

from __future__ import annotations

from pathlib import Path

from lapp_edge.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
TARGETS_DIR = PACKAGE_DIR / "targets"
CALIBRATION_SETS_DIR = PACKAGE_DIR / "calibration-sets"
LATENCY_DIR = PACKAGE_DIR / "latency"
USER_LATENCY_DIR = Path("latency-data")        # relative to the working directory: where calibrate-latency writes


def _search(name: str, suffix: str, user_dir: str, package_dir: Path) -> Path | None:
    candidate = Path(name)
    if candidate.suffix == suffix and candidate.is_file():
        return candidate
    for directory in (Path.cwd() / user_dir, package_dir):
        path = directory / (name if name.endswith(suffix) else f"{name}{suffix}")
        if path.is_file():
            return path
    return None


def find_profile(name_or_path: str) -> Path:
    """A target profile by path (`my/target.yaml`) or by name (`x86-ort-fp32`).
    Raises UserError naming the known profiles when neither exists."""
    found = _search(name_or_path, ".yaml", "targets", TARGETS_DIR)
    if found is None and Path(name_or_path).is_dir():
        raise UserError(f"target profile {name_or_path} is a directory: give a YAML file or a profile name ({', '.join(profile_names())})")
    if found is None:
        raise UserError(f"target profile {name_or_path} does not exist (a path to a YAML file, or one of: {', '.join(profile_names())})")
    return found


def profile_names() -> list[str]:
    """Names of the profiles shipped with the package."""
    return sorted(path.stem for path in TARGETS_DIR.glob("*.yaml"))


def find_calibration_set(name_or_path: str) -> Path:
    """An int8 calibration-set definition by path or by name; UserError when absent."""
    found = _search(name_or_path, ".yaml", "calibration-sets", CALIBRATION_SETS_DIR)
    if found is None:
        raise UserError(f"calibration set '{name_or_path}' not found (looked for {name_or_path}.yaml in calibration-sets/)")
    return found


def find_latency_file(file_name: str) -> Path | None:
    """A latency data file (fit JSON or reference ONNX) by file name: ./latency-data first,
    then the package's; None when neither holds it."""
    for directory in (Path.cwd() / USER_LATENCY_DIR, LATENCY_DIR):
        if (directory / file_name).is_file():
            return directory / file_name
    return None
