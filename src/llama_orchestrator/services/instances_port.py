"""What the front ends (CLI, dashboard, control API) do to instances, as one port with two implementations.

``InstancesPort`` returns plain dicts, the same records `llama-orch ... --json` prints, so a record looks the same
whether it was built here or travelled through the daemon's HTTP API:

* ``LocalInstances`` (this module): the InstanceService on this machine's home. The CLI uses it when no daemon
  runs; the daemon's control API uses it too, so both build the very same records.
* ``RemoteInstances`` (``adapters.api_client``): the daemon's control API over HTTP, used when the home's daemon
  serves one, or for another node's daemon (``--host``).

Every method raises the project's errors (``domain.errors``): InstanceNotFound, UsageError, ConfigError,
StartError.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

from llama_orchestrator.domain.states import ACTIVE

if TYPE_CHECKING:
    from llama_orchestrator.adapters.store import Event
    from llama_orchestrator.services.instances import InstanceService, InstanceView

Record = dict[str, Any]
WaitUntil = Literal["healthy", "started"]
STREAMS = ("stdout", "stderr")


class InstancesPort(Protocol):
    origin: str  # "local", or the URL of the daemon's API: for messages

    def names(self, *, autostart_only: bool = False) -> list[str]:
        """Configured instance names, sorted."""

    def ps(self, *, include_orphans: bool = False) -> list[Record]:
        """One ``ps_record`` per instance."""

    def describe(self, name: str) -> Record:
        """``ps_record`` + config, model file metadata and recent events. Raises InstanceNotFound."""

    def start(self, name: str) -> Record:
        """Start unless it runs: ``{name, already_running, status, pid, port, restart_policy}``. Raises StartError."""

    def wait(self, name: str, *, until: WaitUntil, timeout: float) -> Record:
        """``healthy``: until it answers 200 (StartError when it exits or ``timeout`` passes); ``started``: catch an
        exit right after start (StartError). Returns its ``ps_record``."""

    def stop(self, name: str, timeout: float = 10.0) -> Record:
        """Stop gracefully, then kill the tree: ``{name, was_running, status}``."""

    def restart(self, name: str, *, timeout: float = 10.0, wait: bool = False, wait_timeout: float = 120.0) -> Record:
        """Stop, then start again; with ``wait``, until healthy: ``{name, pid, port, healthy}``."""

    def health(self, names: list[str] | None = None) -> list[Record]:
        """Probe now (all active instances when ``names`` is None): ``{name, status, health, response_ms, ...}``."""

    def events(self, name: str | None = None, *, limit: int = 30, after_id: int = 0) -> list[Record]:
        """``{id, time, instance, kind, message}``, oldest first."""

    def logs(
        self, name: str, *, tail: int = 50, streams: tuple[str, ...] = STREAMS, follow: bool = False
    ) -> Iterator[str]:
        """The last ``tail`` lines (0: all), then, with ``follow``, new lines until the caller stops iterating."""

    def attach(self, names: list[str]) -> Iterator[tuple[str, str]]:
        """``(name, line)`` of the instances' logs from their beginning until every one of them has exited."""


# -- records -----------------------------------------------------------------------------------------------------


def timestamp(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def ps_record(view: InstanceView, now: float) -> Record:
    config, row = view.config, view.row
    return {
        "name": view.name,
        "status": row.status if view.config_error is None else "invalid-config",
        "health": row.health,
        "pid": row.pid if row.status in ("starting", "running", "stopping") else None,
        "port": config.server.port if config else row.port,
        "host": config.server.host if config else None,
        "backend": config.gpu.backend if config else None,
        "model": config.model.path if config else None,
        "uptime_s": view.uptime_s(now),
        "restarts": row.restarts,
        "exit_code": row.exit_code,
        "started_at": row.started_at,
        "last_error": row.last_error or (str(view.config_error) if view.config_error else None),
        "autostart": config.autostart if config else False,
    }


def event_record(event: Event) -> Record:
    return {"id": event.id, "time": event.ts, "instance": event.instance, "kind": event.kind, "message": event.message}


# -- local --------------------------------------------------------------------------------------------------------


class LocalInstances:
    """The port over the InstanceService of a home on this machine.

    ``probe_starting``: without a daemon nobody moves `starting` to `running`, so `ps` probes those instances once
    (the CLI); the daemon's API leaves that to the supervisor.
    """

    origin = "local"

    def __init__(self, service: InstanceService, *, probe_starting: bool = True) -> None:
        self.service = service
        self.probe_starting = probe_starting

    def names(self, *, autostart_only: bool = False) -> list[str]:
        from llama_orchestrator.domain.errors import ConfigError

        names = self.service.names()
        if not autostart_only:
            return names

        def autostart(name: str) -> bool:
            try:
                return self.service.load(name).autostart
            except ConfigError:
                return True  # `up --all` then reports the broken config instead of silently skipping it

        return [n for n in names if autostart(n)]

    def ps(self, *, include_orphans: bool = False) -> list[Record]:
        views = self.service.views(include_orphans=include_orphans)
        if self.probe_starting:
            from llama_orchestrator.services.health import probe_starting

            probe_starting(self.service, views)
        now = time.time()
        return [ps_record(v, now) for v in views]

    def describe(self, name: str) -> Record:
        from llama_orchestrator.domain.errors import InstanceNotFound

        svc = self.service
        view = svc.view(name)
        if view.config is None and view.config_error is None:
            raise InstanceNotFound(name)
        gguf: dict | str | None = None
        if view.config is not None:
            from llama_orchestrator.adapters.gguf_meta import read_gguf_info

            model = view.config.model_path(svc.home.config_path(name).parent)
            try:
                gguf = read_gguf_info(model).as_dict()
            except FileNotFoundError:
                gguf = f"model file not found: {model}"
            except Exception as exc:  # noqa: BLE001 - any reader failure is shown, not fatal
                gguf = f"cannot read GGUF metadata: {exc}"
        events = svc.store.events(name, limit=15)
        return {
            **ps_record(view, time.time()),
            "config_path": str(view.config_path),
            "config": view.config.to_document() if view.config else None,
            "config_error": str(view.config_error) if view.config_error else None,
            "model_file": gguf,
            "events": [{"time": timestamp(e.ts), "ts": e.ts, "kind": e.kind, "message": e.message} for e in events],
        }

    def start(self, name: str) -> Record:
        self.service.home.checked_name(name)
        config = self.service.load(name)
        outcome = self.service.start(name)
        row = outcome.row
        return {
            "name": name,
            "already_running": outcome.already_running,
            "status": row.status,
            "pid": row.pid,
            "port": row.port or config.server.port,
            "restart_policy": config.restart.policy,
        }

    def wait(self, name: str, *, until: WaitUntil, timeout: float) -> Record:
        if until == "healthy":
            self.service.wait_healthy(name, timeout)
        else:
            self.service.wait_early_exit(name)
        return ps_record(self.service.view(name), time.time())

    def stop(self, name: str, timeout: float = 10.0) -> Record:
        self.service.home.checked_name(name)
        before = self.service.refresh(name)
        row = self.service.stop(name, timeout)
        return {"name": name, "was_running": before.status in ACTIVE, "status": row.status}

    def restart(self, name: str, *, timeout: float = 10.0, wait: bool = False, wait_timeout: float = 120.0) -> Record:
        svc = self.service
        svc.home.checked_name(name)
        svc.load(name)  # a broken config is reported before the running instance is stopped
        svc.stop(name, timeout)
        outcome = svc.start(name)
        if wait:
            svc.wait_healthy(name, wait_timeout)
        return {"name": name, "pid": outcome.row.pid, "port": outcome.row.port, "healthy": wait}

    def health(self, names: list[str] | None = None) -> list[Record]:
        svc = self.service
        chosen = names if names is not None else [n for n in svc.names() if svc.refresh(n).status in ACTIVE]
        return [self.health_of(name) for name in chosen]

    def health_of(self, name: str) -> Record:
        from llama_orchestrator.services.health import check_once

        svc = self.service
        svc.home.checked_name(name)
        config, row = svc.load(name), svc.refresh(name)
        if row.status not in ACTIVE:
            return {"name": name, "health": "not running", "status": row.status}
        result = check_once(svc, name, config, row)
        latency = result.outcome.latency_ms
        return {
            "name": name,
            "status": svc.refresh(name).status,
            "health": str(result.health),
            "response_ms": round(latency, 1) if latency is not None else None,
            "detail": result.outcome.describe(),
            "checked_at": timestamp(result.checked_at),
        }

    def events(self, name: str | None = None, *, limit: int = 30, after_id: int = 0) -> list[Record]:
        if name is not None:
            self.service.home.checked_name(name)
        return [event_record(e) for e in self.service.store.events(name, limit=limit, after_id=after_id)]

    def log_paths(self, name: str, streams: tuple[str, ...] = STREAMS):
        """The log files of ``name`` (oldest-written first, so the freshest lines end a tail). InstanceNotFound."""
        from llama_orchestrator.domain.errors import InstanceNotFound, UsageError

        home = self.service.home
        if not home.config_path(name).is_file() and not home.log_dir(name).is_dir():
            raise InstanceNotFound(name)
        unknown = set(streams) - set(STREAMS)
        if unknown or not streams:
            raise UsageError(f"log streams are stdout and stderr, not {', '.join(sorted(unknown)) or 'none'}")
        paths = [home.log_path(name, s) for s in streams]
        paths.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0)
        return paths

    def logs(
        self, name: str, *, tail: int = 50, streams: tuple[str, ...] = STREAMS, follow: bool = False
    ) -> Iterator[str]:
        from llama_orchestrator.adapters.logfiles import follow as follow_files

        paths = self.log_paths(name, streams)  # raises before the generator starts
        return self._logs(paths, tail, follow, follow_files)

    @staticmethod
    def _logs(paths, tail_n: int, follow: bool, follow_files) -> Iterator[str]:
        from llama_orchestrator.adapters.logfiles import tail

        lines: list[str] = []
        for path in paths:
            lines += tail(path, tail_n)
        yield from lines[-tail_n:] if tail_n > 0 else lines
        if follow:
            for _, line in follow_files(paths, stop=lambda: False):
                yield line

    def attach(self, names: list[str], *, stop: Callable[[], bool] | None = None) -> Iterator[tuple[str, str]]:
        from llama_orchestrator.adapters.logfiles import follow

        svc = self.service
        paths = {svc.home.log_path(n, s): n for n in names for s in STREAMS}

        def all_exited() -> bool:
            return (stop is not None and stop()) or all(svc.refresh(n).status not in ACTIVE for n in names)

        for path, line in follow(list(paths), stop=all_exited, from_end=False):
            yield paths[path], line
