"""Child processes that stop with the process that started them (no torch: benchmarks use it too).

`lapp-edge run-all` and the benchmarks train each run in its own `lapp-edge train` process. A
SIGTERM sent to the orchestrator alone (a scheduler's stop, `kill PID`) used to end it and leave
its training processes running: they held their run directories' locks, so the same command, run
again to resume, found its runs "in use by another run". Ctrl-C did not show it (the terminal
signals the whole process group). Here every child is registered when started; on SIGTERM, SIGHUP
or SIGINT the orchestrator sends each live child SIGTERM, waits for it (then SIGKILL after a grace
period), prints one line and exits with 128 + the signal number. A stopped `lapp-edge train`
resumes from its last checkpoint when the same command runs again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
GRACE_S = 30.0      # how long a child has to exit after SIGTERM before it is killed


class ChildProcesses:
    """The processes an orchestrator started and has not yet seen exit.

    `start` and `run` register a child; `stop_on_signal` (a context manager, main thread only) turns
    a stop signal into: stop every registered child, one line on stderr naming the signal and how
    many children were stopped, `SystemExit(128 + signal number)`. After a stop signal, `stopping`
    is True and `start` refuses (raises `ChildrenStopped`), so worker threads start nothing new.
    """

    def __init__(self, program: str) -> None:
        self.program = program
        self._live: set[subprocess.Popen[Any]] = set()
        self._lock = threading.RLock()     # re-entrant: the signal handler may run while the main thread holds it
        self.stopping = False

    def start(self, command: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen(command, **popen_kwargs)`, registered until `forget` or a stop.
        Raises `ChildrenStopped` once a stop signal has arrived."""
        with self._lock:
            if self.stopping:
                raise ChildrenStopped(f"{self.program}: stopping; not starting {command[0]}")
            process = subprocess.Popen(command, **popen_kwargs)
            self._live.add(process)
        return process

    @staticmethod
    def _unregistered_children(known: list[Any]) -> list[_Orphan]:
        """Every live child process of this one (Linux /proc; none elsewhere) that is not in `known`, sent
        SIGTERM and returned as waitable handles."""
        known_pids = {process.pid for process in known}
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError, IndexError):
                continue
            pid = int(entry.name)
            if int(parent) == os.getpid() and state != "Z" and pid not in known_pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                found.append(_Orphan(pid))
        return found

    def forget(self, process: subprocess.Popen[Any]) -> None:
        """Stop tracking a child that has exited."""
        with self._lock:
            self._live.discard(process)

    def run(self, command: Sequence[str], **popen_kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Like `subprocess.run` (no input, check or timeout): start, wait (collecting piped output), forget."""
        process = self.start(command, **popen_kwargs)
        try:
            stdout, stderr = process.communicate()
        finally:
            self.forget(process)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def terminate_all(self) -> list[subprocess.Popen[Any]]:
        """Mark this orchestrator stopping and send SIGTERM to every live child, without waiting (safe
        inside a signal handler: nothing here blocks on a lock another frame of this thread may hold);
        returns the children signalled."""
        with self._lock:
            self.stopping = True
            live = [process for process in self._live if process.poll() is None]
        for process in live:
            process.terminate()
        return live

    @staticmethod
    def wait_for(processes: list[subprocess.Popen[Any]], grace_s: float = GRACE_S) -> None:
        """Wait up to `grace_s` seconds for each process to exit; SIGKILL the ones that do not."""
        deadline = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self, grace_s: float = GRACE_S) -> int:
        """SIGTERM to every live child, then wait up to `grace_s` seconds (SIGKILL after); returns how
        many were still running. Not for a signal handler (it waits): `stop_on_signal` splits the two."""
        live = self.terminate_all()
        self.wait_for(live, grace_s)
        return len(live)

    @contextmanager
    def stop_on_signal(self, grace_s: float = GRACE_S) -> Iterator[ChildProcesses]:
        """Within the block, SIGTERM, SIGHUP and SIGINT stop the children and exit (see the class);
        the previous handlers come back after it. Must be entered from the main thread.

        The handler only signals the children and raises `SystemExit(128 + signum)`: the frame it
        interrupts may be inside `Popen.wait`, holding that process's wait lock, so waiting there would
        deadlock. The waiting happens here, once the exit has unwound that frame (worker threads see
        their child exit and `stopping` set); a timer SIGKILLs children still alive after `grace_s`,
        so an orchestrator whose thread pool waits for its workers cannot hang on a stubborn child."""
        signalled: list[Any] = []        # Popen handles, and _Orphan ones found at the end
        received: list[int] = []

        def kill_stragglers() -> None:
            for process in signalled:
                if process.poll() is None:
                    process.kill()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if received:                   # a second signal while stopping: let the first one finish
                return
            received.append(signum)
            signalled.extend(self.terminate_all())
            killer = threading.Timer(grace_s, kill_stragglers)
            killer.daemon = True
            killer.start()
            raise SystemExit(128 + signum)

        previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            if received:
                # a signal that lands inside Popen, after the fork but before `start` registered the child,
                # leaves a child no list knows (it trained on, orphaned): stop every child process we have
                signalled.extend(self._unregistered_children(signalled))
                self.wait_for(signalled, grace_s)
                print(f"{self.program}: stopped by {signal.Signals(received[0]).name}; stopped {len(signalled)} training "
                      "process(es): run the same command again to resume them from their last checkpoints",
                      file=sys.stderr, flush=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class _Orphan:
    """A child process known only by its pid (started by a Popen that a stop signal interrupted): the
    `wait`/`poll`/`kill` that `ChildProcesses.wait_for` uses, through os.waitpid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0
                return self.returncode
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ChildrenStopped(RuntimeError):
    """Raised by `ChildProcesses.start` after a stop signal: the orchestrator is exiting."""
