"""Exit notices (``adapters.process.exit_watch``) and the selector they sit on (``adapters.io_loop``).

Real processes for the pidfd path (Linux); the thread path and the Windows one with the waiting call faked, so they
run everywhere. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from helpers import wait_until
from llama_orchestrator.adapters.io_loop import IoLoop
from llama_orchestrator.adapters.process import ProcessHandle, handle_of
from llama_orchestrator.adapters.process.exit_watch import PidfdExitWatch, ThreadExitWatch, pidfds_work
from llama_orchestrator.adapters.process.windows import WindowsProcesses

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
needs_pidfd = pytest.mark.skipif(not pidfds_work(), reason="no pidfd_open here (Linux 5.3+ only)")


@pytest.fixture
def loop() -> Iterator[IoLoop]:
    io = IoLoop()
    yield io
    io.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    popen = subprocess.Popen(SLEEPER)
    yield popen
    popen.kill()
    popen.wait()


def run_until(loop: IoLoop, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.05)


# -- the loop ------------------------------------------------------------------------------------------------


def test_timers_fire_in_order_and_a_cancelled_one_never(loop: IoLoop) -> None:
    fired: list[str] = []
    loop.call_later(0.02, lambda: fired.append("b"))
    loop.call_later(0.0, lambda: fired.append("a"))
    loop.call_later(0.01, lambda: fired.append("never")).cancel()
    run_until(loop, lambda: len(fired) == 2)
    assert fired == ["a", "b"]


def test_a_wake_from_another_thread_ends_the_wait(loop: IoLoop) -> None:
    threading.Timer(0.05, loop.wake).start()
    started = time.monotonic()
    loop.run_once(30)
    assert time.monotonic() - started < 10


def test_a_failing_callback_does_not_stop_the_others(loop: IoLoop) -> None:
    fired: list[str] = []

    def boom() -> None:
        raise RuntimeError("bug")

    loop.call_later(0.0, boom)
    loop.call_later(0.0, lambda: fired.append("ok"))
    run_until(loop, lambda: fired == ["ok"])


def test_a_watched_fd_closed_and_its_number_reused_is_watched_anew(loop: IoLoop) -> None:
    """A probe drops its socket with ``unwatch(closing=True)`` (no system call) and closes it; the next socket often
    gets the same number. Closed without any unwatch, too, the reused number must be watched as the new file."""
    fired: list[str] = []
    for how in ("closing", "no unwatch"):
        a, b = socket.socketpair()
        loop.watch(a.fileno(), selectors.EVENT_READ, lambda _mask: fired.append("old"))
        number = a.fileno()
        if how == "closing":
            loop.unwatch(number, closing=True)
        a.close()
        b.close()
        c, d = socket.socketpair()
        try:
            reused = c if c.fileno() == number else d if d.fileno() == number else None
            if reused is None:
                continue  # the number was not handed out again here: nothing to check this round
            other = d if reused is c else c
            loop.watch(reused.fileno(), selectors.EVENT_READ, lambda _mask, how=how: fired.append(how))
            other.send(b"x")
            run_until(loop, lambda how=how: how in fired)
            loop.unwatch(reused.fileno())
        finally:
            c.close()
            d.close()
    assert "old" not in fired and fired, fired


# -- pidfd (Linux) -------------------------------------------------------------------------------------------


@needs_pidfd
def test_pidfd_tells_the_exit_of_a_process_at_once(loop: IoLoop, sleeper: subprocess.Popen[bytes]) -> None:
    watch = PidfdExitWatch(loop)
    seen: list[str] = []
    watch.watch("m", handle_of(sleeper.pid), lambda: seen.append("m"))
    loop.run_once(0.05)
    assert seen == []
    sleeper.kill()
    run_until(loop, lambda: seen == ["m"])
    sleeper.wait()


@needs_pidfd
def test_pidfd_of_a_gone_or_reused_pid_tells_at_once(loop: IoLoop, sleeper: subprocess.Popen[bytes]) -> None:
    watch = PidfdExitWatch(loop)
    seen: list[str] = []
    # The PID runs, but with another create time: another process holds it, ours is gone.
    watch.watch("reused", ProcessHandle(sleeper.pid, 12345.0), lambda: seen.append("reused"))
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    watch.watch("gone", ProcessHandle(done.pid, 1.0), lambda: seen.append("gone"))
    run_until(loop, lambda: sorted(seen) == ["gone", "reused"])


@needs_pidfd
def test_pidfd_forgotten_or_replaced_says_nothing(loop: IoLoop, sleeper: subprocess.Popen[bytes]) -> None:
    watch = PidfdExitWatch(loop)
    seen: list[str] = []
    watch.watch("m", handle_of(sleeper.pid), lambda: seen.append("first"))
    watch.watch("m", handle_of(sleeper.pid), lambda: seen.append("second"))  # replaces the first
    other = subprocess.Popen(SLEEPER)
    try:
        watch.watch("o", handle_of(other.pid), lambda: seen.append("other"))
        watch.forget("o")
        other.kill()
        other.wait()
        sleeper.kill()
        run_until(loop, lambda: seen == ["second"])
        loop.run_once(0.05)
        assert seen == ["second"]
    finally:
        other.kill()
        watch.close()


# -- a waiting thread (macOS, old kernels) and Windows -------------------------------------------------------


class FakeWait:
    """``wait(handle)`` that blocks until the test ends the process."""

    def __init__(self) -> None:
        self.ended: dict[int, threading.Event] = {}
        self.waited: list[int] = []

    def __call__(self, handle: ProcessHandle) -> None:
        self.waited.append(handle.pid)
        self.ended.setdefault(handle.pid, threading.Event()).wait(10)

    def end(self, pid: int) -> None:
        self.ended.setdefault(pid, threading.Event()).set()


def test_a_waiting_thread_tells_the_exit_once() -> None:
    wait = FakeWait()
    watch = ThreadExitWatch(wait)
    seen: list[str] = []
    watch.watch("m", ProcessHandle(10, 1.0), lambda: seen.append("m"))
    wait_until(lambda: wait.waited == [10], 5)
    assert seen == []
    wait.end(10)
    wait_until(lambda: seen == ["m"], 5)


def test_a_waiting_thread_forgotten_or_replaced_says_nothing() -> None:
    wait = FakeWait()
    watch = ThreadExitWatch(wait)
    seen: list[str] = []
    watch.watch("m", ProcessHandle(10, 1.0), lambda: seen.append("old"))
    watch.watch("m", ProcessHandle(11, 1.0), lambda: seen.append("new"))
    watch.watch("x", ProcessHandle(12, 1.0), lambda: seen.append("x"))
    watch.forget("x")
    for pid in (10, 12):
        wait.end(pid)
    wait_until(lambda: sorted(wait.waited) == [10, 11, 12], 5)
    wait.end(11)
    wait_until(lambda: seen == ["new"], 5)


def test_a_wait_that_fails_still_tells_the_loop_to_look() -> None:
    def failing(handle: ProcessHandle) -> None:
        raise PermissionError("access denied")

    seen: list[str] = []
    ThreadExitWatch(failing).watch("m", ProcessHandle(10, 1.0), lambda: seen.append("m"))
    wait_until(lambda: seen == ["m"], 5)


class FakeWinApi:
    """Only the call the exit watch makes: ``wait_exit(pid)`` (WaitForSingleObject), recorded and scripted."""

    def __init__(self) -> None:
        self.wait = FakeWait()

    def wait_exit(self, pid: int) -> None:
        self.wait(ProcessHandle(pid, 0.0))


def test_windows_waits_for_our_process_with_the_api(loop: IoLoop, sleeper: subprocess.Popen[bytes]) -> None:
    api = FakeWinApi()
    watch = WindowsProcesses(api=api).exit_watch(loop)  # type: ignore[arg-type]
    seen: list[str] = []
    watch.watch("m", handle_of(sleeper.pid), lambda: seen.append("m"))
    wait_until(lambda: api.wait.waited == [sleeper.pid], 5)
    assert seen == []
    api.wait.end(sleeper.pid)  # WaitForSingleObject returned: the process ended
    wait_until(lambda: seen == ["m"], 5)


def test_windows_does_not_wait_on_a_pid_that_is_no_longer_ours(loop: IoLoop, sleeper: subprocess.Popen[bytes]) -> None:
    api = FakeWinApi()
    watch = WindowsProcesses(api=api).exit_watch(loop)  # type: ignore[arg-type]
    seen: list[str] = []
    watch.watch("m", ProcessHandle(sleeper.pid, 12345.0), lambda: seen.append("m"))  # reused PID
    wait_until(lambda: seen == ["m"], 5)
    assert api.wait.waited == []


@needs_pidfd
def test_is_alive_of_a_watched_process_asks_its_pidfd(
    loop: IoLoop, sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_orchestrator.adapters import process

    watch = PidfdExitWatch(loop)
    handle = handle_of(sleeper.pid)
    watch.watch("m", handle, lambda: None)

    def no_proc(pid: int) -> None:
        raise AssertionError("read /proc for a watched process")

    monkeypatch.setattr(process, "_stat_fields", no_proc)
    monkeypatch.setattr(process.psutil, "Process", no_proc)
    assert process.is_alive(handle)
    sleeper.kill()
    wait_until(lambda: not process.is_alive(handle), 5)  # before the loop has even seen the notice
    sleeper.wait()
    watch.forget("m")
    monkeypatch.undo()
    assert not process.is_alive(handle)


def test_the_polling_wait_looks_until_the_process_is_gone() -> None:
    from llama_orchestrator.adapters.process.exit_watch import polling_wait

    answers, slept = [True, True, False], []
    polling_wait(ProcessHandle(10, 1.0), every=0.5, alive=lambda _: answers.pop(0), sleep=slept.append)
    assert slept == [0.5, 0.5] and answers == []
