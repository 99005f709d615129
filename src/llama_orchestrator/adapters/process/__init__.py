"""Processes, per OS, behind one small interface.

``current()`` returns the implementation for this OS: ``posix.PosixProcesses`` (Linux, macOS: sessions, process
groups, signals, ``flock``) or ``windows.WindowsProcesses`` (process groups, CTRL_BREAK, no console window,
``msvcrt.locking``). Everything above this package speaks only ``ProcessControl``.

A process is identified by ``ProcessHandle``: its PID *and* its create time. A PID whose create time differs is a
different process (the PID was reused) and is never signalled.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

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
    def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, stdout: Path, stderr: Path
    ) -> Spawned:
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
    return data[data.rfind(b")") + 2:].split()


def is_alive(handle: ProcessHandle) -> bool:
    """True when the PID runs *and* is the process we started (same create time); zombies count as dead."""
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
