"""What the dashboard shows, computed off the UI thread: table lines, events, an instance's detail, log lines.

Everything here may block (the instances port: SQLite, config files and health probes locally, HTTP calls to a
daemon's API otherwise; psutil; log files), so the UI calls it only from Textual thread workers. The UI renders what
comes back and calls ``Backend.start``/``stop``/``restart``/``health``; it decides nothing. Time, CPU/memory
sampling and the daemon lookup are injectable, so tests are deterministic.

The backend reads nothing but the port (``services.instances_port``), the very one the CLI uses: the same records,
whether the instances are this home's or another node's (``--host``). One port serves every worker thread: a
``LocalInstances``'s ``Store`` serialises the one SQLite connection with a lock, and the service that started a
process is the one that can reap it; a ``RemoteInstances``'s httpx client is thread-safe.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llama_orchestrator.adapters.usage import PsutilSampler, Usage
from llama_orchestrator.cli.render import HEALTH_STYLE, STATUS_STYLE, duration, status_text, timestamp
from llama_orchestrator.domain.states import ACTIVE, Status

if TYPE_CHECKING:
    from llama_orchestrator.services.daemon_control import DaemonInfo
    from llama_orchestrator.services.instances_port import InstancesPort, LocalInstances

Record = dict[str, Any]  # services.instances_port.Record: a record of the port (`llama-orch ... --json`)

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
NOT_HERE = "—"  # CPU and memory of another node's processes: not measurable from here
INITIAL_LOG_LINES = 200  # the log screen's first lines
EARLY_EXIT_WAIT_S = 30.0  # the dashboard's start waits this long at most for the early-exit check


# -- CPU and memory --------------------------------------------------------------------------------------------


class Sampler(Protocol):
    def sample(self, pid: int, create_time: float | None) -> Usage: ...

    def keep_only(self, alive: AbstractSet[tuple[int, float | None]]) -> None:
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


def notice_for(daemon: DaemonInfo | None, now: float, at: str = "") -> str:
    """``at``: where the daemon is, when it is not this home's (`` at http://gpu-box:8000``)."""
    if daemon is None:
        return (
            "Supervision is off (no daemon): nothing restarts or health-checks instances. "
            "Start it: llama-orch daemon start"
        )
    pid = f"pid {daemon.pid}, " if daemon.pid else ""
    return f"Supervised by the daemon{at} ({pid}up {duration(now - daemon.started_at)})."


def line_for(record: Record, usage: Usage | None, uptime_s: float | None, *, sampled: bool = True) -> InstanceLine:
    """A table line from a ps record (``services.instances_port.ps_record``). ``sampled``: CPU and memory were
    measurable (this machine's processes); else they show as ``—`` while the instance runs."""
    status_key = str(record["status"])  # `invalid-config` when the config does not load
    active = status_key in ACTIVE
    health = str(record["health"]) if active else "-"
    port = record.get("port")
    model_path = record.get("model")
    model = str(model_path).replace("\\", "/").rsplit("/", 1)[-1] if model_path else "-"
    usage = usage or Usage(None, None)
    restarts = int(record.get("restarts") or 0)
    if not active:
        cpu = mem = "-"
    elif sampled:
        cpu, mem = format_cpu(usage.cpu_percent), format_bytes(usage.memory_bytes)
    else:
        cpu = mem = NOT_HERE
    cells = (
        Cell(str(record["name"]), "bold"),
        Cell(status_text(record), STYLE.get(status_key, "red")),
        Cell(health, HEALTH_STYLE.get(health, "dim")),
        Cell(str(port) if port else "-"),
        Cell(cpu),
        Cell(mem),
        Cell(duration(uptime_s)),
        Cell(str(restarts), "yellow" if restarts else ""),
        Cell(model),
    )
    return InstanceLine(str(record["name"]), status_key, cells)


# -- the backend the UI calls from its workers --------------------------------------------------------------------


def _local_daemon(port: LocalInstances) -> Callable[[], DaemonInfo | None]:
    from llama_orchestrator.services.daemon_control import daemon_info

    return lambda: daemon_info(port.service.home)


def _remote_daemon(ping: Callable[[], Record], clock: Callable[[], float]) -> Callable[[], DaemonInfo | None]:
    """The daemon behind an API (``GET /api/daemon``). Its start time is taken on this machine's clock, from the
    uptime it reports: another node's clock may differ from ours."""
    from llama_orchestrator.services.daemon_control import DaemonInfo

    def lookup() -> DaemonInfo:
        record = ping()
        uptime = record.get("uptime_s")
        started_at = clock() - uptime if isinstance(uptime, int | float) else None
        return DaemonInfo(
            pid=record.get("pid") or 0,
            create_time=0.0,
            started_at=started_at if started_at is not None else clock(),
            version=str(record.get("version", "?")),
            api_url=record.get("api_url"),
        )

    return lookup


class Backend:
    """The dashboard's access to the instances: an ``InstancesPort``, the one the CLI uses (``LocalInstances`` on a
    home, ``RemoteInstances`` over a daemon's API, this home's or another node's with ``--host``). Every method
    blocks; call it from a worker thread.

    ``same_machine``: the port's pids and clock are this machine's (a local home, or this home's daemon), so CPU
    and memory are sampled here and uptimes are counted on the injected clock. Another node's are not: its CPU
    and memory show as ``—`` and its uptimes are the ones it reports. By default, only a ``LocalInstances`` is.
    """

    def __init__(
        self,
        port: InstancesPort,
        *,
        same_machine: bool | None = None,
        sampler: Sampler | None = None,
        clock: Callable[[], float] = time.time,
        daemon: Callable[[], DaemonInfo | None] | None = None,
        format_time: Callable[[float], str] = clock_time,
        stop_timeout: float = 10.0,
    ) -> None:
        from llama_orchestrator.services.instances_port import LocalInstances

        self.port = port
        self.local = isinstance(port, LocalInstances)
        self.same_machine = self.local if same_machine is None else same_machine
        self.sampler = sampler or PsutilSampler()
        self.clock = clock
        if daemon is None:
            ping = getattr(port, "ping", None)
            if isinstance(port, LocalInstances):
                daemon = _local_daemon(port)
            elif ping is not None:
                daemon = _remote_daemon(ping, clock)
            else:
                daemon = lambda: None  # noqa: E731 - a port that cannot tell: no notice about supervision
        self.daemon = daemon
        self.format_time = format_time
        self.stop_timeout = stop_timeout

    @property
    def origin(self) -> str:
        return self.port.origin

    def snapshot(self, after_event_id: int = 0, *, events: int = 50) -> Snapshot:
        daemon = self.daemon()
        records = self.port.ps()
        now = self.clock()
        alive: set[tuple[int, float | None]] = set()
        lines = []
        for record in records:
            usage: Usage | None = None
            pid = record.get("pid")
            if self.same_machine and record["status"] in ACTIVE and pid is not None:
                # No create time in a record: a pid reused by another process is told apart by the sampler's
                # psutil.Process, which stops answering for the old one.
                key = (int(pid), None)
                alive.add(key)
                usage = self.sampler.sample(*key)
            lines.append(line_for(record, usage, self._uptime(record, now), sampled=self.same_machine))
        self.sampler.keep_only(alive)
        new_events = self.port.events(limit=events, after_id=after_event_id)
        at = "" if self.local else f" at {self.origin}"
        return Snapshot(
            tuple(lines), tuple(self._event_line(e) for e in new_events), daemon, notice_for(daemon, now, at)
        )

    def _uptime(self, record: Record, now: float) -> float | None:
        if not self.same_machine:
            return record.get("uptime_s")
        started_at = record.get("started_at")
        if record["status"] in ACTIVE and started_at:
            return max(0.0, now - started_at)
        return None

    def _event_line(self, event: Record) -> EventLine:
        return EventLine(
            int(event["id"]), self.format_time(event["time"]), event["instance"], event["kind"], event["message"]
        )

    def detail(self, name: str, *, log_lines: int = 10) -> Detail:
        """Blocks (the port: the store, or the daemon's API): called from a worker thread. Each log line is cut at
        the tail's line cap (``adapters.logfiles``, on the side that reads the file)."""
        record, now = self.port.runtime(name), self.clock()
        status = str(record["status"])
        active = status in ACTIVE
        exit_code = record.get("exit_code")
        runtime = (
            ("status", status_text(record)),
            ("pid", str(record["pid"]) if record.get("pid") and active else "-"),
            ("port", str(record.get("port") or "-")),
            ("started", timestamp(record.get("started_at"))),
            ("uptime", duration(self._uptime(record, now))),
            ("stopped", timestamp(record.get("stopped_at")) if not active else "-"),
            ("exit code", "-" if exit_code is None else str(exit_code)),
            ("restarts", str(record.get("restarts", 0))),
            ("last error", record.get("last_error") or "-"),
            ("config file", record.get("config_path") or "-"),
        )
        latency_ms = record.get("health_latency_ms")
        health = (
            ("health", str(record["health"])),
            ("last check", timestamp(record.get("health_checked_at"))),
            ("latency", "-" if latency_ms is None else f"{latency_ms:.0f} ms"),
            ("error", record.get("health_error") or "-"),
        )
        history = [e for e in self.port.events(name, limit=200) if e["kind"] in HEALTH_KINDS][-10:]
        config_doc = record.get("config")
        config = json.dumps(config_doc, indent=2) if config_doc is not None else record.get("config_error")
        return Detail(
            name=name,
            status=status,
            runtime=runtime,
            health=health,
            history=tuple(self._event_line(e) for e in history),
            config=config or "no config",
            stderr=tuple(self.port.logs(name, tail=log_lines, streams=("stderr",))),
            stdout=tuple(self.port.logs(name, tail=log_lines, streams=("stdout",))),
        )

    def follow(self, name: str) -> LogFeed:
        """The log screen's lines: the last ones of stdout and stderr, then each new line. Locally the files are
        read from here; through an API, its followed log stream (``GET /api/instances/{name}/logs?follow``)."""
        from llama_orchestrator.services.instances_port import LocalInstances

        if isinstance(self.port, LocalInstances):
            return FileFeed(self.port.log_paths(name))
        return StreamFeed(self.port.logs(name, tail=INITIAL_LOG_LINES, follow=True))

    def start(self, name: str) -> str:
        """Start ``name``; raises OrchestratorError (with the user-facing message) when it cannot."""
        record = self.port.start(name)
        if record["already_running"]:
            return f"{name} is already {record['status']}"
        self.port.wait(name, until="started", timeout=EARLY_EXIT_WAIT_S)  # StartError when it exits at once
        return f"started {name} (pid {record['pid']}, port {record['port']})"

    def stop(self, name: str) -> str:
        record = self.port.stop(name, self.stop_timeout)
        status = record["status"]
        return f"stopped {name}" if status == Status.stopped else f"{name} is {status}"

    def restart(self, name: str) -> str:
        record = self.port.restart(name, timeout=self.stop_timeout)
        return f"restarted {name} (pid {record['pid']}, port {record['port']})"

    def health(self, name: str) -> str:
        """Probe ``name`` now (``llama-orch health NAME``) and say what it answered."""
        record = self.port.health([name])[0]
        if record["health"] == "not running":
            return f"{name} is not running ({record['status']})"
        latency = record.get("response_ms")
        text = f"{name}: {record['health']}" + (f" in {latency:.0f} ms" if latency is not None else "")
        detail = record.get("detail")
        return f"{text} ({detail})" if detail else text


class LogFeed(Protocol):
    def read(self) -> list[str]:
        """The lines that came since the last call, without waiting for any."""

    def close(self) -> None: ...


class FileFeed:
    """An instance's log files on this machine: their last lines first, then what is written to them."""

    def __init__(self, paths: list[Path], lines: int = INITIAL_LOG_LINES) -> None:
        self._follower = LogFollower(paths)  # placed at the ends first: a line written meanwhile is not lost
        self._pending = initial_log(paths, lines)

    def read(self) -> list[str]:
        lines, self._pending = self._pending + self._follower.read(), []
        return lines

    def close(self) -> None:
        self._follower.close()


class StreamFeed:
    """The lines of a stream that blocks until its next line (a followed log through the API), read by a daemon
    thread of its own so that ``read`` never waits.

    Bounded: a screen that falls behind loses the oldest lines beyond ``keep`` (its log widget keeps 5000 anyway).
    After ``close`` the thread drops what comes and ends at the stream's next line, or when the stream ends (the
    daemon ends its streams when it stops); a thread cannot interrupt a blocking read portably.
    """

    def __init__(self, lines: Iterator[str], keep: int = 5000) -> None:
        self._lines: deque[str] = deque(maxlen=keep)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(lines,), daemon=True, name="dashboard-log")
        self._thread.start()

    def _pump(self, lines: Iterator[str]) -> None:
        try:
            for line in lines:
                if self._closed.is_set():
                    break
                self._lines.append(line)
        except Exception as exc:  # noqa: BLE001 - shown as the log's last line, as the CLI's `logs -f` would say it
            if not self._closed.is_set():
                self._lines.append(f"(the log stream ended: {exc})")
        finally:
            close = getattr(lines, "close", None)
            if close is not None:
                close()

    def read(self) -> list[str]:
        out = []
        while self._lines:
            out.append(self._lines.popleft())
        return out

    def close(self) -> None:
        self._closed.set()


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
