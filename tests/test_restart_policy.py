"""Restart policy and backoff (SPEC §6), replayed with explicit times: no sleeps, no clock."""

from __future__ import annotations

import dataclasses

import pytest

from llama_orchestrator.domain.config import RestartSection
from llama_orchestrator.domain.restart import (
    ExitReason,
    RestartTracker,
    backoff_delay,
    resume_on_daemon_start,
    should_restart,
)
from llama_orchestrator.domain.states import Status

SEED = RestartSection()  # on-failure, 5 retries, 10 s * 2, capped at 300 s, reset after 300 s


def restart_cfg(**changes: object) -> RestartSection:
    return SEED.model_copy(update=changes)


# --- backoff -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "delay"), [(1, 10), (2, 20), (3, 40), (4, 80), (5, 160), (6, 300), (50, 300)])
def test_seed_backoff_sequence_is_capped(attempt: int, delay: float) -> None:
    assert backoff_delay(SEED, attempt) == delay


@pytest.mark.parametrize(
    ("base", "multiplier", "cap", "delays"),
    [
        (1, 1.0, 300, [1, 1, 1, 1]),  # no growth
        (5, 3.0, 100, [5, 15, 45, 100]),  # cap reached on the fourth
        (10, 2.0, 25, [10, 20, 25, 25]),
        (0, 2.0, 300, [0, 0, 0, 0]),  # restart at once
        (100, 2.0, 50, [50, 50, 50, 50]),  # a cap below the base wins
    ],
)
def test_backoff_table(base: float, multiplier: float, cap: float, delays: list[float]) -> None:
    cfg = restart_cfg(backoff_seconds=base, backoff_multiplier=multiplier, max_backoff_seconds=cap)
    assert [backoff_delay(cfg, n) for n in range(1, 5)] == delays


def test_huge_attempt_does_not_overflow() -> None:
    cfg = restart_cfg(backoff_multiplier=10.0)
    assert backoff_delay(cfg, 1000) == cfg.max_backoff_seconds


def test_attempts_count_from_one() -> None:
    with pytest.raises(ValueError):
        backoff_delay(SEED, 0)


# --- policy ------------------------------------------------------------------------------------------------

RESTARTS = {  # Docker's semantics, for an exit nobody asked for
    ("always", ExitReason.crashed): True,
    ("always", ExitReason.clean): True,
    ("always", ExitReason.unhealthy): True,
    ("unless-stopped", ExitReason.crashed): True,
    ("unless-stopped", ExitReason.clean): True,
    ("unless-stopped", ExitReason.unhealthy): True,
    ("on-failure", ExitReason.crashed): True,
    ("on-failure", ExitReason.clean): False,
    ("on-failure", ExitReason.unhealthy): True,
    ("never", ExitReason.crashed): False,
    ("never", ExitReason.clean): False,
    ("never", ExitReason.unhealthy): False,
}


@pytest.mark.parametrize(("policy", "reason"), list(RESTARTS), ids=[f"{p}-{r}" for p, r in RESTARTS])
def test_should_restart(policy: str, reason: ExitReason) -> None:
    assert should_restart(policy, reason, stopped_by_user=False) is RESTARTS[policy, reason]  # type: ignore[arg-type]


@pytest.mark.parametrize(("policy", "reason"), list(RESTARTS), ids=[f"{p}-{r}" for p, r in RESTARTS])
def test_a_user_stop_never_restarts(policy: str, reason: ExitReason) -> None:
    assert should_restart(policy, reason, stopped_by_user=True) is False  # type: ignore[arg-type]
    decision = RestartTracker().on_exit(restart_cfg(policy=policy), reason, stopped_by_user=True, now=50.0)
    assert (decision.action, decision.status, decision.restart_at) == ("stay_down", Status.stopped, None)


@pytest.mark.parametrize(
    ("policy", "stopped_by_user", "resumes"),
    [
        ("always", False, True),
        ("always", True, True),  # Docker: `always` comes back when the daemon restarts, even after a stop
        ("unless-stopped", False, True),
        ("unless-stopped", True, False),  # ... `unless-stopped` keeps a person's `down`
        ("on-failure", False, False),
        ("on-failure", True, False),
        ("never", False, False),
        ("never", True, False),
    ],
)
def test_resume_on_daemon_start(policy: str, stopped_by_user: bool, resumes: bool) -> None:
    assert resume_on_daemon_start(policy, stopped_by_user) is resumes  # type: ignore[arg-type]


@pytest.mark.parametrize(("policy", "reason"), [(p, r) for (p, r), yes in RESTARTS.items() if not yes])
def test_no_restart_wanted_stays_exited(policy: str, reason: ExitReason) -> None:
    decision = RestartTracker(attempts=2).on_exit(restart_cfg(policy=policy), reason, False, now=7.0)
    assert (decision.action, decision.status, decision.attempt) == ("stay_down", Status.exited, 2)
    assert decision.delay == 0 and decision.restart_at is None


# --- the tracker -------------------------------------------------------------------------------------------


def test_seed_crash_loop_backs_off_then_gives_up() -> None:
    tracker, now, seen = RestartTracker(), 1000.0, []
    for _ in range(5):
        decision = tracker.on_exit(SEED, ExitReason.crashed, stopped_by_user=False, now=now)
        assert decision.action == "restart" and decision.status is Status.backoff
        assert decision.restart_at == now + decision.delay
        assert decision.tracker.attempts == decision.attempt
        seen.append((decision.attempt, decision.delay))
        tracker, now = decision.tracker, decision.restart_at + 2  # it starts, and crashes 2 s later
    assert seen == [(1, 10), (2, 20), (3, 40), (4, 80), (5, 160)]

    final = tracker.on_exit(SEED, ExitReason.crashed, stopped_by_user=False, now=now)
    assert (final.action, final.status, final.attempt, final.restart_at) == ("give_up", Status.failed, 5, None)


def test_unhealthy_counts_like_a_crash() -> None:
    decision = RestartTracker(attempts=4).on_exit(SEED, ExitReason.unhealthy, False, now=0.0)
    assert (decision.action, decision.attempt, decision.delay) == ("restart", 5, 160)


@pytest.mark.parametrize("policy", ["always", "unless-stopped", "on-failure"])
def test_max_retries_zero_fails_at_once(policy: str) -> None:
    decision = RestartTracker().on_exit(restart_cfg(policy=policy, max_retries=0), ExitReason.crashed, False, 0.0)
    assert (decision.action, decision.status) == ("give_up", Status.failed)


def test_clean_exit_under_always_uses_the_same_backoff() -> None:
    cfg = restart_cfg(policy="always")
    decision = RestartTracker(attempts=1).on_exit(cfg, ExitReason.clean, False, now=0.0)
    assert (decision.action, decision.attempt, decision.delay) == ("restart", 2, 20)


def test_zero_backoff_restarts_now() -> None:
    decision = RestartTracker().on_exit(restart_cfg(backoff_seconds=0), ExitReason.crashed, False, now=42.0)
    assert (decision.delay, decision.restart_at) == (0, 42.0)


def test_reset_after_a_stable_run() -> None:
    tracker = RestartTracker(attempts=3).on_healthy(now=100.0)
    assert tracker.on_tick(SEED, now=399.0).attempts == 3  # 299 s healthy: not yet
    reset = tracker.on_tick(SEED, now=400.0)
    assert (reset.attempts, reset.healthy_since) == (0, 100.0)
    # The next crash starts the backoff sequence again.
    decision = reset.on_exit(SEED, ExitReason.crashed, False, now=500.0)
    assert (decision.attempt, decision.delay) == (1, 10)


def test_exit_after_a_stable_run_resets_without_a_tick() -> None:
    tracker = RestartTracker(attempts=5).on_healthy(now=0.0)
    decision = tracker.on_exit(SEED, ExitReason.crashed, False, now=301.0)
    assert (decision.action, decision.attempt, decision.delay) == ("restart", 1, 10)


def test_exit_before_the_reset_keeps_counting() -> None:
    tracker = RestartTracker(attempts=5).on_healthy(now=0.0)
    assert tracker.on_exit(SEED, ExitReason.crashed, False, now=299.0).action == "give_up"


def test_an_unhealthy_spell_restarts_the_stable_stretch() -> None:
    tracker = RestartTracker(attempts=2).on_healthy(now=0.0).on_unhealthy().on_healthy(now=200.0)
    assert tracker.on_tick(SEED, now=400.0).attempts == 2  # only 200 s since it was healthy again
    assert tracker.on_tick(SEED, now=500.0).attempts == 0


def test_repeated_healthy_keeps_the_start_of_the_stretch() -> None:
    tracker = RestartTracker().on_healthy(10.0).on_healthy(20.0).on_healthy(30.0)
    assert tracker.healthy_since == 10.0


def test_exit_ends_the_healthy_stretch() -> None:
    decision = RestartTracker().on_healthy(10.0).on_exit(SEED, ExitReason.crashed, False, now=20.0)
    assert decision.tracker.healthy_since is None


def test_tick_returns_the_same_tracker_when_nothing_changes() -> None:
    tracker = RestartTracker(attempts=1)
    assert tracker.on_tick(SEED, now=1e9) is tracker  # never healthy: no reset
    healthy = RestartTracker().on_healthy(0.0)
    assert healthy.on_tick(SEED, now=1e9) is healthy  # nothing to reset


def test_trackers_are_immutable() -> None:
    tracker = RestartTracker()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tracker.attempts = 3  # type: ignore[misc]
    tracker.on_exit(SEED, ExitReason.crashed, False, now=0.0)
    assert tracker == RestartTracker()
