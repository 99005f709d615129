"""Every edge of the transition table, taken by the code that takes it (not a restatement of the table).

Each row of ``domain.states.TRANSITIONS`` has a scenario that drives the real ``InstanceService`` (real processes:
the fake llama-server) or the real ``Supervisor`` over the real ``ServiceOps`` (a fake clock for its decisions)
into it. ``Store.transition`` is wrapped to record every status change written: the scenario must take its edge,
every edge any scenario takes must be in the table, and no write may be refused as a bug. A table edge without a
scenario fails ``test_every_table_edge_has_a_scenario``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from conftest import _cli_command, instance_doc
from helpers import free_port, subprocess_env, wait_until
from llama_orchestrator.adapters.home import Home
from llama_orchestrator.adapters.ports import is_port_free
from llama_orchestrator.adapters.store import Store
from llama_orchestrator.domain.errors import OrchestratorError, StartError
from llama_orchestrator.domain.health import ProbeOutcome
from llama_orchestrator.domain.states import TRANSITIONS, Status, is_valid_transition
from llama_orchestrator.services.daemon import ServiceOps
from llama_orchestrator.services.instances import InstanceService
from llama_orchestrator.services.supervisor import Supervisor

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script; signals")

S = Status
Edge = tuple[Status, Status]
TABLE_EDGES = sorted((a, b) for a, targets in TRANSITIONS.items() for b in targets)


class World:
    """One home, an in-process InstanceService, and the edges its store writes."""

    def __init__(self, root: Path, model: Path, binary: Path) -> None:
        self.root, self.model, self.binary = root, model, binary
        self.home = Home(root)
        self.svc = InstanceService(self.home)
        self.edges: list[Edge] = []
        self.extra: list[subprocess.Popen] = []

    def add(self, name: str, *args: str, binary: Path | None = None, **sections: object) -> None:
        doc = instance_doc(name, self.model, free_port(), binary or self.binary)
        doc["healthcheck"] = {"interval": 0.2, "timeout": 2, "retries": 2, "start_period": 5}
        doc.update(sections, args=list(args))
        path = self.home.config_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))

    def status(self, name: str) -> str:
        return self.svc.refresh(name).status

    def healthy(self, name: str) -> None:
        self.svc.start(name)
        self.svc.wait_healthy(name, 30)

    def kill9(self, name: str) -> None:
        row = self.svc.store.get(name)
        os.kill(row.pid, signal.SIGKILL)
        wait_until(lambda: self.status(name) == "exited", 10, message=f"{name} exited")
        # The scenarios restart at once on a fake clock (a real backoff is seconds): wait until the kernel has
        # closed the killed server's socket, or the restart's preflight finds the port still taken.
        config = self.svc.load(name)
        wait_until(lambda: is_port_free(config.server.port, config.server.host), 30, message="port released")

    def spawn_unrecorded(self, name: str) -> int:
        """A marked llama-server the row does not know: a CLI killed between spawn and its write, or a lost DB."""
        config = self.svc.load(name)
        # A process just killed may hold its port a moment longer (the kernel closes its sockets after the exit).
        wait_until(lambda: is_port_free(config.server.port, config.server.host), 30, message="port released")
        spec = self.svc._preflight(config)
        spawned = self.svc.processes.spawn(
            spec.argv, spec.env, self.root, self.home.log_path(name, "stdout"), self.home.log_path(name, "stderr")
        )
        self.extra.append(spawned.popen)  # type: ignore[arg-type]
        wait_until(lambda: any(f.pid == spawned.handle.pid for f in self.svc.scan()), 10, message="marked")
        return spawned.handle.pid

    def supervisor(self, fail_starts: bool = False) -> tuple[Supervisor, ServiceOps]:
        ops = ServiceOps(self.svc)
        ops.probe = lambda config, port: ProbeOutcome(200, latency_ms=1.0)  # type: ignore[method-assign]
        if fail_starts:

            def failing_start(name: str):
                raise StartError(f"{name}: port in use")

            ops.start = failing_start  # type: ignore[method-assign]
        return Supervisor(ops, dispatch=lambda work: work()), ops

    def cleanup(self) -> None:
        for name in self.home.instance_names():
            with contextlib.suppress(OrchestratorError):  # best effort
                self.svc.stop(name, 1.0)
        for popen in self.extra:
            popen.kill()
            popen.wait()


@pytest.fixture
def world(
    tmp_path: Path,
    tiny_model: Path,
    fake_binary: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> Iterator[World]:
    w = World(tmp_path / "home", tiny_model, fake_binary)
    original = Store.transition

    def recording(self: Store, name: str, expected, new, **kwargs) -> bool:
        before = self.get(name)
        done = original(self, name, expected, new, **kwargs)
        current = Status(before.status) if before else Status.stopped
        if done and current != Status(new):
            w.edges.append((current, Status(new)))
        return done

    monkeypatch.setattr(Store, "transition", recording)
    caplog.set_level(logging.ERROR, logger="llama_orchestrator.store")
    try:
        yield w
    finally:
        w.cleanup()
    assert "BUG" not in caplog.text, caplog.text


# -- scenarios, one per edge (several edges share a story) --------------------------------------------------------


def bad_binary(w: World) -> Path:
    """Passes every check before spawning, then cannot be executed (its interpreter does not exist)."""
    path = w.root.parent / "broken-llama-server"
    path.write_text("#!/nonexistent/interpreter\n")
    path.chmod(0o755)
    return path


def stopped_to_starting(w: World) -> None:
    w.add("a")
    w.svc.start("a")


def starting_to_running(w: World) -> None:
    w.add("a")
    w.healthy("a")


def starting_to_stopping(w: World) -> None:
    w.add("a", "--fake-load-seconds", "30")  # never healthy: it stays starting
    w.svc.start("a")
    w.svc.stop("a", 5)


def starting_to_exited(w: World) -> None:
    w.add("a", "--fake-crash-after", "0", "--fake-exit-code", "3")
    w.svc.start("a")
    wait_until(lambda: w.status("a") == "exited", 10)
    assert w.svc.store.get("a").exit_code == 3


def running_to_stopping(w: World) -> None:
    w.add("a")
    w.healthy("a")
    w.svc.stop("a", 5)
    assert w.status("a") == "stopped"


def running_to_exited(w: World) -> None:
    w.add("a")
    w.healthy("a")
    w.kill9("a")


def stopping_to_exited(w: World) -> None:
    w.add("a")
    w.healthy("a")
    w.svc.stop("a", 5, by_user=False)  # the supervisor's stop of an unhealthy instance
    assert w.status("a") == "exited"


def _interrupted_down(w: World) -> int:
    """A `down` killed half way: it wrote `stopping` and died holding nothing."""
    w.add("a", "--fake-ignore-sigterm")
    w.healthy("a")
    pid = w.svc.store.get("a").pid
    env = subprocess_env({"LLAMA_ORCH_HOME": str(w.root), "LLAMA_ORCH_NO_DAEMON": "1"})
    down = subprocess.Popen(
        [*_cli_command(), "down", "a", "--timeout", "120"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: w.svc.store.get("a").status == "stopping", 30, message="down wrote stopping")
        assert w.svc.refresh("a").status == "stopping", "a stop in progress (its lock held) is left alone"
    finally:
        down.kill()
        down.wait()
    return pid


def stopping_to_running(w: World) -> None:
    pid = _interrupted_down(w)
    assert w.status("a") == "running" and w.svc.store.get("a").pid == pid
    assert "stop-interrupted" in [e.kind for e in w.svc.store.events("a")]
    assert w.svc.start("a").already_running, "`up` is not refused with 'already stopping'"


def stopping_to_stopped(w: World) -> None:
    pid = _interrupted_down(w)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)
    assert w.status("a") == "stopped", "the stopper died but the process is gone: the person's stop happened"


def exited_to_starting(w: World) -> None:
    w.add("a")
    w.healthy("a")
    w.kill9("a")
    w.svc.start("a")


def exited_to_backoff(w: World) -> None:
    w.add("a", restart={"policy": "on-failure", "backoff_seconds": 10, "max_retries": 3})
    w.healthy("a")
    sup, _ = w.supervisor()
    sup.tick(100.0)
    w.kill9("a")
    sup.tick(101.0)
    assert w.status("a") == "backoff"


def exited_to_failed(w: World) -> None:
    w.add("a", restart={"policy": "on-failure", "max_retries": 0})
    w.healthy("a")
    sup, _ = w.supervisor()
    sup.tick(100.0)
    w.kill9("a")
    sup.tick(101.0)
    assert w.status("a") == "failed"


def exited_to_stopped(w: World) -> None:
    w.add("a")
    w.healthy("a")
    w.kill9("a")
    w.svc.stop("a")


def exited_to_running(w: World) -> None:
    w.add("a")
    w.healthy("a")
    w.kill9("a")
    pid = w.spawn_unrecorded("a")
    outcome = w.svc.start("a")
    assert outcome.already_running and outcome.row.pid == pid, "adopted, not a second process"


def _to_backoff(w: World, **restart: object) -> Supervisor:
    w.add("a", restart={"policy": "on-failure", "backoff_seconds": 10, "max_retries": 3, **restart})
    w.healthy("a")
    sup, _ = w.supervisor()
    sup.tick(100.0)
    w.kill9("a")
    sup.tick(101.0)
    assert w.status("a") == "backoff"
    return sup


def backoff_to_starting(w: World) -> None:
    sup = _to_backoff(w)
    sup.tick(200.0)  # the delay is over
    assert w.status("a") in ("starting", "running")


def backoff_to_stopped(w: World) -> None:
    _to_backoff(w)
    w.svc.stop("a")


def backoff_to_failed(w: World) -> None:
    # autostart whose starts keep failing before anything is spawned: stopped -> backoff, then give up.
    w.add("a", autostart=True, restart={"policy": "on-failure", "backoff_seconds": 1, "max_retries": 1})
    sup, _ = w.supervisor(fail_starts=True)
    sup.boot(100.0)
    sup.drain(100.0)  # the failed start's report
    assert w.status("a") == "backoff"
    sup.tick(200.0)
    sup.drain(200.0)
    assert w.status("a") == "failed"


def backoff_to_running(w: World) -> None:
    _to_backoff(w)
    pid = w.spawn_unrecorded("a")
    assert w.svc.start("a").row.pid == pid


def stopped_to_backoff(w: World) -> None:
    w.add("a", autostart=True, restart={"policy": "on-failure", "backoff_seconds": 1, "max_retries": 3})
    sup, _ = w.supervisor(fail_starts=True)
    sup.boot(100.0)
    sup.drain(100.0)  # the failed start's report
    assert w.status("a") == "backoff"


def stopped_to_failed(w: World) -> None:
    w.add("a", binary=bad_binary(w))
    with pytest.raises(StartError, match="could not execute"):
        w.svc.start("a")
    assert w.status("a") == "failed"


def _failed(w: World) -> None:
    stopped_to_failed(w)
    w.add("a")  # fixed


def failed_to_starting(w: World) -> None:
    _failed(w)
    w.svc.start("a")


def failed_to_stopped(w: World) -> None:
    _failed(w)
    w.svc.stop("a")


def failed_to_running(w: World) -> None:
    _failed(w)
    pid = w.spawn_unrecorded("a")
    assert w.svc.start("a").row.pid == pid


def stopped_to_running(w: World) -> None:
    w.add("a")
    pid = w.spawn_unrecorded("a")
    assert w.svc.start("a").row.pid == pid


SCENARIOS: dict[Edge, Callable[[World], None]] = {
    (S.stopped, S.starting): stopped_to_starting,
    (S.stopped, S.running): stopped_to_running,
    (S.stopped, S.failed): stopped_to_failed,
    (S.stopped, S.backoff): stopped_to_backoff,
    (S.starting, S.running): starting_to_running,
    (S.starting, S.stopping): starting_to_stopping,
    (S.starting, S.exited): starting_to_exited,
    (S.running, S.stopping): running_to_stopping,
    (S.running, S.exited): running_to_exited,
    (S.stopping, S.stopped): stopping_to_stopped,
    (S.stopping, S.exited): stopping_to_exited,
    (S.stopping, S.running): stopping_to_running,
    (S.exited, S.starting): exited_to_starting,
    (S.exited, S.backoff): exited_to_backoff,
    (S.exited, S.failed): exited_to_failed,
    (S.exited, S.stopped): exited_to_stopped,
    (S.exited, S.running): exited_to_running,
    (S.backoff, S.starting): backoff_to_starting,
    (S.backoff, S.stopped): backoff_to_stopped,
    (S.backoff, S.failed): backoff_to_failed,
    (S.backoff, S.running): backoff_to_running,
    (S.failed, S.starting): failed_to_starting,
    (S.failed, S.stopped): failed_to_stopped,
    (S.failed, S.running): failed_to_running,
}


def test_every_table_edge_has_a_scenario() -> None:
    assert sorted(SCENARIOS) == TABLE_EDGES


@pytest.mark.parametrize("edge", TABLE_EDGES, ids=[f"{a}->{b}" for a, b in TABLE_EDGES])
def test_the_code_takes_the_edge_and_only_table_edges(world: World, edge: Edge) -> None:
    SCENARIOS[edge](world)
    assert edge in world.edges, f"the scenario did not take {edge}: took {world.edges}"
    outside = [e for e in world.edges if not is_valid_transition(*e)]
    assert not outside, outside


def test_an_edge_outside_the_table_is_never_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The guard itself: a write the table forbids (here stopped -> exited) is refused and logged as a bug."""
    svc = InstanceService(Home(tmp_path / "home"))
    with caplog.at_level(logging.ERROR, logger="llama_orchestrator.store"):
        assert not svc.store.transition("a", S.stopped, S.exited, event=("exited", "impossible"))
    assert svc.refresh("a").status == "stopped" and svc.store.events("a") == []
    assert "BUG" in caplog.text


def test_no_status_write_bypasses_transition() -> None:
    """No status write bypasses the one function (the fakes refuse ``update(status=...)`` too)."""
    import re

    src = Path(__file__).resolve().parent.parent / "src" / "llama_orchestrator"
    offenders = []
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"\.update\([^)]*\bstatus=", r"row\.status\s*=[^=]", r"store\.put\("):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == [], offenders


def test_down_finds_and_stops_a_marked_process_the_row_lost(world: World) -> None:
    world.add("a")
    pid = world.spawn_unrecorded("a")
    port = world.svc.load("a").server.port
    wait_until(lambda: not _port_free(port), 10, message="listening")
    row = world.svc.stop("a", 5)
    assert row.status == "stopped"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _port_free(port)
    assert (S.stopped, S.running) in world.edges and (S.stopping, S.stopped) in world.edges


def test_the_scan_counts_only_the_top_of_a_tree(world: World) -> None:
    world.add("a", "--fake-spawn-child")
    world.healthy("a")
    top = world.svc.store.get("a").pid
    wait_until(lambda: psutil.Process(top).children(), 10, message="the child")
    assert [(f.name, f.pid) for f in world.svc.scan()] == [("a", top)]


def _port_free(port: int) -> bool:
    from llama_orchestrator.adapters.ports import is_port_free

    return is_port_free(port)
