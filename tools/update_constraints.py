"""Write constraints.txt: the exact versions installed in this venv of every distribution
lapp-edge needs (its dependencies, the dev and openvino extras, and all they require in
turn), as `pip freeze` reports them, nothing else from the venv.

    .venv/bin/python tools/update_constraints.py          # rewrite constraints.txt
    .venv/bin/python tools/update_constraints.py --check  # exit 1 if it is out of date

`make setup` installs with `pip install -c constraints.txt`, so every fresh venv gets these
versions. To move to newer versions: upgrade in the venv (pip install -U ...), run the
tests, then run this script and commit constraints.txt with the test result.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "constraints.txt"
EXTRAS = ("dev", "openvino")
HEADER = ("# Exact versions of everything lapp-edge needs (deps + extras dev, openvino, and their requirements),\n"
          "# taken from a venv where `make test` passed. Used by `make setup` (pip install -c constraints.txt).\n"
          "# Update: see tools/update_constraints.py.\n")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str], extras: tuple[str, ...]) -> list[str]:
    """Names of the requirements that apply here (markers evaluated, with the given extras)."""
    from packaging.requirements import Requirement

    names = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in ("", *extras)):
            names.append(canonical(requirement.name))
    return names


def closure() -> dict[str, str]:
    """{canonical name: installed version} of lapp-edge's requirements, transitively."""
    try:
        import tomllib
    except ModuleNotFoundError:     # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = list(project["dependencies"])
    for extra in EXTRAS:
        pending += project["optional-dependencies"][extra]
    todo = requirement_names(pending, ())
    found: dict[str, str] = {}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue        # a requirement for another platform / python (markers said so) or optional
        found[name] = distribution.version
        todo += requirement_names(distribution.requires or [], tuple(distribution.metadata.get_all("Provides-Extra") or ()))
    return found


def frozen(names: dict[str, str]) -> list[str]:
    """`pip freeze` lines for those names (pip's own spelling and version)."""
    lines = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    kept = [line for line in lines if "==" in line and canonical(line.split("==")[0]) in names]
    return sorted(kept, key=lambda line: canonical(line.split("==")[0]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if constraints.txt differs from this venv")
    args = parser.parse_args()
    text = HEADER + "\n".join(frozen(closure())) + "\n"
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        print("constraints.txt is up to date" if same else "constraints.txt differs from this venv")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count(chr(10)) - HEADER.count(chr(10))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
