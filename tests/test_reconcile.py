"""The reconcile decision (domain.reconcile), honcho-style: fake rows, a fake process table, a fake clock. Instant."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.drift import fingerprint
from llama_orchestrator.domain.errors import ConfigError, ConfigProblem
from llama_orchestrator.domain.reconcile import (
    ActionKind,
    Observed,
    ReloadTrigger,
    plan,
    recreate_batches,
)


def config(
    name: str, *, ctx: int = 512, autostart: bool = False, aliases: tuple[str, ...] = (), **extra
) -> InstanceConfig:
    return InstanceConfig.from_document(
        {
            "name": name,
            "model": {"path": "/m/tiny.gguf", "context_size": ctx},
            "server": {"port": 9000},
            "autostart": autostart,
            "aliases": list(aliases),
            **extra,
        }
    )


@dataclass
class Row:
    status: str = "running"
    pid: int | None = 100
    config_hash: str | None = None
    config_json: str | None = None
    stopped_by_user: bool = False


def running_row(cfg: InstanceConfig, pid: int = 100, status: str = "running") -> Row:
    recorded = fingerprint(cfg)
    return Row(status, pid, recorded.hash, recorded.document)


def kinds(actions) -> dict[str, str]:
    return {a.name: str(a.kind) for a in actions}


BROKEN = ConfigError("/home/instances/bad/config.json", [ConfigProblem("model.context_size", "must be > 0")])


# -- up --------------------------------------------------------------------------------------------------------


def test_up_starts_the_stopped_leaves_the_unchanged_and_recreates_the_changed() -> None:
    old = config("changed", ctx=512)
    declared = {"new": config("new"), "same": config("same"), "changed": config("changed", ctx=2048)}
    recorded = {"same": running_row(declared["same"], 1), "changed": running_row(old, 2)}
    observed = {"same": Observed(1), "changed": Observed(2)}

    actions = plan(declared, recorded, observed, mode="up", names=["new", "same", "changed"])

    assert [a.name for a in actions] == ["new", "same", "changed"]  # the order asked for
    assert kinds(actions) == {"new": "start", "same": "leave", "changed": "recreate"}
    recreate = actions[2]
    assert recreate.changes == ("model.context_size",) and recreate.reason == "config changed"
    assert actions[1].reason == "already running"


def test_a_change_the_process_does_not_see_is_no_recreate() -> None:
    # Restart policy, health checks and router fields are read live: changing them must not reload the model.
    old = config("a")
    new = config("a", restart={"policy": "always"}, ttl=60)
    actions = plan({"a": new}, {"a": running_row(old)}, {"a": Observed(100)}, mode="up", names=["a"])
    assert kinds(actions) == {"a": "leave"}


def test_no_recreate_and_force_recreate_as_compose() -> None:
    old, new = config("a", ctx=512), config("a", ctx=1024)
    same = config("b")
    declared, recorded = {"a": new, "b": same}, {"a": running_row(old, 1), "b": running_row(same, 2)}
    observed = {"a": Observed(1), "b": Observed(2)}

    never = plan(declared, recorded, observed, mode="up", recreate="never", names=["a", "b"])
    assert kinds(never) == {"a": "leave", "b": "leave"}
    assert never[0].changes == ("model.context_size",) and "--no-recreate" in never[0].reason

    force = plan(declared, recorded, observed, mode="up", recreate="force", names=["a", "b"])
    assert kinds(force) == {"a": "recreate", "b": "recreate"}
    assert force[1].reason == "forced"


def test_an_invalid_config_is_reported_and_not_touched() -> None:
    actions = plan({"bad": BROKEN}, {"bad": Row()}, {"bad": Observed(100)}, mode="up", names=["bad"])
    assert kinds(actions) == {"bad": "report-invalid"}
    assert "keeps running" in actions[0].reason and "model.context_size" in actions[0].reason


def test_a_record_from_before_drift_was_recorded_is_not_drift() -> None:
    row = Row(config_hash=None, config_json=None)
    assert kinds(plan({"a": config("a")}, {"a": row}, {"a": Observed(100)}, mode="up", names=["a"])) == {"a": "leave"}


def test_a_stopping_instance_is_left_to_its_stop() -> None:
    cfg = config("a", ctx=4096)
    row = running_row(config("a"), status="stopping")
    assert kinds(plan({"a": cfg}, {"a": row}, {"a": Observed(100)}, mode="up", names=["a"])) == {"a": "leave"}


# -- reconcile (the daemon) ------------------------------------------------------------------------------------


def test_reconcile_covers_every_kind_in_one_pass() -> None:
    kept, changed_old = config("kept"), config("changed", ctx=512)
    declared = {
        "kept": kept,
        "changed": config("changed", ctx=8192),
        "fresh": config("fresh", autostart=True),
        "manual": config("manual"),  # no autostart: a reconcile does not start it
        "lost": config("lost"),
        "bad": BROKEN,
    }
    recorded = {
        "kept": running_row(kept, 1),
        "changed": running_row(changed_old, 2),
        "gone": Row(pid=3),
        "lost": Row(status="exited", pid=4),  # the record says exited, but the process lives on
        "bad": Row(pid=5),
    }
    observed = {
        "kept": Observed(1),
        "changed": Observed(2),
        "gone": Observed(3),
        "lost": Observed(4),
        "bad": Observed(5),
    }

    actions = plan(declared, recorded, observed, mode="reconcile")

    assert kinds(actions) == {
        "bad": "report-invalid",
        "changed": "recreate",
        "fresh": "start",
        "gone": "stop",
        "kept": "leave",
        "lost": "adopt",
    }
    assert [a.name for a in actions] == sorted(kinds(actions))
    assert next(a for a in actions if a.name == "gone").reason == "config removed"
    assert {a.kind for a in actions} == set(ActionKind)  # every kind is exercised here


def test_reconcile_leaves_exits_and_a_persons_down_to_the_restart_policy() -> None:
    declared = {n: config(n, autostart=True) for n in ("crashed", "failed", "backoff", "downed", "stale")}
    recorded = {
        "crashed": Row(status="exited", pid=None),
        "failed": Row(status="failed", pid=None),
        "backoff": Row(status="backoff", pid=None),
        "downed": Row(status="stopped", pid=None, stopped_by_user=True),
        "stale": Row(status="running", pid=9),  # recorded running, but no such process: refresh makes it exited
    }
    assert plan(declared, recorded, {}, mode="reconcile") == []


def test_a_removed_config_with_nothing_running_needs_nothing() -> None:
    assert plan({}, {"gone": Row(status="stopped", pid=None)}, {}, mode="reconcile") == []


def test_an_adopted_pid_that_differs_from_the_record() -> None:
    cfg = config("a")
    actions = plan({"a": cfg}, {"a": running_row(cfg, pid=1)}, {"a": Observed(2)}, mode="reconcile")
    assert kinds(actions) == {"a": "adopt"} and "pid 2" in actions[0].reason


# -- replicas: one at a time -----------------------------------------------------------------------------------


def test_recreates_sharing_an_alias_go_in_separate_batches() -> None:
    declared = {
        "r1": config("r1", ctx=1024, aliases=("chat",)),
        "r2": config("r2", ctx=1024, aliases=("chat",)),
        "r3": config("r3", ctx=1024, aliases=("chat", "code")),
        "solo": config("solo", ctx=1024),
        "other": config("other", ctx=1024, aliases=("embed",)),
    }
    recorded = {n: running_row(config(n, aliases=tuple(c.aliases)), i) for i, (n, c) in enumerate(declared.items())}
    observed = {n: Observed(i) for i, n in enumerate(declared)}
    batches = recreate_batches(plan(declared, recorded, observed, mode="reconcile"))
    for batch in batches:
        aliases = [alias for action in batch for alias in action.aliases]
        assert len(aliases) == len(set(aliases)), batch  # no two members of a replica set at once
    assert sorted(a.name for b in batches for a in b) == sorted(declared)
    assert len(batches) == 3  # chat has three members


# -- when the daemon makes a pass ------------------------------------------------------------------------------


def test_auto_reload_waits_for_quiet_then_makes_one_pass() -> None:
    trigger = ReloadTrigger(quiet_s=2.0, auto=True)
    assert not trigger.observe({"a": (1, 10)}, now=0.0)  # the first look is the baseline
    assert not trigger.observe({"a": (2, 10)}, now=1.0)  # a change: wait for quiet
    assert not trigger.observe({"a": (3, 11)}, now=2.5)  # still being written: the debounce starts again
    assert not trigger.observe({"a": (3, 11)}, now=4.4)
    assert trigger.observe({"a": (3, 11)}, now=4.5)  # 2 s after the last change: one pass
    assert not trigger.observe({"a": (3, 11)}, now=10.0)  # and only one


def test_a_new_and_a_removed_config_are_changes_too() -> None:
    trigger = ReloadTrigger(quiet_s=1.0, auto=True)
    trigger.observe({"a": 1}, now=0.0)
    trigger.observe({"a": 1, "b": 1}, now=1.0)
    assert trigger.observe({"a": 1, "b": 1}, now=2.0)
    trigger.observe({"b": 1}, now=3.0)
    assert trigger.observe({"b": 1}, now=4.0)


def test_changed_and_changed_back_is_no_pass() -> None:
    trigger = ReloadTrigger(quiet_s=1.0, auto=True)
    trigger.observe({"a": 1}, now=0.0)
    trigger.observe({"a": 2}, now=0.5)
    trigger.observe({"a": 1}, now=0.7)
    assert not trigger.observe({"a": 1}, now=5.0)


def test_manual_mode_passes_only_when_asked() -> None:
    trigger = ReloadTrigger(quiet_s=1.0, auto=False)
    trigger.observe({"a": 1}, now=0.0)
    trigger.observe({"a": 2}, now=1.0)
    assert not trigger.observe({"a": 2}, now=100.0)  # drift is shown (`ps`), not applied
    trigger.request()  # `llama-orch daemon reload` or SIGHUP
    assert trigger.observe({"a": 2}, now=100.5)
    assert not trigger.observe({"a": 2}, now=200.0)


@pytest.mark.parametrize("auto", [True, False])
def test_a_request_is_one_pass_even_without_changes(auto: bool) -> None:
    trigger = ReloadTrigger(auto=auto)
    trigger.observe({"a": 1}, now=0.0)
    trigger.request()
    assert trigger.observe({"a": 1}, now=0.1)
    assert not trigger.observe({"a": 1}, now=10.0)
