"""The CLI against Docker's habits: completion, `ps -q/--filter/--format`, `events --tail 0/-f/--since`, `stats`,
one JSON convention for every `--json`, whole lines when piped. The installed `llama-orch`, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import Cli, _cli_command, instance_doc
from helpers import free_port, subprocess_env, wait_until
from llama_orchestrator.cli import ps_query
from llama_orchestrator.cli.stats import Sample, Usage, counters, rows
from llama_orchestrator.domain.errors import UsageError
from llama_orchestrator.domain.timespec import BadTime, parse_time

LONG = "a-rather-long-instance-name-that-a-pipe-must-not-cut"


def run_piped(cli: Cli, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with stdout a pipe and no COLUMNS (as `llama-orch ps | grep x`)."""
    base = subprocess_env(
        {"LLAMA_ORCH_HOME": str(cli.home), "LLAMA_ORCH_NO_DAEMON": "1", "NO_COLOR": "1", **(env or {})}
    )
    base.pop("COLUMNS", None)
    base.pop("LINES", None)
    return subprocess.run(
        [*_cli_command(), *args], capture_output=True, text=True, timeout=120, env=base, stdin=subprocess.DEVNULL
    )


@pytest.fixture
def three(cli: Cli, tiny_model: Path, fake_binary: Path) -> Cli:
    cli.write_config(LONG, instance_doc(LONG, tiny_model, free_port(), fake_binary, aliases=["chat"]))
    cli.write_config("beta", instance_doc("beta", tiny_model, free_port(), fake_binary))
    cli.write_config("gamma", instance_doc("gamma", Path("/models/other-q4.gguf"), free_port(), fake_binary))
    return cli


# -- shell completion -------------------------------------------------------------------------------------------


def test_install_completion_bash_writes_the_script_and_it_completes(tmp_path: Path) -> None:
    env = subprocess_env({"HOME": str(tmp_path), "SHELL": "/bin/bash"})
    done = subprocess.run(
        [*_cli_command(), "--install-completion", "bash"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    script = tmp_path / ".bash_completions" / "llama-orch.sh"
    assert "_LLAMA_ORCH_COMPLETE=complete_bash" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()
    # What bash asks when one presses Tab after `llama-orch p`:
    answer = subprocess.run(
        [*_cli_command()],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**env, "_LLAMA_ORCH_COMPLETE": "complete_bash", "COMP_WORDS": "llama-orch p", "COMP_CWORD": "1"},
    )
    assert "ps" in answer.stdout.split()


# -- ps ---------------------------------------------------------------------------------------------------------


def test_ps_quiet_filter_and_format(three: Cli) -> None:
    def out(*args: str) -> str:
        return three.run("ps", *args, check=True).stdout

    assert out("-q").split() == [LONG, "beta", "gamma"]
    assert out("-q", "--filter", "status=stopped").split() == [LONG, "beta", "gamma"]
    assert out("-q", "--filter", "status=running") == ""
    assert out("-q", "--filter", "alias=chat").split() == [LONG]
    assert out("-q", "--filter", "model=other").split() == ["gamma"]
    assert out("-q", "--filter", "name=et", "--filter", "name=gam").split() == ["beta", "gamma"]  # one key: OR
    assert out("-q", "--filter", "name=a", "--filter", "model=tiny").split() == [LONG, "beta"]  # two keys: AND
    assert out("--format", "{{.Name}}:{{.Status}}", "-f", "name=beta") == "beta:stopped\n"
    table = out("--format", "table {{.Names}}\\t{{.State}}").splitlines()
    assert table[0].split() == ["NAMES", "STATE"] and table[2].split() == ["beta", "stopped"]
    lines = out("--format", "json").splitlines()  # docker ps --format json: one object per line
    assert [json.loads(line)["name"] for line in lines] == [LONG, "beta", "gamma"]
    assert json.loads(out("--format", "{{json .Aliases}}", "-f", "alias=chat")) == ["chat"]
    bad = three.run("ps", "--filter", "colour=red")
    assert bad.returncode == 2 and "invalid filter" in bad.stderr
    bad = three.run("ps", "--format", "{{.Colour}}")
    assert bad.returncode == 2 and "can't evaluate field Colour" in bad.stderr


def test_piped_ps_is_never_cut_to_80_columns(three: Cli) -> None:
    done = run_piped(three, "ps")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith(LONG))
    assert "tiny.gguf" in row and "…" not in row


def test_filter_parsing_and_template_rendering() -> None:
    wanted = ps_query.parse_filters(["status=exited", "health=healthy"])
    records = [
        {"name": "a", "status": "exited", "health": "healthy"},
        {"name": "b", "status": "exited", "health": "unknown"},
    ]
    assert [r["name"] for r in ps_query.apply_filters(records, wanted)] == ["a"]
    with pytest.raises(UsageError):
        ps_query.parse_filters(["status"])
    with pytest.raises(UsageError):
        ps_query.render_format(records, "no placeholders", lambda r, k: "")
    text = ps_query.render_format(records, "table {{.Name}}\\t{{.Health}}", lambda r, k: str(r[k]))
    assert text.splitlines() == ["NAME   HEALTH", "a      healthy", "b      unknown"]


# -- events -----------------------------------------------------------------------------------------------------


def add_event(cli: Cli, kind: str, message: str, ts: float | None = None) -> None:
    from llama_orchestrator.adapters.store import Store

    store = Store(cli.home / "state" / "state.sqlite")
    try:
        store.add_event("beta", kind, message, time.time() if ts is None else ts)
    finally:
        store.close()


def test_events_json_is_an_array_with_iso_times_and_epochs(three: Cli) -> None:
    three.run("ps", check=True)  # creates the store
    add_event(three, "note", "an hour ago", time.time() - 3600)
    add_event(three, "note", "now")
    events = json.loads(three.run("events", "--json", check=True).stdout)
    assert isinstance(events, list) and [e["message"] for e in events][-2:] == ["an hour ago", "now"]
    last = events[-1]
    assert abs(last["time_epoch"] - time.time()) < 60
    assert datetime.fromisoformat(last["time"]).timestamp() == pytest.approx(last["time_epoch"], abs=0.001)
    assert datetime.fromisoformat(last["time"]).tzinfo is not None
    assert json.loads(three.run("events", "--tail", "0", "--json", check=True).stdout) == []
    recent = json.loads(three.run("events", "--since", "10m", "--json", check=True).stdout)
    assert [e["message"] for e in recent] == ["now"]
    older = json.loads(three.run("events", "--until", "30m", "--json", check=True).stdout)
    assert "an hour ago" in [e["message"] for e in older] and "now" not in [e["message"] for e in older]
    assert three.run("events", "--since", "yesterday-ish").returncode == 2


def test_events_follow_with_tail_0_prints_only_new_events(three: Cli) -> None:
    three.run("ps", check=True)
    add_event(three, "note", "old")
    env = subprocess_env({"LLAMA_ORCH_HOME": str(three.home), "LLAMA_ORCH_NO_DAEMON": "1"})
    follower = subprocess.Popen(
        [*_cli_command(), "events", "-f", "--tail", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    seen: list[dict] = []
    reader = threading.Thread(target=lambda: seen.extend(json.loads(line) for line in follower.stdout), daemon=True)
    reader.start()
    try:
        count = iter(range(10_000))

        def arrived() -> bool:
            add_event(three, "note", f"new {next(count)}")  # until the follower, started before, prints one
            return bool(seen)

        wait_until(arrived, 30, interval=0.2, message="a new event printed by events -f --tail 0")
        assert seen[0]["message"].startswith("new ") and "time_epoch" in seen[0]
        assert all(e["message"] != "old" for e in seen)
    finally:
        follower.terminate()
        follower.wait(30)


def test_since_and_until_take_docker_s_forms() -> None:
    now = 1_000_000.0
    assert parse_time("10m", now) == now - 600
    assert parse_time("1h30m", now) == now - 5400
    assert parse_time("1733050000", now) == 1733050000
    assert parse_time("2026-12-01T10:00:00Z", now) == datetime.fromisoformat("2026-12-01T10:00:00+00:00").timestamp()
    with pytest.raises(BadTime):
        parse_time("soon", now)


# -- stats ------------------------------------------------------------------------------------------------------


def test_stats_rates_from_two_samples() -> None:
    metrics = (
        'llama_orch_instance_requests_total{model_name="a",endpoint="/v1/completions",code="200"} 10\n'
        'llama_orch_instance_requests_total{model_name="a",endpoint="other",code="404"} 2\n'
        'llama_orch_instance_completion_tokens_total{model_name="a"} 300\n'
    )
    requests, tokens = counters(metrics)
    assert requests == {"a": 12} and tokens == {"a": 300}
    before = Sample(at=10.0, usage={"a": Usage(cpu_s=1.0, rss=100, pids=1)}, requests={"a": 12}, tokens={"a": 300})
    after = Sample(
        at=12.0,
        usage={"a": Usage(cpu_s=2.5, rss=200, pids=1)},
        requests={"a": 16},
        tokens={"a": 500},
        memory_total=1000,
    )
    [row] = rows(["a"], before, after)
    assert row["cpu_percent"] == pytest.approx(75.0)
    assert (row["memory_bytes"], row["memory_percent"]) == (200, pytest.approx(20.0))
    assert (row["requests_per_second"], row["tokens_per_second"]) == (2.0, 100.0)
    [unknown] = rows(["b"], before, after)
    assert unknown["cpu_percent"] is None and unknown["requests_per_second"] is None


@pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")
def test_stats_no_stream_and_the_json_of_a_running_instance(three: Cli) -> None:
    three.run("up", "beta", "-d", "--wait", "--timeout", "60", check=True, timeout=120)
    try:
        assert three.run("ps", "-q", "--filter", "status=running", check=True).stdout.split() == ["beta"]
        [row] = json.loads(three.run("stats", "--no-stream", "--json", "--interval", "0.5", check=True).stdout)
        assert row["name"] == "beta" and row["pids"] >= 1
        assert row["memory_bytes"] > 0 and row["cpu_percent"] is not None
        assert row["requests_per_second"] is None  # no daemon: no router to count requests
        table = three.run("stats", "--no-stream", "--interval", "0.2", check=True).stdout.splitlines()
        assert table[0].split()[:3] == ["NAME", "CPU", "%"] and table[1].startswith("beta")
        [record] = [r for r in json.loads(three.run("ps", "--json", check=True).stdout) if r["name"] == "beta"]
        assert datetime.fromisoformat(record["started_at"]).tzinfo is not None
        assert abs(record["started_at_epoch"] - time.time()) < 300
        [probe] = json.loads(three.run("health", "beta", "--json", check=True).stdout)
        assert datetime.fromisoformat(probe["checked_at"]).tzinfo is not None and probe["checked_at_epoch"] > 0
        described = json.loads(three.run("describe", "beta", "--json", check=True).stdout)
        assert all("ts" not in e and e["time_epoch"] > 0 for e in described["events"])
    finally:
        three.run("down", "--all", "--timeout", "2", timeout=60)


def test_ps_backend_shows_what_auto_resolves_to(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    cli.write_config("by-path", instance_doc("by-path", tiny_model, free_port(), fake_binary))
    cli.write_config("by-name", instance_doc("by-name", tiny_model, free_port(), "vk"))
    cli.write_config("unknown", instance_doc("unknown", tiny_model, free_port(), "/nowhere/llama-server"))
    cli.write_config(
        "pinned", {**instance_doc("pinned", tiny_model, free_port(), fake_binary), "gpu": {"backend": "cuda"}}
    )
    before = {r["name"]: r for r in json.loads(cli.run("ps", "--json", check=True).stdout)}
    assert before["by-path"]["backend"] == "auto" and before["by-path"]["backend_resolved"] is None
    cli.run("bins", "add", "vk", str(fake_binary), "--backend", "vulkan", check=True)
    records = {r["name"]: r for r in json.loads(cli.run("ps", "--json", check=True).stdout)}
    assert {n: (r["backend"], r["backend_resolved"]) for n, r in records.items()} == {
        "by-path": ("auto", "vulkan"),
        "by-name": ("auto", "vulkan"),
        "unknown": ("auto", None),
        "pinned": ("cuda", "cuda"),
    }
    table = {
        line.split()[0]: line.split()[5] for line in cli.run("ps", check=True).stdout.splitlines()[1:] if line.strip()
    }
    assert table == {"by-name": "vulkan", "by-path": "vulkan", "pinned": "cuda", "unknown": "auto"}
    assert cli.run("ps", "-q", "--filter", "backend=vulkan", check=True).stdout.split() == ["by-name", "by-path"]
