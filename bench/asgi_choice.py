"""Benchmark: which ASGI stack and which upstream client the router should use.

Four minimal proxies, each doing what the router's hot path does (read the body, forward it, relay the answer
chunk by chunk), are put in front of one fast synthetic upstream; a load generator in this process measures:

* small non-streaming POST, concurrency 1: median and p90 latency (the router's added cost per request);
* small non-streaming POST, concurrency 16: requests per second;
* a streamed answer of --chunks SSE events, concurrency 1 and 16: events per second.

Every server runs in its own process under uvicorn with uvloop + httptools (what the daemon uses), so the load
generator does not share a GIL with them. "direct" is the upstream itself, the ceiling.

    .venv/bin/python bench/asgi_choice.py [--seconds 3] [--requests 400] [--chunks 200] [--json]

The variants: raw ASGI callable or Starlette (Route + StreamingResponse), each with aiohttp.ClientSession or
httpx.AsyncClient as the upstream client.
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
import time

VARIANTS = ("raw-aiohttp", "raw-httpx", "starlette-aiohttp", "starlette-httpx")
SMALL = json.dumps({"id": "x", "object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------- upstream


def upstream_app(chunks: int):
    event = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if b'"stream": true' in body or b'"stream":true' in body:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            for _ in range(chunks):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(SMALL))],
            }
        )
        await send({"type": "http.response.body", "body": SMALL})

    return app


# --------------------------------------------------------------------------------------------------- proxies

HOP = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"accept-encoding"}


def _client(kind: str):
    if kind == "aiohttp":
        import aiohttp

        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    import httpx

    return httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))  # noqa: S113 - measured, not a hang


async def _open(kind: str, client, url: str, method: str, headers: list, body: bytes):
    """(status, headers, async chunk iterator, close)"""
    if kind == "aiohttp":
        resp = await client.request(method, url, headers=headers, data=body)
        out = [(k.lower().encode(), v.encode()) for k, v in resp.headers.items() if k.lower().encode() not in HOP]
        return resp.status, out, resp.content.iter_any(), resp.release
    req = client.build_request(method, url, headers=headers, content=body)
    resp = await client.send(req, stream=True)
    out = [(k, v) for k, v in resp.headers.raw if k.lower() not in HOP]
    return resp.status_code, out, resp.aiter_raw(), resp.aclose


def raw_proxy(kind: str, upstream: str):
    state: dict = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["client"] = _client(kind)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["client"].close() if kind == "aiohttp" else await state["client"].aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        json.loads(body)  # the router parses the body to find `model`
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k not in HOP]
        status, out, chunks, close = await _open(
            kind, state["client"], upstream + scope["path"], scope["method"], headers, body
        )
        try:
            await send({"type": "http.response.start", "status": status, "headers": out})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await close()

    return app


def starlette_proxy(kind: str, upstream: str):
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    state: dict = {}

    async def forward(request: Request):
        body = await request.body()
        json.loads(body)
        headers = [(k.decode(), v.decode()) for k, v in request.headers.raw if k not in HOP]
        status, out, chunks, close = await _open(
            kind, state["client"], upstream + request.url.path, request.method, headers, body
        )
        response = StreamingResponse(chunks, status_code=status, background=BackgroundTask(close))
        response.raw_headers = out
        return response

    @asynccontextmanager
    async def lifespan(_app):
        state["client"] = _client(kind)
        yield
        await state["client"].close() if kind == "aiohttp" else await state["client"].aclose()

    return Starlette(routes=[Route("/v1/{rest:path}", forward, methods=["POST"])], lifespan=lifespan)


def serve(role: str, port: int, upstream_port: int, chunks: int) -> None:
    import uvicorn

    if role == "upstream":
        app = upstream_app(chunks)
    else:
        kind = role.split("-")[1]
        upstream = f"http://127.0.0.1:{upstream_port}"
        app = raw_proxy(kind, upstream) if role.startswith("raw") else starlette_proxy(kind, upstream)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on" if role != "upstream" else "off",
    )


# --------------------------------------------------------------------------------------------------- load


async def measure(port: int, requests: int, seconds: float) -> dict[str, float]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    small = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    stream = {**small, "stream": True}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(payload) -> int:
            async with session.post(url, json=payload) as resp:
                events = 0
                async for chunk in resp.content.iter_any():
                    events += chunk.count(b"data:")
                assert resp.status == 200
                return events

        for _ in range(20):  # warm up connections and code paths
            await one(small)
        latencies = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await one(small)
            latencies.append((time.perf_counter() - t0) * 1000)
        latencies.sort()

        async def throughput(payload, workers: int) -> float:
            deadline = time.perf_counter() + seconds
            counts = [0] * workers

            async def worker(i: int) -> None:
                while time.perf_counter() < deadline:
                    counts[i] += await one(payload) if payload is stream else (await one(payload), 1)[1]

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(workers)))
            return sum(counts) / (time.perf_counter() - t0)

        return {
            "p50_ms": statistics.median(latencies),
            "p90_ms": latencies[int(len(latencies) * 0.9)],
            "rps_c16": await throughput(small, 16),
            "events_s_c1": await throughput(stream, 1),
            "events_s_c16": await throughput(stream, 16),
        }


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.upstream_port, args.chunks)
        return 0

    upstream_port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                "upstream",
                "--port",
                str(upstream_port),
                "--chunks",
                str(args.chunks),
            ]
        )
    ]
    try:
        wait_port(upstream_port)
        results = {"direct": asyncio.run(measure(upstream_port, args.requests, args.seconds))}
        for variant in args.variants.split(","):
            port = free_port()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve",
                    variant,
                    "--port",
                    str(port),
                    "--upstream-port",
                    str(upstream_port),
                ]
            )
            procs.append(proc)
            wait_port(port)
            results[variant] = asyncio.run(measure(port, args.requests, args.seconds))
            proc.terminate()
            proc.wait(10)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    direct = results["direct"]
    print(
        f"{'stack':<20} {'p50 ms':>8} {'+p50 ms':>8} {'p90 ms':>8} {'rps c16':>9} {'ev/s c1':>9} {'ev/s c16':>9}"
        f" {'stream c1':>9} {'stream c16':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<20} {r['p50_ms']:8.2f} {r['p50_ms'] - direct['p50_ms']:8.2f} {r['p90_ms']:8.2f} "
            f"{r['rps_c16']:9.0f} {r['events_s_c1']:9.0f} {r['events_s_c16']:9.0f} "
            f"{r['events_s_c1'] / direct['events_s_c1']:9.0%} {r['events_s_c16'] / direct['events_s_c16']:10.0%}"
        )
    print(f"(cpu count {os.cpu_count()}; --chunks {args.chunks}; ratios are of direct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
