"""Issue 15, kinds 2 and 4 for the deploy side's small structured files: target profiles and
calibration sets (YAML) are read bounded and without anchors/aliases, so an alias bomb is
refused before any node is built; JSON files (manifest, latency fit) are bounded in size and
nesting; every manifest field a reader relies on is checked (one line naming file and field)."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from lapp_edge import fileio
from lapp_edge.cli import main
from lapp_edge.costs.latency_fit import load_fit
from lapp_edge.deploy.calibration_set import load_definition
from lapp_edge.deploy.package import load_package
from lapp_edge.deploy.targets import load_target
from lapp_edge.errors import UserError
from lapp_edge.resources import CALIBRATION_SETS_DIR, TARGETS_DIR
from tests.tiny_package import MANIFEST, write_tiny_package

MB = 1 << 20
VALID_PROFILE = yaml.safe_load((TARGETS_DIR / "x86-ort-fp32.yaml").read_text())


def alias_bomb(levels: int, field: str = "name") -> str:
    """The 04 reproducer's profile: `field` is LEVELS nested lists of 9 aliases (9**LEVELS leaves)."""
    lines = ["description:", "  - &l0 [" + ",".join(['"xxxxxxxx"'] * 9) + "]"]
    lines += [f"  - &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    body = {"name": "bomb", "backend": "onnxruntime-cpu", "precision": "fp32", "threads": "1", "batch_sizes": "[1]",
            "input_size": "[1, 28, 28]"}
    body[field] = f"*l{levels - 1}"
    return "\n".join(lines + [f"{key}: {value}" for key, value in body.items()]) + "\n"


@pytest.mark.parametrize("field", ["name", "backend", "batch_sizes", "description"])
def test_yaml_alias_bomb_is_refused_before_expansion(field: str, tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(7, field))        # 9**7 leaves; the 04 reproducer's 9 levels are refused alike
    assert path.stat().st_size < 1000
    tracemalloc.start()
    began = time.monotonic()
    with pytest.raises(UserError, match="anchors and aliases are not allowed"):
        load_target(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.monotonic() - began < 2 and peak < 8 * MB, peak


def test_any_anchor_or_merge_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "anchored.yaml"
    path.write_text(yaml.safe_dump(VALID_PROFILE).replace("name:", "name: &n", 1))
    with pytest.raises(UserError, match="anchors and aliases"):
        load_target(path)
    path.write_text("base: &b {threads: 1}\nprofile:\n  <<: *b\n")
    with pytest.raises(UserError, match="anchors and aliases"):
        load_target(path)


def test_calibration_set_alias_bomb_is_refused(tmp_path: Path) -> None:
    definition = tmp_path / "set.yaml"
    payload = yaml.safe_load((CALIBRATION_SETS_DIR / "fashion-mnist-train-512.yaml").read_text())
    text = yaml.safe_dump({k: v for k, v in payload.items() if k != "dataset"})
    definition.write_text("x: &a [" + ",".join(['"yyyyyyyy"'] * 9) + "]\n" + "dataset: [" + ",".join(["*a"] * 9) + "]\n" + text)
    with pytest.raises(UserError, match="anchors and aliases"):
        load_definition(str(definition))


def test_oversized_and_deeply_nested_yaml_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump({**VALID_PROFILE, "description": "x" * (fileio.MAX_YAML_BYTES + 1)}))
    with pytest.raises(UserError, match="larger than"):
        load_target(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("description: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserError, match="nests deeper"):
        load_target(deep)
    huge_int = tmp_path / "int.yaml"
    huge_int.write_text(yaml.safe_dump({**VALID_PROFILE}).replace("threads: 1", "threads: " + "9" * 5000))
    with pytest.raises(UserError, match="not valid YAML"):
        load_target(huge_int)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("name", ["a", "b"], "name must be a printable string"),
    ("name", "x\ny", "name must be a printable string"),
    ("backend", {"a": 1}, "unknown backend"),
    ("threads", 10**12, "positive integer"),
    ("input_size", [1, 28, 10**9], "input_size entry"),
    ("calibration", ["a"], "calibration"),
])
def test_profile_fields_of_the_wrong_shape_are_named(field: str, value: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "target.yaml"
    path.write_text(yaml.safe_dump({**VALID_PROFILE, field: value}))
    with pytest.raises(UserError, match=message) as caught:
        load_target(path)
    assert str(path) in str(caught.value)


def test_deeply_nested_json_is_one_line_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    package = write_tiny_package(tmp_path / "pkg")
    (package / MANIFEST).write_text(deep)
    for args in (["verify", str(package)], ["bench", str(package), "--target", "x86-ort-fp32"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "nests deeper" in err, err
    fit = tmp_path / "fit.json"
    fit.write_text(deep)
    with pytest.raises(UserError, match="nests deeper"):
        load_fit(fit)
    shallow_but_deep = tmp_path / "deep.json"
    shallow_but_deep.write_text("[" * (fileio.MAX_NESTING + 1) + "]" * (fileio.MAX_NESTING + 1))
    with pytest.raises(UserError, match="nests deeper"):
        fileio.read_json(shallow_but_deep)


def test_oversized_manifest_is_refused_before_parsing(tmp_path: Path) -> None:
    package = write_tiny_package(tmp_path / "pkg")
    manifest = json.loads((package / MANIFEST).read_text())
    manifest["pad"] = [{}] * 400_000
    (package / MANIFEST).write_text(json.dumps(manifest))
    tracemalloc.start()
    with pytest.raises(UserError, match="larger than"):
        load_package(package)
    assert tracemalloc.get_traced_memory()[1] < 4 * MB
    tracemalloc.stop()


MANIFEST_CASES = [
    (lambda m: m["input"].__setitem__("shape", [1, 28]), "input.shape"),
    (lambda m: m["input"].__setitem__("shape", [1, 28, "28"]), "input.shape[2]"),
    (lambda m: m["input"].__setitem__("shape", [10**9, 28, 28]), "input.shape[0]"),
    (lambda m: m["input"].__setitem__("mean", "x"), "input.mean"),
    (lambda m: m["input"].__setitem__("mean", [0.1, 0.2]), "input.mean"),
    (lambda m: m["input"].__setitem__("std", [0.0]), "input.std"),
    (lambda m: m["input"].__setitem__("std", [float("nan")]), "input.std[0]"),
    (lambda m: m["input"].__setitem__("name", 7), "input.name"),
    (lambda m: m["output"].__setitem__("num_classes", -1), "output.num_classes"),
    (lambda m: m["output"].__setitem__("num_classes", 10**9), "output.num_classes"),
    (lambda m: m.__setitem__("class_names", ["a"]), "class_names"),
    (lambda m: m["widths"].__setitem__("fc", -5), "widths"),
    (lambda m: m["widths"].__setitem__("fc", "8"), "widths"),
    (lambda m: m["widths"].__setitem__("fc", 8.0), "widths"),
    (lambda m: m["flops"].__setitem__("ratio", "1"), "flops.ratio"),
    (lambda m: m["params"].__setitem__("dense", 1.5), "params.dense"),
    (lambda m: m["figures"]["slim"].__setitem__("macs", -1), "figures.slim.macs"),
    (lambda m: m.__setitem__("model", "x" * 1000), "model"),
    (lambda m: m.__setitem__("dataset", None), "dataset"),
    (lambda m: m["files"].__setitem__("model.onnx", "abc"), "files['model.onnx']"),
    (lambda m: m.__setitem__("files", []), "files"),
    (lambda m: m.__setitem__("format", 2), "format 1"),
    (lambda m: m.__setitem__("latency_budgets", {"target": "x"}), "latency_budgets"),
    (lambda m: m.__setitem__("latency_budgets", [{"target": "x86-ort-fp32", "budget_ratio": 0.5}] * 17), "latency_budgets"),
    (lambda m: m.__setitem__("latency_budgets", ["x86-ort-fp32"]), "latency_budgets[0]"),
    (lambda m: m.__setitem__("latency_budgets", [{"target": "", "budget_ratio": 0.5, "batch": 32}]), "latency_budgets[0].target"),
    (lambda m: m.__setitem__("latency_budgets", [{"target": "t", "budget_ratio": 1.5, "batch": 32}]), "latency_budgets[0].budget_ratio"),
    (lambda m: m.__setitem__("latency_budgets", [{"target": "t", "budget_ratio": 0.5, "batch": 0}]), "latency_budgets[0].batch"),
    (lambda m: m.__setitem__("latency_budgets", [{"target": "t", "budget_ratio": 0.5, "batch": 32, "ceiling": "yes"}]),
     "latency_budgets[0].ceiling"),
]


@pytest.mark.parametrize(("change", "field"), MANIFEST_CASES)
def test_each_manifest_field_is_checked_at_the_boundary(change, field: str, tmp_path: Path,  # noqa: ANN001
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    package = write_tiny_package(tmp_path / "pkg")
    manifest = json.loads((package / MANIFEST).read_text())
    change(manifest)
    (package / MANIFEST).write_text(json.dumps(manifest))
    for args in (["verify", str(package)], ["bench", str(package), "--target", "x86-ort-fp32"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert str(package / MANIFEST) in err and field in err, err
