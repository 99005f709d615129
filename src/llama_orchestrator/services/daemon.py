"""`llama-orch daemon run`: the supervisor in a loop, one per home.

It holds ``state/daemon.lock`` for its whole life (a second daemon refuses to start), writes ``state/daemon.pid``,
logs to ``state/daemon.log`` (rotated), adopts the instances that already run, starts the `autostart` ones, and
ticks the supervisor until SIGTERM/SIGINT. On the way out it leaves every instance running: the next daemon
adopts them, so a daemon crash or upgrade loses nothing. At boot it also adopts the llama-servers of this home that
the database does not know (found by their marker: a lost, deleted or corrupt database), then writes its PID file
again with ``ready``: `daemon start` reports success only then, and the daemon's last words if it died first.
One instance's trouble (its config gone or invalid, an exception in its step) never pauses the others.

When ``api.enabled`` (``orchestrator.json``), it serves the HTTP API and router (``api.server``) with uvicorn on
a thread of its own, while the supervisor loop keeps the main thread and its signals. The API's socket is bound
before the PID file is written: a taken port ends the daemon with a clear error instead of leaving one without an
API, and a client that finds the PID file (with ``api_url``) finds the API answering.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llama_orchestrator import __version__
from llama_orchestrator.adapters import process as proc
from llama_orchestrator.adapters.config_files import load_config, load_settings
from llama_orchestrator.adapters.health_probe import probe_light, probe_on
from llama_orchestrator.adapters.home import Home
from llama_orchestrator.adapters.io_loop import IoLoop
from llama_orchestrator.adapters.log_times import POINT_EVERY_S, note_growth
from llama_orchestrator.adapters.logfiles import rotate_if_needed
from llama_orchestrator.adapters.store import InstanceRow, Store
from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.errors import ConfigError, InstanceNotFound, OrchestratorError
from llama_orchestrator.domain.health import ProbeOutcome
from llama_orchestrator.services import daemon_control
from llama_orchestrator.services.health import base_url
from llama_orchestrator.services.instances import InstanceService
from llama_orchestrator.services.instances_port import LocalInstances
from llama_orchestrator.services.reconciler import Reconciler
from llama_orchestrator.services.supervisor import Supervisor
from llama_orchestrator.services.supervisor_view import SupervisorView

log = logging.getLogger("llama_orchestrator.daemon")
TICK_S = 0.5  # housekeeping: log rotation, others' changes in the store, the reconciler's trigger
FULL_PASS_S = 5.0  # a pass over every instance even when nothing said so (exits and changes are told at once)
ROTATION_CHECK_S = 0.5  # a growing log is looked at this often at most
ROTATION_IDLE_S = 5.0  # a log that does not grow, this often
MIN_PAUSE_S = 0.02
# Probes due this close together go out in one wake (at most a tenth of an instance's interval early): each wake
# of the loop costs about as much as a probe, and instances adopted together then stay probed together.
PROBE_SLACK_S = 0.05
# With reload "auto", the config files are looked at this often for the reconciler's trigger (a stat of each; it
# applies a change 2 s after the last edit); with "manual" only when a reload is asked for.
RELOAD_LOOK_S = 1.0


class DaemonAlreadyRunning(OrchestratorError):
    pass


class ServiceOps:
    """``InstanceOps`` over the real InstanceService, with configs cached until their file changes.

    A config that stops loading (invalid JSON, a bad field) is said once per version of the file (one log line, one
    ``config-invalid`` event), then nothing until the file changes again; meanwhile the instance is supervised with
    its last good config (its process keeps running, its exit is still noticed). A config whose file is gone (`rm`
    while the daemon runs) is an instance that no longer exists, never a failed tick."""

    def __init__(self, service: InstanceService) -> None:
        self.service = service
        self._rotation_next: dict[str, float] = {}  # monotonic time of the next look at an instance's logs
        self._log_sizes: dict[Path, tuple[int, float]] = {}  # size at the last look, and when
        self._configs: dict[str, tuple[tuple[int, int], InstanceConfig]] = {}
        self._invalid: dict[str, tuple[tuple[int, int], OrchestratorError]] = {}
        self._names: tuple[float, list[str]] = (-1.0, [])
        self._config_paths: dict[str, Path] = {}
        self._log_paths: dict[str, tuple[Path, ...]] = {}

    def names(self) -> list[str]:
        # The folder listing changes rarely; look at most once a second.
        checked_at, _names = self._names
        if time.monotonic() - checked_at > 1.0:
            self._names = (time.monotonic(), self.service.names())
        return self._names[1]

    def load(self, name: str) -> InstanceConfig:
        path = self._config_paths.get(name)
        if path is None:  # building and checking the path costs more than the stat: once per name
            path = self._config_paths[name] = self.service.home.config_path(name)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            self._configs.pop(name, None)
            self._invalid.pop(name, None)
            raise InstanceNotFound(name) from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._configs.get(name)
        if cached and cached[0] == stamp:
            return cached[1]
        invalid = self._invalid.get(name)
        if invalid is None or invalid[0] != stamp:
            try:
                config = load_config(path, expected_name=name)
            except (OrchestratorError, OSError) as exc:
                error = exc if isinstance(exc, OrchestratorError) else ConfigError(f"{path}: {exc}")
                self._invalid[name] = invalid = (stamp, error)
                kept = "supervised with its last good config" if cached else "not supervised"
                self.event(name, "config-invalid", f"{error} ({kept} until the file changes)", time.time())
            else:
                self._invalid.pop(name, None)
                self._configs[name] = (stamp, config)
                return config
        if cached:
            return cached[1]
        raise invalid[1]

    def refresh(self, name: str) -> InstanceRow:
        return self.service.refresh(name)

    def start(self, name: str) -> InstanceRow:
        return self.service.start(name, by_person=False).row

    def stop(self, name: str, timeout: float) -> InstanceRow:
        return self.service.stop(name, timeout, by_user=False)

    def probe(self, config: InstanceConfig, port: int | None) -> ProbeOutcome:
        # The port the process was started on: an edited server.port applies only when `up` recreates it.
        return probe_light(base_url(config, port), config.healthcheck.path, config.healthcheck.timeout)

    def update(self, name: str, only_if: dict[str, object] | None = None, **changes: Any) -> bool:
        return self.service.store.update(name, only_if=only_if, **changes)

    def transition(self, name: str, expected, new, *, event=None, only_if=None, now=None, **changes) -> bool:
        done = self.service.store.transition(name, expected, new, event=event, only_if=only_if, now=now, **changes)
        if done and event is not None:
            log.info("%s %s: %s", name, *event)
        return done

    def event(self, name: str, kind: str, message: str, ts: float) -> None:
        log.info("%s %s: %s", name, kind, message)
        self.service.store.add_event(name, kind, message, ts)

    def rotate_logs(self, name: str, config: InstanceConfig) -> None:
        """Rotate a log past its size. How soon to look again follows how fast it grows: a log that grows is looked
        at about twice before it could reach the limit (every ROTATION_CHECK_S at most), a quiet one every
        ROTATION_IDLE_S; a stat of two files per instance twice a second is not free when nothing is logged."""
        now = time.monotonic()
        if now < self._rotation_next.get(name, 0.0):
            return
        limit = int(config.logs.max_size_mb * 1024 * 1024)
        paths = self._log_paths.get(name)
        if paths is None:
            paths = self._log_paths[name] = tuple(self.service.home.log_path(name, s) for s in ("stdout", "stderr"))
        wait = ROTATION_IDLE_S
        for stream, path in zip(("stdout", "stderr"), paths, strict=True):
            try:
                seen = os.stat(path)
                size, mtime = seen.st_size, seen.st_mtime
            except FileNotFoundError:
                size, mtime = 0, 0.0
            rotated = size > limit and rotate_if_needed(path, limit, config.logs.rotation)
            if rotated:
                log.info("%s: rotated %s.log", name, stream)
                size = 0
            last = self._log_sizes.get(path)
            self._log_sizes[path] = (size, now)
            if size and not rotated and (last is None or size != last[0]):
                _note_log_time(path, size, mtime, emptied=last is not None and size < last[0])
            if last is None or rotated or size < last[0]:  # new, or just emptied: its pace is not known
                wait = min(wait, ROTATION_CHECK_S)
            elif size > last[0] and now > last[1]:
                rate = (size - last[0]) / (now - last[1])
                # Growing: looked at again within a second, for the time index (a line's time is when it was seen).
                wait = min(wait, (limit - size) / rate / 2, POINT_EVERY_S)
        # (A little less than the period, so a housekeeping pass a few ms early is not skipped.)
        self._rotation_next[name] = now + max(ROTATION_CHECK_S * 0.8, wait)


def _note_log_time(path: Path, size: int, mtime: float, *, emptied: bool) -> None:
    """One point in the log's time index (``adapters.log_times``): by ``mtime`` it held ``size`` bytes. A failure
    to write it costs `logs --since/-t` precision, never the daemon's housekeeping."""
    try:
        note_growth(path, size, mtime, restart=emptied)
    except OSError as exc:
        log.warning("%s: cannot note its time index: %s", path, exc)


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """daemon.log and its rotations created 0600 (rotation renames, so each keeps the mode it was made with)."""

    def _open(self):  # logging's own signature
        from llama_orchestrator.adapters.home import private_opener

        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=private_opener)


def _setup_logging(home: Home) -> None:
    handler = _PrivateRotatingFileHandler(
        daemon_control.log_path(home), maxBytes=10 * 1024 * 1024, backupCount=3, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("llama_orchestrator")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # uvicorn's own loggers: startup, errors and one access line per request ("POST /api/instances/x/start").
    server = logging.getLogger("uvicorn")
    server.handlers[:] = [handler]
    server.setLevel(logging.INFO)
    server.propagate = False


def run_daemon(
    home: Home,
    *,
    stop: threading.Event | None = None,
    tick_s: float = TICK_S,
    full_pass_s: float = FULL_PASS_S,
    clock: Callable[[], float] = time.time,
    install_signal_handlers: bool = True,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT). Raises DaemonAlreadyRunning when another holds the lock."""
    processes = proc.current()
    home.secure().state_dir.mkdir(parents=True, exist_ok=True)  # secure(): 0700/0600, as the CLI does
    lock = processes.try_lock(daemon_control.lock_path(home))
    if lock is None:
        running = daemon_control.daemon_info(home)
        where = f" (pid {running.pid})" if running else ""
        raise DaemonAlreadyRunning(f"a daemon already runs for {home.root}{where}")
    stop = stop or threading.Event()
    api = None
    try:
        _setup_logging(home)
        me = proc.handle_of(os.getpid())
        started_at = clock()
        # The loop reads every row twice a second; a row cache dropped on any write keeps that off SQLite.
        service = InstanceService(home, store=Store(home.db_path, cache_s=0.2), processes=processes, clock=clock)
        view = SupervisorView()  # what the supervisor sees, published for the router (made before either)
        try:
            settings = load_settings(home.settings_path)
            # Config changes: applied 2 s after the last edit with reload "auto"; on request either way.
            reconciler = Reconciler(LocalInstances(service, probe_starting=False), auto=settings.reload == "auto")
            api, api_url = None, None
            if settings.api.enabled:
                api, api_url = _serve_api(home, service, settings, me.pid, started_at, reconciler=reconciler, view=view)
        except OrchestratorError as exc:
            log.error("daemon not started: %s", exc)
            raise
        daemon_control.write_pid_file(
            home, daemon_control.DaemonInfo(me.pid, me.create_time, started_at, __version__, api_url)
        )
        # One selector holds everything the loop waits for: the workers' results (they ring it), process exits
        # (pidfds on Linux; waiting threads elsewhere ring it), the health probes' sockets, and the deadlines.
        loop = IoLoop()
        exits = processes.exit_watch(loop)

        def halt(*_: object) -> None:
            stop.set()
            loop.wake()

        if install_signal_handlers:
            for signum in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGBREAK", None)):
                if signum is not None:
                    signal.signal(signum, halt)

        # A `stop` set by another thread (tests, an embedding program) wakes the loop too; this thread only waits.
        def wake_on_stop() -> None:
            stop.wait()
            loop.wake()

        threading.Thread(target=wake_on_stop, name="orch-stop", daemon=True).start()

        def dispatch(work: Callable[[], object]) -> None:
            pool.submit(_logged, work).add_done_callback(lambda _: loop.wake())

        def prober(config: InstanceConfig, port: int | None, done: Callable[[ProbeOutcome], None]) -> None:
            # The port the process was started on: an edited server.port applies only when `up` recreates it.
            # The connection stays open for the next probe, due `interval` after this answer (half a second more for
            # a late loop); probe_on keeps none past its bound, well within llama-server's own idle close.
            hc = config.healthcheck
            probe_on(loop, base_url(config, port), hc.path, hc.timeout, done, keep_for=hc.interval + 0.5)

        reload_asked = threading.Event()

        def on_reload_request() -> None:  # any thread (the API's, a signal handler): the loop looks at once
            reload_asked.set()
            loop.wake()

        reconciler.on_request = on_reload_request
        if install_signal_handlers and hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: reconciler.request())  # `kill -HUP`: one reconcile pass

        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="orch") as pool:
            supervisor = Supervisor(
                ServiceOps(service),
                dispatch,
                prober=prober,
                exits=exits,
                wake=loop.wake,
                view=view,
                probe_slack_s=PROBE_SLACK_S,
            )
            service.store.add_event("-", "daemon", f"daemon started (pid {me.pid})", clock())
            log.info("daemon started, pid %s, home %s, API %s", me.pid, home.root, api_url or "off")
            # Our llama-servers the database does not know (it was lost or rebuilt): found by their marker.
            for found in service.adopt_running(how="daemon start"):
                log.info("%s: adopted pid %s found running by its marker", found.name, found.pid)
            supervisor.boot(clock())
            # What the imports and the boot made lives as long as the daemon: out of the collector's sight, so its
            # runs (set off by every probe's few allocations) do not walk the whole heap again and again.
            gc.collect()
            gc.freeze()
            # Up: `daemon start` waits for this before it says so (a daemon that dies while booting is a failure).
            daemon_control.write_pid_file(
                home, daemon_control.DaemonInfo(me.pid, me.create_time, started_at, __version__, api_url, ready=True)
            )
            try:
                _supervise(
                    supervisor,
                    service,
                    reconciler,
                    dispatch,
                    loop,
                    stop,
                    clock,
                    tick_s=tick_s,
                    full_pass_s=full_pass_s,
                    reload_asked=reload_asked,
                )
            finally:
                exits.close()
                loop.close()
            if api is not None:
                api.stop()
                api = None
            service.store.add_event("-", "daemon", "daemon stopped; instances left running", clock())
            log.info("daemon stopping; instances are left running")
    finally:
        if api is not None:
            api.stop()
        daemon_control.pid_path(home).unlink(missing_ok=True)
        lock.release()


def _supervise(
    supervisor: Supervisor,
    service: InstanceService,
    reconciler: Reconciler,
    dispatch: Callable[[Callable[[], object]], None],
    loop: IoLoop,
    stop: threading.Event,
    clock: Callable[[], float],
    *,
    tick_s: float,
    full_pass_s: float,
    reload_asked: threading.Event | None = None,
) -> None:
    """The loop. It sleeps until the next thing is due: a probe at its interval, the end of a backoff, a worker's
    result, a process exit, or the housekeeping every ``tick_s`` (log rotation, a look for others' changes in the
    store, the reconciler's trigger). Each wake steps only the instances concerned; a full pass over every instance
    runs when the store says someone else changed something, and otherwise every ``full_pass_s`` as a safety net.
    The reconciler's trigger is asked when ``reload_asked`` is set, and with reload "auto" every RELOAD_LOOK_S."""
    store = service.store
    now = clock()
    next_housekeeping, next_full, next_reload_look = now, now, now
    seen = store.change_stamp()
    spun = False
    while not stop.is_set():
        now = clock()
        due = min(next_housekeeping, next_full, supervisor.next_due() or next_full)
        pause = due - now
        # Something still due right after its pass (a config that does not load): once more at once, then at
        # most every MIN_PAUSE_S, so the loop never spins.
        if pause <= 0:
            pause, spun = (MIN_PAUSE_S if spun else 0.0), True
        else:
            spun = False
        if not supervisor.inbox.empty():
            pause = 0.0  # posted during the last pass (a probe refused at once): handle it now
        loop.run_once(pause)
        if stop.is_set():
            break
        now = clock()
        if now < due and supervisor.inbox.empty():
            continue  # a probe's socket moved, nothing is known yet: no pass
        try:
            full = now >= next_full
            reconcile = False
            # Housekeeping rides along on a wake for something else in the second half of its period (a wake costs
            # about what a probe does); it is never later than ``tick_s`` after the last.
            if now >= next_housekeeping - tick_s / 2:
                next_housekeeping = now + tick_s
                stamp = store.change_stamp()
                full = full or stamp != seen
                seen = stamp
                supervisor.rotate_logs()
                asked = reload_asked is None or reload_asked.is_set()
                if asked or (reconciler.trigger.auto and now >= next_reload_look):
                    next_reload_look = now + RELOAD_LOOK_S
                    if reload_asked is not None:
                        reload_asked.clear()
                    # A pass acts on the configs: the supervisor looks at every one first (between probes it does
                    # not), so an invalid version is said, once, before the pass that leaves its instance running.
                    if reconciler.due(now):
                        reconcile = full = True
            if full:
                next_full = now + full_pass_s
            try:
                supervisor.tick(now, only_news=not full)
                if full:
                    service.reap_children()  # restarted instances are our children: none lingers as a zombie
                    seen = store.change_stamp()  # what this pass wrote itself is not news
            finally:
                if reconcile:  # due once: a failed tick must not lose it
                    dispatch(reconciler.run_pass)
        except Exception:  # one bad pass must not end supervision
            log.exception("supervisor tick failed")


def _serve_api(
    home: Home,
    service: InstanceService,
    settings,
    pid: int,
    started_at: float,
    *,
    reconciler: Reconciler | None = None,
    view: SupervisorView | None = None,
):
    """Bind the API's socket and serve the app on it; returns ``(ApiServer, url)``. ApiBindError for a taken port."""
    from llama_orchestrator.adapters.config_files import record_api_port
    from llama_orchestrator.api.server import ApiBindError, ApiServer, bind_socket, make_app, make_router, url_for
    from llama_orchestrator.services.instances_port import LocalInstances

    api = settings.api
    try:
        sock = bind_socket(api.host, api.port)
    except ApiBindError as exc:
        if "port" in api.model_fields_set or not exc.in_use:
            raise  # a port the person chose is theirs to change; another failure is not ours to dodge
        # The default 8000 is taken (another home's daemon, another program): take a free port and keep it, so
        # several homes on one machine each have their daemon, and this home's CLI finds it again.
        sock = bind_socket(api.host, 0)
        chosen = sock.getsockname()[1]
        try:
            record_api_port(home.settings_path, chosen)
        except BaseException:
            sock.close()
            raise
        log.warning("API port %s is taken: using %s, recorded as api.port in %s", api.port, chosen, home.settings_path)
        api = api.model_copy(update={"port": chosen})
    url = url_for(api.host, api.port)

    def daemon_record() -> dict[str, object]:
        return {
            "pid": pid,
            "version": __version__,
            "started_at": started_at,
            "uptime_s": max(0.0, time.time() - started_at),
            "api_url": url,
            "home": str(home.root),
        }

    try:
        router = make_router(lambda: service, settings.router)
        if router is not None:  # the supervisor's view of the processes: the router refreshes only what it doubts
            router.view = view
        if router is not None and settings.peers:  # other nodes' models through this router (issue 12)
            from llama_orchestrator.services.peers import PeerPool

            router.peers = PeerPool(settings.peers, memory=home.state_dir / "peers.json")
        # drainer: a recreate of a replica first takes it out of the router's rotation (zero-downtime `up`)
        instances = LocalInstances(service, probe_starting=False, drainer=router)
        if reconciler is not None:  # its recreates drain through the router; `daemon reload` reaches it
            reconciler.port = instances
            instances.reloader = reconciler.request
        app = make_app(instances, api, router=router, daemon=daemon_record)
        server = ApiServer(app, sock)
        server.start()
    except BaseException:
        sock.close()
        raise
    log.info("HTTP API and router on %s (bound to %s:%s)", url, api.host, api.port)
    return server, url


def _logged(work: Callable[[], object]) -> None:
    try:
        work()
    except Exception:  # a worker's failure is logged; the loop carries on
        log.exception("worker failed")
