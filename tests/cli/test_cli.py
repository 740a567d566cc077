"""Bad input to the CLI: one line on stderr, exit code 2, nothing written or overwritten."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lapp_edge.cli import main


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


BAD_ARGUMENTS = [
    (["--model", "resnet99"], "unknown model"),
    (["--dataset", "mnist-nope"], "unknown dataset"),
    (["--flops-target", "0"], "(0, 1]"),
    (["--flops-target", "1.5"], "(0, 1]"),
    (["--flops-target", "-0.2"], "(0, 1]"),
    (["--flops-target", "nan"], "(0, 1]"),
    (["--epochs", "3", "--prune-epochs", "3"], "must be smaller than --epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--prune-epochs", "0"], "--prune-epochs"),
    (["--channel-multiple", "-1"], "--channel-multiple"),
    (["--data-dir", "/nonexistent/fmnist"], "does not exist"),
    (["--epochs", "three"], "invalid int value"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_ARGUMENTS)
def test_bad_train_arguments_give_one_line_and_exit_2(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "run"
    code, err = run_cli(["train", "--out", str(out), "--epochs", "2", "--prune-epochs", "1", *extra], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_existing_run_directory_is_not_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    before = snapshot(out)
    code, err = run_cli(["train", "--out", str(out)], capsys)
    assert code == 2 and "already holds files" in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_corrupt_checkpoint_on_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"out": "%s", "epochs": 2, "prune_epochs": 1}' % out)
    (out / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    before = snapshot(out)
    code, err = run_cli(["train", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(out) == before


def test_resume_without_a_run(tmp_path: Path, capsys) -> None:
    code, err = run_cli(["train", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err


def test_malicious_checkpoint_is_refused_and_never_executed(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # noqa: ANN204 - pickle protocol
            return (Path.touch, (marker,))

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"out": "%s", "epochs": 2, "prune_epochs": 1}' % out)
    torch.save({"format": 1, "payload": Exploit()}, out / "checkpoint.pt")
    code, err = run_cli(["train", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "unsafe" in err
    assert not marker.exists()


def test_console_script_has_no_traceback_on_bad_input(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lapp_edge.cli", "train", "--out", str(tmp_path / "r"), "--model", "nope"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    import os

    from lapp_edge.fileio import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_every_command_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Bug: `lapp-edge train --help` ended in a traceback (a flag's help said "1% under it": argparse
    expands % in help text). Every command's --help prints and exits 0, so every help string formats."""
    import argparse

    from lapp_edge.cli import build_parser, main

    parser = build_parser()
    [commands] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert "train" in commands.choices and len(commands.choices) >= 10
    for name in [None, *commands.choices]:
        with pytest.raises(SystemExit) as stopped:
            main(["--help"] if name is None else [name, "--help"])
        assert stopped.value.code == 0, name
        out, err = capsys.readouterr()
        assert "usage: lapp-edge" in out and "Traceback" not in out + err, name
