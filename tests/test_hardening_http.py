"""Browser attacks and hostile HTTP input against the daemon's HTTP front (issue 10, part 1).

A real daemon on loopback without keys and the fake llama-server (which reflects any Origin, as llama-server does):
DNS rebinding (a foreign Host), cross-origin "simple" requests, CORS on the router, oversized bodies, slow clients.
The rules themselves (domain.web_access) are checked table-driven first.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Cli
from helpers import wait_until
from llama_orchestrator.domain.web_access import (
    HOST_ANSWERS_MAX,
    HostPolicy,
    OriginPolicy,
    preflighted,
    same_origin,
    split_host,
)
from test_api import Daemon, add_instance, serve_in_process, start_daemon

posix_only = pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")
EVIL = "http://evil.example"
MiB = 1024 * 1024


# -- the rules ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8000", True),
        ("127.0.0.1", True),
        ("127.9.9.9:1", True),
        ("localhost:8000", True),
        ("LocalHost.", True),
        ("ui.localhost:8000", True),
        ("[::1]:8000", True),
        ("[0:0:0:0:0:0:0:1]", True),
        ("box.lan:8000", True),
        ("api.corp.example", True),
        ("corp.example", False),
        ("evil.example", False),
        ("evil.example:8000", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False),
        ("192.168.1.9:8000", False),
        (None, True),
    ],
)
def test_host_policy(host: str | None, allowed: bool) -> None:
    policy = HostPolicy(served=["127.0.0.1"], allowed=["box.lan", "*.corp.example"])
    assert policy.allows(host) is allowed


def test_host_policy_bind_address_and_any() -> None:
    assert HostPolicy(["10.0.0.5"], []).allows("10.0.0.5:8000")
    assert not HostPolicy(["0.0.0.0"], []).allows("0.0.0.0:8000")  # a wildcard is not a name
    assert HostPolicy(["127.0.0.1"], ["*"]).allows("evil.example")
    assert split_host("[::1]:8000") == ("::1", 8000) and split_host("Example.COM.") == ("example.com", None)


def test_host_policy_remembers_answers_within_a_bound() -> None:
    policy = HostPolicy(served=["127.0.0.1"], allowed=["box.lan"])
    for _ in range(2):  # the second ask comes from the memory and says the same
        assert policy.allows("box.lan:8000") and not policy.allows("evil.example")
    for index in range(3 * HOST_ANSWERS_MAX):  # a client sending a new Host each time
        assert not policy.allows(f"rebind-{index}.example")
    assert len(policy._answers) <= HOST_ANSWERS_MAX
    assert policy.allows("localhost:8000") and not policy.allows("evil.example")


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "cross"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True, False),  # the daemon's own page (/docs, /ui/)
        ("http://localhost:8000", "localhost:8000", True, False),
        ("http://[::1]:8000", "[::1]:8000", True, False),
        ("http://127.0.0.1:9000", "127.0.0.1:8000", False, False),  # another local web app is another origin
        ("http://localhost:8000", "127.0.0.1:8000", False, False),
        ("https://127.0.0.1:8000", "127.0.0.1:8000", True, False),  # same host:port (a TLS proxy in front)
        (EVIL, "127.0.0.1:8000", False, False),
        ("null", "127.0.0.1:8000", False, False),
        ("http://app.example:3000", "127.0.0.1:8000", True, True),
        ("http://APP.example:3000", "127.0.0.1:8000", True, True),
        ("http://app.example", "127.0.0.1:8000", False, False),
        ("https://ui.example:443", "127.0.0.1:8000", True, True),  # the default port may be written or not
        ("garbage", "127.0.0.1:8000", False, False),
    ],
)
def test_origin_policy(origin: str, host: str, allowed: bool, cross: bool) -> None:
    policy = OriginPolicy(["http://app.example:3000", "https://ui.example"])
    assert policy.allows(origin, host) is allowed
    assert policy.cross_origin(origin, host) is cross


def test_origin_policy_any_and_null() -> None:
    assert OriginPolicy(["*"]).allows("null", "127.0.0.1") and OriginPolicy(["null"]).allows("null", "x")
    assert not OriginPolicy([]).allows("null", "x") and not same_origin("http://x", None)


@pytest.mark.parametrize(
    ("media", "has_body", "auth", "origin", "ok"),
    [
        ("application/json", True, False, False, True),
        ("application/json", False, False, False, True),
        ("text/plain", True, False, False, False),
        ("application/x-www-form-urlencoded", False, False, True, False),  # an empty form is still a form
        ("multipart/form-data", True, True, True, False),
        (None, False, True, False, True),  # `curl -X POST -H "Authorization: ..."`
        (None, False, False, True, True),  # the daemon's own page, body-less
        (None, False, False, False, False),  # a bare fetch(url, {method: "POST", mode: "no-cors"})
        (None, True, True, False, False),
    ],
)
def test_which_control_requests_count_as_preflighted(media, has_body, auth, origin, ok) -> None:
    assert preflighted(media=media, has_body=has_body, has_authorization=auth, origin_allowed=origin) is ok


# -- a real daemon ------------------------------------------------------------------------------------------------


@pytest.fixture
def daemon(cli: Cli, tiny_model: Path, fake_binary: Path) -> Iterator[Daemon]:
    add_instance(cli, "alpha", tiny_model, fake_binary, restart={"policy": "never"})
    running = start_daemon(cli, cors_origins=["http://app.example:3000"])
    try:
        yield running
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)


def _start_alpha(daemon: Daemon) -> int:
    with daemon.client() as api:
        started = api.post("/api/instances/alpha/start", params={"wait": "true", "timeout": 30})
        assert started.status_code == 200, started.text
        return started.json()["pid"]


def _status(daemon: Daemon) -> str:
    return httpx.get(daemon.url + "/api/instances/alpha").json()["status"]


@posix_only
def test_a_foreign_host_is_refused_on_every_zone(daemon: Daemon) -> None:
    port = daemon.url.rsplit(":", 1)[1]
    for path in ("/api/instances", "/v1/models", "/metrics"):
        refused = httpx.get(daemon.url + path, headers={"Host": "evil.example"})
        assert refused.status_code == 403, (path, refused.text)
        error = refused.json()["error"]
        assert "api.allowed_hosts" in error["message"]
        # OpenAI's error object in every zone, the router's and the control API's alike.
        assert (error["type"], error["code"], error["param"]) == ("permission_error", "host_not_allowed", None)
    refused = httpx.post(daemon.url + "/api/instances/alpha/start", headers={"Host": f"evil.example:{port}"}, json={})
    assert refused.status_code == 403 and _status(daemon) == "stopped"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"ui.localhost:{port}"):
        assert httpx.get(daemon.url + "/api/instances", headers={"Host": host}).status_code == 200, host


@posix_only
def test_a_cross_origin_simple_post_cannot_stop_an_instance(daemon: Daemon) -> None:
    pid = _start_alpha(daemon)
    stop = daemon.url + "/api/instances/alpha/stop"
    attempts = [
        ({"Origin": EVIL, "Content-Type": "text/plain"}, b"x"),
        ({"Origin": EVIL, "Content-Type": "application/x-www-form-urlencoded"}, b""),
        ({"Origin": EVIL}, None),
        ({"Origin": EVIL, "Content-Type": "application/json"}, b"{}"),
        ({"Origin": "null", "Content-Type": "text/plain"}, b"x"),
    ]
    for headers, body in attempts:
        refused = httpx.post(stop, headers=headers, content=body)
        assert refused.status_code == 403, (headers, refused.text)
        assert "api.cors_origins" in refused.json()["error"]["message"]
    # Without an Origin (a browser that hides it, a privacy extension): the content type still gives it away.
    for headers, body in [
        ({"Content-Type": "text/plain"}, b"x"),
        ({"Content-Type": "multipart/form-data"}, b""),
        ({}, None),
    ]:
        refused = httpx.post(stop, headers=headers, content=body)
        assert refused.status_code == 415, (headers, refused.text)
        assert "application/json" in refused.json()["error"]["message"]
    # A foreign page may not read either.
    assert httpx.get(daemon.url + "/api/instances", headers={"Origin": EVIL}).status_code == 403
    assert _status(daemon) == "running" and psutil.pid_exists(pid)

    # What may: JSON, a key, the daemon's own page, an origin in api.cors_origins (which can read the answer).
    assert (
        httpx.post(
            daemon.url + "/api/instances/alpha/wait",
            headers={"Authorization": "Bearer x"},
            params={"until": "started", "timeout": 5},
        ).status_code
        == 200
    )
    own = httpx.post(
        daemon.url + "/api/instances/alpha/wait",
        headers={"Origin": daemon.url},
        params={"until": "started", "timeout": 5},
    )
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
    app = httpx.post(stop, headers={"Origin": "http://app.example:3000"}, json={}, params={"timeout": 5})
    assert app.status_code == 200, app.text
    assert app.headers["access-control-allow-origin"] == "http://app.example:3000"
    assert "origin" in app.headers["vary"].lower()
    assert _status(daemon) == "stopped"


@posix_only
def test_the_router_answers_cors_itself_by_cors_origins(daemon: Daemon) -> None:
    _start_alpha(daemon)
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/chat/completions", "/upstream/alpha/v1/chat/completions"):
        refused = httpx.post(daemon.url + path, json=chat, headers={"Origin": EVIL})
        assert refused.status_code == 403, refused.text
        assert "access-control-allow-origin" not in refused.headers
        assert refused.json()["error"]["code"] == "origin_not_allowed"
        # The daemon's own page: allowed, and llama-server's reflected header is not relayed.
        own = httpx.post(daemon.url + path, json=chat, headers={"Origin": daemon.url})
        assert own.status_code == 200, own.text
        assert not [k for k in own.headers if k.startswith("access-control-")], own.headers
        # An origin in api.cors_origins gets exactly our header, once (not llama-server's besides).
        app = httpx.post(
            daemon.url + path, json={**chat, "stream": True}, headers={"Origin": "http://app.example:3000"}
        )
        assert app.status_code == 200 and "data:" in app.text
        assert app.headers.get_list("access-control-allow-origin") == ["http://app.example:3000"]
    # The fake really reflects: what the router strips is there to strip.
    port = json.loads((daemon.cli.home / "instances" / "alpha" / "config.json").read_text())["server"]["port"]
    direct = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Origin": EVIL})
    assert direct.headers["access-control-allow-origin"] == EVIL

    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    ok = httpx.options(daemon.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://app.example:3000"})
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == "http://app.example:3000"
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert ok.headers["access-control-allow-headers"] == "authorization, content-type"
    bad = httpx.options(daemon.url + "/v1/chat/completions", headers={**preflight, "Origin": EVIL})
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers


def _body(total: int, chunk: int = MiB) -> Iterator[bytes]:
    block = b"x" * chunk
    for _ in range(total // chunk):
        yield block


def _post_big(url: str, chunked: bool) -> int | str:
    headers = {"Content-Type": "application/json"}
    if not chunked:
        headers["Content-Length"] = str(300 * MiB)
    try:
        return httpx.post(url, content=_body(300 * MiB), headers=headers, timeout=60).status_code
    except httpx.HTTPError as exc:
        return repr(exc)


def _post_big_into(results: list[int | str], url: str, chunked: bool) -> None:
    results.append(_post_big(url, chunked))


@posix_only
def test_oversized_bodies_are_refused_early_and_the_memory_stays_bounded(daemon: Daemon) -> None:
    process = psutil.Process(daemon.pid())
    with httpx.Client(base_url=daemon.url) as warm:  # imports and pools settle before the baseline
        warm.get("/v1/models")
        warm.post("/v1/chat/completions", content=b"{}", headers={"Content-Type": "application/json"})
    before = process.memory_info().rss
    peak = before
    targets = [
        "/v1/chat/completions",
        "/upstream/alpha/v1/chat/completions",
        "/api/instances/alpha/start",
        "/v1/embeddings",
    ]
    for chunked in (False, True):
        results: list[int | str] = []
        threads = [threading.Thread(target=_post_big_into, args=(results, daemon.url + t, chunked)) for t in targets]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, process.memory_info().rss)
            threads[0].join(0.02)  # sampling the daemon's RSS while the uploads run
        assert results == [413] * 4, (chunked, results)
    growth = (peak - before) / MiB
    print(f"daemon RSS {before / MiB:.0f} MiB, peak +{growth:.1f} MiB")
    assert growth < 100, f"the daemon's RSS grew by {growth:.0f} MiB"

    # Memory read for the refused bodies is given back (not kept by the allocator).
    def settled() -> tuple[int] | None:
        left = process.memory_info().rss - before
        return (left,) if left < 30 * MiB else None

    (left,) = wait_until(settled, timeout=10, message="the daemon's RSS to return near its start")
    print(f"daemon RSS afterwards: {left / MiB:+.1f} MiB")
    assert 'POST /api/instances/alpha/start HTTP/1.1" 413' in daemon.log()  # refused before the route ran
    assert 'POST /api/instances/alpha/start HTTP/1.1" 200' not in daemon.log()
    small = httpx.post(
        daemon.url + "/v1/chat/completions",
        content=b"{" + b" " * (MiB) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert small.status_code != 413


@posix_only
def test_the_cli_still_drives_the_daemon(daemon: Daemon) -> None:
    up = daemon.cli.run("up", "alpha", "-d", "--wait", "--timeout", "30")
    assert up.returncode == 0, up.stderr
    assert daemon.cli.ps()["alpha"]["status"] == "running"
    down = daemon.cli.run("down", "alpha")
    assert down.returncode == 0, down.stderr
    assert _status(daemon) == "stopped"
    assert "POST /api/instances/alpha/stop" in daemon.log()


def test_a_wildcard_bind_also_serves_the_machine_names(tmp_path: Path) -> None:
    server, _, url = serve_in_process(tmp_path, host="0.0.0.0", api_keys=["k"], allowed_hosts=["gpu.example"])
    key = {"Authorization": "Bearer k"}
    try:
        addresses = [
            a.address
            for found in psutil.net_if_addrs().values()
            for a in found
            if a.family == socket.AF_INET and not a.address.startswith("127.")
        ]
        for host in (socket.gethostname(), *(f"{a}:1234" for a in addresses[:1]), "gpu.example", "localhost"):
            assert httpx.get(url + "/api/instances", headers={**key, "Host": host}).status_code == 200, host
        refused = httpx.get(url + "/api/instances", headers={**key, "Host": "evil.example"})
        assert refused.status_code == 403 and "api.allowed_hosts" in refused.text
    finally:
        server.stop()


# -- slow and idle clients (in process, short timeouts) ------------------------------------------------------------


def _closed_by_server(sock: socket.socket) -> bool:
    """On a non-blocking socket: the server closed it (EOF, a reset) or said 408, which it closes right after."""
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return False
    except OSError:
        return True
    assert not data or data.startswith(b"HTTP/1.1 408"), data[:80]
    return True


def test_slow_and_idle_connections_are_closed(tmp_path: Path) -> None:
    # 2 s, not 1: under coverage's tracer the in-process server and this loop are slow enough that 1 s passed
    # before the slow clients had sent their 3 bytes.
    server, _, url = serve_in_process(tmp_path, header_timeout=2.0, idle_timeout=2.0)
    port = int(url.rsplit(":", 1)[1])
    slow: list[socket.socket] = []
    try:
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")  # a header value that never ends
            sock.setblocking(False)
            slow.append(sock)
        silent = socket.create_connection(("127.0.0.1", port))  # connects, never sends a byte
        silent.setblocking(False)
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        idle.settimeout(5)
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        idle.setblocking(False)
        started = time.monotonic()
        trickled = {id(s): 0 for s in slow}

        def all_closed() -> bool:
            # A byte every 0.1 s from each slow client: they never finish their headers, nor fall silent.
            open_ = [s for s in slow if not _closed_by_server(s)]
            for sock in open_:
                try:
                    sock.send(b"a")
                    trickled[id(sock)] += 1
                except OSError:
                    pass
            assert httpx.get(url + "/healthz", timeout=2).status_code == 200  # the server keeps answering
            return not open_ and _closed_by_server(silent) and _closed_by_server(idle)

        wait_until(all_closed, timeout=10, interval=0.1, message="slow, silent and idle sockets to be closed")
        elapsed = time.monotonic() - started
        assert 0.5 < elapsed < 5, elapsed
        assert max(trickled.values()) >= 3  # they were still sending when they were cut

        # A client that is slow but in time is served.
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:  # ~0.4 s of a slow but steady client, inside the 2 s limit
            sock.sendall(b"X-Pad: 1\r\n")
            threading.Event().wait(0.05)
        sock.sendall(b"Host: 127.0.0.1\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()
    finally:
        for sock in slow:
            sock.close()
        server.stop()


def test_past_the_cap_the_longest_waiting_half_sent_connection_is_cut() -> None:
    import asyncio

    import uvicorn

    from llama_orchestrator.api.http_protocol import head_deadline_protocol

    async def app(scope: dict, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=head_deadline_protocol(60.0, max_pending=5), log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    waiting: list[socket.socket] = []
    try:
        wait_until(lambda: server.started, timeout=10)
        for _ in range(5):
            waiting.append(socket.create_connection(("127.0.0.1", port)))
            waiting[-1].sendall(b"GET / HTTP/1.1\r\n")
            waiting[-1].setblocking(False)
        fresh = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)  # the sixth: the oldest gives way
        assert fresh.text == "ok"
        wait_until(lambda: _closed_by_server(waiting[0]), timeout=5, message="the oldest to be cut")
        assert not any(_closed_by_server(s) for s in waiting[2:])  # the others wait on (60 s deadline)
    finally:
        for s in waiting:
            s.close()
        server.should_exit = True
        thread.join(10)
        sock.close()
