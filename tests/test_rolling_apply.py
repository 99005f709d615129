"""Zero-downtime `up` of replicas: two instances share an alias, a client streams through the daemon's router at
concurrency 4, their configs change and `llama-orch up --all -d --wait` recreates them one after the other (the
router drains each before it is stopped); every request answers 200 with a whole stream.

The daemon, the CLI, the instances and the client are real processes on real sockets; the fake llama-server first
(fast), then the real one with the tiny generated model."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import Cli, instance_doc
from helpers import free_port, wait_until
from test_api import Daemon, start_daemon

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")

REPLICAS = ("r1", "r2")
CONCURRENCY = 4
LIFECYCLE = ("stopped", "exited", "started", "recreated")  # events of a stop and a start


@dataclass
class Outcome:
    status: int
    instance: str | None
    complete: bool  # the stream ended with [DONE]
    error: str | None = None


@dataclass
class StreamingClient:
    """CONCURRENCY threads, each streaming one chat completion after another through the router until stopped."""

    url: str
    body: dict
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> StreamingClient:
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CONCURRENCY)]
        for thread in self.threads:
            thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                self._one(client)

    def _one(self, client: httpx.Client) -> None:
        try:
            with client.stream("POST", "/v1/chat/completions", json=self.body) as response:
                lines = list(response.iter_lines())
                outcome = Outcome(
                    response.status_code,
                    response.headers.get("x-llama-orch-instance"),
                    "data: [DONE]" in lines,
                    None if response.status_code == 200 else "\n".join(lines),
                )
        except httpx.HTTPError as exc:
            outcome = Outcome(0, None, False, f"{type(exc).__name__}: {exc}")
        with self.lock:
            self.outcomes.append(outcome)

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def finish(self) -> list[Outcome]:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)
        return list(self.outcomes)


def events(cli: Cli) -> list[dict]:
    """`events --json` prints one object per line."""
    out = cli.run("events", "--tail", "500", "--json", check=True).stdout
    return json.loads(out)  # an array


def rolling_apply(daemon: Daemon, configure: Callable[[str, int], dict], body: dict, *, timeout: float) -> None:
    """Both replicas up; the client streaming; configs changed; `up --all -d --wait`; the checks."""
    cli = daemon.cli
    for name in REPLICAS:
        cli.write_config(name, configure(name, 0))
    cli.run("up", *REPLICAS, "-d", "--wait", timeout=timeout, check=True)
    old = {name: cli.ps()[name]["pid"] for name in REPLICAS}
    client = StreamingClient(daemon.url, body).start()
    try:
        wait_until(lambda: client.count() >= 8, timeout, message="the client streams through the router")
        before = max((e["id"] for e in events(cli)), default=0)
        for name in REPLICAS:
            cli.write_config(name, configure(name, 1))  # a process field changed: `up` recreates it
        ahead = client.count()
        applied = cli.run("up", "--all", "-d", "--wait", timeout=timeout)
        seen = client.count()
        wait_until(lambda: client.count() >= seen + 8, timeout, message="the client streams after the apply")
    finally:
        outcomes = client.finish()
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert seen > ahead  # the load overlapped the apply: requests finished while it ran

    failed = [o for o in outcomes if o.status != 200 or not o.complete]
    assert failed == [], failed[:5]
    assert {o.instance for o in outcomes} == set(REPLICAS)  # both served
    new = {name: cli.ps()[name]["pid"] for name in REPLICAS}
    assert all(new[n] != old[n] for n in REPLICAS), (old, new)

    # One after the other: every stop and start of the second replica came after the first was recreated.
    lifecycle = [e for e in events(cli) if e["id"] > before and e["instance"] in REPLICAS and e["kind"] in LIFECYCLE]
    order = [e["instance"] for e in lifecycle]
    assert sorted(set(order)) == sorted(REPLICAS), lifecycle
    first = order[0]
    assert order == sorted(order, key=lambda n: n != first), [(e["instance"], e["kind"]) for e in lifecycle]
    assert [e["instance"] for e in lifecycle if e["kind"] == "recreated"] == [first, *(set(REPLICAS) - {first})]


@pytest.fixture
def daemon(cli: Cli):
    running = start_daemon(cli)
    try:
        yield running
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "2", timeout=120)


def test_rolling_apply_of_two_fake_replicas_loses_no_request(
    daemon: Daemon, tiny_model: Path, fake_binary: Path
) -> None:
    ports = {name: free_port() for name in REPLICAS}

    def configure(name: str, version: int) -> dict:
        doc = instance_doc(
            name,
            tiny_model,
            ports[name],
            fake_binary,
            aliases=["shared"],
            args=["--fake-token-delay", "0.02", "--fake-tokens", "10"],
        )
        doc["model"]["context_size"] = 512 + 128 * version
        doc["server"]["parallel"] = 2
        return doc

    body = {"model": "shared", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    rolling_apply(daemon, configure, body, timeout=120)


@pytest.mark.real_server
def test_rolling_apply_of_two_real_replicas_loses_no_request(
    daemon: Daemon, tiny_model: Path, real_binary: Path
) -> None:
    ports = {name: free_port() for name in REPLICAS}

    def configure(name: str, version: int) -> dict:
        doc = instance_doc(name, tiny_model, ports[name], real_binary, aliases=["shared"], args=["--alias", name])
        doc["model"]["context_size"] = 512 + 256 * version
        doc["server"]["parallel"] = 2
        return doc

    body = {
        "model": "shared",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
        "max_tokens": 16,
        "temperature": 0,
        "seed": 42,
    }
    rolling_apply(daemon, configure, body, timeout=300)
