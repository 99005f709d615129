"""Recovery from the OS (issue #9): real daemons, real processes (the fake llama-server), a real SQLite file.

SQLite is a cache: a lost or corrupt database is rebuilt from the configs and a scan of the processes carrying our
marker; supervision goes on; no command shows a traceback. Also: `rm` and invalid configs while the daemon runs, a
suspended instance, and `daemon start` of a daemon that cannot start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import Cli
from helpers import wait_until
from test_faults import Faults, db_row, gone, port_free, servers_on, supervised

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script; signals")


@pytest.fixture
def faults(cli: Cli, tiny_model: Path, fake_binary: Path) -> Iterator[Faults]:
    with supervised(cli, tiny_model, fake_binary) as world:
        yield world


def db_files(home: Path) -> list[Path]:
    state = home / "state"
    return [state / f"state.sqlite{extra}" for extra in ("", "-wal", "-shm")]


def truncate_db(home: Path) -> None:
    path = home / "state" / "state.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def no_traceback(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def two_running_under_the_daemon(faults: Faults) -> dict[str, tuple[int, int]]:
    """Two instances healthy under the daemon; ``{name: (port, pid)}``. The daemon is stopped again at the end."""
    ports = {name: faults.add(name) for name in ("one", "two")}
    faults.daemon_start()
    faults.up("one", "two")
    return {name: (port, faults.wait_healthy(name)["pid"]) for name, port in ports.items()}


def check_supervised_and_down(faults: Faults, running: dict[str, tuple[int, int]]) -> None:
    """Both shown running with their PIDs, a kill -9 restarted, `down` stops them and frees their ports."""
    ps = faults.cli.ps()
    for name, (port, pid) in running.items():
        assert (ps[name]["status"], ps[name]["pid"]) == ("running", pid), ps[name]
        assert [p.pid for p in servers_on(port)] == [pid], f"{name}: duplicated or lost"
    port, pid = running["one"]
    os.kill(pid, signal.SIGKILL)
    again = faults.wait_healthy("one", other_than=pid, timeout=40)
    assert [p.pid for p in servers_on(port)] == [again["pid"]]
    no_traceback(faults.cli.run("down", "one", "two", check=True))
    for name, (port, _) in running.items():
        assert port_free(port), f"{name} still holds {port}"
        assert servers_on(port) == []


def test_a_deleted_database_is_rebuilt_from_the_running_processes(faults: Faults) -> None:
    running = two_running_under_the_daemon(faults)
    faults.cli.run("daemon", "stop", check=True)
    for path in db_files(faults.cli.home):
        path.unlink(missing_ok=True)

    faults.daemon_start()
    for name in running:
        faults.wait_event(name, "adopted")
    check_supervised_and_down(faults, running)


def test_a_database_deleted_while_the_daemon_runs_is_rebuilt(faults: Faults) -> None:
    running = two_running_under_the_daemon(faults)
    for path in db_files(faults.cli.home):
        path.unlink(missing_ok=True)
    wait_until(
        lambda: all(db_row(faults.cli.home, n).get("status") == "running" for n in running),
        30,
        ignore=(sqlite3.Error,),
        message="rows rebuilt",
    )
    check_supervised_and_down(faults, running)


def test_a_truncated_database_is_kept_aside_and_no_command_shows_a_traceback(faults: Faults) -> None:
    running = two_running_under_the_daemon(faults)
    faults.cli.run("daemon", "stop", check=True)
    truncate_db(faults.cli.home)

    ps = no_traceback(faults.cli.run("ps", "--json", check=True))
    assert {r["name"]: r["pid"] for r in json.loads(ps.stdout)} == {n: pid for n, (_, pid) in running.items()}
    events = no_traceback(faults.cli.run("events", "--json", "--tail", "50", check=True))
    recovered = [e for e in json.loads(events.stdout) if e["kind"] == "recovered"]
    assert recovered and "corrupt" in recovered[0]["message"], events.stdout
    kept = list((faults.cli.home / "state").glob("state.sqlite.corrupt-*"))
    assert any(not p.name.endswith(("-wal", "-shm")) for p in kept), "the damaged file is kept aside"

    started = no_traceback(faults.cli.run("daemon", "start"))
    assert started.returncode == 0, started.stdout + started.stderr
    check_supervised_and_down(faults, running)


def test_a_database_truncated_under_the_running_daemon_is_recovered(faults: Faults) -> None:
    running = two_running_under_the_daemon(faults)
    truncate_db(faults.cli.home)
    for args in (["ps"], ["events", "--tail", "20"], ["daemon", "status"]):
        no_traceback(faults.cli.run(*args))
    check_supervised_and_down(faults, running)
    log = (faults.cli.home / "state" / "daemon.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_rm_while_the_daemon_runs_pauses_no_one(faults: Faults) -> None:
    faults.add("gone")
    port = faults.add("stays")
    faults.daemon_start()
    faults.up("gone", "stays")
    pid = faults.wait_healthy("stays")["pid"]
    faults.cli.run("rm", "-f", "gone", check=True)
    os.kill(pid, signal.SIGKILL)
    again = faults.wait_healthy("stays", other_than=pid)
    assert [p.pid for p in servers_on(port)] == [again["pid"]]
    log = (faults.cli.home / "state" / "daemon.log").read_text()
    assert "FileNotFoundError" not in log and "tick failed" not in log, log[-3000:]


def test_an_invalid_config_is_said_once_and_the_instance_keeps_running(faults: Faults) -> None:
    faults.add("bad")
    other = faults.add("fine")
    faults.daemon_start()
    faults.up("bad", "fine")
    pid = faults.wait_healthy("bad")["pid"]
    config = faults.cli.home / "instances" / "bad" / "config.json"
    good = config.read_text()
    config.write_text("{ not json")
    faults.wait_event("bad", "config-invalid")
    # Many ticks later (a kill -9 of another instance noticed and restarted takes several), still one of each.
    fine_pid = faults.wait_healthy("fine")["pid"]
    os.kill(fine_pid, signal.SIGKILL)
    faults.wait_healthy("fine", other_than=fine_pid)
    assert [p.pid for p in servers_on(other)]
    assert psutil.Process(pid).is_running(), "the instance keeps running"
    assert [e["kind"] for e in faults.db_events("bad")].count("config-invalid") == 1
    log = (faults.cli.home / "state" / "daemon.log").read_text()
    assert log.count("config-invalid") == 1 and "does not load" not in log, log[-3000:]

    mark = faults.last_event_id()
    os.kill(pid, signal.SIGKILL)  # its exit is still noticed, with the last good config
    faults.wait_kinds("bad", {"exited", "backoff"}, mark)

    config.write_text(good)  # fixed: supervised as before
    faults.wait_healthy("bad", other_than=pid, timeout=40)


def test_a_suspended_unhealthy_instance_is_killed_without_the_whole_grace(faults: Faults) -> None:
    faults.add("frozen", healthcheck={"interval": 0.3, "timeout": 0.5, "retries": 2, "start_period": 0.5})
    faults.daemon_start()
    faults.up("frozen")
    pid = faults.wait_healthy("frozen")["pid"]
    mark = faults.last_event_id()
    os.kill(pid, signal.SIGSTOP)
    stopped = faults.wait_event("frozen", "stopped", mark, timeout=40)
    assert "at once" in stopped["message"], stopped
    faults.wait_healthy("frozen", other_than=pid, timeout=40)
    assert gone(pid)


def test_daemon_start_fails_with_the_reason_when_the_daemon_dies_starting(faults: Faults) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (faults.cli.home / "orchestrator.json").write_text(json.dumps({"api": {"enabled": True, "port": port}}))
        result = no_traceback(faults.cli.run("daemon", "start"))
    assert result.returncode == 1, result.stdout
    assert "daemon started" not in result.stdout
    assert str(port) in result.stdout + result.stderr
    assert faults.cli.run("daemon", "status").returncode == 1


def test_service_ops_says_an_invalid_config_once_per_version_and_keeps_the_last_good(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from conftest import instance_doc
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.domain.errors import InstanceNotFound, OrchestratorError
    from llama_orchestrator.services.daemon import ServiceOps
    from llama_orchestrator.services.instances import InstanceService

    home = Home(tmp_path / "home")
    path = home.config_path("a")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(instance_doc("a", tiny_model, 18555, Path("llama-server"))))
    ops = ServiceOps(InstanceService(home))
    good = ops.load("a")
    path.write_text("{ not json")
    with caplog.at_level(logging.INFO, logger="llama_orchestrator"):
        assert all(ops.load("a") is good for _ in range(100)), "supervised with its last good config"
    assert [e.kind for e in ops.service.store.events("a")] == ["config-invalid"]
    assert caplog.text.count("config-invalid") == 1
    path.write_text("{ still not json }")  # another version: said again, once
    ops.load("a")
    ops.load("a")
    assert [e.kind for e in ops.service.store.events("a")] == ["config-invalid", "config-invalid"]
    fresh = ServiceOps(ops.service)  # a daemon that never saw it valid: not supervised, still said once
    for _ in range(3):
        with pytest.raises(OrchestratorError):
            fresh.load("a")
    assert len(ops.service.store.events("a")) == 3
    path.unlink()
    with pytest.raises(InstanceNotFound):
        ops.load("a")  # removed: an instance that no longer exists, not a failed tick
