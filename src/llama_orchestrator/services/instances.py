"""The instance lifecycle: create, start, stop, inspect and remove instances, without the daemon.

Every start and stop of one instance runs under that instance's file lock, whoever calls (two CLIs, a CLI and the
daemon): exactly one process per instance. What is running is recorded in SQLite as PID + create time; a record
whose process is gone is reconciled to ``exited`` the next time anyone looks. Every status change goes through
``Store.transition`` (compare-and-swap, checked against ``domain.states.TRANSITIONS``, event in the same write).

SQLite is a cache (SPEC §13): every llama-server carries a marker (``domain.launch``), so the OS says what runs. A
database found missing or corrupt is rebuilt from a scan of marked processes; `up` adopts a marked process the row
lost instead of failing on its port, and `down` finds and stops it. A ``stopping`` row whose instance lock is free
belongs to a stop whose process died half way: it is settled from the OS by whoever looks next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from llama_orchestrator.adapters import process as proc
from llama_orchestrator.adapters.binaries import resolve_binary
from llama_orchestrator.adapters.config_files import load_config, write_new_config
from llama_orchestrator.adapters.home import Home
from llama_orchestrator.adapters.logfiles import rotate_if_needed, tail
from llama_orchestrator.adapters.ports import is_port_free, pick_port
from llama_orchestrator.adapters.store import InstanceRow, Store
from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.drift import fingerprint
from llama_orchestrator.domain.errors import (
    ConfigError,
    InstanceNotFound,
    OrchestratorError,
    StartError,
    UsageError,
)
from llama_orchestrator.domain.launch import build_launch
from llama_orchestrator.domain.states import ACTIVE, Health, Status

if TYPE_CHECKING:
    import psutil

    from llama_orchestrator.services.health import Probe

log = logging.getLogger("llama_orchestrator.instances")
EARLY_EXIT_WINDOW_S = 1.0
INACTIVE = frozenset(Status) - ACTIVE


@runtime_checkable
class _Child(Protocol):
    """A process we spawned (a ``subprocess.Popen``): polled so that it never lingers as a zombie."""

    pid: int

    def poll(self) -> int | None: ...


@dataclass
class InstanceView:
    """What `ps`, `describe` and the dashboard show of one instance."""

    name: str
    row: InstanceRow
    config: InstanceConfig | None
    config_error: ConfigError | None = None
    config_path: Path | None = None

    def uptime_s(self, now: float) -> float | None:
        if self.row.status in ACTIVE and self.row.started_at:
            return max(0.0, now - self.row.started_at)
        return None


@dataclass
class StartOutcome:
    name: str
    already_running: bool
    row: InstanceRow
    argv: list[str] = field(default_factory=list)


class InstanceService:
    def __init__(
        self,
        home: Home,
        *,
        store: Store | None = None,
        processes: proc.ProcessControl | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self._store = store
        self.processes = processes or proc.current()
        self.clock = clock
        # Processes this object spawned: we are their parent, so we reap them and learn their exit codes.
        self._children: dict[str, _Child] = {}

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.home.db_path)
        if self._store.on_fresh is None:
            self._store.on_fresh = self._rebuild
            if self._store.fresh:
                self._rebuild(self._store)
        return self._store

    # -- recovery from the OS ----------------------------------------------------------------------------------

    def _marker_home(self) -> Path:
        return Path(os.path.realpath(self.home.root))

    def scan(self) -> list[proc.Found]:
        """Our running llama-servers, as the OS knows them (their marker)."""
        return self.processes.scan(self._marker_home())

    def _rebuild(self, store: Store) -> None:
        """The database is new (it was missing, or corrupt and moved aside): rows from the running processes."""
        reason, store.fresh = store.fresh, None
        if getattr(self, "_rebuilding", False):
            return
        self._rebuilding = True
        try:
            adopted = self.adopt_running(how="rebuilt after the state database was lost")
        finally:
            self._rebuilding = False
        if reason == "missing" and not adopted:
            return  # a new home: nothing to say
        names = ", ".join(f"{f.name} (pid {f.pid})" for f in adopted) or "none"
        message = f"state database {reason}; rebuilt from the configs and the running processes: {names}"
        log.info(message)  # the store said what was wrong (once); this is the event that says what was done
        store.add_event("-", "recovered", message, self.clock())

    def adopt_running(self, *, how: str = "found running") -> list[proc.Found]:
        """Record every marked process whose row does not say it runs (the daemon at boot, a rebuild)."""
        adopted = []
        for found in self.scan():
            try:
                if self._adopt(found, self.refresh(found.name), how):
                    adopted.append(found)
            except OrchestratorError as exc:
                log.warning("%s: not adopted: %s", found.name, exc)
        return adopted

    def _find_marked(self, name: str) -> proc.Found | None:
        return next((f for f in self.scan() if f.name == name), None)

    def _adopt(self, found: proc.Found, row: InstanceRow, how: str) -> bool:
        """Record ``found`` as running, unless the row already has a live process (then none is duplicated)."""
        if row.status in ACTIVE:
            return False  # refresh() left it active: its recorded process is alive (this one or another)
        try:
            port: int | None = self.load(found.name).server.port
        except OrchestratorError:
            port = row.port
        return self.store.transition(
            found.name,
            INACTIVE,
            Status.running,
            event=("adopted", f"pid {found.pid} found running by its marker ({how})"),
            now=self.clock(),
            pid=found.pid,
            create_time=found.create_time,
            port=port,
            health=Health.unknown,
            started_at=found.create_time,
            stopped_at=None,
            exit_code=None,
            stopped_by_user=False,
            next_restart_at=None,
            last_error=None,
            config_hash=None,  # unknown: the config it was started with is lost with the database
            config_json=None,
        )

    # -- configs -----------------------------------------------------------------------------------------------

    def load(self, name: str) -> InstanceConfig:
        path = self.home.config_path(name)
        if not path.is_file():
            raise InstanceNotFound(name)
        return load_config(path, expected_name=name)

    def names(self) -> list[str]:
        return self.home.instance_names()

    def create(self, config: InstanceConfig, *, auto_port: bool) -> InstanceConfig:
        """Write a new instance's config (``init``); refuses to overwrite, picks a free port when asked."""
        path = self.home.config_path(config.name)
        if path.exists():
            raise UsageError(f"instance {config.name!r} already exists ({path}); remove it first with `rm`")
        others = self._configured_ports(exclude=config.name)
        if auto_port:
            config.server.port = pick_port(others.keys(), config.server.host)
        elif config.server.port in others:
            raise UsageError(
                f"port {config.server.port} is already used by instance {others[config.server.port]!r}: "
                "choose another with --port, or leave --port out to pick a free one"
            )
        try:
            write_new_config(path, config)
        except FileExistsError:
            raise UsageError(f"instance {config.name!r} already exists ({path})") from None
        self.home.log_dir(config.name).mkdir(parents=True, exist_ok=True)
        self.store.add_event(config.name, "created", f"config written to {path}", self.clock())
        return config

    def _configured_ports(self, exclude: str | None = None) -> dict[int, str]:
        ports: dict[int, str] = {}
        for name in self.names():
            if name == exclude:
                continue
            try:
                ports[self.load(name).server.port] = name
            except OrchestratorError:
                continue
        return ports

    # -- state -------------------------------------------------------------------------------------------------

    def refresh(self, name: str, *, locked: bool = False) -> InstanceRow:
        """The recorded state, after reconciling it with reality: an active record whose process is gone
        becomes ``exited`` (with the exit code where we are its parent). ``locked``: the caller holds the
        instance's lock (so no one else is stopping it)."""
        row = self.store.get(name) or InstanceRow(name=name)
        if row.status not in ACTIVE:
            return row
        if row.status == Status.stopping and not locked:
            # Whoever stops an instance holds its lock for the whole stop: a lock that is free means the stopper
            # died half way (a killed `down`), and the OS decides what the row says.
            held = self.processes.try_lock(self.home.lock_path(name))
            if held is None:
                return row  # someone is stopping it right now and will record the result
            try:
                return self._settle(name, self.store.get(name) or row)
            finally:
                held.release()
        return self._settle(name, row)

    def _settle(self, name: str, row: InstanceRow) -> InstanceRow:
        if row.status not in ACTIVE:
            return row
        handle = proc.ProcessHandle(row.pid, row.create_time or 0.0) if row.pid is not None else None
        now = self.clock()
        if handle is not None and proc.is_alive(handle):
            if row.status == Status.stopping:
                self.store.transition(
                    name,
                    Status.stopping,
                    Status.running,
                    only_if={"pid": row.pid},
                    now=now,
                    event=("stop-interrupted", f"the stop of pid {row.pid} was interrupted; it still runs"),
                )
                return self.store.get(name) or row
            return row
        exit_code = self._reap(name, row.pid) if row.pid is not None else None
        detail = f" with code {exit_code}" if exit_code is not None else ""
        # A stop whose stopper died: the process is gone, so the stop happened; a person's stop ends stopped.
        new = Status.stopped if row.status == Status.stopping and row.stopped_by_user else Status.exited
        kind = "stopped" if new == Status.stopped else "exited"
        self.store.transition(
            name,
            row.status,
            new,
            only_if={"pid": row.pid, "create_time": row.create_time},
            event=(kind, f"process {row.pid} exited{detail}"),
            now=now,
            health=Health.unknown,
            stopped_at=now,
            exit_code=exit_code,
        )
        return self.store.get(name) or row

    def view(self, name: str) -> InstanceView:
        row = self.refresh(name)
        try:
            return InstanceView(name, row, self.load(name), config_path=self.home.config_path(name))
        except ConfigError as exc:
            return InstanceView(name, row, None, exc, self.home.config_path(name))
        except InstanceNotFound:
            # Its config folder is gone while state (maybe a running process) is left: `ps -a` shows it and
            # `down` stops it, so the view has no config rather than failing.
            return InstanceView(name, row, None, None, None)

    def views(self, *, include_orphans: bool = False) -> list[InstanceView]:
        names = self.names()
        if include_orphans:
            names = sorted(set(names) | set(self.store.all()))
        return [self.view(name) for name in names]

    def reap_children(self) -> None:
        """Collect the exit status of every child of ours that has ended, so none lingers as a zombie."""
        for popen in list(self._children.values()):
            popen.poll()

    def _reap(self, name: str, pid: int) -> int | None:
        popen = self._children.get(name)
        if popen is not None and popen.pid == pid:
            return popen.poll()
        return None

    # -- start -------------------------------------------------------------------------------------------------

    def start(self, name: str, *, by_person: bool = True) -> StartOutcome:
        """Start ``name`` unless it already runs. Checks everything that can be checked before spawning.

        A person's start (not the supervisor's restart) begins the backoff sequence again, as Docker does.
        """
        config = self.load(name)
        with self.processes.exclusive_lock(self.home.lock_path(name)):
            row = self.refresh(name, locked=True)
            if row.status in ACTIVE:
                return StartOutcome(name, True, row)
            found = self._find_marked(name)
            if found is not None and self._adopt(found, row, "its row said " + row.status):
                # Ours already runs (the database lost it): adopt it rather than fail on its port or duplicate it.
                return StartOutcome(name, True, self.store.get(name) or row)
            spec = self._preflight(config)
            log_dir = self.home.log_dir(name)
            for stream in ("stdout", "stderr"):
                rotate_if_needed(
                    self.home.log_path(name, stream), int(config.logs.max_size_mb * 1024 * 1024), config.logs.rotation
                )
            try:
                spawned = self.processes.spawn(
                    spec.argv,
                    spec.env,
                    self.home.config_path(name).parent,
                    self.home.log_path(name, "stdout"),
                    self.home.log_path(name, "stderr"),
                )
            except OSError as exc:
                self._record_failed_start(name, row, f"could not execute {spec.argv[0]}: {exc}", by_person)
                raise StartError(f"{name}: could not execute {spec.argv[0]}: {exc}") from None
            if isinstance(spawned.popen, _Child):  # a Popen; None where the process was not our child
                self._children[name] = spawned.popen
            now = self.clock()
            recorded = fingerprint(config)
            changes: dict[str, Any] = {
                "health": Health.unknown,
                "pid": spawned.handle.pid,
                "create_time": spawned.handle.create_time,
                "port": config.server.port,
                "started_at": now,
                "stopped_at": None,
                "exit_code": None,
                "stopped_by_user": False,
                # last_error stays until it is healthy (health checks clear it): a crash loop keeps showing why
                "next_restart_at": None,
                "health_checked_at": None,
                "health_latency_ms": None,
                "health_error": None,
                "config_hash": recorded.hash,
                "config_json": recorded.document,
            }
            if by_person:
                changes["restart_attempts"] = 0
            # The lock keeps other starts and stops out, but the supervisor decides on exits without it (exited ->
            # backoff): when the CAS finds the row moved between two inactive states, record the start over the
            # new one. The process is spawned; it must never go unrecorded.
            for _ in range(5):
                if self.store.transition(
                    name,
                    row.status,
                    Status.starting,
                    now=now,
                    event=("started", f"pid {spawned.handle.pid} on port {config.server.port}"),
                    **changes,
                ):
                    break
                row = self.store.get(name) or InstanceRow(name=name)
                if row.status in ACTIVE:
                    break  # not possible under the lock; the transition function has logged it
            row = self.store.get(name) or row
        del log_dir
        return StartOutcome(name, False, row, spec.argv)

    def _preflight(self, config: InstanceConfig):
        """Everything that would make llama-server fail at once, as one clear error before anything is spawned."""
        name = config.name
        config_dir = self.home.config_path(name).parent
        model = config.model_path(config_dir)
        if not model.is_file():
            raise StartError(
                f"{name}: model file {str(model)!r} not found (model.path in {config_dir / 'config.json'})"
            )
        if not os.access(model, os.R_OK):
            raise StartError(f"{name}: model file {str(model)!r} is not readable")
        binary = resolve_binary(config.binary, self.home.registry_path, backend=config.gpu.backend)
        if not is_port_free(config.server.port, config.server.host):
            raise StartError(
                f"{name}: port {config.server.port} on {config.server.host} is already in use by another program "
                "(`llama-orch ps` shows which instance has which port; change server.port in the config)"
            )
        log_dir = self.home.log_dir(name)
        log_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(log_dir, os.W_OK):
            raise StartError(f"{name}: log folder {log_dir} is not writable")
        return build_launch(config, binary, model, os.environ, platform=sys.platform, home=self._marker_home())

    def _record_failed_start(self, name: str, row: InstanceRow, message: str, by_person: bool) -> None:
        """A spawn that failed (nothing runs). A person's start ends ``failed``; the supervisor's restart leaves
        the status to the supervisor, which applies the policy (and records the event)."""
        now = self.clock()
        if not by_person:
            self.store.update(name, last_error=message)
            return
        self.store.transition(
            name,
            row.status,
            Status.failed,
            event=("start-failed", message),
            now=now,
            last_error=message,
            stopped_at=now,
        )

    def wait_healthy(
        self,
        name: str,
        timeout: float,
        *,
        probe: Probe | None = None,
        poll_s: float = 0.1,
    ) -> InstanceRow:
        """Wait until the instance answers its health check with 200, it exits, or ``timeout`` passes.

        Raises StartError with the tail of stderr when it exits, and when the timeout passes (it keeps running).
        """
        from llama_orchestrator.services.health import check_once

        config = self.load(name)
        deadline = time.monotonic() + timeout
        while True:
            row = self.refresh(name)
            if row.status not in ACTIVE:
                stderr = "\n".join(tail(self.home.log_path(name, "stderr"), 15))
                code = f" (exit code {row.exit_code})" if row.exit_code is not None else ""
                message = f"{name}: llama-server exited during start{code}"
                self.store.update(name, last_error=message)
                raise StartError(f"{message}; last lines of its stderr:\n{stderr}")
            result = check_once(self, name, config, row, probe=probe)
            if result.health == Health.healthy:
                return self.store.get(name) or row
            if time.monotonic() >= deadline:
                raise StartError(
                    f"{name}: not healthy after {timeout:g} s (health: {result.health}); it is still running: "
                    f"see `llama-orch logs {name}`"
                )
            time.sleep(poll_s)  # polling the health endpoint; the deadline bounds the wait

    def wait_early_exit(self, name: str, window_s: float = EARLY_EXIT_WINDOW_S) -> InstanceRow:
        """After a detached start: catch an instance that dies at once (bad argument, broken binary)."""
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            row = self.refresh(name)
            if row.status not in ACTIVE:
                stderr = "\n".join(tail(self.home.log_path(name, "stderr"), 15))
                raise StartError(f"{name}: llama-server exited right after start; last lines of its stderr:\n{stderr}")
            time.sleep(0.05)
        return self.refresh(name)

    # -- stop --------------------------------------------------------------------------------------------------

    def stop(self, name: str, timeout: float = 10.0, *, by_user: bool = True) -> InstanceRow:
        """Stop gracefully, then kill the whole tree after ``timeout``. Never signals a PID that is not ours."""
        self.home.checked_name(name)
        if not self.home.config_path(name).is_file() and self.store.get(name) is None:
            raise InstanceNotFound(name)
        with self.processes.exclusive_lock(self.home.lock_path(name)):
            row = self.refresh(name, locked=True)  # a dead process is recorded as exited first: no skipped edge
            handle = (
                proc.ProcessHandle(row.pid, row.create_time or 0.0)
                if row.status in ACTIVE and row.pid is not None
                else None
            )
            if handle is None:
                found = self._find_marked(name)  # ours may run though the row lost it (a rebuilt database)
                if found is not None and self._adopt(found, row, "found by down"):
                    row = self.store.get(name) or row
                    handle = found.handle
            now = self.clock()
            if handle is None:
                if not by_user:
                    return row  # the supervisor's stop of a process already gone: it is exited, policy decides
                if row.status != Status.stopped:
                    self.store.transition(
                        name,
                        row.status,
                        Status.stopped,
                        now=now,
                        event=("stopped", f"was {row.status}; now stopped"),
                        health=Health.unknown,
                        stopped_by_user=by_user,
                        next_restart_at=None,
                        stopped_at=row.stopped_at or now,
                    )
                elif by_user != row.stopped_by_user:
                    self.store.update(name, stopped_by_user=by_user)
                return self.store.get(name) or row
            self.store.transition(name, row.status, Status.stopping, now=now, stopped_by_user=by_user)
            members = list(proc.tree(handle))
            self.processes.request_stop(handle)
            # A stopped process (SIGSTOP, `T`) cannot act on SIGTERM until continued: no grace to wait for.
            grace = 0.0 if _is_suspended(members[:1]) else timeout
            gone, alive = _wait_gone(members, grace)
            killed = bool(alive)
            if alive:
                self.processes.kill_tree(handle)
                for member in alive:
                    _kill_quietly(member)
                _wait_gone(alive, 5.0)
            exit_code = self._reap(name, handle.pid)
            self._wait_port_released(row.port, 5.0)
            now = self.clock()
            how = (
                "killed at once (suspended)"
                if killed and grace == 0
                else f"killed after {timeout:g} s grace"
                if killed
                else "stopped gracefully"
            )
            # A person's stop ends `stopped`; the supervisor's (an unhealthy instance) ends `exited`, and its
            # restart policy decides what next.
            self.store.transition(
                name,
                Status.stopping,
                Status.stopped if by_user else Status.exited,
                now=now,
                event=("stopped", f"pid {row.pid} {how}"),
                health=Health.unknown,
                stopped_at=now,
                exit_code=exit_code,
                next_restart_at=None,
            )
            del gone
            return self.store.get(name) or row

    def _wait_port_released(self, port: int | None, timeout: float) -> None:
        if port is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not is_port_free(port):
            time.sleep(0.05)

    # -- remove ------------------------------------------------------------------------------------------------

    def remove(self, name: str, *, force: bool = False) -> None:
        import shutil

        self.home.checked_name(name)
        if not self.home.config_path(name).is_file() and self.store.get(name) is None:
            raise InstanceNotFound(name)
        row = self.refresh(name)
        if row.status in ACTIVE:
            if not force:
                raise UsageError(f"{name} is {row.status}: stop it first with `llama-orch down {name}`, or use --force")
            self.stop(name)
        with self.processes.exclusive_lock(self.home.lock_path(name)):
            shutil.rmtree(self.home.instance_dir(name), ignore_errors=True)
            shutil.rmtree(self.home.log_dir(name), ignore_errors=True)
            self.store.delete(name)
            self.store.add_event(name, "removed", "config, logs and state removed", self.clock())


def _wait_gone(members: list, timeout: float) -> tuple[list, list]:
    """Wait until every member has exited. A zombie counts as gone: its parent (maybe another process, such as the
    daemon) reaps it whenever it looks; waiting for that would only delay the stop."""
    import psutil

    def gone(member) -> bool:
        try:
            return not member.is_running() or member.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    deadline = time.monotonic() + timeout
    while True:
        alive = [m for m in members if not gone(m)]
        if not alive or time.monotonic() >= deadline:
            return [m for m in members if m not in alive], alive
        psutil.wait_procs(alive, timeout=min(0.05, max(0.0, deadline - time.monotonic())))


def _is_suspended(members: list) -> bool:
    import psutil

    try:
        return bool(members) and members[0].status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _kill_quietly(member: psutil.Process) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        member.kill()  # psutil checks the create time first: a reused PID is not signalled
