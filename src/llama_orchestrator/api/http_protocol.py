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

The ``/v1`` lane (issue 14): an app that offers one (``v1_lane``, see ``api.proxy.V1Lane``) has its plain
OpenAI requests (POST, HTTP/1.1, a sized body, nothing the guard would look at twice) answered by the lane
directly: the connection's ``LaneCycle`` stands in for uvicorn's request cycle, so there is no ASGI message
checking, no ``receive`` and no middleware between the parsed head and the router. Everything else, and every
request the lane does not take, goes through uvicorn and the app as before.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

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


class Lane(Protocol):
    """What ``HeadDeadlineProtocol`` asks of an app's ``v1_lane`` (``api.proxy.V1Lane``)."""

    def takes(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> bool: ...

    async def serve(self, scope: dict, receive: Callable, send: Callable) -> None: ...


_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
_LAST_CHUNK = b"0\r\n\r\n"


class LaneCycle:
    """One request the lane answers, in the place of uvicorn's ``RequestResponseCycle`` on its connection.

    To uvicorn's protocol it is its current cycle: the parser's callbacks add to ``body`` and set ``more_body``,
    ``message_event.set()`` (this object) says that something happened (more body, its end, the client gone),
    ``response_complete`` says when the next pipelined request may start, ``keep_alive`` is cleared by a graceful
    shutdown. To the lane it offers an ASGI ``send`` without the message checks (a sized answer's head and body
    leave in one write) and the ``ChunkWriter`` interface for a stream's chunks (``push``, ``drain``, ``gone``,
    ``on_lost``).
    """

    __slots__ = (
        "_head",
        "_protocol",
        "body",
        "chunked",
        "disconnected",
        "flow",
        "keep_alive",
        "more_body",
        "on_lost",
        "response_complete",
        "response_started",
        "scope",
        "sized",
        "status",
        "task",
        "transport",
    )

    def __init__(self, protocol: Any, scope: dict, keep_alive: bool) -> None:
        self._protocol = protocol  # uvicorn's HttpToolsProtocol (ours, HeadDeadlineProtocol)
        self.scope = scope
        self.transport: asyncio.Transport = protocol.transport
        self.flow = protocol.flow
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.more_body = True
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.sized = False  # the answer's head has a content-length
        self.status = 0
        self._head: bytes | None = None  # a sized answer's head, written with its body
        self.task: asyncio.Task | None = None
        self.on_lost: Callable[[], None] | None = None

    # What it and ``_lane_takes`` read of uvicorn's protocol, besides its transport and FlowControl. A uvicorn whose
    # protocol lacks one gets no lane: every request then goes through ASGI.
    _USES = (
        "access_log",
        "access_logger",
        "expect_100_continue",
        "on_response_complete",
        "parser",
        "server_state",
        "tasks",
    )
    _fits: bool | None = None

    @classmethod
    def fits(cls, protocol: Any) -> bool:
        if cls._fits is None:  # once: every protocol of one uvicorn has the same attributes
            from uvicorn.protocols.http.flow_control import FlowControl

            cls._fits = (
                all(hasattr(protocol, a) for a in cls._USES)
                and hasattr(protocol.server_state, "default_headers")
                and all(hasattr(FlowControl, a) for a in ("drain", "resume_reading"))
            )
            if not cls._fits:
                log.info("uvicorn's protocol is not the one the /v1 lane knows: every request goes through ASGI")
        return cls._fits

    @property
    def message_event(self) -> LaneCycle:
        return self  # uvicorn calls ``message_event.set()``: see ``set``

    def set(self) -> None:
        """The parser added body, the body is complete, or the connection is gone (``disconnected``)."""
        if self.disconnected:
            on_lost = self.on_lost
            if on_lost is not None:
                self.on_lost = None
                on_lost()
            elif self.task is not None and not self.response_complete:
                self.task.cancel()  # nobody listens for it (the proxy's watch does, once armed): stop the work
            return
        if self.more_body:
            if self.flow.read_paused:
                self.flow.resume_reading()  # uvicorn pauses past 64 KiB of body; the lane takes it whole
            return
        if self.task is None:
            protocol = self._protocol
            self.task = task = protocol.loop.create_task(self._run(protocol.v1_lane))
            protocol.tasks.add(task)  # a graceful shutdown waits for it, as for uvicorn's own
            task.add_done_callback(protocol.tasks.discard)

    async def _run(self, lane: Lane) -> None:
        try:
            await lane.serve(self.scope, self._receive, self.send)
        except asyncio.CancelledError:
            if not self.disconnected:
                raise
        except Exception:  # a bug of ours: as uvicorn does, a 500 if nothing was sent, else the connection is cut
            log.exception("the /v1 lane failed")
            if not self.response_started and not self.disconnected:
                message = b"Internal Server Error"
                self.keep_alive = False
                await self.send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                    }
                )
                await self.send({"type": "http.response.body", "body": message})
            else:
                self.transport.close()
        finally:
            if not self.response_complete:
                self.response_complete = True
                self.transport.close()
                self._protocol.on_response_complete()

    async def _receive(self) -> dict:
        if self.body is not None:
            body, self.body = bytes(self.body), None  # type: ignore[assignment]
            return {"type": "http.request", "body": body, "more_body": False}
        # Nothing calls it twice: the proxy learns of a client gone through ``on_lost``.
        raise RuntimeError("the /v1 lane's body was read already")

    # -- the answer ------------------------------------------------------------------------------------------

    async def send(self, message: dict) -> None:
        if self.disconnected:
            return
        if message["type"] == "http.response.start":
            self._start(message["status"], message.get("headers", ()))
            return
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        head, self._head = self._head, None
        if head is None:
            out = b"%x\r\n%s\r\n" % (len(body), body) if self.chunked and body else body
        elif self.sized:
            out = head + b"\r\n" + body
        elif not more:  # the whole answer in one message: sized here, one write for head and body
            out = head + b"content-length: %d\r\n\r\n" % len(body) + body
        else:
            self.chunked = True
            out = head + b"transfer-encoding: chunked\r\n\r\n" + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"")
        if not more and self.chunked:
            out += _LAST_CHUNK
        if out:
            self.transport.write(out)
        if not more:
            self._complete()
        elif self.flow.write_paused:
            await self.flow.drain()

    def _start(self, status: int, headers: Any) -> None:
        self.response_started = True
        self.status = status
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
        for name, value in self._protocol.server_state.default_headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        for name, value in headers:
            if name == b"content-length":
                self.sized = True
            parts.append(b"%s: %s\r\n" % (name, value))
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        self._head = b"".join(parts)  # written with the first body (or chunk): one write, not two

    def _complete(self) -> None:
        self.response_complete = True
        protocol = self._protocol
        if protocol.access_log:
            scope = self.scope
            client = protocol.client
            protocol.access_logger.info(
                '%s - "%s %s HTTP/1.1" %d',
                f"{client[0]}:{client[1]}" if client else "-",
                scope["method"],
                scope["raw_path"].decode("latin-1")
                + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else ""),
                self.status,
            )
        if not self.keep_alive:
            self.transport.close()
        protocol.on_response_complete()

    # -- ChunkWriter's interface (api.proxy, services.upstream) ---------------------------------------------

    def ready(self) -> bool:
        return self.response_started and not self.response_complete and not self.sized

    def push(self, chunk: bytes) -> bool:
        if self.disconnected:
            return True
        framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        head, self._head = self._head, None
        if head is not None:
            self.chunked = True
            framed = head + b"transfer-encoding: chunked\r\n\r\n" + framed
        self.transport.write(framed)
        return self.flow.write_paused

    def write(self, chunk: bytes) -> Awaitable[None] | None:
        if self.push(chunk) and not self.disconnected:
            return self.flow.drain()
        return None

    async def drain(self) -> None:
        await self.flow.drain()

    def gone(self) -> bool:
        return self.disconnected


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

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            # The app as given (uvicorn wraps it in middleware): its lane, when it has one and this uvicorn's
            # protocol is the one LaneCycle knows.
            lane = getattr(config.app, "v1_lane", None)
            self.v1_lane: Lane | None = lane if lane is not None and LaneCycle.fits(self) else None

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            if self.v1_lane is not None and self._lane_takes():
                return
            super().on_headers_complete()
            cycle: Any = self.cycle  # this request's, made by the call above
            if cycle is not None and ChunkWriter.fits(cycle):
                extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
                extensions[CHUNK_WRITER] = self._chunk_writer = ChunkWriter(cycle)

        def _lane_takes(self) -> bool:
            """Start a ``LaneCycle`` for this request if the lane takes it: POST over HTTP/1.1, no request
            pending before it on this connection (pipelining stays uvicorn's), and what the lane itself asks."""
            parser, lane = self.parser, self.v1_lane
            previous: Any = self.cycle  # None before the connection's first request
            if parser.get_method() != b"POST" or parser.get_http_version() != "1.1" or parser.should_upgrade():
                return False
            if (previous is not None and not previous.response_complete) or lane is None:
                return False
            url = self.url
            if not lane.takes(url, self.headers):
                return False
            path, _, query = url.partition(b"?")
            scope: Any = self.scope
            scope["method"] = "POST"
            scope["path"] = path.decode("ascii")  # the lane takes no %-escape: as it came
            scope["raw_path"] = path
            scope["query_string"] = query
            cycle = LaneCycle(self, scope, keep_alive=parser.should_keep_alive())
            scope["extensions"] = {CHUNK_WRITER: cycle}
            self.cycle = cycle  # type: ignore[assignment]  # it has what uvicorn's protocol reads of a cycle
            if self.expect_100_continue:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the lane reads every body whole
            return True

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
