"""Windows: a new process group per instance, no console window, CTRL_BREAK to stop, ``msvcrt.locking`` for locks.

Every call into the Windows API goes through one small object, ``WinApi`` (methods ``popen``, ``send_ctrl_break``,
``lock_byte``, ``unlock_byte``, ``taskkill``, ``wait_exit``). ``WindowsProcesses`` takes it as ``api``; the default
one talks to the real OS and imports ``msvcrt`` only when a lock is taken, so this module imports (and is
unit-tested) on Linux with a fake ``api``. psutil is cross-platform and is used directly.

Known limit of the graceful stop: ``CREATE_NO_WINDOW`` gives the instance its own hidden console, and
``GenerateConsoleCtrlEvent`` (what ``os.kill(pid, CTRL_BREAK_EVENT)`` calls) reaches only processes on the caller's
console. From a process that did not start the instance the call fails and we fall back to ``TerminateProcess``; from
the process that started it, the call "succeeds" without delivering anything (microsoft/terminal#335), and the stop
ends with ``kill_tree`` after the caller's timeout. Either way nothing of ours survives a stop.
"""

from __future__ import annotations

import contextlib
import errno
import ntpath
import os
import signal
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

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
from llama_orchestrator.adapters.process.exit_watch import ExitWatch, ThreadExitWatch

# Process creation flags, from the Win32 headers. ``subprocess`` only defines them on Windows; the values are part of
# the ABI, so we spell them out and the module works (and is tested) everywhere.
CREATE_NEW_PROCESS_GROUP = 0x00000200  # leads its own group: CTRL_BREAK can target it, the terminal's Ctrl-C can't
CREATE_NO_WINDOW = 0x08000000  # console program, but no console window pops up
CREATE_BREAKAWAY_FROM_JOB = 0x01000000  # leave the caller's job, so closing a terminal/job doesn't kill the instance

BASE_CREATIONFLAGS = CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW

# Win32 CTRL_BREAK_EVENT; ``signal.CTRL_BREAK_EVENT`` exists only on Windows.
CTRL_BREAK_EVENT = 1

# msvcrt.locking(LK_LOCK) tries 10 times, one second apart, then fails with EDEADLOCK; EACCES is the other
# "somebody else holds it" answer. Anything else (EBADF, EINVAL) is a real error and is raised.
_LOCK_BUSY_ERRNOS = frozenset({errno.EDEADLOCK, errno.EDEADLK, errno.EACCES})


class WinApi(Protocol):
    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen(argv, **kwargs)``; raises OSError when the program cannot be started."""

    def send_ctrl_break(self, pid: int) -> None:
        """CTRL_BREAK to the process group ``pid``; raises OSError when it cannot be sent."""

    def lock_byte(self, fd: int) -> None:
        """Lock byte 0 of ``fd``; raises OSError (errno EDEADLOCK) when still locked by another after ~10 s."""

    def unlock_byte(self, fd: int) -> None:
        """Unlock byte 0 of ``fd``."""

    def try_lock_byte(self, fd: int) -> bool:
        """Lock byte 0 of ``fd`` without waiting; False when another process holds it."""

    def taskkill(self, pid: int) -> None:
        """``taskkill /T /F /PID pid``: the last resort when psutil could not kill. Never raises."""

    def wait_exit(self, pid: int) -> None:
        """Block until process ``pid`` ends (``WaitForSingleObject``, no polling); returns at once if it is gone."""


class RealWinApi:
    """The Windows calls themselves. Nothing Windows-only is touched before a method runs."""

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(list(argv), **kwargs)

    def send_ctrl_break(self, pid: int) -> None:
        sig = getattr(signal, "CTRL_BREAK_EVENT", None)
        if sig is None:
            # Not Windows: os.kill(pid, 1) would be SIGHUP here. Refuse, so the caller falls back to terminate().
            raise OSError(errno.ENOTSUP, "CTRL_BREAK_EVENT needs Windows")
        # CPython maps this to GenerateConsoleCtrlEvent(CTRL_BREAK_EVENT, pid); the pid is the group id because we
        # spawn with CREATE_NEW_PROCESS_GROUP. It raises OSError when the console refuses.
        os.kill(pid, sig)

    def lock_byte(self, fd: int) -> None:
        import msvcrt  # Windows only; imported here so the module imports elsewhere.

        # msvcrt.locking locks from the current file position: always byte 0, whatever was read or written.
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined]  # Windows only

    def unlock_byte(self, fd: int) -> None:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]  # Windows only

    def try_lock_byte(self, fd: int) -> bool:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]  # Windows only
        except OSError as exc:
            if exc.errno in _LOCK_BUSY_ERRNOS:
                return False
            raise
        return True

    def taskkill(self, pid: int) -> None:
        # An argv list, never a shell; /T takes the tree the system still knows, /F forces it. The full path: a
        # taskkill.exe planted earlier on PATH is not run.
        system32 = ntpath.join(os.environ.get("SYSTEMROOT", r"C:\Windows"), "System32")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [ntpath.join(system32, "taskkill.exe"), "/T", "/F", "/PID", str(pid)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                creationflags=CREATE_NO_WINDOW,
                timeout=10,
                check=False,
            )

    def wait_exit(self, pid: int) -> None:
        # psutil's wait on Windows is OpenProcess(SYNCHRONIZE) + WaitForSingleObject(INFINITE): no CPU meanwhile.
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait()


class WindowsProcesses:
    def __init__(
        self,
        api: WinApi | None = None,
        kill_wait: float = 5.0,
        process_iter: Callable[..., Iterable[psutil.Process]] = psutil.process_iter,
    ) -> None:
        self._api: WinApi = api if api is not None else RealWinApi()
        self._process_iter = process_iter
        # How long kill_tree waits for the killed processes to be gone before it tries taskkill.
        self._kill_wait = kill_wait
        # Cleared the first time CreateProcess refuses to break away: our job membership doesn't change later.
        self._breakaway = True

    def scan(self, home: Path) -> list[Found]:
        """Marked processes of ``home``. Windows spells variable names in any case and paths in any case and with
        either slash, so both compare case-folded and normalised. Windows does not re-parent orphans: a child whose
        marked parent died has a parent PID that is not marked (or reused), and then counts as a top process."""
        return scan_marked(
            home,
            self._process_iter,
            same_path=lambda a, b: bool(a) and ntpath.normcase(a) == ntpath.normcase(b),
            env_key=str.upper,
        )

    def exit_watch(self, loop: IoLoop) -> ExitWatch:
        """Exits told by a thread per process blocked in ``WaitForSingleObject`` (Windows has no pidfd)."""
        return ThreadExitWatch(self._wait_exit)

    def _wait_exit(self, handle: ProcessHandle) -> None:
        if is_alive(handle):  # the PID is still our process (create time): only then is its end ours to wait for
            self._api.wait_exit(handle.pid)

    def creationflags(self) -> int:
        return BASE_CREATIONFLAGS | (CREATE_BREAKAWAY_FROM_JOB if self._breakaway else 0)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, stdout: Path, stderr: Path) -> Spawned:
        with open_private_log(stdout) as out, open_private_log(stderr) as err:  # 0600: prompts, tokens
            popen = self._popen(list(argv), env, cwd, out, err)
        try:
            handle = handle_of(popen.pid)
        except psutil.NoSuchProcess:
            # It already exited: record what we can; the Popen object still knows its exit code.
            handle = ProcessHandle(popen.pid, 0.0)
        return Spawned(handle, popen)

    def _popen(
        self, argv: list[str], env: Mapping[str, str], cwd: Path, out: IO[bytes], err: IO[bytes]
    ) -> subprocess.Popen[bytes]:
        def popen(flags: int) -> subprocess.Popen[bytes]:
            # New process group (CTRL_BREAK can target it; a Ctrl-C in the terminal that ran `up -d` can't), no
            # console window, out of the caller's job (when allowed), so the instance outlives the CLI.
            return self._api.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=dict(env),
                creationflags=flags,
                close_fds=True,
            )

        flags = self.creationflags()
        try:
            return popen(flags)
        except PermissionError:
            if not flags & CREATE_BREAKAWAY_FROM_JOB:
                raise
        # ERROR_ACCESS_DENIED with CREATE_BREAKAWAY_FROM_JOB: the caller's job may forbid breaking away. Spawn inside
        # it. If that fails too, the program itself is the problem and its error is raised; if it works, stop asking.
        popen_ = popen(flags & ~CREATE_BREAKAWAY_FROM_JOB)
        self._breakaway = False
        return popen_

    def request_stop(self, handle: ProcessHandle) -> None:
        if not is_alive(handle):
            # Dead, or the PID now belongs to someone else: nothing to ask.
            return
        try:
            self._api.send_ctrl_break(handle.pid)
        except OSError:
            # The console would not deliver it (the instance has its own console, or we have none). TerminateProcess
            # is all Windows has left. Take the descendants too: once the parent is gone they can't be found.
            self._terminate(list(tree(handle)))

    @staticmethod
    def _terminate(members: list[psutil.Process]) -> None:
        for proc in members:
            # psutil checks the create time before it signals, so a reused PID is left alone; gone is fine.
            with contextlib.suppress(psutil.Error):
                proc.terminate()

    def kill_tree(self, handle: ProcessHandle) -> None:
        # Collect first: Windows does not re-parent orphans, so after the parent dies psutil cannot walk to them.
        members = list(tree(handle))
        if not members:
            return
        for proc in members:  # parent first, so it cannot start new children while we work down the list
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _, alive = psutil.wait_procs(members, timeout=self._kill_wait)
        leftovers = [proc for proc in alive if _still_running(proc)]
        if not leftovers:
            return
        # psutil could not kill them (access denied, or stuck): taskkill, per PID, only for processes still ours.
        for proc in leftovers:
            self._api.taskkill(proc.pid)
        psutil.wait_procs(leftovers, timeout=self._kill_wait)

    @contextlib.contextmanager
    def exclusive_lock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOINHERIT: spawned instances must not inherit the lock file (Python's default too; spelt out for Windows).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOINHERIT", 0), 0o600)
        try:
            self._lock(fd)
            try:
                yield
            finally:
                # Closing the handle also drops the lock, but Windows may do so lazily: unlock explicitly. Don't let
                # an unlock failure hide the block's own exception.
                with contextlib.suppress(OSError):
                    self._api.unlock_byte(fd)
        finally:
            os.close(fd)

    def try_lock(self, path: Path) -> _ByteLock | None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOINHERIT", 0), 0o600)
        if not self._api.try_lock_byte(fd):
            os.close(fd)
            return None
        return _ByteLock(self._api, fd)

    def _lock(self, fd: int) -> None:
        # LK_LOCK gives up after ~10 s, but this lock blocks until acquired (as flock does on POSIX): try again.
        while True:
            try:
                self._api.lock_byte(fd)
                return
            except OSError as exc:
                if exc.errno not in _LOCK_BUSY_ERRNOS:
                    raise


class _ByteLock:
    def __init__(self, api: WinApi, fd: int) -> None:
        self._api = api
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self._api.unlock_byte(self._fd)
            os.close(self._fd)
            self._fd = None


def _still_running(proc: psutil.Process) -> bool:
    try:
        # is_running() compares the create time, so a PID reused meanwhile counts as gone.
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
