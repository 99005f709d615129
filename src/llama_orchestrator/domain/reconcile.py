"""The reconcile decision: declared configs x recorded rows x observed processes -> actions. Pure.

Two callers, two modes:

* ``up`` (a person's `llama-orch up NAME...`): the named instances only. A stopped one is started, a running one
  whose config changed is recreated (as compose recreates a service whose definition changed), an unchanged one is
  left alone; ``recreate="never"`` / ``"force"`` are compose's ``--no-recreate`` / ``--force-recreate``.
* ``reconcile`` (the daemon, after a config change with ``reload: auto``, or on `daemon reload`/SIGHUP): every
  instance. A new ``autostart`` instance is started, a changed running one recreated, a running one whose config
  file was removed stopped, a process the record lost adopted; exited, failed and backoff instances stay the
  supervisor's business (their restart policy decides).

An invalid config is ``report_invalid`` and its instance keeps running (in the daemon, ``ServiceOps`` already says
so once per version of the file). ``ReloadTrigger`` decides when the daemon makes a pass: a debounce over the
config files' stamps, time an argument.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.drift import config_changed, config_diff
from llama_orchestrator.domain.errors import ConfigError
from llama_orchestrator.domain.states import ACTIVE

Mode = Literal["up", "reconcile"]
Recreate = Literal["changed", "never", "force"]


class ActionKind(StrEnum):
    start = "start"  # not running: start it (`up`, or a new autostart instance in a reconcile pass)
    recreate = "recreate"  # running another config than declared (or forced): stop, start with the new config
    stop = "stop"  # running, but its config file is gone
    adopt = "adopt"  # a process runs that the record does not know (lost or stale state): record it again
    leave = "leave"  # nothing to do: unchanged and running, or down and the supervisor's business
    report_invalid = "report-invalid"  # the config does not load: say so once; a running instance keeps running


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    name: str
    reason: str
    changes: tuple[str, ...] = ()  # the changed config paths (recreate, and leave with --no-recreate)
    aliases: tuple[str, ...] = ()  # the instance's aliases: recreates that share one run one at a time

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "action": str(self.kind), "reason": self.reason, "changes": list(self.changes)}


class RowLike(Protocol):
    """What the decision reads of a recorded row (``adapters.store.InstanceRow``)."""

    status: str
    pid: int | None
    config_hash: str | None
    config_json: str | None
    stopped_by_user: bool


class ProcessLike(Protocol):
    """A live process observed for an instance (pid and create time identify it)."""

    pid: int
    create_time: float


@dataclass(frozen=True)
class Observed:
    pid: int
    create_time: float = 0.0


Declared = InstanceConfig | ConfigError


def plan(
    declared: Mapping[str, Declared],
    recorded: Mapping[str, RowLike],
    observed: Mapping[str, ProcessLike],
    *,
    mode: Mode,
    recreate: Recreate = "changed",
    names: list[str] | None = None,
) -> list[Action]:
    """The actions, in order: with ``names`` (``up``) in the order given, else by name. Recreates of instances that
    share an alias come one after another, so the executor can run them one at a time (see ``recreate_batches``)."""
    if names is None:
        chosen = sorted(set(declared) | set(recorded) | set(observed))
    else:
        chosen = list(dict.fromkeys(names))
    actions = [_decide(n, declared.get(n), recorded.get(n), observed.get(n), mode, recreate) for n in chosen]
    return [a for a in actions if a is not None]


def _decide(
    name: str,
    config: Declared | None,
    row: RowLike | None,
    process: ProcessLike | None,
    mode: Mode,
    recreate: Recreate,
) -> Action | None:
    running = process is not None
    if isinstance(config, ConfigError):
        where = "it keeps running" if running else "not started"
        return Action(ActionKind.report_invalid, name, f"config does not load ({where}): {config}")
    if config is None:
        if running:
            return Action(ActionKind.stop, name, "config removed")
        return None  # only a record left (`ps -a` shows it); nothing runs
    aliases = tuple(config.aliases)
    if process is not None:
        if row is None or row.status not in ACTIVE or row.pid != process.pid:
            # A live process the record does not name: take it over rather than start a second one.
            return Action(ActionKind.adopt, name, f"pid {process.pid} runs but is not recorded", aliases=aliases)
        if row.status == "stopping":
            return Action(ActionKind.leave, name, "stopping", aliases=aliases)
        changed = config_changed(row.config_hash, config)
        paths = tuple(c.path for c in config_diff(row.config_json, config) if c.needs_recreate) if changed else ()
        if recreate == "force":
            return Action(ActionKind.recreate, name, "forced", paths, aliases)
        if changed and recreate == "changed":
            return Action(ActionKind.recreate, name, "config changed", paths, aliases)
        if changed:
            return Action(ActionKind.leave, name, "config changed, not recreated (--no-recreate)", paths, aliases)
        return Action(ActionKind.leave, name, f"already {row.status}", aliases=aliases)
    if mode == "up":
        return Action(ActionKind.start, name, "not running", aliases=aliases)
    # reconcile: start only what should run and nobody decided otherwise; exits belong to the restart policy.
    if config.autostart and (row is None or (row.status == "stopped" and not row.stopped_by_user)):
        return Action(ActionKind.start, name, "autostart", aliases=aliases)
    return None


def recreate_batches(actions: list[Action]) -> list[list[Action]]:
    """Recreates grouped so that no two in a batch share an alias: a batch may run at once, batches one after
    another (each recreate healthy before the next batch), so a replica set always keeps a member serving."""
    batches: list[tuple[set[str], list[Action]]] = []
    for action in (a for a in actions if a.kind == ActionKind.recreate):
        keys = set(action.aliases)
        target = next((b for b in batches if not (b[0] & keys)), None)
        if target is None:
            target = (set(), [])
            batches.append(target)
        target[0].update(keys)
        target[1].append(action)
    return [b[1] for b in batches]


# -- when the daemon makes a pass ---------------------------------------------------------------------------------

Stamp = Hashable  # e.g. (mtime_ns, size) of a config file; None for a folder without a config


@dataclass
class ReloadTrigger:
    """Debounce config changes into passes. ``observe(stamps, now)`` once per daemon tick with the config files'
    stamps; it answers True when a pass is due: the stamps differ from the last pass's and have been quiet for
    ``quiet_s`` (an editor's save-and-rename, or several files copied, is one pass), or ``request()`` asked."""

    quiet_s: float = 2.0
    auto: bool = False
    _applied: dict[str, Stamp] | None = None  # the stamps the last pass saw
    _seen: dict[str, Stamp] | None = None
    _changed_at: float | None = None
    _requested: bool = False

    def request(self) -> None:
        """`daemon reload` / SIGHUP: one pass at the next observe, in either mode."""
        self._requested = True

    def observe(self, stamps: Mapping[str, Stamp], now: float) -> bool:
        current = dict(stamps)
        if self._applied is None:  # the first look: what runs at boot is the baseline (boot adopts and starts)
            self._applied = self._seen = current
        if current != self._seen:
            self._seen, self._changed_at = current, now
        if self._requested:
            self._requested = False
            self._applied, self._changed_at = current, None
            return True
        if not self.auto or self._changed_at is None or now - self._changed_at < self.quiet_s:
            return False
        self._changed_at = None
        if current == self._applied:
            return False  # changed and changed back
        self._applied = current
        return True
