"""End-to-end lifecycle through the installed `llama-orch`, against the fake llama-server (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Cli, instance_doc
from helpers import free_port, wait_until

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")


def port_free(port: int) -> bool:
    from llama_orchestrator.adapters.ports import is_port_free

    return is_port_free(port)


def start(cli: Cli, name: str) -> dict:
    cli.run("up", name, "-d", "--wait", "--timeout", "30", check=True)
    return cli.ps()[name]


def test_init_up_ps_down_with_the_fake(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    # An explicit free port: the automatic pick starts at 8001, which other programs on a CI machine may take.
    result = cli.run(
        "init",
        "alpha",
        "--model",
        str(tiny_model),
        "--binary",
        str(fake_binary),
        "--port",
        str(free_port()),
        check=True,
    )
    assert "created alpha on port" in result.stdout
    config = cli.json("describe", "alpha")["config"]
    port = config["server"]["port"]

    record = start(cli, "alpha")
    assert record["status"] == "running" and record["health"] == "healthy"
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": []}).json()
    assert answer["choices"][0]["message"]["content"]

    logs = cli.run("logs", "alpha", "--tail", "5", check=True).stdout.splitlines()
    assert 0 < len(logs) <= 5 and any("POST /v1/chat/completions" in line for line in logs)

    pid = record["pid"]
    cli.run("down", "alpha", check=True)
    after = cli.ps()["alpha"]
    assert after["status"] == "stopped" and after["pid"] is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert port_free(port)


def test_init_refuses_to_overwrite_and_picks_distinct_ports(cli: Cli, tiny_model: Path) -> None:
    cli.run("init", "one", "--model", str(tiny_model), check=True)
    cli.run("init", "two", "--model", str(tiny_model), check=True)
    again = cli.run("init", "one", "--model", str(tiny_model), "--port", "9999")
    assert again.returncode == 2 and "already exists" in again.stderr
    ports = {cli.json("describe", n)["config"]["server"]["port"] for n in ("one", "two")}
    assert len(ports) == 2
    assert cli.json("describe", "one")["config"]["server"]["port"] != 9999


def test_init_rejects_bad_names_and_missing_models(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    bad = cli.run("init", "../escape", "--model", str(tiny_model))
    assert bad.returncode == 2 and "invalid instance name" in bad.stderr
    assert not (cli.home.parent / "escape").exists()
    missing = cli.run("init", "ghost", "--model", str(tmp_path / "nope.gguf"))
    assert missing.returncode == 3 and "not found" in missing.stderr


def test_two_simultaneous_up_leave_exactly_one_server(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    port = free_port()
    cli.write_config("race", instance_doc("race", tiny_model, port, fake_binary))
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda: results.append(cli.run("up", "race", "-d"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert sum("already" in r.stdout for r in results) == 1
    servers = [p for p in psutil.process_iter(["cmdline"]) if f"--port {port}" in " ".join(p.info["cmdline"] or [])]
    assert len(servers) == 1
    cli.run("down", "race", check=True)


def test_kill_9_shows_exited_and_a_reused_pid_is_never_signalled(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    port = free_port()
    cli.write_config("victim", instance_doc("victim", tiny_model, port, fake_binary))
    pid = start(cli, "victim")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    record = cli.ps()["victim"]
    assert record["status"] == "exited" and record["pid"] is None
    assert any(e["kind"] == "exited" for e in cli.json("describe", "victim")["events"])

    # An unrelated process now holds a PID the state claims: simulate the reuse by pointing the record at it.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        import sqlite3

        db = sqlite3.connect(cli.home / "state" / "state.sqlite")
        db.execute(
            "UPDATE instances SET status='running', pid=?, create_time=? WHERE name='victim'",
            (bystander.pid, psutil.Process(bystander.pid).create_time() - 1000),
        )
        db.commit()
        db.close()
        cli.run("down", "victim", check=True)
        assert bystander.poll() is None, "down signalled a process that is not ours"
        assert cli.ps()["victim"]["status"] == "stopped"
    finally:
        bystander.kill()
        bystander.wait()


def test_port_in_use_is_refused_before_spawning(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        cli.write_config("blocked", instance_doc("blocked", tiny_model, port, fake_binary))
        result = cli.run("up", "blocked", "-d")
    assert result.returncode == 1 and f"port {port}" in result.stderr and "already in use" in result.stderr
    assert cli.ps()["blocked"]["status"] == "stopped"
    assert not (cli.home / "logs" / "blocked" / "stderr.log").exists()


def test_missing_model_and_missing_binary_are_clear_errors(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    cli.write_config("nomodel", instance_doc("nomodel", tmp_path / "gone.gguf", free_port(), Path("/bin/true")))
    result = cli.run("up", "nomodel", "-d")
    assert result.returncode == 1 and "model file" in result.stderr and "not found" in result.stderr
    cli.write_config("nobin", instance_doc("nobin", tiny_model, free_port(), tmp_path / "no-llama-server"))
    result = cli.run("up", "nobin", "-d")
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_an_instance_that_dies_during_start_reports_its_stderr(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    doc = instance_doc("dies", tiny_model, free_port(), fake_binary, args=["--fake-exit-code", "7"])
    cli.write_config("dies", doc)
    result = cli.run("up", "dies", "-d", "--wait", "--timeout", "20")
    assert result.returncode == 1
    assert "exited during start" in result.stderr
    record = cli.ps()["dies"]
    assert record["status"] == "exited" and record["exit_code"] == 7


def test_stop_kills_what_ignores_sigterm_and_its_children(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    doc = instance_doc(
        "stubborn", tiny_model, free_port(), fake_binary, args=["--fake-ignore-sigterm", "--fake-spawn-child"]
    )
    cli.write_config("stubborn", doc)
    pid = start(cli, "stubborn")["pid"]
    children = wait_until(lambda: psutil.Process(pid).children(recursive=True))
    result = cli.run("down", "stubborn", "--timeout", "1", check=True)
    assert "stopped" in result.stdout
    for process in [psutil.Process(pid) if psutil.pid_exists(pid) else None, *children]:
        if process is not None:
            assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    events = cli.json("describe", "stubborn")["events"]
    assert "killed after 1 s grace" in events[-1]["message"]


def test_logs_follow_and_rm(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    port = free_port()
    cli.write_config("chatty", instance_doc("chatty", tiny_model, port, fake_binary))
    start(cli, "chatty")
    env = dict(os.environ, LLAMA_ORCH_HOME=str(cli.home))
    from conftest import _cli_command

    follower = subprocess.Popen(
        [*_cli_command(), "logs", "chatty", "-f", "--tail", "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        seen: list[str] = []

        def request_logged() -> bool:
            httpx.get(f"http://127.0.0.1:{port}/v1/models")
            line = follower.stdout.readline()
            seen.append(line)
            return "/v1/models" in line

        wait_until(request_logged, timeout=20)
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
    refused = cli.run("rm", "chatty")
    assert refused.returncode == 2 and "stop it first" in refused.stderr
    cli.run("rm", "chatty", "--force", check=True)
    assert "chatty" not in cli.ps()
    assert not (cli.home / "instances" / "chatty").exists()
    assert port_free(port)


def test_unknown_instance_exits_3(cli: Cli) -> None:
    for command in (["describe", "nobody"], ["down", "nobody"], ["logs", "nobody"], ["up", "nobody", "-d"]):
        result = cli.run(*command)
        assert result.returncode == 3, (command, result.stderr)
        assert "no instance named 'nobody'" in result.stderr


def test_init_profile_fills_machine_defaults_under_explicit_options(cli: Cli, tiny_model: Path) -> None:
    import psutil as ps

    cli.run("init", "cpu-one", "--model", str(tiny_model), "--profile", "cpu", check=True)
    config = cli.json("describe", "cpu-one")["config"]
    assert config["model"]["threads"] == (ps.cpu_count(logical=False) or os.cpu_count())
    assert config["gpu"] == {"backend": "cpu", "layers": 0}
    cli.run("init", "gpu-one", "--model", str(tiny_model), "--profile", "cuda", "--gpu-layers", "12", check=True)
    gpu = cli.json("describe", "gpu-one")["config"]["gpu"]
    assert gpu["backend"] == "cuda" and gpu["layers"] == 12, "the user's --gpu-layers wins over the profile's -1"
    refused = cli.run("init", "bad", "--model", str(tiny_model), "--profile", "quantum")
    assert refused.returncode == 2 and "unknown profile" in refused.stderr
