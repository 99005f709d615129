"""`llama-orch` through a daemon's API: the home's own daemon when it runs, and another node's with --host.

Proof that a command went through the API and not around it: the daemon's access log in daemon.log, and the
daemon being the parent of the instances it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Cli, _cli_command, instance_doc
from helpers import free_port, subprocess_env, wait_until
from test_api import Daemon, add_instance, start_daemon

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")


@pytest.fixture
def daemon(cli: Cli) -> Daemon:
    running = start_daemon(cli)
    yield running
    cli.run("daemon", "stop", timeout=60)
    cli.run("down", "--all", "--timeout", "1", timeout=120)


def access_log(daemon: Daemon) -> list[str]:
    return [line.split(" - ", 1)[1] for line in daemon.log().splitlines() if "uvicorn.access" in line]


def called(daemon: Daemon, method: str, path: str) -> bool:
    return any(entry.startswith(f'"{method} {path}') for entry in access_log(daemon))


def test_commands_go_through_the_home_daemon(daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    cli = daemon.cli
    port = add_instance(cli, "alpha", tiny_model, fake_binary)

    up = cli.run("up", "alpha", "-d", "--wait", "--timeout", "30", check=True)
    assert "alpha starting" in up.stdout and "alpha healthy" in up.stdout
    assert called(daemon, "POST", "/api/instances/alpha/start") and called(daemon, "POST", "/api/instances/alpha/wait")
    record = cli.ps()["alpha"]
    assert psutil.Process(record["pid"]).ppid() == daemon.pid()  # the daemon spawned it, not this CLI
    assert called(daemon, "GET", "/api/instances?all=true")

    # The same records as without a daemon (both sides build them with services.instances_port).
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.cli.render import json_ready
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.instances_port import LocalInstances

    local = json_ready(LocalInstances(InstanceService(Home(cli.home)), probe_starting=False).ps()[0])
    assert set(record) == set(local) and record["pid"] == local["pid"] and record["port"] == port

    table = cli.run("ps", check=True).stdout
    assert table.splitlines()[0].split() == [
        "NAME",
        "STATUS",
        "HEALTH",
        "PID",
        "PORT",
        "BACKEND",
        "MODEL",
        "UPTIME",
        "RESTARTS",
    ]
    assert "alpha" in table and "running" in table

    described = cli.json("describe", "alpha")
    assert described["config"]["server"]["port"] == port and described["model_file"]["architecture"] == "llama"
    assert "Model file" in cli.run("describe", "alpha", check=True).stdout
    health = cli.run("health", "alpha", check=True).stdout
    assert "alpha: healthy" in health and "response time" in health
    assert cli.json("health")[0]["name"] == "alpha"
    httpx.get(f"http://127.0.0.1:{port}/v1/models")
    lines = wait_until(
        lambda: [
            x for x in cli.run("logs", "alpha", "--tail", "5", check=True).stdout.splitlines() if "/v1/models" in x
        ],
        timeout=20,
    )
    assert lines
    kinds = [e["kind"] for e in json.loads(cli.run("events", "alpha", "--json", check=True).stdout)]
    assert "started" in kinds

    restarted = cli.run("restart", "alpha", "--timeout", "5", "--wait-timeout", "30", check=True).stdout
    assert "alpha restarted" in restarted and "alpha healthy" in restarted
    assert cli.run("down", "alpha", check=True).stdout.strip() == "alpha stopped"
    assert cli.run("down", "alpha", check=True).stdout.strip() == "alpha was not running"
    for method, path in [
        ("GET", "/api/instances/alpha"),
        ("GET", "/api/instances/alpha/health"),
        ("GET", "/api/instances/alpha/logs"),
        ("GET", "/api/events"),
        ("POST", "/api/instances/alpha/restart"),
        ("POST", "/api/instances/alpha/stop"),
    ]:
        assert called(daemon, method, path), (method, path)


def test_errors_keep_their_exit_codes_through_the_daemon(daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    cli = daemon.cli
    cli.write_config("broken", {"name": "broken", "model": {"path": "x.gguf"}, "server": {"port": "nope"}})
    for command in (
        ["describe", "nobody"],
        ["down", "nobody"],
        ["logs", "nobody"],
        ["up", "nobody", "-d"],
        ["health", "nobody"],
    ):
        result = cli.run(*command)
        assert result.returncode == 3 and "no instance named 'nobody'" in result.stderr, (command, result.stderr)
    bad = cli.run("up", "Bad_Name", "-d")
    assert bad.returncode == 2 and "invalid instance name" in bad.stderr
    broken = cli.run("up", "broken", "-d")
    assert broken.returncode == 2 and "server.port" in broken.stderr
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        cli.write_config("blocked", instance_doc("blocked", tiny_model, squatter.getsockname()[1], fake_binary))
        blocked = cli.run("up", "blocked", "-d")
    assert blocked.returncode == 1 and "already in use" in blocked.stderr
    assert called(daemon, "POST", "/api/instances/blocked/start")


def test_host_targets_another_nodes_daemon(
    cli: Cli, tmp_path: Path, tiny_model: Path, fake_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = start_daemon(cli, api_keys=["router-key"], control_keys=["control-key"])
    elsewhere = Cli(tmp_path / "elsewhere")  # another machine's CLI: its own (empty) home, no daemon
    elsewhere.home.mkdir()
    try:
        add_instance(cli, "remote-one", tiny_model, fake_binary)
        # The home's own CLI finds the daemon and its control key by itself.
        assert [r["name"] for r in cli.json("ps")] == ["remote-one"]

        no_key = elsewhere.run("--host", daemon.url, "ps")
        assert no_key.returncode == 2 and "API key" in no_key.stderr and "--api-key" in no_key.stderr
        wrong = elsewhere.run("--host", daemon.url, "--api-key", "router-key", "ps")
        assert wrong.returncode == 2

        remote = ["--host", daemon.url, "--api-key", "control-key"]
        assert [r["name"] for r in elsewhere.json(*remote, "ps")] == ["remote-one"]
        elsewhere.run(*remote, "up", "remote-one", "-d", "--wait", "--timeout", "30", check=True)
        assert cli.ps()["remote-one"]["status"] == "running"
        status = elsewhere.run(*remote, "daemon", "status", check=True).stdout
        assert f"daemon running at {daemon.url} (pid {daemon.pid()}" in status

        # The same through the environment, with a bare host:port.
        monkeypatch.setenv("LLAMA_ORCH_HOST", daemon.url.removeprefix("http://"))
        monkeypatch.setenv("LLAMA_ORCH_API_KEY", "control-key")
        assert elsewhere.run("down", "remote-one", check=True).stdout.strip() == "remote-one stopped"
        for command in (
            ["init", "x", "--model", str(tiny_model)],
            ["rm", "remote-one"],
            ["config", "validate"],
            ["daemon", "stop"],
        ):
            refused = elsewhere.run(*command)
            assert refused.returncode == 2 and "--host" in refused.stderr, (command, refused.stderr)
        assert (cli.home / "instances" / "remote-one").is_dir()
        monkeypatch.delenv("LLAMA_ORCH_HOST")
        monkeypatch.delenv("LLAMA_ORCH_API_KEY")

        nobody = elsewhere.run("--host", f"http://127.0.0.1:{free_port()}", "ps")
        assert nobody.returncode == 1 and "cannot reach the API" in nobody.stderr
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)


def test_logs_follow_and_attached_up_through_the_daemon(daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    cli = daemon.cli
    port = add_instance(cli, "chatty", tiny_model, fake_binary)
    env = subprocess_env({"LLAMA_ORCH_HOME": str(cli.home)})

    # `up` without -d: the logs stream here, through the API, and Ctrl-C stops the instance.
    attached = subprocess.Popen(
        [*_cli_command(), "up", "chatty"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        first = attached.stdout.readline()
        assert first.startswith("chatty starting"), first
        assert attached.stdout.readline().startswith("chatty | ")
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200,
            timeout=30,
            ignore=(httpx.TransportError,),
        )
        attached.send_signal(signal.SIGINT)
        attached.wait(30)
    finally:
        if attached.poll() is None:
            attached.kill()
    assert "stopping" in attached.stderr.read()
    assert cli.ps()["chatty"]["status"] == "stopped"
    assert called(daemon, "GET", "/api/instances/chatty/logs?tail=0&follow=true&until_exit=true")
    assert called(daemon, "POST", "/api/instances/chatty/stop")

    cli.run("up", "chatty", "-d", "--wait", "--timeout", "30", check=True)
    follower = subprocess.Popen(
        [*_cli_command(), "logs", "chatty", "-f", "--tail", "0"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:

        def request_logged() -> bool:
            httpx.get(f"http://127.0.0.1:{port}/v1/models")
            return "/v1/models" in follower.stdout.readline()

        wait_until(request_logged, timeout=20)
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
    assert follower.returncode == 0
    assert called(daemon, "GET", "/api/instances/chatty/logs?tail=0&stream=both&follow=true")


def test_a_daemon_whose_api_does_not_answer_is_worked_around(cli: Cli) -> None:
    # A PID file naming a live process (a stand-in: the check is PID + create time) and an API nobody serves.
    stand_in = subprocess.Popen(["sleep", "60"])
    try:
        me = psutil.Process(stand_in.pid)
        (cli.home / "state").mkdir(parents=True, exist_ok=True)
        (cli.home / "state" / "daemon.pid").write_text(
            json.dumps(
                {
                    "pid": me.pid,
                    "create_time": me.create_time(),
                    "started_at": 1.0,
                    "version": "0",
                    "api_url": f"http://127.0.0.1:{free_port()}",
                }
            )
        )
        result = cli.run("ps", check=True)
        assert "no instances yet" in result.stdout
        assert "does not answer on its API" in result.stderr and "acting on the home directly" in result.stderr
    finally:
        stand_in.kill()
        stand_in.wait()


# -- the client alone, against httpx.MockTransport ------------------------------------------------------------------


def test_api_errors_come_back_as_the_projects_errors() -> None:
    from llama_orchestrator.adapters.api_client import ApiClient, RemoteInstances, normalize_url
    from llama_orchestrator.domain.errors import NotFoundError, OrchestratorError, StartError, UsageError

    answers = {
        "/api/instances/a": (
            404,
            {
                "error": {
                    "message": "no instance named 'a'",
                    "type": "not_found_error",
                    "param": None,
                    "code": "instance_not_found",
                }
            },
        ),
        "/api/instances/b": (
            422,
            {
                "error": {
                    "message": "invalid config",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_config",
                }
            },
        ),
        "/api/instances/c": (
            401,
            {
                "error": {
                    "message": "missing key",
                    "type": "authentication_error",
                    "param": None,
                    "code": "missing_or_wrong_key",
                }
            },
        ),
        "/api/instances/d": (
            409,
            {"error": {"message": "port taken", "type": "conflict_error", "param": None, "code": "start_failed"}},
        ),
        "/api/instances/e": (500, "plain text, not JSON"),
    }

    def app(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k"
        status, body = answers[request.url.path]
        return httpx.Response(status, json=body) if isinstance(body, dict) else httpx.Response(status, text=body)

    remote = RemoteInstances(ApiClient("example:1/", "k", transport=httpx.MockTransport(app)))
    assert remote.origin == "http://example:1" == normalize_url(" http://example:1/ ")
    expected = {
        "a": (NotFoundError, 3),
        "b": (UsageError, 2),
        "c": (UsageError, 2),
        "d": (StartError, 1),
        "e": (OrchestratorError, 1),
    }
    for name, (kind, code) in expected.items():
        with pytest.raises(kind) as caught:
            remote.describe(name)
        assert caught.value.exit_code == code
    with pytest.raises(UsageError, match="--api-key"):
        remote.describe("c")
    with pytest.raises(OrchestratorError, match="plain text"):
        remote.describe("e")
