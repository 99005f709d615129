"""The router's side of one upstream exchange: the aiohttp session, which headers go through, and the answer
being relayed with the token accounting for /metrics: ``LeanUpstream`` on a lean connection
(``adapters.http_relay``, every /v1 request: about 30-40 % less CPU per streamed token than aiohttp in
bench/router.py), ``Upstream`` through aiohttp (``/upstream/`` with its streamed bodies, HEAD, peers).

aiohttp rather than httpx.AsyncClient: bench/asgi_choice.py measured about 6x the requests per second at
concurrency 16 and 2-4x the streamed events per second through the same proxy. Its connector makes connections
itself (``_Connector``): llama-server closes one after every stream, and aiohttp's way through uvloop's
``sock_connect`` resolved the numeric address in a thread pool each time.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp

from llama_orchestrator.adapters.http_relay import (
    ClientGone,
    RelayConnection,
    connect_socket,
    reset_on_close_socket,
)
from llama_orchestrator.domain.routing import TokenReport, sse_token_report, token_report

TOKEN_BODY_MAX = 256 * 1024  # non-streamed answers up to this size are parsed for their token usage
# Not forwarded: hop-by-hop headers, what aiohttp sets itself, and the client's key for *our* API.
_HOP_IN = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
        b"content-length",
        b"accept-encoding",
        b"authorization",
    }
)
# Not relayed back: hop-by-hop headers, and the ones uvicorn writes itself.
_HOP_OUT = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date"})


def _relayed(name: bytes) -> bool:
    """Whether an answer's header (its name in lower case) goes back to the client. Never CORS headers:
    llama-server reflects any Origin in access-control-allow-origin, so relayed, every page could read the
    answers; the daemon's entry (``api.guard``) answers CORS itself, by api.cors_origins."""
    return name not in _HOP_OUT and not name.startswith(b"access-control-")


Finish = Callable[[int, "TokenReport | None"], None]


class _Connector(aiohttp.TCPConnector):
    """``TCPConnector`` whose new connections are made by ``connect_socket``: llama-server closes the connection after
    every stream, so each streamed request pays a connect (a third of the router's CPU per stream in py-spy, most
    of it uvloop's thread-pool resolve). Only for one plain-TCP address (an instance is always one); the rest, and
    an aiohttp whose internals differ, go the usual way."""

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        addr_infos, req, timeout = kwargs.get("addr_infos"), kwargs.get("req"), kwargs.get("timeout")
        if not addr_infos or len(addr_infos) != 1 or kwargs.get("ssl") or req is None or timeout is None:
            return await super()._wrap_create_connection(*args, **kwargs)
        client_error = kwargs.pop("client_error", aiohttp.ClientConnectorError)
        for key in ("addr_infos", "req", "timeout"):
            kwargs.pop(key)
        try:
            async with asyncio.timeout(timeout.sock_connect):
                sock = await connect_socket(addr_infos[0], self._loop)
                return await self._loop.create_connection(*args, **kwargs, sock=sock)
        except OSError as exc:
            if exc.errno is None and isinstance(exc, TimeoutError):
                raise  # aiohttp reports a connect timeout itself
            raise client_error(req.connection_key, exc) from exc


_FAST_CONNECT = "addr_infos" in inspect.signature(aiohttp.TCPConnector._wrap_create_connection).parameters


def new_session() -> aiohttp.ClientSession:
    """One per instance, so that its pooled connections can be dropped when it stops: a connection left open to a
    stopped server keeps its port from being bound again."""
    connector = _Connector if _FAST_CONNECT else aiohttp.TCPConnector
    return aiohttp.ClientSession(
        # keep-alive shorter than llama-server's own 5 s, so we never reuse a connection it is closing
        connector=connector(limit=0, keepalive_timeout=4.0, socket_factory=reset_on_close_socket),
        auto_decompress=False,  # relay bytes as they are
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),  # a long generation is not a timeout
        skip_auto_headers=("User-Agent",),
    )


def upstream_headers(headers: Iterable[tuple[bytes, bytes]], args: list[str], keep_length: bool) -> dict[str, str]:
    """The client's headers as they go to llama-server. ``keep_length``: the body is streamed with that length."""
    out = {}
    for key, value in headers:
        key = key.lower()
        if key not in _HOP_IN or (keep_length and key == b"content-length"):
            out[key.decode("latin-1")] = value.decode("latin-1")
    out["accept-encoding"] = "identity"  # a compressed stream would arrive in lumps
    api_key = _arg_value(args, "--api-key")  # an instance with its own key gets it from us, not from the client
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    return out


def lean_request(
    method: str, target: str, host: str, headers: Iterable[tuple[bytes, bytes]], args: list[str], body: bytes
) -> bytes:
    """The whole request as it goes to llama-server on a lean connection: what ``upstream_headers`` would send,
    as bytes in one piece (one ``transport.write``). ``target``: path and query as the client wrote them (the
    server's parser has checked them), ``host``: the instance's ``host:port``."""
    parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode("ascii"), target.encode("latin-1"), host.encode())]
    for key, value in headers:
        key = key.lower()
        if key not in _HOP_IN:
            parts.append(b"%s: %s\r\n" % (key, value))
    api_key = _arg_value(args, "--api-key")  # an instance with its own key gets it from us, not from the client
    if api_key:
        parts.append(b"authorization: Bearer %s\r\n" % api_key.encode("latin-1"))
    parts.append(b"accept-encoding: identity\r\ncontent-length: %d\r\n\r\n" % len(body))
    parts.append(body)
    return b"".join(parts)


class _Answer:
    """What both kinds of upstream answer share: the accounting when it ends (``finish`` frees the slot and
    counts it, with the tokens of the last chunks of a stream or of a small JSON body) and the time to first
    token. ``close()`` must be called."""

    status: int
    event_stream: bool
    _json: bool  # an application/json answer: kept (up to TOKEN_BODY_MAX) for its token count

    def __init__(self, instance: str, started: float, clock: Callable[[], float], finish: Finish) -> None:
        self._clock, self._finish = clock, finish
        self._started = started  # when the request arrived, on ``clock``
        self.instance = instance
        self._tail: deque[bytes] = deque(maxlen=3)  # the last chunks of a stream hold its usage/timings
        self._kept: list[bytes] = []
        self._complete = False
        self._closed = False
        self.first_chunk_at: float | None = None  # on ``clock``: when the first body bytes came (time to first token)
        self.send_failed = False  # relay(): sending to the client raised

    def _account(self, client_gone: bool) -> None:
        # A client may hang up as soon as it has read `data: [DONE]`, before the stream's end: it got everything.
        delivered = self._complete or (self.event_stream and bool(self._tail) and b"data: [DONE]" in self._tail[-1])
        tokens = self._tokens(self._clock() - self._started) if delivered else None
        self._finish(self.status if delivered else 499 if client_gone else 502, tokens)

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from the request's arrival to the first streamed bytes; None for an answer that is not a stream
        (its first byte is its whole answer) or one that sent nothing."""
        if not self.event_stream or self.first_chunk_at is None:
            return None
        return max(0.0, self.first_chunk_at - self._started)

    async def _send_each(
        self,
        piece: bytes,
        read: Callable[[], Awaitable[bytes]],
        send: Callable[[dict], Awaitable[None]],
        *,
        keep_tail: bool,
    ) -> None:
        """Send ``piece`` and each one ``read`` gives after it as one ASGI body message (``more_body``), keeping
        what the token count needs: a stream's pieces in the tail (``keep_tail``), a JSON answer's up to
        ``TOKEN_BODY_MAX``. ``send_failed`` tells a send that raised (the client is gone) from an upstream that
        broke."""
        tail, kept = self._tail, self._kept
        budget = 0 if self.event_stream else TOKEN_BODY_MAX if self._json else 0
        while piece:
            if keep_tail:
                tail.append(piece)
            elif budget > 0:
                kept.append(piece)
                budget -= len(piece)
                if budget <= 0:
                    kept.clear()  # too big to be worth parsing for the token count
            try:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            except OSError:
                self.send_failed = True
                raise
            piece = await read()

    def _tokens(self, elapsed: float) -> TokenReport | None:
        try:
            if self.event_stream:
                return sse_token_report(b"".join(self._tail), elapsed_s=elapsed)
            if self._kept:
                return token_report(json.loads(b"".join(self._kept)), elapsed_s=elapsed)
        except ValueError:
            pass
        return None


class Upstream(_Answer):
    """An instance's answer being relayed through aiohttp (peers, ``/upstream/``, what the lean path skips)."""

    def __init__(
        self, resp: aiohttp.ClientResponse, instance: str, started: float, clock: Callable[[], float], finish: Finish
    ) -> None:
        super().__init__(instance, started, clock, finish)
        self._resp = resp
        self.status = resp.status
        self.headers = [(k.lower(), v) for k, v in resp.raw_headers if _relayed(k.lower())]
        self.headers.append((b"x-llama-orch-instance", instance.encode()))
        content_type = resp.headers.get("content-type", "")
        self.event_stream = content_type.startswith("text/event-stream")
        if self.event_stream and resp.connection is not None and resp.connection.protocol is not None:
            # llama-server closes the connection after a stream although it announced keep-alive; pooled, it
            # would fail the next request sent on it. So a stream's connection is never reused.
            resp.connection.protocol.force_close()
        self._json = content_type.startswith("application/json")

    @property
    def small(self) -> bool:
        """A complete answer of known, small size (not a stream): sent on in one piece, one send fewer."""
        length = self._resp.content_length
        return not self.event_stream and length is not None and length <= TOKEN_BODY_MAX

    async def read(self) -> bytes:
        body = await self._resp.read()
        if self._json:
            self._kept.append(body)
        self._complete = True
        return body

    async def relay(self, send: Callable[[dict], Awaitable[None]], writer: Any = None) -> None:
        """Send the body on as it arrives, each chunk as one ASGI ``http.response.body`` message (``more_body``),
        or for an event stream through ``writer.write`` when given (``api.http_protocol.ChunkWriter``).

        One loop, no generator: it runs once per streamed token, and an async generator and a send wrapper per
        chunk were a measurable part of the router's CPU per token. ``send_failed`` tells a send that raised (the
        client is gone) from an upstream that broke.
        """
        read = self._resp.content.readany
        chunk = await read()
        if chunk:
            self.first_chunk_at = self._clock()
        if self.event_stream and writer is not None:
            write = writer.write
            tail = self._tail
            while chunk:
                tail.append(chunk)
                pending = write(chunk)
                if pending is not None:
                    await pending  # the client reads slower than the instance writes
                chunk = await read()
        else:
            await self._send_each(chunk, read, send, keep_tail=self.event_stream)
        self._complete = True

    async def close(self, *, client_gone: bool = False) -> None:
        """Finish: a partly read answer closes its connection, which makes llama-server stop generating."""
        if self._closed:
            return
        self._closed = True
        if self._complete:
            self._resp.release()
        else:
            self._resp.close()
        self._account(client_gone)


class LeanUpstream(_Answer):
    """An instance's answer on a lean connection (``adapters.http_relay``): a stream's body goes from the
    connection's ``data_received`` straight to the client's (``relay`` with a writer), the rest as ``Upstream``.
    Only the last few pieces are kept, for the token count; nothing is parsed until the end."""

    def __init__(
        self, conn: RelayConnection, instance: str, started: float, clock: Callable[[], float], finish: Finish
    ) -> None:
        super().__init__(instance, started, clock, finish)
        self._conn = conn
        self.status = conn.status
        self.headers = []
        content_type, self._length = b"", None
        for key, value in conn.headers:
            if not _relayed(key):
                continue
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                self._length = int(value) if value.strip().isdigit() else None
            self.headers.append((key, value))
        self.headers.append((b"x-llama-orch-instance", instance.encode()))
        self.event_stream = content_type.startswith(b"text/event-stream")
        self._json = content_type.startswith(b"application/json")
        self._tail = conn.tail  # the connection keeps the last pieces itself

    @property
    def small(self) -> bool:
        """A complete answer of known, small size (not a stream): sent on in one piece, one send fewer."""
        return not self.event_stream and self._length is not None and self._length <= TOKEN_BODY_MAX

    async def read(self) -> bytes:
        body = await self._conn.read(TOKEN_BODY_MAX)
        if self._json:
            self._kept.append(body)
        self._complete = True
        return body

    async def relay(self, send: Callable[[dict], Awaitable[None]], writer: Any = None) -> None:
        """Send the body on: an event stream through ``writer`` (``api.http_protocol.ChunkWriter``: ``push``,
        ``drain``, ``gone``) from the connection's callbacks, with backpressure; otherwise piece by piece through
        ``send`` (the connection stops reading while the pieces not sent yet pass ``PULL_HIGH``)."""
        conn = self._conn
        if self.event_stream and writer is not None:
            try:
                await conn.relay(writer.push, writer.drain, writer.gone)
            except ClientGone:
                self.send_failed = True
                raise
            finally:
                self.first_chunk_at = conn.first_body_at
            self._complete = True
            return
        try:
            # (the connection keeps a stream's last pieces itself: no tail here)
            await self._send_each(await conn.next_piece(), conn.next_piece, send, keep_tail=False)
        finally:
            self.first_chunk_at = conn.first_body_at
        self._complete = True

    async def close(self, *, client_gone: bool = False) -> None:
        """Finish: a complete answer's connection goes back to the pool; a partly read one is closed, which makes
        llama-server stop generating."""
        if self._closed:
            return
        self._closed = True
        if self._complete:
            self._conn.finish()
        else:
            self._conn.abort()
        self._account(client_gone)


Answer = Upstream | LeanUpstream  # what the router hands the proxy to relay


def _arg_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None
