"""Peers (issue 12): another node's models through this router. Pure decisions on their own; the pool against a
real tiny HTTP server on an injected clock; and two real daemons on this machine, one the other's peer."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from conftest import Cli, _kill_leftovers, instance_doc
from helpers import free_port, wait_until
from llama_orchestrator.domain.peers import PeerView, candidates, pick, probe_delay
from llama_orchestrator.domain.settings import PeerSettings

# -- decisions -------------------------------------------------------------------------------------------------


def test_probe_backoff_doubles_and_caps() -> None:
    assert [probe_delay(n) for n in range(8)] == [5.0, 1, 2, 4, 8, 16, 30, 30]


def test_candidates_and_pick() -> None:
    a = PeerView("a", models=["qwen"], up=True, in_flight=2)
    b = PeerView("b", models=["llama"], aliases=["qwen"], up=True, in_flight=1)
    c = PeerView("c", models=["qwen"], up=False)
    assert [(p.name, m) for p, m in candidates("qwen", [a, b, c])] == [("a", "qwen"), ("b", "qwen"), ("c", "qwen")]
    assert [(p.name, m) for p, m in candidates("a/other", [a, b, c])] == [("a", "other")]  # node/model reaches it
    assert candidates("x/qwen", [a, b, c]) == []
    assert pick(candidates("qwen", [a, b, c]), None, now=0)[0].name == "b"  # least in flight among those up
    assert pick(candidates("qwen", [a, b, c]), 1, now=0) is None  # a tie stays on this node
    assert pick(candidates("qwen", [a, b, c]), 3, now=0)[0].name == "b"
    assert pick(candidates("qwen", [c]), None, now=0) is None


# -- the pool against a real server, on an injected clock -------------------------------------------------------


def test_pool_marks_down_and_probes_back_with_backoff() -> None:
    from llama_orchestrator.services.peers import PeerPool
    from llama_orchestrator.services.router import RouteError

    async def scenario() -> None:
        up = {"yes": False}

        async def models(request: web.Request) -> web.Response:
            if not up["yes"]:
                return web.Response(status=500)
            assert request.headers.get("Authorization") == "Bearer k"
            return web.json_response({"data": [{"id": "bee"}, {"id": "c/far", "node": "c"}]})

        app = web.Application()
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        now = [100.0]
        pool = PeerPool([PeerSettings(name="b", url=f"http://127.0.0.1:{port}", api_key="k")], clock=lambda: now[0])
        try:
            await pool.probe_due()
            view = pool.views["b"]
            assert not view.up and view.next_probe_at == 101.0
            with pytest.raises(RouteError) as caught:
                await pool.forward(
                    "b/bee", "POST", "/v1/chat/completions", [], b"{}", local_load=None, error=RouteError
                )
            assert caught.value.status == 503 and caught.value.code == "peer_unavailable"
            now[0] = 100.5
            await pool.probe_due()  # not due: no probe
            assert pool.stats["b"].probes_failed == 1
            now[0] = 101.0
            await pool.probe_due()
            assert pool.stats["b"].probes_failed == 2 and view.next_probe_at == 103.0  # backed off: 1, 2, ...
            up["yes"] = True
            now[0] = 103.0
            await pool.probe_due()
            assert view.up and view.models == ["bee"]  # its own models only, not what it relays
            entries = {e["id"]: e["node"] for e in pool.model_entries({"bee"})}
            assert entries == {"b/bee": "b"}  # the local "bee" wins the plain name
        finally:
            await pool.close()
            await runner.cleanup()

    asyncio.run(scenario())


# -- two daemons on this machine ----------------------------------------------------------------------------------


def _stop_nodes(a: Cli, b: Cli) -> None:
    """Both daemons stopped, B's instances down, and nothing of either home left running."""
    for cli in (a, b):
        cli.run("daemon", "stop", timeout=60)
    b.run("down", "--all", "--timeout", "1", timeout=120)
    _kill_leftovers(a.home)
    _kill_leftovers(b.home)


def _start(cli: Cli, port: int, **extra: object) -> str:
    settings = cli.home / "orchestrator.json"
    settings.write_text(json.dumps({"api": {"port": port}, **extra}))
    settings.chmod(0o600)
    cli.daemon = True
    cli.run("daemon", "start", check=True)
    return f"http://127.0.0.1:{port}"


def _chat(url: str, model: str) -> tuple[int, str, dict]:
    # Greedy towards the byte "a" (see test_router_real.py): visible text from the tiny model, not left to luck.
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hello"}],
        "temperature": 0,
        "top_k": 1,
        "ignore_eos": True,
        "logit_bias": [[3 + ord("a"), 100]],
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
        text = "".join(resp.iter_text())
        return resp.status_code, text, dict(resp.headers)


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.real_server)])
def server_binary(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("fake_binary" if request.param == "fake" else "real_binary")


@pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")
def test_node_a_serves_node_b_model_and_recovers(tmp_path: Path, tiny_model: Path, server_binary: Path) -> None:
    a, b = Cli(tmp_path / "a"), Cli(tmp_path / "b")
    a.home.mkdir()
    b.home.mkdir()
    b_port, a_port = free_port(), free_port()
    try:
        b.write_config("bee", instance_doc("bee", tiny_model, free_port(), server_binary, aliases=["chat"]))
        b_url = _start(b, b_port, api={"port": b_port, "api_keys": ["sk-b"]})
        b.run("up", "bee", "-d", "--wait", "--timeout", "60", check=True)
        a_url = _start(a, a_port, peers=[{"name": "nodeb", "url": b_url, "api_key": "sk-b"}])

        def listed() -> dict:
            data = httpx.get(f"{a_url}/v1/models", timeout=10).json()["data"]
            return {m["id"]: m.get("node") for m in data if m.get("loaded")}

        models = wait_until(lambda: "bee" in listed() and listed(), timeout=30, ignore=(httpx.HTTPError,))
        assert models["bee"] == "nodeb" and models["nodeb/bee"] == "nodeb" and models["chat"] == "nodeb"

        status, text, headers = _chat(a_url, "bee")
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert text.count("data: ") > 2 and "data: [DONE]" in text
        content = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in text.splitlines()
            if line.startswith("data: {") and json.loads(line[6:])["choices"]
        )
        assert content  # tokens came through, streamed
        assert headers["x-llama-orch-instance"] == "bee"  # B's router answered from its instance
        assert headers["x-llama-orch-node"] == "nodeb"
        assert _chat(a_url, "nodeb/chat")[0] == 200
        assert httpx.post(f"{b_url}/v1/chat/completions", json={"model": "bee"}).status_code == 401  # B wants its key

        nodes = json.loads(a.run("nodes", "--json", check=True).stdout)
        assert [(n["name"], n["state"]) for n in nodes] == [("nodeb", "up")] and "bee" in nodes[0]["models"]
        assert nodes[0]["latency_ms"] is not None
        assert nodes[0]["requests"] == {"200": 2}  # the daemon's own view (GET /api/nodes)
        table = a.run("nodes", check=True).stdout
        assert "nodeb" in table and " up " in table and "bee" in table

        metrics = httpx.get(f"{a_url}/metrics", timeout=10).text
        assert 'llama_orch_peer_up{node="nodeb"} 1' in metrics
        assert 'llama_orch_peer_requests_total{node="nodeb",code="200"} 2' in metrics

        b.run("daemon", "stop", check=True, timeout=60)
        status, text, headers = _chat(a_url, "bee")
        assert status == 503 and "retry-after" in headers
        error = json.loads(text)["error"]
        assert error["code"] == "peer_unavailable" and "nodeb" in error["message"]
        assert "bee" in httpx.get(f"{a_url}/v1/models", timeout=10).text  # still listed, as not loaded

        _start(b, b_port, api={"port": b_port, "api_keys": ["sk-b"]})
        wait_until(
            lambda: _chat(a_url, "bee")[0] == 200,
            timeout=60,
            interval=0.5,
            ignore=(httpx.HTTPError,),
            message="A answering bee again once B is back",
        )
        metrics = httpx.get(f"{a_url}/metrics", timeout=10).text
        assert 'llama_orch_peer_requests_total{node="nodeb",code="503"}' in metrics
    finally:
        _stop_nodes(a, b)


@pytest.mark.skipif(os.name == "nt", reason="POSIX process handling in the test")
def test_router_only_balances_an_alias_over_plain_llama_servers(tmp_path: Path) -> None:
    """What the Kubernetes export runs: `daemon run --router-only` whose peers are llama-servers (the instance
    Services), an alias shared by two of them, balanced across both."""
    import subprocess
    import sys

    from helpers import subprocess_env

    servers, ports = [], [free_port(), free_port()]
    logs = {name: tmp_path / f"{name}.log" for name in ("alpha", "beta")}
    for name, port in zip(("alpha", "beta"), ports, strict=False):
        servers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llama_orchestrator.testing.fake_server",
                    "--port",
                    str(port),
                    "--alias",
                    name,
                    "--model",
                    "tiny.gguf",
                    "--fake-token-delay",
                    "0.2",
                ],
                env=subprocess_env(),
                stdout=subprocess.DEVNULL,
                stderr=logs[name].open("w"),
            )
        )
    home = tmp_path / "router"
    home.mkdir()
    (home / "instances").mkdir()
    router_port = free_port()
    peers = [
        {"name": n, "url": f"http://127.0.0.1:{p}", "aliases": ["chat"]}
        for n, p in zip(("alpha", "beta"), ports, strict=False)
    ]
    (home / "orchestrator.json").write_text(json.dumps({"api": {"port": router_port}, "peers": peers}))
    (home / "orchestrator.json").chmod(0o600)
    router = subprocess.Popen(
        [*__import__("conftest")._cli_command(), "--home", str(home), "daemon", "run", "--router-only"],
        env=subprocess_env({"LLAMA_ORCH_NO_DAEMON": "1"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{router_port}"
    try:

        def both_up() -> bool:
            data = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
            chat = next((m for m in data if m["id"] == "chat"), None)
            return bool(chat and chat["loaded"] and sorted(chat["nodes"]) == ["alpha", "beta"])

        wait_until(both_up, timeout=60, ignore=(httpx.HTTPError, ValueError), message="both peers probed up")

        async def two_at_once() -> list[str]:
            async with httpx.AsyncClient(timeout=30) as client:

                async def one() -> str:
                    body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                        assert resp.status_code == 200
                        async for _ in resp.aiter_bytes():
                            pass
                        return resp.headers["x-llama-orch-node"]

                return list(await asyncio.gather(one(), one()))

        assert sorted(asyncio.run(two_at_once())) == ["alpha", "beta"]  # the second went to the idle node

        # A client that leaves mid-stream: the node's llama-server sees the disconnect and cancels its task.
        body = {"model": "alpha", "stream": True, "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200 and resp.headers["x-llama-orch-node"] == "alpha"
            next(resp.iter_raw())
        wait_until(
            lambda: "client disconnected during stream" in logs["alpha"].read_text(),
            timeout=20,
            message="the upstream stream cancelled",
        )
        wait_until(
            lambda: (
                'llama_orch_peer_requests_total{node="alpha",code="499"} 1'
                in httpx.get(f"{url}/metrics", timeout=5).text
            ),
            timeout=10,
        )
    finally:
        router.terminate()
        router.wait(timeout=30)
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def test_router_only_refuses_a_home_with_instances(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    cli.write_config("one", instance_doc("one", tiny_model, free_port(), fake_binary))
    result = cli.run("daemon", "run", "--router-only", timeout=60)
    assert result.returncode == 2 and "--router-only" in result.stderr and "one" in result.stderr


def test_a_peer_key_in_an_open_settings_file_is_refused(tmp_path: Path) -> None:
    from llama_orchestrator.adapters.config_files import load_settings
    from llama_orchestrator.domain.errors import ConfigError

    path = tmp_path / "orchestrator.json"
    path.write_text(json.dumps({"peers": [{"name": "b", "url": "http://b:8000", "api_key": "sk-b"}]}))
    path.chmod(0o644)
    if os.name != "nt":
        with pytest.raises(ConfigError, match="chmod 600"):
            load_settings(path)
    path.chmod(0o600)
    assert load_settings(path).peers[0].api_key == "sk-b"


# -- a peer's limit and queue, pure, on a fake clock ----------------------------------------------------------


def test_peer_queue_runs_queues_and_rejects_like_an_instance() -> None:
    from llama_orchestrator.domain.routing import Admission

    view = PeerView("b", up=True, limit=2, queue_max=1, queue_timeout=5.0)
    assert view.has_room
    assert [view.arrive(t, 100.0) for t in (1, 2)] == [Admission.run, Admission.run]
    assert not view.has_room and view.in_flight == 2
    assert view.arrive(3, 101.0) is Admission.queue and view.deadline(3) == 106.0  # queue_timeout from arrival
    assert view.arrive(4, 101.0) is Admission.reject  # the queue is full: the 429
    assert view.retry_after(typical_s=4.0) == 2  # one ahead, two slots, 4 s each
    assert view.release() == 3 and view.in_flight == 2 and view.queued == 0  # the slot passes to the first in line
    assert view.release() is None and view.in_flight == 1
    assert view.arrive(5, 102.0) is Admission.run
    assert view.arrive(6, 102.0) is Admission.queue
    view.in_flight = 1  # one finished without a release yet: a newcomer still queues behind the one waiting (FIFO)
    assert view.arrive(7, 102.0) is Admission.reject
    assert view.leave(6) and view.queued == 0  # gave up: out of the line
    assert not view.leave(6)  # no longer in line: it had been handed the slot, the caller releases it
    unlimited = PeerView("c", up=True)
    assert all(unlimited.arrive(t, 0.0) is Admission.run for t in range(50)) and unlimited.has_room


def test_pick_prefers_room_and_avoids_a_node_failing_for_the_model() -> None:
    from llama_orchestrator.domain.peers import MODEL_HOLD_S, retryable_status

    a = PeerView("a", models=["m"], up=True, limit=1, in_flight=1)
    b = PeerView("b", models=["m"], up=True, limit=4, in_flight=3)
    assert pick(candidates("m", [a, b]), None, now=0)[0].name == "b"  # a free slot before a queue
    b.in_flight = 4
    assert pick(candidates("m", [a, b]), None, now=0)[0].name == "a"  # both full: the shorter line
    a.in_flight, b.in_flight = 0, 0
    a.fail_model("m", 50.0)
    assert pick(candidates("m", [a, b]), None, now=50.0)[0].name == "b"
    assert pick(candidates("m", [a]), None, now=50.0)[0].name == "a"  # the only one is still tried
    assert pick(candidates("m", [a]), 7, now=50.0) is None  # ... after this node's own replicas
    assert pick(candidates("m", [a, b]), None, now=50.0 + MODEL_HOLD_S)[0].name == "a"  # held back for a while
    a.fail_model("m", 60.0)
    a.model_ok("m")  # a good answer ends it
    assert not a.model_failed("m", 60.0)
    assert [s for s in (500, 502, 503, 504, 429, 404) if retryable_status(s)] == [502, 504]


# -- the pool against stand-in peers: failover on 5xx, queueing, remembered models ------------------------------


class _StandIn:
    """A tiny peer: /v1/models lists ``models``; chat answers ``status`` (``cut``: closes the connection before
    any byte), or waits for ``gate`` when it is set."""

    def __init__(self, models: list[str], status: int = 200) -> None:
        self.models, self.status, self.cut = models, status, False
        self.gate: asyncio.Event | None = None
        self.hits = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> _StandIn:
        async def models(_request: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": m} for m in self.models]})

        async def chat(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            await request.read()
            if self.cut:
                request.transport.close()
                raise asyncio.CancelledError  # aiohttp ends the handler; the client sees the cut
            if self.gate is not None:
                await self.gate.wait()
            headers = {"Retry-After": "3"} if self.status == 503 else {}
            return web.json_response({"answer": self.status}, status=self.status, headers=headers)

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def _relay(pool, model: str, local_load: int | None = None):
    from llama_orchestrator.services.router import RouteError

    body = json.dumps({"model": model}).encode()
    upstream = await pool.forward(
        model, "POST", "/v1/chat/completions", [], body, local_load=local_load, error=RouteError
    )
    if upstream is None:
        return None
    text = await upstream.read()
    await upstream.close()
    return upstream.status, json.loads(text), dict(upstream.headers)


def test_a_502_or_a_cut_is_retried_on_another_replica_and_a_503_is_relayed() -> None:
    from llama_orchestrator.services.peers import PeerPool
    from llama_orchestrator.services.router import RouteError

    async def scenario() -> None:
        bad, good = await _StandIn(["m"], status=502).start(), await _StandIn(["m"]).start()
        pool = PeerPool([PeerSettings(name="a-bad", url=bad.url), PeerSettings(name="b-good", url=good.url)])
        try:
            await pool.probe_due()
            assert pool.views["a-bad"].up and pool.views["b-good"].up
            status, body, headers = await _relay(pool, "m")  # a-bad first (the name breaks the tie)
            assert (status, body, bad.hits, good.hits) == (200, {"answer": 200}, 1, 1)
            assert (b"x-llama-orch-node", b"b-good") in headers.items()
            assert pool.stats["a-bad"].failures == {"http_502": 1} and pool.stats["a-bad"].retried == 1
            assert pool.views["a-bad"].up  # the node is up: only its model failed
            assert (await _relay(pool, "m"))[0] == 200 and bad.hits == 1  # held back: straight to the good one
            assert (await _relay(pool, "a-bad/m"))[0] == 502 and bad.hits == 2  # no other replica: its answer

            alone = PeerPool([PeerSettings(name="a-bad", url=bad.url)])  # with a replica on this node too
            await alone.probe_due()
            assert await _relay(alone, "m", local_load=5) is None and bad.hits == 3  # its 502: this node answers
            assert await _relay(alone, "m", local_load=5) is None and bad.hits == 3  # held back: not asked again
            await alone.close()

            bad.status, bad.cut = 200, True  # connects, then cuts before any byte
            pool.views["a-bad"].model_ok("m")
            assert (await _relay(pool, "m"))[0] == 200 and bad.hits == 4
            assert pool.stats["a-bad"].failures["disconnect"] == 1
            with pytest.raises(RouteError) as caught:  # alone: tried once more on a new connection, then a 502
                await _relay(pool, "a-bad/m")
            assert caught.value.status == 502 and caught.value.code == "upstream_unreachable" and bad.hits == 6

            bad.cut, bad.status = False, 503  # loading / its own queue: an answer, not a failure
            pool.views["a-bad"].model_ok("m")
            failures = dict(pool.stats["a-bad"].failures)
            status, body, headers = await _relay(pool, "a-bad/m")
            assert status == 503 and headers[b"retry-after"] == b"3"
            assert pool.stats["a-bad"].failures == failures and not pool.views["a-bad"].model_failed("m", pool.clock())

            await good.stop()  # refused: the node is down, the other replica answers 503 for a while
            bad.status = 502
            with pytest.raises(RouteError) as caught:
                await _relay(pool, "m")
            assert caught.value.status == 503 and caught.value.code == "peer_unavailable"
            assert not pool.views["b-good"].up and pool.stats["b-good"].failures == {"connect": 1}
        finally:
            await pool.close()
            await bad.stop()
            await good.stop()

    asyncio.run(scenario())


def test_a_peer_with_a_limit_queues_and_answers_429_when_full() -> None:
    from llama_orchestrator.domain.settings import PeerConcurrency
    from llama_orchestrator.services.peers import PeerPool
    from llama_orchestrator.services.router import RouteError

    async def scenario() -> None:
        peer = await _StandIn(["m"]).start()
        peer.gate = asyncio.Event()
        limits = PeerConcurrency(limit=1, queue=1, queue_timeout=30)
        pool = PeerPool([PeerSettings(name="b", url=peer.url, concurrency=limits)])
        view = pool.views["b"]
        try:
            await pool.probe_due()
            first = asyncio.create_task(_relay(pool, "m"))
            await _until(lambda: peer.hits == 1)
            second = asyncio.create_task(_relay(pool, "m"))
            await _until(lambda: view.queued == 1)
            assert peer.hits == 1  # the second waits here, not at the node
            with pytest.raises(RouteError) as caught:
                await _relay(pool, "m")
            error = json.loads(caught.value.body())["error"]
            assert caught.value.status == 429 and error["code"] == "queue_full" and error["type"] == "rate_limit_error"
            assert caught.value.retry_after >= 1 and "1 slots are busy" in error["message"]
            peer.gate.set()
            assert [(await t)[0] for t in (first, second)] == [200, 200]
            assert view.in_flight == 0 and view.queued == 0 and pool.stats["b"].requests == {200: 2, 429: 1}

            view.queue_timeout = 0.2  # a wait that runs out is a 429 too
            peer.gate = asyncio.Event()
            held = asyncio.create_task(_relay(pool, "m"))
            await _until(lambda: view.in_flight == 1)
            with pytest.raises(RouteError) as caught:
                await _relay(pool, "m")
            assert caught.value.status == 429 and "in the queue" in caught.value.message
            waiting = asyncio.create_task(_relay(pool, "m"))  # a client that leaves while queued frees its place
            await _until(lambda: view.queued == 1)
            waiting.cancel()
            await _until(lambda: waiting.done())
            assert view.queued == 0 and pool.stats["b"].requests[499] == 1
            peer.gate.set()
            assert (await held)[0] == 200 and view.in_flight == 0
        finally:
            await pool.close()
            await peer.stop()

    asyncio.run(scenario())


async def _until(condition) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_a_peer_s_models_are_remembered_across_restarts(tmp_path: Path) -> None:
    from llama_orchestrator.services.peers import PeerPool
    from llama_orchestrator.services.router import RouteError

    memory = tmp_path / "state" / "peers.json"

    async def scenario() -> None:
        peer = await _StandIn(["bee"]).start()
        settings = [PeerSettings(name="b", url=peer.url)]
        pool = PeerPool(settings, memory=memory)
        await pool.probe_due()
        await pool.close()
        await peer.stop()
        assert json.loads(memory.read_text())["peers"]["b"] == {"url": peer.url, "models": ["bee"]}
        if os.name != "nt":
            assert memory.stat().st_mode & 0o777 == 0o600
        written = memory.stat().st_mtime_ns

        again = PeerPool(settings, memory=memory)  # a restart, with the node down
        assert again.views["b"].models == ["bee"] and not again.views["b"].up and again.has("bee")
        await again.probe_due()
        assert memory.stat().st_mtime_ns == written  # a down node's list is kept as it was
        with pytest.raises(RouteError) as caught:
            await _relay(again, "bee")
        assert caught.value.status == 503 and caught.value.code == "peer_unavailable" and caught.value.retry_after
        await again.close()
        assert PeerPool([PeerSettings(name="b", url="http://127.0.0.1:1")], memory=memory).views["b"].models == []

    asyncio.run(scenario())
    memory.write_text('{"peers": [1, 2]}')
    assert PeerPool([PeerSettings(name="b", url="http://x:1")], memory=memory).views["b"].models == []
    memory.write_text("x" * (2 * 1024 * 1024))  # bounded: read no further than the cap
    assert PeerPool([PeerSettings(name="b", url="http://x:1")], memory=memory).views["b"].models == []


@pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")
def test_two_nodes_queue_at_the_peer_and_a_down_peer_answers_503(
    tmp_path: Path, tiny_model: Path, fake_binary: Path
) -> None:
    """A's peer B has a limit of 1 and a queue of 1: a second request waits at A, a third gets the router's 429.
    A configured peer never seen up answers ``node/model`` with 503; after A restarts with B down, B's plain model
    names (remembered in A's state/peers.json) answer 503 too, not 404."""
    import threading

    a, b = Cli(tmp_path / "a"), Cli(tmp_path / "b")
    a.home.mkdir()
    b.home.mkdir()
    b_port, a_port, dead_port = free_port(), free_port(), free_port()
    peers = [
        {
            "name": "nodeb",
            "url": f"http://127.0.0.1:{b_port}",
            "api_key": "sk-b",
            "concurrency": {"limit": 1, "queue": 1, "queue_timeout": 30},
        },
        {"name": "nodec", "url": f"http://127.0.0.1:{dead_port}"},
    ]
    try:
        doc = instance_doc("bee", tiny_model, free_port(), fake_binary, env={"FAKE_LLAMA_TOKEN_DELAY": "0.3"})
        b.write_config("bee", doc)
        _start(b, b_port, api={"port": b_port, "api_keys": ["sk-b"]})
        b.run("up", "bee", "-d", "--wait", "--timeout", "60", check=True)
        a_url = _start(a, a_port, peers=peers)

        status, text, headers = _chat(a_url, "nodec/anything")  # never up: its name is known from the config
        error = json.loads(text)["error"]
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert error["code"] == "peer_unavailable" and "nodec" in error["message"]

        def nodeb() -> dict:
            return next(n for n in httpx.get(f"{a_url}/api/nodes", timeout=10).json() if n["name"] == "nodeb")

        wait_until(lambda: nodeb()["up"] and "bee" in nodeb()["models"], timeout=30, ignore=(httpx.HTTPError,))
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(_chat(a_url, "bee")[0])) for _ in range(2)]
        threads[0].start()
        wait_until(lambda: nodeb()["in_flight"] == 1, timeout=20, message="the first request at B")
        threads[1].start()
        wait_until(lambda: nodeb()["queued"] == 1, timeout=20, message="the second waiting at A")
        status, text, headers = _chat(a_url, "bee")
        error = json.loads(text)["error"]
        assert status == 429 and error["code"] == "queue_full" and int(headers["retry-after"]) >= 1
        listed = json.loads(a.run("nodes", "--json", check=True).stdout)[0]
        assert listed["limit"] == 1 and {"queued", "failures", "retried"} <= set(listed)
        for thread in threads:
            thread.join(timeout=60)
        assert results == [200, 200]
        metrics = httpx.get(f"{a_url}/metrics", timeout=10).text
        assert 'llama_orch_peer_requests_total{node="nodeb",code="429"} 1' in metrics
        assert 'llama_orch_peer_requests_total{node="nodeb",code="200"} 2' in metrics
        assert 'llama_orch_peer_queued{node="nodeb"} 0' in metrics

        memory = json.loads((a.home / "state" / "peers.json").read_text())
        assert memory["peers"]["nodeb"]["models"] == ["bee"]
        b.run("daemon", "stop", check=True, timeout=60)
        a.run("daemon", "stop", check=True, timeout=60)
        _start(a, a_port, peers=peers)
        status, text, headers = _chat(a_url, "bee")  # B down since A started: remembered, so 503 and not 404
        error = json.loads(text)["error"]
        assert status == 503 and "retry-after" in headers
        assert error["code"] == "peer_unavailable" and "nodeb" in error["message"]
    finally:
        _stop_nodes(a, b)
