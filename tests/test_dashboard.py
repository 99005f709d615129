"""The dashboard (`llama-orch dashboard`), driven headless with Textual's pilot.

Deterministic tests freeze time, CPU/memory and the daemon lookup through ``Backend``'s providers; the lifecycle test
starts and stops a real fake llama-server with the S and D keys; the remote tests do it through a real daemon's API,
as `llama-orch --host URL dashboard` does, and check the daemon's own account. Waits poll a condition with a deadline
(``pilot.pause``), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psutil
import pytest
from rich.console import Console
from textual.message import Message
from textual.widgets import DataTable, RichLog, Static

from conftest import instance_doc
from helpers import free_port, time_scale
from llama_orchestrator.adapters.api_client import RemoteInstances
from llama_orchestrator.adapters.home import Home
from llama_orchestrator.services.daemon_control import DaemonInfo
from llama_orchestrator.services.instances import InstanceService
from llama_orchestrator.services.instances_port import LocalInstances
from llama_orchestrator.tui.app import ActionDone, DashboardApp
from llama_orchestrator.tui.data import Backend, InstanceLine, PsutilSampler, Usage, format_bytes, format_cpu
from llama_orchestrator.tui.screens import ConfirmScreen, DetailScreen, LogScreen, render_detail
from test_api import Daemon, add_instance, start_daemon

NOW = 1_700_000_000.0
SIZE = (120, 40)
SNAPSHOT = Path(__file__).parent / "snapshots" / "dashboard_main.svg"
posix_only = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")


FIXED_USAGE = Usage(12.5, 512 * 1024 * 1024)  # frozen: one shared default is safe


class FixedSampler:
    def __init__(self, usage: Usage = FIXED_USAGE) -> None:
        self.usage = usage
        self.sampled: list[tuple[int, float]] = []

    def sample(self, pid: int, create_time: float) -> Usage:
        self.sampled.append((pid, create_time))
        return self.usage

    def keep_only(self, alive: set[tuple[int, float]]) -> None:
        pass


def utc(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def frozen_backend(service: InstanceService, daemon: DaemonInfo | None = None) -> Backend:
    return Backend(
        LocalInstances(service, probe_starting=False),
        sampler=FixedSampler(),
        clock=lambda: NOW,
        daemon=lambda: daemon,
        format_time=utc,
    )


def seed_three(home: Path, model: Path) -> InstanceService:
    """Three instances as in the acceptance: alpha running (this test process stands in for its server), beta
    stopped, gamma crash-looping (backoff after 3 restarts); plus a few events at fixed times."""
    service = InstanceService(Home(home))
    for index, name in enumerate(("alpha", "beta", "gamma")):
        path = home / "instances" / name / "config.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(instance_doc(name, model, 18081 + index, Path("llama-server"))))
    me = psutil.Process()
    service.store.transition(
        "alpha", None, "running", health="healthy", pid=me.pid, create_time=me.create_time(), port=18081,
        started_at=NOW - 3725, health_checked_at=NOW - 2, health_latency_ms=3.0,
    )  # fmt: skip
    service.store.transition("beta", None, "stopped", stopped_at=NOW - 600, exit_code=0)
    service.store.transition("gamma", None, "backoff", restarts=3, exit_code=3, last_error="exited with code 3")
    for offset, name, kind, message in [
        (-3725, "alpha", "started", "pid 4242 on port 18081"),
        (-3720, "alpha", "healthy", "answering on port 18081"),
        (-600, "beta", "stopped", "pid 4343 stopped gracefully"),
        (-30, "gamma", "exited", "process 4444 exited with code 3"),
        (-29, "gamma", "backoff", "crashed: restart 3 of 5 in 40 s"),
    ]:
        service.store.add_event(name, kind, message, NOW + offset)
    return service


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


async def until(
    pilot,
    predicate: Callable[[], object],
    timeout: float = 20.0,  # noqa: ASYNC109 - a polling helper: its failure names what never came, and how long
    what: str = "condition",
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await pilot.pause(0.05)


def plain(renderable: object) -> str:
    console = Console(width=SIZE[0], record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def texts(line: InstanceLine) -> list[str]:
    return [c.text for c in line.cells]


def collect(into: list[ActionDone]) -> Callable[[Message], None]:
    """A pilot message hook that keeps the results of start and stop."""
    return lambda message: into.append(message) if isinstance(message, ActionDone) else None


def cell(app: DashboardApp, name: str, column: str) -> str:
    return str(app.query_one(DataTable).get_cell(name, column))


# -- pure helpers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"), [(None, "-"), (512, "512B"), (2048, "2K"), (5 * 1024**2, "5.0M"), (3 * 1024**3 + 1, "3.0G")]
)
def test_format_bytes(value: int | None, text: str) -> None:
    assert format_bytes(value) == text


def test_format_cpu() -> None:
    assert format_cpu(None) == "-" and format_cpu(3.14159) == "3.1%"


def test_psutil_sampler_needs_two_samples_for_cpu_and_counts_memory() -> None:
    me = psutil.Process()
    sampler = PsutilSampler()
    first = sampler.sample(me.pid, me.create_time())
    assert first.cpu_percent is None and first.memory_bytes and first.memory_bytes > 0
    second = sampler.sample(me.pid, me.create_time())
    assert second.cpu_percent is not None
    sampler.keep_only(set())
    assert sampler.sample(me.pid, me.create_time()).cpu_percent is None  # forgotten: starts over
    assert sampler.sample(2**22 + 12345, 1.0) == Usage(None, None)  # no such process


def test_snapshot_rows_statuses_and_events(home: Path, tiny_model: Path) -> None:
    backend = frozen_backend(seed_three(home, tiny_model))
    snapshot = backend.snapshot()
    by_name = {line.name: line for line in snapshot.lines}
    assert [line.name for line in snapshot.lines] == ["alpha", "beta", "gamma"]
    alpha, beta, gamma = by_name["alpha"], by_name["beta"], by_name["gamma"]
    assert [line.cell("status").style for line in (alpha, beta, gamma)] == ["green", "dim", "yellow"]
    assert texts(alpha) == ["alpha", "running", "healthy", "18081", "12.5%", "512.0M", "1h 2m", "0", "tiny.gguf"]
    assert texts(beta) == ["beta", "stopped", "-", "18082", "-", "-", "-", "0", "tiny.gguf"]
    assert texts(gamma) == ["gamma", "backoff", "-", "18083", "-", "-", "-", "3", "tiny.gguf"]
    assert snapshot.daemon is None and "Supervision is off" in snapshot.notice
    assert [e.kind for e in snapshot.events] == ["started", "healthy", "stopped", "exited", "backoff"]
    assert snapshot.events[0].time == utc(NOW - 3725)
    assert backend.snapshot(after_event_id=snapshot.events[-1].id).events == ()


def test_detail_has_config_health_and_log_lines(home: Path, tiny_model: Path) -> None:
    service = seed_three(home, tiny_model)
    service.home.log_path("gamma", "stderr").parent.mkdir(parents=True, exist_ok=True)
    service.home.log_path("gamma", "stderr").write_text("loading model\ncrash!\n")
    detail = frozen_backend(service).detail("gamma")
    assert detail.status == "backoff"
    assert '"port": 18083' in detail.config
    assert [e.kind for e in detail.history] == ["exited", "backoff"]
    assert detail.stderr == ("loading model", "crash!") and detail.stdout == ()
    assert dict(detail.runtime)["last error"] == "exited with code 3"
    alpha = frozen_backend(service).detail("alpha")
    assert dict(alpha.health)["latency"] == "3 ms" and dict(alpha.runtime)["uptime"] == "1h 2m"


# -- the app, frozen -----------------------------------------------------------------------------------------------


def test_main_screen_snapshot(home: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main screen at 120x40 as an SVG fixture. After a deliberate UI change (or a Textual upgrade), rewrite it
    with ``DASHBOARD_SNAPSHOT_UPDATE=1 pytest tests/test_dashboard.py -k snapshot`` and look at the SVG."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    app = DashboardApp(frozen_backend(seed_three(home, tiny_model)), refresh_s=3600)

    async def go() -> str:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            await pilot.pause()
            return app.export_screenshot(title="llama-orch dashboard")

    svg = asyncio.run(go())
    if os.environ.get("DASHBOARD_SNAPSHOT_UPDATE") or not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(svg, encoding="utf-8")
        if not os.environ.get("DASHBOARD_SNAPSHOT_UPDATE"):
            pytest.fail(f"no snapshot yet: wrote {SNAPSHOT}; check it and run again")
    expected = SNAPSHOT.read_text(encoding="utf-8")
    if svg != expected:
        actual = tmp_path / "dashboard_main.actual.svg"
        actual.write_text(svg, encoding="utf-8")
        pytest.fail(f"the main screen differs from {SNAPSHOT}; this run's screen is {actual}")


def test_table_shows_all_three_with_colours_and_the_notice(home: Path, tiny_model: Path) -> None:
    app = DashboardApp(frozen_backend(seed_three(home, tiny_model)), refresh_s=3600)

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            table = app.query_one(DataTable)
            assert table.row_count == 3
            styles = {name: table.get_cell(name, "status").style for name in ("alpha", "beta", "gamma")}
            assert styles == {"alpha": "green", "beta": "dim", "gamma": "yellow"}
            assert "Supervision is off" in str(app.query_one("#notice", Static).render())
            events = app.query_one("#events", RichLog)
            assert len(events.lines) == 5
            footer_keys = {b.key for (_, b, enabled, _) in app.active_bindings.values() if enabled and b.show}
            assert {"q", "r", "s", "d", "l", "up", "enter"} <= footer_keys

    run(go())


def test_refresh_updates_cells_in_place_and_keeps_the_cursor(home: Path, tiny_model: Path) -> None:
    service = seed_three(home, tiny_model)
    app = DashboardApp(frozen_backend(service), refresh_s=3600)

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            table = app.query_one(DataTable)
            await pilot.press("down", "down")
            assert app.selected() == "gamma"
            rows_before = list(table.rows)
            service.store.transition("beta", None, "failed", last_error="gave up after 5 restarts")
            service.store.add_event("beta", "failed", "crashed: gave up after 5 restarts", NOW)
            await pilot.press("r")
            await until(pilot, lambda: cell(app, "beta", "status") == "failed", what="beta failed")
            assert table.get_cell("beta", "status").style == "bold red"
            assert list(table.rows) == rows_before  # same row keys, same order: nothing rebuilt
            assert app.selected() == "gamma" and table.cursor_row == 2
            assert len(app.query_one("#events", RichLog).lines) == 6  # the new event appended

    run(go())


def test_daemon_notice_when_supervised(home: Path, tiny_model: Path) -> None:
    daemon = DaemonInfo(pid=4321, create_time=0.0, started_at=NOW - 90, version="0.1.0")
    app = DashboardApp(frozen_backend(seed_three(home, tiny_model), daemon=daemon), refresh_s=3600)

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            notice = str(app.query_one("#notice", Static).render())
            assert "Supervised by the daemon (pid 4321, up 1m 30s)" in notice

    run(go())


def test_enter_opens_the_detail_and_escape_returns(home: Path, tiny_model: Path) -> None:
    app = DashboardApp(frozen_backend(seed_three(home, tiny_model)), refresh_s=0.1)

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            await pilot.press("down", "down", "enter")
            await until(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen.detail, what="the detail")
            screen = app.screen
            assert screen.detail.name == "gamma"
            text = plain(render_detail(screen.detail))
            assert "Health history" in text and "backoff" in text and '"port": 18083' in text
            refreshes = app.refreshes
            await until(pilot, lambda: app.refreshes > refreshes + 2, what="refreshes behind the detail")
            shown = {b.key for (_, b, enabled, _) in app.active_bindings.values() if enabled and b.show}
            assert "s" not in shown and "d" not in shown  # start/stop act on the table, not shown here
            await pilot.press("s")
            assert app.busy == set()
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, DetailScreen), what="back to the table")

    run(go())


def test_stop_asks_first_and_cancel_does_nothing(home: Path, tiny_model: Path) -> None:
    backend = frozen_backend(seed_three(home, tiny_model))
    stops: list[str] = []
    backend.stop = lambda name: stops.append(name) or f"stopped {name}"  # type: ignore[method-assign]
    app = DashboardApp(backend, refresh_s=3600)

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
            assert "Stop alpha?" in str(app.screen.query_one("#question").render())
            await pilot.press("n")
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="the dialog to close")
            await pilot.press("d", "enter")  # Enter presses the focused button, which is Cancel
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), what="the dialog to close")
            await app.workers.wait_for_complete()
            assert stops == []
            await pilot.press("d", "y")
            await until(pilot, lambda: stops == ["alpha"], what="the stop")

    run(go())


def test_quit_waits_for_a_stop_in_flight(home: Path, tiny_model: Path) -> None:
    backend = frozen_backend(seed_three(home, tiny_model))
    gate = threading.Event()
    backend.stop = lambda name: f"stopped {name}" if gate.wait(20) else "gate timeout"  # type: ignore[method-assign]
    app = DashboardApp(backend, refresh_s=3600)

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            await pilot.press("d", "y")
            await until(pilot, lambda: app.busy == {"alpha"}, what="the stop to begin")
            await pilot.press("q")
            await pilot.pause(0.2)
            assert app.return_code is None  # still running, showing that it waits
            gate.set()
            await until(pilot, lambda: app.return_code == 0, what="the app to quit after the stop")

    run(go())


def test_start_error_is_shown_and_the_ui_keeps_working(home: Path, tiny_model: Path) -> None:
    service = seed_three(home, tiny_model)
    (home / "instances" / "beta" / "config.json").write_text(
        json.dumps(instance_doc("beta", home / "missing.gguf", 18082, Path("llama-server")))
    )
    done: list[ActionDone] = []
    app = DashboardApp(frozen_backend(service), refresh_s=3600)

    async def go() -> None:
        async with app.run_test(size=SIZE, message_hook=collect(done)) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            await pilot.press("down", "s")
            await until(pilot, lambda: done, what="the start to finish")
            assert not done[0].ok and "missing.gguf" in done[0].message and "not found" in done[0].message
            assert app.busy == set()
            await pilot.press("s")  # not busy any more: a second try runs again
            await until(pilot, lambda: len(done) == 2, what="the second start")

    run(go())


def test_fifty_instances_stay_responsive(home: Path, tiny_model: Path) -> None:
    service = InstanceService(Home(home))
    for index in range(50):
        name = f"inst-{index:02d}"
        path = home / "instances" / name / "config.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(instance_doc(name, tiny_model, 20000 + index, Path("llama-server"))))
    app = DashboardApp(frozen_backend(service), refresh_s=0.2)

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.refreshes >= 3, what="three refreshes")
            assert app.query_one(DataTable).row_count == 50
            started = time.monotonic()
            await pilot.press(*["down"] * 30)
            assert app.selected() == "inst-30"
            elapsed = time.monotonic() - started
            # Keys are handled while refreshes run in threads.
            assert elapsed < 5 * time_scale(), f"30 keys took {elapsed:.1f} s"

    run(go())


# -- the app with a real (fake) llama-server -----------------------------------------------------------------------


@posix_only
def test_keys_start_and_stop_a_fake_server_and_show_its_log(
    home: Path, cli, tiny_model: Path, fake_binary: Path
) -> None:
    port = free_port()
    cli.write_config("alpha", instance_doc("alpha", tiny_model, port, fake_binary))
    service = InstanceService(Home(home))
    app = DashboardApp(Backend(LocalInstances(service), daemon=lambda: None, stop_timeout=10), refresh_s=0.2)
    done: list[ActionDone] = []

    async def go() -> None:
        async with app.run_test(size=SIZE, message_hook=collect(done)) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            assert cell(app, "alpha", "status") == "stopped"

            await pilot.press("s")
            await until(pilot, lambda: cell(app, "alpha", "status") == "running", timeout=30, what="alpha running")
            await until(pilot, lambda: done, what="the start to finish")
            assert done[-1].ok, done[-1].message
            assert cell(app, "alpha", "health") == "healthy" and cell(app, "alpha", "uptime") != "-"
            await until(pilot, lambda: cell(app, "alpha", "cpu") != "-", what="a CPU sample")
            assert cell(app, "alpha", "mem").endswith(("M", "K"))

            await pilot.press("l")
            await until(pilot, lambda: isinstance(app.screen, LogScreen), what="the log screen")
            log_screen = app.screen
            await until(pilot, lambda: log_screen.lines_shown > 0, what="log lines")
            shown_before = log_screen.lines_shown
            # the fake logs each request; sent from a thread, so the dashboard's loop keeps running
            await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/v1/models", timeout=5)
            await until(pilot, lambda: log_screen.lines_shown > shown_before, what="a followed line")
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, LogScreen), what="back to the table")

            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the confirmation")
            await pilot.press("y")
            await until(pilot, lambda: cell(app, "alpha", "status") == "stopped", timeout=30, what="alpha stopped")
            await app.workers.wait_for_complete()
            assert done[-1].verb == "stop" and done[-1].ok, done[-1].message
            assert cell(app, "alpha", "cpu") == "-"
            kinds = [line.text.split()[2] for line in app.query_one("#events", RichLog).lines]
            assert kinds[-1] == "stopped" and "started" in kinds

            await pilot.press("q")
        assert app.return_code in (0, None)

    run(go())
    assert service.store.get("alpha").status == "stopped"


def test_without_a_daemon_the_dashboard_reconciles_as_ps_does(home: Path, tiny_model: Path) -> None:
    # With a daemon the dashboard goes through its API (the CLI's port: tests below), and the daemon reconciles; on
    # the home alone, the dashboard does, as `ps` does.
    service = seed_three(home, tiny_model)
    service.store.update("alpha", pid=2**22 + 12345, create_time=1.0)  # a process that is gone
    alone = {line.name: line.status for line in frozen_backend(service).snapshot().lines}
    assert alone == {"alpha": "exited", "beta": "stopped", "gamma": "backoff"}
    assert frozen_backend(service).detail("alpha").status == "exited"


# -- another node's daemon, through its API (--host) ---------------------------------------------------------------

CONTROL_KEY = "dashboard-control-key"


def listed(daemon: Daemon) -> dict[str, dict]:
    """The daemon's own account of its instances (not the dashboard's)."""
    with daemon.client() as api:
        return {r["name"]: r for r in api.get("/api/instances").json()}


@posix_only
def test_the_dashboard_shows_and_drives_another_nodes_daemon(cli, tiny_model: Path, fake_binary: Path) -> None:
    daemon = start_daemon(cli, control_keys=[CONTROL_KEY])
    try:
        port = add_instance(cli, "alpha", tiny_model, fake_binary)
        remote = RemoteInstances.connect(daemon.url, CONTROL_KEY)  # what `--host URL --api-key K` builds
        app = DashboardApp(Backend(remote, same_machine=False, stop_timeout=10), refresh_s=0.2)
        done: list[ActionDone] = []
        _drive_remote(app, daemon, port, done)
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)


def _drive_remote(app: DashboardApp, daemon: Daemon, port: int, done: list[ActionDone]) -> None:
    async def state(name: str) -> dict:
        return (await asyncio.to_thread(listed, daemon))[name]

    async def daemon_says(pilot, what: Callable[[dict], bool], description: str) -> dict:
        deadline = time.monotonic() + 30
        while True:
            record = await state("alpha")
            if what(record):
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon never said {description}: {record}")
            await pilot.pause(0.1)

    async def go() -> None:
        async with app.run_test(size=SIZE, message_hook=collect(done)) as pilot:
            await until(pilot, lambda: app.refreshes >= 1, what="the first refresh")
            assert cell(app, "alpha", "status") == "stopped" and cell(app, "alpha", "port") == str(port)
            notice = str(app.query_one("#notice", Static).render())
            assert f"Supervised by the daemon at {daemon.url} (pid {daemon.pid()}" in notice

            await pilot.press("s")
            started = await daemon_says(pilot, lambda r: r["status"] == "running", "alpha running")
            # The daemon spawned it: the key reached that node, and nothing ran here but the dashboard.
            assert psutil.Process(started["pid"]).ppid() == daemon.pid()
            await until(pilot, lambda: cell(app, "alpha", "status") == "running", what="alpha running on screen")
            await until(pilot, lambda: done, what="the start to finish")
            assert done[-1].ok, done[-1].message
            assert cell(app, "alpha", "cpu") == "—" and cell(app, "alpha", "mem") == "—"  # another node's process

            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, DetailScreen) and app.screen.detail, what="the detail")
            detail = app.screen.detail
            assert dict(detail.runtime)["pid"] == str(started["pid"]) and f'"port": {port}' in detail.config
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, DetailScreen), what="back to the table")

            await pilot.press("h")
            await until(pilot, lambda: done[-1].verb == "health", what="the health probe")
            assert done[-1].ok and done[-1].message.startswith("alpha: healthy"), done[-1].message

            await pilot.press("l")
            await until(pilot, lambda: isinstance(app.screen, LogScreen), what="the log screen")
            log_screen = app.screen
            await until(pilot, lambda: log_screen.lines_shown > 0, what="log lines through the API")
            shown_before = log_screen.lines_shown
            await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/v1/models", timeout=5)
            await until(pilot, lambda: log_screen.lines_shown > shown_before, what="a followed line")
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, LogScreen), what="back to the table")

            await pilot.press("ctrl+r", "y")
            await daemon_says(pilot, lambda r: r["pid"] not in (None, started["pid"]), "alpha restarted")
            await until(pilot, lambda: done[-1].verb == "restart", what="the restart to finish")
            assert done[-1].ok, done[-1].message

            await pilot.press("d", "y")
            await daemon_says(pilot, lambda r: r["status"] == "stopped", "alpha stopped")
            await until(pilot, lambda: cell(app, "alpha", "status") == "stopped", what="alpha stopped on screen")
            await until(pilot, lambda: done[-1].verb == "stop", what="the stop to finish")
            assert done[-1].ok, done[-1].message
            kinds = [line.text.split()[2] for line in app.query_one("#events", RichLog).lines]
            assert "started" in kinds and "stopped" in kinds  # the daemon's events, polled through its API
            await pilot.press("q")
        assert app.return_code in (0, None)

    run(go())


@posix_only
def test_cli_dashboard_with_host_builds_on_that_daemon(
    cli, tmp_path: Path, tiny_model: Path, fake_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`llama-orch --host URL dashboard` is not refused: its app is built on the remote port (run in-process, with
    the app's ``run`` replaced: the pilot test above drives such an app)."""
    from llama_orchestrator.cli import commands

    daemon = start_daemon(cli, control_keys=[CONTROL_KEY])
    built: list[DashboardApp] = []
    monkeypatch.setattr(DashboardApp, "run", lambda self, *args, **kwargs: built.append(self))
    for variable in ("LLAMA_ORCH_HOST", "LLAMA_ORCH_API_KEY", "LLAMA_ORCH_HOME"):
        monkeypatch.delenv(variable, raising=False)
    elsewhere = tmp_path / "elsewhere"  # another machine's home: empty, no daemon
    elsewhere.mkdir()
    try:
        add_instance(cli, "alpha", tiny_model, fake_binary)
        for argv, same_machine in [
            (["--home", str(elsewhere), "--host", daemon.url, "--api-key", CONTROL_KEY, "dashboard"], False),
            (["--home", str(cli.home), "dashboard"], True),  # this home's daemon: through its API as well
        ]:
            monkeypatch.setattr(commands, "_state", {})
            commands.app(argv, standalone_mode=False)
            backend = built[-1].backend
            assert isinstance(backend.port, RemoteInstances) and backend.port.origin == daemon.url
            assert backend.same_machine is same_machine
            snapshot = backend.snapshot()
            assert [line.name for line in snapshot.lines] == ["alpha"] and snapshot.daemon is not None
            assert snapshot.daemon.pid == daemon.pid()
        assert len(built) == 2
    finally:
        cli.run("daemon", "stop", timeout=60)
