"""Instance log files: size-bounded rotation, tail and follow.

llama-server writes straight into ``stdout.log``/``stderr.log`` (opened O_APPEND), so an instance keeps logging
when no orchestrator process runs. Rotation is therefore copy-then-truncate, as logrotate's ``copytruncate``: the
writer's file offset follows the truncation because of O_APPEND. Whoever is around rotates: every start, and the
daemon on every tick. A few lines written between the copy and the truncate can be lost; that is the price of
not sitting in the log path.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path


def rotate_if_needed(path: Path, max_bytes: int, keep: int) -> bool:
    """Rotate ``path`` to ``path.1`` (shifting older ones up to ``.keep``) when it is larger than max_bytes."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for index in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    with open(path, "r+b") as live:
        with open(path.with_name(f"{path.name}.1"), "wb") as copy:
            shutil.copyfileobj(live, copy, 1024 * 1024)
        live.truncate(0)
    return True


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a text file (all of them when lines <= 0), read from the end."""
    if not path.exists():
        return []
    if lines <= 0:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        block, data = 8192, b""
        while end > 0 and data.count(b"\n") <= lines:
            start = max(0, end - block)
            handle.seek(start)
            data = handle.read(end - start) + data
            end = start
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


class LogCursor:
    """Reads what was appended to a log file since the last call; survives truncation and recreation."""

    def __init__(self, path: Path, *, from_end: bool = True) -> None:
        self.path = path
        self._from_end = from_end
        self._handle = None
        self._position = 0
        self._pending = b""

    def read_lines(self) -> list[str]:
        if self._handle is None:
            if not self.path.exists():
                return []
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open between calls
            self._position = self._handle.seek(0, os.SEEK_END) if self._from_end else 0
        size = os.fstat(self._handle.fileno()).st_size
        try:
            replaced = os.stat(self.path).st_ino != os.fstat(self._handle.fileno()).st_ino
        except FileNotFoundError:
            replaced = True
        if size < self._position or replaced:
            # Truncated by rotation, or replaced: start again at the beginning of the live file.
            self.close()
            self._from_end = False
            return self.read_lines()
        self._handle.seek(self._position)
        chunk = self._handle.read()
        self._position = self._handle.tell()
        self._pending += chunk
        *complete, self._pending = self._pending.split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in complete]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def follow(
    paths: list[Path], *, stop: Callable[[], bool], poll_s: float = 0.2, from_end: bool = True
) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, line)`` for lines appended to any of ``paths`` until ``stop()`` is true."""
    cursors = [LogCursor(p, from_end=from_end) for p in paths]
    try:
        while True:
            got = False
            for cursor in cursors:
                for line in cursor.read_lines():
                    got = True
                    yield cursor.path, line
            if got:
                continue
            if stop():
                # One last read: lines written just before the stop condition became true.
                for cursor in cursors:
                    for line in cursor.read_lines():
                        yield cursor.path, line
                return
            time.sleep(poll_s)  # polling files: there is no portable change notification to wait on
    finally:
        for cursor in cursors:
            cursor.close()
