"""Restart policy and backoff (SPEC §6): what to do when an instance's process ends.

Pure: time is always an argument (``now``, in seconds on whatever clock the supervisor uses), so tests replay
histories without sleeping. The supervisor keeps one ``RestartTracker`` per instance and replaces it with the one
each method returns; a person's start (``up``, ``restart``) begins again from a fresh ``RestartTracker()``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal

from llama_orchestrator.domain.config import RestartPolicyName, RestartSection
from llama_orchestrator.domain.states import Status


class ExitReason(StrEnum):
    crashed = "crashed"  # non-zero exit code, or killed by a signal
    clean = "clean"  # exit code 0
    unhealthy = "unhealthy"  # the supervisor stopped it after the health verdict turned unhealthy


RestartAction = Literal["restart", "give_up", "stay_down"]


def backoff_delay(restart: RestartSection, attempt: int) -> float:
    """Seconds to wait before restart number ``attempt`` (1-based): base * multiplier^(n-1), capped."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    try:
        delay = restart.backoff_seconds * restart.backoff_multiplier ** (attempt - 1)
    except OverflowError:  # multiplier 10, attempt 400: far past any cap
        delay = float("inf")
    return min(delay, restart.max_backoff_seconds)


def should_restart(policy: RestartPolicyName, reason: ExitReason, stopped_by_user: bool) -> bool:
    """Docker's rules: a person's stop is final; ``on-failure`` only after a failure; ``always`` after any exit."""
    if stopped_by_user or policy == "never":
        return False
    if policy == "on-failure":
        return reason in (ExitReason.crashed, ExitReason.unhealthy)
    return True  # "always" and "unless-stopped" differ only when the daemon starts: see resume_on_daemon_start


def resume_on_daemon_start(policy: RestartPolicyName, stopped_by_user: bool) -> bool:
    """Whether a starting daemon brings back an instance that is down but not failed.

    Docker's difference between the two: a person's stop holds while the daemon runs, but when the daemon starts
    ``always`` comes back anyway and ``unless-stopped`` keeps the ``down``. This is about instances that are
    *stopped*; one found *exited* (it crashed while no daemon watched, or the machine rebooted under it) is judged
    like any exit, by ``should_restart``, so ``on-failure`` brings it back too.
    """
    if policy == "always":
        return True
    return policy == "unless-stopped" and not stopped_by_user


@dataclass(frozen=True)
class RestartDecision:
    action: RestartAction
    status: Status  # where the instance goes now: backoff, failed, exited, or stopped for a person's stop
    attempt: int  # the restart's number (1-based) when action is "restart", else the restarts used so far
    tracker: RestartTracker  # the tracker to keep from now on
    delay: float = 0.0
    restart_at: float | None = None  # now + delay; None unless action is "restart"


@dataclass(frozen=True)
class RestartTracker:
    attempts: int = 0  # restarts made since a person started it, or since the last reset
    healthy_since: float | None = None  # when the current healthy stretch began; None when not healthy

    def on_exit(
        self, restart: RestartSection, reason: ExitReason, stopped_by_user: bool, now: float
    ) -> RestartDecision:
        # A long healthy run just before the crash earns a fresh count even if no tick saw it.
        current = replace(self.on_tick(restart, now), healthy_since=None)
        if not should_restart(restart.policy, reason, stopped_by_user):
            status = Status.stopped if stopped_by_user else Status.exited
            return RestartDecision("stay_down", status, current.attempts, current)
        if current.attempts >= restart.max_retries:
            # max_retries = 0 means no restarts at all: the first failure is final (SPEC §6: failed).
            return RestartDecision("give_up", Status.failed, current.attempts, current)
        attempt = current.attempts + 1
        delay = backoff_delay(restart, attempt)
        after = replace(current, attempts=attempt)
        return RestartDecision("restart", Status.backoff, attempt, after, delay, restart_at=now + delay)

    def on_healthy(self, now: float) -> RestartTracker:
        # Keep the start of the stretch: repeated healthy probes must not push it forward.
        return self if self.healthy_since is not None else replace(self, healthy_since=now)

    def on_unhealthy(self) -> RestartTracker:
        """Call when health leaves ``healthy``: the stretch towards a reset starts again from zero."""
        return self if self.healthy_since is None else replace(self, healthy_since=None)

    def on_tick(self, restart: RestartSection, now: float) -> RestartTracker:
        """Forget past restarts after ``reset_after_seconds`` of healthy running. Returns ``self`` if unchanged."""
        stable = self.healthy_since is not None and now - self.healthy_since >= restart.reset_after_seconds
        return replace(self, attempts=0) if stable and self.attempts else self
