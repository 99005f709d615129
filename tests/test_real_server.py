"""The acceptance path against the real llama-server from llama.cpp and the generated tiny model.

The model has random weights: requests ask for deterministic output and the tests assert only what does not depend
on sampling (status, roles, token counts, finish reasons, log lines the server itself writes)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Cli
from helpers import wait_until

pytestmark = pytest.mark.real_server


def servers_on(port: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and "llama-server" in cmdline[0] and str(port) in cmdline:
            found.append(process)
    return found


def test_init_up_chat_logs_down(cli: Cli, tiny_model: Path, real_binary: Path) -> None:
    cli.run(
        "init", "tiny", "--model", str(tiny_model), "--context-size", "512", "--binary", str(real_binary), check=True
    )
    cli.run("up", "tiny", "-d", "--wait", "--timeout", "60", check=True)
    record = cli.ps()["tiny"]
    port = record["port"]
    assert (record["status"], record["health"]) == ("running", "healthy")
    table = cli.run("ps", check=True).stdout
    assert "tiny" in table and "running" in table and "healthy" in table and str(port) in table

    reply = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        # Deterministic (greedy, fixed seed, exactly max_tokens): the model's random weights sample noise.
        # The bias picks the byte token "a" (tiny_gguf's vocab: 3 special tokens, then the 256 bytes).
        json={
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "temperature": 0,
            "seed": 42,
            "top_k": 1,
            "ignore_eos": True,
            "logit_bias": [[3 + ord("a"), 100]],
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] == 4 and answer["choices"][0]["finish_reason"] == "length"
    assert answer["choices"][0]["message"]["content"] == "aaaa"

    logs = cli.run("logs", "tiny", "--tail", "5", check=True).stdout.splitlines()
    assert len(logs) == 5
    everything = cli.run("logs", "tiny", "--tail", "0", check=True).stdout
    assert "llama_server" in everything or "main:" in everything or "srv" in everything

    describe = cli.json("describe", "tiny")
    assert describe["model_file"]["architecture"] == "llama"
    assert describe["model_file"]["context_length"] == 512

    cli.run("down", "tiny", check=True)
    record = cli.ps()["tiny"]
    assert record["status"] == "stopped"
    from llama_orchestrator.adapters.ports import is_port_free

    assert is_port_free(port)
    assert servers_on(port) == []


def test_simultaneous_up_starts_one_real_server(cli: Cli, tiny_model: Path, real_binary: Path) -> None:
    cli.run("init", "race", "--model", str(tiny_model), "--binary", str(real_binary), "-c", "512", check=True)
    port = cli.json("describe", "race")["config"]["server"]["port"]
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def up() -> None:
        barrier.wait()
        codes.append(cli.run("up", "race", "-d").returncode)

    threads = [threading.Thread(target=up) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [0, 0]
    wait_until(lambda: cli.ps()["race"]["health"] == "healthy" or cli.run("health", "race").returncode == 0, timeout=60)
    assert len(servers_on(port)) == 1
    cli.run("down", "race", check=True)
    assert servers_on(port) == []


def test_kill_9_of_the_real_server_is_shown_as_exited(cli: Cli, tiny_model: Path, real_binary: Path) -> None:
    cli.run("init", "victim", "--model", str(tiny_model), "--binary", str(real_binary), "-c", "512", check=True)
    cli.run("up", "victim", "-d", "--wait", "--timeout", "60", check=True)
    pid = cli.ps()["victim"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: cli.ps()["victim"]["status"] == "exited", timeout=20)
    assert cli.ps()["victim"]["pid"] is None
    cli.run("down", "victim", check=True)
    assert cli.ps()["victim"]["status"] == "stopped"
