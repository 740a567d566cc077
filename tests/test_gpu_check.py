"""benchmarks/gpu_check.py: one line and exit 2 without a GPU; its code paths, tiny, on the CPU.

No GPU was at hand when the check was written, so `--cpu-smoke` is what has run: the same
sections (training of every variant, export + compile_runner latency table, torchrun with two
processes and the one-process comparison) with ResNet-20 only, 128 images, ONNX Runtime CPU in
place of torch-cuda, and gloo in place of NCCL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the check would run")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path: Path) -> None:
    done = _run("--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: not run: no CUDA GPU is visible to PyTorch")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow        # 41 s of make test; the sections have since run for real on a GPU (docs/GPU.md)
def test_cpu_smoke_runs_every_section(tmp_path: Path, fmnist) -> None:
    out = tmp_path / "check"
    done = _run("--cpu-smoke", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "gpu-check.json").read_text())
    assert {name: s["status"] for name, s in result["sections"].items()} == {"training": "ok", "latency": "ok", "ddp": "ok"}

    training = result["sections"]["training"]["rows"]
    assert [row["variant"] for row in training] == ["dense", "lapp-branch", "lapp-reparam", "lapp-nobypass"]
    for row in training[1:]:
        assert set(row["phases"]) == {"pruning", "slim"} and abs(row["flops_ratio"] - 0.4) <= 0.01
        assert all(phase["images_per_second"] > 0 for phase in row["phases"].values())

    latency = result["sections"]["latency"]
    assert latency["backend"] == "onnxruntime-cpu" and [row["batch"] for row in latency["rows"]] == [1, 8]
    for row in latency["rows"]:
        assert row["dense"]["median_ms"] > 0 and row["slim"]["median_ms"] > 0
        assert row["flops_speedup"] == pytest.approx(1 / training[1]["flops_ratio"], rel=1e-6)

    ddp = result["sections"]["ddp"]
    assert ddp["backend"] == ddp["expected_backend"] == "gloo" and ddp["global_batch"] == 64
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m lapp_edge train" in ddp["command"]
    assert abs(ddp["ddp"]["flops_ratio"] - 0.4) <= 0.01
    assert "report.json" in ddp["run_files"] and ".lock" not in ddp["run_files"]

    table = (out / "gpu-check.txt").read_text()
    assert "latency: x86-ort-fp32" in table and "ddp: 2 processes, backend gloo" in table
