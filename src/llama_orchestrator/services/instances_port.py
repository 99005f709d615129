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
Recreate = Literal["changed", "never", "force"]
STREAMS = ("stdout", "stderr")


class InstancesPort(Protocol):
    origin: str  # "local", or the URL of the daemon's API: for messages

    def names(self, *, autostart_only: bool = False) -> list[str]:
        """Configured instance names, sorted."""

    def ps(self, *, include_orphans: bool = False) -> list[Record]:
        """One ``ps_record`` per instance."""

    def describe(self, name: str) -> Record:
        """``ps_record`` + config, model file metadata and recent events. Raises InstanceNotFound."""

    def runtime(self, name: str) -> Record:
        """``ps_record`` + what the dashboard's detail shows and ``describe`` does not: when it stopped, the last
        health check (time, latency, error), the config as loaded (defaults filled in, secrets masked). Cheap
        enough to poll every second: no probe, no model file read. Raises InstanceNotFound."""

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
        self,
        name: str,
        *,
        tail: int = 50,
        streams: tuple[str, ...] = STREAMS,
        follow: bool = False,
        since: float | None = None,
        until: float | None = None,
        timestamps: bool = False,
    ) -> Iterator[str]:
        """The last ``tail`` lines (0: all) written from ``since`` to ``until`` (Unix times), the streams merged in
        time order, then, with ``follow``, new lines until the caller stops iterating or ``until`` passes. With
        ``timestamps`` each line starts with its RFC 3339 UTC time and a space (``adapters.log_times``: when the
        daemon saw it, within about a second)."""

    def attach(self, names: list[str]) -> Iterator[tuple[str, str]]:
        """``(name, line)`` of the lines the instances write from this call on (not the history of earlier runs),
        until every one of them has exited. Positions are taken when this is called, before the iterator is read:
        call it before starting them and no early line is lost."""

    def plan(self, names: list[str], *, recreate: Recreate = "changed") -> list[Record]:
        """What `up` would do to each of ``names``: ``{name, action, reason, changes}`` with action ``start``,
        ``recreate``, ``leave`` or ``report-invalid`` (``domain.reconcile``). Raises InstanceNotFound."""

    def recreate(self, name: str, *, wait: bool = False, timeout: float = 120.0, stop_timeout: float = 10.0) -> Record:
        """Apply the declared config to a running instance: (drain in the router) stop, start with the config the
        file declares now, (wait healthy, undrain). ``{name, action: "recreated", old_pid, pid, port, changes,
        healthy, restart_policy}``. An instance with aliases (a replica) is always waited for, so replicas are
        recreated one at a time, each healthy before the next. Raises ConfigError before stopping anything."""

    def reload(self) -> Record:
        """Ask the daemon for one reconcile pass (`llama-orch daemon reload`). UsageError without a daemon."""


class Drainer(Protocol):
    """The router's side of a zero-downtime recreate (implemented by ``services.router``; the daemon passes it to
    ``LocalInstances``). Without one, a recreate simply stops and starts."""

    def drain(self, name: str, timeout: float) -> None:
        """Stop routing new requests to ``name`` and return once its in-flight and queued requests are done (or
        ``timeout`` passed). Called from a worker thread, never the event loop."""

    def undrain(self, name: str) -> None:
        """Route to ``name`` again (after it is healthy)."""


# -- records -----------------------------------------------------------------------------------------------------


def timestamp(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def ps_record(view: InstanceView, now: float) -> Record:
    from llama_orchestrator.domain.drift import config_changed

    config, row = view.config, view.row
    active = row.status in ACTIVE
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
        "aliases": list(config.aliases) if config else [],
        # Drift: the process runs another config than the file declares (`up` recreates it).
        "config_changed": active and config_changed(row.config_hash, config),
        # The config folder is gone but state is left (maybe a running process: `down NAME` stops it).
        "config_removed": config is None and view.config_error is None,
    }


def resolved_backends(views: list[InstanceView], registry_path) -> dict[str, str]:
    """What each config's ``gpu.backend`` means: itself unless ``auto``; for ``auto``, the backend the binaries
    registry records for the binary it starts (``binary``: a registered name or a path, else the registry's
    default). An instance left out could not be told (no registered binary): `ps` shows ``auto`` for it."""
    import os

    from llama_orchestrator.adapters.binaries import read_registry
    from llama_orchestrator.domain.errors import OrchestratorError

    try:
        registry = read_registry(registry_path)
    except OrchestratorError:
        registry = {"default": None, "binaries": {}}
    entries = registry["binaries"]
    by_path = {os.path.realpath(e["path"]): e.get("backend") for e in entries.values() if e.get("path")}
    out: dict[str, str] = {}
    for view in views:
        config = view.config
        if config is None:
            continue
        if config.gpu.backend != "auto":
            out[view.name] = config.gpu.backend
            continue
        chosen = config.binary or registry.get("default")
        backend = (entries.get(chosen) or {}).get("backend") if chosen in entries else None
        if backend is None and config.binary:
            backend = by_path.get(os.path.realpath(os.path.expanduser(config.binary)))
        if backend:
            out[view.name] = backend
    return out


def drift_records(view: InstanceView) -> list[Record]:
    """``describe``'s config drift: each field whose running value differs from the declared one."""
    from llama_orchestrator.domain.drift import config_diff

    if view.config is None or view.row.status not in ACTIVE:
        return []
    return [
        {"path": c.path, "running": c.running, "declared": c.declared, "needs_recreate": c.needs_recreate}
        for c in config_diff(view.row.config_json, view.config)
    ]


def event_record(event: Event) -> Record:
    return {"id": event.id, "time": event.ts, "instance": event.instance, "kind": event.kind, "message": event.message}


# -- local --------------------------------------------------------------------------------------------------------


class LocalInstances:
    """The port over the InstanceService of a home on this machine.

    ``probe_starting``: without a daemon nobody moves `starting` to `running`, so `ps` probes those instances once
    (the CLI); the daemon's API leaves that to the supervisor.
    """

    origin = "local"

    def __init__(
        self, service: InstanceService, *, probe_starting: bool = True, drainer: Drainer | None = None
    ) -> None:
        self.service = service
        self.probe_starting = probe_starting
        self.drainer = drainer
        # The daemon sets this: one reconcile pass on request (`llama-orch daemon reload`, POST /api/daemon/reload).
        self.reloader: Callable[[], None] | None = None

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
        backends = resolved_backends(views, self.service.home.registry_path)
        return [{**ps_record(v, now), "backend_resolved": backends.get(v.name)} for v in views]

    def describe(self, name: str) -> Record:
        from llama_orchestrator.domain.errors import InstanceNotFound
        from llama_orchestrator.domain.secrets import mask_document

        svc = self.service
        view = svc.view(name)
        if view.config is None and view.config_error is None and svc.store.get(name) is None:
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
            "config_path": str(view.config_path) if view.config_path else None,
            # env values that look secret (keys, tokens) are masked: describe is for showing, not for copying.
            "config": mask_document(view.config.to_document()) if view.config else None,
            "config_error": str(view.config_error) if view.config_error else None,
            "model_file": gguf,
            "config_drift": drift_records(view),
            "events": [{"time": timestamp(e.ts), "ts": e.ts, "kind": e.kind, "message": e.message} for e in events],
        }

    def runtime(self, name: str) -> Record:
        from llama_orchestrator.domain.errors import InstanceNotFound
        from llama_orchestrator.domain.secrets import mask_document

        svc = self.service
        view = svc.view(name)
        if view.config is None and view.config_error is None and svc.store.get(name) is None:
            raise InstanceNotFound(name)
        row = view.row
        return {
            **ps_record(view, time.time()),
            "stopped_at": row.stopped_at,
            "health_checked_at": row.health_checked_at,
            "health_latency_ms": row.health_latency_ms,
            "health_error": row.health_error,
            "config_path": str(view.config_path) if view.config_path else None,
            # Shown on a screen others may see: env values that look secret are masked.
            "config": mask_document(view.config.model_dump(mode="json")) if view.config else None,
            "config_error": str(view.config_error) if view.config_error else None,
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

    # -- apply, as compose does ---------------------------------------------------------------------------------

    def plan(self, names: list[str], *, recreate: Recreate = "changed") -> list[Record]:
        from llama_orchestrator.domain.reconcile import plan

        declared, recorded, observed = self.service_state(names)
        records = []
        for action in plan(declared, recorded, observed, mode="up", recreate=recreate, names=names):
            row = recorded.get(action.name)
            records.append(
                {
                    **action.as_dict(),
                    "status": row.status if row else "stopped",
                    "pid": observed[action.name].pid if action.name in observed else None,
                }
            )
        return records

    def service_state(self, names: list[str] | None = None):
        """``(declared, recorded, observed)`` for ``domain.reconcile.plan``: each config (or its ConfigError), each
        row after ``refresh`` (which checks the recorded process is alive), and the live processes among them.
        ``names=None``: every configured instance and every recorded one (a removed config has a record only);
        named ones must have a config file (InstanceNotFound: `up` of a removed config is `up` of no instance)."""
        from llama_orchestrator.domain.errors import ConfigError, InstanceNotFound
        from llama_orchestrator.domain.reconcile import Observed

        svc = self.service
        if names is None:
            chosen = sorted(set(svc.names()) | set(svc.store.all()))
        else:
            chosen = [svc.home.checked_name(n) for n in names]
        declared: dict[str, Any] = {}
        recorded: dict[str, Any] = {}
        observed: dict[str, Observed] = {}
        for name in chosen:
            try:
                declared[name] = svc.load(name)
            except ConfigError as exc:
                declared[name] = exc
            except InstanceNotFound:
                if names is not None:
                    raise
            row = svc.refresh(name)
            if svc.store.get(name) is not None:
                recorded[name] = row
            if row.status in ACTIVE and row.pid is not None:
                observed[name] = Observed(row.pid, row.create_time or 0.0)
        return declared, recorded, observed

    def recreate(
        self,
        name: str,
        *,
        wait: bool = False,
        timeout: float = 120.0,
        stop_timeout: float = 10.0,
        by_person: bool = True,
        drain_timeout: float = 60.0,
    ) -> Record:
        from llama_orchestrator.domain.drift import config_diff

        svc = self.service
        svc.home.checked_name(name)
        config = svc.load(name)  # a broken config is reported before the running instance is stopped
        before = svc.refresh(name)
        changes = [c.path for c in config_diff(before.config_json, config) if c.needs_recreate]
        old_pid = before.pid if before.status in ACTIVE else None
        drainer = self.drainer
        must_wait = wait or drainer is not None or bool(config.aliases)
        if drainer is not None and old_pid is not None:
            drainer.drain(name, drain_timeout)  # new requests go to the replicas; the in-flight ones finish
        try:
            # As a person's stop (`stopped`, not `exited`): the supervisor must not take the gap before the start for
            # a crash and race it with a restart of its own.
            svc.stop(name, stop_timeout, by_user=True)
            outcome = svc.start(name, by_person=by_person)
            if must_wait:
                svc.wait_healthy(name, timeout)
        finally:
            if drainer is not None:
                drainer.undrain(name)
        row = outcome.row
        what = ", ".join(changes) or "forced"
        svc.store.add_event(name, "recreated", f"pid {old_pid} -> {row.pid} ({what})", svc.clock())
        return {
            "name": name,
            "action": "recreated",
            "old_pid": old_pid,
            "pid": row.pid,
            "port": row.port or config.server.port,
            "status": row.status,
            "changes": changes,
            "healthy": must_wait,
            "restart_policy": config.restart.policy,
        }

    def reload(self) -> Record:
        from llama_orchestrator.domain.errors import UsageError

        if self.reloader is None:
            raise UsageError("no daemon runs for this home: `llama-orch up NAME -d` applies config changes")
        self.reloader()
        return {"requested": True}

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
        self,
        name: str,
        *,
        tail: int = 50,
        streams: tuple[str, ...] = STREAMS,
        follow: bool = False,
        since: float | None = None,
        until: float | None = None,
        timestamps: bool = False,
    ) -> Iterator[str]:
        from llama_orchestrator.adapters.logfiles import follow as follow_files

        paths = self.log_paths(name, streams)  # raises before the generator starts
        return self._logs(paths, tail, follow, follow_files, since=since, until=until, timestamps=timestamps)

    @staticmethod
    def _logs(
        paths,
        tail_n: int,
        follow: bool,
        follow_files,
        *,
        since: float | None = None,
        until: float | None = None,
        timestamps: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> Iterator[str]:
        from llama_orchestrator.adapters.log_times import timed_lines
        from llama_orchestrator.domain.log_times import shown_line

        for line in timed_lines(paths, tail=tail_n, since=since, until=until):
            yield shown_line(line.text, line.time, timestamps=timestamps)
        if follow and (until is None or clock() <= until):
            # A new line's time is when this reader saw it (it polls every 0.2 s).
            for _, text in follow_files(paths, stop=lambda: until is not None and clock() > until):
                moment = clock()
                if until is not None and moment > until:
                    return
                if since is None or moment >= since:
                    yield shown_line(text, moment, timestamps=timestamps)

    def attach(
        self, names: list[str], *, stop: Callable[[], bool] | None = None, poll_s: float = 0.2
    ) -> Iterator[tuple[str, str]]:
        from llama_orchestrator.adapters.logfiles import LogCursor

        svc = self.service
        # Placed now, at the current ends (a file not there yet is read from its start): only what is written from
        # here on is shown. A rotation at start truncates the live file, and the cursor starts again at its top.
        cursors = []
        for name in names:
            for stream in STREAMS:
                path = svc.home.log_path(name, stream)
                cursor = LogCursor(path, from_end=path.exists())
                cursor.read_lines()
                cursors.append((name, cursor))

        def all_exited() -> bool:
            return (stop is not None and stop()) or all(svc.refresh(n).status not in ACTIVE for n in names)

        def lines() -> Iterator[tuple[str, str]]:
            try:
                while True:
                    got = False
                    for name, cursor in cursors:
                        for line in cursor.read_lines():
                            got = True
                            yield name, line
                    if got:
                        continue
                    if all_exited():
                        for name, cursor in cursors:  # what they wrote just before they exited
                            for line in cursor.read_lines():
                                yield name, line
                        return
                    time.sleep(poll_s)  # polling files: there is no portable change notification to wait on
            finally:
                for _, cursor in cursors:
                    cursor.close()

        return lines()
