"""Reliability and safety (issue 5): runs survive SIGKILL at random points and in the middle
of a checkpoint write; two runs never share a run directory; untrusted files are never
executed; a non-finite loss or an unreachable target stops the run with one line.

The subprocess runs train ResNet-20 on a small IDX copy of Fashion-MNIST (320 train / 200
test images, so a process starts in a few seconds), 3 epochs (1 pruning), batch 32:
10 steps per epoch. Figures for docs/RELIABILITY.md are printed (pytest -s).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lapp_edge.resources import TARGETS_DIR
from lapp_edge import fileio
from lapp_edge.cli import main
from lapp_edge.data.torch_data import Dataset
from lapp_edge.models import build_model, prunable_sites
from lapp_edge.deploy.package import MANIFEST, MODEL_FILE, sha256_of
from lapp_edge.models.spec import SLIM_SPEC, SLIM_WEIGHTS, ArchitectureSpec, build_from_spec

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 10
EPOCHS = 3
MAX_KILLS = 4
TEMPORARY = re.compile(r"^\.(?P<name>[^/]+)\.[^.]+\.tmp$")   # fileio's mkstemp names: .<name>.<random>.tmp
PROGRESS = re.compile(r"epoch (\d+)/\d+ \[(\w+)\]:\s+\d+%\|[^|]*\|\s*(\d+)/\d+")


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_small_fmnist(directory: Path, data: Dataset, train: int = 320, test: int = 200) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, split, count in (("train", data.train, train), ("t10k", data.test, test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", split.images[:count, 0])  # type: ignore[attr-defined]
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", split.labels[:count].astype(np.uint8))  # type: ignore[attr-defined]
    return directory


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory, fmnist: Dataset) -> Path:
    return write_small_fmnist(tmp_path_factory.mktemp("data") / "fmnist", fmnist)


def train_args(out: Path, data: Path) -> list[str]:
    return ["train", "--out", str(out), "--data-dir", str(data), "--epochs", str(EPOCHS), "--prune-epochs", "1",
            "--batch-size", "32", "--threads", "1", "--seed", "3"]


def start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A CLI process with progress bars on (stderr to `log`, so its position can be read)."""
    environment = {key: value for key, value in os.environ.items() if key != fileio.FAULT_KILL_DURING_WRITE}
    environment.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})
    with open(log, "wb") as stream:
        return subprocess.Popen([sys.executable, "-m", "lapp_edge.cli", *args], cwd=ROOT, env=environment,
                                stdout=subprocess.DEVNULL, stderr=stream)


def progress(log: Path) -> tuple[int, int, str] | None:
    """(epoch being trained, steps done in it, phase) from the last progress bar in a log."""
    found = PROGRESS.findall(log.read_text(errors="replace"))
    return (int(found[-1][0]), int(found[-1][2]), found[-1][1]) if found else None


def global_step(position: tuple[int, int, str] | None) -> int:
    return 0 if position is None else (position[0] - 1) * STEPS_PER_EPOCH + position[1]


def first_epoch_trained(log: Path) -> int | None:
    found = PROGRESS.findall(log.read_text(errors="replace"))
    return int(found[0][0]) if found else None


def checkpoint_epoch(out: Path) -> int:
    path = out / "checkpoint.pt"
    return int(torch.load(path, weights_only=True)["state"]["epoch"]) if path.is_file() else 0


def check_intact(out: Path) -> dict[str, int]:
    """Every file in a run directory is whole: JSON parses, .pt loads with weights_only=True,
    the plot is a complete PNG. Leftover temporaries of a killed write are counted."""
    counts = {"files": 0, "temporaries": 0}
    for path in out.iterdir():
        counts["files"] += 1
        if TEMPORARY.match(path.name):
            counts["temporaries"] += 1
            continue
        assert not path.name.endswith(".tmp"), path
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[-12:-4] == b"\x00\x00\x00\x00IEND", path
        elif path.suffix == ".txt":
            assert path.read_text().strip(), path
        elif path.name == ".lock":
            int(path.read_text())
        else:
            raise AssertionError(f"unexpected file {path}")
    return counts


def kept_widths(out: Path) -> list[int]:
    return [layer["kept"] for layer in json.loads((out / "report.json").read_text())["layers"]]


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError("timed out")


# --- an uninterrupted reference run, and a second run pointed at its directory ----------------

class Reference:
    """The uninterrupted run, in a subprocess; the kill tests run beside it and read its widths at the end."""

    def __init__(self, out: Path, process: subprocess.Popen, began: float) -> None:
        self.out, self.process, self.began = out, process, began
        self.second: dict[str, tuple[int, str]] = {}
        self.writes: list[str] = []
        self.owner = self.lock_after = ""
        self.still_running = False
        self.seconds = 0.0

    def widths(self) -> list[int]:
        if not self.seconds:
            assert self.process.wait(timeout=300) == 0, (self.out.parent / "log").read_text()[-2000:]
            self.seconds = time.monotonic() - self.began
        return kept_widths(self.out)


@pytest.fixture(scope="module")
def reference(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Start the uninterrupted run. While it trains, a second run (fresh, then --resume) is
    pointed at its --out in this process, with every atomic write recorded."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "run"
    run = Reference(out, start(train_args(out, small_data), root / "log"), time.monotonic())
    assert wait_for(lambda: (out / ".lock").is_file() and (out / "config.json").is_file(), run.process)
    run.owner = (out / ".lock").read_text()
    original = fileio.atomic_write_bytes
    fileio.atomic_write_bytes = lambda path, data: run.writes.append(str(path))  # type: ignore[assignment]
    try:
        for name in ("fresh", "resume"):
            args = ["train", "--out", str(out), "--resume", "--quiet"] if name == "resume" else [*train_args(out, small_data), "--quiet"]
            buffer = io.StringIO()
            saved, sys.stderr = sys.stderr, buffer
            try:
                code = main(args)
            finally:
                sys.stderr = saved
            run.second[name] = (code, buffer.getvalue())
    finally:
        fileio.atomic_write_bytes = original  # type: ignore[assignment]
    run.still_running = run.process.poll() is None
    run.lock_after = (out / ".lock").read_text() if (out / ".lock").is_file() else ""
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait()


def test_second_run_on_the_same_out_is_refused_and_touches_nothing(reference: Reference) -> None:
    assert reference.still_running, "the first run ended before the second one was tried"
    for name, (code, err) in reference.second.items():
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert "already holds files" in reference.second["fresh"][1]
    assert "in use by another run" in reference.second["resume"][1]
    assert reference.writes == []                             # the second run wrote nothing
    assert reference.lock_after == reference.owner            # and left the first run's lock alone
    reference.widths()                                        # the first run finishes fine
    assert not (reference.out / ".lock").exists()
    assert check_intact(reference.out)["temporaries"] == 0
    assert checkpoint_epoch(reference.out) == EPOCHS


# --- SIGKILL at random points, resume until done --------------------------------------------

@pytest.mark.slow      # ~50 s; `make test` keeps the kills at every write point (test_kill_during_checkpoint_and_report_writes)
def test_random_sigkills_lose_at_most_one_epoch_and_change_nothing(reference: Reference, small_data: Path, tmp_path: Path) -> None:
    rng = random.Random(5)
    total_steps = EPOCHS * STEPS_PER_EPOCH
    # kill points: seeded random global steps, each plus a random delay so that kills land
    # anywhere (mid-step, at freeze, during evaluation or a checkpoint write)
    points = sorted(rng.sample(range(1, total_steps + 1), MAX_KILLS))
    delays = [rng.uniform(0.0, 0.8) for _ in points]
    out = tmp_path / "run"
    began, started_at = time.monotonic(), time.time()
    process = start(train_args(out, small_data), tmp_path / "log0")
    kills: list[dict[str, object]] = []
    last_checkpoint = 0
    for point, delay in zip(points, delays):
        if point <= last_checkpoint * STEPS_PER_EPOCH:
            continue
        log = tmp_path / f"log{len(kills)}"
        if not wait_for(lambda: global_step(progress(log)) >= point, process):
            break
        time.sleep(delay)
        if process.poll() is not None:
            break
        os.kill(process.pid, signal.SIGKILL)
        killed_at = time.time()
        process.wait()                                    # reap it, as a shell would: its pid is gone
        epoch, steps, phase = progress(log) or (1, 0, "")
        counts = check_intact(out)                        # nothing truncated at this kill point
        saved = checkpoint_epoch(out)
        assert saved >= last_checkpoint                   # the completed-epoch count never goes back
        assert saved >= epoch - 1                         # at most the epoch in progress is lost
        last_save = (out / "checkpoint.pt").stat().st_mtime if (out / "checkpoint.pt").is_file() else 0.0
        kills.append({"at_step": point, "epoch": epoch, "phase": phase, "steps_done": steps, "checkpoint_epoch": saved,
                      "lost_steps": (epoch - 1 - saved) * STEPS_PER_EPOCH + steps, "temporaries": counts["temporaries"],
                      "lock_left": (out / ".lock").is_file(),
                      "seconds_since_checkpoint_or_start": round(killed_at - max(last_save, started_at), 1)})
        last_checkpoint = saved
        started_at = time.time()
        process = start(["train", "--out", str(out), "--resume"], tmp_path / f"log{len(kills)}")
    assert process.wait(timeout=300) == 0, (tmp_path / f"log{len(kills)}").read_text()[-2000:]
    total = time.monotonic() - began
    for index, kill in enumerate(kills):                 # each resume started right after its checkpoint
        assert first_epoch_trained(tmp_path / f"log{index + 1}") in (int(kill["checkpoint_epoch"]) + 1, None)
    assert len(kills) >= 2 and all(int(k["lost_steps"]) <= STEPS_PER_EPOCH for k in kills)
    assert all(k["lock_left"] for k in kills)             # each kill left a stale lock; the resume took it over
    counts = check_intact(out)
    assert counts["temporaries"] == 0 and not (out / ".lock").exists()
    assert checkpoint_epoch(out) == EPOCHS
    report = json.loads((out / "report.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, EPOCHS + 1))
    assert kept_widths(out) == reference.widths()         # same network as the uninterrupted run
    print(f"\nRELIABILITY kills={len(kills)} {json.dumps(kills)} killed-run wall {total:.1f}s, "
          f"uninterrupted {reference.seconds:.1f}s (run side by side)")


def test_kill_during_checkpoint_and_report_writes(reference: Reference, small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # die half-way through writing the second checkpoint (epoch 2): epoch 1's must survive
    process = start(train_args(out, small_data), tmp_path / "log0", **{fileio.FAULT_KILL_DURING_WRITE: "checkpoint.pt@2"})
    assert process.wait(timeout=300) == -signal.SIGKILL
    counts = check_intact(out)
    leftovers = [p for p in out.iterdir() if TEMPORARY.match(p.name)]
    assert counts["temporaries"] == 1 and leftovers[0].name.startswith(".checkpoint.pt.")
    with pytest.raises(Exception):
        torch.load(leftovers[0], weights_only=True)          # the half-written temporary is truncated
    assert checkpoint_epoch(out) == 1
    assert int((out / ".lock").read_text()) == process.pid   # stale lock of a dead process

    # resume, and die half-way through the final report.json: training is complete by then
    process = start(["train", "--out", str(out), "--resume"], tmp_path / "log1", **{fileio.FAULT_KILL_DURING_WRITE: "report.json"})
    assert process.wait(timeout=300) == -signal.SIGKILL
    assert first_epoch_trained(tmp_path / "log1") == 2
    assert check_intact(out)["temporaries"] == 1 and checkpoint_epoch(out) == EPOCHS
    assert not (out / "report.json").exists()

    process = start(["train", "--out", str(out), "--resume", "--quiet"], tmp_path / "log2")
    assert process.wait(timeout=300) == 0, (tmp_path / "log2").read_text()[-2000:]
    assert first_epoch_trained(tmp_path / "log2") is None      # nothing left to train
    assert check_intact(out)["temporaries"] == 0 and not (out / ".lock").exists()
    assert kept_widths(out) == reference.widths()


# --- untrusted files -------------------------------------------------------------------------

def test_every_torch_load_is_weights_only_and_nothing_unpickles() -> None:
    problems, loads = [], 0
    for path in sorted((ROOT / "lapp_edge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = ast.unparse(func)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == "torch.load" or (isinstance(func, ast.Attribute) and func.attr == "load" and name.startswith("torch")):
                loads += 1
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "eval", "exec", "marshal.loads"):
                problems.append(f"{where}: {name}")
            if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                problems.append(f"{where}: allow_pickle")
    assert loads >= 1 and not problems, problems


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path.touch, (self.marker,))


def fake_run(directory: Path) -> Path:
    """A run directory with a real (dense, untrained) ResNet-20 slim model, spec and report."""
    directory.mkdir(parents=True)
    dense = build_model("resnet20", 1, 10, True)
    widths = {site.name: site.channels for site in prunable_sites(dense)}
    spec = ArchitectureSpec("resnet20", 1, 10, 28, True, widths, dict(widths), [0.286], [0.353], [str(i) for i in range(10)])
    (directory / SLIM_SPEC).write_text(json.dumps(spec.to_dict()))
    torch.save(build_from_spec(spec).state_dict(), directory / SLIM_WEIGHTS)
    (directory / "report.json").write_text(json.dumps({"flops": {"slim_macs": 1.0}, "accuracy": {"test_top1": 0.5}}))
    (directory / "config.json").write_text(json.dumps({"dataset": "fashion-mnist"}))
    return directory


def test_malicious_slim_model_is_refused_by_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Exploit(marker)}, run / SLIM_WEIGHTS)
    before = snapshot(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "models" / "x")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unsafe" in err, err
    assert not marker.exists() and snapshot(tmp_path) == before


def fake_package(directory: Path, run: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / MODEL_FILE).write_bytes(b"not really onnx, never read: the hashes are checked first")
    for name in (SLIM_SPEC, SLIM_WEIGHTS):
        (directory / name).write_bytes((run / name).read_bytes())
    files = {name: sha256_of(directory / name) for name in (MODEL_FILE, SLIM_SPEC, SLIM_WEIGHTS)}
    widths = json.loads((run / SLIM_SPEC).read_text())["widths"]
    manifest = {"format": 1, "model": "resnet20", "dataset": "fashion-mnist",
                "input": {"name": "input", "shape": [1, 28, 28], "mean": [0.286], "std": [0.353]},
                "output": {"name": "logits", "num_classes": 10}, "class_names": [str(i) for i in range(10)],
                "widths": widths, "dense_widths": widths, "flops": {"dense_macs": 1.0, "slim_macs": 1.0, "ratio": 1.0},
                "params": {"dense": 1, "slim": 1}, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def tamper(package: Path, what: str) -> None:
    if what == "manifest":
        manifest = json.loads((package / MANIFEST).read_text())
        manifest["files"][SLIM_WEIGHTS] = "0" * 64
        (package / MANIFEST).write_text(json.dumps(manifest))
    elif what == "missing":
        (package / SLIM_SPEC).unlink()
    else:
        data = bytearray((package / what).read_bytes())
        data[len(data) // 2] ^= 0x01
        (package / what).write_bytes(bytes(data))


@pytest.mark.parametrize("what", [MODEL_FILE, SLIM_WEIGHTS, SLIM_SPEC, "manifest", "missing"])
def test_tampered_package_is_refused_by_every_reader(tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str) -> None:
    run = fake_run(tmp_path / "run")
    package = fake_package(tmp_path / "models" / "pkg", run)
    tamper(package, what)
    before = snapshot(tmp_path)
    commands = {
        "verify": ["verify", str(package)],
        "bench": ["bench", str(package), "--target", str(TARGETS_DIR / "x86-ort-fp32.yaml"), "--out", str(tmp_path / "b.json")],
        "export": ["export", str(run), "--out", str(package)],      # export into a tampered package
    }
    for name, args in commands.items():
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert "sha256" in err or "missing" in err, (name, err)
    assert snapshot(tmp_path) == before


# --- numerical faults -------------------------------------------------------------------------

@pytest.mark.parametrize(("bad", "at_step", "kept_epoch"), [(float("nan"), 14, 1), (float("inf"), 3, 0)])
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    bad: float, at_step: int, kept_epoch: int,
) -> None:
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        loss = real(*args, **kwargs)
        calls["n"] += 1
        return loss * bad if calls["n"] == at_step + 1 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    out = tmp_path / "run"
    assert main([*train_args(out, small_data), "--test-subset", "100", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "diverged" in err and f"step {at_step}" in err, err
    assert calls["n"] == at_step + 1                        # stopped at once, no further step
    assert check_intact(out)["temporaries"] == 0 and not (out / ".lock").exists()
    assert checkpoint_epoch(out) == kept_epoch
    assert ("was kept" in err) == (kept_epoch > 0)
    assert not (out / "report.json").exists() and not (out / SLIM_WEIGHTS).exists()


def test_target_no_width_combination_meets_is_refused_before_training(small_data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # with widths in multiples of 32, ResNet-20 can keep 0.898 or 0.942 of its FLOPs, nothing in
    # between: 0.92 passes the floor check; the freeze's width search, run before training, refuses it
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data-dir", str(small_data), "--epochs", "2", "--prune-epochs", "1",
            "--train-subset", "320", "--test-subset", "100", "--threads", "1", "--channel-multiple", "32",
            "--flops-target", "0.92", "--quiet"]
    began = time.monotonic()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot be met" in err and "0.9418" in err, err
    assert time.monotonic() - began < 30
    assert not out.exists()                                             # nothing written: a corrected run may use --out
    assert main(args[:-3] + ["--flops-target", "0.9", "--quiet"]) == 0
