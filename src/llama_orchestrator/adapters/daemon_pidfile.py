"""The daemon's PID file (``state/daemon.pid``) read with the standard library alone, for the CLI's fast path.

``services.daemon_control.daemon_info`` is the full reading (it imports the process adapter and psutil); this one
answers the same question, "does this home's daemon run, and where is its API?", from ``/proc`` on Linux, and says
"cannot tell" elsewhere, where the caller takes the full path.
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False  # typing and pathlib stay unimported: the fast path counts milliseconds
if TYPE_CHECKING:
    from pathlib import Path

CREATE_TIME_TOLERANCE = 0.01  # adapters.process.CREATE_TIME_TOLERANCE


class DaemonRecord:
    """What the PID file says (a plain class: ``dataclasses`` imports ``inspect``, about 8 ms)."""

    __slots__ = ("api_url", "create_time", "pid")

    def __init__(self, pid: int, create_time: float, api_url: str | None) -> None:
        self.pid = pid
        self.create_time = create_time
        self.api_url = api_url


def read(state_dir: str | Path) -> DaemonRecord | None:
    """The PID file's record, or None when there is none (or it is unreadable, as ``daemon_info`` treats it)."""
    try:
        with open(os.path.join(state_dir, "daemon.pid"), encoding="utf-8") as file:
            data = json.load(file)
        api_url = data.get("api_url")
        return DaemonRecord(int(data["pid"]), float(data["create_time"]), api_url if isinstance(api_url, str) else None)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def alive(record: DaemonRecord) -> bool | None:
    """True when the PID runs and is the process that wrote the file (its start time, as psutil computes it on
    Linux: boot time + start ticks / CLK_TCK), zombies dead; None when this cannot be told without psutil."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(f"/proc/{record.pid}/stat", "rb") as proc:
            stat = proc.read()
        with open("/proc/stat", "rb") as boot:
            btime = next(float(line.split()[1]) for line in boot if line.startswith(b"btime"))
        ticks = os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        return False  # no such process
    except (OSError, ValueError, StopIteration, IndexError):
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": fields[0] is field 3 (the state)
    if len(fields) < 20:
        return None
    if fields[0] in (b"Z", b"X"):
        return False
    created = float(fields[19]) / ticks + btime  # field 22, starttime
    return abs(created - record.create_time) <= CREATE_TIME_TOLERANCE
