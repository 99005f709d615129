"""The daemon's reconcile pass: run ``domain.reconcile.plan`` over the home and carry out its actions.

When: ``ReloadTrigger`` (pure) watches the config files' stamps, which the daemon hands it when a pass is asked
for, and once a second with ``reload: "auto"`` in ``orchestrator.json`` (a stat per config); in ``auto`` a pass
runs 2 s after the last change, with ``manual`` (the default) only when asked (`llama-orch daemon reload`, ``POST
/api/daemon/reload``, SIGHUP). A pass runs on a worker thread, one at a time, and never writes status itself: it
calls the InstanceService and the instances port, as the CLI does.

What: a new ``autostart`` instance is started, a running one whose config changed is recreated (drained in the
router first when it has replicas: ``LocalInstances.recreate``; recreates that share an alias one after another),
a running one whose config file was removed is stopped, a process of ours the record lost is adopted (found by
its marker). An invalid config leaves its instance running (``ServiceOps`` reports it once per file version).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from llama_orchestrator.domain.errors import OrchestratorError
from llama_orchestrator.domain.reconcile import Action, ActionKind, ReloadTrigger, Stamp, plan, recreate_batches
from llama_orchestrator.services.instances_port import LocalInstances

log = logging.getLogger("llama_orchestrator.reconcile")
DEBOUNCE_S = 2.0


class Reconciler:
    def __init__(
        self,
        port: LocalInstances,
        *,
        auto: bool,
        quiet_s: float = DEBOUNCE_S,
        stop_timeout: float = 10.0,
        health_timeout: float = 300.0,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        self.port = port  # the daemon replaces it with the API's port, whose drainer is the router
        self.trigger = ReloadTrigger(quiet_s=quiet_s, auto=auto)
        self.stop_timeout = stop_timeout
        self.health_timeout = health_timeout
        self.on_request = on_request  # wakes the daemon's loop
        self._running = threading.Lock()

    @property
    def service(self):
        return self.port.service

    def request(self) -> None:
        """One pass soon, in either mode (`daemon reload`, SIGHUP). Safe from a signal handler or any thread."""
        self.trigger.request()
        if self.on_request is not None:
            self.on_request()

    def stamps(self) -> dict[str, Stamp]:
        """``(mtime_ns, size)`` of every config file: what a change is seen by."""
        home = self.service.home
        stamps: dict[str, Stamp] = {}
        for name in self.service.names():
            try:
                stat = home.config_path(name).stat()
            except OSError:
                continue
            stamps[name] = (stat.st_mtime_ns, stat.st_size)
        return stamps

    def due(self, now: float) -> bool:
        """Whether a pass should start now (never while one runs: its changes are seen when it ends)."""
        if self._running.locked():
            return False
        return self.trigger.observe(self.stamps(), now)

    def run_pass(self) -> list[Action]:
        """Plan over every instance and carry it out; returns the plan. One pass at a time."""
        with self._running:
            actions = self.plan()
            todo = [a for a in actions if a.kind not in (ActionKind.leave, ActionKind.report_invalid)]
            what = ", ".join(f"{a.kind} {a.name} ({a.reason})" for a in todo) or "nothing to do"
            log.info("reconcile pass: %s", what)
            self.execute(actions)
            log.info("reconcile pass done")
            return actions

    def plan(self) -> list[Action]:
        declared, recorded, observed = self.port.service_state(None)
        scan = getattr(self.service, "scan", None)
        if scan is not None:
            for found in scan():  # the OS is the truth: a marked process the record lost
                observed.setdefault(found.name, found)
        return plan(declared, recorded, observed, mode="reconcile")

    def execute(self, actions: list[Action]) -> None:
        svc = self.service
        for action in actions:
            try:
                if action.kind == ActionKind.start:
                    svc.store.add_event(action.name, "reconcile", f"starting: {action.reason}", time.time())
                    svc.start(action.name, by_person=False)
                elif action.kind == ActionKind.stop:
                    svc.store.add_event(action.name, "reconcile", f"stopping: {action.reason}", time.time())
                    # by_user: nobody restarts it (it has no config any more), as after a person's `down`
                    svc.stop(action.name, self.stop_timeout, by_user=True)
                elif action.kind == ActionKind.adopt:
                    svc.adopt_running(how=f"reconcile: {action.reason}")
            except OrchestratorError as exc:
                self._failed(action, exc)
        # Recreates last, batch by batch: within a batch no two share an alias; each batch is healthy before the
        # next, so a replica set always has a member serving.
        for batch in recreate_batches(actions):
            for action in batch:
                try:
                    svc.store.add_event(
                        action.name,
                        "reconcile",
                        f"recreating: {', '.join(action.changes) or action.reason}",
                        time.time(),
                    )
                    self.port.recreate(
                        action.name,
                        by_person=False,
                        wait=bool(action.aliases),
                        timeout=self.health_timeout,
                        stop_timeout=self.stop_timeout,
                    )
                except OrchestratorError as exc:
                    self._failed(action, exc)

    def _failed(self, action: Action, exc: OrchestratorError) -> None:
        log.warning("reconcile: %s %s failed: %s", action.kind, action.name, exc)
        self.service.store.add_event(action.name, "reconcile-failed", f"{action.kind}: {exc}", time.time())
