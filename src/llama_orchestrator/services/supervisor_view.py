"""What the supervisor last saw of each instance, for readers on other threads (the router, the API).

The supervisor publishes a row whenever it looks at an instance (a step, a probe's verdict, an exit decided), so a
reader gets the same knowledge without refreshing every instance itself: ``snapshot()`` is a copy of the rows and a
version, ``wait_newer(version, timeout)`` blocks until something a reader cares about changed (status, process,
port, health). ``health_checked_at``/``health_latency_ms`` are those of the last probe, kept in memory (the state
file gets them when the verdict changes and every few seconds).
"""

from __future__ import annotations

import threading
from dataclasses import replace

from llama_orchestrator.adapters.store import InstanceRow

# The fields whose change is news to a reader; the others (timestamps of the last probe) ride along.
_NEWS = ("status", "pid", "create_time", "port", "health", "restart_attempts", "next_restart_at", "last_error")


class SupervisorView:
    def __init__(self) -> None:
        self._rows: dict[str, InstanceRow] = {}
        self._changed = threading.Condition()
        self.version = 0

    # -- the supervisor's side -----------------------------------------------------------------------------------

    def publish(self, row: InstanceRow) -> None:
        with self._changed:
            before = self._rows.get(row.name)
            if (
                before is not None
                and before.pid == row.pid
                and (before.health_checked_at or 0.0) > (row.health_checked_at or 0.0)
            ):
                # The state file has the last check only every few seconds; the one in memory is newer.
                row = replace(
                    row, health_checked_at=before.health_checked_at, health_latency_ms=before.health_latency_ms
                )
            self._rows[row.name] = row
            if before is None or any(getattr(before, f) != getattr(row, f) for f in _NEWS):
                self.version += 1
                self._changed.notify_all()

    def probed(self, name: str, checked_at: float, latency_ms: float | None, health: str) -> None:
        """A probe's result on the row last published (no new version unless the health changed)."""
        with self._changed:
            row = self._rows.get(name)
        if row is not None:
            self.publish(replace(row, health=health, health_checked_at=checked_at, health_latency_ms=latency_ms))

    def drop(self, name: str) -> None:
        with self._changed:
            if self._rows.pop(name, None) is not None:
                self.version += 1
                self._changed.notify_all()

    # -- readers -------------------------------------------------------------------------------------------------

    def snapshot(self) -> tuple[int, dict[str, InstanceRow]]:
        """``(version, {name: row})``: copies, so a reader may keep them."""
        with self._changed:
            return self.version, {name: replace(row) for name, row in self._rows.items()}

    def wait_newer(self, version: int, timeout: float | None) -> int:
        """Block until the version is past ``version`` (or ``timeout`` seconds); returns the version then."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != version, timeout)
            return self.version
