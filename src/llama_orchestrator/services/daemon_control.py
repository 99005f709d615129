"""Starting, finding and stopping the daemon from another process (the CLI, the dashboard).

The daemon writes ``state/daemon.pid`` (JSON: pid, create_time, started_at, version, api_url) while it holds the lock
``state/daemon.lock``; the PID file alone is never trusted: the process must be alive with the same create time.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from llama_orchestrator.adapters import process as proc
from llama_orchestrator.adapters.home import Home, private_opener
from llama_orchestrator.adapters.logfiles import tail
from llama_orchestrator.domain.errors import OrchestratorError


@dataclass(frozen=True)
class DaemonInfo:
    pid: int
    create_time: float
    started_at: float
    version: str
    # Where its HTTP API answers (None: serving none); pid files of older daemons lack it.
    api_url: str | None = None
    # Written again once it has adopted what runs and booted the supervisor: `daemon start` waits for it.
    ready: bool = False

    @property
    def handle(self) -> proc.ProcessHandle:
        return proc.ProcessHandle(self.pid, self.create_time)


def pid_path(home: Home) -> Path:
    return home.state_dir / "daemon.pid"


def lock_path(home: Home) -> Path:
    return home.state_dir / "daemon.lock"


def log_path(home: Home) -> Path:
    return home.state_dir / "daemon.log"


def output_path(home: Home) -> Path:
    """Where the detached daemon's own stdout/stderr go (tracebacks of a crash land here)."""
    return home.state_dir / "daemon.out"


def write_pid_file(home: Home, info: DaemonInfo) -> None:
    path = pid_path(home)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", opener=private_opener) as out:  # 0600, as the rest of state/
        out.write(json.dumps(asdict(info)))
    tmp.replace(path)


def daemon_info(home: Home) -> DaemonInfo | None:
    """The running daemon of this home, or None (no PID file, or its process is gone or is not the daemon)."""
    try:
        data = json.loads(pid_path(home).read_text())
        known = {f.name for f in fields(DaemonInfo)}
        info = DaemonInfo(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return info if proc.is_alive(info.handle) else None


def start_daemon(home: Home, *, timeout: float = 20.0, processes: proc.ProcessControl | None = None) -> DaemonInfo:
    """Start ``llama-orch daemon run`` detached and wait until it is up (its PID file says ready, its API bound).

    Raises OrchestratorError with the last lines of its log and output when it dies on the way, or is not up in
    ``timeout`` seconds."""
    running = daemon_info(home)
    if running is not None:
        return running
    processes = processes or proc.current()
    home.state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "llama_orchestrator", "--home", str(home.root), "daemon", "run"]
    spawned = processes.spawn(argv, dict(os.environ), home.root, output_path(home), output_path(home))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = daemon_info(home)
        if info is not None and (info.ready or info.pid != spawned.handle.pid):
            return info  # ours is up, or another `daemon start` won the race and its daemon runs
        if not proc.is_alive(spawned.handle):
            # Lost a race with another `daemon start` (it holds the lock), or crashed: say which.
            info = daemon_info(home)
            if info is not None:
                return info
            raise OrchestratorError(f"the daemon exited while starting{_last_words(home)}")
        time.sleep(0.05)
    raise OrchestratorError(f"the daemon did not come up within {timeout:g} s{_last_words(home)}")


def _last_words(home: Home) -> str:
    parts = []
    for path in (log_path(home), output_path(home)):
        lines = tail(path, 10)
        if lines:
            parts.append(f"\nlast lines of {path}:\n" + "\n".join(lines))
    return "".join(parts) or f"; see {log_path(home)}"


def stop_daemon(home: Home, *, timeout: float = 15.0, processes: proc.ProcessControl | None = None) -> bool:
    """Ask the daemon to exit (it leaves the instances running). False when none was running."""
    info = daemon_info(home)
    if info is None:
        return False
    processes = processes or proc.current()
    processes.request_stop(info.handle)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_alive(info.handle):
            return True
        time.sleep(0.05)
    _kill(info.handle)
    return True


def _kill(handle: proc.ProcessHandle) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        psutil.Process(handle.pid).kill()  # only the daemon: its instances live in their own sessions
