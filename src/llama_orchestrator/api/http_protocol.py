"""uvicorn's HTTP protocol with a deadline on the request head (slowloris).

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has no limit on how long a client may
take to send a request's headers: 200 sockets sending a byte a second were held open for ever. Here a timer runs
from the moment a connection opens, and again from the first byte of each further request, until the headers
are complete; when it fires first, the client gets a 408 and the connection is closed. A request whose head is
complete is the app's business (a long upload or a long answer is not slow on purpose).

At most ``max_pending`` connections may wait for their head at once: past that the one waiting longest is cut, so
a flood of slow sockets costs a bounded number of file descriptors while fresh (fast) clients still get in.

Each request's scope also carries a ``ChunkWriter`` (``scope["extensions"][CHUNK_WRITER]``): the router's relay
writes a stream's chunks through it instead of through ``send``, and learns from it when the client is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("llama_orchestrator.api")

_TIMEOUT_TEXT = b"request headers not complete in time (api.header_timeout)\n"
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT)
)


MAX_PENDING_HEADS = 512  # far above what a daemon's real clients keep half-sent; far below the usual fd limit
CHUNK_WRITER = "llama_orch.chunk_writer"


class ChunkWriter:
    """A body chunk of a response uvicorn sends chunked, written straight to the connection.

    What uvicorn's ``send`` does for ``{"type": "http.response.body", "more_body": True}``, without building and
    checking a message: 3.8 us a chunk through ``send``, 0.8 us here (measured), and a stream sends one per token.
    Only while ``ready()``: after ``http.response.start`` went through ``send`` and before the last body message,
    which goes through ``send`` too (it writes the terminating chunk and lets uvicorn finish the cycle).
    """

    __slots__ = ("_cycle", "on_lost")
    # What it reads of uvicorn's cycle. A uvicorn whose cycle lacks one gets no writer: the relay then uses `send`.
    _USES = ("response_started", "response_complete", "chunked_encoding", "scope", "disconnected", "transport", "flow")
    _fits: bool | None = None

    @classmethod
    def fits(cls, cycle: Any) -> bool:
        if cls._fits is None:  # once: every cycle of one uvicorn has the same attributes
            flow = getattr(cycle, "flow", None)
            cls._fits = all(hasattr(cycle, a) for a in cls._USES) and all(
                hasattr(flow, a) for a in ("write_paused", "drain")
            )
            if not cls._fits:
                log.info("uvicorn's response cycle is not the one ChunkWriter knows: streams go through send()")
        return cls._fits

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle  # uvicorn's RequestResponseCycle
        # Called when the client's connection is lost before the answer is complete: how the proxy learns of a
        # client gone without a task per request listening on ``receive()``.
        self.on_lost: Callable[[], None] | None = None

    def connection_lost(self) -> None:
        on_lost = self.on_lost
        if on_lost is not None and self._cycle.disconnected:
            self.on_lost = None
            on_lost()

    def ready(self) -> bool:
        cycle = self._cycle
        return (
            cycle.response_started
            and not cycle.response_complete
            and bool(cycle.chunked_encoding)
            and cycle.scope["method"] != "HEAD"
        )

    def write(self, chunk: bytes) -> Awaitable[None] | None:
        """Write ``chunk`` (not empty); returns what to await when the client reads slower than we write."""
        cycle = self._cycle
        if cycle.disconnected:
            return None  # as uvicorn's send: the app learns of a client gone through receive()
        cycle.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        return cycle.flow.drain() if cycle.flow.write_paused else None

    def push(self, chunk: bytes) -> bool:
        """Write ``chunk`` (not empty) from a callback (``adapters.http_relay``); True: stop reading, the client
        reads slower than we write (wait for ``drain()``) or is gone (``gone()``)."""
        cycle = self._cycle
        if cycle.disconnected:
            return True
        cycle.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        return cycle.flow.write_paused

    async def drain(self) -> None:
        """Until the client's connection takes writes again (or is lost: uvicorn then resumes its flow)."""
        await self._cycle.flow.drain()

    def gone(self) -> bool:
        return bool(self._cycle.disconnected)


def head_deadline_protocol(
    header_timeout: float,
    max_pending: int = MAX_PENDING_HEADS,
) -> type[asyncio.Protocol] | None:
    """A protocol class for ``uvicorn.Config(http=...)``; None where httptools (uvicorn[standard]) is missing,
    and uvicorn then runs its own without the deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        log.warning("httptools is not installed: request headers have no time limit")
        return None

    class HeadDeadlineProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _chunk_writer: ChunkWriter | None = None  # the latest request's
        # Connections waiting for their head, oldest first (a dict keeps insertion order); one event loop.
        pending: dict[HeadDeadlineProtocol, None] = {}

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()  # a connection that never sends a byte counts too

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)
            if self._chunk_writer is not None:
                self._chunk_writer.connection_lost()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:  # a further request; the first one's clock runs from the connection
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            super().on_headers_complete()
            cycle: Any = self.cycle  # this request's, made by the call above
            if cycle is not None and ChunkWriter.fits(cycle):
                extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
                extensions[CHUNK_WRITER] = self._chunk_writer = ChunkWriter(cycle)

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)
            self.pending[self] = None
            if len(self.pending) > max_pending:
                next(iter(self.pending))._head_timed_out()

        def _cancel_head_timer(self) -> None:
            self.pending.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._cancel_head_timer()
            if self.transport.is_closing():
                return
            # Only between requests may we write: an answer still being sent (pipelining) must not be cut into.
            cycle: Any = self.cycle  # None until a first request's head is complete
            if cycle is None or cycle.response_complete:
                self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    return HeadDeadlineProtocol
