"""What the dashboard shows, computed off the UI thread: table lines, events, an instance's detail, log lines.

Everything here may block (SQLite, config files, psutil, health probes, log files), so the UI calls it only from
Textual thread workers. The UI renders what comes back and calls ``Backend.start``/``stop``; it decides nothing.
Time, CPU/memory sampling, the daemon lookup and the health probe are injectable, so tests are deterministic.

One ``InstanceService`` serves every worker thread: its ``Store`` serialises the one SQLite connection with a lock
(the daemon's workers share it the same way), and the service that started a process is the one that can reap it
and learn its exit code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from llama_orchestrator.adapters.usage import PsutilSampler, Usage
from llama_orchestrator.cli.render import HEALTH_STYLE, STATUS_STYLE, duration, status_text, timestamp
from llama_orchestrator.domain.errors import InstanceNotFound
from llama_orchestrator.domain.states import ACTIVE, Status
from llama_orchestrator.services.health import probe_starting, quick_probe

if TYPE_CHECKING:
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.adapters.store import Event, InstanceRow
    from llama_orchestrator.services.daemon_control import DaemonInfo
    from llama_orchestrator.services.health import Probe
    from llama_orchestrator.services.instances import InstanceService, InstanceView

# (column key, heading) of the instance table, in order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "NAME"),
    ("status", "STATUS"),
    ("health", "HEALTH"),
    ("port", "PORT"),
    ("cpu", "CPU"),
    ("mem", "MEM"),
    ("uptime", "UPTIME"),
    ("restarts", "RESTARTS"),
    ("model", "MODEL"),
)
# The colours: transitional states yellow, dead ones red, stopped dim.
STYLE = {**STATUS_STYLE, "loading": "yellow", "degraded": "yellow", "invalid-config": "bold red"}
# Event kinds that tell an instance's health story (supervisor and `services.health` write them).
HEALTH_KINDS = frozenset(
    {"healthy", "health", "unhealthy", "exited", "backoff", "restarted", "failed", "reset", "start-failed"}
)
EVENT_STYLE = {
    "started": "green", "healthy": "green", "restarted": "yellow", "adopted": "cyan", "autostart": "cyan",
    "backoff": "yellow", "health": "yellow", "stopped": "dim", "exited": "red", "unhealthy": "red",
    "failed": "bold red", "start-failed": "bold red", "error": "bold red",
}  # fmt: skip


# -- CPU and memory --------------------------------------------------------------------------------------------


class Sampler(Protocol):
    def sample(self, pid: int, create_time: float) -> Usage: ...

    def keep_only(self, alive: AbstractSet[tuple[int, float]]) -> None:
        """Forget every process not in ``alive`` (pid, create_time)."""


# -- what the screens show ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    text: str
    style: str = ""


@dataclass(frozen=True)
class InstanceLine:
    """One row of the instance table: ``cells`` in ``COLUMNS`` order."""

    name: str
    status: str
    cells: tuple[Cell, ...]

    def cell(self, key: str) -> Cell:
        return self.cells[[k for k, _ in COLUMNS].index(key)]


@dataclass(frozen=True)
class EventLine:
    id: int
    time: str
    instance: str
    kind: str
    message: str

    @property
    def style(self) -> str:
        return EVENT_STYLE.get(self.kind, "")


@dataclass(frozen=True)
class Snapshot:
    lines: tuple[InstanceLine, ...]
    events: tuple[EventLine, ...]  # only those newer than the ``after_event_id`` asked for
    daemon: DaemonInfo | None
    notice: str


@dataclass(frozen=True)
class Detail:
    name: str
    status: str
    runtime: tuple[tuple[str, str], ...]
    health: tuple[tuple[str, str], ...]
    history: tuple[EventLine, ...]
    config: str  # the config as loaded (defaults filled in), JSON; or why it does not load
    stderr: tuple[str, ...]
    stdout: tuple[str, ...]


def format_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit in ("B", "K") else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}T"  # pragma: no cover - the loop returns at G


def format_cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def clock_time(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def notice_for(daemon: DaemonInfo | None, now: float) -> str:
    if daemon is None:
        return (
            "Supervision is off (no daemon): nothing restarts or health-checks instances. "
            "Start it: llama-orch daemon start"
        )
    return f"Supervised by the daemon (pid {daemon.pid}, up {duration(now - daemon.started_at)})."


def line_for(view: InstanceView, usage: Usage | None, now: float) -> InstanceLine:
    row, config = view.row, view.config
    status = status_text(view)
    status_key = "invalid-config" if view.config_error is not None else row.status
    active = row.status in ACTIVE and view.config_error is None
    health = row.health if active else "-"
    port = config.server.port if config else row.port
    model = config.model.path.replace("\\", "/").rsplit("/", 1)[-1] if config else "-"
    usage = usage or Usage(None, None)
    cells = (
        Cell(view.name, "bold"),
        Cell(status, STYLE.get(status_key, "red")),
        Cell(health, HEALTH_STYLE.get(health, "dim")),
        Cell(str(port) if port else "-"),
        Cell(format_cpu(usage.cpu_percent) if active else "-"),
        Cell(format_bytes(usage.memory_bytes) if active else "-"),
        Cell(duration(view.uptime_s(now))),
        Cell(str(row.restarts), "yellow" if row.restarts else ""),
        Cell(model),
    )
    return InstanceLine(view.name, status_key, cells)


# -- the backend the UI calls from its workers --------------------------------------------------------------------


def _daemon_info(home: Home) -> DaemonInfo | None:
    from llama_orchestrator.services.daemon_control import daemon_info

    return daemon_info(home)


class Backend:
    """The dashboard's access to the service. Every method blocks; call it from a worker thread."""

    def __init__(
        self,
        service: InstanceService,
        *,
        sampler: Sampler | None = None,
        clock: Callable[[], float] = time.time,
        daemon: Callable[[Home], DaemonInfo | None] = _daemon_info,
        probe: Probe | None = quick_probe,
        format_time: Callable[[float], str] = clock_time,
        stop_timeout: float = 10.0,
    ) -> None:
        self.service = service
        self.sampler = sampler or PsutilSampler()
        self.clock = clock
        self.daemon = daemon
        self.probe = probe
        self.format_time = format_time
        self.stop_timeout = stop_timeout

    @property
    def home(self) -> Home:
        return self.service.home

    def snapshot(self, after_event_id: int = 0, *, events: int = 50) -> Snapshot:
        daemon = self.daemon(self.home)
        views = self.service.views() if daemon is None else self._recorded_views()
        if self.probe is not None:
            probe_starting(self.service, views, self.probe)
        now = self.clock()
        alive: set[tuple[int, float]] = set()
        lines = []
        for view in views:
            usage = None
            row = view.row
            if row.status in ACTIVE and row.pid is not None:
                key = (row.pid, row.create_time or 0.0)
                alive.add(key)
                usage = self.sampler.sample(*key)
            lines.append(line_for(view, usage, now))
        self.sampler.keep_only(alive)
        new_events = self.service.store.events(limit=events, after_id=after_event_id)
        return Snapshot(tuple(lines), tuple(self._event_line(e) for e in new_events), daemon, notice_for(daemon, now))

    def _recorded_views(self) -> list[InstanceView]:
        """The state as recorded, not reconciled: the daemon reconciles it, and as the parent of what it started it
        knows exit codes that a reconcile from here would lose."""
        rows = self.service.store.all()
        views = (self._recorded_view(name, rows.get(name)) for name in self.service.names())
        return [view for view in views if view is not None]

    def _recorded_view(self, name: str, row: InstanceRow | None) -> InstanceView | None:
        from llama_orchestrator.adapters.store import InstanceRow
        from llama_orchestrator.domain.errors import ConfigError, InstanceNotFound
        from llama_orchestrator.services.instances import InstanceView

        row, path = row or InstanceRow(name=name), self.home.config_path(name)
        try:
            return InstanceView(name, row, self.service.load(name), config_path=path)
        except ConfigError as exc:
            return InstanceView(name, row, None, exc, path)
        except InstanceNotFound:
            return None  # removed since it was listed

    def _event_line(self, event: Event) -> EventLine:
        return EventLine(event.id, self.format_time(event.ts), event.instance, event.kind, event.message)

    def detail(self, name: str, *, log_lines: int = 10) -> Detail:
        """Blocks (store, log tails): called from a worker thread. Each log line is cut at the tail's line cap."""
        from llama_orchestrator.adapters.logfiles import tail
        from llama_orchestrator.domain.secrets import mask_document

        if self.daemon(self.home) is None:
            view = self.service.view(name)
        else:
            recorded = self._recorded_view(name, self.service.store.get(name))
            if recorded is None:
                raise InstanceNotFound(name)
            view = recorded
        row, now = view.row, self.clock()
        runtime = (
            ("status", status_text(view)),
            ("pid", str(row.pid) if row.pid and row.status in ACTIVE else "-"),
            ("port", str(view.config.server.port if view.config else row.port or "-")),
            ("started", timestamp(row.started_at)),
            ("uptime", duration(view.uptime_s(now))),
            ("stopped", timestamp(row.stopped_at) if row.status not in ACTIVE else "-"),
            ("exit code", "-" if row.exit_code is None else str(row.exit_code)),
            ("restarts", str(row.restarts)),
            ("last error", row.last_error or "-"),
            ("config file", str(view.config_path or "-")),
        )
        latency = "-" if row.health_latency_ms is None else f"{row.health_latency_ms:.0f} ms"
        health = (
            ("health", row.health),
            ("last check", timestamp(row.health_checked_at)),
            ("latency", latency),
            ("error", row.health_error or "-"),
        )
        history = [e for e in self.service.store.events(name, limit=200) if e.kind in HEALTH_KINDS][-10:]
        if view.config is not None:
            # Shown on a screen others may see: env values that look secret are masked.
            config = json.dumps(mask_document(view.config.model_dump(mode="json")), indent=2)
        else:
            config = str(view.config_error or "no config")
        stderr_path, stdout_path = self.home.log_path(name, "stderr"), self.home.log_path(name, "stdout")
        return Detail(
            name=name,
            status=view.row.status,
            runtime=runtime,
            health=health,
            history=tuple(self._event_line(e) for e in history),
            config=config,
            stderr=tuple(tail(stderr_path, log_lines)),
            stdout=tuple(tail(stdout_path, log_lines)),
        )

    def log_paths(self, name: str) -> list[Path]:
        return [self.home.log_path(name, "stdout"), self.home.log_path(name, "stderr")]

    def start(self, name: str) -> str:
        """Start ``name``; raises OrchestratorError (with the user-facing message) when it cannot."""
        outcome = self.service.start(name)
        if outcome.already_running:
            return f"{name} is already {outcome.row.status}"
        self.service.wait_early_exit(name)
        return f"started {name} (pid {outcome.row.pid}, port {outcome.row.port})"

    def stop(self, name: str) -> str:
        row = self.service.stop(name, timeout=self.stop_timeout)
        return f"stopped {name}" if row.status == Status.stopped else f"{name} is {row.status}"


class LogFollower:
    """New lines of several log files since the last call (an instance's stdout and stderr)."""

    def __init__(self, paths: Iterable[Path]) -> None:
        from llama_orchestrator.adapters.logfiles import LogCursor

        # A file that does not exist yet is read from its start once it appears.
        self._cursors = [LogCursor(path, from_end=path.exists()) for path in paths]
        for cursor in self._cursors:
            cursor.read_lines()  # fix the starting position now, before the caller reads the tail

    def read(self) -> list[str]:
        return [line for cursor in self._cursors for line in cursor.read_lines()]

    def close(self) -> None:
        for cursor in self._cursors:
            cursor.close()


def initial_log(paths: Iterable[Path], lines: int = 200) -> list[str]:
    """The last lines of each file (stdout first, then stderr: llama-server logs mostly to stderr)."""
    from llama_orchestrator.adapters.logfiles import tail

    out: list[str] = []
    for path in paths:
        out.extend(tail(path, lines))
    return out
