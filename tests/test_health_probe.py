"""The HTTP probe: fake servers as plain functions (``httpx.MockTransport``), then real sockets once."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from llama_orchestrator.adapters.health_probe import probe, probe_sync
from llama_orchestrator.domain.health import ProbeOutcome

Handler = Callable[[httpx.Request], httpx.Response]
Runner = Callable[..., ProbeOutcome]
BASE = "http://127.0.0.1:8001"


def run_async(handler: Handler | None, base: str = BASE, path: str = "/health", timeout: float = 5.0) -> ProbeOutcome:
    async def go() -> ProbeOutcome:
        transport = httpx.MockTransport(handler) if handler else None
        async with httpx.AsyncClient(transport=transport) as client:
            return await probe(client, base, path, timeout)

    return asyncio.run(go())


def run_sync(handler: Handler | None, base: str = BASE, path: str = "/health", timeout: float = 5.0) -> ProbeOutcome:
    transport = httpx.MockTransport(handler) if handler else None
    with httpx.Client(transport=transport) as client:
        return probe_sync(client, base, path, timeout)


RUNNERS = pytest.mark.parametrize("run", [run_async, run_sync], ids=["async", "sync"])


def answering(routes: dict[str, int], seen: list[str] | None = None) -> Handler:
    """A fake server: path -> status code, 404 elsewhere; records the paths asked for."""

    def app(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request.url.path)
        return httpx.Response(routes.get(request.url.path, 404), json={"status": "whatever"})

    return app


def raising(exc_type: type[httpx.TransportError], message: str) -> Handler:
    def app(request: httpx.Request) -> httpx.Response:
        raise exc_type(message, request=request)

    return app


@RUNNERS
@pytest.mark.parametrize("code", [200, 503, 500, 401])
def test_status_code_comes_back(run: Runner, code: int) -> None:
    outcome = run(answering({"/health": code}))
    assert (outcome.status_code, outcome.error) == (code, None)
    assert outcome.latency_ms is not None and outcome.latency_ms >= 0


@RUNNERS
def test_404_falls_back_to_v1_health(run: Runner) -> None:
    seen: list[str] = []
    outcome = run(answering({"/v1/health": 200}, seen))
    assert outcome.status_code == 200
    assert seen == ["/health", "/v1/health"]


@RUNNERS
def test_404_on_both_paths_is_a_404(run: Runner) -> None:
    seen: list[str] = []
    assert run(answering({}, seen)).status_code == 404
    assert seen == ["/health", "/v1/health"]


@RUNNERS
def test_no_fallback_when_the_path_is_the_fallback(run: Runner) -> None:
    seen: list[str] = []
    assert run(answering({}, seen), path="/v1/health").status_code == 404
    assert seen == ["/v1/health"]


@RUNNERS
@pytest.mark.parametrize("code", [200, 503, 500])
def test_no_fallback_unless_404(run: Runner, code: int) -> None:
    seen: list[str] = []
    assert run(answering({"/health": code, "/v1/health": 200}, seen)).status_code == code
    assert seen == ["/health"]


@RUNNERS
@pytest.mark.parametrize(
    ("exc_type", "message", "error"),
    [
        (httpx.ConnectError, "[Errno 111] Connection refused", "cannot connect: [Errno 111] Connection refused"),
        (httpx.ConnectTimeout, "timed out", "timed out (ConnectTimeout)"),
        (httpx.ReadTimeout, "timed out", "timed out (ReadTimeout)"),
        (httpx.RemoteProtocolError, "Server disconnected", "RemoteProtocolError: Server disconnected"),
        (httpx.ReadError, "", "ReadError"),
    ],
)
def test_network_errors_become_outcomes(
    run: Runner, exc_type: type[httpx.TransportError], message: str, error: str
) -> None:
    outcome = run(raising(exc_type, message))
    assert (outcome.status_code, outcome.error) == (None, error)
    assert outcome.latency_ms is not None


@RUNNERS
def test_the_timeout_reaches_the_request_and_the_fallback_gets_what_is_left(run: Runner) -> None:
    timeouts: list[float] = []

    def app(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        return httpx.Response(404)

    run(app, timeout=2.5)
    assert timeouts[0] == 2.5
    assert 0 < timeouts[1] <= 2.5


@RUNNERS
def test_base_url_with_a_trailing_slash(run: Runner) -> None:
    seen: list[str] = []
    run(answering({"/health": 200}, seen), base=BASE + "/")
    assert seen == ["/health"]


# --- real sockets ------------------------------------------------------------------------------------------


class _TinyServer(BaseHTTPRequestHandler):
    # An old llama-server: no /health, but /v1/health; /loading answers as a server that is loading.
    routes = {"/v1/health": (200, b'{"status":"ok"}'), "/loading": (503, b'{"error":"Loading model"}')}

    def do_GET(self) -> None:  # http.server names its handlers do_GET
        code, body = self.routes.get(self.path, (404, b"not found"))
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name; keeps tests quiet
        pass


@pytest.fixture
def tiny_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TinyServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@RUNNERS
def test_real_server(run: Runner, tiny_server: str) -> None:
    fallback = run(None, base=tiny_server, path="/health")
    assert (fallback.status_code, fallback.error) == (200, None)
    assert run(None, base=tiny_server, path="/loading").status_code == 503


@RUNNERS
def test_real_refused_connection(run: Runner) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = run(None, base=f"http://127.0.0.1:{port}")
    assert outcome.status_code is None
    assert outcome.error is not None and outcome.error.startswith("cannot connect")


@RUNNERS
def test_real_server_that_never_answers_times_out(run: Runner) -> None:
    # A listening socket that never accepts: the kernel completes the handshake, then nothing is ever read.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        outcome = run(None, base=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=0.2)
    assert (outcome.status_code, outcome.error) == (None, "timed out (ReadTimeout)")
    assert outcome.latency_ms is not None and 150 <= outcome.latency_ms < 5000


def test_the_light_probe_speaks_to_a_real_server_and_falls_back() -> None:
    """The daemon's http.client probe, against real sockets: status, latency, /v1/health fallback, refused."""
    import http.server
    import threading

    from llama_orchestrator.adapters.health_probe import probe_light

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's naming
            self.send_response({"/v1/health": 200, "/loading": 503}.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        fallback = probe_light(url, "/health", 2.0)
        assert fallback.status_code == 200 and fallback.latency_ms is not None
        assert probe_light(url, "/loading", 2.0).status_code == 503
    finally:
        server.shutdown()
        server.server_close()
    refused = probe_light(url, "/health", 2.0)
    assert refused.status_code is None and refused.error.startswith("cannot connect")


# --- the daemon's probe on its selector (probe_on) ----------------------------------------------------------


def run_on_loop(base: str, path: str = "/health", timeout: float = 5.0) -> ProbeOutcome:
    """``probe_on`` on a loop of its own, run until the outcome is back (within a deadline)."""
    import time

    from llama_orchestrator.adapters.health_probe import probe_on
    from llama_orchestrator.adapters.io_loop import IoLoop

    loop = IoLoop()
    outcomes: list[ProbeOutcome] = []
    try:
        probe_on(loop, base, path, timeout, outcomes.append)
        deadline = time.monotonic() + timeout + 10
        while not outcomes:
            assert time.monotonic() < deadline, "the probe never called back"
            loop.run_once(0.5)
    finally:
        loop.close()
    assert len(outcomes) == 1
    return outcomes[0]


def test_the_loop_probe_reads_status_codes_and_falls_back(tiny_server: str) -> None:
    fallback = run_on_loop(tiny_server, "/health")
    assert (fallback.status_code, fallback.error) == (200, None)
    assert fallback.latency_ms is not None and fallback.latency_ms >= 0
    assert run_on_loop(tiny_server, "/loading").status_code == 503
    assert run_on_loop(tiny_server, "/v1/health").status_code == 200
    assert run_on_loop(f"{tiny_server}/", "/v1/health").status_code == 200  # a trailing slash


def test_the_loop_probe_of_a_server_that_closes_at_once(tiny_server: str) -> None:
    with socket.socket() as sock:  # accepts, then closes without a word
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        port = sock.getsockname()[1]

        def close_first() -> None:
            conn, _ = sock.accept()
            conn.close()

        thread = threading.Thread(target=close_first, daemon=True)
        thread.start()
        outcome = run_on_loop(f"http://127.0.0.1:{port}")
        thread.join(5)
    assert outcome.status_code is None
    # A close with our request unread is a reset on Linux; either way no answer, said as http.client says it.
    assert outcome.error in (
        "RemoteDisconnected: Remote end closed connection without response",
        "ConnectionResetError: [Errno 104] Connection reset by peer",
    )


def test_the_loop_probe_of_a_refused_connection() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = run_on_loop(f"http://127.0.0.1:{port}")
    assert outcome.status_code is None
    assert outcome.error is not None and outcome.error.startswith("cannot connect")


def test_the_loop_probe_of_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        outcome = run_on_loop(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=0.2)
    assert (outcome.status_code, outcome.error) == (None, "timed out (TimeoutError)")
    assert outcome.latency_ms is not None and 150 <= outcome.latency_ms < 5000


def test_the_loop_probe_speaks_to_the_fake_llama_server() -> None:
    """What the daemon probes in the end-to-end tests and the benchmark: the fake server (aiohttp)."""
    import subprocess
    import sys
    import time

    from helpers import free_port, wait_until

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_orchestrator.testing.fake_server", "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: run_on_loop(f"http://127.0.0.1:{port}").status_code == 200, 30)
        started = time.perf_counter()
        outcomes = [run_on_loop(f"http://127.0.0.1:{port}") for _ in range(5)]
        assert all(o.status_code == 200 for o in outcomes), outcomes
        assert time.perf_counter() - started < 10
    finally:
        server.kill()
        server.wait()
