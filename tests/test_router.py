"""The OpenAI router end to end: a real uvicorn server (uvloop + httptools) in a thread, in front of fake
llama-servers started and stopped by the router itself. Real processes, real sockets; waits are on conditions."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from conftest import Cli, instance_doc
from helpers import free_port, wait_until
from llama_orchestrator.adapters.home import Home
from llama_orchestrator.adapters.process import ProcessHandle
from llama_orchestrator.api.http_protocol import head_deadline_protocol
from llama_orchestrator.api.proxy import make_proxy_app
from llama_orchestrator.domain.router_phases import TRANSITIONS, Phase
from llama_orchestrator.domain.settings import RouterSettings
from llama_orchestrator.services.instances import InstanceService
from llama_orchestrator.services.router import InstanceStats, Router

CHAT = "/v1/chat/completions"


def chat(model: str, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


@dataclass
class Served:
    url: str
    router: Router
    service: InstanceService
    client: httpx.Client

    def stats(self, name: str) -> InstanceStats | None:
        return self.router.stats().get(name)

    def status(self, name: str) -> str:
        return self.service.refresh(name).status

    def running(self) -> set[str]:
        return {n for n in self.service.names() if self.service.refresh(n).status in ("starting", "running")}


@pytest.fixture(name="serve")  # by name: test_router_real imports it, and a module's own name would clash
def serve_fixture(home: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., Served]]:
    servers: list[tuple[uvicorn.Server, threading.Thread, httpx.Client]] = []
    taken: list[tuple[str, Phase, Phase]] = []

    def start(**settings: object) -> Served:
        router = Router(
            lambda: InstanceService(Home(home)),
            RouterSettings(**settings),
            tick_s=0.1,
            on_phase=lambda name, old, new: taken.append((name, old, new)),
        )
        port = free_port()
        config = uvicorn.Config(
            make_proxy_app(router),
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            # the daemon's protocol (api.server.ApiServer): its ChunkWriter is the path streams take there
            http=head_deadline_protocol(30.0) or "httptools",
            lifespan="on",
            log_level="warning",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_until(lambda: server.started or not thread.is_alive(), 20, message="uvicorn started")
        assert server.started, "the router did not start (see the captured log)"
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        servers.append((server, thread, client))
        return Served(f"http://127.0.0.1:{port}", router, InstanceService(Home(home)), client)

    yield start
    for server, thread, client in servers:
        client.close()
        server.should_exit = True
        thread.join(30)
    service = InstanceService(Home(home))
    for name in service.names():
        service.stop(name, 5)
    # Every phase change the router made went through its table; none was refused as a bug.
    assert all((old, new) in TRANSITIONS for _, old, new in taken), taken
    bugs = [r.getMessage() for r in caplog.records if "router phase bug" in r.getMessage()]
    assert bugs == []


def add(cli: Cli, tiny_model: Path, fake_binary: Path, name: str, *fake_args: str, **extra: object) -> int:
    port = free_port()
    doc = instance_doc(name, tiny_model, port, fake_binary, args=list(fake_args), **extra)
    cli.write_config(name, doc)
    return port


def sse_events(response: httpx.Response) -> Iterator[tuple[float, dict | str]]:
    """(arrival time, event) for each `data:` line as it arrives."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            yield time.monotonic(), data if data == "[DONE]" else json.loads(data)


# -- errors and listing ----------------------------------------------------------------------------------------


def test_models_lists_names_and_aliases_and_unknown_is_404(cli, tiny_model, fake_binary, serve) -> None:
    add(cli, tiny_model, fake_binary, "alpha", aliases=["gpt-4o", "shared"])
    add(cli, tiny_model, fake_binary, "beta", aliases=["shared"])
    served = serve()
    listed = served.client.get("/v1/models").json()
    assert listed["object"] == "list"
    ids = [m["id"] for m in listed["data"]]
    assert ids == ["alpha", "beta", "gpt-4o", "shared"]
    assert {m["id"]: m["instances"] for m in listed["data"]}["shared"] == ["alpha", "beta"]
    assert served.client.get("/v1/models/gpt-4o").json()["id"] == "gpt-4o"

    reply = served.client.post(CHAT, json=chat("nope"))
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")
    assert "alpha" in error["message"] and "shared" in error["message"]

    (cli.home / "instances" / "broken").mkdir()
    (cli.home / "instances" / "broken" / "config.json").write_text('{"name": "broken", "model": {}}')
    broken = served.client.post(CHAT, json=chat("broken"))
    assert broken.status_code == 503 and broken.json()["error"]["code"] == "config_invalid"
    assert "model.path" in broken.json()["error"]["message"]

    bad = served.client.post(CHAT, content=b"[not json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert served.client.get("/upstream/nope/health").status_code == 404
    assert served.status("alpha") == "stopped"  # listing and errors start nothing


# -- on demand, streaming, disconnects -------------------------------------------------------------------------


def test_a_stopped_instance_starts_on_demand_and_answers(cli, tiny_model, fake_binary, serve) -> None:
    add(cli, tiny_model, fake_binary, "alpha", "--fake-load-seconds", "0.5", aliases=["gpt-4o"])
    served = serve()
    assert served.status("alpha") == "stopped"
    # Several at once: one start, every request answered once it is healthy.
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: served.client.post(CHAT, json=chat("gpt-4o")), range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    body = replies[0].json()
    assert body["choices"][0]["message"]["content"].startswith("the quick")
    assert replies[0].headers["x-llama-orch-instance"] == "alpha"
    assert served.status("alpha") == "running"
    stats = served.stats("alpha")
    assert stats.starts_total == 1 and stats.requests_total == {200: 4} and stats.loaded
    assert stats.completion_tokens_total == 32 and stats.last_tokens_per_second > 0
    assert stats.duration.count == 4 and stats.in_flight == 0


def test_streaming_is_relayed_chunk_by_chunk(cli, tiny_model, fake_binary, serve) -> None:
    add(cli, tiny_model, fake_binary, "alpha", "--fake-token-delay", "0.15", "--fake-tokens", "8")
    served = serve()
    with served.client.stream("POST", CHAT, json=chat("alpha", stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in response.headers
        events = list(sse_events(response))
    tokens = [t for t, e in events if isinstance(e, dict) and e["choices"][0]["delta"].get("content")]
    assert len(tokens) == 8 and events[-1][1] == "[DONE]"
    gaps = [b - a for a, b in itertools.pairwise(tokens)]
    # Each token arrived about a token delay after the previous one, not all at once at the end.
    assert sum(1 for g in gaps if g > 0.08) >= 6, gaps
    stats = served.stats("alpha")
    assert stats.completion_tokens_total == 8 and stats.requests_total == {200: 1}


def test_a_client_that_disconnects_frees_the_slot_at_once(cli, tiny_model, fake_binary, serve) -> None:
    port = add(cli, tiny_model, fake_binary, "alpha", "--fake-token-delay", "0.2", "--fake-tokens", "100")
    served = serve()
    with served.client.stream("POST", CHAT, json=chat("alpha", stream=True)) as response:
        stream = sse_events(response)
        next(stream), next(stream)  # generation has begun
        assert served.stats("alpha").in_flight == 1
    left = time.monotonic()
    wait_until(lambda: served.stats("alpha").in_flight == 0, 2, message="the router freed the slot")

    def upstream_processing() -> bool:
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return "llamacpp:requests_processing 0" in metrics

    wait_until(upstream_processing, 2, message="llama-server stopped generating")
    assert time.monotonic() - left < 2  # 100 tokens at 0.2 s would have taken 20 s
    assert served.stats("alpha").requests_total == {499: 1}
    reply = served.client.post(CHAT, json=chat("alpha", max_tokens=2))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def test_a_client_that_gives_up_on_a_non_streamed_answer_frees_its_slot(cli, tiny_model, fake_binary, serve) -> None:
    add(cli, tiny_model, fake_binary, "alpha", "--fake-token-delay", "0.2", "--fake-tokens", "50")
    served = serve()
    assert served.client.post(CHAT, json=chat("alpha", max_tokens=1)).status_code == 200  # started
    with pytest.raises(httpx.ReadTimeout):
        served.client.post(CHAT, json=chat("alpha"), timeout=0.5)
    wait_until(lambda: served.stats("alpha").in_flight == 0, 2, message="the slot freed")
    assert served.stats("alpha").requests_total == {200: 1, 499: 1}


def test_ttl_never_unloads_an_instance_with_a_request_in_flight(cli, tiny_model, fake_binary, serve) -> None:
    add(cli, tiny_model, fake_binary, "alpha", "--fake-token-delay", "0.1", "--fake-tokens", "20", ttl=0.3)
    served = serve()
    with served.client.stream("POST", CHAT, json=chat("alpha", stream=True)) as response:
        events = [e for _, e in sse_events(response)]  # 2 s, much longer than the ttl
    assert events[-1] == "[DONE]" and len(events) == 23
    wait_until(lambda: served.status("alpha") == "stopped", 10, message="unloaded once idle")


def test_ttl_stops_an_idle_instance(cli, tiny_model, fake_binary, serve) -> None:
    add(cli, tiny_model, fake_binary, "alpha", ttl=1)
    served = serve()
    assert served.client.post(CHAT, json=chat("alpha")).status_code == 200
    assert served.status("alpha") == "running"
    wait_until(lambda: served.status("alpha") == "stopped", 10, message="ttl unload")
    row = served.service.refresh("alpha")
    assert row.stopped_by_user  # so a supervisor does not bring it back
    assert served.stats("alpha").ttl_unloads_total == 1
    assert served.client.post(CHAT, json=chat("alpha")).status_code == 200  # and on demand again


def test_start_past_the_timeout_is_503_with_retry_after(cli, tiny_model, fake_binary, serve) -> None:
    add(
        cli,
        tiny_model,
        fake_binary,
        "slow",
        "--fake-load-seconds",
        "3",
        healthcheck={"interval": 0.5, "timeout": 2, "retries": 3, "start_period": 30},
    )
    served = serve(start_timeout=1)
    reply = served.client.post(CHAT, json=chat("slow"))
    assert reply.status_code == 503 and int(reply.headers["retry-after"]) >= 1
    assert reply.json()["error"]["code"] == "starting"
    wait_until(
        lambda: served.client.post(CHAT, json=chat("slow")).status_code == 200, 15, message="answered once loaded"
    )


# -- swaps and eviction ----------------------------------------------------------------------------------------


def test_max_loaded_one_alternating_models_every_answer_correct(cli, tiny_model, fake_binary, serve) -> None:
    # Different answer lengths tell which server answered, independently of the router's own header.
    add(cli, tiny_model, fake_binary, "one", "--fake-tokens", "3")
    add(cli, tiny_model, fake_binary, "two", "--fake-tokens", "5")
    served = serve(max_loaded=1)
    stop = threading.Event()
    overlap: list[set[str]] = []

    def sample() -> None:
        watcher = InstanceService(served.service.home)
        while not stop.is_set():
            running = {n for n in ("one", "two") if watcher.refresh(n).status in ("starting", "running")}
            if len(running) > 1:
                overlap.append(running)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for model in ["one", "two", "one", "two"]:
            reply = served.client.post(CHAT, json=chat(model))
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == {"one": 3, "two": 5}[model]
        # And at once: requests for both interleaved, each waits its turn instead of failing.
        with ThreadPoolExecutor(6) as pool:
            models = ["one", "two"] * 4
            replies = list(pool.map(lambda m: (m, served.client.post(CHAT, json=chat(m))), models))
        for model, reply in replies:
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == {"one": 3, "two": 5}[model]
    finally:
        stop.set()
        sampler.join()
    assert overlap == []  # never two servers at once
    assert served.stats("one").evictions_total + served.stats("two").evictions_total >= 3


def test_a_busy_instance_is_not_evicted_the_newcomer_waits(cli, tiny_model, fake_binary, serve) -> None:
    add(cli, tiny_model, fake_binary, "busy", "--fake-token-delay", "0.1", "--fake-tokens", "15")
    add(cli, tiny_model, fake_binary, "next")
    served = serve(max_loaded=1)
    with served.client.stream("POST", CHAT, json=chat("busy", stream=True)) as response:
        stream = sse_events(response)
        next(stream)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(served.client.post, CHAT, json=chat("next"))
            wait_until(lambda: served.stats("next").in_flight == 1, 5)
            assert served.status("busy") == "running" and not waiting.done()
            rest = list(stream)
            reply = waiting.result(30)
    assert rest[-1][1] == "[DONE]"  # the stream was never cut
    assert reply.status_code == 200
    assert served.status("busy") == "stopped" and served.status("next") == "running"


def test_memory_budget_evicts_least_recently_used_never_pinned(cli, tiny_model, fake_binary, serve) -> None:
    # Each tiny instance is estimated at about 97 MiB (mostly the fixed overhead): 300 MiB holds three.
    add(cli, tiny_model, fake_binary, "pinned", pinned=True)
    for name in ("a", "b", "c"):
        add(cli, tiny_model, fake_binary, name)
    served = serve(memory_budget_mb=300)
    for model in ("pinned", "a", "b", "a"):
        assert served.client.post(CHAT, json=chat(model)).status_code == 200
    assert served.running() == {"pinned", "a", "b"}
    # Least recently used: pinned (never), then b.
    assert served.client.post(CHAT, json=chat("c")).status_code == 200
    assert served.running() == {"pinned", "a", "c"}
    assert served.client.post(CHAT, json=chat("b")).status_code == 200
    assert served.running() == {"pinned", "c", "b"}


def test_a_model_over_the_budget_alone_is_refused_clearly(cli, tiny_model, fake_binary, serve) -> None:
    add(cli, tiny_model, fake_binary, "big")
    served = serve(memory_budget_mb=50)
    reply = served.client.post(CHAT, json=chat("big"))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_too_large"
    assert "memory_budget_mb" in reply.json()["error"]["message"]
    assert served.status("big") == "stopped"


# -- replicas, queueing, failures ------------------------------------------------------------------------------


def test_replicas_are_balanced_and_a_dead_one_is_taken_out(cli, tiny_model, fake_binary, serve) -> None:
    for name in ("r1", "r2"):
        add(
            cli,
            tiny_model,
            fake_binary,
            name,
            "--fake-token-delay",
            "0.1",
            "--fake-tokens",
            "5",
            aliases=["shared"],
            server={"port": free_port(), "parallel": 2},
        )
    served = serve()
    for name in ("r1", "r2"):
        served.service.start(name)
        served.service.wait_healthy(name, 20)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: served.client.post(CHAT, json=chat("shared")), range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    picked = sorted(r.headers["x-llama-orch-instance"] for r in replies)
    assert picked == ["r1", "r1", "r2", "r2"]
    # One replica dies without the router knowing: requests keep succeeding on the other.
    row = served.service.refresh("r1")
    served.service.processes.kill_tree(ProcessHandle(row.pid, row.create_time or 0.0))
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: served.client.post(CHAT, json=chat("shared")), range(6)))
    assert [r.status_code for r in replies] == [200] * 6


def test_a_full_queue_is_429_with_retry_after(cli, tiny_model, fake_binary, serve) -> None:
    add(
        cli,
        tiny_model,
        fake_binary,
        "alpha",
        "--fake-token-delay",
        "0.1",
        "--fake-tokens",
        "30",
        concurrency={"limit": 1, "queue": 1, "queue_timeout": 30},
    )
    served = serve()
    with served.client.stream("POST", CHAT, json=chat("alpha", stream=True)) as first:
        events = sse_events(first)  # kept: a dropped generator closes the stream (a disconnect)
        next(events)
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(served.client.post, CHAT, json=chat("alpha", max_tokens=1))
            wait_until(lambda: served.stats("alpha").queued == 1, 5)
            refused = served.client.post(CHAT, json=chat("alpha"))
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "rate_limit_error"
    assert queued.result(30).status_code == 200  # the queued one got the slot when the first left
    assert served.stats("alpha").requests_total[429] == 1


def test_queue_timeout_is_429(cli, tiny_model, fake_binary, serve) -> None:
    add(
        cli,
        tiny_model,
        fake_binary,
        "alpha",
        "--fake-token-delay",
        "0.1",
        "--fake-tokens",
        "30",
        concurrency={"limit": 1, "queue": 4, "queue_timeout": 0.5},
    )
    served = serve()
    with served.client.stream("POST", CHAT, json=chat("alpha", stream=True)) as first:
        events = sse_events(first)  # kept: a dropped generator closes the stream (a disconnect)
        next(events)
        started = time.monotonic()
        refused = served.client.post(CHAT, json=chat("alpha"))
        assert refused.status_code == 429 and 0.4 < time.monotonic() - started < 5
        assert refused.json()["error"]["code"] == "queue_full"


def test_an_upstream_that_dies_mid_request_is_502_in_openai_format(cli, tiny_model, fake_binary, serve) -> None:
    # Through /upstream/ (no retry: its body is streamed). On /v1/ the router would retry and restart it; the fake
    # cannot be restarted on its port at once after a crash (it does not set SO_REUSEADDR, llama-server does).
    add(
        cli,
        tiny_model,
        fake_binary,
        "crashy",
        "--fake-crash-after",
        "0.8",
        "--fake-token-delay",
        "0.5",
        "--fake-tokens",
        "10",
    )
    served = serve()
    reply = served.client.post("/upstream/crashy/v1/chat/completions", json=chat("crashy"))
    assert reply.status_code == 502, reply.text
    error = reply.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_unreachable"
    assert "crashy" in error["message"] and "disconnected" in error["message"]
    assert served.stats("crashy").requests_total == {502: 1}


# -- passthrough -----------------------------------------------------------------------------------------------


def test_upstream_passthrough_any_path_streamed(cli, tiny_model, fake_binary, serve) -> None:
    add(cli, tiny_model, fake_binary, "alpha", "--fake-token-delay", "0.05")
    served = serve()
    props = served.client.get("/upstream/alpha/props?x=1")
    assert props.status_code == 200 and props.json()["total_slots"] == 1
    body = json.dumps({"prompt": "hi", "stream": True}).encode()

    def chunks() -> Iterator[bytes]:
        yield body[:5]
        yield body[5:]

    with served.client.stream("POST", "/upstream/alpha/completion", content=chunks()) as response:
        assert response.status_code == 200
        events = [e for _, e in sse_events(response)]
    assert events[-1] == "[DONE]" and len(events) >= 9
    sized = served.client.post("/upstream/alpha/v1/embeddings", json={"input": "hello"})
    assert sized.status_code == 200 and len(sized.json()["data"][0]["embedding"]) == 16


def test_a_session_replaced_under_a_stream_is_closed_only_after_it(cli, tiny_model, fake_binary, serve) -> None:
    # The router replaces an instance's connection pool when it (re)starts it or sees it gone; a stream still
    # relayed through the old pool must finish, not hang: the old pool is closed once nothing is in flight.
    add(cli, tiny_model, fake_binary, "alpha", "--fake-token-delay", "0.1", "--fake-tokens", "10")
    served = serve()
    router = served.router
    with served.client.stream("POST", CHAT, json=chat("alpha", stream=True), timeout=10) as response:
        stream = sse_events(response)
        next(stream)
        inst = router._instances["alpha"]
        old = inst.relay  # a /v1 request's lean pool (adapters.http_relay)
        assert old is not None
        asyncio.run_coroutine_threadsafe(router._close_session(inst), router._loop).result(5)
        assert inst.relay is None and inst.session is None  # new requests get a new pool
        rest = [e for _, e in stream]
    assert rest[-1] == "[DONE]" and len(rest) >= 10
    assert old.closed
    wait_until(lambda: served.stats("alpha").requests_total == {200: 1}, 5, message="the stream counted")
    assert old.idle == 0  # its connection was closed, not pooled again
    assert served.stats("alpha").requests_total == {200: 1}
