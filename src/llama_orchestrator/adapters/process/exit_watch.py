"""Being told at once that a process ended, instead of looking for it on a tick.

``ExitWatch.watch(key, handle, on_exit)`` calls ``on_exit()`` once, soon after the process ``handle`` ends (or at
once when it is already gone, or its PID now belongs to another process). A later ``watch`` of the same ``key``
replaces the earlier one; ``forget(key)`` drops it. ``on_exit`` may be called from another thread: it should only
post a message and wake the loop (what the supervisor does), never decide.

Two ways, chosen per OS by ``ProcessControl.exit_watch`` (``posix.py``, ``windows.py``):

* ``PidfdExitWatch`` (Linux 5.3+): ``os.pidfd_open`` gives a descriptor that becomes readable when the process
  ends, whoever its parent is; it sits on the daemon's selector (``adapters.io_loop``) with the probes, so no
  thread waits and nothing polls. While it is held, ``process.is_alive`` of that process is a poll of the pidfd
  rather than a read of /proc.
* ``ThreadExitWatch`` (Windows, macOS, a Linux without pidfds): one thread per process blocked in an injected
  ``wait(handle)``: ``WaitForSingleObject`` on Windows (``windows.py``), kqueue's ``NOTE_EXIT`` on macOS, a look
  every half second where neither exists.

It only hurries the supervisor: the exit itself is still established (and recorded) by ``InstanceService.refresh``,
so a missed or spurious notice costs a late or an extra look, never a wrong state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import threading
import time
from collections.abc import Callable
from typing import Protocol

from llama_orchestrator.adapters.io_loop import IoLoop
from llama_orchestrator.adapters.process import ProcessHandle, is_alive, register_pidfd_check

log = logging.getLogger("llama_orchestrator.exit_watch")

OnExit = Callable[[], None]
Wait = Callable[[ProcessHandle], None]  # returns when the process has ended (or cannot be waited for)


class ExitWatch(Protocol):
    def watch(self, key: str, handle: ProcessHandle, on_exit: OnExit) -> None: ...
    def forget(self, key: str) -> None: ...
    def close(self) -> None: ...


def pidfds_work() -> bool:
    """Whether this OS gives pidfds (Linux 5.3+; Python 3.9+ on Linux has ``os.pidfd_open``)."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return False
    try:
        os.close(opener(os.getpid()))
    except OSError:  # ENOSYS (old kernel), EPERM (a sandbox that forbids it)
        return False
    return True


class PidfdExitWatch:
    """Linux: a pidfd per watched process on the loop's selector. Everything runs on the loop's thread."""

    def __init__(self, loop: IoLoop, *, is_alive: Callable[[ProcessHandle], bool] = is_alive) -> None:
        self._loop = loop
        self._is_alive = is_alive
        self._fds: dict[str, int] = {}
        self._handles: dict[str, ProcessHandle] = {}

    def watch(self, key: str, handle: ProcessHandle, on_exit: OnExit) -> None:
        self.forget(key)
        try:
            fd = os.pidfd_open(handle.pid)
        except OSError:  # ESRCH: already gone
            self._loop.call_later(0.0, on_exit)
            return
        # Opened after the PID may have been reused: the pidfd is of whatever holds the PID now, so check that it
        # is still our process (create time) once the descriptor pins it.
        if not self._is_alive(handle):
            os.close(fd)
            self._loop.call_later(0.0, on_exit)
            return
        self._fds[key] = fd
        self._handles[key] = handle
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        register_pidfd_check(handle, lambda: bool(poller.poll(0)))

        def ready(_mask: int) -> None:
            if self._fds.get(key) == fd:
                self.forget(key)
                on_exit()

        self._loop.watch(fd, selectors.EVENT_READ, ready)

    def forget(self, key: str) -> None:
        fd = self._fds.pop(key, None)
        handle = self._handles.pop(key, None)
        if handle is not None:
            register_pidfd_check(handle, None)  # before the close: no poll of a closed (or reused) descriptor
        if fd is not None:
            self._loop.unwatch(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self.forget(key)


class ThreadExitWatch:
    """Elsewhere: a daemon thread per watched process, blocked in ``wait(handle)`` (no CPU while it waits)."""

    def __init__(self, wait: Wait, *, start_thread: Callable[[Callable[[], None], str], None] | None = None) -> None:
        self._wait = wait
        self._start_thread = start_thread or _daemon_thread
        self._lock = threading.Lock()
        self._current: dict[str, object] = {}  # key -> token of the watch that counts

    def watch(self, key: str, handle: ProcessHandle, on_exit: OnExit) -> None:
        token = object()
        with self._lock:
            self._current[key] = token

        def waiter() -> None:
            try:
                self._wait(handle)
            except Exception:  # cannot wait (access denied...): tell the loop to look for itself
                log.debug("waiting for pid %s failed", handle.pid, exc_info=True)
            with self._lock:
                if self._current.get(key) is not token:
                    return  # replaced or forgotten meanwhile
                del self._current[key]
            on_exit()

        self._start_thread(waiter, f"exit-{handle.pid}")

    def forget(self, key: str) -> None:
        # The thread stays blocked until its process ends; then it finds itself forgotten and says nothing.
        with self._lock:
            self._current.pop(key, None)

    def close(self) -> None:
        with self._lock:
            self._current.clear()


def _daemon_thread(target: Callable[[], None], name: str) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()


def kqueue_wait(handle: ProcessHandle) -> None:
    """macOS and the BSDs: block in kqueue until ``NOTE_EXIT`` of the process (no CPU while it runs)."""
    if not is_alive(handle):
        return
    kq = select.kqueue()  # type: ignore[attr-defined]  # kqueue: BSD/macOS only  # (absent on Linux and Windows)
    try:
        event = select.kevent(  # type: ignore[attr-defined]  # kqueue: BSD/macOS only
            handle.pid,
            filter=select.KQ_FILTER_PROC,  # type: ignore[attr-defined]  # kqueue: BSD/macOS only
            flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,  # type: ignore[attr-defined]  # kqueue: BSD/macOS only
            fflags=select.KQ_NOTE_EXIT,  # type: ignore[attr-defined]  # kqueue: BSD/macOS only
        )
        kq.control([event], 1, None)
    except ProcessLookupError:  # ended before it was registered
        return
    finally:
        kq.close()


def polling_wait(
    handle: ProcessHandle,
    *,
    every: float = 0.5,
    alive: Callable[[ProcessHandle], bool] = is_alive,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """The last resort (no pidfd, no kqueue): look every ``every`` seconds, as the old tick did."""
    while alive(handle):
        sleep(every)


def posix_wait() -> Wait:
    """The best blocking wait this POSIX system has, for ``ThreadExitWatch``."""
    return kqueue_wait if hasattr(select, "kqueue") else polling_wait
