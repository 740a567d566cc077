"""The deploy side runs on a machine without PyTorch: in a fresh interpreter where importing
torch raises, the whole deploy side imports and `lapp-edge bench` benches a package on ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from lapp_edge.deploy.package import ModelPackage

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCH = """
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "torchvision") or name.startswith(("torch.", "torchvision.")):
            raise ImportError(f"{name} is blocked: the deploy side must not need it")
        return None
sys.meta_path.insert(0, BlockTorch())
"""


def run_without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_blocked_torch_really_fails() -> None:
    result = run_without_torch("import torch", ROOT)
    assert result.returncode != 0 and "blocked" in result.stderr


def quick_profile(directory: Path) -> Path:
    """The shipped x86-ort-fp32 profile at batch 1 with a short latency protocol (the test is about
    what gets imported, not about the figures; the full profile took 49 s of the suite)."""
    payload = yaml.safe_load((ROOT / "lapp_edge" / "resources" / "targets" / "x86-ort-fp32.yaml").read_text())
    payload.update(batch_sizes=[1], latency={"warmup_iterations": 2, "min_iterations": 5, "min_seconds": 0.0})
    path = directory / "x86-ort-fp32.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


def test_deploy_side_imports_and_benches_a_package_without_torch(package: ModelPackage, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    profile = quick_profile(tmp_path)
    code = f"""
import lapp_edge.deploy.package, lapp_edge.deploy.targets, lapp_edge.deploy.backends, lapp_edge.deploy.measure
import lapp_edge.deploy.bench, lapp_edge.deploy.compile, lapp_edge.deploy.calibration_set, lapp_edge.costs.latency_fit
from lapp_edge.cli import main
code = main(["bench", {str(package.directory)!r}, "--target", {str(profile)!r}, "--out", {str(out)!r}, "--compiles", "1",
             "--test-images", "1000"])
print("exit", code, "torch loaded:", any(m == "torch" or m.startswith("torch.") for m in sys.modules))
"""
    result = run_without_torch(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exit 0 torch loaded: False" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    [target] = report["targets"]
    assert target["status"] == "ok" and target["variants"]["fp32"]["accuracy"]["agreement"] == 1.0
    assert report["reference"]["top1"] > 0.5


def test_training_commands_say_they_need_torch(tmp_path: Path) -> None:
    result = run_without_torch("from lapp_edge.cli import main\nsys.exit(main(['train', '--out', 'r']))", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "PyTorch" in result.stderr
