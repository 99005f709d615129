"""The HTTP health probe (SPEC §6): one GET, its status code and latency, as a ``ProbeOutcome``.

The client is injected, so the daemon shares one connection pool and tests pass an ``httpx.MockTransport``.
A probe never raises for network trouble: a refused connection or a timeout is an outcome like any other, for
``domain.health`` to judge. ``probe`` is for an asyncio loop, ``probe_sync`` for the CLI, ``probe_light`` (http.client,
blocking) for one-off checks, and ``probe_on`` for the daemon, which probes every instance every second or so: the
same request on a non-blocking socket of the daemon's one selector (``adapters.io_loop``), so a probe costs no
thread, no hand-off and no header parser. Both light probes open one connection per probe that *we* close (with a
reset), so a server that dies never finds its port held by a half-closed keep-alive connection of ours.
"""

from __future__ import annotations

import errno
import http.client
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import httpx

from llama_orchestrator.adapters.io_loop import IoLoop, Timer
from llama_orchestrator.domain.health import ProbeOutcome

# llama-server has answered on both paths across versions; a 404 on the configured one is a wrong path, not
# a sick server.
FALLBACK_PATH = "/v1/health"
_LINGER_RESET = struct.pack("ii", 1, 0)
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # Linux: made non-blocking by socket() itself, one call less


async def probe(client: httpx.AsyncClient, base_url: str, path: str, timeout: float) -> ProbeOutcome:  # noqa: ASYNC109 - the time left goes to the fallback GET
    """GET ``base_url + path`` within ``timeout`` seconds; on 404, GET ``/v1/health`` with the time left."""
    started = time.perf_counter()
    outcome = await _get(client, _join(base_url, path), timeout, started)
    left = _time_left(timeout, started)
    if _wants_fallback(outcome, path, left):
        outcome = await _get(client, _join(base_url, FALLBACK_PATH), left, started)
    return outcome


def probe_sync(client: httpx.Client, base_url: str, path: str, timeout: float) -> ProbeOutcome:
    """The same probe, blocking."""
    started = time.perf_counter()
    outcome = _get_sync(client, _join(base_url, path), timeout, started)
    left = _time_left(timeout, started)
    if _wants_fallback(outcome, path, left):
        outcome = _get_sync(client, _join(base_url, FALLBACK_PATH), left, started)
    return outcome


def probe_light(base_url: str, path: str, timeout: float) -> ProbeOutcome:
    """The same probe with http.client: one connection, closed by us after the answer."""
    started = time.perf_counter()
    outcome = _get_light(base_url, path, timeout, started)
    left = _time_left(timeout, started)
    if _wants_fallback(outcome, path, left):
        outcome = _get_light(base_url, FALLBACK_PATH, left, started)
    return outcome


def _get_light(base_url: str, path: str, timeout: float, started: float) -> ProbeOutcome:
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        connection.connect()
        # Close with a reset, not a FIN: no TIME_WAIT is left on either side. Some kernels (gVisor's among them)
        # refuse a new bind of a port while a TIME_WAIT connection of it remains, even with SO_REUSEADDR, so a
        # probe's leftover would keep a crashed server from being restarted on its port for a minute.
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return ProbeOutcome(response.status, None, _ms_since(started))
    except TimeoutError as exc:
        return ProbeOutcome(None, f"timed out ({type(exc).__name__})", _ms_since(started))
    except ConnectionRefusedError as exc:
        return ProbeOutcome(None, f"cannot connect: {exc}", _ms_since(started))
    except (OSError, http.client.HTTPException) as exc:
        return ProbeOutcome(None, f"{type(exc).__name__}: {exc}", _ms_since(started))
    finally:
        connection.close()


def probe_on(loop: IoLoop, base_url: str, path: str, timeout: float, done: Callable[[ProbeOutcome], None]) -> None:
    """``probe_light`` without blocking: the probe runs on ``loop``, and ``done(outcome)`` is called there, once."""
    started = time.perf_counter()

    def first(outcome: ProbeOutcome) -> None:
        left = _time_left(timeout, started)
        if _wants_fallback(outcome, path, left):
            _LoopGet(loop, base_url, FALLBACK_PATH, left, started, done)
        else:
            done(outcome)

    _LoopGet(loop, base_url, path, timeout, started, first)


@lru_cache(maxsize=1024)
def _target(base_url: str) -> tuple[socket.AddressFamily, tuple[Any, ...], str]:
    """(address family, socket address, Host header) of a base URL; resolved once (it is loopback or an IP)."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, address, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _LoopGet:
    """One GET on a non-blocking socket: connect, send, read the status line, close with a reset."""

    __slots__ = ("data", "done", "finished", "loop", "request", "sock", "started", "timer")

    def __init__(
        self,
        loop: IoLoop,
        base_url: str,
        path: str,
        timeout: float,
        started: float,
        done: Callable[[ProbeOutcome], None],
    ) -> None:
        self.loop, self.done, self.started = loop, done, started
        self.data = b""
        self.finished = False
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None
        try:
            family, address, host = _target(base_url)
            self.request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            self.sock = sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
            if not _NONBLOCK:
                sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)  # as in _get_light: no TIME_WAIT
            code = sock.connect_ex(address)
        except OSError as exc:
            self._finish(None, f"{type(exc).__name__}: {exc}")
            return
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._finish(None, _connect_error(code))
            return
        self.timer = loop.call_later(max(0.0, timeout), self._timed_out)
        # On loopback the handshake is usually over before connect returns: then send at once, and wait only for
        # the answer (one registration instead of two, one wake-up less).
        if not self._send(early=True):
            loop.watch(sock.fileno(), selectors.EVENT_WRITE, self._connected)

    def _send(self, *, early: bool) -> bool:
        """Send the request and wait for the answer; False (early only) when the connection is not up yet."""
        sock = self.sock
        if sock is None or self.finished:
            return True
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._finish(None, _connect_error(code))
            return True
        try:
            sock.send(self.request)  # a few dozen bytes: a fresh socket's buffer takes them at once
        except OSError as exc:
            if early and _not_connected(exc):
                return False  # the handshake is still going: wait until the socket is writable
            self._finish(None, f"{type(exc).__name__}: {exc}")
            return True
        self.loop.watch(sock.fileno(), selectors.EVENT_READ, self._readable)
        return True

    def _connected(self, _mask: int) -> None:
        self._send(early=False)

    def _readable(self, _mask: int) -> None:
        sock = self.sock
        if sock is None or self.finished:
            return
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(None, f"{type(exc).__name__}: {exc}")
            return
        self.data += chunk
        end = self.data.find(b"\r\n\r\n")
        if end < 0 and chunk and len(self.data) < 65536:
            return  # the headers are not all here yet
        if end < 0:
            what = "Remote end closed connection without response" if not self.data else "headers too long"
            self._finish(None, f"RemoteDisconnected: {what}")
            return
        status = _status_code(self.data[:end])
        if status is None:
            line = self.data.split(b"\r\n", 1)[0][:80].decode("latin-1")
            self._finish(None, f"BadStatusLine: {line!r}")
            return
        # The status code is the verdict: the body (if any) is not waited for. Closing with a reset drops it.
        self._finish(status, None)

    def _timed_out(self) -> None:
        self.timer = None
        self._finish(None, "timed out (TimeoutError)")

    def _finish(self, status: int | None, error: str | None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        if self.sock is not None:
            self.loop.unwatch(self.sock.fileno(), closing=True)
            self.sock.close()
        self.done(ProbeOutcome(status, error, _ms_since(self.started)))


def _not_connected(exc: OSError) -> bool:
    return exc.errno in (errno.ENOTCONN, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


def _status_code(head: bytes) -> int | None:
    parts = head.split(b"\r\n", 1)[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])


def _connect_error(code: int) -> str:
    exc = OSError(code, os.strerror(code))  # the subclass for the code: ConnectionRefusedError for ECONNREFUSED
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect: {exc}"
    if isinstance(exc, TimeoutError):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


async def _get(client: httpx.AsyncClient, url: str, timeout: float, started: float) -> ProbeOutcome:  # noqa: ASYNC109 - httpx's own
    try:
        response = await client.get(url, timeout=timeout)
    except httpx.TransportError as exc:
        return ProbeOutcome(None, _error_text(exc), _ms_since(started))
    return ProbeOutcome(response.status_code, None, _ms_since(started))


def _get_sync(client: httpx.Client, url: str, timeout: float, started: float) -> ProbeOutcome:
    try:
        response = client.get(url, timeout=timeout)
    except httpx.TransportError as exc:
        return ProbeOutcome(None, _error_text(exc), _ms_since(started))
    return ProbeOutcome(response.status_code, None, _ms_since(started))


def _wants_fallback(outcome: ProbeOutcome, path: str, left: float) -> bool:
    # With no time left the 404 stands (as a failure): the probe as a whole must fit in its timeout.
    return outcome.status_code == 404 and path != FALLBACK_PATH and left > 0


def _join(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def _time_left(timeout: float, started: float) -> float:
    return timeout - (time.perf_counter() - started)


def _ms_since(started: float) -> float:
    # Latency of the whole probe, a 404 first try included: what a check of this instance costs.
    return (time.perf_counter() - started) * 1000


def _error_text(exc: httpx.TransportError) -> str:
    kind = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({kind})"
    detail = str(exc) or kind
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {detail}"
    return f"{kind}: {detail}" if detail != kind else kind
