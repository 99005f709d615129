"""Linux and macOS: a new session per instance, signals to its process group, ``flock`` for locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import psutil

from llama_orchestrator.adapters.home import open_private_log
from llama_orchestrator.adapters.io_loop import IoLoop
from llama_orchestrator.adapters.process import (
    Found,
    ProcessHandle,
    Spawned,
    handle_of,
    is_alive,
    scan_marked,
    tree,
)
from llama_orchestrator.adapters.process.exit_watch import (
    ExitWatch,
    PidfdExitWatch,
    ThreadExitWatch,
    pidfds_work,
    posix_wait,
)


class PosixProcesses:
    def exit_watch(self, loop: IoLoop) -> ExitWatch:
        """Linux: pidfds on ``loop``'s selector. macOS (and a kernel without pidfds): a thread per process blocked
        in kqueue (NOTE_EXIT), or looking every half second where there is no kqueue."""
        return PidfdExitWatch(loop) if pidfds_work() else ThreadExitWatch(posix_wait())

    def scan(self, home: Path) -> list[Found]:
        # psutil reads /proc/<pid>/environ (Linux) or sysctl KERN_PROCARGS2 (macOS): the environment at exec time.
        return scan_marked(home, psutil.process_iter)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, stdout: Path, stderr: Path) -> Spawned:
        with open_private_log(stdout) as out, open_private_log(stderr) as err:  # 0600: prompts, tokens
            # start_new_session: the instance leads its own process group, so a Ctrl-C in the terminal that ran
            # `up -d` does not reach it and a stop can signal its whole tree; O_APPEND lets rotation truncate.
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
                close_fds=True,
            )
        try:
            handle = handle_of(popen.pid)
        except psutil.NoSuchProcess:
            # It already exited (and is a zombie we can still reap): record what we can.
            handle = ProcessHandle(popen.pid, 0.0)
        return Spawned(handle, popen)

    def request_stop(self, handle: ProcessHandle) -> None:
        if not is_alive(handle):
            return
        try:
            # The instance leads its group (start_new_session), so the group id is its PID.
            if os.getpgid(handle.pid) == handle.pid:
                os.killpg(handle.pid, signal.SIGTERM)
            else:
                os.kill(handle.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def kill_tree(self, handle: ProcessHandle) -> None:
        members = list(tree(handle))
        leads_group = False
        if is_alive(handle):
            with contextlib.suppress(OSError):
                leads_group = os.getpgid(handle.pid) == handle.pid
        if leads_group:
            # Catches grandchildren that were re-parented but stayed in the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle.pid, signal.SIGKILL)
        for proc in members:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(members, timeout=5)

    def try_lock(self, path: Path) -> _FlockHandle | None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return _FlockHandle(fd)

    @contextlib.contextmanager
    def exclusive_lock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class _FlockHandle:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
