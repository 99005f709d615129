"""When a log line was written, from a small index of ``(offset, time)`` points: "by ``time`` the file held
``offset`` bytes". llama-server writes its log itself, so lines carry no time; the daemon, which looks at each log
about once a second while it grows, notes a point whenever it sees it has grown (``adapters.log_times``).

A line's time is the time of the first point at or past its end (its newline included): an upper bound, the moment
someone saw the line was there, within about a second of when it was written. Lines past the last point get the
file's modification time, the only bound left when no daemon watched. Pure: the points and the file's size and
mtime are arguments. Records are text, ``"<offset> <time> <crc32>"`` a line: a torn last record (a crash mid-write)
or one glued to the rest of a torn one fails its checksum and is skipped.
"""

from __future__ import annotations

import bisect
import zlib
from datetime import UTC, datetime
from typing import NamedTuple


class Point(NamedTuple):
    offset: int  # the file's size in bytes ...
    time: float  # ... at this Unix time (or earlier)


def encode_point(point: Point) -> str:
    """One index record, newline included."""
    body = f"{point.offset} {point.time:.6f}"
    return f"{body} {zlib.crc32(body.encode()):08x}\n"


def decode_points(text: str) -> list[Point]:
    """The records of an index file's text that are whole and intact, in file order; others are skipped."""
    points = []
    for record in text.split("\n"):
        fields = record.split(" ")
        if len(fields) != 3 or len(fields[2]) != 8:
            continue
        body = f"{fields[0]} {fields[1]}"
        try:
            if int(fields[2], 16) != zlib.crc32(body.encode()):
                continue
            point = Point(int(fields[0]), float(fields[1]))
        except ValueError:
            continue
        if point.offset >= 0 and point.time == point.time:  # (NaN is not a time)
            points.append(point)
    return points


def usable_points(points: list[Point], size: int, mtime: float) -> list[Point]:
    """The points that describe the file as it is now, ending with ``(size, mtime)``; offsets and times both
    ascend, so both can be searched.

    A point past ``size`` or a fall in offsets belongs to content that was truncated away: only the points after
    the last fall count. A clock set back makes a time smaller than an earlier one: it is raised to that one."""
    current: list[Point] = []
    for point in points:
        if current and point.offset < current[-1].offset:
            current = []  # the file was emptied and written again: earlier points describe other bytes
        current.append(point)
    if any(p.offset > size for p in current):
        current = []  # truncated after these points were noted, and not yet noted again
    out: list[Point] = []
    for point in [*current, Point(size, mtime)]:
        moment = max(point.time, out[-1].time) if out else point.time
        if out and point.offset == out[-1].offset:
            continue  # the first point at an offset is the tightest bound
        out.append(Point(point.offset, moment))
    return out


def time_of(points: list[Point], end: int) -> float:
    """The time of the line that ends (newline included) at byte ``end``; ``points`` from ``usable_points``."""
    index = bisect.bisect_left(points, end, key=lambda p: p.offset)
    return points[min(index, len(points) - 1)].time


def offset_since(points: list[Point], since: float) -> int:
    """Lines that end past this offset have a time at or after ``since``; the ones before it, before ``since``."""
    index = bisect.bisect_left(points, since, key=lambda p: p.time)
    return points[index - 1].offset if index > 0 else 0


def offset_until(points: list[Point], until: float) -> int:
    """Lines that end at or before this offset have a time at or before ``until``; the ones after it, after it."""
    index = bisect.bisect_right(points, until, key=lambda p: p.time)
    return points[index - 1].offset if index > 0 else 0


def thinned(points: list[Point], keep: int) -> list[Point]:
    """At most ``keep`` points for a compacted index: the newest half as they are, every other one of the older.
    A line's bound loosens only where the log is old; repeated, older stretches get sparser still."""
    if len(points) <= keep:
        return list(points)
    recent = points[-(keep // 2) :]
    older = points[: -(keep // 2)]
    step = max(2, -(-len(older) // (keep - len(recent))))
    return older[::step][: keep - len(recent)] + recent


def rfc3339(moment: float) -> str:
    """``2026-12-01T17:14:16.123456Z``: the stamp `logs -t` puts before a line (UTC, microseconds), as Docker's."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def shown_line(text: str, moment: float, *, timestamps: bool) -> str:
    """A log line as `logs` prints it: with ``timestamps``, its ``rfc3339`` time and a space before it."""
    return f"{rfc3339(moment)} {text}" if timestamps else text
