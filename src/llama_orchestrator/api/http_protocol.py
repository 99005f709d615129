"""uvicorn's HTTP protocol with a deadline on the request head (slowloris).

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has no limit on how long a client may
take to send a request's headers: 200 sockets sending a byte a second were held open for ever. Here a timer runs
from the moment a connection opens, and again from the first byte of each further request, until the headers
are complete; when it fires first, the client gets a 408 and the connection is closed. A request whose head is
complete is the app's business (a long upload or a long answer is not slow on purpose).

At most ``max_pending`` connections may wait for their head at once: past that the one waiting longest is cut, so
a flood of slow sockets costs a bounded number of file descriptors while fresh (fast) clients still get in.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("llama_orchestrator.api")

_TIMEOUT_TEXT = b"request headers not complete in time (api.header_timeout)\n"
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT)
)


MAX_PENDING_HEADS = 512  # far above what a daemon's real clients keep half-sent; far below the usual fd limit


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
        # Connections waiting for their head, oldest first (a dict keeps insertion order); one event loop.
        pending: dict[HeadDeadlineProtocol, None] = {}

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()  # a connection that never sends a byte counts too

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_timer is None:  # a further request; the first one's clock runs from the connection
                self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            super().on_headers_complete()

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
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    return HeadDeadlineProtocol
