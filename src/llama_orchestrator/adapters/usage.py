"""CPU and memory of the instances' processes, for the dashboards (terminal and web)."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    cpu_percent: float | None  # of one core; None until a second sample exists (psutil measures between two calls)
    memory_bytes: int | None  # resident memory of the process and its children


class PsutilSampler:
    """CPU and memory of real processes. Keeps one ``psutil.Process`` per (pid, create time) across refreshes,
    because ``cpu_percent`` measures the time since the previous call on the same object."""

    def __init__(self) -> None:
        self._processes: dict[tuple[int, float | None], Any] = {}

    def sample(self, pid: int, create_time: float | None) -> Usage:
        import psutil

        key = (pid, create_time)
        process = self._processes.get(key)
        first = process is None
        try:
            if process is None:
                process = psutil.Process(pid)
                self._processes[key] = process
            cpu = process.cpu_percent(interval=None)
            memory = process.memory_info().rss
            for child in process.children(recursive=True):
                try:
                    memory += child.memory_info().rss
                except psutil.Error:
                    continue
        except psutil.Error:
            self._processes.pop(key, None)
            return Usage(None, None)
        return Usage(None if first else cpu, memory)

    def keep_only(self, alive: AbstractSet[tuple[int, float | None]]) -> None:
        """Forget every process not in ``alive`` (pid, create_time)."""
        for key in set(self._processes) - alive:
            del self._processes[key]
