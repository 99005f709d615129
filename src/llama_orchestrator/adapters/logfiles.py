"""Instance log files: size-bounded rotation, tail and follow.

llama-server writes straight into ``stdout.log``/``stderr.log`` (opened O_APPEND), so an instance keeps logging
when no orchestrator process runs. Rotation is therefore copy-then-truncate, as logrotate's ``copytruncate``: the
writer's file offset follows the truncation because of O_APPEND. Whoever is around rotates: every start, and the
daemon on every tick. A few lines written between the copy and the truncate can be lost; that is the price of
not sitting in the log path. A log's time index (``stdout.log.idx``, ``adapters.log_times``) moves with the copy.

Every reader here costs what it returns, not what the file holds: ``tail`` reads backwards in fixed blocks until
it has its lines, and a line longer than ``line_cap`` bytes is returned cut, with a marker that says how long it
was (``… [line cut: 52428800 bytes]``). Finding where a long line starts means scanning its blocks for a newline
(linear in the line, 40 ms for 50 MB); its body is never kept past the cap. Memory stays bounded by the cap and
the block size, whatever one line holds. These functions block on file I/O: async callers run them in a thread
(``api.control`` does), the dashboard in its workers.
"""

from __future__ import annotations

import codecs
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from llama_orchestrator.adapters.home import private_opener

BLOCK_BYTES = 64 * 1024
LINE_CAP_BYTES = 16 * 1024  # a llama-server log line is rarely over 1 KiB; a prompt dumped with -v can be MBs
READ_BUDGET_BYTES = 4 * 1024 * 1024  # one LogCursor.read_lines call reads at most this much
WHOLE_READ_BYTES = 4 * 1024 * 1024  # a tail whose lines span at most this much is read in one piece
INDEX_SUFFIX = ".idx"


def cut_marker(length: int) -> str:
    """What replaces the end of a line longer than the cap; ``length`` is the whole line's size in bytes."""
    return f"… [line cut: {length} bytes]"


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
        if index_path(older).exists():
            os.replace(index_path(older), index_path(path.with_name(f"{path.name}.{index + 1}")))
    rotated = path.with_name(f"{path.name}.1")
    with open(path, "r+b") as live:
        # The copy is as private as the log it copies (0600): logs can hold prompts and tokens.
        with open(rotated, "wb", opener=private_opener) as copy:
            shutil.copyfileobj(live, copy, 1024 * 1024)
        # The time index goes with the copy (its offsets are the copy's); the emptied live file starts a new one.
        try:
            os.replace(index_path(path), index_path(rotated))
        except FileNotFoundError:
            index_path(rotated).unlink(missing_ok=True)
        live.truncate(0)
    return True


def index_path(path: Path) -> Path:
    """The ``(offset, time)`` index of a log file (``adapters.log_times``): ``stdout.log.idx``, ``stdout.log.1.idx``."""
    return path.with_name(f"{path.name}{INDEX_SUFFIX}")


def _decode(data: bytes) -> str:
    line = data[:-1] if data.endswith(b"\r") else data  # CRLF from Windows builds
    return line.decode("utf-8", errors="replace")


def _decode_cut(head: bytes, length: int) -> str:
    # The cap may fall inside a multi-byte character: a non-final incremental decode holds its first bytes back
    # instead of showing a replacement mark.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    return f"{text}{cut_marker(length)}"


def _slice(data: bytes, start: int, end: int, line_cap: int) -> str:
    if end - start <= line_cap:
        return _decode(data[start:end])
    return _decode_cut(data[start : start + line_cap], end - start)


def _line_at(handle: BinaryIO, start: int, end: int, line_cap: int) -> str:
    """The line in bytes [start, end) of ``handle``, cut at ``line_cap`` bytes (only those are read)."""
    length = end - start
    handle.seek(start)
    if length <= line_cap:
        return _decode(handle.read(length))
    return _decode_cut(handle.read(line_cap), length)


def _line_spans(handle: BinaryIO, end: int, wanted: int, floor: int = 0) -> list[tuple[int, int]]:
    """``(start, end)`` byte spans of the last ``wanted`` lines before ``end`` and from ``floor`` on (a line start),
    oldest first.

    Reads backwards one block at a time and keeps only newline positions: a 50 MB line costs 800 reads of 64 KiB
    and no more memory than one block."""
    spans: list[tuple[int, int]] = []
    line_end = end
    position = end
    while position > floor and len(spans) < wanted:
        start = max(floor, position - BLOCK_BYTES)
        handle.seek(start)
        block = handle.read(position - start)
        cut = len(block)
        while len(spans) < wanted:
            newline = block.rfind(b"\n", 0, cut)
            if newline < 0:
                break
            spans.append((start + newline + 1, line_end))
            line_end = start + newline
            cut = newline
        position = start
    if position == floor and len(spans) < wanted:
        spans.append((floor, line_end))  # the first line of the file (or of the range)
    spans.reverse()
    return spans


def tail(path: Path, lines: int, *, line_cap: int = LINE_CAP_BYTES) -> list[str]:
    """The last ``lines`` lines of a text file (all of them when lines <= 0), each cut at ``line_cap`` bytes."""
    try:
        with open(path, "rb") as handle:
            return _tail_of(handle, lines, line_cap)
    except FileNotFoundError:
        return []


def _tail_of(handle: BinaryIO, lines: int, line_cap: int) -> list[str]:
    end = handle.seek(0, os.SEEK_END)
    if end == 0:
        return []
    if lines <= 0:
        handle.seek(0)
        splitter = LineSplitter(line_cap)
        out = []
        while chunk := handle.read(BLOCK_BYTES):
            out += splitter.feed(chunk)
        return out + splitter.flush()
    handle.seek(end - 1)
    if handle.read(1) == b"\n":
        end -= 1  # a final newline ends the last line; it does not start an empty one
    return read_spans(handle, _line_spans(handle, end, lines), line_cap)


def read_spans(handle: BinaryIO, spans: list[tuple[int, int]], line_cap: int = LINE_CAP_BYTES) -> list[str]:
    """The lines at ``spans`` (from ``line_spans_in``), each cut at ``line_cap`` bytes."""
    if not spans:
        return []
    end = spans[-1][1]
    if end - spans[0][0] <= WHOLE_READ_BYTES:
        # Many short lines: one read and slices, rather than a seek and a read per line.
        handle.seek(spans[0][0])
        data, base = handle.read(end - spans[0][0]), spans[0][0]
        return [_slice(data, start - base, stop - base, line_cap) for start, stop in spans]
    return [_line_at(handle, start, stop, line_cap) for start, stop in spans]


def line_start(handle: BinaryIO, offset: int) -> int:
    """Where the line that holds byte ``offset`` starts (``offset`` itself when a line starts there)."""
    return _line_spans(handle, offset, 1)[0][0] if offset > 0 else 0


def line_spans_in(handle: BinaryIO, start: int, stop: int, wanted: int) -> list[tuple[int, int]]:
    """``(start, end)`` spans (newline excluded) of the last ``wanted`` lines that end within ``[start, stop)``;
    ``start`` is a line start. A line cut by ``stop`` is left out, unless ``stop`` is the end of the file (then it
    is the line being written, which a tail shows too)."""
    if stop <= start:
        return []
    size = os.fstat(handle.fileno()).st_size
    handle.seek(stop - 1)
    if handle.read(1) == b"\n":
        end = stop - 1
    elif stop >= size:
        end = stop
    else:
        cut = line_start(handle, stop)
        if cut <= start:
            return []
        end = cut - 1
    return _line_spans(handle, end, wanted, floor=start)


def lines_between(
    handle: BinaryIO, start: int, stop: int, *, line_cap: int = LINE_CAP_BYTES
) -> Iterator[tuple[int, str]]:
    """``(end, line)`` for every line that ends within ``[start, stop)``, read forwards in blocks; ``end`` is the
    offset past its newline. ``start`` is a line start; a line cut by ``stop`` is left out unless ``stop`` is the
    end of the file. Memory: one block and one capped line."""
    splitter = LineSplitter(line_cap)  # the line that runs on from one block into the next
    position = start
    handle.seek(start)
    while position < stop and (chunk := handle.read(min(BLOCK_BYTES, stop - position))):
        *whole, rest = chunk.split(b"\n")
        end = position
        for number, piece in enumerate(whole):
            end += len(piece) + 1
            if number == 0:
                yield end, splitter.feed(piece + b"\n")[0]
            else:
                yield end, _slice(piece, 0, len(piece), line_cap)
        splitter.feed(rest)
        position += len(chunk)
    if position >= os.fstat(handle.fileno()).st_size:
        for line in splitter.flush():
            yield position, line


class LineSplitter:
    """Bytes in, complete lines out, each cut at ``line_cap`` bytes; holds at most ``line_cap`` bytes of the line
    in progress, however long it grows."""

    def __init__(self, line_cap: int = LINE_CAP_BYTES) -> None:
        self.line_cap = line_cap
        self._head = b""  # the first bytes of the line in progress (at most line_cap)
        self._length = 0  # its length so far, bytes past the cap included

    def feed(self, chunk: bytes) -> list[str]:
        out = []
        start = 0
        while (newline := chunk.find(b"\n", start)) >= 0:
            self._add(chunk[start:newline])
            out.append(self._take())
            start = newline + 1
        self._add(chunk[start:])
        return out

    def flush(self) -> list[str]:
        """The unterminated last line, if any (the end of a file that is not being written any more)."""
        return [self._take()] if self._length else []

    def _add(self, piece: bytes) -> None:
        room = self.line_cap - len(self._head)
        if room > 0:
            self._head += piece[:room]
        self._length += len(piece)

    def _take(self) -> str:
        head, length = self._head, self._length
        self._head, self._length = b"", 0
        if length <= self.line_cap:
            return _decode(head)
        return _decode_cut(head, length)


class LogCursor:
    """Reads what was appended to a log file since the last call; survives truncation and recreation.

    Lines are cut at ``line_cap`` bytes; one call reads at most ``READ_BUDGET_BYTES`` (``at_end`` says whether
    more is waiting), so a flood is returned in bounded batches."""

    def __init__(self, path: Path, *, from_end: bool = True, line_cap: int = LINE_CAP_BYTES) -> None:
        self.path = path
        self._from_end = from_end
        self._handle: BinaryIO | None = None
        self._position = 0
        self._splitter = LineSplitter(line_cap)
        self.at_end = True

    def read_lines(self) -> list[str]:
        if self._handle is None:
            if not self.path.exists():
                return []
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open between calls, close() closes it
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
            self._splitter = LineSplitter(self._splitter.line_cap)
            return self.read_lines()
        self._handle.seek(self._position)
        out: list[str] = []
        budget = READ_BUDGET_BYTES
        while budget > 0 and (chunk := self._handle.read(min(BLOCK_BYTES, budget))):
            out += self._splitter.feed(chunk)
            budget -= len(chunk)
        self._position = self._handle.tell()
        self.at_end = self._position >= os.fstat(self._handle.fileno()).st_size
        return out

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_new_lines(cursors: list[LogCursor]) -> tuple[list[tuple[Path, str]], bool]:
    """One pass over ``cursors``: ``(path, line)`` of what was appended, and whether any of them has more to read."""
    lines = [(cursor.path, line) for cursor in cursors for line in cursor.read_lines()]
    return lines, not all(cursor.at_end for cursor in cursors)


def follow(
    paths: list[Path], *, stop: Callable[[], bool], poll_s: float = 0.2, from_end: bool = True
) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, line)`` for lines appended to any of ``paths`` until ``stop()`` is true."""
    cursors = [LogCursor(p, from_end=from_end) for p in paths]
    try:
        while True:
            lines, behind = read_new_lines(cursors)
            yield from lines
            if lines or behind:
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
