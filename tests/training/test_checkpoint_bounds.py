"""Issue 15, kinds 1 and 2 for torch files (slim_model.pt, checkpoint.pt): the zip's declared
record sizes are checked against its size on disk before torch.load inflates anything (the 06
reproducer: a 2 MB file holding a deflated 2 GiB tensor), the plain data around the tensors is
bounded (a pickle-memo bomb in a checkpoint's state is refused, not expanded later), and files
inside a run directory are read without following links."""

from __future__ import annotations

import io
import json
import os
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

from lapp_edge import torch_io
from lapp_edge.cli import main
from lapp_edge.errors import UserError
from lapp_edge.torch_io import safe_torch_load


def deflated_torch_file(path: Path, numel: int) -> None:
    """torch.save of one zero tensor, re-packed with every record deflated (the 06 reproducer's bomb)."""
    raw = io.BytesIO()
    torch.save({"bomb": torch.zeros(numel)}, raw)
    raw.seek(0)
    with zipfile.ZipFile(raw) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(record, source.read(info))


@pytest.fixture()
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch_io.torch, "load", refuse)


def test_zip_bomb_is_refused_before_torch_load(tmp_path: Path, no_torch_load: None) -> None:
    path = tmp_path / "slim_model.pt"
    deflated_torch_file(path, 16 << 20)                 # 64 MiB of zeros in ~64 KB
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    with pytest.raises(UserError, match="would inflate to"):
        safe_torch_load(path)
    assert tracemalloc.get_traced_memory()[1] < 8 << 20
    tracemalloc.stop()


def test_a_small_compressed_record_is_still_checked_by_the_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 no_torch_load: None) -> None:
    path = tmp_path / "checkpoint.pt"
    deflated_torch_file(path, 1 << 16)                 # 256 KiB, below the per-record slack
    monkeypatch.setattr(torch_io, "INFLATION_SLACK", 1 << 10)
    with pytest.raises(UserError, match="inflate|compressed"):
        safe_torch_load(path)


def test_honest_checkpoints_load(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "weights": torch.randn(1000, 100), "state": {"epoch": 1}}, path)
    assert safe_torch_load(path)["weights"].shape == (1000, 100)


def memo_bomb(levels: int) -> list:
    bomb = [1] * 9
    for _ in range(levels - 1):
        bomb = [bomb] * 9
    return bomb


def test_pickle_memo_bomb_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "state": {"epoch": 1, "history": memo_bomb(9)}}, path)   # 9**9 items once walked
    assert path.stat().st_size < 50_000
    with pytest.raises(UserError, match="more than"):
        safe_torch_load(path)


def test_not_a_zip_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(UserError, match="not a torch zip"):
        safe_torch_load(path)


def run_dir(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"epochs": 2, "prune_epochs": 1, "threads": 1}))
    return directory


def test_resume_refuses_a_zip_bomb_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_torch_load: None) -> None:
    run = run_dir(tmp_path / "run")
    deflated_torch_file(run / "checkpoint.pt", 16 << 20)
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "would inflate" in err, err


@pytest.mark.parametrize("member", ["checkpoint.pt", "config.json"])
def test_run_directory_files_that_are_links_are_refused_alike(member: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    answers = []
    for exists in (True, False):
        run = run_dir(tmp_path / f"run{exists}")
        target = tmp_path / f"outside{exists}"
        target.write_bytes((run / "config.json").read_bytes())
        (run / member).unlink(missing_ok=True)
        os.symlink(target, run / member)
        if not exists:
            target.unlink()
        assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        answers.append(err.replace(str(run), "RUN"))
    assert answers[0] == answers[1] and "symbolic link" in answers[0], answers


def test_export_refuses_a_run_with_a_linked_slim_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_dir(tmp_path / "run")
    (tmp_path / "weights.pt").write_bytes(b"x")
    os.symlink(tmp_path / "weights.pt", run / "slim_model.pt")
    assert main(["export", str(run), "--out", str(tmp_path / "pkg")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "symbolic link" in err, err
