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
    assert pick(candidates("qwen", [a, b, c]), None)[0].name == "b"  # least in flight among those up
    assert pick(candidates("qwen", [a, b, c]), 1) is None  # a tie stays on this node
    assert pick(candidates("qwen", [a, b, c]), 3)[0].name == "b"
    assert pick(candidates("qwen", [c]), None) is None


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
        for cli in (a, b):
            cli.run("daemon", "stop", timeout=60)
        b.run("down", "--all", "--timeout", "1", timeout=120)
        _kill_leftovers(a.home)
        _kill_leftovers(b.home)


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
