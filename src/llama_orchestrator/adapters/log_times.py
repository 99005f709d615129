"""The time index of a log file (``stdout.log.idx`` beside ``stdout.log``) and the log's lines with their times.

llama-server's lines carry no wall-clock time, so the daemon notes ``(size, mtime)`` whenever it sees a log has
grown (``services.daemon``, at most about once a second while it grows): the file's mtime is when its last byte was
written, so every line up to that size was there by then. ``domain.log_times`` turns the points into a time per
line. The index is append-only text, private (0600), and compacted when it passes ``MAX_INDEX_BYTES``; rotation
moves it with the copy (``logfiles.rotate_if_needed``). Without it (no daemon ever watched), every line gets the
file's mtime: the only bound known.

``timed_lines`` costs what it returns: it seeks to the offset the index gives for ``since`` and reads backwards
from the one for ``until`` for a tail, never the whole file.
"""

from __future__ import annotations

import bisect
import heapq
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from llama_orchestrator.adapters.home import create_private, private_opener
from llama_orchestrator.adapters.logfiles import (
    LINE_CAP_BYTES,
    index_path,
    line_spans_in,
    line_start,
    lines_between,
    read_spans,
)
from llama_orchestrator.domain.log_times import (
    Point,
    decode_points,
    encode_point,
    offset_since,
    offset_until,
    thinned,
    time_of,
    usable_points,
)

MAX_INDEX_BYTES = 256 * 1024  # about 6,500 points: two hours of a log growing every second, then compacted
RECORD_BYTES = 40  # about: "52428800 1733050000.123456 1a2b3c4d\n"
POINT_EVERY_S = 1.0  # the daemon looks at a growing log (and notes a point) at least this often


class TimedLine(NamedTuple):
    time: float  # when it was seen written (an upper bound; see domain.log_times)
    path: Path  # the log it is from
    text: str


def note_growth(log: Path, size: int, mtime: float, *, restart: bool = False) -> None:
    """Note that ``log`` held ``size`` bytes at ``mtime``. ``restart``: the log was emptied (not by our rotation,
    which moves the index itself): the old points describe bytes that are gone. Compacts the index past its cap."""
    # Raw descriptor calls, not open(): the daemon does this about once a second for every growing log, and a
    # text-mode file object (codec, buffer, wrapper) cost several times the three system calls it makes.
    fd = create_private(index_path(log), os.O_WRONLY | (os.O_TRUNC if restart else os.O_APPEND))
    try:
        os.write(fd, encode_point(Point(size, mtime)).encode("ascii"))
        grown = os.lseek(fd, 0, os.SEEK_END) > MAX_INDEX_BYTES
    finally:
        os.close(fd)
    if grown:
        compact(log)


def read_points(log: Path) -> list[Point]:
    """The intact points of ``log``'s index ([] without one). Reads at most twice the cap, from its end."""
    try:
        with open(index_path(log), "rb") as index:
            size = index.seek(0, os.SEEK_END)
            index.seek(max(0, size - 2 * MAX_INDEX_BYTES))
            return decode_points(index.read().decode("ascii", errors="replace"))
    except FileNotFoundError:
        return []


def compact(log: Path) -> None:
    """Rewrite the index with about half its points (``domain.log_times.thinned``), atomically."""
    points = read_points(log)
    keep = MAX_INDEX_BYTES // 2 // RECORD_BYTES
    path = index_path(log)
    spare = path.with_name(path.name + ".new")
    with open(spare, "w", encoding="ascii", opener=private_opener) as out:
        out.writelines(encode_point(p) for p in thinned(points, keep))
    os.replace(spare, path)


def timed_lines(
    paths: list[Path],
    *,
    tail: int = 0,
    since: float | None = None,
    until: float | None = None,
    line_cap: int = LINE_CAP_BYTES,
) -> Iterator[TimedLine]:
    """The lines of ``paths`` written from ``since`` to ``until`` (Unix times, inclusive), merged in time order (a
    tie keeps the order of ``paths``); with ``tail`` > 0 only the last ``tail`` of them. Memory: ``tail`` lines, or
    one line a file when ``tail`` is 0 (all); a missing file has no lines."""
    if tail > 0:
        merged = heapq.merge(*(_last_lines(p, tail, since, until, line_cap) for p in paths), key=lambda t: t.time)
        return iter(list(merged)[-tail:])
    if len(paths) == 1:
        return _all_lines(paths[0], since, until, line_cap)  # nothing to merge (a merge costs a third more)
    return heapq.merge(*(_all_lines(p, since, until, line_cap) for p in paths), key=lambda t: t.time)


def _range(handle: BinaryIO, log: Path, since: float | None, until: float | None) -> tuple[list[Point], int, int]:
    """The usable points of an open log, and the byte range ``[start, stop)`` of its lines from since to until."""
    stat = os.fstat(handle.fileno())
    points = usable_points(read_points(log), stat.st_size, stat.st_mtime)
    start = line_start(handle, offset_since(points, since)) if since is not None else 0
    stop = offset_until(points, until) if until is not None else stat.st_size
    return points, start, stop


def _wanted(moment: float, since: float | None, until: float | None) -> bool:
    # The offsets already bound the range; this catches a line being written at the end, which ends at no point.
    return (since is None or moment >= since) and (until is None or moment <= until)


def _last_lines(log: Path, wanted: int, since: float | None, until: float | None, line_cap: int) -> list[TimedLine]:
    try:
        handle = open(log, "rb")  # noqa: SIM115 - closed below; a with block would nest the whole function
    except FileNotFoundError:
        return []
    with handle:
        points, start, stop = _range(handle, log, since, until)
        spans = line_spans_in(handle, start, stop, wanted)
        texts = read_spans(handle, spans, line_cap)
    lines = [TimedLine(time_of(points, end + 1), log, text) for (_, end), text in zip(spans, texts, strict=True)]
    return [line for line in lines if _wanted(line.time, since, until)]


def _all_lines(log: Path, since: float | None, until: float | None, line_cap: int) -> Iterator[TimedLine]:
    try:
        handle = open(log, "rb")  # noqa: SIM115 - closed when the generator ends or is closed
    except FileNotFoundError:
        return
    with handle:
        points, start, stop = _range(handle, log, since, until)
        at = bisect.bisect_left(points, start, key=lambda p: p.offset)
        for end, text in lines_between(handle, start, stop, line_cap=line_cap):
            while at < len(points) - 1 and points[at].offset < end:
                at += 1  # the lines come in file order: time_of's search, walked
            moment = points[at].time
            if _wanted(moment, since, until):
                yield TimedLine(moment, log, text)
