"""The router's phase machine, driven through the router's own code paths (request path, reload, ttl, failures,
drain) on a scripted InstanceService and a fake clock: every edge it takes must be in the table of
``domain.router_phases``, every row of the table must be reached, and an edge outside it is refused and logged.

No processes: the service is a script (honcho's way); the one HTTP call the router makes itself (the re-probe of
a replica taken out) goes to a real socket served in the test's loop."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from helpers import free_port
from llama_orchestrator.adapters.config_files import load_config
from llama_orchestrator.adapters.home import Home
from llama_orchestrator.adapters.store import InstanceRow
from llama_orchestrator.domain.errors import StartError
from llama_orchestrator.domain.router_phases import TRANSITIONS, Phase
from llama_orchestrator.domain.settings import RouterSettings
from llama_orchestrator.services import router as router_module
from llama_orchestrator.services.instances import StartOutcome
from llama_orchestrator.services.router import RouteError, Router

NAME = "alpha"


@dataclass
class ScriptedService:
    """What the router asks of InstanceService, answered from ``rows``; the next start/stop can be made to fail."""

    home: Home
    rows: dict[str, InstanceRow] = field(default_factory=dict)
    fail_start: bool = False
    fail_stop: bool = False
    runs_after_failure: bool = False
    next_pid: int = 100

    def names(self) -> list[str]:
        return self.home.instance_names()

    def load(self, name: str):
        return load_config(self.home.config_path(name), expected_name=name)

    def refresh(self, name: str) -> InstanceRow:
        return self.rows.get(name) or InstanceRow(name=name)

    def run(self, name: str) -> InstanceRow:
        """A process appears (started by us, or by someone else)."""
        self.next_pid += 1
        row = self.rows[name] = InstanceRow(
            name=name, status="running", health="healthy", pid=self.next_pid, port=self.load(name).server.port
        )
        return row

    def gone(self, name: str) -> None:
        self.rows[name] = InstanceRow(name=name, status="exited", exit_code=1)

    def start(self, name: str, *, by_person: bool = True) -> StartOutcome:
        row = self.refresh(name)
        if row.status == "running":
            return StartOutcome(name, True, row)
        if self.fail_start:
            self.fail_start = False
            if self.runs_after_failure:
                self.run(name)
            raise StartError(f"{name}: scripted start failure")
        return StartOutcome(name, False, self.run(name))

    def wait_healthy(self, name: str, timeout: float, **_: object) -> InstanceRow:
        return self.refresh(name)

    def stop(self, name: str, timeout: float = 10.0, *, by_user: bool = True) -> InstanceRow:
        if self.fail_stop:
            self.fail_stop = False
            raise StartError(f"{name}: scripted stop failure")
        self.rows[name] = InstanceRow(name=name, status="stopped", stopped_by_user=by_user)
        return self.rows[name]


@pytest.fixture
def scripted(tmp_path: Path, tiny_model: Path) -> tuple[ScriptedService, int]:
    home = Home(tmp_path / "home")
    port = free_port()
    path = home.config_path(NAME)
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "name": NAME,
                "model": {"path": str(tiny_model)},
                "server": {"port": port},
                "ttl": 5,
                "aliases": ["shared"],
            }
        )
    )
    return ScriptedService(home), port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def health_server(port: int) -> web.AppRunner:
    app = web.Application()

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def test_every_row_of_the_phase_table_is_reached_and_no_edge_outside_it(scripted, caplog, monkeypatch) -> None:
    service, port = scripted
    monkeypatch.setattr(router_module, "REPROBE_S", 0.01)
    clock = Clock()
    taken: list[tuple[Phase, Phase]] = []
    router = Router(
        lambda: service,
        RouterSettings(),
        clock=clock,
        tick_s=3600,
        on_phase=lambda _name, old, new: taken.append((old, new)),
    )

    async def scenario() -> None:
        runner = await health_server(port)
        await router.startup()
        try:
            inst = router._instances[NAME]
            assert inst.phase is Phase.stopped

            async def request() -> None:  # what a request does once admitted: make the instance ready
                await router._ensure_ready(inst, clock())

            async def ttl_unload() -> None:
                clock.now += 10
                router._unload_idle()
                assert inst.phase is Phase.stopping
                await asyncio.gather(inst.task, return_exceptions=True)

            await request()  # stopped -> starting -> ready
            assert inst.phase is Phase.ready and inst.pid == service.rows[NAME].pid
            inst.last_used = clock()
            await ttl_unload()  # ready -> stopping -> stopped
            assert inst.phase is Phase.stopped and service.rows[NAME].status == "stopped"

            service.run(NAME)
            await router._reload()  # stopped -> active: started by someone else
            assert inst.phase is Phase.active
            await request()  # active -> starting -> ready (a start of what runs: only the health wait)
            assert inst.phase is Phase.ready

            service.run(NAME)  # restarted behind our back: another pid
            await router._reload()  # ready -> active
            assert inst.phase is Phase.active
            service.fail_stop = True
            await ttl_unload()  # active -> stopping -> active: the stop failed, the process runs
            assert inst.phase is Phase.active

            router._mark_down(inst, "scripted", connect=False)
            await asyncio.wait_for(inst.reprobe, 5)  # active -> ready: the re-probe answered 200
            assert inst.phase is Phase.ready and inst.up

            router._mark_down(inst, "scripted connect error", connect=True)  # ready -> active
            assert inst.phase is Phase.active
            service.gone(NAME)
            await router._reload()  # active -> stopped
            assert inst.phase is Phase.stopped

            await request()
            service.gone(NAME)
            await router._reload()  # ready -> stopped: a crash, a CLI down
            assert inst.phase is Phase.stopped

            service.fail_start, service.runs_after_failure = True, False
            with pytest.raises(RouteError, match="scripted start failure"):
                await request()  # stopped -> starting -> stopped: the start failed
            assert inst.phase is Phase.stopped
            service.fail_start, service.runs_after_failure = True, True
            with pytest.raises(RouteError, match="scripted start failure"):
                await request()  # stopped -> starting -> active: failed, but a process runs
            assert inst.phase is Phase.active
        finally:
            await router.shutdown()
            await runner.cleanup()

    asyncio.run(scenario())
    assert set(taken) <= set(TRANSITIONS), set(taken) - set(TRANSITIONS)
    assert set(TRANSITIONS) - set(taken) == set()  # every row reached
    assert [r.getMessage() for r in caplog.records if "router phase bug" in r.getMessage()] == []


def test_an_edge_outside_the_table_or_a_stale_expectation_is_refused_and_logged(scripted, caplog) -> None:
    service, _ = scripted
    taken: list[tuple[Phase, Phase]] = []
    router = Router(
        lambda: service,
        RouterSettings(),
        clock=Clock(),
        tick_s=3600,
        on_phase=lambda _name, old, new: taken.append((old, new)),
    )

    async def scenario() -> None:
        await router.startup()
        try:
            inst = router._instances[NAME]
            epoch = inst.epoch
            assert not router._swap(inst, Phase.stopped, Phase.ready)  # not an edge: a start comes between
            assert not router._swap(inst, Phase.active, Phase.starting)  # an edge, but it is not active
            assert inst.phase is Phase.stopped and inst.epoch == epoch
            assert router._swap(inst, Phase.stopped, Phase.active)
        finally:
            await router.shutdown()

    asyncio.run(scenario())
    bugs = [r for r in caplog.records if "router phase bug" in r.getMessage()]
    assert [r.levelname for r in bugs] == ["ERROR", "ERROR"]
    assert "not in the table" in bugs[0].getMessage() and "it is stopped" in bugs[1].getMessage()
    assert taken == [(Phase.stopped, Phase.active)]


def test_a_drained_replica_gets_no_new_requests_and_drain_waits_for_its_in_flight(scripted, caplog) -> None:
    """drain/undrain as a rolling recreate calls them: from another thread, while the loop serves requests."""
    service, _ = scripted
    other = service.home.config_path("beta")
    other.parent.mkdir(parents=True)
    doc = json.loads(service.home.config_path(NAME).read_text())
    other.write_text(json.dumps({**doc, "name": "beta", "server": {"port": free_port()}, "ttl": None}))
    clock = Clock()
    router = Router(lambda: service, RouterSettings(start_timeout=30), clock=clock, tick_s=3600)

    async def scenario() -> None:
        await router.startup()
        try:
            alpha, beta = router._instances[NAME], router._instances["beta"]
            for inst in (alpha, beta):
                service.run(inst.name)
            await router._reload()
            alpha.in_flight = 1  # a request in flight on alpha
            loop = asyncio.get_running_loop()
            drained = loop.run_in_executor(None, router.drain, NAME, 30)
            while not alpha.drained:  # noqa: ASYNC110 - set by drain() on a worker thread: no event to wait on
                await asyncio.sleep(0)
            # New requests for the alias all go to beta, even though alpha has the fewer in flight.
            beta.in_flight = 3
            picked = {(await router._route("shared", set(), clock() + 5)).name for _ in range(4)}
            assert picked == {"beta"}
            assert not drained.done()
            # A drained instance is never evicted nor unloaded for its ttl.
            clock.now += 100
            router._unload_idle()
            assert alpha.phase in (Phase.active, Phase.ready) and alpha.task is None
            # A queued request is still served by alpha (it holds no slot elsewhere and was promised this one).
            queued = loop.create_future()
            alpha.waiters.append(queued)
            router._release(alpha)  # the request in flight finishes: its slot goes to the queued one
            assert queued.done() and alpha.in_flight == 1
            await asyncio.sleep(0.05)
            assert not drained.done()
            router._release(alpha)  # the queued one finishes too: drain returns
            await asyncio.wait_for(drained, 5)

            # Recreated: another process; a request naming it waits until it is undrained, then goes to it.
            service.run(NAME)
            waiting = asyncio.ensure_future(router._route(NAME, set(), clock() + 30))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await loop.run_in_executor(None, router.undrain, NAME)
            assert (await asyncio.wait_for(waiting, 5)).name == NAME
            assert not alpha.drained and alpha.phase is Phase.ready and alpha.pid == service.rows[NAME].pid
        finally:
            await router.shutdown()

    asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records if "router phase bug" in r.getMessage()] == []


def test_a_request_for_an_instance_drained_past_the_start_timeout_is_503_with_retry_after(scripted) -> None:
    service, _ = scripted
    clock = Clock()
    router = Router(lambda: service, RouterSettings(start_timeout=1), clock=clock, tick_s=3600)

    async def scenario() -> None:
        await router.startup()
        try:
            router._instances[NAME].drained = True
            with pytest.raises(RouteError) as caught:
                await router._route(NAME, set(), clock())  # the deadline has passed
            assert caught.value.status == 503 and caught.value.retry_after == 5
            assert caught.value.code == "draining"
        finally:
            await router.shutdown()

    asyncio.run(scenario())


def test_a_drained_replica_is_neither_started_on_demand_nor_evicted(scripted) -> None:
    service, _ = scripted
    other = service.home.config_path("beta")
    other.parent.mkdir(parents=True)
    doc = json.loads(service.home.config_path(NAME).read_text())
    other.write_text(json.dumps({**doc, "name": "beta", "server": {"port": free_port()}, "ttl": None}))
    clock = Clock()
    router = Router(lambda: service, RouterSettings(), clock=clock, tick_s=3600)

    async def scenario() -> None:
        await router.startup()
        try:
            alpha, beta = router._instances[NAME], router._instances["beta"]
            service.run("beta")
            await router._reload()
            beta.in_flight = beta.limit  # full: a stopped replica that can be started would be preferred ...
            assert (await router._route("shared", set(), clock() + 5)) is alpha
            alpha.drained = True  # ... but not while drained: the request queues on beta instead
            assert (await router._route("shared", set(), clock() + 5)) is beta
            assert alpha.phase is Phase.stopped and alpha.task is None
            # And a loaded, idle, drained instance is never the one evicted to make room.
            router.settings = RouterSettings(max_loaded=1)
            beta.in_flight, alpha.drained = 0, False
            beta.drained = True
            assert router._plan(alpha) is None  # beta would be evicted, but it is drained: no room now
            beta.drained = False
            assert router._plan(alpha) == ["beta"]
        finally:
            await router.shutdown()

    asyncio.run(scenario())


def test_the_router_reads_the_supervisors_view_and_a_stale_view_never_undoes_its_own_phases(scripted) -> None:
    """With the daemon's SupervisorView the router refreshes no instance the view agrees on; where the view lags
    behind the router's own start or stop (the supervisor steps the instance later), the row is read directly."""
    from llama_orchestrator.services.supervisor_view import SupervisorView

    service, _ = scripted
    refreshed: list[str] = []
    real_refresh = service.refresh

    def counting_refresh(name: str) -> InstanceRow:
        refreshed.append(name)
        return real_refresh(name)

    clock = Clock()
    router = Router(lambda: service, RouterSettings(), clock=clock, tick_s=3600)
    view = SupervisorView()
    view.publish(InstanceRow(name=NAME, status="stopped"))
    router.view = view

    async def scenario() -> None:
        service.refresh = counting_refresh  # type: ignore[method-assign]
        await router.startup()
        try:
            inst = router._instances[NAME]
            assert inst.phase is Phase.stopped and refreshed == [], "the view agrees: nothing refreshed"

            await router._ensure_ready(inst, clock())  # our own start
            assert inst.phase is Phase.ready
            refreshed.clear()
            await router._reload()  # the view still says stopped: it is read, and our phase stands
            assert inst.phase is Phase.ready and refreshed == [NAME]

            view.publish(service.rows[NAME])  # the supervisor caught up
            refreshed.clear()
            await router._reload()
            assert inst.phase is Phase.ready and refreshed == []

            inst.last_used = clock()
            clock.now += 10
            router._unload_idle()  # our own stop (ttl); the view still says running
            await asyncio.gather(inst.task, return_exceptions=True)
            assert inst.phase is Phase.stopped
            await router._reload()
            assert inst.phase is Phase.stopped, "a stale `running` in the view does not bring it back"

            service.run(NAME)  # started by someone else, and the supervisor saw it
            view.publish(service.rows[NAME])
            await router._reload()
            assert inst.phase is Phase.active

            # A tick between config reads: the view alone, and nothing at all while it has not changed.
            listed: list[str] = []
            real_names = service.names
            service.names = lambda: listed.append("names") or real_names()  # type: ignore[method-assign]
            refreshed.clear()
            await router._reload(configs=False)
            assert inst.phase is Phase.active and refreshed == [] and listed == []

            service.gone(NAME)  # it crashed: the supervisor's exit notice is in the view
            view.publish(service.rows[NAME])
            await router._reload(configs=False)
            assert inst.phase is Phase.stopped and listed == [], "no config read for a change of state"
            assert refreshed == [NAME], "what the view says is checked before the phase changes"
        finally:
            await router.shutdown()

    asyncio.run(scenario())
