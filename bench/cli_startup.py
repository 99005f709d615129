"""Benchmark: how fast `llama-orch --help` and `llama-orch ps` answer on a home with many instances, without the
daemon (the CLI reads the home) and with it (the CLI asks the daemon's HTTP API).

Speed is measured here, not asserted in tests. Every timing is a fresh subprocess (what a user pays), and each is
reported as a ratio against a bare `python -c pass` of the same interpreter measured in the same process, so the
numbers compare across machines. Goals (issue #14): `ps` with 20 instances <= 100 ms median with and without the
daemon, `--help` <= 80 ms.

    .venv/bin/python bench/cli_startup.py [--runs 15] [--instances 20] [--running 5] [--json] [--importtime]

It builds a throwaway home with --instances instances (made with the real `llama-orch init`) of which --running are
started with the fake llama-server (`up --no-daemon`), times each command --runs times, then starts the daemon
(`llama-orch daemon start`) and times `ps` again, and stops everything at the end. Rows marked "typer path" run
with LLAMA_ORCH_NO_FAST=1: every command through typer, as before the fast path (``cli.fast``), for comparison.
--importtime also lists the slowest imports of `ps` on both paths, without and with the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import cli_command, fake_binary  # this folder is on sys.path: the benchmarks run as scripts

PY = sys.executable


CACHE_DIR = ""  # set in main(): the help cache of the bench's own (so the first run records it)
NO_FAST = {"LLAMA_ORCH_NO_FAST": "1"}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # NO_COLOR and a fixed width keep rich's output (and so its cost) the same from run to run.
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(extra or {})}
    if CACHE_DIR:
        env["LLAMA_ORCH_CACHE_DIR"] = CACHE_DIR
    return env


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=env or child_env(), timeout=timeout, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def build_home(root: Path, instances: int, running: int) -> Path:
    from llama_orchestrator.testing.tiny_gguf import write_tiny_model

    home = root / "home"
    home.mkdir()
    model = write_tiny_model(root / "tiny.gguf")
    binary = fake_binary(root)
    orch = [*cli_command(), "--home", str(home)]
    names = [f"inst-{i:02d}" for i in range(1, instances + 1)]
    for name in names:  # the real CLI, so the configs are exactly what users get (ports picked from 8001)
        run([*orch, "init", name, "--model", str(model), "--context-size", "512", "--binary", str(binary)])
    if running:  # no daemon yet: `ps` is timed first as it reads the home itself
        run([*orch, "up", *names[:running], "-d", "--wait", "--timeout", "60", "--no-daemon"])
    return home


Command = tuple[list[str], dict[str, str]]


def time_command(command: Command, runs: int) -> list[float]:
    cmd, extra = command
    env = child_env(extra)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env, check=True
        )
        samples.append(time.perf_counter() - start)
    return samples


def summarize(samples: list[float], baseline_median: float) -> dict[str, float]:
    median = statistics.median(samples)
    # quantiles(n=10)[-1] is the 90th percentile; "inclusive" keeps it within the observed range for small N.
    p90 = statistics.quantiles(samples, n=10, method="inclusive")[-1] if len(samples) > 1 else samples[0]
    return {
        "median_s": median,
        "p90_s": p90,
        "min_s": min(samples),
        "max_s": max(samples),
        "ratio": median / baseline_median,
    }


def import_times(command: Command, top: int = 10) -> list[tuple[int, int, str]]:
    """(cumulative us, self us, module) of the slowest imports, from PYTHONPROFILEIMPORTTIME (= -X importtime)."""
    cmd, extra = command
    result = run(cmd, env=child_env({**extra, "PYTHONPROFILEIMPORTTIME": "1"}))
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, cumulative_us, module = line.removeprefix("import time:").split("|")
        rows.append((int(cumulative_us), int(self_us), module.rstrip()))
    return sorted(rows, reverse=True)[:top]


def time_all(commands: dict[str, Command], runs: int) -> dict[str, list[float]]:
    for command in commands.values():  # warm-up: .pyc files, the OS file cache, the help cache; not measured
        time_command(command, 1)
    samples: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):  # round-robin, so a burst of machine noise hits every command alike
        for label, command in commands.items():
            samples[label] += time_command(command, 1)
    return samples


def main() -> int:
    global CACHE_DIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per command (default 15)")
    parser.add_argument("--instances", type=int, default=20, help="instances in the home (default 20)")
    parser.add_argument("--running", type=int, default=5, help="of which started with the fake server (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--importtime", action="store_true", help="also show the 10 slowest imports of `ps`")
    args = parser.parse_args()

    slowest: dict[str, list[tuple[int, int, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="llama-orch-bench-") as tmp:
        CACHE_DIR = str(Path(tmp) / "cache")
        orch = [*cli_command(), "--home", str(Path(tmp) / "home")]
        try:
            build_home(Path(tmp), args.instances, min(args.running, args.instances))
            alone: dict[str, Command] = {
                "python -c pass (baseline)": ([PY, "-c", "pass"], {}),
                "llama-orch --help": ([*orch, "--help"], {}),
                "llama-orch --help (typer path)": ([*orch, "--help"], NO_FAST),
                "ps, no daemon": ([*orch, "ps"], {}),
                "ps --json, no daemon": ([*orch, "ps", "--json"], {}),
                "ps, no daemon (typer path)": ([*orch, "ps"], NO_FAST),
                "import llama_orchestrator.cli.commands": ([PY, "-c", "import llama_orchestrator.cli.commands"], {}),
            }
            samples = time_all(alone, args.runs)
            if args.importtime:
                slowest["ps, no daemon"] = import_times(alone["ps, no daemon"])
                slowest["ps, no daemon (typer path)"] = import_times(alone["ps, no daemon (typer path)"])
            run([*orch, "daemon", "start"])
            with_daemon: dict[str, Command] = {
                "ps, daemon": ([*orch, "ps"], {}),
                "ps --json, daemon": ([*orch, "ps", "--json"], {}),
                "ps, daemon (typer path)": ([*orch, "ps"], NO_FAST),
            }
            samples.update(time_all(with_daemon, args.runs))
            if args.importtime:
                slowest["ps, daemon"] = import_times(with_daemon["ps, daemon"])
                slowest["ps, daemon (typer path)"] = import_times(with_daemon["ps, daemon (typer path)"])
        finally:
            if (Path(tmp) / "home" / "instances").exists():
                subprocess.run([*orch, "daemon", "stop"], capture_output=True, env=child_env(), timeout=120)
                subprocess.run([*orch, "down", "--all"], capture_output=True, env=child_env(), timeout=120)

    baseline = statistics.median(samples["python -c pass (baseline)"])
    results = {label: summarize(s, baseline) for label, s in samples.items()}
    meta = {
        "runs": args.runs,
        "instances": args.instances,
        "running": min(args.running, args.instances),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "platform": sys.platform,
    }
    if args.json:
        doc: dict[str, object] = {**meta, "results": results}
        if args.importtime:
            doc["slowest_imports"] = {
                label: [{"module": m.strip(), "cumulative_us": c, "self_us": s} for c, s, m in rows]
                for label, rows in slowest.items()
            }
        print(json.dumps(doc, indent=2))
        return 0

    print(
        f"{args.instances} instances ({meta['running']} running), {args.runs} runs each, "
        f"Python {meta['python']}, {meta['cpus']} CPUs"
    )
    print(f"{'command':<40} {'median':>8} {'p90':>8} {'min':>8} {'max':>8} {'x baseline':>11}")
    for label, r in results.items():
        print(
            f"{label:<40} {r['median_s'] * 1000:>6.0f}ms {r['p90_s'] * 1000:>6.0f}ms {r['min_s'] * 1000:>6.0f}ms "
            f"{r['max_s'] * 1000:>6.0f}ms {r['ratio']:>10.1f}x"
        )
    for label, rows in slowest.items():
        print(f"\nslowest imports of `llama-orch {label}` (cumulative, includes children):")
        for cumulative, self_us, module in rows:
            print(f"{cumulative / 1000:>8.1f}ms  (self {self_us / 1000:>5.1f}ms) {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
