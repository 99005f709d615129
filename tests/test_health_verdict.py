"""The health verdict (SPEC §6): scripted probe histories with explicit times, no sleeps."""

from __future__ import annotations

import pytest

from llama_orchestrator.domain.config import HealthcheckSection
from llama_orchestrator.domain.health import HealthTracker, ProbeOutcome, classify
from llama_orchestrator.domain.states import Health

CFG = HealthcheckSection(interval=10, timeout=5, retries=3, start_period=60)

OK = ProbeOutcome(200, latency_ms=3.0)
LOADING = ProbeOutcome(503, latency_ms=2.0)
ERROR_500 = ProbeOutcome(500, latency_ms=2.0)
REFUSED = ProbeOutcome(None, "cannot connect: [Errno 111] Connection refused", 0.5)
TIMEOUT = ProbeOutcome(None, "timed out (ReadTimeout)", 5000.0)

U, L, H, X = Health.unknown, Health.loading, Health.healthy, Health.unhealthy


@pytest.mark.parametrize(
    ("outcome", "verdict"),
    [
        (OK, "ok"),
        (LOADING, "loading"),
        (ERROR_500, "fail"),
        (ProbeOutcome(404), "fail"),
        (ProbeOutcome(204), "fail"),  # only 200 is healthy
        (ProbeOutcome(302), "fail"),
        (REFUSED, "fail"),
        (TIMEOUT, "fail"),
        (ProbeOutcome(200, error="ignored"), "ok"),  # the status code decides
    ],
)
def test_classify(outcome: ProbeOutcome, verdict: str) -> None:
    assert classify(outcome) == verdict


def replay(steps: list[tuple[float, ProbeOutcome, Health, int]], cfg: HealthcheckSection = CFG) -> HealthTracker:
    """Feed (time, outcome) into a tracker started at t=0, checking (health, failures) after each."""
    tracker = HealthTracker(started_at=0.0)
    for now, outcome, health, failures in steps:
        tracker = tracker.observe(cfg, outcome, now)
        assert (tracker.health, tracker.consecutive_failures) == (health, failures), f"at t={now}"
        assert tracker.last_check_at == now and tracker.last_latency_ms == outcome.latency_ms
    return tracker


HISTORIES = {
    "failures inside the start period don't count": [
        (0, REFUSED, U, 0),
        (10, TIMEOUT, U, 0),
        (20, ERROR_500, U, 0),
        (50, REFUSED, U, 0),
        (59.9, REFUSED, U, 0),
    ],
    "a normal load: refused, loading, healthy": [
        (0, REFUSED, U, 0),
        (10, LOADING, L, 0),
        (20, REFUSED, L, 0),  # a refusal inside the start period does not undo `loading`
        (30, LOADING, L, 0),
        (40, OK, H, 0),
    ],
    "failures after the start period make it unhealthy": [
        (60, REFUSED, U, 1),  # start_period is over at exactly 60 s
        (70, ERROR_500, U, 2),
        (80, TIMEOUT, X, 3),
        (90, REFUSED, X, 4),
    ],
    "a load longer than the start period becomes unhealthy": [
        (10, LOADING, L, 0),
        (50, LOADING, L, 0),
        (60, LOADING, L, 1),  # 503 counts as a failure once the start period is over
        (70, LOADING, L, 2),
        (80, LOADING, X, 3),
    ],
    "a first 200 ends the start period early": [
        (5, OK, H, 0),
        (15, REFUSED, H, 1),  # still inside the 60 s, but it answered once: this counts
        (25, LOADING, L, 2),
        (35, REFUSED, X, 3),
    ],
    "a healthy instance tolerates retries - 1 failures": [
        (10, OK, H, 0),
        (20, ERROR_500, H, 1),
        (30, TIMEOUT, H, 2),
        (40, OK, H, 0),
        (50, REFUSED, H, 1),
        (60, REFUSED, H, 2),
        (70, OK, H, 0),
    ],
    "recovery from unhealthy": [
        (60, REFUSED, U, 1),
        (70, REFUSED, U, 2),
        (80, REFUSED, X, 3),
        (90, LOADING, X, 4),  # a 503 does not lift the verdict
        (100, OK, H, 0),
        (110, REFUSED, H, 1),  # and the count starts again from zero
    ],
}


@pytest.mark.parametrize("steps", list(HISTORIES.values()), ids=list(HISTORIES))
def test_history(steps: list[tuple[float, ProbeOutcome, Health, int]]) -> None:
    replay(steps)


@pytest.mark.parametrize(
    ("cfg", "steps"),
    [
        (HealthcheckSection(start_period=0, retries=3), [(0, REFUSED, U, 1), (1, REFUSED, U, 2), (2, REFUSED, X, 3)]),
        (HealthcheckSection(start_period=0, retries=1), [(0, OK, H, 0), (1, ERROR_500, X, 1)]),
        (HealthcheckSection(start_period=0, retries=2), [(0, LOADING, L, 1), (1, LOADING, X, 2)]),
    ],
)
def test_other_settings(cfg: HealthcheckSection, steps: list[tuple[float, ProbeOutcome, Health, int]]) -> None:
    replay(steps, cfg)


def test_needs_restart_only_when_unhealthy() -> None:
    tracker = HealthTracker(started_at=0.0)
    seen = []
    for now, outcome in [(10, LOADING), (60, REFUSED), (70, REFUSED), (80, REFUSED), (90, OK)]:
        tracker = tracker.observe(CFG, outcome, now)
        seen.append(tracker.needs_restart)
    assert seen == [False, False, False, True, False]


def test_last_error_says_what_failed_and_survives_recovery() -> None:
    tracker = HealthTracker(started_at=0.0).observe(CFG, REFUSED, 1.0)
    assert tracker.last_error == "cannot connect: [Errno 111] Connection refused"
    tracker = tracker.observe(CFG, ERROR_500, 2.0)
    assert tracker.last_error == "HTTP 500"
    tracker = tracker.observe(CFG, OK, 3.0)
    assert tracker.last_error == "HTTP 500"  # history for `describe`; health says it is fine now
    assert HealthTracker(started_at=0.0).observe(CFG, OK, 1.0).last_error is None


def test_next_probe_at() -> None:
    tracker = HealthTracker(started_at=100.0)
    assert tracker.next_probe_at(CFG) == 100.0  # the first probe goes at once
    assert tracker.observe(CFG, REFUSED, 101.5).next_probe_at(CFG) == 111.5


def test_observe_does_not_mutate() -> None:
    tracker = HealthTracker(started_at=0.0)
    tracker.observe(CFG, OK, 1.0)
    assert tracker == HealthTracker(started_at=0.0)
