"""Fault injection (issue #3): real processes, the real daemon (`llama-orch daemon start`), the fake llama-server.

Each test kills, hangs, floods or races something and checks that the orchestrator ends in the state SPEC §5-7
promise. The daemon ticks every 0.5 s, so configs use small intervals and backoffs; every wait has a generous
deadline (the machine running the suite may be slow and shared) and no test sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Cli, instance_doc
from helpers import free_port, wait_until

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script; signals")

TICK_S = 0.5  # services/daemon.py TICK_S: the daemon's housekeeping (log rotation, others' store changes) per tick
FAST_HEALTH = {"interval": 0.3, "timeout": 2, "retries": 3, "start_period": 2}
FAST_RESTART = {"policy": "on-failure", "backoff_seconds": 0.3, "backoff_multiplier": 1.0, "max_retries": 5}


# -- helpers ---------------------------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    from llama_orchestrator.adapters.ports import is_port_free

    return is_port_free(port)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def servers_on(port: int) -> list[psutil.Process]:
    """Processes started with `--port PORT` (the fake's wrapper execs, so one per server)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            on_port = "--port" in cmdline and cmdline[cmdline.index("--port") + 1 :][:1] == [str(port)]
            if on_port and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, ValueError):
            continue
    return found


def daemons_of(home: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            if str(home) in cmdline and cmdline[-2:] == ["daemon", "run"] and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def db_row(home: Path, name: str) -> dict:
    """The instance's row read straight from SQLite: what the daemon recorded, with no CLI probing in between."""
    db = sqlite3.connect(f"file:{home / 'state' / 'state.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM instances WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else {}
    finally:
        db.close()


class Faults:
    """Instances under one home, with the ports they use remembered so teardown can reap whatever is left."""

    def __init__(self, cli: Cli, model: Path, binary: Path) -> None:
        self.cli = cli
        self.model = model
        self.binary = binary
        self.ports: list[int] = []
        self.pids: list[int] = []  # extra processes to reap (grandchildren)

    def add(self, name: str, *args: str, binary: Path | None = None, **sections: object) -> int:
        port = free_port()
        self.ports.append(port)
        doc = instance_doc(name, self.model, port, binary or self.binary)
        doc["healthcheck"] = {**FAST_HEALTH, **sections.pop("healthcheck", {})}  # type: ignore[dict-item]
        doc["restart"] = {**FAST_RESTART, **sections.pop("restart", {})}  # type: ignore[dict-item]
        doc.update(sections, args=list(args))
        self.cli.write_config(name, doc)
        return port

    # -- the CLI ---------------------------------------------------------------------------------------------
    def up(self, *names: str, wait: bool = True) -> None:
        extra = ["--wait", "--timeout", "60"] if wait else []
        self.cli.run("up", *names, "-d", *extra, check=True)

    def daemon_start(self) -> int:
        self.cli.run("daemon", "start", check=True)
        return self.daemon_pid()

    def daemon_pid(self) -> int:
        info = json.loads((self.cli.home / "state" / "daemon.pid").read_text())
        return info["pid"]

    def ps(self, name: str) -> dict:
        return self.cli.ps()[name]

    def events(self, name: str | None = None, after: int = 0) -> list[dict]:
        args = ["events", *([name] if name else []), "--json", "--tail", "1000"]
        out = self.cli.run(*args, check=True).stdout
        return [e for e in json.loads(out) if e["id"] > after]

    def kinds(self, name: str, after: int = 0) -> list[str]:
        return [e["kind"] for e in self.events(name, after)]

    def last_event_id(self) -> int:
        events = self.events()
        return max((e["id"] for e in events), default=0)

    def healthy(self, name: str) -> dict | None:
        """The row once the daemon has it running and healthy (read from SQLite, no probe of our own)."""
        row = db_row(self.cli.home, name)
        return row if row.get("status") == "running" and row.get("health") == "healthy" else None

    def wait_healthy(self, name: str, timeout: float = 30, *, other_than: int | None = None) -> dict:
        def ready() -> dict | None:
            row = self.healthy(name)
            return row if row and row["pid"] != other_than else None

        return wait_until(ready, timeout, interval=0.05, message=f"{name} healthy (not pid {other_than})")

    def db_events(self, name: str, after: int = 0) -> list[dict]:
        """Events read straight from SQLite: cheap enough to poll (assertions use the `events` command)."""
        db = sqlite3.connect(f"file:{self.cli.home / 'state' / 'state.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM events WHERE instance = ? AND id > ? ORDER BY id", (name, after))
            return [dict(row) for row in rows]
        finally:
            db.close()

    def wait_event(self, name: str, kind: str, after: int = 0, timeout: float = 30) -> dict:
        def found() -> dict | None:
            return next((e for e in self.db_events(name, after) if e["kind"] == kind), None)

        return wait_until(found, timeout, interval=0.05, message=f"event {kind} of {name}")

    def wait_kinds(self, name: str, kinds: set[str], after: int = 0, timeout: float = 30) -> dict:
        """The first event of one of ``kinds`` after ``after``."""

        def found() -> dict | None:
            return next((e for e in self.db_events(name, after) if e["kind"] in kinds), None)

        return wait_until(found, timeout, interval=0.05, message=f"one of {sorted(kinds)} for {name}")

    # -- teardown --------------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        self.cli.run("daemon", "stop", timeout=60)
        # Kill first, then let `down --all` record it: a graceful stop of each would cost seconds here (a process
        # that is not our child stays a zombie until init reaps it, and `down` waits for it to be gone).
        for port in self.ports:
            self.pids += [process.pid for process in servers_on(port)]
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        self.cli.run("down", "--all", "--timeout", "1", timeout=120)


@contextlib.contextmanager
def supervised(cli: Cli, tiny_model: Path, fake_binary: Path) -> Iterator[Faults]:
    """A home whose daemon supervises without its HTTP API (SPEC §9, default port 8000, shared by every home on the
    machine: it has its own tests), cleaned up after."""
    world = Faults(cli, tiny_model, fake_binary)
    (cli.home / "orchestrator.json").write_text(json.dumps({"api": {"enabled": False}}))
    try:
        yield world
    finally:
        world.cleanup()


@pytest.fixture
def faults(cli: Cli, tiny_model: Path, fake_binary: Path) -> Iterator[Faults]:
    with supervised(cli, tiny_model, fake_binary) as world:
        yield world


# -- 1. kill -9 of an instance ---------------------------------------------------------------------------------


def test_kill_9_of_an_instance_is_restarted_on_its_port(faults: Faults) -> None:
    port = faults.add("victim")
    faults.up("victim")
    faults.daemon_start()
    faults.wait_event("victim", "adopted")
    before = faults.wait_healthy("victim")
    mark = faults.last_event_id()

    os.kill(before["pid"], signal.SIGKILL)
    after = faults.wait_healthy("victim", other_than=before["pid"])

    assert after["port"] == port
    assert [p.pid for p in servers_on(port)] == [after["pid"]]
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    kinds = faults.kinds("victim", mark)
    assert "exited" in kinds and "restarted" in kinds, kinds
    assert kinds.index("exited") < kinds.index("restarted")
    record = faults.ps("victim")
    assert (record["status"], record["health"], record["restarts"]) == ("running", "healthy", 1)
    assert "victim" in faults.cli.run("ps", check=True).stdout


# -- 2. kill -9 of the daemon ----------------------------------------------------------------------------------


def test_kill_9_of_the_daemon_loses_nothing(faults: Faults) -> None:
    ports = {name: faults.add(name) for name in ("one", "two")}
    faults.up("one", "two")
    first = faults.daemon_start()
    for name in ports:
        faults.wait_event(name, "adopted")
    # "two" becomes the daemon's own child: the daemon restarts it after a kill.
    old_two = faults.wait_healthy("two")["pid"]
    os.kill(old_two, signal.SIGKILL)
    faults.wait_healthy("two", other_than=old_two)
    pids = {name: faults.wait_healthy(name)["pid"] for name in ports}
    assert psutil.Process(pids["two"]).ppid() == first

    os.kill(first, signal.SIGKILL)
    wait_until(lambda: gone(first), 20, message="the daemon to die")
    status = faults.cli.run("daemon", "status")
    assert status.returncode == 1, status.stdout
    for name, port in ports.items():
        assert [p.pid for p in servers_on(port)] == [pids[name]], f"{name} did not survive the daemon"
    mark = faults.last_event_id()

    second = faults.daemon_start()
    assert second != first
    for name in ports:
        faults.wait_event(name, "adopted", mark)
    for name, port in ports.items():
        assert [p.pid for p in servers_on(port)] == [pids[name]], f"{name}: not exactly the same one process"
        assert faults.wait_healthy(name)["pid"] == pids[name]
    after = faults.events(None, mark)
    for name in ports:
        kinds = [e["kind"] for e in after if e["instance"] == name]
        assert "adopted" in kinds and not {"started", "restarted", "exited"} & set(kinds), (name, kinds)

    # Supervision works again.
    os.kill(pids["one"], signal.SIGKILL)
    again = faults.wait_healthy("one", other_than=pids["one"])
    assert [p.pid for p in servers_on(ports["one"])] == [again["pid"]]
    assert "restarted" in faults.kinds("one", mark)
    assert faults.ps("two")["pid"] == pids["two"]


# -- 3. a hang after becoming healthy ----------------------------------------------------------------------------


def test_a_hung_instance_is_declared_unhealthy_and_restarted(faults: Faults) -> None:
    port = faults.add(
        "hang", "--fake-hang-after", "1",
        healthcheck={"interval": 0.3, "timeout": 0.3, "retries": 2, "start_period": 0.5},
    )  # fmt: skip
    faults.daemon_start()
    faults.up("hang", wait=False)
    first = faults.wait_healthy("hang")["pid"]
    mark = faults.last_event_id()

    restarted = faults.wait_event("hang", "restarted", mark, timeout=40)
    events = faults.events("hang", mark)
    kinds = [e["kind"] for e in events]
    assert "unhealthy" in kinds and kinds.index("unhealthy") < kinds.index("restarted"), kinds
    unhealthy = next(e for e in events if e["kind"] == "unhealthy")
    assert "2 failed health checks" in unhealthy["message"]
    assert str(first) not in restarted["message"]
    assert gone(first)
    # The replacement runs on the same port and answers (until it hangs in turn).
    wait_until(lambda: [p.pid for p in servers_on(port)] not in ([], [first]), 20)
    assert faults.ps("hang")["restarts"] >= 1


# -- 4. a slow loader inside its start period ---------------------------------------------------------------------


def test_a_slow_loader_is_not_killed_inside_its_start_period(faults: Faults) -> None:
    faults.add(
        "slow", "--fake-load-seconds", "3",
        healthcheck={"interval": 0.3, "timeout": 2, "retries": 2, "start_period": 10},
    )  # fmt: skip
    faults.daemon_start()
    faults.up("slow", wait=False)
    seen: list[tuple[int | None, str, str]] = []

    def healthy() -> bool:
        row = db_row(faults.cli.home, "slow")
        seen.append((row.get("pid"), row.get("status"), row.get("health")))
        return row.get("health") == "healthy"

    wait_until(healthy, 40, interval=0.05)
    pids = {pid for pid, _, _ in seen}
    assert len(pids) == 1, seen
    healths = [health for _, _, health in seen]
    assert "loading" in healths, healths
    first_loading = healths.index("loading")
    assert set(healths[first_loading:-1]) == {"loading"}, healths  # loading → healthy, nothing in between
    kinds = faults.kinds("slow")
    assert not {"unhealthy", "restarted", "exited", "backoff"} & set(kinds), kinds
    assert "healthy" in kinds
    record = faults.ps("slow")
    assert (record["pid"], record["restarts"], record["status"]) == (pids.pop(), 0, "running")


# -- 5. a crash loop ---------------------------------------------------------------------------------------------

CRASH_LOOP = {"policy": "on-failure", "backoff_seconds": 0.2, "backoff_multiplier": 2, "max_retries": 3}


def _backoffs(faults: Faults, name: str, after: int) -> list[str]:
    return [e["message"] for e in faults.events(name, after) if e["kind"] == "backoff"]


def test_a_crash_loop_backs_off_then_fails_until_a_person_acts(faults: Faults) -> None:
    faults.add("loop", "--fake-crash-after", "0.3", restart=CRASH_LOOP)
    faults.daemon_start()
    faults.cli.run("up", "loop", "-d")  # may report the crash right after start: the daemon takes over anyway

    wait_until(lambda: db_row(faults.cli.home, "loop").get("status") == "failed", 40, message="loop to fail")
    messages = _backoffs(faults, "loop", 0)
    assert [m.split(": ", 1)[1] for m in messages] == [
        "restart 1 of 3 in 0.2 s",
        "restart 2 of 3 in 0.4 s",
        "restart 3 of 3 in 0.8 s",
    ], messages
    kinds = faults.kinds("loop")
    assert kinds.count("restarted") == 3 and kinds[-1] == "failed", kinds
    record = faults.ps("loop")
    assert record["status"] == "failed" and record["pid"] is None
    assert "gave up after 3 restarts" in (record["last_error"] or "")
    assert "failed" in faults.cli.run("ps", check=True).stdout

    # It stays down: a few ticks later nothing new happened.
    mark = faults.last_event_id()
    deadline = time.monotonic() + 3 * TICK_S
    wait_until(lambda: time.monotonic() > deadline, 10)
    assert faults.events("loop", mark) == []

    # A person's `up` starts it again, with the count starting again. (This one lives long enough for a daemon
    # tick to see it running; one that dies before any tick sees it is the next test.)
    faults.add("loop", "--fake-crash-after", "1.2", restart=CRASH_LOOP)
    faults.cli.run("up", "loop", "-d", check=True)
    faults.wait_kinds("loop", {"backoff", "failed"}, mark)
    events = [e for e in faults.events("loop", mark) if e["kind"] in ("backoff", "failed")]
    assert events[0]["kind"] == "backoff" and events[0]["message"].endswith("restart 1 of 3 in 0.2 s"), events


def test_a_person_up_after_failed_resets_the_count_even_for_an_instant_exit(faults: Faults, tmp_path: Path) -> None:
    # A binary that exits at once: the daemon (ticking every 0.5 s) never sees it running.
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\necho 'cannot load model' >&2\nexit 3\n")
    binary.chmod(0o755)
    faults.add("instant", binary=binary, restart={**CRASH_LOOP, "max_retries": 1})
    faults.daemon_start()
    faults.cli.run("up", "instant", "-d")
    faults.wait_event("instant", "failed")
    assert len(_backoffs(faults, "instant", 0)) == 1
    mark = faults.last_event_id()

    faults.cli.run("up", "instant", "-d")
    faults.wait_kinds("instant", {"backoff", "failed"}, mark)
    events = [e for e in faults.events("instant", mark) if e["kind"] in ("backoff", "failed")]
    assert events[0]["kind"] == "backoff" and events[0]["message"].endswith("restart 1 of 1 in 0.2 s"), events


# -- 6. SIGTERM ignored ------------------------------------------------------------------------------------------


def test_down_kills_a_process_that_ignores_sigterm_after_the_timeout(faults: Faults) -> None:
    port = faults.add("stubborn", "--fake-ignore-sigterm")
    faults.up("stubborn")
    pid = faults.ps("stubborn")["pid"]
    began = time.monotonic()
    faults.cli.run("down", "stubborn", "--timeout", "1", check=True)
    took = time.monotonic() - began
    assert took >= 1.0
    assert gone(pid) and port_free(port) and servers_on(port) == []
    assert faults.ps("stubborn")["status"] == "stopped"
    stopped = [e for e in faults.events("stubborn") if e["kind"] == "stopped"]
    assert stopped and "killed after 1 s grace" in stopped[-1]["message"]
    log = (faults.cli.home / "logs" / "stubborn" / "stderr.log").read_text()
    assert "received SIGTERM, ignoring it" in log


# -- 7. grandchildren --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--fake-ignore-sigterm"]], ids=["graceful", "killed"])
def test_down_takes_the_grandchildren_too(faults: Faults, extra: list[str]) -> None:
    port = faults.add("parent", "--fake-spawn-child", *extra)
    faults.up("parent")
    stdout = faults.cli.home / "logs" / "parent" / "stdout.log"

    def child_pid() -> int | None:
        for line in stdout.read_text().splitlines() if stdout.exists() else []:
            if line.startswith("child pid "):
                return int(line.split()[-1])
        return None

    child = wait_until(child_pid, 20, message="the child pid in stdout.log")
    faults.pids.append(child)
    parent = faults.ps("parent")["pid"]
    assert not gone(child) and psutil.Process(child).ppid() == parent

    faults.cli.run("down", "parent", "--timeout", "1", check=True)
    wait_until(lambda: gone(child), 10, message="the grandchild to be gone")
    assert gone(parent) and port_free(port)


# -- 8. a log flood --------------------------------------------------------------------------------------------

FLOOD_BPS = 2_000_000
LOG_LIMIT = int(0.2 * 1024 * 1024)


def test_a_log_flood_is_rotated_by_the_daemon_and_stays_bounded(faults: Faults) -> None:
    faults.add("flood", "--fake-log-flood", str(FLOOD_BPS), logs={"max_size_mb": 0.2, "rotation": 2})
    faults.daemon_start()
    faults.up("flood", wait=False)
    logs = faults.cli.home / "logs" / "flood"
    live, first, second, third = (logs / n for n in ("stderr.log", "stderr.log.1", "stderr.log.2", "stderr.log.3"))
    sizes: list[int] = []
    extra_files: list[list[str]] = []

    def sample() -> None:
        with contextlib.suppress(FileNotFoundError):
            sizes.append(live.stat().st_size)
        if third.exists():
            extra_files.append(sorted(p.name for p in logs.iterdir()))

    def rotated_twice() -> bool:
        sample()
        return first.exists() and second.exists()

    wait_until(rotated_twice, 15, interval=0.02, message="stderr.log.1 and .2")
    # Watch it for a few more ticks.
    until = time.monotonic() + 6 * TICK_S
    wait_until(lambda: sample() or time.monotonic() > until, 20, interval=0.02)

    # The daemon rotates once a tick: between two looks at most ~2 ticks of flooding pile up (one late tick).
    bound = LOG_LIMIT + 2 * TICK_S * FLOOD_BPS
    assert max(sizes) <= bound, f"stderr.log reached {max(sizes)} bytes (bound {bound})"
    assert not extra_files, extra_files
    kept = sorted(p.name for p in logs.glob("stderr.log*") if p.suffix != ".idx")
    assert kept == ["stderr.log", "stderr.log.1", "stderr.log.2"]
    # The log-time indexes rotate with their logs: one beside a kept log at most, none left for a dropped one.
    assert {p.name.removesuffix(".idx") for p in logs.glob("stderr.log*.idx")} <= set(kept)
    assert first.stat().st_size > LOG_LIMIT  # a rotated file holds what piled up, not an empty copy
    assert db_row(faults.cli.home, "flood")["status"] in ("starting", "running")
    assert "rotated stderr.log" in (faults.cli.home / "state" / "daemon.log").read_text()


# -- 9. the CLI and the daemon writing at once ------------------------------------------------------------------


def test_cli_commands_and_the_daemon_write_state_at_once(faults: Faults) -> None:
    names = ["w1", "w2", "w3"]
    for name in names:
        faults.add(name, healthcheck={"interval": 0.1, "timeout": 10, "retries": 3, "start_period": 2})
    faults.up(*names)
    faults.daemon_start()
    for name in names:
        faults.wait_healthy(name)
    commands = [
        ("ps",),
        ("ps", "--json"),
        ("health",),
        ("health", "w1"),
        ("describe", "w2"),
        ("describe", "w3", "--json"),
        ("events", "--json"),
    ]
    jobs = [commands[i % len(commands)] for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda args: (args, faults.cli.run(*args, timeout=180)), jobs))
    failures = [(args, r.returncode, r.stderr[-500:]) for args, r in results if r.returncode != 0]
    assert not failures, failures
    for args, result in results:
        assert "locked" not in result.stderr + result.stdout, (args, result.stderr)
    daemon_log = (faults.cli.home / "state" / "daemon.log").read_text()
    assert "locked" not in daemon_log and "Traceback" not in daemon_log, daemon_log[-2000:]
    out = faults.cli.home / "state" / "daemon.out"
    assert "locked" not in (out.read_text() if out.exists() else "")
    for name in names:
        assert faults.ps(name)["status"] == "running"


# -- 10. one daemon per home -----------------------------------------------------------------------------------


def test_a_second_daemon_refuses(faults: Faults) -> None:
    pid = faults.daemon_start()
    again = faults.cli.run("daemon", "start", check=True)
    assert "already running" in again.stdout and str(pid) in again.stdout
    assert [p.pid for p in daemons_of(faults.cli.home)] == [pid]

    foreground = faults.cli.run("daemon", "run", timeout=60)
    assert foreground.returncode != 0
    assert "already runs" in foreground.stderr, foreground.stderr
    assert [p.pid for p in daemons_of(faults.cli.home)] == [pid]
    assert faults.daemon_pid() == pid  # the refused one did not touch the PID file
    assert faults.cli.run("daemon", "status").returncode == 0


def test_simultaneous_daemon_starts_leave_one_daemon(faults: Faults) -> None:
    barrier = threading.Barrier(3)
    results: list[subprocess.CompletedProcess[str]] = []

    def start() -> None:
        barrier.wait()
        results.append(faults.cli.run("daemon", "start", timeout=60))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    wait_until(lambda: len(daemons_of(faults.cli.home)) == 1, 20)
    assert [p.pid for p in daemons_of(faults.cli.home)] == [faults.daemon_pid()]


# -- 11. daemon stop leaves the instances ------------------------------------------------------------------------


def test_daemon_stop_leaves_instances_running(faults: Faults) -> None:
    ports = {name: faults.add(name) for name in ("keep1", "keep2")}
    faults.up("keep1", "keep2")
    daemon = faults.daemon_start()
    pids = {name: faults.wait_healthy(name)["pid"] for name in ports}
    assert faults.cli.run("daemon", "status").returncode == 0

    stopped = faults.cli.run("daemon", "stop", check=True)
    assert "daemon stopped" in stopped.stdout
    assert gone(daemon)
    status = faults.cli.run("daemon", "status")
    assert status.returncode == 1 and "not running" in status.stdout
    for name, port in ports.items():
        assert [p.pid for p in servers_on(port)] == [pids[name]]
        record = faults.ps(name)
        assert (record["status"], record["pid"]) == ("running", pids[name])
    assert not (faults.cli.home / "state" / "daemon.pid").exists()
    assert faults.cli.run("daemon", "stop", check=True).stdout.strip() == "no daemon was running"


def test_a_starting_daemon_restarts_an_on_failure_instance_that_crashed_unwatched(faults: Faults) -> None:
    """A crash while no daemon ran is still a crash: on-failure means the instance is meant to run (a person's
    `down` is what keeps it down). After a reboot, `daemon start` brings back what was running."""
    faults.add("dead")
    faults.up("dead")
    pid = faults.ps("dead")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), 20)
    assert faults.ps("dead")["status"] == "exited"
    mark = faults.last_event_id()

    faults.daemon_start()
    faults.wait_event("dead", "restarted", mark)
    after = faults.wait_healthy("dead", 30, other_than=pid)
    assert after["pid"] != pid


# -- 12. the real llama-server ---------------------------------------------------------------------------------


@pytest.mark.real_server
def test_kill_9_of_the_real_server_is_restarted_by_the_daemon(faults: Faults, real_binary: Path) -> None:
    port = faults.add(
        "real", binary=real_binary,
        healthcheck={"interval": 0.3, "timeout": 5, "retries": 3, "start_period": 30},
    )  # fmt: skip
    faults.up("real")
    faults.daemon_start()
    faults.wait_event("real", "adopted")
    before = faults.wait_healthy("real", 60)
    mark = faults.last_event_id()

    os.kill(before["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    after = faults.wait_healthy("real", 60, other_than=before["pid"])
    took = time.monotonic() - killed_at
    load = after["health_checked_at"] - after["started_at"]  # how long the new one took to answer
    assert took <= FAST_RESTART["backoff_seconds"] + load + 10, (took, load)  # + detection and slow-machine slack
    assert after["port"] == port and [p.pid for p in servers_on(port)] == [after["pid"]]
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    kinds = faults.kinds("real", mark)
    assert "exited" in kinds and "restarted" in kinds, kinds
    assert faults.ps("real")["restarts"] == 1


# -- 13. `up -d` starts the daemon when a policy needs it ---------------------------------------------------------


def test_up_detached_starts_the_daemon_only_when_a_policy_needs_it(faults: Faults) -> None:
    faults.cli.daemon = True
    faults.add("loner", restart={"policy": "never"})
    faults.add("watched", restart={"policy": "on-failure"})

    faults.up("loner")
    assert faults.cli.run("daemon", "status").returncode == 1
    assert daemons_of(faults.cli.home) == []

    result = faults.cli.run("up", "watched", "-d", check=True)
    assert "daemon started" in result.stdout and "watched" in result.stdout
    assert faults.cli.run("daemon", "status").returncode == 0
    assert [p.pid for p in daemons_of(faults.cli.home)] == [faults.daemon_pid()]
    faults.wait_healthy("watched")
