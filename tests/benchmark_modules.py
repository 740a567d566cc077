"""Import a script under benchmarks/ (not a package) as a module, for the tests of its pieces."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(file_name: str, module_name: str) -> ModuleType:
    """benchmarks/`file_name` imported as `module_name` (registered in sys.modules, so its dataclasses
    and pickling work). Raises FileNotFoundError where the script does not exist."""
    path = REPO / "benchmarks" / file_name
    if not path.is_file():
        raise FileNotFoundError(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
