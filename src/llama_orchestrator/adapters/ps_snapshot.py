"""`ps` of a home without a daemon, remembered with the stamps of everything it was computed from, so an unchanged
home is not read, validated and settled again (nor pydantic imported: 150-300 ms) on every call.

``LocalInstances.ps`` reads the config files (validated with pydantic), the state database, the binaries registry,
and asks the OS whether the recorded processes still run. The snapshot's key holds the stamps
(``config_cache.stamp``) of the instances folder's entries and their ``config.json``, of ``state.sqlite`` and its
write-ahead log (SQLite WAL: a write lands there first, a checkpoint moves it into the database), and of
``bins/registry.json``; any change there (an edit, `up`, `down`, a health probe's
write) is another key. What no file records is checked on every use: each running instance's process must still
be the one recorded (PID and start time, as ``adapters.process.is_alive``); a snapshot with an instance starting
or stopping (whose `ps` probes or settles it) is never kept. Uptimes are computed again from ``started_at``.

Standard library only: the CLI's fast path (``cli.fast``) reads it before anything heavy is imported.
"""

from __future__ import annotations

import json
import os
import time

from llama_orchestrator.adapters.config_cache import stamp
from llama_orchestrator.adapters.daemon_pidfile import DaemonRecord, alive

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
FILE = "ps-snapshot.json"
KEPT_STATUSES = frozenset({"running", "stopped", "exited", "failed", "invalid-config"})


def key(root: str, include_orphans: bool) -> list[Any] | None:
    """The stamps of everything `ps` reads in the home ``root``; None when they cannot be read."""
    folder = os.path.join(root, "instances")
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        names = []
    except OSError:
        return None
    entries = [[n, stamp(os.path.join(folder, n)), stamp(os.path.join(folder, n, "config.json"))] for n in names]
    state = os.path.join(root, "state")
    database = [stamp(os.path.join(state, f"state.sqlite{suffix}")) for suffix in ("", "-wal", "-journal")]
    if database[1] is not None and database[1][1] == 0:
        database[1] = None  # an empty WAL: a reader's (ours, open meanwhile), no write
    registry = stamp(os.path.join(root, "bins", "registry.json"))
    return [VERSION, include_orphans, stamp(folder), entries, database, registry]


def load(root: str, current: list[Any] | None, now: float | None = None) -> list[dict[str, Any]] | None:
    """The records kept for ``current`` (from ``key``), with uptimes as of ``now``; None when there are none, or
    a process they show running is gone (or cannot be checked here)."""
    if current is None:
        return None
    try:
        with open(os.path.join(root, "state", FILE), encoding="utf-8") as kept:
            data = json.load(kept)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != current:
        return None
    records, checks = data.get("records"), data.get("processes")
    if not isinstance(records, list) or not isinstance(checks, list):
        return None
    for pid, create_time in checks:
        if alive(DaemonRecord(int(pid), float(create_time), None)) is not True:
            return None  # gone (ps would record the exit) or unknown here: compute it
    now = time.time() if now is None else now
    for record in records:
        if record.get("uptime_s") is not None and record.get("started_at"):
            record["uptime_s"] = max(0.0, now - record["started_at"])
    return records


def keepable(records: list[dict[str, Any]]) -> bool:
    return all(r.get("status") in KEPT_STATUSES for r in records)


def save(root: str, at: list[Any], records: list[dict[str, Any]], processes: list[tuple[int, float]]) -> None:
    """Keep ``records`` under the key ``at`` (taken before they were computed, and found unchanged after), with
    the (PID, start time) of each process they show running. 0600: the records name models and hosts."""
    state = os.path.join(root, "state")
    path = os.path.join(state, FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    document = {"key": at, "records": records, "processes": [list(p) for p in processes]}
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(json.dumps(document, default=str))
        os.replace(tmp, path)
    except OSError:  # a read-only home: computed again next time
        try:  # noqa: SIM105 - contextlib costs 4 ms of imports on the fast path
            os.unlink(tmp)
        except OSError:
            pass
