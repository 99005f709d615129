"""One selector for the daemon's waiting: process exits (pidfds), health probes (their sockets), timers, and a
wake-up any thread may ring.

The daemon's loop sleeps in ``run_once(timeout)`` until one of these is ready or the timeout ends, so an idle
daemon makes no system call between the moments something is due. Callbacks run on the thread that calls
``run_once``; every method but ``wake`` belongs to that thread.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import time
from collections.abc import Callable

log = logging.getLogger("llama_orchestrator.io_loop")

Callback = Callable[[], None]
IoCallback = Callable[[int], None]  # gets the ready mask (selectors.EVENT_READ | EVENT_WRITE)


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class IoLoop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()

    # -- any thread ------------------------------------------------------------------------------------------

    def wake(self) -> None:
        """End the current (or next) ``run_once`` wait. Safe from any thread and from a signal handler."""
        with contextlib.suppress(BlockingIOError, OSError):  # full (a wake is already pending) or closed
            self._wake_w.send(b"\0")

    # -- the loop's thread -----------------------------------------------------------------------------------

    def watch(self, fd: int, events: int, callback: IoCallback) -> None:
        """Call ``callback(mask)`` whenever ``fd`` is ready for ``events``; replaces an earlier watch of it."""
        if fd in self._selector.get_map():
            self._selector.modify(fd, events, callback)
        else:
            self._selector.register(fd, events, callback)

    def unwatch(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(fd)

    def call_at(self, when: float, callback: Callback) -> Timer:
        """Call ``callback`` once at ``when`` (this loop's clock, monotonic by default)."""
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.clock() + delay, callback)

    def run_once(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: until something happens), then run what is ready."""
        self._drop_cancelled()
        if self._timers:
            until_timer = max(0.0, self._timers[0][0] - self.clock())
            timeout = until_timer if timeout is None else min(timeout, until_timer)
        for key, mask in self._selector.select(None if timeout is None else max(0.0, timeout)):
            if key.data is None:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._wake_r.recv(4096):
                        pass
                continue
            _run(key.data, mask)
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                _run(timer.callback)

    def close(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drop_cancelled(self) -> None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)


def _run(callback: Callable[..., None], *args: int) -> None:
    try:
        callback(*args)
    except Exception:  # one callback's bug must not stop the others' events
        log.exception("io loop callback failed")
