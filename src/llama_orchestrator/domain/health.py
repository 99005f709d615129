"""The health verdict (SPEC §6): from probe outcomes to ``Health``, with the start period and retries.

Pure: ``adapters.health_probe`` makes the HTTP request and hands back a ``ProbeOutcome``; time is an argument.
One ``HealthTracker`` per process: a restart begins with a fresh ``HealthTracker(started_at=now)``.

The rules, in the order they apply to each probe:
- 200 is ok: failures reset to 0 and the instance is healthy. It also ends the start period early (as Docker
  does): once the server has answered, a later failure is a real one.
- Inside the start period (``now - started_at < start_period`` and never healthy yet) nothing counts as a
  failure: a refused connection (the server has not bound its port) leaves the health as it was, a 503 makes it
  ``loading``.
- After it, a 503 counts as a failure like any other: a model that loads for longer than ``start_period`` plus
  ``retries`` intervals is declared unhealthy, so a hung load does not wait forever. A big model needs a longer
  ``start_period``. Until ``retries`` is reached the health keeps its last value (``loading`` for a 503).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from llama_orchestrator.domain.config import HealthcheckSection
from llama_orchestrator.domain.states import Health

Verdict = Literal["ok", "loading", "fail"]


@dataclass(frozen=True)
class ProbeOutcome:
    status_code: int | None  # None when no HTTP answer came back
    error: str | None = None  # why no answer came back: refused, timed out, ...
    latency_ms: float | None = None

    def describe(self) -> str:
        """One line for `health` and events: the error, or the HTTP status."""
        if self.status_code is None:
            return self.error or "no answer"
        return f"HTTP {self.status_code}"


def classify(outcome: ProbeOutcome) -> Verdict:
    # The status code decides, not the body: llama-server's bodies have changed between versions.
    if outcome.status_code == 200:
        return "ok"
    if outcome.status_code == 503:
        return "loading"
    return "fail"


@dataclass(frozen=True)
class HealthTracker:
    started_at: float  # when the process was started: the start period counts from here
    consecutive_failures: int = 0
    health: Health = Health.unknown
    last_check_at: float | None = None
    last_latency_ms: float | None = None
    last_error: str | None = None  # the last probe that was not ok (kept after recovery, for `describe`)
    ever_healthy: bool = False  # a first 200 ends the start period

    def in_start_period(self, cfg: HealthcheckSection, now: float) -> bool:
        return not self.ever_healthy and now - self.started_at < cfg.start_period

    def observe(self, cfg: HealthcheckSection, outcome: ProbeOutcome, now: float) -> HealthTracker:
        verdict = classify(outcome)
        checked = replace(self, last_check_at=now, last_latency_ms=outcome.latency_ms)
        if verdict == "ok":
            return replace(checked, consecutive_failures=0, health=Health.healthy, ever_healthy=True)
        checked = replace(checked, last_error=outcome.describe())
        if self.in_start_period(cfg, now):
            return replace(checked, health=Health.loading) if verdict == "loading" else checked
        failures = self.consecutive_failures + 1
        if failures >= cfg.retries:
            health = Health.unhealthy
        elif verdict == "loading":
            health = Health.loading
        else:
            health = self.health
        return replace(checked, consecutive_failures=failures, health=health)

    @property
    def needs_restart(self) -> bool:
        """Unhealthy: the supervisor stops it and applies the restart policy (``ExitReason.unhealthy``)."""
        return self.health is Health.unhealthy

    def next_probe_at(self, cfg: HealthcheckSection) -> float:
        # The first probe goes at once: inside the start period a refused one costs nothing, and a fast load is
        # reported healthy without waiting a whole interval.
        return self.started_at if self.last_check_at is None else self.last_check_at + cfg.interval
