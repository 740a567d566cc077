"""Issue 15, kind 5 (the run lock): `fileio.DirectoryLock` is an flock on `<run>/.lock`, so it
is held exactly while its holder lives. A stale lock file (any content: a dead pid, a live
unrelated pid such as 1, a huge number, garbage) is taken over; a live holder is refused with
its pid and what to do; a `.lock` that is a directory or a link is one line saying to remove it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lapp_edge.cli import main
from lapp_edge.errors import UserError
from lapp_edge.fileio import DirectoryLock

ROOT = Path(__file__).resolve().parents[2]
HOLDER = ("import sys, time; from pathlib import Path; from lapp_edge.fileio import DirectoryLock\n"
          "lock = DirectoryLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(60)\n")


def holder(directory: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], cwd=ROOT, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_a_live_holder_is_refused_with_its_pid_and_what_to_do(tmp_path: Path) -> None:
    process = holder(tmp_path)
    try:
        with pytest.raises(UserError) as caught:
            DirectoryLock(tmp_path).acquire()
        message = str(caught.value)
        assert f"pid {process.pid}" in message and "in use by another run" in message and "wait for it" in message
        assert (tmp_path / ".lock").read_text() == str(process.pid)           # the holder's file is untouched
    finally:
        process.kill()
        process.wait()


def test_a_killed_holder_frees_the_lock_at_once_even_unreaped(tmp_path: Path) -> None:
    process = holder(tmp_path)
    os.kill(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:        # no wait(): the killed process may still be a zombie; its descriptors are closed all the same
        try:
            lock = DirectoryLock(tmp_path)
            lock.acquire()
            break
        except UserError:
            assert time.monotonic() < deadline, "the lock of a SIGKILLed holder was not released"
            time.sleep(0.05)
    assert (tmp_path / ".lock").read_text() == str(os.getpid())
    lock.release()
    assert not (tmp_path / ".lock").exists()
    process.wait()


@pytest.mark.parametrize("content", ["1", "99999999999999999999", "-3", "garbage\n", "", str(os.getpid())])
def test_stale_lock_files_are_taken_over_whatever_they_hold(content: str, tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text(content)      # pid 1 is alive, and so is this test's own pid: neither holds it
    with DirectoryLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_two_locks_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    with DirectoryLock(tmp_path):
        with pytest.raises(UserError, match="in use by another run"):
            DirectoryLock(tmp_path).acquire()


def test_lock_that_is_a_directory_or_a_link_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / ".lock").mkdir()
    with pytest.raises(UserError, match=r"is a directory, not a lock file: remove it \(rmdir"):
        DirectoryLock(tmp_path).acquire()
    (tmp_path / ".lock").rmdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / ".lock")
    with pytest.raises(UserError, match=r"is a symbolic link, not a lock file: remove it"):
        DirectoryLock(tmp_path).acquire()
    assert victim.read_text() == "keep"


def test_resume_with_a_lock_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 64), ("t10k", 32)):
        (data / f"{prefix}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(
            d.to_bytes(4, "big") for d in (count, 28, 28)) + rng.integers(0, 256, count * 784, dtype=np.uint8).tobytes())
        (data / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + count.to_bytes(4, "big")
                                                          + rng.integers(0, 10, count, dtype=np.uint8).tobytes())
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 2, "prune_epochs": 1, "batch_size": 32, "threads": 1,
                                                 "data_dir": str(data)}))
    (run / ".lock").mkdir()
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "rmdir" in err, err
