"""A lean HTTP/1.1 client for relaying an instance's answers: one ``asyncio.Protocol`` per upstream connection,
httptools parsing the response, and a keep-alive pool per instance (issue 14).

Why not aiohttp here: py-spy on the router under bench/router.py put most of its CPU per request in aiohttp's
request machinery (headers as a multidict, a payload object, a writer, a reader, a task to write the body), and
each streamed token went through its StreamReader and a future before our relay loop saw it. Here a request is
one ``transport.write`` of bytes built in one go, and each piece of a streamed body goes from ``data_received``
to the client's connection in the same call (``push`` mode), with backpressure both ways: when the client's
transport is paused, this connection stops reading (``pause_reading``) until it drains.

What it does not do: TLS, redirects, request bodies that stream, ``Expect: 100-continue``, HEAD (the parser does
not know the request's method). The router uses aiohttp for those (``services.upstream``).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

KEEPALIVE_S = 4.0  # an idle pooled connection older than this is not reused: llama-server closes its own at 5 s
CONNECT_TIMEOUT_S = 10.0
PULL_HIGH = 256 * 1024  # pull mode: past this much unread body, stop reading from the instance
TAIL_PIECES = 3  # the last body pieces kept: a stream's usage/timings are in its last events


class ConnectFailed(OSError):
    """No connection could be made: the instance is not listening (or not in time)."""


class UpstreamClosed(ConnectionError):
    """The instance closed or broke the connection before its answer was complete."""


class ClientGone(ConnectionResetError):
    """The client the answer was being relayed to closed its connection."""


class _Stale(UpstreamClosed):
    """A pooled connection the instance had closed before our request reached it: send it again on a new one."""


def reset_on_close_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """Upstream sockets close with a reset (SO_LINGER 0), so neither side keeps a TIME_WAIT on the server's port:
    some kernels (gVisor's) refuse to bind a port that still has one, even with SO_REUSEADDR, and a crashed or
    evicted llama-server could not come back on its port for a minute."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if family in (socket.AF_INET, socket.AF_INET6):
        # as aiohttp's: the tail of a body past one segment is not held back for the server's delayed ACK
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def connect_socket(addr_info: tuple[Any, ...], loop: asyncio.AbstractEventLoop) -> socket.socket:
    """A connected non-blocking socket to a numeric address, without ``loop.sock_connect``: uvloop's resolves even
    a numeric address again in its thread pool, which measured 2-4x the cost of the whole connect here."""
    address = addr_info[4]
    sock = reset_on_close_socket(addr_info)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            writable = loop.create_future()
            fd = sock.fileno()

            def connected() -> None:
                if not writable.done():
                    writable.set_result(None)

            loop.add_writer(fd, connected)
            try:
                await writable
            finally:
                loop.remove_writer(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"Connect call failed {address}: {errno.errorcode.get(err, err)}")
    except BaseException:
        sock.close()
        raise
    return sock


# What a push sink gets: a piece of body; it answers True when reading must stop (the client is slow or gone).
Push = Callable[[bytes], bool]


class RelayConnection(asyncio.Protocol):
    """One connection to an instance, carrying one exchange at a time.

    After ``exchange()`` the status and headers are in; the body then either collects (``read()``), is handed out
    piece by piece (``next_piece()``, pull mode), or goes to a ``push`` sink as it arrives (``relay()``).
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._clock = pool.clock
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None  # the one coroutine waiting on this connection
        self._reset()
        self.lost = False
        self.idle_since = 0.0

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.error: Exception | None = None
        self.got_bytes = False  # any byte of this exchange's answer arrived
        self.first_body_at: float | None = None  # on the pool's clock: when the first body bytes came
        self.tail: deque[bytes] = deque(maxlen=TAIL_PIECES)
        self._pieces: deque[bytes] = deque()  # pull mode: body not handed out yet
        self._buffered = 0
        self._push: Push | None = None
        self._paused = False  # we paused reading (backpressure)
        self._until_close = False  # a body that ends when the connection does
        self._keep = False  # the instance lets this connection carry another exchange

    # -- asyncio.Protocol ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamClosed("the instance switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"the instance's answer is not valid HTTP: {exc}"))

    def eof_received(self) -> bool | None:
        if self._until_close and self.head_done and not self.complete:
            self.on_message_complete()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._pool.forget(self)
        if not self.complete:
            if not self.got_bytes and self.idle_since:
                self._fail(_Stale("a pooled connection was closed by the instance"))
            else:
                why = f": {exc}" if exc else ""
                self._fail(UpstreamClosed(f"the instance closed the connection before its answer was complete{why}"))

    def pause_writing(self) -> None:  # a request body larger than the socket's buffer: the kernel takes it all
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks -------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status < 200:  # 1xx: an interim answer; the real one follows
            self.headers = []
            return
        names = {k for k, _ in self.headers}
        self._until_close = b"content-length" not in names and b"transfer-encoding" not in names
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.first_body_at is None:
            self.first_body_at = self._clock()
        self.tail.append(body)
        push = self._push
        if push is not None:
            if push(body) and not self._paused:
                self._pause()
            return
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > PULL_HIGH and not self._paused:
            self._pause()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status < 200:
            return  # the parser goes on with the final answer
        self.complete = True
        self._keep = self._parser.should_keep_alive()
        self._wake()

    # -- the exchange ----------------------------------------------------------------------------------------

    def _pause(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if self.transport is not None and not self.lost:
                self.transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.transport is not None:
            self.transport.abort()

    async def _wait(self) -> None:
        self._waiter = waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    async def exchange(self, request: bytes) -> None:
        """Send ``request`` (head and body) and wait for the answer's head. Once the head is in, a break is the
        body's (``read``, ``next_piece``, ``relay`` raise it): the instance has answered, so no retry."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.lost:
            raise _Stale("the pooled connection is closed")
        transport.write(request)
        while not self.head_done:
            self._raise()
            await self._wait()

    @property
    def keep_alive(self) -> bool:
        return self.complete and self._keep and not self.lost

    async def read(self, limit: int) -> bytes:
        """The whole body; raises UpstreamClosed when it is over ``limit`` bytes or the connection breaks."""
        while not self.complete:
            self._raise()
            if self._buffered > limit:
                raise UpstreamClosed(f"the answer is over {limit} bytes")
            self._resume()
            await self._wait()
        pieces, self._pieces, self._buffered = self._pieces, deque(), 0
        return b"".join(pieces)

    async def next_piece(self) -> bytes:
        """The next piece of body (pull mode); b"" at its end."""
        while True:
            if self._pieces:
                piece = self._pieces.popleft()
                self._buffered -= len(piece)
                if self._buffered < PULL_HIGH:
                    self._resume()
                return piece
            if self.complete:
                return b""
            self._raise()
            self._resume()
            await self._wait()

    async def relay(self, push: Push, drain: Callable[[], Awaitable[None]], gone: Callable[[], bool]) -> None:
        """Hand every piece of body to ``push`` as it arrives (from ``data_received``, no task in between) until
        the answer is complete. When ``push`` says stop: wait for ``drain()``, then read on; ``gone()``: the client
        left, which raises ClientGone at once (the caller then closes this connection)."""
        for piece in self._pieces:  # what came with the head
            if push(piece):
                self._paused = True
        self._pieces.clear()
        self._buffered = 0
        self._push = push
        try:
            while not self.complete:
                self._raise()
                if self._paused:
                    if gone():
                        raise ClientGone("the client closed the connection")
                    if self.transport is not None:
                        self.transport.pause_reading()
                    await drain()
                    if gone():
                        raise ClientGone("the client closed the connection")
                    self._resume()
                    continue
                await self._wait()
            self._raise()
        finally:
            self._push = None

    def finish(self) -> None:
        """The exchange is over: back to the pool when the connection can carry another one, else closed."""
        if self.keep_alive and self._pool.keep(self):
            self._reset()
            return
        self.abort()

    def abort(self) -> None:
        """Close now, unread answer and all: an instance whose connection closes stops generating."""
        self.lost = True
        self._pool.forget(self)
        if self.transport is not None:
            self.transport.abort()


class ConnectionPool:
    """Keep-alive connections to one instance (``host``:``port``, a numeric address), made on demand."""

    def __init__(self, host: str, port: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = asyncio.get_running_loop()
        self.clock = clock  # for first_body_at (time to first token)
        self.address = (host, port)
        self.host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._addr_info = (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))
        self._idle: list[RelayConnection] = []
        self.closed = False

    async def exchange(self, request: bytes) -> RelayConnection:
        """Send ``request`` on a pooled connection or a new one; the connection once the answer's head is in.

        A pooled connection the instance had closed meanwhile is dropped and the request sent on a new one.
        Raises ConnectFailed (no connection) or UpstreamClosed (closed or broken before the head was complete).
        """
        while True:
            conn = self._take()
            if conn is None:
                conn = await self._connect()
            try:
                await conn.exchange(request)
            except _Stale:
                conn.abort()
                if not conn.idle_since:
                    raise UpstreamClosed("the instance closed a new connection before answering") from None
                continue
            except BaseException:
                conn.abort()  # cancelled (the client left) or broken: the instance stops working on it
                raise
            return conn

    def _take(self) -> RelayConnection | None:
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.abort()
        return None

    async def _connect(self) -> RelayConnection:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                sock = await connect_socket(self._addr_info, self.loop)
        except OSError as exc:
            raise ConnectFailed(exc.errno, f"cannot connect to {self._addr_info[4]}: {exc}") from exc
        _, conn = await self.loop.create_connection(lambda: RelayConnection(self), sock=sock)
        return conn

    def keep(self, conn: RelayConnection) -> bool:
        if self.closed:
            return False
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        return True

    def forget(self, conn: RelayConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Drop the idle connections; those in use close when their exchange ends."""
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    @property
    def idle(self) -> int:
        return len(self._idle)
