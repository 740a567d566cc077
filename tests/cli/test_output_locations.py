"""Every command that writes refuses an output it cannot write before any work, in one line (exit 2).

A user's report: `--out` under a regular file (or on a read-only mount) gave a traceback, and `train`,
`bench` and `ship` only failed after all their work (bench lost its report). The kind: every writing
command, every way an output location can be unusable. And paths that are the wrong kind of thing
(a file where a directory is wanted, a directory where a file is) are named as such, not as missing.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import yaml

from lapp_edge.cli import main
from lapp_edge.fileio import check_output_location
from lapp_edge.errors import UserError


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lapp-edge: error: "), err
    return err[0]


def commands(out: str, config: Path) -> dict[str, list[str]]:
    """Each writing command with `out` as its output (the inputs need not exist: the output is checked first)."""
    return {
        "train": ["train", "--out", out, "--epochs", "2", "--prune-epochs", "1", "--train-subset", "64"],
        "export": ["export", "no-such-run", "--out", out],
        "ship": ["ship", "no-such-package", "--target", "x86-ort-fp32", "--out", out],
        "bench": ["bench", "no-such-package", "--target", "x86-ort-fp32", "--out", out + "/report.json"],
        "run-all": ["run-all", str(config), "--out", out],
        "calibrate-latency": ["calibrate-latency", "--target", "x86-ort-fp32", "--out", out],
        "profile-layers": ["profile-layers", "--target", "x86-ort-fp32", "--model", "resnet20", "--out", out],
    }


def run_all_config(directory: Path) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({"out": str(directory / "from-config"), "model": "resnet20", "data": "fashion-mnist",
                                    "budget": 0.5, "epochs": 1}))
    return path


@pytest.mark.parametrize("command", list(commands("x", Path("c"))))
def test_an_output_under_a_regular_file_is_refused_before_any_work(command: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    config = run_all_config(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(commands(str(blocker / "out"), config)[command]) == 2
    line = one_error(capsys)
    assert "--out" in line and f"{blocker} is a file, not a directory" in line, line
    assert sorted(os.listdir(tmp_path)) == before and blocker.read_text() == "not a directory"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a directory no file can be made in)")
@pytest.mark.parametrize("command", ["train", "export", "ship", "bench", "run-all"])
def test_an_output_where_no_file_can_be_made_is_refused(command: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # /proc refuses new files even to root, for whom os.access says yes: the check makes a probe file
    assert main(commands("/proc/lapp-edge-test-out", run_all_config(tmp_path))[command]) == 2
    assert "cannot be written: cannot create files in /proc" in one_error(capsys)


@pytest.mark.parametrize("command", list(commands("x", Path("c"))))
def test_an_empty_output_is_refused_not_read_as_the_working_directory(command: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    argv = commands("", run_all_config(tmp_path))[command]
    if command == "bench":
        argv[-1] = ""
    assert main(argv) == 2
    line = one_error(capsys)
    assert "--out is empty" in line or "no output directory" in line, line     # run-all: not the config's out either
    assert not (tmp_path / "from-config").exists()


def test_bench_refuses_a_directory_as_its_report_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no-such-package", "--target", "x86-ort-fp32", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory: give a file name" in one_error(capsys)


def test_the_location_check_leaves_nothing_behind(tmp_path: Path) -> None:
    check_output_location(tmp_path / "new" / "deeper", "--out", "dir")
    check_output_location(tmp_path / "report.json", "--out", "file")
    assert os.listdir(tmp_path) == []                  # no probe file left, nothing created
    with pytest.raises(UserError, match="--out is empty"):
        check_output_location("", "--out", "dir")
    (tmp_path / "runs").symlink_to(tmp_path / "unmounted" / "runs")       # a data disk not mounted
    with pytest.raises(UserError, match=r"runs is a symbolic link to .*unmounted/runs, which does not exist"):
        check_output_location(tmp_path / "runs" / "a", "--out", "dir")


def test_a_file_system_error_during_the_work_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # what no check can foresee (a disk that fills mid-run) still reaches the user as one line, exit 2
    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/a/checkpoint.pt")

    monkeypatch.setattr("lapp_edge.deploy.bench.run_bench", disk_full)
    assert main(["bench", "pkg", "--target", "x86-ort-fp32"]) == 2
    assert one_error(capsys) == "lapp-edge: error: No space left on device: runs/a/checkpoint.pt"


@pytest.mark.parametrize(("argv", "message"), [
    (["export", "{file}", "--out", "{dir}/pkg"], "run directory {file} is a file, not a directory"),
    (["verify", "{dir}/nothing"], "model package {dir}/nothing does not exist"),
    (["verify", "{file}"], "model package {file} is a file, not a directory"),
    (["bench", "{dir}/pkg", "--target", "{dir}"], "target profile {dir} is a directory: give a YAML file"),
    (["train", "--data-dir", "{file}", "--out", "{dir}/run", "--epochs", "2", "--prune-epochs", "1"],
     "data directory {file} for fashion-mnist is a file, not a directory"),
    (["train", "--data-dir", "{tree}", "--out", "{dir}/run", "--epochs", "2", "--prune-epochs", "1"],
     "which holds a train/ folder: for an ImageFolder tree (train/<class>/<image>) pass --dataset imagefolder"),
])
def test_an_input_of_the_wrong_kind_is_named_as_such(argv: list[str], message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "tree" / "train" / "cat").mkdir(parents=True)
    fill = {"file": str(afile), "dir": str(tmp_path), "tree": str(tmp_path / "tree")}
    assert main([a.format(**fill) for a in argv]) == 2
    assert message.format(**fill) in one_error(capsys)


def test_a_flag_error_names_the_command_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--flops-target", "abc", "--out", str(tmp_path / "run")]) == 2
    assert one_error(capsys) == "lapp-edge: error: train: argument --flops-target: invalid float value: 'abc'"
