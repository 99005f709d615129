"""api.http_protocol.LaneCycle: the requests an app's ``v1_lane`` takes are answered without ASGI, on the same
connections as uvicorn's own, with HTTP/1.1 as clients expect it (keep-alive, pipelining, 100-continue, chunked
streams, a client that leaves), and every request the lane does not take still reaches the ASGI app.

A stub lane here; tests/test_router.py and tests/test_hardening_http.py drive the real one (api.proxy.V1Lane)
through the router and the daemon's app."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from helpers import free_port, wait_until
from llama_orchestrator.api.http_protocol import CHUNK_WRITER, head_deadline_protocol


class StubLane:
    """Takes POST /v1/...; ``/v1/echo`` answers the body back, ``/v1/stream`` streams through the writer until
    told to end, ``/v1/boom`` raises."""

    def __init__(self) -> None:
        self.served: list[str] = []
        self.cancelled = threading.Event()
        self.streaming = threading.Event()
        self.release: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.admits = None
        self.max_body: int | None = None

    def admitting(self, admits, max_body: int):  # what the daemon's app (api.server) adds: its checks and limit
        self.admits, self.max_body = admits, max_body
        return self

    def takes(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        if not url.startswith(b"/v1/") or (b"x-not-lane", b"1") in headers:
            return False
        length = dict(headers).get(b"content-length", b"0")
        if self.max_body is not None and int(length) > self.max_body:
            return False  # as api.proxy.V1Lane: past the limit, the guard answers
        return self.admits is None or self.admits(headers)

    async def serve(self, scope: dict, receive, send) -> None:
        self.served.append(scope["path"])
        body = (await receive())["body"]
        if scope["path"] == "/v1/boom":
            raise RuntimeError("a bug")
        if scope["path"] == "/v1/stream":
            writer = scope["extensions"][CHUNK_WRITER]
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            assert writer.ready()
            writer.push(b"one\n")
            self.release = asyncio.Event()
            self.loop = asyncio.get_running_loop()
            self.streaming.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            writer.push(b"two\n")
            await send({"type": "http.response.body", "body": b""})
            return
        answer = json.dumps({"lane": True, "size": len(body), "query": scope["query_string"].decode()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


class App:
    def __init__(self) -> None:
        self.v1_lane = StubLane()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = json.dumps({"lane": False, "size": len(body)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


@pytest.fixture
def served() -> Iterator[tuple[str, App]]:
    app = App()
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=head_deadline_protocol(5.0),
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, message="uvicorn did not start")
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(10)


def _raw(url: str, data: bytes, *, until: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on one connection and read until ``until`` has been seen (or the server closes)."""
    host, _, port = url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while until not in got:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def _post(path: str, body: bytes = b"{}", *extra: bytes) -> bytes:
    head = b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" % path.encode()
    return head + b"".join(extra) + b"content-length: %d\r\n\r\n" % len(body) + body


def test_a_taken_request_is_answered_by_the_lane_and_the_rest_by_the_app(served) -> None:
    url, app = served
    with httpx.Client(base_url=url) as client:
        taken = client.post("/v1/echo?x=1", content=b'{"a": 1}')
        assert taken.json() == {"lane": True, "size": 8, "query": "x=1"}
        assert taken.headers["content-length"] == str(len(taken.content))  # one sized piece
        assert "date" in taken.headers  # uvicorn's default headers, as on its own answers
        assert client.get("/v1/echo").json()["lane"] is False  # a GET is not the lane's
        assert client.post("/v1/echo", content=b"{}", headers={"x-not-lane": "1"}).json()["lane"] is False
        assert client.post("/other", content=b"{}").json()["lane"] is False
    assert app.v1_lane.served == ["/v1/echo"]


def test_keep_alive_and_pipelined_requests_are_answered_in_order(served) -> None:
    url, _ = served
    # three requests in one write: the first is the lane's; the two behind it wait in uvicorn's pipeline (the
    # lane takes a request only when none is pending before it) and each answer follows the one before
    got = _raw(
        url,
        _post("/v1/echo", b"1") + _post("/v1/echo", b"22", b"x-not-lane: 1\r\n") + _post("/v1/echo", b"333"),
        until=b'"size": 3}',
    )
    answers = got.split(b"HTTP/1.1 200 OK\r\n")
    assert len(answers) == 4, got
    assert b'{"lane": true, "size": 1, "query": ""}' in answers[1]
    assert b'{"lane": false, "size": 2}' in answers[2]
    assert b'"size": 3}' in answers[3]
    with httpx.Client(base_url=url) as client:  # and a request with nothing before it is the lane's again
        assert client.post("/v1/echo", content=b"{}").json()["lane"] is True


def test_http_1_0_and_connection_close(served) -> None:
    url, _ = served
    old = _raw(url, b"POST /v1/echo HTTP/1.0\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}", until=b"}")
    assert b'"lane": false' in old  # no chunked answers for HTTP/1.0: uvicorn's way
    closing = _raw(url, _post("/v1/echo", b"{}", b"connection: close\r\n"), until=b"\0never")  # until it closes
    head, _, body = closing.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["lane"] is True


def test_expect_100_continue_gets_its_interim_answer(served) -> None:
    url, _ = served
    got = _raw(url, _post("/v1/echo", b"{}", b"expect: 100-continue\r\n"), until=b"}")
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")


def test_a_body_past_uvicorns_high_water_mark_is_read_whole(served) -> None:
    url, _ = served
    body = b"x" * (300 * 1024)  # uvicorn pauses reading past 64 KiB until the app reads
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/v1/echo", content=body).json() == {"lane": True, "size": len(body), "query": ""}


def test_a_stream_is_chunked_and_a_client_that_leaves_cancels_it(served) -> None:
    url, app = served
    lane = app.v1_lane
    with httpx.Client(base_url=url, timeout=10) as client, client.stream("POST", "/v1/stream", content=b"{}") as resp:
        assert resp.headers["transfer-encoding"] == "chunked"
        assert next(resp.iter_raw()) == b"one\n"
        assert lane.streaming.wait(5)
    # the client closed the connection mid-stream: the lane's task is cancelled
    assert lane.cancelled.wait(5)

    lane.streaming.clear()

    def finish() -> None:  # once the second stream has begun, let it end
        wait_until(lambda: lane.streaming.is_set(), 5, message="second stream began")
        assert lane.loop is not None and lane.release is not None
        lane.loop.call_soon_threadsafe(lane.release.set)

    releaser = threading.Thread(target=finish)
    releaser.start()
    with httpx.Client(base_url=url, timeout=10) as client:
        whole = client.post("/v1/stream", content=b"{}")
        assert whole.content == b"one\ntwo\n"
        assert client.post("/v1/echo", content=b"{}").json()["lane"] is True  # the connection is reusable
    releaser.join(5)


def test_a_lane_that_fails_answers_500_and_closes(served) -> None:
    url, _ = served
    got = _raw(url, _post("/v1/boom"), until=b"\0never")
    assert got.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"connection: close" in got.lower()


def test_in_the_daemons_app_the_lane_takes_only_what_the_guard_and_the_keys_let_through(tmp_path) -> None:
    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.api.server import ApiServer, bind_socket, make_app
    from llama_orchestrator.domain.settings import ApiSettings
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.instances_port import LocalInstances

    settings = ApiSettings(port=free_port(), api_keys=["k"], max_body_mb=1)
    proxy = App()
    app = make_app(LocalInstances(InstanceService(Home(tmp_path)), probe_starting=False), settings, proxy=proxy)
    server = ApiServer(app, bind_socket(settings.host, settings.port))
    server.start()
    url = f"http://127.0.0.1:{settings.port}"
    key = {"Authorization": "Bearer k"}
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.post("/v1/chat/completions", content=b"{}", headers=key).json()["lane"] is True
            refused = client.post("/v1/chat/completions", content=b"{}")
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            wrong = client.post("/v1/chat/completions", content=b"{}", headers={"Authorization": "Bearer x"})
            assert wrong.status_code == 401
            foreign = client.post("/v1/chat/completions", content=b"{}", headers={**key, "Host": "evil.example"})
            assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "host_not_allowed"
            page = client.post("/v1/chat/completions", content=b"{}", headers={**key, "Origin": "http://evil.example"})
            assert page.status_code == 403 and page.json()["error"]["code"] == "origin_not_allowed"
            big = client.post("/v1/chat/completions", content=b"x" * (2 * 1024 * 1024), headers=key)
            assert big.status_code == 413
            own = client.post("/v1/chat/completions", content=b"{}", headers={**key, "Origin": url})
            assert own.json()["lane"] is False  # a page of the daemon's own (/ui/): the guard's CORS path
        assert proxy.v1_lane.served == ["/v1/chat/completions"]
        assert proxy.v1_lane.max_body == settings.max_body_bytes  # the guard's limit reaches the lane
    finally:
        server.stop()


def test_a_uvicorn_protocol_of_another_shape_gets_no_lane(monkeypatch: pytest.MonkeyPatch, served) -> None:
    from types import SimpleNamespace

    from llama_orchestrator.api.http_protocol import LaneCycle

    monkeypatch.setattr(LaneCycle, "_fits", None)  # judged again, for this protocol
    assert not LaneCycle.fits(SimpleNamespace(parser=None, tasks=set()))
    monkeypatch.setattr(LaneCycle, "_fits", None)
    fields = dict.fromkeys(LaneCycle._USES, None)
    assert LaneCycle.fits(SimpleNamespace(**{**fields, "server_state": SimpleNamespace(default_headers=[])}))
    # judged False: a server's connections then answer every request through the ASGI app
    monkeypatch.setattr(LaneCycle, "_fits", False)
    url, app = served
    with httpx.Client(base_url=url) as client:
        assert client.post("/v1/echo", content=b"{}").json()["lane"] is False
    assert app.v1_lane.served == []
