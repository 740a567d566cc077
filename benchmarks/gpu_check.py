"""The GPU check, in one call: training speed, torch-cuda latency and a 2-process DDP run.

    .venv/bin/python benchmarks/gpu_check.py [--out bench-results/gpu-check] [--budget-s 480]
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke --out DIR      (the same code paths, tiny, on the CPU)

Needs PyTorch with CUDA and Fashion-MNIST (--data-dir, default its standard place); no TensorRT,
no network. Sections (each runs even if an earlier one failed; the JSON says which failed and why):

1. **training**: ResNet-20 and ResNet-56 on Fashion-MNIST (--train-subset images per epoch, batch
   --batch-size, bf16 autocast, channels_last, the in-memory split held on the GPU), dense and
   LAPP 40% with each bypass variant (branch, reparam, none): seconds and images/s of the last
   epoch of each phase (the earlier epochs of a phase absorb cuDNN autotuning and warm-up),
   test top-1, FLOPs ratio.
2. **latency**: the dense and the LAPP (branch) model of each trained family exported as
   packages and compiled through `deploy.compile.compile_runner` for the torch-cuda backend
   (profile gpu-torch-cuda-fp16: fp16, channels_last, CUDA graphs), batch 1 and 256; GPU compute
   time (median ms, trtexec protocol) dense vs slim, measured speedup vs FLOPs speedup.
3. **ddp**: `torchrun --standalone --nproc_per_node 2 -m lapp_edge train` on the GPU(s): NCCL when
   there are two GPUs, two processes sharing one GPU over gloo otherwise, against one process with
   the same global batch (widths, top-1, epoch seconds).

Writes <out>/gpu-check.json and <out>/gpu-check.txt (the table, also printed); runs and packages
under <out>/work (replaced on each call). A section that would start after --budget-s seconds is
skipped and marked so. --cpu-smoke runs every section tiny on the CPU (ResNet-20 only, a few
hundred images, ONNX Runtime CPU instead of torch-cuda, DDP on gloo): it is what
tests/test_gpu_check.py runs, since no GPU was at hand when this was written.

Exit codes: 0 every section ran; 1 a section failed or was skipped; 2 nothing ran: no CUDA GPU,
no PyTorch, no dataset or bad arguments (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {                                   # name -> TrainConfig overrides
    "dense": {"dense": True},
    "lapp-branch": {"bypass_mode": "branch"},
    "lapp-reparam": {"bypass_mode": "reparam"},
    "lapp-nobypass": {"bypass": False},
}


@dataclass
class Settings:
    """What a check runs; `full()` on a GPU, `smoke()` on the CPU."""

    device: str
    models: tuple[str, ...]
    train_subset: int
    test_subset: int
    batch_size: int
    phase_epochs: int                  # epochs per phase (pruning, then slim; dense: this many); the last is timed
    latency_profile: str
    latency_batches: tuple[int, ...]
    verify_images: int
    ddp_epochs: int
    threads: int = 0
    bn_batches: int = 40
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def full() -> "Settings":
        return Settings("cuda", ("resnet20", "resnet56"), 30000, 0, 256, 2, "gpu-torch-cuda-fp16", (1, 256), 1000, 3)

    @staticmethod
    def smoke() -> "Settings":
        return Settings("cpu", ("resnet20",), 128, 100, 64, 1, "x86-ort-fp32", (1, 8), 100, 2, threads=1, bn_batches=2)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def preflight(args: argparse.Namespace) -> str | None:
    """None when the check can run; else the one-line reason it cannot."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (make setup)"
    if not args.cpu_smoke and not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only build)"
        return (f"no CUDA GPU is visible to PyTorch {torch.__version__} (CUDA build: {build}); this check needs an NVIDIA GPU "
                "(--cpu-smoke runs its code paths tiny on the CPU)")
    return None


def environment(settings: Settings) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": settings.device,
                            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if settings.device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    return info


# --- 1. training ---------------------------------------------------------------------------
def train_config(settings: Settings, model: str, variant: str, out: Path, data_dir: str | None, **overrides: Any) -> Any:
    from lapp_edge.training.config import TrainConfig

    dense = variant == "dense"
    values: dict[str, Any] = dict(
        out=str(out), model=model, dataset="fashion-mnist", data_dir=data_dir, flops_target=0.4,
        epochs=settings.phase_epochs * (1 if dense else 2), prune_epochs=settings.phase_epochs,
        batch_size=settings.batch_size, train_subset=settings.train_subset, test_subset=settings.test_subset,
        device=settings.device, threads=settings.threads, bn_recalibration_batches=settings.bn_batches, progress=False,
    )
    values.update(VARIANTS[variant])
    values.update(overrides)
    return TrainConfig(**values)


def phase_times(report: dict[str, Any], images: int) -> dict[str, Any]:
    """Per phase: the last epoch's seconds (the timed one), images/s, and the first epoch's seconds."""
    phases: dict[str, Any] = {}
    for record in report["epochs"]:
        entry = phases.setdefault(record["phase"], {"first_epoch_seconds": record["seconds"]})
        entry.update(seconds=record["seconds"], cpu_seconds=record["cpu_seconds"], epoch=record["epoch"],
                     images_per_second=images / record["seconds"] if record["seconds"] > 0 else None)
    return phases


def section_training(settings: Settings, work: Path, data: Any, data_dir: str | None, deadline: float) -> dict[str, Any]:
    import torch

    from lapp_edge.training.trainer import Trainer

    rows: list[dict[str, Any]] = []
    skipped = []
    for model in settings.models:
        for variant in VARIANTS:
            if time.perf_counter() > deadline:
                skipped.append(f"{model}-{variant}")
                continue
            out = work / "runs" / f"{model}-{variant}"
            if settings.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(train_config(settings, model, variant, out, data_dir), data)
            report = trainer.run()
            images = len(trainer.train_split)  # type: ignore[arg-type]
            row = {"model": model, "variant": variant, "run": str(out), "train_images": images,
                   "test_top1": report["accuracy"]["test_top1"], "flops_ratio": report["flops"]["ratio"],
                   "phases": phase_times(report, images)}
            if settings.device == "cuda":
                row["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
            rows.append(row)
    if skipped:
        return {"status": "partial", "error": f"time budget spent before training {', '.join(skipped)}", "rows": rows}
    return {"rows": rows}


# --- 2. latency ----------------------------------------------------------------------------
def measure_latency(runner: Any, images: Any, batch: int) -> dict[str, Any]:
    """GPU runners: their trtexec-style `gpu_latency` (compute median ms). Others (the CPU smoke):
    wall-clock median of `infer` after a warm-up."""
    import numpy as np

    if hasattr(runner, "gpu_latency"):
        result = runner.gpu_latency(images[:batch])
        return {"median_ms": result["compute_ms"]["median"], "how": "GPU compute time (CUDA events, trtexec protocol)",
                "execution": result.get("execution"), "iterations": result.get("iterations")}
    for _ in range(3):
        runner.infer(images[:batch])
    samples = []
    for _ in range(15):
        started = time.perf_counter()
        runner.infer(images[:batch])
        samples.append((time.perf_counter() - started) * 1e3)
    return {"median_ms": float(np.median(samples)), "how": "wall clock of infer()", "iterations": len(samples)}


def section_latency(settings: Settings, work: Path, data: Any, training: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    import numpy as np

    from lapp_edge.deploy.compile import compile_runner
    from lapp_edge.deploy.package import load_package
    from lapp_edge.deploy.targets import load_target
    from lapp_edge.export.package_writer import export_run

    profile = load_target(settings.latency_profile)
    runs = {(row["model"], row["variant"]): row["run"] for row in training.get("rows", [])}
    rows = []
    for model in settings.models:
        if (model, "dense") not in runs or (model, "lapp-branch") not in runs:
            continue
        packages = {}
        for variant in ("dense", "lapp-branch"):
            target = work / "packages" / f"{model}-{variant}"
            export_run(runs[(model, variant)], target, data_dir=data_dir, images=settings.verify_images)
            packages[variant] = load_package(target)
        manifest = packages["dense"].manifest
        mean = np.asarray(manifest["input"]["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(manifest["input"]["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        images = ((data.test.images[: max(settings.latency_batches)].astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        macs = {v: packages[v].manifest["flops"]["slim_macs"] for v in packages}
        for batch in settings.latency_batches:
            measured = {}
            for variant, package in packages.items():
                with compile_runner(package, profile, batch, work / "compiled") as runner:
                    measured[variant] = measure_latency(runner, images, batch)
                    measured[variant]["precision_used"] = runner.info.precision_used
            speedup = measured["dense"]["median_ms"] / measured["lapp-branch"]["median_ms"]
            flops_speedup = macs["dense"] / macs["lapp-branch"]
            rows.append({"model": model, "batch": batch, "dense": measured["dense"], "slim": measured["lapp-branch"],
                         "speedup": speedup, "flops_speedup": flops_speedup, "speedup_over_flops_speedup": speedup / flops_speedup})
    return {"target": profile.name, "backend": profile.backend, "precision": profile.precision, "rows": rows}


# --- 3. DDP --------------------------------------------------------------------------------
def section_ddp(settings: Settings, work: Path, data: Any, data_dir: str | None, timeout: float) -> dict[str, Any]:
    import torch

    from lapp_edge.training.distributed import choose_backend
    from lapp_edge.training.trainer import Trainer

    processes = 2
    per_process = settings.batch_size // processes
    common = dict(epochs=settings.ddp_epochs, prune_epochs=1)
    ddp_config = train_config(settings, "resnet20", "lapp-branch", work / "runs" / "ddp", data_dir, batch_size=per_process, **common)
    flags = ["--model", "resnet20", "--dataset", "fashion-mnist", "--flops-target", "0.4", "--epochs", str(ddp_config.epochs),
             "--prune-epochs", "1", "--batch-size", str(per_process), "--train-subset", str(settings.train_subset),
             "--test-subset", str(settings.test_subset), "--device", settings.device, "--threads", str(settings.threads),
             "--bn-recalibration-batches", str(settings.bn_batches), "--quiet", "--out", ddp_config.out]
    if data_dir:
        flags += ["--data-dir", data_dir]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "lapp_edge", "train", *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    output = (done.stdout + done.stderr)[-3000:]
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited {done.returncode}: {output.strip().splitlines()[-1] if output.strip() else ''}")
    announced = re.search(r"distributed: (\d+) processes, backend (\w+)", done.stderr)
    gpus = torch.cuda.device_count() if settings.device == "cuda" else 0
    expected_backend = choose_backend(settings.device, gpus, processes)[0]
    ddp_report = json.loads((Path(ddp_config.out) / "report.json").read_text())

    single_config = train_config(settings, "resnet20", "lapp-branch", work / "runs" / "ddp-single", data_dir, **common)
    single_trainer = Trainer(single_config, data)
    single_report = single_trainer.run()
    images = len(single_trainer.train_split)  # type: ignore[arg-type]

    def widths(report: dict[str, Any]) -> dict[str, int]:
        return {layer["name"]: layer["kept"] for layer in report["layers"]}

    return {
        "processes": processes, "backend": announced.group(2) if announced else None, "expected_backend": expected_backend,
        "gpus": gpus, "per_process_batch": per_process, "global_batch": per_process * processes,
        "command": " ".join(command[1:]), "wall_seconds": wall,
        "ddp": {"test_top1": ddp_report["accuracy"]["test_top1"], "flops_ratio": ddp_report["flops"]["ratio"],
                "phases": phase_times(ddp_report, images), "widths": widths(ddp_report)},
        "single": {"test_top1": single_report["accuracy"]["test_top1"], "flops_ratio": single_report["flops"]["ratio"],
                   "phases": phase_times(single_report, images), "widths": widths(single_report)},
        "widths_equal": widths(ddp_report) == widths(single_report),
        "run_files": sorted(p.name for p in Path(ddp_config.out).iterdir()),
        "output_tail": output[-1500:],
    }


# --- the table -----------------------------------------------------------------------------
def format_table(result: dict[str, Any]) -> str:
    lines = [f"gpu_check ({'CPU smoke' if result['settings']['device'] == 'cpu' else 'GPU'}): "
             + ", ".join(f"{k} {v}" for k, v in result["environment"].items())]
    training = result["sections"].get("training", {})
    if training.get("rows"):
        s = result["settings"]
        lines += ["", f"training: fashion-mnist, {training['rows'][0]['train_images']} images/epoch, batch {s['batch_size']}, "
                      f"timed = last epoch of each phase",
                  f"{'model':9s} {'variant':14s} {'phase':8s} {'epoch s':>8s} {'images/s':>9s} {'first s':>8s} {'top-1':>6s} {'FLOPs':>6s}"]
        for row in training["rows"]:
            for phase, t in row["phases"].items():
                lines.append(f"{row['model']:9s} {row['variant']:14s} {phase:8s} {t['seconds']:8.2f} {t['images_per_second'] or 0:9.0f} "
                             f"{t['first_epoch_seconds']:8.2f} {row['test_top1']:6.3f} {row['flops_ratio']:6.3f}")
    latency = result["sections"].get("latency", {})
    if latency.get("rows"):
        lines += ["", f"latency: {latency['target']} ({latency['backend']}, {latency['precision']}), median ms",
                  f"{'model':9s} {'batch':>5s} {'dense ms':>9s} {'slim ms':>9s} {'speedup':>8s} {'FLOPs x':>8s} {'ratio':>6s}"]
        for row in latency["rows"]:
            lines.append(f"{row['model']:9s} {row['batch']:5d} {row['dense']['median_ms']:9.3f} {row['slim']['median_ms']:9.3f} "
                         f"{row['speedup']:8.2f} {row['flops_speedup']:8.2f} {row['speedup_over_flops_speedup']:6.2f}")
    ddp = result["sections"].get("ddp", {})
    if "ddp" in ddp:
        lines += ["", f"ddp: {ddp['processes']} processes, backend {ddp['backend']} (expected {ddp['expected_backend']}), "
                      f"global batch {ddp['global_batch']} vs one process; widths equal: {ddp['widths_equal']}",
                  f"{'run':8s} {'pruning s':>10s} {'slim s':>8s} {'top-1':>6s} {'FLOPs':>6s}"]
        for name in ("ddp", "single"):
            entry = ddp[name]
            lines.append(f"{name:8s} {entry['phases'].get('pruning', {}).get('seconds', float('nan')):10.2f} "
                         f"{entry['phases'].get('slim', {}).get('seconds', float('nan')):8.2f} {entry['test_top1']:6.3f} {entry['flops_ratio']:6.3f}")
    for name, section in result["sections"].items():
        if section.get("status") != "ok":
            lines.append(f"{name}: {section.get('status')}: {section.get('error', '')}")
    lines.append(f"total {result['seconds']:.0f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lapp_edge.data.torch_data import load_dataset
    from lapp_edge.fileio import atomic_write_json, atomic_write_text

    settings = Settings.smoke() if args.cpu_smoke else Settings.full()
    if args.train_subset is not None:
        settings.train_subset = args.train_subset
    out = Path(args.out)
    work = out / "work"
    data = load_dataset("fashion-mnist", args.data_dir)          # UserError (exit 2) when it is missing
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"settings": asdict(settings), "environment": environment(settings), "sections": {}}
    budget = args.budget_s
    # training may use about half of the budget (the runs it has no time for are reported), the
    # DDP run gets what is left plus a margin
    sections = [
        ("training", lambda: section_training(settings, work, data, args.data_dir, started + 0.5 * budget)),
        ("latency", lambda: section_latency(settings, work, data, result["sections"]["training"], args.data_dir)),
        ("ddp", lambda: section_ddp(settings, work, data, args.data_dir,
                                    max(60.0, budget - (time.perf_counter() - started)) + 60.0)),
    ]
    for name, call in sections:
        if time.perf_counter() - started > budget:
            result["sections"][name] = {"status": "skipped", "error": f"the {args.budget_s:.0f} s budget was spent"}
            continue
        section_started = time.perf_counter()
        try:
            result["sections"][name] = {"status": "ok", **call()}    # a section may say "partial" itself
        except Exception as error:  # noqa: BLE001 - a failed section is reported, the others still run
            result["sections"][name] = {"status": "failed", "error": first_line(error),
                                        "traceback": traceback.format_exc()[-4000:]}
        result["sections"][name]["seconds"] = time.perf_counter() - section_started
        print(f"gpu_check: {name} {result['sections'][name]['status']} ({result['sections'][name]['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    result["seconds"] = time.perf_counter() - started
    table = format_table(result)
    atomic_write_json(out / "gpu-check.json", result)
    atomic_write_text(out / "gpu-check.txt", table + "\n")
    print(table)
    return 0 if all(section["status"] == "ok" for section in result["sections"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/gpu-check", help="JSON, table and work directory")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: its standard place)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no section after this many seconds (default 480)")
    parser.add_argument("--train-subset", type=int, default=None, help="training images per epoch (default: 30000; smoke 256)")
    parser.add_argument("--cpu-smoke", action="store_true", help="run every section tiny on the CPU (tests)")
    args = parser.parse_args(argv)
    problem = preflight(args)
    if problem is not None:
        print(f"gpu_check: not run: {problem}", file=sys.stderr)
        return 2
    from lapp_edge.errors import UserError

    try:
        return run(args)
    except UserError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
