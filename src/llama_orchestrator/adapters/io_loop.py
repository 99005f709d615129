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
import select
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


class _SelectorPoller:
    """Where there is no epoll: the selectors module."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        # The fds watched, kept here: `fd in selector.get_map()` goes through the selector's generic Mapping
        # lookup, which cost more than the rest of a health probe's Python.
        self._watched: set[int] = set()

    def watch(self, fd: int, events: int, callback: IoCallback | None) -> None:
        if fd in self._watched:
            try:
                self._selector.modify(fd, events, callback)
                return
            except OSError:  # that fd was closed without an unwatch and its number reused: register it anew
                self.unwatch(fd, closing=False)
        self._selector.register(fd, events, callback)
        self._watched.add(fd)

    def unwatch(self, fd: int, *, closing: bool) -> None:
        if fd in self._watched:
            self._watched.discard(fd)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(fd)

    def poll(self, timeout: float | None) -> list[tuple[IoCallback | None, int]]:
        return [(key.data, mask) for key, mask in self._selector.select(timeout)]

    def close(self) -> None:
        self._selector.close()


class _EpollPoller:
    """Linux: epoll itself, without the selectors module's bookkeeping (a probe registers and drops a socket every
    time), and an fd about to be closed is dropped without a system call (closing it takes it out of the epoll)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, IoCallback | None] = {}

    def watch(self, fd: int, events: int, callback: IoCallback | None) -> None:
        mask = (select.EPOLLIN if events & selectors.EVENT_READ else 0) | (
            select.EPOLLOUT if events & selectors.EVENT_WRITE else 0
        )
        if fd in self._callbacks:
            try:
                self._epoll.modify(fd, mask)
            except FileNotFoundError:  # that fd was closed without an unwatch and its number reused
                self._epoll.register(fd, mask)
        else:
            self._epoll.register(fd, mask)
        self._callbacks[fd] = callback

    def unwatch(self, fd: int, *, closing: bool) -> None:
        if fd in self._callbacks:
            del self._callbacks[fd]
            if not closing:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    def poll(self, timeout: float | None) -> list[tuple[IoCallback | None, int]]:
        ready = []
        for fd, events in self._epoll.poll(-1 if timeout is None else timeout):
            if fd not in self._callbacks:
                continue
            # As the selectors module reads them: an error or hang-up wakes both a reader and a writer.
            mask = (selectors.EVENT_WRITE if events & ~select.EPOLLIN else 0) | (
                selectors.EVENT_READ if events & ~select.EPOLLOUT else 0
            )
            ready.append((self._callbacks[fd], mask))
        return ready

    def close(self) -> None:
        self._epoll.close()


class IoLoop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._poller = _EpollPoller() if hasattr(select, "epoll") else _SelectorPoller()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._poller.watch(self._wake_r.fileno(), selectors.EVENT_READ, None)
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._at_close: list[Callback] = []

    # -- any thread ------------------------------------------------------------------------------------------

    def wake(self) -> None:
        """End the current (or next) ``run_once`` wait. Safe from any thread and from a signal handler."""
        with contextlib.suppress(BlockingIOError, OSError):  # full (a wake is already pending) or closed
            self._wake_w.send(b"\0")

    # -- the loop's thread -----------------------------------------------------------------------------------

    def watch(self, fd: int, events: int, callback: IoCallback) -> None:
        """Call ``callback(mask)`` whenever ``fd`` is ready for ``events``; replaces an earlier watch of it."""
        self._poller.watch(fd, events, callback)

    def unwatch(self, fd: int, *, closing: bool = False) -> None:
        """No more callbacks for ``fd``. ``closing``: the caller closes it next (which takes it out of an epoll)."""
        self._poller.unwatch(fd, closing=closing)

    def call_at(self, when: float, callback: Callback) -> Timer:
        """Call ``callback`` once at ``when`` (this loop's clock, monotonic by default)."""
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.clock() + delay, callback)

    def at_close(self, callback: Callback) -> None:
        """Call ``callback`` first thing in ``close``: whoever keeps fds watched here (a kept probe connection) lets
        go of them while the loop still stands, so none is left open with nothing to watch it."""
        self._at_close.append(callback)

    def run_once(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: until something happens), then run what is ready."""
        self._drop_cancelled()
        if self._timers:
            until_timer = max(0.0, self._timers[0][0] - self.clock())
            timeout = until_timer if timeout is None else min(timeout, until_timer)
        for callback, mask in self._poller.poll(None if timeout is None else max(0.0, timeout)):
            if callback is None:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._wake_r.recv(4096):
                        pass
                continue
            _run(callback, mask)
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                _run(timer.callback)

    def close(self) -> None:
        callbacks, self._at_close = self._at_close, []
        for callback in callbacks:
            _run(callback)
        self._poller.close()
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
