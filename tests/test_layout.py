"""The package layout holds: no import cycle, the deploy side imports no torch, the training
side imports no runtime, and the one-source rules (one compile path, one precision table,
one definition of each training option) hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lapp_edge"
RUNTIMES = ("onnxruntime", "openvino", "nncf", "tensorrt")
TORCH = ("torch", "torchvision")
# Modules that must run on a device without torch (the deploy side, and what it reads with).
DEPLOY_SIDE = ("lapp_edge.deploy", "lapp_edge.resources", "lapp_edge.costs", "lapp_edge.data.readers", "lapp_edge.data.imagefolder",
               "lapp_edge.fileio", "lapp_edge.errors", "lapp_edge.child_processes")
TORCH_BACKENDS = ("lapp_edge.deploy.backends.torch_cuda",)    # its runtime *is* torch (imported when it loads)
TRAINING_SIDE = ("lapp_edge.lapp", "lapp_edge.training", "lapp_edge.models", "lapp_edge.data.torch_data", "lapp_edge.torch_io")
# What the training side may read of the deploy side to shape a network for a target (latency-aware
# LAPP): target profiles and this machine's identity. Neither imports a runtime (checked below).
TRAINING_MAY_READ = ("lapp_edge.deploy.targets", "lapp_edge.deploy.measure")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module `path` imports anywhere: in functions and under `if TYPE_CHECKING:` too (a
    deferred import is still a dependency, and a cycle through it still a cycle)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) for name, path in files.items()}


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycle() -> None:
    imports = graph()
    edges = {name: {m for m in imported if m in imports and m != name} for name, imported in imports.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_deploy_side_imports_no_torch_and_training_side_no_runtime() -> None:
    problems = []
    for name, imported in graph().items():
        if under(name, DEPLOY_SIDE) and not under(name, TORCH_BACKENDS):
            bad = sorted(m for m in imported if under(m, TORCH) or under(m, TRAINING_SIDE) or under(m, ("lapp_edge.export",)))
            problems += [f"{name} imports {m}" for m in bad]
        if under(name, TRAINING_SIDE):
            problems += [f"{name} imports {m}" for m in sorted(imported)
                         if under(m, RUNTIMES) or (under(m, ("lapp_edge.deploy",)) and not under(m, TRAINING_MAY_READ))]
        if under(name, TRAINING_MAY_READ):
            problems += [f"{name} (read by training) imports {m}" for m in sorted(imported) if under(m, RUNTIMES)]
    assert not problems, problems


def grep(pattern: str) -> list[str]:
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                hits.append(f"{path.relative_to(ROOT)}:{number}")
    return hits


def test_one_compile_path_one_precision_table_one_option_source() -> None:
    # Only deploy/compile.py builds a LoadRequest for a profile; the backends check it.
    builders = [hit for hit in grep(r"LoadRequest\(") if "deploy/backends/base.py" not in hit]
    assert all(hit.startswith("lapp_edge/deploy/compile.py") for hit in builders), builders
    # Precisions and int8 routes are declared by each backend class only.
    tables = grep(r"^\s*(precisions|int8_routes)\s*=\s*\(")
    assert all(hit.startswith("lapp_edge/deploy/backends/") for hit in tables), tables
    assert not grep(r"BACKEND_PRECISIONS|INT8_ROUTES\s*=")
    # Training options: flags are generated from TrainConfig; no hand-written --lr / --epochs flag.
    assert not grep(r"add_argument\(\"--(lr|epochs|flops-target|channel-multiple|batch-size)\"")
    # Calls per ratio block come from RatioProtocol, not literals.
    assert not grep(r"25 if batch == 1 else 8")
