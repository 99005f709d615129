"""Processes, per OS, behind one small interface.

``current()`` returns the implementation for this OS: ``posix.PosixProcesses`` (Linux, macOS: sessions, process
groups, signals, ``flock``) or ``windows.WindowsProcesses`` (process groups, CTRL_BREAK, no console window,
``msvcrt.locking``). Everything above this package speaks only ``ProcessControl``.

A process is identified by ``ProcessHandle``: its PID *and* its create time. A PID whose create time differs is a
different process (the PID was reused) and is never signalled.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

if TYPE_CHECKING:
    from llama_orchestrator.adapters.io_loop import IoLoop
    from llama_orchestrator.adapters.process.exit_watch import ExitWatch

# psutil rounds create times differently across calls on some platforms; 10 ms apart is the same process.
CREATE_TIME_TOLERANCE = 0.01


@dataclass(frozen=True)
class ProcessHandle:
    pid: int
    create_time: float


@dataclass(frozen=True)
class Spawned:
    handle: ProcessHandle
    # The Popen object while this process is the parent: it reaps the child and learns its exit code.
    popen: object | None = None


class ProcessControl(Protocol):
    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, stdout: Path, stderr: Path) -> Spawned:
        """Start ``argv`` detached from this process (it outlives the caller), output appended to the two files.

        Raises OSError when the binary cannot be executed.
        """

    def request_stop(self, handle: ProcessHandle) -> None:
        """Ask politely (SIGTERM to the process group; CTRL_BREAK on Windows). A dead process is not an error."""

    def kill_tree(self, handle: ProcessHandle) -> None:
        """Kill the process and every descendant, at once. A dead process is not an error."""

    def exclusive_lock(self, path: Path) -> AbstractContextManager[None]:
        """An inter-process lock held for the ``with`` block (blocks until acquired)."""

    def try_lock(self, path: Path) -> HeldLock | None:
        """Take the inter-process lock now, or return None if another process holds it (the daemon's lock)."""

    def exit_watch(self, loop: IoLoop) -> ExitWatch:
        """How this OS tells that a process ended (``exit_watch.py``): pidfds on ``loop`` on Linux, a waiting
        thread per process elsewhere."""

    def scan(self, home: Path) -> list[Found]:
        """The running processes that carry the marker of ``home`` (``domain.launch``): the top one of each
        instance's tree. Processes whose environment we may not read are skipped."""


@dataclass(frozen=True)
class Found:
    """A running process of ours, found by its marker."""

    name: str
    pid: int
    create_time: float

    @property
    def handle(self) -> ProcessHandle:
        return ProcessHandle(self.pid, self.create_time)


def scan_marked(
    home: Path,
    process_iter: Callable[..., Iterable[psutil.Process]],
    *,
    same_path: Callable[[str, str], bool] = lambda a, b: a == b,
    env_key: Callable[[str], str] = lambda key: key,
) -> list[Found]:
    """The scan both OSes share; they differ in how paths and variable names compare (``same_path``, ``env_key``).

    Children inherit the environment, so a marked process whose parent is marked for the same instance is part of
    that instance's tree, not an instance of its own: only the top one counts.
    """
    from llama_orchestrator.domain.launch import MARKER_HOME, MARKER_INSTANCE

    wanted_home, wanted_name = env_key(MARKER_HOME), env_key(MARKER_INSTANCE)
    marked: dict[int, tuple[str, int, float]] = {}  # pid -> (instance, ppid, create_time)
    for process in process_iter():
        try:
            env = {env_key(k): v for k, v in (process.environ() or {}).items()}
            name = env.get(wanted_name)
            if not name or not same_path(env.get(wanted_home, ""), str(home)):
                continue
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            marked[process.pid] = (name, process.ppid(), process.create_time())
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or not ours to read (AccessDenied)
    found = [
        Found(name, pid, created) for pid, (name, ppid, created) in marked.items() if marked.get(ppid, ("",))[0] != name
    ]
    return sorted(found, key=lambda f: (f.name, f.create_time))


class HeldLock(Protocol):
    def release(self) -> None: ...


# Linux fast path: once a handle was verified with psutil, remember its raw start time (field 22 of
# /proc/<pid>/stat, in clock ticks since boot); later checks read that one file and compare, instead of building a
# psutil.Process and reading the file twice. The daemon checks every instance twice a second.
_VERIFIED_START_TICKS: dict[ProcessHandle, bytes] = {}


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
    return data[data.rfind(b")") + 2 :].split()


# Processes an exit watch holds a pidfd of (``exit_watch.PidfdExitWatch``): whether one still runs is a poll of its
# pidfd (readable once it ended), one system call instead of reading /proc, which the daemon and its router ask
# for every instance at every look. The lock keeps a pidfd from being closed (and its number reused) mid-poll.
_PIDFD_CHECKS: dict[ProcessHandle, Callable[[], bool]] = {}
_PIDFD_LOCK = threading.Lock()


def register_pidfd_check(handle: ProcessHandle, ended: Callable[[], bool] | None) -> None:
    """``ended()`` answers for ``handle`` from now on (None: no longer). Called under the lock it is checked with."""
    with _PIDFD_LOCK:
        if ended is None:
            _PIDFD_CHECKS.pop(handle, None)
        else:
            _PIDFD_CHECKS[handle] = ended


def is_alive(handle: ProcessHandle) -> bool:
    """True when the PID runs *and* is the process we started (same create time); zombies count as dead."""
    if _PIDFD_CHECKS:
        with _PIDFD_LOCK:
            ended = _PIDFD_CHECKS.get(handle)
            if ended is not None:
                return not ended()
    known = _VERIFIED_START_TICKS.get(handle)
    if known is not None:
        fields = _stat_fields(handle.pid)
        # fields[0] is the state (field 3), fields[19] the start time (field 22).
        if fields is None or len(fields) < 20 or fields[19] != known:
            _VERIFIED_START_TICKS.pop(handle, None)
            return False
        return fields[0] not in (b"Z", b"X")
    try:
        proc = psutil.Process(handle.pid)
        if abs(proc.create_time() - handle.create_time) > CREATE_TIME_TOLERANCE:
            return False
        alive = proc.status() != psutil.STATUS_ZOMBIE
        if alive and sys.platform.startswith("linux"):
            fields = _stat_fields(handle.pid)
            if fields is not None and len(fields) >= 20:
                if len(_VERIFIED_START_TICKS) > 10_000:
                    _VERIFIED_START_TICKS.clear()
                _VERIFIED_START_TICKS[handle] = fields[19]
        return alive
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return False


def handle_of(pid: int) -> ProcessHandle:
    return ProcessHandle(pid, psutil.Process(pid).create_time())


def descendants(handle: ProcessHandle) -> list[psutil.Process]:
    if not is_alive(handle):
        return []
    try:
        return psutil.Process(handle.pid).children(recursive=True)
    except psutil.Error:
        return []


def tree(handle: ProcessHandle) -> Iterator[psutil.Process]:
    """The process (if it is still ours) and its descendants."""
    if is_alive(handle):
        try:
            yield psutil.Process(handle.pid)
        except psutil.Error:
            return
    yield from descendants(handle)


def current() -> ProcessControl:
    if sys.platform == "win32":
        from llama_orchestrator.adapters.process.windows import WindowsProcesses

        return WindowsProcesses()
    from llama_orchestrator.adapters.process.posix import PosixProcesses

    return PosixProcesses()
