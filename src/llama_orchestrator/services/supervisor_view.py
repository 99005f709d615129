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
        # name -> (pid, checked_at, latency_ms) of the last probe whose verdict changed nothing: merged into the
        # rows by snapshot(), so a probe costs a dict entry here rather than a copy of the row
        self._checks: dict[str, tuple[int | None, float, float | None]] = {}
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
            check = self._checks.get(row.name)
            if check is not None and (check[0] != row.pid or check[1] <= (row.health_checked_at or 0.0)):
                del self._checks[row.name]  # another process's, or older than the row's own
            self._rows[row.name] = row
            if before is None or any(getattr(before, f) != getattr(row, f) for f in _NEWS):
                self.version += 1
                self._changed.notify_all()

    def probed(self, name: str, checked_at: float, latency_ms: float | None, health: str) -> None:
        """A probe's result on the row last published (no new version unless the health changed)."""
        with self._changed:
            row = self._rows.get(name)
            if row is not None and row.health == health:
                self._checks[name] = (row.pid, checked_at, latency_ms)  # the common case: nothing new to copy
                return
        if row is not None:
            self.publish(replace(row, health=health, health_checked_at=checked_at, health_latency_ms=latency_ms))

    def drop(self, name: str) -> None:
        with self._changed:
            self._checks.pop(name, None)
            if self._rows.pop(name, None) is not None:
                self.version += 1
                self._changed.notify_all()

    # -- readers -------------------------------------------------------------------------------------------------

    def snapshot(self) -> tuple[int, dict[str, InstanceRow]]:
        """``(version, {name: row})``: copies, so a reader may keep them."""
        with self._changed:
            return self.version, {name: self._merged(name, row) for name, row in self._rows.items()}

    def _merged(self, name: str, row: InstanceRow) -> InstanceRow:
        check = self._checks.get(name)
        if check is None:
            return replace(row)
        return replace(row, health_checked_at=check[1], health_latency_ms=check[2])

    def wait_newer(self, version: int, timeout: float | None) -> int:
        """Block until the version is past ``version`` (or ``timeout`` seconds); returns the version then."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != version, timeout)
            return self.version
