"""The HTTP health probe (SPEC §6): one GET, its status code and latency, as a ``ProbeOutcome``.

The client is injected, so the daemon shares one connection pool and tests pass an ``httpx.MockTransport``.
A probe never raises for network trouble: a refused connection or a timeout is an outcome like any other, for
``domain.health`` to judge. ``probe`` is for an asyncio loop, ``probe_sync`` for the CLI, ``probe_light`` (http.client,
blocking) for one-off checks, and ``probe_on`` for the daemon, which probes every instance every second or so: the
same request on a non-blocking socket of the daemon's one selector (``adapters.io_loop``), so a probe costs no
thread, no hand-off and no header parser. Both light probes close their connection themselves, with a reset (no
TIME_WAIT on either side). ``probe_light`` opens one per probe; ``probe_on`` may keep one per server for the next
probe (``keep_for``: the daemon's next probe comes within a second or two), watched while idle and reset as soon as
the server closes its end or it has been idle too long, so a server that dies never finds its port held by a
keep-alive connection of ours.
"""

from __future__ import annotations

import errno
import http.client
import os
import selectors
import socket
import struct
import time
import weakref
from collections.abc import Callable
from functools import lru_cache, partial
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


def probe_on(
    loop: IoLoop,
    base_url: str,
    path: str,
    timeout: float,
    done: Callable[[ProbeOutcome], None],
    *,
    keep_for: float = 0.0,
) -> None:
    """``probe_light`` without blocking: the probe runs on ``loop``, and ``done(outcome)`` is called there, once.

    ``keep_for``: keep the connection open up to this many seconds after the answer, for the next probe of
    ``base_url`` (one send and one recv instead of a TCP connect and close); 0, or more than ``KEEP_MAX_S``: close it
    after the answer, as ``probe_light`` does.
    """
    started = time.perf_counter()

    def first(outcome: ProbeOutcome) -> None:
        left = _time_left(timeout, started)
        if _wants_fallback(outcome, path, left):
            _LoopGet(loop, base_url, FALLBACK_PATH, left, started, done, keep_for)
        else:
            done(outcome)

    _LoopGet(loop, base_url, path, timeout, started, first, keep_for)


def close_kept(loop: IoLoop) -> None:
    """Close (with a reset) the connections ``probe_on`` keeps on ``loop``; ``loop.close()`` does it too."""
    for conn in list(_POOLS.get(loop, {}).values()):
        conn.close()


# The longest a probe's connection is kept idle. llama-server (cpp-httplib) closes a keep-alive connection idle for
# 5 s itself, and a close by the server leaves a TIME_WAIT on the server's own port (see _Conn): we close first.
KEEP_MAX_S = 2.0

# The connections kept for the next probe: per loop, one per base URL, each idle (no probe on it) while here.
_POOLS: weakref.WeakKeyDictionary[IoLoop, dict[str, _Conn]] = weakref.WeakKeyDictionary()


@lru_cache(maxsize=1024)
def _target(base_url: str) -> tuple[socket.AddressFamily, tuple[Any, ...], str]:
    """(address family, socket address, Host header) of a base URL; resolved once (it is loopback or an IP)."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, address, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@lru_cache(maxsize=1024)
def _request(base_url: str, path: str, keep: bool) -> bytes:
    # HTTP/1.1 keeps the connection by default; one we will not keep says so, and the server need not wait for more.
    connection = "" if keep else "Connection: close\r\n"
    return f"GET {path} HTTP/1.1\r\nHost: {_target(base_url)[2]}\r\n{connection}\r\n".encode()


class _Conn:
    """A probe's TCP connection to one server, fresh or kept for the next probe.

    Its socket is watched for reading from the request on until it is closed, by ``_readable``, which hands what
    comes to the probe using it or, while it is idle, closes it: whatever an idle connection reads (the end of the
    stream of a server that crashed, stopped or closes idle connections; an error; bytes nobody asked for) means
    it is no use any more. Every close is a reset (SO_LINGER 0, set when the socket is made): when the server has
    closed first, its socket waits on the server's own port (FIN_WAIT_2, then TIME_WAIT), and gVisor refuses a
    restarted server the bind of that port while it does; the reset ends it at once. A kept connection takes one of
    llama-server's HTTP threads, which it sizes as n_parallel + 2 "for monitoring endpoints": what they are for.
    """

    __slots__ = ("base_url", "get", "idle_timer", "loop", "sock")

    def __init__(self, loop: IoLoop, base_url: str, sock: socket.socket) -> None:
        self.loop, self.base_url = loop, base_url
        self.sock: socket.socket | None = sock  # None once closed
        self.get: _LoopGet | None = None  # the probe using it; None while idle
        self.idle_timer: Timer | None = None

    def park(self, keep_for: float) -> bool:
        """Keep it idle for the next probe of its base URL, ``keep_for`` seconds at most; False if one already is."""
        pool = _POOLS.get(self.loop)
        if pool is None:
            _POOLS[self.loop] = pool = {}
            self.loop.at_close(partial(close_kept, self.loop))
        if self.base_url in pool:
            return False
        pool[self.base_url] = self
        self.idle_timer = self.loop.call_later(keep_for, self.close)
        return True

    def close(self) -> None:
        sock, self.sock, self.get = self.sock, None, None
        if sock is None:
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        pool = _POOLS.get(self.loop)
        if pool is not None and pool.get(self.base_url) is self:
            del pool[self.base_url]
        self.loop.unwatch(sock.fileno(), closing=True)
        sock.close()

    def _writable(self, _mask: int) -> None:
        if self.get is not None:
            self.get.connected()

    def _readable(self, _mask: int) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if self.get is None:
                self.close()
            else:
                self.get.failed(exc)
            return
        if self.get is None:
            self.close()  # idle: see the class's docstring
        else:
            self.get.received(chunk)


def _take_kept(loop: IoLoop, base_url: str) -> _Conn | None:
    """The idle connection kept for ``base_url``, now the caller's; None if there is none (or it is in use)."""
    pool = _POOLS.get(loop)
    conn = pool.pop(base_url, None) if pool else None
    if conn is not None and conn.idle_timer is not None:
        conn.idle_timer.cancel()
        conn.idle_timer = None
    return conn


class _LoopGet:
    """One GET on a non-blocking socket: on the base URL's kept connection if there is one, else on a fresh one
    (connect, send); read the head, and to keep the connection the body too; then close it (with a reset) or keep it.
    """

    __slots__ = (
        "base_url",
        "conn",
        "data",
        "done",
        "finished",
        "keep_for",
        "loop",
        "request",
        "reused",
        "started",
        "status",
        "timer",
        "want",
    )

    def __init__(
        self,
        loop: IoLoop,
        base_url: str,
        path: str,
        timeout: float,
        started: float,
        done: Callable[[ProbeOutcome], None],
        keep_for: float = 0.0,
    ) -> None:
        self.loop, self.base_url, self.done, self.started = loop, base_url, done, started
        # Kept longer than KEEP_MAX_S, a connection would meet llama-server's idle close: then it is not kept at all
        # (the next probe comes too late to use it).
        self.keep_for = keep_for if 0 < keep_for <= KEEP_MAX_S else 0.0
        self.data = b""
        self.finished = False
        self.reused = False
        self.status: int | None = None
        self.want = -1  # the length of the whole answer, head and body, once its head is read and it can be kept
        self.conn: _Conn | None = None
        self.timer: Timer | None = None
        try:
            self.request = _request(base_url, path, bool(self.keep_for))
        except OSError as exc:  # the host does not resolve
            self._finish(None, f"{type(exc).__name__}: {exc}")
            return
        self.timer = loop.call_later(max(0.0, timeout), self._timed_out)
        kept = _take_kept(loop, base_url) if self.keep_for else None
        if kept is None or not self._send_on(kept):
            self._open()

    def _send_on(self, conn: _Conn) -> bool:
        """Send on a kept connection (already watched for reading); False if it is dead: then it is closed."""
        sock = conn.sock
        if sock is None:  # never: an idle connection that closes leaves the pool
            return False
        try:
            sock.send(self.request)
        except OSError:
            conn.close()
            return False
        self.conn, self.reused, conn.get = conn, True, self
        return True

    def _open(self) -> None:
        try:
            family, address, _ = _target(self.base_url)
            sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
        except OSError as exc:
            self._finish(None, f"{type(exc).__name__}: {exc}")
            return
        self.conn = conn = _Conn(self.loop, self.base_url, sock)
        conn.get = self
        try:
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
        # On loopback the handshake is usually over before connect returns: then send at once, and wait only for
        # the answer (one registration instead of two, one wake-up less).
        if not self._send(early=True):
            self.loop.watch(sock.fileno(), selectors.EVENT_WRITE, conn._writable)

    def _send(self, *, early: bool) -> bool:
        """Send the request and wait for the answer; False (early only) when the connection is not up yet."""
        conn = self.conn
        if conn is None or conn.sock is None or self.finished:
            return True
        sock = conn.sock
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
        self.loop.watch(sock.fileno(), selectors.EVENT_READ, conn._readable)
        return True

    def connected(self) -> None:
        self._send(early=False)

    def failed(self, exc: OSError) -> None:
        """Reading failed (a reset, mostly)."""
        if self.reused and not self.data:
            self._retry()
        elif self.status is not None:
            self._finish(self.status, None)  # in the body: the status code stands
        else:
            self._finish(None, f"{type(exc).__name__}: {exc}")

    def received(self, chunk: bytes) -> None:
        self.data += chunk
        if self.want < 0:
            end = self.data.find(b"\r\n\r\n")
            if end < 0 and chunk and len(self.data) < 65536:
                return  # the headers are not all here yet
            if end < 0 and not self.data and self.reused:
                self._retry()
                return
            if end < 0:
                what = "Remote end closed connection without response" if not self.data else "headers too long"
                self._finish(None, f"RemoteDisconnected: {what}")
                return
            head = self.data[:end]
            self.status = status = _status_code(head)
            if status is None:
                line = self.data.split(b"\r\n", 1)[0][:80].decode("latin-1")
                self._finish(None, f"BadStatusLine: {line!r}")
                return
            length = _body_length(head) if self.keep_for else -1
            if length < 0:
                # The status code is the verdict: the body (if any) is not waited for. Closing with a reset drops it.
                self._finish(status, None)
                return
            self.want = end + 4 + length
        if len(self.data) < self.want and chunk:
            return  # to keep the connection, its answer must be read to the end (within the probe's timeout)
        self._finish(self.status, None, keep=len(self.data) == self.want)

    def _retry(self) -> None:
        # The kept connection was dead (the server's idle close crossed our request, or the server is gone): once
        # more on a fresh connection, within the same timeout, so that this does not count as a failed probe.
        if self.conn is not None:
            self.conn.close()
        self.conn, self.reused, self.data = None, False, b""
        self._open()

    def _timed_out(self) -> None:
        self.timer = None
        if self.status is not None:
            self._finish(self.status, None)  # the head came, the body did not: the status code stands
        else:
            self._finish(None, "timed out (TimeoutError)")

    def _finish(self, status: int | None, error: str | None, *, keep: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.get = None
            if not (keep and conn.park(self.keep_for)):
                conn.close()
        self.done(ProbeOutcome(status, error, _ms_since(self.started)))


def _body_length(head: bytes) -> int:
    """The length of the body of an answer whose connection can be kept, else -1: an HTTP/1.0 answer, one that says
    ``Connection: close``, a chunked one (rare for /health: not worth a parser) or one without a Content-Length."""
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 "):
        return -1
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or length >= 0:
                return -1
            length = int(value)
        elif name == b"transfer-encoding" or (name == b"connection" and b"close" in value.lower()):
            return -1
    return length


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
