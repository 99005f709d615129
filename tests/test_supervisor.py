"""The supervisor's decisions, replayed with a fake clock and scripted operations: no processes, no sleeps."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import pytest

from llama_orchestrator.adapters.store import InstanceRow
from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.errors import StartError
from llama_orchestrator.domain.health import ProbeOutcome
from llama_orchestrator.domain.states import Status, is_valid_transition
from llama_orchestrator.services.supervisor import Supervisor

OK = ProbeOutcome(200, latency_ms=1.0)
LOADING = ProbeOutcome(503, latency_ms=1.0)
REFUSED = ProbeOutcome(None, "cannot connect")


class FakeOps:
    """Instances as plain rows; `crash(name, code)` is what a dying process looks like to `refresh`."""

    def __init__(self, configs: dict[str, InstanceConfig]) -> None:
        self.configs = configs
        self.rows = {name: InstanceRow(name=name) for name in configs}
        self.probes: dict[str, deque[ProbeOutcome]] = {name: deque() for name in configs}
        self.start_failures: dict[str, int] = {}
        self.events: list[tuple[float, str, str, str]] = []
        self.calls: list[tuple[str, str]] = []
        self.next_pid = 100
        self.now = 0.0
        self.edges: list[tuple[Status, Status]] = []  # every status change the supervisor made

    # scripted world ----------------------------------------------------------------------------------------------
    def run(self, name: str) -> None:
        self.next_pid += 1
        self.rows[name] = replace(
            self.rows[name],
            status="starting",
            pid=self.next_pid,
            create_time=float(self.next_pid),
            started_at=self.now,
            stopped_by_user=False,
            exit_code=None,
        )

    def crash(self, name: str, code: int | None = 1) -> None:
        self.rows[name] = replace(self.rows[name], status="exited", exit_code=code, stopped_at=self.now)

    def kinds(self, name: str) -> list[str]:
        return [kind for _, n, kind, _ in self.events if n == name]

    # InstanceOps ---------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.configs)

    def load(self, name: str) -> InstanceConfig:
        return self.configs[name]

    def refresh(self, name: str) -> InstanceRow:
        return self.rows[name]

    def start(self, name: str) -> InstanceRow:
        self.calls.append(("start", name))
        if self.start_failures.get(name):
            self.start_failures[name] -= 1
            raise StartError(f"{name}: port in use")
        self.run(name)
        return self.rows[name]

    def stop(self, name: str, timeout: float) -> InstanceRow:
        # The supervisor stops only unhealthy instances: InstanceService.stop(by_user=False) ends `exited`.
        self.calls.append(("stop", name))
        self.rows[name] = replace(self.rows[name], status="exited", stopped_at=self.now, exit_code=None)
        return self.rows[name]

    def probe(self, config: InstanceConfig, port: int | None) -> ProbeOutcome:
        queue = self.probes[config.name]
        return queue.popleft() if queue else OK

    def update(self, name: str, only_if: dict | None = None, **changes: object) -> bool:
        assert "status" not in changes, "status changes go through transition"
        row = self.rows[name]
        if only_if and any(getattr(row, k) != v for k, v in only_if.items()):
            return False
        self.rows[name] = replace(row, **changes)
        return True

    def transition(self, name, expected, new, *, event=None, only_if=None, now=None, **changes) -> bool:
        """Store.transition's contract: CAS on the status and only_if, then the table; the edge is recorded."""
        row = self.rows[name]
        allowed = {Status(expected)} if isinstance(expected, str) else {Status(e) for e in expected}
        current = Status(row.status)
        if current not in allowed or any(getattr(row, k) != v for k, v in (only_if or {}).items()):
            return False
        if current != new:
            assert is_valid_transition(current, new), f"the supervisor took {current} -> {new}"
            self.edges.append((current, Status(new)))
        self.rows[name] = replace(row, status=str(new), **changes)
        if event is not None:
            self.events.append((self.now if now is None else now, name, *event))
        return True

    def event(self, name: str, kind: str, message: str, ts: float) -> None:
        self.events.append((ts, name, kind, message))

    def rotate_logs(self, name: str, config: InstanceConfig) -> None:
        pass


def config(name: str = "m", **sections: dict) -> InstanceConfig:
    document = {
        "name": name,
        "model": {"path": "m.gguf"},
        "healthcheck": {"interval": 1, "timeout": 1, "retries": 3, "start_period": 10},
        "restart": {
            "policy": "on-failure",
            "max_retries": 5,
            "backoff_seconds": 10,
            "backoff_multiplier": 2,
            "max_backoff_seconds": 300,
            "reset_after_seconds": 300,
        },
    }
    for key, value in sections.items():
        document[key] = {**document.get(key, {}), **value} if isinstance(value, dict) else value
    return InstanceConfig.from_document(document)


def world(*configs: InstanceConfig) -> tuple[FakeOps, Supervisor]:
    ops = FakeOps({c.name: c for c in configs})
    return ops, Supervisor(ops, dispatch=lambda work: work())


def advance(ops: FakeOps, sup: Supervisor, until: float, step: float = 0.5) -> None:
    """Tick the supervisor every `step` seconds of fake time up to `until` (twice: work posted, then drained)."""
    while ops.now < until:
        ops.now = round(ops.now + step, 6)
        sup.tick(ops.now)
        sup.drain(ops.now)


def test_a_healthy_instance_goes_from_starting_to_running() -> None:
    ops, sup = world(config())
    ops.run("m")
    advance(ops, sup, 1)
    assert ops.rows["m"].status == "running" and ops.rows["m"].health == "healthy"
    assert ops.kinds("m") == ["healthy"]


def test_crash_loop_follows_the_seed_backoff_then_fails() -> None:
    ops, sup = world(config())
    ops.run("m")
    advance(ops, sup, 1)
    delays = []
    for _ in range(6):
        ops.crash("m", code=1)
        advance(ops, sup, ops.now + 0.5)
        if ops.rows["m"].status == "failed":
            break
        assert ops.rows["m"].status == "backoff"
        restart_at = ops.rows["m"].next_restart_at
        delays.append(round(restart_at - ops.now, 1))  # decided at this tick
        advance(ops, sup, restart_at + 0.5)
        assert ops.rows["m"].status in ("starting", "running")
    assert delays == [10, 20, 40, 80, 160]
    assert ops.rows["m"].status == "failed"
    assert ops.kinds("m").count("restarted") == 5 and ops.kinds("m")[-1] == "failed"
    assert ops.rows["m"].restarts == 5
    advance(ops, sup, ops.now + 1000)
    assert ops.rows["m"].status == "failed", "failed stays down until a person acts"


def test_backoff_waits_before_restarting() -> None:
    ops, sup = world(config())
    ops.run("m")
    advance(ops, sup, 1)
    ops.crash("m")
    advance(ops, sup, ops.now + 9)
    assert ops.calls.count(("start", "m")) == 0
    advance(ops, sup, ops.now + 2)
    assert ops.calls.count(("start", "m")) == 1


def test_clean_exit_restarts_only_with_always() -> None:
    on_failure, always = config("a"), config("b", restart={"policy": "always"})
    ops, sup = world(on_failure, always)
    for name in ("a", "b"):
        ops.run(name)
    advance(ops, sup, 1)
    for name in ("a", "b"):
        ops.crash(name, code=0)
    advance(ops, sup, 30)
    assert ops.rows["a"].status == "exited" and ("start", "a") not in ops.calls
    assert ops.rows["b"].status in ("starting", "running") and ("start", "b") in ops.calls


def test_never_policy_leaves_a_crash_down() -> None:
    ops, sup = world(config(restart={"policy": "never"}))
    ops.run("m")
    advance(ops, sup, 1)
    ops.crash("m", code=139)
    advance(ops, sup, 100)
    assert ops.rows["m"].status == "exited" and ops.calls == []


def test_hang_after_healthy_is_restarted_after_retries_failed_probes() -> None:
    ops, sup = world(config())
    ops.run("m")
    advance(ops, sup, 1)
    ops.probes["m"].extend([REFUSED, REFUSED])
    advance(ops, sup, 2.5)  # probes at 1.5 and 2.5 (interval 1 after the first at 0.5)
    assert not ops.probes["m"]
    assert ops.calls == [], "two failures are not yet `retries` (3)"
    assert ops.rows["m"].health == "healthy"
    ops.probes["m"].append(REFUSED)
    advance(ops, sup, 3.5)
    assert ("stop", "m") in ops.calls
    assert ops.rows["m"].status == "backoff"
    assert "unhealthy" in ops.kinds("m")


def test_a_slow_loader_is_not_killed_inside_its_start_period() -> None:
    ops, sup = world(config(healthcheck={"start_period": 30, "interval": 1, "retries": 2}))
    ops.run("m")
    ops.probes["m"].extend([REFUSED] * 3 + [LOADING] * 20)  # loads for about 23 s of its 30 s start period
    advance(ops, sup, 20)
    assert ops.calls == [] and ops.rows["m"].health == "loading"
    advance(ops, sup, 40)
    assert ops.rows["m"].status == "running" and ops.calls == []


def test_a_load_past_the_start_period_is_declared_unhealthy() -> None:
    ops, sup = world(config(healthcheck={"start_period": 5, "interval": 1, "retries": 2}))
    ops.run("m")
    ops.probes["m"].extend([LOADING] * 50)
    advance(ops, sup, 12)
    assert ("stop", "m") in ops.calls


def test_restart_count_resets_after_a_stable_run() -> None:
    ops, sup = world(config(restart={"reset_after_seconds": 60}))
    ops.run("m")
    advance(ops, sup, 1)
    ops.crash("m")
    advance(ops, sup, 12)
    assert ops.rows["m"].restart_attempts == 1
    advance(ops, sup, 80)
    assert ops.rows["m"].restart_attempts == 0 and "reset" in ops.kinds("m")
    ops.crash("m")
    advance(ops, sup, ops.now + 1)
    assert ops.rows["m"].next_restart_at - ops.now == pytest.approx(9.5, abs=0.6), "back to the first delay"


def test_a_failed_start_counts_as_a_crash() -> None:
    ops, sup = world(config(restart={"max_retries": 2, "backoff_seconds": 1}))
    ops.run("m")
    advance(ops, sup, 1)
    ops.start_failures["m"] = 5
    ops.crash("m")
    advance(ops, sup, 20)
    assert ops.rows["m"].status == "failed"
    assert ops.kinds("m").count("start-failed") == 2


def test_a_person_stop_is_never_undone() -> None:
    ops, sup = world(config(restart={"policy": "always"}))
    ops.run("m")
    advance(ops, sup, 1)
    ops.rows["m"] = replace(ops.rows["m"], status="stopped", stopped_by_user=True)
    advance(ops, sup, 100)
    assert ops.calls == []


def test_a_person_start_after_failed_begins_the_count_again() -> None:
    ops, sup = world(config(restart={"max_retries": 1, "backoff_seconds": 1}))
    ops.run("m")
    advance(ops, sup, 1)
    ops.crash("m")
    advance(ops, sup, 5)
    ops.crash("m")
    advance(ops, sup, 10)
    assert ops.rows["m"].status == "failed"
    ops.run("m")  # `llama-orch up m`
    advance(ops, sup, 12)
    ops.crash("m")
    advance(ops, sup, 13)
    assert ops.rows["m"].status == "backoff", "a fresh count: one restart allowed again"


@pytest.mark.parametrize(
    "policy, stopped_by_user, autostart, started",
    [
        ("always", True, False, True),
        ("unless-stopped", True, False, False),
        ("unless-stopped", False, False, True),
        ("on-failure", False, False, False),
        ("never", True, True, True),
    ],
)
def test_boot_starts_per_policy_and_autostart(
    policy: str, stopped_by_user: bool, autostart: bool, started: bool
) -> None:
    ops, sup = world(config(restart={"policy": policy}, autostart=autostart))
    ops.rows["m"] = replace(ops.rows["m"], status="stopped", stopped_by_user=stopped_by_user)
    sup.boot(0.0)
    sup.drain(0.0)
    assert (("start", "m") in ops.calls) is started


def test_boot_adopts_running_instances_without_starting_them() -> None:
    ops, sup = world(config())
    ops.run("m")
    ops.rows["m"] = replace(ops.rows["m"], status="running", restart_attempts=2)
    sup.boot(0.0)
    advance(ops, sup, 2)
    assert ops.calls == [] and "adopted" in ops.kinds("m")
    ops.crash("m")
    advance(ops, sup, 3)
    assert ops.rows["m"].restart_attempts == 3, "a restarted daemon continues the backoff sequence"


def test_stale_probe_results_of_a_replaced_process_are_ignored() -> None:
    ops, sup = world(config())
    ops.run("m")
    advance(ops, sup, 1)
    old_key = (ops.rows["m"].pid, ops.rows["m"].create_time)
    ops.run("m")  # replaced by a person meanwhile
    sup.inbox.put(("probed", "m", old_key, REFUSED))
    sup.drain(ops.now)
    assert ops.rows["m"].health != "unhealthy" and "health" not in ops.kinds("m")


def test_nothing_is_due_for_an_instance_a_person_stopped() -> None:
    """A stopped instance needs no step of its own: the daemon loop sleeps until its next regular pass."""
    ops, sup = world(config())
    ops.run("m")
    advance(ops, sup, 2)
    assert sup.next_due() is not None
    ops.rows["m"] = replace(ops.rows["m"], status="stopped", stopped_by_user=True)
    advance(ops, sup, 3)
    assert sup.next_due() is None


def test_one_instance_failing_its_step_pauses_no_other() -> None:
    ops, sup = world(config("bad"), config("good"))
    ops.run("bad")
    ops.run("good")
    advance(ops, sup, 1)
    real_refresh = ops.refresh

    def refresh(name: str) -> InstanceRow:
        if name == "bad":
            raise FileNotFoundError("instances/bad/config.json")  # e.g. removed half way through a step
        return real_refresh(name)

    ops.refresh = refresh  # type: ignore[method-assign]
    ops.crash("good")
    advance(ops, sup, 2)
    assert ops.rows["good"].status == "backoff", "the other instance was still supervised"


def test_the_supervisor_takes_only_table_edges_across_a_whole_history() -> None:
    """A crash loop to `failed`, a person's start, an unhealthy restart: every status write is a table edge (the
    fake's transition asserts it) and the ones this history needs are taken."""
    ops, sup = world(config(restart={"max_retries": 1, "backoff_seconds": 1}))
    ops.run("m")
    advance(ops, sup, 1)
    ops.crash("m")
    advance(ops, sup, 3)  # backoff, restarted
    ops.crash("m")
    advance(ops, sup, 4)  # gave up
    assert ops.rows["m"].status == "failed"
    ops.run("m")  # a person's `up`
    ops.probes["m"].extend([REFUSED] * 20)
    advance(ops, sup, 30)
    assert {(Status.starting, Status.running), (Status.exited, Status.backoff), (Status.exited, Status.failed)} <= set(
        ops.edges
    ), ops.edges


def test_a_crash_loop_keeps_saying_why_until_it_is_healthy_again() -> None:
    ops, sup = world(config())
    ops.run("m")
    advance(ops, sup, 1)
    assert ops.rows["m"].last_error is None
    ops.crash("m", code=3)
    advance(ops, sup, ops.now + 0.5)
    assert ops.rows["m"].status == "backoff" and ops.rows["m"].last_error == "crashed: exited with code 3"
    ops.probes["m"].extend([REFUSED] * 3)  # the restarted process does not answer at first
    advance(ops, sup, ops.rows["m"].next_restart_at + 0.5)
    assert ops.rows["m"].status == "starting"
    assert ops.rows["m"].last_error == "crashed: exited with code 3"  # `ps` still says why it restarts
    advance(ops, sup, ops.now + 10)
    assert ops.rows["m"].status == "running" and ops.rows["m"].last_error is None


# -- told, not ticked: exit notices and probes on the loop -------------------------------------------------------


class FakeExits:
    """The exit watch: what is watched; `fire(name)` is the process ending (the notice the pidfd gives)."""

    def __init__(self) -> None:
        self.watched: dict[str, tuple[object, object]] = {}
        self.forgotten: list[str] = []

    def watch(self, key: str, handle, on_exit) -> None:
        self.watched[key] = (handle, on_exit)

    def forget(self, key: str) -> None:
        self.watched.pop(key, None)
        self.forgotten.append(key)

    def fire(self, key: str) -> None:
        _, on_exit = self.watched.pop(key)
        on_exit()


class LoopProber:
    """Probes started on "the loop": held until the test answers them, as a socket answers later."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, object]] = []

    def __call__(self, config: InstanceConfig, port, done) -> None:
        self.pending.append((config.name, done))

    def answer(self, outcome: ProbeOutcome = OK) -> None:
        pending, self.pending = self.pending, []
        for _, done in pending:
            done(outcome)


def told_world(*configs: InstanceConfig) -> tuple[FakeOps, Supervisor, FakeExits, LoopProber, list[str]]:
    ops = FakeOps({c.name: c for c in configs})
    exits, prober, woken = FakeExits(), LoopProber(), []
    sup = Supervisor(ops, lambda work: work(), prober=prober, exits=exits, wake=lambda: woken.append("wake"))
    return ops, sup, exits, prober, woken


def test_an_exit_notice_is_handled_at_once_without_a_full_pass() -> None:
    ops, sup, exits, prober, woken = told_world(config(restart={"backoff_seconds": 0.1, "backoff_multiplier": 1}))
    ops.run("m")
    sup.tick(0.0)
    assert "m" in exits.watched and exits.watched["m"][0].pid == ops.rows["m"].pid
    prober.answer()
    sup.tick(0.0, only_news=True)
    assert ops.rows["m"].status == "running"
    ops.now = 3.2
    ops.crash("m", code=137)
    exits.fire("m")
    assert woken == ["wake"]
    sup.tick(3.2, only_news=True)  # the notice alone: no full pass
    assert ops.rows["m"].status == "backoff" and ops.rows["m"].next_restart_at == pytest.approx(3.3)
    assert sup.next_due() == pytest.approx(3.3), "the loop is woken at the end of the backoff, not on a tick"
    sup.tick(3.3 + 1e-9, only_news=True)  # the loop's wait ends at (just after) the deadline
    assert ops.calls == [("start", "m")]  # the restart, spawned at the deadline
    sup.tick(3.31, only_news=True)  # the worker's "started" (it rings the loop)
    assert exits.watched["m"][0].pid == ops.rows["m"].pid, "the new process is watched"
    assert [name for name, _ in prober.pending] == ["m"], "and probed at once"


def test_probes_go_to_the_loop_and_an_idle_instance_asks_for_nothing_between_them() -> None:
    ops, sup, _, prober, _ = told_world(config())  # interval 1 s
    ops.run("m")
    sup.tick(0.0)
    assert [name for name, _ in prober.pending] == ["m"]
    prober.answer()
    sup.tick(0.0, only_news=True)
    assert sup.next_due() == 1.0
    sup.tick(0.5, only_news=True)
    assert prober.pending == [], "no probe before its interval"
    sup.tick(1.0, only_news=True)
    assert len(prober.pending) == 1


def test_a_stopped_or_removed_instance_is_no_longer_watched() -> None:
    ops, sup, exits, _, _ = told_world(config("a"), config("b"))
    for name in ("a", "b"):
        ops.run(name)
    sup.tick(0.0)
    assert set(exits.watched) == {"a", "b"}
    ops.rows["a"] = replace(ops.rows["a"], status="stopped", stopped_by_user=True)
    del ops.configs["b"]
    sup.tick(1.0)
    assert exits.watched == {} and sorted(exits.forgotten) == ["a", "b"]


def test_the_view_holds_what_the_supervisor_saw_for_the_router() -> None:
    ops, sup, exits, prober, _ = told_world(config("a"))
    version, rows = sup.view.snapshot()
    assert rows == {}
    ops.run("a")
    sup.tick(0.0)
    assert sup.view.wait_newer(version, timeout=0) != version
    prober.answer()
    sup.tick(0.5, only_news=True)
    version, rows = sup.view.snapshot()
    assert (rows["a"].status, rows["a"].health, rows["a"].health_checked_at) == ("running", "healthy", 0.5)
    sup.tick(1.5, only_news=True)
    prober.answer()
    sup.tick(1.5, only_news=True)
    now_version, rows = sup.view.snapshot()
    assert now_version == version, "a probe that changes nothing is no news"
    assert rows["a"].health_checked_at == 1.5, "but the last check is there, from memory"
    assert ops.rows["a"].health_checked_at == 0.5, "(the state file gets it every HEALTH_SAVE_S)"
    sup.tick(2.0, only_news=True)
    assert sup.view.snapshot()[1]["a"].health_checked_at == 1.5, "a step does not put the older one back"
    ops.crash("a")
    exits.fire("a")
    sup.tick(1.2, only_news=True)
    assert sup.view.snapshot()[1]["a"].status == "backoff"


def test_a_healthy_instance_is_probed_without_a_step_and_its_answer_makes_none() -> None:
    """Issue 14: no work for an idle instance at or between its probes (no config load, no state read), as long as
    its exit is watched; a full pass still steps it."""
    ops, sup, _, prober, _ = told_world(config("a"), config("b"))
    for name in ("a", "b"):
        ops.run(name)
    sup.tick(0.0)
    prober.answer()
    sup.tick(0.0, only_news=True)  # the first answers: starting -> running
    assert ops.rows["a"].status == ops.rows["b"].status == "running"
    looked: list[str] = []
    load, refresh = ops.load, ops.refresh
    ops.load = lambda name: looked.append(f"load {name}") or load(name)  # type: ignore[method-assign]
    ops.refresh = lambda name: looked.append(f"refresh {name}") or refresh(name)  # type: ignore[method-assign]
    sup.tick(0.5, only_news=True)
    assert looked == [] and prober.pending == []
    sup.tick(1.0, only_news=True)
    assert sorted(name for name, _ in prober.pending) == ["a", "b"] and looked == [], "the probes, and nothing else"
    prober.answer()
    sup.tick(1.0, only_news=True)
    assert looked == []
    sup.tick(1.5)  # a full pass looks at everything
    assert sorted(looked) == ["load a", "load b", "refresh a", "refresh b"]


def test_probes_due_within_the_slack_go_out_in_one_wake() -> None:
    ops = FakeOps({c.name: c for c in (config("a"), config("b"))})
    prober = LoopProber()
    sup = Supervisor(ops, lambda work: work(), prober=prober, exits=FakeExits(), probe_slack_s=0.05)
    for name in ("a", "b"):
        ops.run(name)
    sup.tick(0.0)
    pending, prober.pending = prober.pending, []
    for name, done in pending:  # answered 20 ms apart: due 20 ms apart
        sup.tick(0.0 if name == "a" else 0.02, only_news=True)
        done(OK)
        sup.tick(0.0 if name == "a" else 0.02, only_news=True)
    assert sup.next_due() == pytest.approx(1.0)
    sup.tick(1.0, only_news=True)
    assert sorted(name for name, _ in prober.pending) == ["a", "b"], "b's probe went out with a's, 20 ms early"
    # Never more than a tenth of the interval early: 0.2 s interval -> 20 ms.
    assert sup.probe_slack_s == 0.05
    from llama_orchestrator.services.supervisor import probe_slack

    assert probe_slack(config("c", healthcheck={"interval": 0.2}), 0.05) == pytest.approx(0.02)
