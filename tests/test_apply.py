"""Config drift and apply, as compose does (issue 9): the installed `llama-orch` against the fake llama-server, with
and without the daemon. Real processes, real sockets, a real SQLite file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Cli, _cli_command, instance_doc
from helpers import free_port, subprocess_env, wait_until
from llama_orchestrator.adapters.home import Home

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")


def add(cli: Cli, name: str, model: Path, binary: Path, **extra: object) -> dict:
    doc = instance_doc(name, model, free_port(), binary, **extra)
    cli.write_config(name, doc)
    return doc


def edit(cli: Cli, name: str, change) -> None:
    path = cli.home / "instances" / name / "config.json"
    doc = json.loads(path.read_text())
    change(doc)
    # Replaced whole, as editors save: written in place, the daemon's pass could read the emptied file between the
    # truncation and the write, and report that as one more invalid version.
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(doc, indent=2))
    os.replace(temp, path)


def set_ctx(cli: Cli, name: str, ctx: int) -> None:
    edit(cli, name, lambda d: d["model"].__setitem__("context_size", ctx))


def n_ctx(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/props", timeout=5).json()["default_generation_settings"]["n_ctx"]


def events(cli: Cli, *args: str) -> list[dict]:
    return json.loads(cli.run("events", *args, "--json", "--tail", "200", check=True).stdout)  # an array


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_drift_is_shown_and_up_recreates_only_the_changed(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    a = add(cli, "alpha", tiny_model, fake_binary)
    add(cli, "beta", tiny_model, fake_binary)
    cli.run("up", "alpha", "beta", "-d", "--wait", "--timeout", "30", check=True)
    before = cli.ps()
    assert not before["alpha"]["config_changed"] and not before["beta"]["config_changed"]

    set_ctx(cli, "alpha", 2048)
    edit(cli, "beta", lambda d: d.update(restart={"policy": "never"}))  # read live by the supervisor: no recreate
    rows = cli.ps()
    assert rows["alpha"]["config_changed"] is True and rows["beta"]["config_changed"] is False
    table = cli.run("ps", check=True).stdout
    assert "running*" in table and "config changed since it started" in table
    drift = cli.json("describe", "alpha")["config_drift"]
    assert {"path": "model.context_size", "running": 512, "declared": 2048, "needs_recreate": True} in drift
    text = cli.run("describe", "alpha", check=True).stdout
    assert "Config drift" in text and "model.context_size: 512 -> 2048" in text
    assert n_ctx(a["server"]["port"]) == 512  # the process still runs the old config

    result = cli.run("up", "alpha", "beta", "-d", "--wait", "--timeout", "30", check=True)
    assert "alpha recreated" in result.stdout and "model.context_size" in result.stdout
    assert "beta unchanged: already running" in result.stdout
    after = cli.ps()
    assert after["alpha"]["pid"] != before["alpha"]["pid"] and gone(before["alpha"]["pid"])
    assert after["beta"]["pid"] == before["beta"]["pid"]
    assert after["alpha"]["config_changed"] is False and after["alpha"]["health"] == "healthy"
    assert n_ctx(a["server"]["port"]) == 2048
    assert "recreated" in [e["kind"] for e in events(cli, "alpha")]


def test_no_recreate_and_force_recreate(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    add(cli, "alpha", tiny_model, fake_binary)
    cli.run("up", "alpha", "-d", "--wait", "--timeout", "30", check=True)
    pid = cli.ps()["alpha"]["pid"]
    set_ctx(cli, "alpha", 1024)

    kept = cli.run("up", "alpha", "-d", "--no-recreate", check=True)
    assert "unchanged" in kept.stdout and "not applied" in kept.stdout
    assert cli.ps()["alpha"]["pid"] == pid and cli.ps()["alpha"]["config_changed"] is True

    both = cli.run("up", "alpha", "-d", "--no-recreate", "--force-recreate")
    assert both.returncode == 2

    cli.run("up", "alpha", "-d", "--wait", "--timeout", "30", check=True)
    applied = cli.ps()["alpha"]
    assert applied["pid"] != pid and not applied["config_changed"]
    forced = cli.run("up", "alpha", "-d", "--force-recreate", "--wait", "--timeout", "30", check=True)
    assert "alpha recreated" in forced.stdout
    assert cli.ps()["alpha"]["pid"] != applied["pid"]


def test_a_broken_config_is_reported_and_the_instance_keeps_running(
    cli: Cli, tiny_model: Path, fake_binary: Path
) -> None:
    add(cli, "alpha", tiny_model, fake_binary)
    cli.run("up", "alpha", "-d", "--wait", "--timeout", "30", check=True)
    pid = cli.ps()["alpha"]["pid"]
    set_ctx(cli, "alpha", -5)
    result = cli.run("up", "alpha", "-d")
    assert result.returncode == 2 and "context_size" in result.stderr
    assert not gone(pid)


def test_a_removed_config_folder_is_shown_and_stopped(
    cli: Cli, tiny_model: Path, fake_binary: Path, tmp_path: Path
) -> None:
    add(cli, "alpha", tiny_model, fake_binary)
    cli.run("up", "alpha", "-d", "--wait", "--timeout", "30", check=True)
    pid = cli.ps()["alpha"]["pid"]
    shutil.move(str(cli.home / "instances" / "alpha"), str(tmp_path / "moved-away"))

    listed = cli.run("ps", "-a", "--json")
    assert listed.returncode == 0, listed.stderr
    row = {r["name"]: r for r in json.loads(listed.stdout)}["alpha"]
    assert row["config_removed"] is True and row["status"] == "running" and row["pid"] == pid
    table = cli.run("ps", "-a", check=True).stdout
    assert "config removed" in table and "down NAME" in table
    assert cli.json("describe", "alpha")["config_path"] is None

    result = cli.run("down", "alpha", check=True)
    assert "alpha stopped" in result.stdout
    wait_until(lambda: gone(pid), 10, message="the process of the removed config to end")
    assert cli.ps()["alpha"]["status"] == "stopped"


@pytest.mark.parametrize("through", ["home", "daemon"])
def test_attached_up_shows_only_new_lines_and_ctrl_c_stops_only_what_it_started(
    cli: Cli, tiny_model: Path, fake_binary: Path, through: str
) -> None:
    add(cli, "old", tiny_model, fake_binary)
    add(cli, "new", tiny_model, fake_binary)
    if through == "daemon":
        start_daemon(cli, "manual")  # the CLI then goes through its API (the log stream with new_only)
    try:
        _attached_up(cli)
    finally:
        if through == "daemon":
            cli.run("daemon", "stop", timeout=60)


def _attached_up(cli: Cli) -> None:
    cli.run("up", "old", "-d", "--wait", "--timeout", "30", check=True)
    cli.run("up", "new", "-d", "--wait", "--timeout", "30", check=True)
    cli.run("down", "new", check=True)  # "new" has a log history now: it must not be replayed
    history = Home(cli.home).log_path("new", "stderr")
    assert history.is_file()
    history.write_text(history.read_text() + "LINE-FROM-AN-EARLIER-RUN\n")
    old_pid = cli.ps()["old"]["pid"]

    env = subprocess_env({"LLAMA_ORCH_HOME": str(cli.home), "LLAMA_ORCH_NO_DAEMON": "1", "NO_COLOR": "1"})
    up = subprocess.Popen(
        [*_cli_command(), "up", "old", "new"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: cli.ps()["new"]["health"] == "healthy",
            30,
            ignore=(AssertionError,),
            message="the attached up to start 'new'",
        )
        new_pid = cli.ps()["new"]["pid"]
        up.send_signal(signal.SIGINT)
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    assert "LINE-FROM-AN-EARLIER-RUN" not in out
    assert any(line.startswith("new | ") for line in out.splitlines())  # the new run's lines are streamed
    assert "stopping new" in err
    wait_until(lambda: gone(new_pid), 15, message="the instance this up started to stop")
    assert not gone(old_pid) and cli.ps()["old"]["status"] == "running"  # it ran before: left alone


# -- with the daemon ---------------------------------------------------------------------------------------------


def start_daemon(cli: Cli, reload: str) -> str:
    port = free_port()
    settings = cli.home / "orchestrator.json"
    settings.write_text(json.dumps({"api": {"port": port}, "reload": reload}))
    settings.chmod(0o600)
    cli.daemon = True
    cli.run("daemon", "start", check=True)
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def with_daemon(cli: Cli):
    yield cli
    cli.run("daemon", "stop", timeout=60)
    cli.run("down", "--all", "--timeout", "1", timeout=120)


def test_up_through_the_daemon_recreates_and_reload_applies(
    with_daemon: Cli, tiny_model: Path, fake_binary: Path
) -> None:
    cli = with_daemon
    a = add(cli, "alpha", tiny_model, fake_binary)
    url = start_daemon(cli, "manual")
    cli.run("up", "alpha", "-d", "--wait", "--timeout", "30", check=True)
    pid = cli.ps()["alpha"]["pid"]

    set_ctx(cli, "alpha", 1024)
    assert wait_until(lambda: cli.ps()["alpha"]["config_changed"], 10)  # manual: shown, not applied
    result = cli.run("up", "alpha", "-d", "--wait", "--timeout", "30", check=True)  # through POST /api/plan, /recreate
    assert "alpha recreated" in result.stdout
    row = cli.ps()["alpha"]
    assert row["pid"] != pid and not row["config_changed"] and n_ctx(a["server"]["port"]) == 1024
    schema = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert "/api/plan" in schema and "/api/instances/{name}/recreate" in schema and "/api/daemon/reload" in schema

    # manual mode: a new autostart instance waits for `daemon reload`
    add(cli, "beta", tiny_model, fake_binary, autostart=True)
    set_ctx(cli, "alpha", 2048)
    pid = cli.ps()["alpha"]["pid"]
    assert cli.ps()["beta"]["status"] == "stopped"
    cli.run("daemon", "reload", check=True)
    wait_until(lambda: cli.ps()["beta"]["status"] in ("starting", "running"), 20, message="beta started by reload")
    wait_until(
        lambda: (r := cli.ps()["alpha"])["pid"] not in (None, pid) and not r["config_changed"],
        30,
        message="alpha recreated by reload",
    )
    wait_until(lambda: n_ctx(a["server"]["port"]) == 2048, 30, ignore=(httpx.HTTPError, KeyError, ValueError))


def test_daemon_reload_without_an_api_is_sighup(with_daemon: Cli, tiny_model: Path, fake_binary: Path) -> None:
    cli = with_daemon
    settings = cli.home / "orchestrator.json"
    settings.write_text(json.dumps({"api": {"enabled": False}}))  # reload: manual, the default
    settings.chmod(0o600)
    cli.daemon = True
    cli.run("daemon", "start", check=True)
    add(cli, "fresh", tiny_model, fake_binary, autostart=True)
    assert cli.ps()["fresh"]["status"] == "stopped"  # manual: a new autostart instance waits for a reload
    result = cli.run("daemon", "reload", check=True)
    assert "SIGHUP" in result.stdout
    wait_until(lambda: cli.ps()["fresh"]["status"] in ("starting", "running"), 20, message="fresh started by SIGHUP")


def test_auto_reload_applies_changes_and_removals_by_itself(
    with_daemon: Cli, tiny_model: Path, fake_binary: Path, tmp_path: Path
) -> None:
    cli = with_daemon
    a = add(cli, "alpha", tiny_model, fake_binary)
    add(cli, "gone", tiny_model, fake_binary)
    start_daemon(cli, "auto")
    cli.run("up", "alpha", "gone", "-d", "--wait", "--timeout", "30", check=True)
    rows = cli.ps()
    pid, gone_pid = rows["alpha"]["pid"], rows["gone"]["pid"]

    set_ctx(cli, "alpha", 1024)
    shutil.move(str(cli.home / "instances" / "gone"), str(tmp_path / "gone-away"))
    add(cli, "fresh", tiny_model, fake_binary, autostart=True)

    wait_until(
        lambda: (r := cli.ps()["alpha"])["pid"] not in (None, pid) and r["health"] == "healthy",
        40,
        message="alpha recreated by the daemon",
    )
    assert n_ctx(a["server"]["port"]) == 1024 and not cli.ps()["alpha"]["config_changed"]
    wait_until(lambda: gone(gone_pid), 30, message="the instance whose config was removed to be stopped")
    wait_until(lambda: cli.ps()["fresh"]["status"] in ("starting", "running"), 30, message="fresh autostarted")
    assert any(e["kind"] == "reconcile" and e["instance"] == "gone" for e in events(cli))


# -- replicas: one at a time, drained first ------------------------------------------------------------------------


class RecordingDrainer:
    """The router's side of a recreate, as ``services.instances_port.Drainer``: records what it saw when called."""

    def __init__(self, port_of: dict[str, int]) -> None:
        self.port_of = port_of
        self.calls: list[tuple[str, str, bool]] = []  # (call, name, its /health answered 200 at that moment)

    def healthy(self, name: str) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port_of[name]}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def drain(self, name: str, timeout: float) -> None:
        self.calls.append(("drain", name, self.healthy(name)))

    def undrain(self, name: str) -> None:
        self.calls.append(("undrain", name, self.healthy(name)))


def test_recreate_drains_first_and_undrains_once_healthy(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.instances_port import LocalInstances

    doc = add(cli, "r1", tiny_model, fake_binary, aliases=["chat"])
    cli.run("up", "r1", "-d", "--wait", "--timeout", "30", check=True)
    old_pid = cli.ps()["r1"]["pid"]
    set_ctx(cli, "r1", 1024)
    drainer = RecordingDrainer({"r1": doc["server"]["port"]})
    port = LocalInstances(InstanceService(Home(cli.home)), drainer=drainer)

    outcome = port.recreate("r1", timeout=30)

    # drained while the old process still served; routed to again only once the new one answers
    assert drainer.calls == [("drain", "r1", True), ("undrain", "r1", True)]
    assert outcome["old_pid"] == old_pid and outcome["pid"] != old_pid and outcome["healthy"]
    assert outcome["changes"] == ["model.context_size"] and n_ctx(doc["server"]["port"]) == 1024


def test_up_recreates_replicas_one_at_a_time(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    # Each new process loads for 2 s (503): without waiting, both replicas would be down at once for that long.
    slow = {"FAKE_LLAMA_LOAD_SECONDS": "2"}
    ports = {
        n: add(cli, n, tiny_model, fake_binary, aliases=["chat"], env=slow)["server"]["port"] for n in ("r1", "r2")
    }
    cli.run("up", "r1", "r2", "-d", "--wait", "--timeout", "30", check=True)
    for name in ports:
        set_ctx(cli, name, 1024)
    watcher = RecordingDrainer(ports)
    samples: list[tuple[float, bool]] = []  # (time, some replica answered 200)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), any(watcher.healthy(n) for n in ports)))
            done.wait(0.02)  # sampling the replicas' health while the `up` runs

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        result = cli.run("up", "r1", "r2", "-d", timeout=120, check=True)
    finally:
        done.set()
        thread.join()
    assert result.stdout.count("recreated (pid") == 2
    # No outage: a loaded machine may fail a single sample, never the seconds a replica takes to load.
    assert longest_outage(samples) < 1.0, samples
    assert all(n_ctx(p) == 1024 for p in ports.values())


def longest_outage(samples: list[tuple[float, bool]]) -> float:
    longest, began = 0.0, None
    for at, up in samples:
        if not up and began is None:
            began = at
        elif up and began is not None:
            longest, began = max(longest, at - began), None
    if began is not None:
        longest = max(longest, samples[-1][0] - began)
    return longest


def test_auto_reload_leaves_an_invalid_config_running_and_says_so_once(
    with_daemon: Cli, tiny_model: Path, fake_binary: Path
) -> None:
    cli = with_daemon
    add(cli, "alpha", tiny_model, fake_binary)
    start_daemon(cli, "auto")
    cli.run("up", "alpha", "-d", "--wait", "--timeout", "30", check=True)
    pid = cli.ps()["alpha"]["pid"]
    log = cli.home / "state" / "daemon.log"

    def passes() -> int:
        return log.read_text().count("reconcile pass done")

    set_ctx(cli, "alpha", -5)
    wait_until(lambda: passes() >= 1, 30, message="the reconcile pass after the edit")
    set_ctx(cli, "alpha", -6)  # a second edit, still broken: news again
    wait_until(lambda: passes() >= 2, 30, message="the reconcile pass after the second edit")
    invalid = [e for e in events(cli, "alpha") if e["kind"] == "config-invalid"]
    assert len(invalid) == 2, invalid  # one per version of the file, not one per tick or pass
    row = cli.ps()["alpha"]
    assert row["pid"] == pid and row["status"] == "invalid-config" and not gone(pid)  # it keeps running
