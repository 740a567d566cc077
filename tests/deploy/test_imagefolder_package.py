"""Issue 14, kind 7: a package trained on ImageFolder data records where its data came from and how
its images become the input (manifest `data`), so `verify` needs no --data-dir and `bench` runs it
(fp32 and int8, with an ImageFolder calibration set), with torch or without. One tiny run, seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lapp_edge.cli import main
from lapp_edge.deploy.bench import run_bench
from lapp_edge.export.package_writer import export_run
from lapp_edge.resources import TARGETS_DIR
from lapp_edge.training.trainer import Trainer
from tests.conftest import tiny_config
from tests.data.test_imagefolder import write_tree
from tests.deploy.test_torch_free import run_without_torch

QUICK_LATENCY = {"warmup_iterations": 2, "min_iterations": 5, "min_seconds": 0.0}


@pytest.fixture(scope="module")
def folder_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    data = root / "data"
    write_tree(data, "train", "cat,dog,fox", 6)
    write_tree(data, "val", "cat,fox", 3)                  # val lacks dog: fox must stay label 2
    run = root / "run"
    Trainer(tiny_config(run, dataset="imagefolder", data_dir=str(data), batch_size=8, train_subset=0, test_subset=0,
                        flops_target=0.5)).run()
    export_run(run, root / "models" / "folder")
    return root / "models" / "folder"


def profile(directory: Path, base: str, **changes: object) -> Path:
    payload = yaml.safe_load((TARGETS_DIR / f"{base}.yaml").read_text())
    payload.update(input_size=[3, 40, 40], batch_sizes=[1], latency=QUICK_LATENCY, **changes)
    path = directory / f"{payload['name']}.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


def test_the_manifest_records_the_data_and_its_preprocessing(folder_package: Path) -> None:
    manifest = json.loads((folder_package / "manifest.json").read_text())
    data = manifest["data"]
    assert data["dataset"] == "imagefolder" and Path(data["data_dir"]).is_absolute() and Path(data["data_dir"]).is_dir()
    assert (data["test_split"], data["resize_shorter_side"], data["center_crop"], data["image_mode"]) == ("val", 40, 40, "RGB")
    assert manifest["input"]["shape"] == [3, 40, 40] and manifest["class_names"] == ["cat", "dog", "fox"]


def test_verify_finds_the_data_without_data_dir(folder_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)                                          # nothing relative to lean on
    assert main(["verify", str(folder_package)]) == 0
    assert "verification passed" in capsys.readouterr().out


def test_bench_runs_an_imagefolder_package_fp32_and_int8(folder_package: Path, tmp_path: Path) -> None:
    calibration = tmp_path / "folder-train-8.yaml"
    calibration.write_text(yaml.safe_dump({"name": "folder-train-8", "dataset": "imagefolder", "split": "train", "count": 8, "seed": 0}))
    profiles = [profile(tmp_path, "x86-ort-fp32", name="folder-ort-fp32"),
                profile(tmp_path, "x86-ort-int8", name="folder-ort-int8", calibration=str(calibration))]
    report = run_bench(folder_package, [str(p) for p in profiles])
    assert report.reference["images"] == 6                                # val/: 3 cat + 3 fox
    fp32, int8 = report.targets
    assert fp32.status == "ok" and fp32.variants["fp32"].accuracy.logit_check["passed"]
    assert int8.status == "ok" and int8.calibration["count"] == 8
    [variant] = int8.variants.values()                                     # keyed by the int8 route
    assert variant.runner.precision_used == "int8" and not variant.accuracy.logit_check["checked"]


def test_bench_of_an_imagefolder_package_needs_no_torch(folder_package: Path, tmp_path: Path) -> None:
    target = profile(tmp_path, "x86-ort-fp32", name="folder-ort-fp32")
    out = tmp_path / "bench.json"
    code = f"""
from lapp_edge.cli import main
code = main(["bench", {str(folder_package)!r}, "--target", {str(target)!r}, "--out", {str(out)!r}, "--compiles", "1"])
print("exit", code, "torch loaded:", any(m == "torch" or m.startswith("torch.") for m in sys.modules))
"""
    result = run_without_torch(code, tmp_path)
    assert "exit 0 torch loaded: False" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads(out.read_text())["targets"][0]["status"] == "ok"
