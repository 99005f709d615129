"""The HTTP probe: fake servers as plain functions (``httpx.MockTransport``), then real sockets once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from llama_orchestrator.adapters import health_probe
from llama_orchestrator.adapters.health_probe import probe, probe_on, probe_sync
from llama_orchestrator.adapters.io_loop import IoLoop
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
    """What the daemon probes in the end-to-end tests and the benchmark: the fake server (http.server, HTTP/1.1)."""
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


# --- probe_on keeps its connection for the next probe (keep_for) --------------------------------------------


class _RawServer:
    """HTTP/1.1 on a real socket, one thread per connection, that counts connections and how the client ends them.

    ``answer(path)`` gives each answer's bytes; the server keeps every connection open until the client closes it
    (``resets``: with a reset, ``eofs``: with a FIN), or until ``hang_up`` (a FIN, as a server's idle close) or
    ``drop`` (the next ``drop`` requests, on any connection, end it without an answer, with a FIN or a reset).
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.accepts = self.resets = self.eofs = self.drop = 0
        self.drop_with_reset = False
        self.requests: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.answer: Callable[[str], bytes] = lambda _path: _answer(b"HTTP/1.1 200 OK", b'{"status":"ok"}')
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepts += 1
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        while True:
            try:
                chunk = conn.recv(4096)
            except ConnectionResetError:
                self._count("resets")
                return
            except OSError:  # closed here
                return
            if not chunk:
                self._count("eofs")
                return
            data += chunk
            while b"\r\n\r\n" in data:
                request, data = data.split(b"\r\n\r\n", 1)
                with self.lock:
                    self.requests.append(request.split(b"\r\n", 1)[0])
                    dropping, self.drop = self.drop > 0, max(0, self.drop - 1)
                if dropping:
                    if self.drop_with_reset:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    return
                conn.sendall(self.answer(request.split(b" ", 2)[1].decode()))

    def _count(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)

    def hang_up(self) -> None:
        """End every connection from this side, as llama-server's idle close does (then see how the client ends)."""
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()


def _answer(status_line: bytes, body: bytes, *headers: bytes) -> bytes:
    head = [status_line, b"Content-Type: application/json", *headers]
    if not any(h.lower().startswith((b"content-length", b"transfer-encoding")) for h in headers):
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@pytest.fixture
def raw_server() -> Iterator[_RawServer]:
    server = _RawServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def loop() -> Iterator[IoLoop]:
    io_loop = IoLoop()
    try:
        yield io_loop
    finally:
        io_loop.close()


def run_until(loop: IoLoop, condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Drive ``loop`` until ``condition()`` holds, within a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        loop.run_once(0.05)


def kept_probe(
    loop: IoLoop, base: str, path: str = "/health", timeout: float = 5.0, keep_for: float = 1.5
) -> ProbeOutcome:
    outcomes: list[ProbeOutcome] = []
    probe_on(loop, base, path, timeout, outcomes.append, keep_for=keep_for)
    run_until(loop, lambda: outcomes, timeout + 10)
    assert len(outcomes) == 1
    return outcomes[0]


def kept(loop: IoLoop) -> list[str]:
    """The base URLs with a connection kept on ``loop``."""
    return list(health_probe._POOLS.get(loop, {}))


def test_a_second_probe_reuses_the_connection(raw_server: _RawServer, loop: IoLoop) -> None:
    for _ in range(3):
        outcome = kept_probe(loop, raw_server.base)
        assert (outcome.status_code, outcome.error) == (200, None)
    assert raw_server.accepts == 1
    assert raw_server.requests == [b"GET /health HTTP/1.1"] * 3
    assert kept(loop) == [raw_server.base]


def test_the_fallback_reuses_the_connection(raw_server: _RawServer, loop: IoLoop) -> None:
    raw_server.answer = lambda path: (
        _answer(b"HTTP/1.1 200 OK", b"{}") if path == "/v1/health" else _answer(b"HTTP/1.1 404 Not Found", b"no")
    )
    assert kept_probe(loop, raw_server.base).status_code == 200
    assert kept_probe(loop, raw_server.base).status_code == 200
    assert raw_server.accepts == 1
    assert raw_server.requests == [b"GET /health HTTP/1.1", b"GET /v1/health HTTP/1.1"] * 2


def test_without_keep_for_nothing_is_kept(raw_server: _RawServer, loop: IoLoop) -> None:
    for keep_for in (0.0, health_probe.KEEP_MAX_S + 1):  # off, and longer than llama-server's idle close allows
        assert kept_probe(loop, raw_server.base, keep_for=keep_for).status_code == 200
    run_until(loop, lambda: raw_server.resets == 2)
    assert raw_server.accepts == 2
    assert kept(loop) == []


def test_a_kept_connection_the_server_closes_is_reset_and_the_next_probe_opens_a_fresh_one(
    raw_server: _RawServer, loop: IoLoop
) -> None:
    assert kept_probe(loop, raw_server.base).status_code == 200
    raw_server.hang_up()  # as llama-server's idle close, or a server that stops
    run_until(loop, lambda: raw_server.resets == 1)  # closed by us at once, with a reset: no TIME_WAIT on its port
    assert kept(loop) == []
    assert kept_probe(loop, raw_server.base).status_code == 200
    assert raw_server.accepts == 2


def test_bytes_nobody_asked_for_end_a_kept_connection(raw_server: _RawServer, loop: IoLoop) -> None:
    assert kept_probe(loop, raw_server.base).status_code == 200
    with raw_server.lock:
        raw_server.conns[0].sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    run_until(loop, lambda: raw_server.resets == 1)
    assert kept(loop) == []


@pytest.mark.parametrize(
    "answer",
    [
        _answer(b"HTTP/1.1 200 OK", b"{}", b"Connection: close"),
        _answer(b"HTTP/1.1 200 OK", b"{}", b"connection: Close"),
        _answer(b"HTTP/1.0 200 OK", b"{}"),
        _answer(b"HTTP/1.1 200 OK", b"2\r\n{}\r\n0\r\n\r\n", b"Transfer-Encoding: chunked"),
        b"HTTP/1.1 200 OK\r\n\r\n",  # no Content-Length: the body ends with the connection
        _answer(b"HTTP/1.1 200 OK", b"{}") + b"HTTP/1.1 200 OK",  # more than the answer
    ],
    ids=["connection-close", "case", "http-1.0", "chunked", "no-length", "extra-bytes"],
)
def test_answers_that_cannot_be_kept_are_not(raw_server: _RawServer, loop: IoLoop, answer: bytes) -> None:
    raw_server.answer = lambda _path: answer
    assert kept_probe(loop, raw_server.base).status_code == 200
    run_until(loop, lambda: raw_server.resets == 1)
    assert kept(loop) == []
    assert kept_probe(loop, raw_server.base).status_code == 200
    assert raw_server.accepts == 2


def test_a_kept_connection_idle_past_keep_for_is_reset(raw_server: _RawServer, loop: IoLoop) -> None:
    assert kept_probe(loop, raw_server.base, keep_for=0.3).status_code == 200
    idle_since = time.monotonic()
    run_until(loop, lambda: raw_server.resets == 1)
    assert time.monotonic() - idle_since >= 0.25
    assert kept(loop) == []


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
def test_a_kept_connection_dead_at_the_next_probe_is_retried_once_on_a_fresh_one(
    raw_server: _RawServer, loop: IoLoop, reset: bool
) -> None:
    assert kept_probe(loop, raw_server.base).status_code == 200
    raw_server.drop, raw_server.drop_with_reset = 1, reset  # the server's close crosses our request
    outcome = kept_probe(loop, raw_server.base)
    assert (outcome.status_code, outcome.error) == (200, None)
    assert raw_server.accepts == 2
    assert kept(loop) == [raw_server.base]


def test_a_fresh_connection_that_fails_too_is_a_failed_probe(raw_server: _RawServer, loop: IoLoop) -> None:
    assert kept_probe(loop, raw_server.base).status_code == 200
    raw_server.drop = 2
    outcome = kept_probe(loop, raw_server.base)
    assert outcome.status_code is None
    assert outcome.error in (
        "RemoteDisconnected: Remote end closed connection without response",
        "ConnectionResetError: [Errno 104] Connection reset by peer",
    )
    assert raw_server.accepts == 2  # once more, not twice


def test_a_body_that_never_comes_ends_the_probe_at_its_timeout_with_its_status(
    raw_server: _RawServer, loop: IoLoop
) -> None:
    raw_server.answer = lambda _path: _answer(b"HTTP/1.1 503 Service Unavailable", b"{}", b"Content-Length: 10")
    outcome = kept_probe(loop, raw_server.base, timeout=0.2)
    assert (outcome.status_code, outcome.error) == (503, None)
    run_until(loop, lambda: raw_server.resets == 1)
    assert kept(loop) == []


def test_closing_the_loop_resets_the_kept_connections(raw_server: _RawServer) -> None:
    from helpers import wait_until

    io_loop = IoLoop()
    assert kept_probe(io_loop, raw_server.base).status_code == 200
    io_loop.close()
    wait_until(lambda: raw_server.resets == 1, 10)
    assert kept(io_loop) == []


def test_a_kept_connection_to_a_server_killed_lets_a_new_one_bind_its_port(loop: IoLoop) -> None:
    """kill -9 under a kept connection, a new server on the same port: the kernel (gVisor's too) lets it bind."""
    import subprocess
    import sys

    from helpers import free_port, wait_until

    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def fake_server() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_orchestrator.testing.fake_server",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    servers = [fake_server()]
    try:
        wait_until(lambda: kept_probe(loop, base).status_code == 200, 30)
        assert kept(loop) == [base]
        servers[0].kill()
        servers[0].wait()
        run_until(loop, lambda: not kept(loop))  # its end of stream seen, our end reset
        servers.append(fake_server())
        wait_until(lambda: servers[1].poll() is None and kept_probe(loop, base).status_code == 200, 30)
        assert servers[1].poll() is None, "the new server could not bind the port"
        assert kept(loop) == [base]
    finally:
        for server in servers:
            server.kill()
            server.wait()
