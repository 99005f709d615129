"""The supervisor: one loop that watches every instance, probes its health and applies its restart policy.

Shaped like honcho's manager: the loop thread owns all decisions. Slow work (a start, a stop) runs on worker
threads, which post their results to one queue; probes run on the loop's own selector when the daemon gives a
``prober`` (worker threads otherwise). An exit watch (``exits``: a pidfd, or a waiting thread) posts a notice the
moment a watched process ends, so an exit is handled at once rather than at the next pass. Each ``tick(now)``
first drains the queue, then steps every instance (or only those the news was about, and those due). Time is an
argument and the operations sit behind ``InstanceOps``, so tests replay whole histories (crash loops, hangs, slow
loads) with a fake clock and fake operations, instantly.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from llama_orchestrator.adapters.process import ProcessHandle
from llama_orchestrator.adapters.store import InstanceRow
from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.errors import OrchestratorError
from llama_orchestrator.domain.health import HealthTracker, ProbeOutcome
from llama_orchestrator.domain.restart import ExitReason, RestartTracker, resume_on_daemon_start, should_restart
from llama_orchestrator.domain.states import ACTIVE, Health, Status
from llama_orchestrator.services.supervisor_view import SupervisorView

log = logging.getLogger("llama_orchestrator.supervisor")

HEALTH_SAVE_S = 5.0
CONFIG_RETRY_S = 1.0  # an instance whose config does not load is looked at again after this (not in a spin)
# The grace a stop of an unhealthy instance gives: it already failed `retries` health checks, so it is likely
# wedged and would only use the whole grace up; a suspended one (SIGSTOP) is killed at once (InstanceService.stop).
UNHEALTHY_STOP_GRACE_S = 3.0
ProcessKey = tuple[int | None, float | None]  # (pid, create_time): which process a tracker belongs to


class ExitNotices(Protocol):
    """``adapters.process.exit_watch.ExitWatch``: ``on_exit()`` soon after the process ends (from any thread)."""

    def watch(self, key: str, handle: ProcessHandle, on_exit: Callable[[], None]) -> None: ...
    def forget(self, key: str) -> None: ...


# Start a probe of (config, port) and call back with its outcome, on the loop's thread (``health_probe.probe_on``).
Prober = Callable[[InstanceConfig, "int | None", Callable[[ProbeOutcome], None]], None]


class InstanceOps(Protocol):
    """What the supervisor does to instances. The real one is ``ServiceOps``; tests pass a scripted fake."""

    def names(self) -> list[str]: ...
    def load(self, name: str) -> InstanceConfig: ...
    def refresh(self, name: str) -> InstanceRow: ...
    def start(self, name: str) -> InstanceRow: ...
    def stop(self, name: str, timeout: float) -> InstanceRow: ...
    def probe(self, config: InstanceConfig, port: int | None) -> ProbeOutcome: ...
    def update(self, name: str, only_if: dict[str, object] | None = None, **changes: object) -> bool:
        """Change fields other than the status."""

    def transition(
        self,
        name: str,
        expected: Status | set[Status],
        new: Status,
        *,
        event: tuple[str, str] | None = None,
        only_if: dict[str, object] | None = None,
        now: float | None = None,
        **changes: object,
    ) -> bool:
        """``Store.transition``: the one way a status changes (CAS on ``expected``, checked against the table,
        ``event`` written with it). False when the row moved meanwhile, or the edge is not in the table."""

    def event(self, name: str, kind: str, message: str, ts: float) -> None: ...
    def rotate_logs(self, name: str, config: InstanceConfig) -> None: ...


@dataclass
class Watch:
    """The supervisor's memory of one instance."""

    key: ProcessKey = (None, None)
    health: HealthTracker | None = None
    restart: RestartTracker = field(default_factory=RestartTracker)
    next_probe_at: float = 0.0
    probing: bool = False
    busy: bool = False  # a start or stop is in flight: no decision until it reports back
    handled_exit: ProcessKey | None = None  # the exit already decided on (stay_down), so it is decided once
    started_by_us: ProcessKey | None = None
    restart_at: float | None = None  # when a backoff ends
    health_saved: tuple[Health, float] | None = None  # what was last written, and when
    # The row said `starting` at the last step: a healthy probe then moves it to `running` (one transaction). Once
    # it runs, a probe writes nothing but the health it changed (no write transaction per probe).
    starting: bool = False
    idle_until: float = 0.0  # its config does not load: nothing is due before this
    config: InstanceConfig | None = None  # the one its last step used
    port: int | None = None  # the port its process was started on, as its last step read it

    def due_at(self) -> float | None:
        """When this instance next needs a step of its own (a probe, or the end of a backoff)."""
        if self.busy:
            return None
        due = self.restart_at
        if self.health is not None and not self.probing and (due is None or self.next_probe_at < due):
            due = self.next_probe_at
        return None if due is None else max(due, self.idle_until)

    def only_probe_due(self, now: float, slack: float) -> bool:
        """Nothing but a probe is due (within ``slack``) for an instance that runs and whose exit is watched: the
        probe can go out without a step (no config stat, no store read); its exit would have been told."""
        return (
            not self.busy
            and not self.probing
            and self.health is not None
            and self.config is not None
            and self.restart_at is None
            and self.key != (None, None)
            and self.next_probe_at <= now + probe_slack(self.config, slack)
        )


def probe_slack(config: InstanceConfig, slack: float) -> float:
    """How early a probe may go out: ``slack``, but never more than a tenth of its interval."""
    return min(slack, config.healthcheck.interval * 0.1)


Dispatch = Callable[[Callable[[], object]], None]


class Supervisor:
    def __init__(
        self,
        ops: InstanceOps,
        dispatch: Dispatch,
        *,
        stop_timeout: float = UNHEALTHY_STOP_GRACE_S,
        prober: Prober | None = None,
        exits: ExitNotices | None = None,
        wake: Callable[[], None] = lambda: None,
        view: SupervisorView | None = None,
        probe_slack_s: float = 0.0,
    ) -> None:
        """``prober``: probes on the loop (else ``ops.probe`` on a worker); ``exits``: told of exits at once (else
        they are found by the passes); ``wake``: rings the loop when a notice is posted from another thread;
        ``view``: where it publishes what it sees (made before it, so the router can be given it first);
        ``probe_slack_s``: a probe due within this much of another one goes out with it (one wake for both, and
        instances adopted together stay probed together instead of drifting apart into one wake each)."""
        self.ops = ops
        self._dispatch = dispatch
        self._prober = prober
        self._exits = exits
        self._wake = wake
        self.stop_timeout = stop_timeout
        self.probe_slack_s = probe_slack_s
        self.watches: dict[str, Watch] = {}
        self.view = view or SupervisorView()  # what it saw, for the router (services.supervisor_view)
        self.inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()

    # -- entry points ------------------------------------------------------------------------------------------

    def boot(self, now: float) -> None:
        """Adopt what runs, then start what should run: `autostart` instances, and per policy (Docker's rules)."""
        for name in self.ops.names():
            config = self._config(name)
            if config is None:
                continue
            row = self.ops.refresh(name)
            watch = self.watches.setdefault(name, Watch(restart=RestartTracker(attempts=row.restart_attempts)))
            if row.status in ACTIVE:
                self._adopt(name, watch, row, now, by_person=False)
                self.ops.event(name, "adopted", f"supervising pid {row.pid}", now)
            elif row.status in (Status.stopped, Status.exited) and (
                config.autostart or resume_on_daemon_start(config.restart.policy, row.stopped_by_user)
            ):
                why = "autostart" if config.autostart else f"restart policy {config.restart.policy}"
                self.ops.event(name, "autostart", f"starting at daemon start ({why})", now)
                watch.handled_exit = (row.pid, row.create_time)
                self._start(name, watch, attempt=None)

    def tick(self, now: float, *, only_news: bool = False) -> None:
        """Handle what the workers posted, then step every instance (or, with ``only_news``, just the ones those
        messages were about: a worker's result wakes the loop early, and that should not cost a full pass)."""
        touched = self.drain(now)
        if only_news:
            # No folder listing: the instances concerned are known (a removed one is pruned by the next full pass,
            # and its step finds no config meanwhile). One that is due for nothing but its probe gets just the
            # probe: between probes, and at them, a healthy instance costs no step (its exit is told at once, and
            # others' changes to it make the daemon run a full pass).
            probe_only = []
            for name, watch in self.watches.items():
                if name in touched:
                    continue
                if self._exits is not None and watch.only_probe_due(now, self.probe_slack_s):
                    probe_only.append(name)
                elif (watch.due_at() or float("inf")) <= now:
                    touched.add(name)
            for name in probe_only:
                try:
                    self._probe_now(name, self.watches[name], now)
                except Exception:  # as a step's: one instance's trouble must never pause the others' supervision
                    self.watches[name].probing = False  # tried again when due, not waited on forever
                    log.exception("%s: probe failed to start", name)
            names = sorted(touched)
        else:
            names = self.ops.names()
            for gone in set(self.watches) - set(names):
                del self.watches[gone]
                self._unwatch_exit(gone)
                self.view.drop(gone)
        for name in names:
            try:
                self._step(name, now)
            except OrchestratorError as exc:
                log.warning("%s: %s", name, exc)
            except Exception:  # one instance's trouble must never pause the others' supervision
                log.exception("%s: supervision step failed", name)

    def next_due(self) -> float | None:
        """The earliest time an instance needs a step before the next regular pass."""
        times = [t for t in (w.due_at() for w in self.watches.values()) if t is not None]
        return min(times) if times else None

    def _probe_now(self, name: str, watch: Watch, now: float) -> None:
        config = watch.config
        if config is None:  # only_probe_due saw one: never so here
            return
        watch.restart = self._tick_restart(name, watch.restart, config, now)
        watch.probing = True
        self._probe(name, watch.key, config, watch.port)

    def rotate_logs(self) -> None:
        """Keep the logs of the running instances within their size (the daemon calls this on a timer of its own:
        a flood fills a log between two probes)."""
        for name, watch in list(self.watches.items()):
            if watch.key != (None, None) and watch.config is not None:
                self.ops.rotate_logs(name, watch.config)  # the config of its last step: no stat of it here

    def drain(self, now: float) -> set[str]:
        """Handle every posted message; returns the names of the instances they were about."""
        touched: set[str] = set()
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return touched
            kind, name, *rest = message
            if kind != "probed":  # a probe's verdict is handled whole by its handler: no step after it
                touched.add(name)
            handler = getattr(self, f"_on_{kind}")
            try:
                handler(name, now, *rest)
            except Exception:  # as in tick: one instance's trouble must not stop the others
                log.exception("%s: handling %s failed", name, kind)

    # -- one instance, one step --------------------------------------------------------------------------------

    def _step(self, name: str, now: float) -> None:
        watch = self.watches.setdefault(name, Watch())
        if watch.busy:
            return
        config = self._config(name)
        if config is None:
            watch.idle_until = now + CONFIG_RETRY_S  # not due again at once: the loop must not spin on it
            return
        watch.config = config
        row = self.ops.refresh(name)
        self.view.publish(row)
        watch.port = row.port
        key: ProcessKey = (row.pid, row.create_time)
        seen = watch.key
        if row.status in (Status.starting, Status.running):
            if watch.key != key:
                self._adopt(name, watch, row, now, by_person=watch.started_by_us != key)
            watch.starting = row.status == Status.starting
            watch.restart = self._tick_restart(name, watch.restart, config, now)
            if not watch.probing and now + probe_slack(config, self.probe_slack_s) >= watch.next_probe_at:
                watch.probing = True
                self._probe(name, key, config, row.port)
            self.ops.rotate_logs(name, config)
        else:
            # Not running (a person stopped it, or it is down for good): nothing to probe. Without this the
            # watch would stay "due" forever and the loop would spin.
            if watch.key != (None, None):
                self._unwatch_exit(name)
            watch.key, watch.health = (None, None), None
            if row.status != Status.backoff:
                watch.restart_at = None
        if row.status == Status.exited and watch.handled_exit != key:
            if key not in (seen, watch.started_by_us):
                # A process no tick saw running: a person's start that died at once. The count recorded at that
                # start (0 after a person's `up`) is the truth, not what this watch remembers.
                watch.restart = RestartTracker(attempts=row.restart_attempts)
            self._decide_after_exit(name, watch, config, row, _exit_reason(row.exit_code), now)
        elif row.status == Status.backoff and row.next_restart_at is not None and now >= row.next_restart_at:
            self._start(name, watch, attempt=watch.restart.attempts)

    def _adopt(self, name: str, watch: Watch, row: InstanceRow, now: float, *, by_person: bool) -> None:
        """A process we have not seen: ours from a restart, a person's `up`, or one running before we started."""
        key: ProcessKey = (row.pid, row.create_time)
        if by_person and watch.restart.attempts:
            watch.restart = RestartTracker()  # a person started it: the count begins again, as in Docker
            self.ops.update(name, restart_attempts=0)
        watch.key = key
        self._watch_exit(name, key)
        watch.restart_at = None  # a process runs: a pending backoff restart is superseded
        watch.health_saved = None
        watch.health = HealthTracker(started_at=row.started_at or now)
        watch.next_probe_at = now
        watch.probing = False

    def _tick_restart(self, name: str, tracker: RestartTracker, config: InstanceConfig, now: float) -> RestartTracker:
        after = tracker.on_tick(config.restart, now)
        if after.attempts != tracker.attempts:
            self.ops.update(name, restart_attempts=after.attempts)
            self.ops.event(
                name, "reset", f"restart count reset after {config.restart.reset_after_seconds:g} s healthy", now
            )
        return after

    # -- exit notices and probes ---------------------------------------------------------------------------------

    def _watch_exit(self, name: str, key: ProcessKey) -> None:
        pid, create_time = key
        if self._exits is None or pid is None:
            return

        def on_exit() -> None:  # any thread: post, ring, and let the loop decide
            self.inbox.put(("exit_seen", name, key))
            self._wake()

        self._exits.watch(name, ProcessHandle(pid, create_time or 0.0), on_exit)

    def _unwatch_exit(self, name: str) -> None:
        if self._exits is not None:
            self._exits.forget(name)

    def _on_exit_seen(self, name: str, now: float, key: ProcessKey) -> None:
        """A watched process ended: nothing to do here, the notice makes ``tick`` step the instance now, and the
        step's ``refresh`` establishes (and records) the exit."""

    def _probe(self, name: str, key: ProcessKey, config: InstanceConfig, port: int | None) -> None:
        def report(outcome: ProbeOutcome) -> None:
            self.inbox.put(("probed", name, key, outcome))

        if self._prober is not None:
            self._prober(config, port, report)
        else:
            self._dispatch(lambda: report(self.ops.probe(config, port)))

    # -- health --------------------------------------------------------------------------------------------------

    def _on_probed(self, name: str, now: float, key: ProcessKey, outcome: ProbeOutcome) -> None:
        watch = self.watches.get(name)
        # The config its probe was sent with (its last step's: a full pass looks at the file every few seconds)
        config = watch.config if watch is not None and watch.config is not None else self._config(name)
        if watch is None or config is None:
            return
        watch.probing = False
        if watch.key != key or watch.health is None or watch.busy:
            return  # a probe of a process that is gone or being replaced
        before = watch.health.health
        watch.health = tracker = watch.health.observe(config.healthcheck, outcome, now)
        watch.next_probe_at = now + config.healthcheck.interval
        changes = {
            "health": tracker.health,
            "health_checked_at": now,
            "health_latency_ms": outcome.latency_ms,
            "health_error": None if tracker.health == Health.healthy else outcome.describe(),
        }
        pid = key[0]
        if tracker.health == Health.unknown:
            # No verdict yet (refused inside the start period): keep what is recorded, e.g. the healthy that
            # `up --wait` saw after this probe was sent.
            return
        if tracker.health == Health.healthy:
            watch.restart = watch.restart.on_healthy(now)
            was_starting, watch.starting = watch.starting, False
            if was_starting and self.ops.transition(
                name,
                Status.starting,
                Status.running,
                only_if={"pid": pid},
                now=now,
                event=("healthy", f"answering after {now - tracker.started_at:.1f} s"),
                last_error=None,
                **changes,
            ):
                watch.health_saved = (tracker.health, now)  # written with the status
                self.view.publish(self.ops.refresh(name))
                return
        else:
            watch.restart = watch.restart.on_unhealthy()
        # Every probe's result is kept in memory; the state file gets it when the verdict changes, and otherwise
        # every HEALTH_SAVE_S (the "last check" others read): twenty instances probed every second would
        # otherwise be twenty writes a second.
        saved = watch.health_saved
        due = saved is None or saved[0] != tracker.health or now - saved[1] >= HEALTH_SAVE_S
        if due and self.ops.update(name, only_if={"pid": pid}, **changes):
            watch.health_saved = (tracker.health, now)
        self.view.probed(name, now, outcome.latency_ms, tracker.health)
        if tracker.health != before and before not in (Health.unknown, Health.loading):
            detail = "recovered" if tracker.health == Health.healthy else outcome.describe()
            self.ops.event(name, "health", f"{before} -> {tracker.health}: {detail}", now)
        if tracker.needs_restart:
            if should_restart(config.restart.policy, ExitReason.unhealthy, stopped_by_user=False):
                self.ops.event(
                    name,
                    "unhealthy",
                    f"{tracker.consecutive_failures} failed health checks ({outcome.describe()}): restarting",
                    now,
                )
                self._stop_unhealthy(name, watch)
            elif before != Health.unhealthy:
                self.ops.event(name, "unhealthy", f"{outcome.describe()}; restart policy never: left running", now)

    def _stop_unhealthy(self, name: str, watch: Watch) -> None:
        watch.busy = True

        def work() -> None:
            try:
                row = self.ops.stop(name, self.stop_timeout)
                self.inbox.put(("stopped_unhealthy", name, row))
            except Exception as exc:  # noqa: BLE001 - reported through the loop, which decides
                self.inbox.put(("op_failed", name, f"stop failed: {exc}"))

        self._dispatch(work)

    def _on_stopped_unhealthy(self, name: str, now: float, row: InstanceRow) -> None:
        watch = self.watches.get(name)
        config = self._config(name)
        if watch is None or config is None:
            return
        watch.busy = False
        self._decide_after_exit(name, watch, config, row, ExitReason.unhealthy, now)

    # -- exits and restarts --------------------------------------------------------------------------------------

    def _decide_after_exit(
        self, name: str, watch: Watch, config: InstanceConfig, row: InstanceRow, reason: ExitReason, now: float
    ) -> None:
        watch.handled_exit = (row.pid, row.create_time)
        watch.key, watch.health = (None, None), None
        self._unwatch_exit(name)
        decision = watch.restart.on_exit(config.restart, reason, row.stopped_by_user, now)
        watch.restart = decision.tracker
        # Compare-and-swap on the status this decision was made from: if a person acted meanwhile, theirs stands.
        current = Status(row.status)
        if decision.action == "restart":
            message = f"{reason}: restart {decision.attempt} of {config.restart.max_retries} in {decision.delay:g} s"
            if self.ops.transition(
                name,
                current,
                Status.backoff,
                event=("backoff", message),
                now=now,
                next_restart_at=decision.restart_at,
                restart_attempts=decision.attempt,
                last_error=exit_error(reason, row),  # kept through the restarts until it is healthy again
            ):
                watch.restart_at = decision.restart_at
        elif decision.action == "give_up":
            self.ops.transition(
                name,
                current,
                Status.failed,
                now=now,
                event=("failed", f"{reason}: gave up after {decision.attempt} restarts"),
                next_restart_at=None,
                last_error=f"gave up after {decision.attempt} restarts",
            )
        elif decision.status != current:
            self.ops.transition(name, current, decision.status, now=now)
        self.view.publish(self.ops.refresh(name))

    def _start(self, name: str, watch: Watch, attempt: int | None) -> None:
        watch.busy, watch.restart_at = True, None

        def work() -> None:
            try:
                row = self.ops.start(name)
                self.inbox.put(("started", name, row, attempt))
            except Exception as exc:  # noqa: BLE001 - a failed start is a failure like a crash: policy decides
                self.inbox.put(("start_failed", name, str(exc), attempt))

        self._dispatch(work)

    def _on_started(self, name: str, now: float, row: InstanceRow, attempt: int | None) -> None:
        watch = self.watches.setdefault(name, Watch())
        watch.busy = False
        watch.started_by_us = (row.pid, row.create_time)
        if attempt is not None:
            self.ops.update(name, restarts=row.restarts + 1, restart_attempts=attempt)
            self.ops.event(name, "restarted", f"pid {row.pid} (restart {attempt})", now)

    def _on_start_failed(self, name: str, now: float, message: str, attempt: int | None) -> None:
        watch = self.watches.setdefault(name, Watch())
        watch.busy = False
        config = self._config(name)
        if config is None:
            return
        self.ops.event(name, "start-failed", message, now)
        row = self.ops.refresh(name)
        self._decide_after_exit(name, watch, config, row, ExitReason.crashed, now)

    def _on_op_failed(self, name: str, now: float, message: str) -> None:
        watch = self.watches.setdefault(name, Watch())
        watch.busy = False
        self.ops.event(name, "error", message, now)

    # -- configs ---------------------------------------------------------------------------------------------------

    def _config(self, name: str) -> InstanceConfig | None:
        """The config, or None when it does not load (ServiceOps says so once per version of the file, and
        supervises a running process with its last good config meanwhile)."""
        try:
            return self.ops.load(name)
        except OrchestratorError:
            return None


def _exit_reason(exit_code: int | None) -> ExitReason:
    # Unknown exit code (not our child, or killed): counts as a crash.
    return ExitReason.clean if exit_code == 0 else ExitReason.crashed


def exit_error(reason: ExitReason, row: InstanceRow) -> str:
    """``last_error`` of an instance the supervisor restarts: why its last process ended."""
    if reason == ExitReason.unhealthy:
        return f"unhealthy: {row.health_error}" if row.health_error else "unhealthy"
    if row.exit_code is not None:
        return f"{reason}: exited with code {row.exit_code}"
    return f"{reason}: its process ended"
