"""The daemon's control API over real sockets: `llama-orch daemon start` on a free port, the fake llama-server.

Also the app's own rules in-process (on a real socket, with a stand-in router): keys, router wiring, lifespan.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Cli, instance_doc
from helpers import free_port, wait_until

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")


@dataclass
class Daemon:
    cli: Cli
    url: str
    keys: dict[str, str]

    def pid(self) -> int:
        return json.loads((self.cli.home / "state" / "daemon.pid").read_text())["pid"]

    def client(self, key: str | None = "control", timeout: float = 60) -> httpx.Client:
        token = self.keys.get(key) if key else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # State-changing /api calls must be JSON (api.server's browser rules), as the CLI's client sends them.
        headers["Content-Type"] = "application/json"
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def log(self) -> str:
        return (self.cli.home / "state" / "daemon.log").read_text()


def start_daemon(cli: Cli, **api: object) -> Daemon:
    port = free_port()
    settings = cli.home / "orchestrator.json"
    settings.write_text(json.dumps({"api": {"port": port, **api}}))
    settings.chmod(0o600)  # it may hold keys: a settings file with keys that others can read is refused
    cli.daemon = True
    result = cli.run("daemon", "start", check=True)
    url = f"http://127.0.0.1:{port}"
    assert f"API: {url}" in result.stdout
    keys = {
        "control": (api.get("control_keys") or api.get("api_keys") or [None])[0],  # type: ignore[index]
        "router": (api.get("api_keys") or [None])[0],
    }  # type: ignore[index]
    return Daemon(cli, url, keys)


@pytest.fixture
def daemon(cli: Cli) -> Iterator[Daemon]:
    running = start_daemon(cli)
    try:
        yield running
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)


def add_instance(cli: Cli, name: str, model: Path, binary: Path, **extra: object) -> int:
    port = free_port()
    cli.write_config(name, instance_doc(name, model, port, binary, **extra))
    return port


# -- the control API against a real daemon -------------------------------------------------------------------------


def test_lifecycle_through_the_control_api(daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    port = add_instance(daemon.cli, "alpha", tiny_model, fake_binary)
    with daemon.client() as api:
        listed = api.get("/api/instances").json()
        assert [(r["name"], r["status"]) for r in listed] == [("alpha", "stopped")]

        started = api.post("/api/instances/alpha/start", params={"wait": "true", "timeout": 30})
        assert started.status_code == 200, started.text
        record = started.json()
        assert record["already_running"] is False and record["port"] == port
        assert record["instance"]["status"] == "running" and record["instance"]["health"] == "healthy"
        # The daemon spawned it: the API is not a front for a CLI process.
        assert psutil.Process(record["pid"]).ppid() == daemon.pid()
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200

        again = api.post("/api/instances/alpha/start").json()
        assert again["already_running"] is True and again["pid"] == record["pid"]

        described = api.get("/api/instances/alpha").json()
        assert described["config"]["server"]["port"] == port
        assert described["model_file"]["architecture"] == "llama"
        assert [e["kind"] for e in described["events"]][-2:] == ["started", "healthy"]

        probe = api.get("/api/instances/alpha/health").json()
        assert probe["health"] == "healthy" and probe["response_ms"] is not None

        events = api.get("/api/events", params={"instance": "alpha"}).json()
        assert [e["kind"] for e in events][:2] == ["started", "healthy"]
        assert all(e["instance"] == "alpha" for e in events)
        newer = api.get("/api/events", params={"after_id": events[0]["id"], "limit": 1000}).json()
        assert events[0]["id"] not in [e["id"] for e in newer] and events[1]["id"] in [e["id"] for e in newer]

        restarted = api.post("/api/instances/alpha/restart", params={"wait": "true", "timeout": 5}).json()
        assert restarted["pid"] != record["pid"] and restarted["healthy"] is True

        stopped = api.post("/api/instances/alpha/stop", params={"timeout": 5}).json()
        assert stopped == {"name": "alpha", "was_running": True, "status": "stopped"}
        assert api.post("/api/instances/alpha/stop").json()["was_running"] is False
        assert api.get("/api/instances/alpha").json()["status"] == "stopped"

        info = api.get("/api/daemon").json()
        assert info["pid"] == daemon.pid() and info["api_url"] == daemon.url and info["uptime_s"] >= 0
    assert 'POST /api/instances/alpha/start?wait=true&timeout=30 HTTP/1.1" 200' in daemon.log()


def test_errors_map_to_statuses_with_one_body_shape(daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    daemon.cli.write_config("broken", {"name": "broken", "model": {"path": "x.gguf"}, "server": {"port": "nope"}})
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        daemon.cli.write_config("blocked", instance_doc("blocked", tiny_model, taken, fake_binary))
        with daemon.client() as api:
            # OpenAI's error object: type the category, code the kind, param the parameter at fault.
            invalid = "invalid_request_error"
            cases = {
                ("GET", "/api/instances/nobody"): (404, "not_found_error", "instance_not_found", "no instance named"),
                ("POST", "/api/instances/nobody/start"): (404, "not_found_error", "instance_not_found", "nobody"),
                ("POST", "/api/instances/Bad_Name/stop"): (400, invalid, "invalid_request", "invalid instance name"),
                ("POST", "/api/instances/broken/start"): (422, invalid, "invalid_config", "server.port"),
                ("POST", "/api/instances/blocked/start"): (409, "conflict_error", "start_failed", "already in use"),
                ("GET", "/api/events?limit=0"): (422, invalid, "invalid_parameter", "limit"),
                ("GET", "/api/nothing-here"): (404, "not_found_error", "not_found", "Not Found"),
            }
            for (method, path), (status, kind, code, text) in cases.items():
                answer = api.request(method, path)
                assert answer.status_code == status, (path, answer.text)
                error = answer.json()["error"]
                assert (error["type"], error["code"]) == (kind, code) and text in error["message"], (path, error)
                assert error["param"] == ("limit" if code == "invalid_parameter" else None), (path, error)


def test_openapi_schema_and_docs_are_served(daemon: Daemon) -> None:
    with daemon.client(key=None) as api:
        schema = api.get("/openapi.json").json()
        assert schema["info"]["title"] == "llama-orchestrator"
        for path in (
            "/api/instances",
            "/api/instances/{name}",
            "/api/instances/{name}/start",
            "/api/instances/{name}/stop",
            "/api/instances/{name}/restart",
            "/api/instances/{name}/health",
            "/api/instances/{name}/logs",
            "/api/events",
            "/api/daemon",
            "/metrics",
            "/healthz",
        ):
            assert path in schema["paths"], path
        start = schema["paths"]["/api/instances/{name}/start"]["post"]
        assert {p["name"] for p in start["parameters"]} >= {"name", "wait", "timeout"}
        docs = api.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert api.get("/healthz").json()["status"] == "ok"


def test_log_follow_streams_lines_as_they_are_written(daemon: Daemon, tiny_model: Path, fake_binary: Path) -> None:
    port = add_instance(daemon.cli, "chatty", tiny_model, fake_binary)
    with daemon.client() as api:
        api.post("/api/instances/chatty/start", params={"wait": "true", "timeout": 30}).raise_for_status()
        tail = api.get("/api/instances/chatty/logs", params={"tail": 2, "format": "json"}).json()
        assert 0 < len(tail) <= 2

        seen: list[str] = []
        with api.stream(
            "GET", "/api/instances/chatty/logs", params={"follow": "true", "tail": 1}, timeout=httpx.Timeout(30)
        ) as stream:
            assert stream.headers["content-type"].startswith("text/plain")
            lines = stream.iter_lines()
            seen.append(next(lines))  # the tail comes first

            def request_logged() -> bool:
                httpx.get(f"http://127.0.0.1:{port}/v1/models")
                seen.append(next(lines))
                return "/v1/models" in seen[-1]

            wait_until(request_logged, timeout=20)

        # Server-sent events, chosen by the Accept header: one event per line, named after its stream.
        with api.stream(
            "GET",
            "/api/instances/chatty/logs",
            params={"follow": "true", "tail": 1, "stream": "stderr"},
            headers={"Accept": "text/event-stream"},
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            assert next(lines) == "event: stderr" and next(lines).startswith("data: ") and next(lines) == ""

        # until_exit: the stream ends by itself once the instance has stopped.
        done = threading.Event()
        got: list[str] = []

        def read_until_exit() -> None:
            with (
                daemon.client() as own,
                own.stream(
                    "GET", "/api/instances/chatty/logs", params={"follow": "true", "tail": 0, "until_exit": "true"}
                ) as stream,
            ):
                got.extend(stream.iter_lines())
            done.set()

        reader = threading.Thread(target=read_until_exit, daemon=True)
        reader.start()
        wait_until(lambda: got, timeout=20, message="the whole log first")
        api.post("/api/instances/chatty/stop", params={"timeout": 5}).raise_for_status()
        assert done.wait(20), "the stream did not end after the instance exited"


def test_daemon_stop_ends_open_streams_and_leaves_instances(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    daemon = start_daemon(cli)
    add_instance(cli, "keep", tiny_model, fake_binary)
    try:
        with daemon.client() as api:
            pid = api.post("/api/instances/keep/start", params={"wait": "true", "timeout": 30}).json()["pid"]
            with api.stream("GET", "/api/instances/keep/logs", params={"follow": "true", "tail": 1}) as stream:
                next(stream.iter_lines())
                stopped = cli.run("daemon", "stop", timeout=60)
                assert "daemon stopped" in stopped.stdout
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        with pytest.raises(httpx.ConnectError):
            httpx.get(daemon.url + "/healthz")
        assert "Traceback" not in daemon.log()
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)


# -- keys and binding ------------------------------------------------------------------------------------------


def test_api_keys_guard_the_router_and_the_control_api(cli: Cli) -> None:
    daemon = start_daemon(cli, api_keys=["router-key"], control_keys=["control-key"])
    try:

        def status(path: str, key: str | None) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.get(daemon.url + path, headers=headers, timeout=30).status_code

        refused = httpx.get(daemon.url + "/api/instances")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["type"] == "authentication_error"
        assert status("/api/instances", "router-key") == 401  # a router key does not control instances
        assert status("/api/instances", "control-key") == 200
        assert status("/api/instances", "control-keyX") == 401
        assert status("/v1/models", None) == 401
        assert status("/v1/models", "control-key") == 401
        assert status("/v1/models", "router-key") not in (401, 403)
        assert status("/upstream/any/health", None) == 401
        assert status("/metrics", None) == 401
        assert status("/metrics", "router-key") == 200 and status("/metrics", "control-key") == 200
        assert status("/healthz", None) == 200 and status("/openapi.json", None) == 200
        lower = httpx.get(daemon.url + "/api/daemon", headers={"authorization": "bearer control-key"})
        assert lower.status_code == 200
    finally:
        cli.run("daemon", "stop", timeout=60)


def test_binding_beyond_loopback_without_keys_is_refused(cli: Cli) -> None:
    (cli.home / "orchestrator.json").write_text(json.dumps({"api": {"host": "0.0.0.0", "port": free_port()}}))
    cli.daemon = True
    result = cli.run("daemon", "start", timeout=60)
    assert result.returncode != 0
    assert "reachable from other machines" in result.stderr and "api_keys" in result.stderr
    assert cli.run("daemon", "status").returncode == 1


def test_a_taken_api_port_is_a_clear_error_not_a_daemon_without_api(cli: Cli) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        (cli.home / "orchestrator.json").write_text(json.dumps({"api": {"port": taken}}))
        cli.daemon = True
        result = cli.run("daemon", "start", timeout=60)
    assert result.returncode == 1
    assert f"127.0.0.1:{taken}" in result.stderr and "already in use" in result.stderr
    assert "already in use" in (cli.home / "state" / "daemon.log").read_text()
    assert cli.run("daemon", "status").returncode == 1
    assert not (cli.home / "state" / "daemon.pid").exists()


def test_api_disabled_daemon_runs_without_a_port(cli: Cli) -> None:
    (cli.home / "orchestrator.json").write_text(json.dumps({"api": {"enabled": False}}))
    cli.daemon = True
    try:
        started = cli.run("daemon", "start", check=True)
        assert "API: off" in started.stdout
        info = json.loads((cli.home / "state" / "daemon.pid").read_text())
        assert info["api_url"] is None
        assert cli.run("ps", check=True).returncode == 0  # the CLI acts on the home directly
    finally:
        cli.run("daemon", "stop", timeout=60)


def test_old_pid_files_without_api_url_stay_readable(tmp_path: Path) -> None:
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.services import daemon_control

    home = Home(tmp_path)
    home.state_dir.mkdir()
    me = psutil.Process()
    old = {"pid": me.pid, "create_time": me.create_time(), "started_at": 1.0, "version": "0.0.1"}
    daemon_control.pid_path(home).write_text(json.dumps(old))
    info = daemon_control.daemon_info(home)
    assert info is not None and info.api_url is None
    daemon_control.pid_path(home).write_text(json.dumps({**old, "api_url": "http://x:1", "future_field": 3}))
    info = daemon_control.daemon_info(home)
    assert info is not None and info.api_url == "http://x:1"


# -- the app in-process, with a stand-in router --------------------------------------------------------------------


class StandInRouter:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def startup(self) -> None:
        self.calls.append("startup")

    async def shutdown(self) -> None:
        self.calls.append("shutdown")

    def stats(self) -> dict:
        return {"alpha": {"requests_total": {200: 3}, "in_flight": 1, "queued": 0}}


async def stand_in_proxy(scope: dict, receive, send) -> None:
    body = json.dumps({"proxied": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def serve_in_process(tmp_path: Path, **api: object):
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.api.server import ApiServer, bind_socket, make_app
    from llama_orchestrator.domain.settings import ApiSettings
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.instances_port import LocalInstances

    settings = ApiSettings(port=free_port(), **api)
    router = StandInRouter()
    app = make_app(
        LocalInstances(InstanceService(Home(tmp_path)), probe_starting=False),
        settings,
        router=router,
        proxy=stand_in_proxy,
    )
    server = ApiServer(app, bind_socket(settings.host, settings.port))
    server.start()
    return server, router, f"http://127.0.0.1:{settings.port}"


def test_router_paths_go_to_the_proxy_and_its_lifespan_runs(tmp_path: Path) -> None:
    server, router, url = serve_in_process(tmp_path, api_keys=["k"])
    try:
        assert router.calls == ["startup"]
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models", headers=headers).json() == {"proxied": "/v1/models"}
        upstream = httpx.post(url + "/upstream/alpha/health", headers=headers)
        assert upstream.json() == {"proxied": "/upstream/alpha/health"}
        # Keys given only as api_keys guard the control API as well (effective_control_keys).
        assert httpx.get(url + "/api/instances").status_code == 401
        assert httpx.get(url + "/api/instances", headers=headers).json() == []
        metrics = httpx.get(url + "/metrics", headers=headers).text
        assert 'llama_orch_instance_requests_total{model_name="alpha",endpoint="other",code="200"} 3' in metrics
        assert 'llama_orch_instance_in_flight{model_name="alpha"} 1' in metrics
    finally:
        server.stop()
    assert router.calls == ["startup", "shutdown"]


def test_keys_are_compared_in_constant_time_over_every_key() -> None:
    from llama_orchestrator.api.server import bearer_key, key_matches

    assert key_matches("b", ["a", "b", "c"]) and not key_matches("d", ["a", "b"]) and not key_matches(None, ["a"])
    assert not key_matches("", ["a"]) and not key_matches("ab", ["a"])
    assert bearer_key([(b"Authorization", b"Bearer  s3cret ")]) == "s3cret"
    assert bearer_key([(b"authorization", b"Basic abc")]) is None
