"""WindowsProcesses, on any OS: every Windows call goes through a fake ``WinApi``; processes are real where it helps.

The fake's ``popen`` starts a real child (dropping ``creationflags``, which POSIX Popen refuses), so handles, psutil
trees, terminate and kill are exercised for real. ``RealWinApi`` is tested against patched ``subprocess``/``os``/a
fake ``msvcrt`` module, since the real ones are Windows-only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import helpers
from llama_orchestrator.adapters import process as process_pkg
from llama_orchestrator.adapters.process import ProcessHandle, handle_of, is_alive, windows
from llama_orchestrator.adapters.process.windows import (
    CREATE_BREAKAWAY_FROM_JOB,
    CREATE_NEW_PROCESS_GROUP,
    CREATE_NO_WINDOW,
    RealWinApi,
    WindowsProcesses,
)

SLEEPER = "import time; time.sleep(60)"
# A parent that starts one grandchild, so trees have two levels.
PARENT = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); time.sleep(60)"
ALL_FLAGS = 0x00000200 | 0x08000000 | 0x01000000


# The suite's one condition wait (tests/helpers.py), with this file's longer default deadline.
wait_until = functools.partial(helpers.wait_until, timeout=20.0)


class Procs:
    """Real child processes started by a test; all of them (grandchildren too) are killed at teardown."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.others: list[psutil.Process] = []

    def adopt(self, popen: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.popens.append(popen)
        return popen

    def start(self, code: str = SLEEPER) -> tuple[subprocess.Popen[bytes], ProcessHandle]:
        popen = self.adopt(
            subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a stray signal to our group must not reach the test runner, or vice versa
            )
        )
        return popen, handle_of(popen.pid)

    def start_tree(self) -> tuple[subprocess.Popen[bytes], ProcessHandle, ProcessHandle]:
        """A parent and its grandchild-to-be; returns once the grandchild exists."""
        popen, handle = self.start(PARENT)
        parent = psutil.Process(popen.pid)
        wait_until(lambda: len(parent.children()) == 1)
        child = parent.children()[0]
        self.others.append(child)  # after the parent dies it can't be found through it
        return popen, handle, handle_of(child.pid)

    def cleanup(self) -> None:
        tracked = list(self.others)
        for popen in self.popens:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(popen.pid)
                tracked.extend(proc.children(recursive=True))
        for proc in tracked:
            # send_signal checks the create time (no reused PID is hit) and isn't patched by any test, unlike kill().
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        for popen in self.popens:
            with contextlib.suppress(OSError):
                popen.kill()
            popen.wait(timeout=20)


@pytest.fixture
def procs() -> Iterator[Procs]:
    registry = Procs()
    yield registry
    registry.cleanup()


class FakeApi:
    """Records every Windows call. ``popen`` starts a real process (POSIX Popen rejects creationflags, so they're
    only recorded); the ``*_errors`` lists make the next calls fail."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.calls: list[tuple[Any, ...]] = []
        self.popen_kwargs: list[dict[str, Any]] = []
        self.popen_errors: list[OSError] = []
        self.ctrl_break_error: OSError | None = None
        self.lock_errors: list[OSError] = []
        self.unlock_error: OSError | None = None
        self.on_taskkill: Callable[[int], None] | None = None
        self.create_times: dict[int, float] = {}

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        self.calls.append(("popen", argv, kwargs.get("creationflags")))
        self.popen_kwargs.append(dict(kwargs))
        if self.popen_errors:
            raise self.popen_errors.pop(0)
        real = dict(kwargs)
        real.pop("creationflags")
        popen = self.procs.adopt(subprocess.Popen(argv, start_new_session=True, **real))
        self.create_times[popen.pid] = psutil.Process(popen.pid).create_time()
        return popen

    def send_ctrl_break(self, pid: int) -> None:
        self.calls.append(("ctrl_break", pid))
        if self.ctrl_break_error is not None:
            raise self.ctrl_break_error

    def lock_byte(self, fd: int) -> None:
        self.calls.append(("lock", fd))
        if self.lock_errors:
            raise self.lock_errors.pop(0)

    def unlock_byte(self, fd: int) -> None:
        self.calls.append(("unlock", fd))
        if self.unlock_error is not None:
            raise self.unlock_error

    def taskkill(self, pid: int) -> None:
        self.calls.append(("taskkill", pid))
        if self.on_taskkill is not None:
            self.on_taskkill(pid)

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


@pytest.fixture
def api(procs: Procs) -> FakeApi:
    return FakeApi(procs)


@pytest.fixture
def wp(api: FakeApi) -> WindowsProcesses:
    return WindowsProcesses(api=api, kill_wait=5.0)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- the module itself -------------------------------------------------------------------------------------------


def test_creation_flag_values_are_the_win32_ones() -> None:
    assert CREATE_NEW_PROCESS_GROUP == 0x00000200
    assert CREATE_NO_WINDOW == 0x08000000
    assert CREATE_BREAKAWAY_FROM_JOB == 0x01000000
    assert windows.CTRL_BREAK_EVENT == 1


@pytest.mark.skipif(sys.platform != "win32", reason="subprocess/signal define these only on Windows")
def test_creation_flags_match_subprocess_on_windows() -> None:
    assert CREATE_NEW_PROCESS_GROUP == subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    assert CREATE_NO_WINDOW == subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
    assert CREATE_BREAKAWAY_FROM_JOB == subprocess.CREATE_BREAKAWAY_FROM_JOB  # type: ignore[attr-defined]
    assert windows.CTRL_BREAK_EVENT == signal.CTRL_BREAK_EVENT  # type: ignore[attr-defined]


def test_module_imports_without_windows_modules(tmp_path: Path) -> None:
    # A fresh interpreter: nothing Windows-only may be imported at import time or by the constructor.
    src = Path(windows.__file__).resolve().parents[3]
    code = (
        "import sys\n"
        "from llama_orchestrator.adapters.process.windows import WindowsProcesses\n"
        "WindowsProcesses()\n"
        "assert 'msvcrt' not in sys.modules and '_winapi' not in sys.modules, sorted(sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(src))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()


def test_current_returns_windows_processes_on_win32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    assert isinstance(process_pkg.current(), WindowsProcesses)


# --- spawn -------------------------------------------------------------------------------------------------------


def test_spawn_passes_exact_popen_arguments(wp: WindowsProcesses, api: FakeApi, tmp_path: Path) -> None:
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    out.write_bytes(b"old out\n")
    err.write_bytes(b"old err\n")
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import os, sys; "
        "sys.stdout.write(os.environ['MARKER'] + ' ' + os.getcwd() + '\\n'); sys.stderr.write('to stderr\\n')"
    )
    argv = (sys.executable, "-c", code)  # a tuple: spawn must hand Popen a list
    env = dict(os.environ, MARKER="marker-value")

    spawned = wp.spawn(argv, env, work, out, err)

    assert len(api.named("popen")) == 1
    kwargs = api.popen_kwargs[0]
    _, passed_argv, _ = api.calls[0]
    assert type(passed_argv) is list and passed_argv == list(argv)
    assert kwargs["creationflags"] == ALL_FLAGS
    assert kwargs["creationflags"] == CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW | CREATE_BREAKAWAY_FROM_JOB
    assert kwargs["stdin"] is subprocess.DEVNULL
    assert kwargs["close_fds"] is True
    assert kwargs["cwd"] == work
    assert kwargs["env"] == env and type(kwargs["env"]) is dict
    assert "shell" not in kwargs
    assert "start_new_session" not in kwargs  # a POSIX notion; Windows uses the creation flags
    for stream, _path in ((kwargs["stdout"], out), (kwargs["stderr"], err)):
        # Which file: the contents below say (the opener of 0600 logs may leave ``name`` an fd number).
        assert stream.mode == "ab"
        assert stream.closed  # our copies are closed once the child has its own (rotation must not see us hold it)

    popen = spawned.popen
    assert isinstance(popen, subprocess.Popen)
    assert spawned.handle == ProcessHandle(popen.pid, api.create_times[popen.pid])
    assert popen.wait(timeout=20) == 0
    # Appended, not truncated.
    assert out.read_bytes() == b"old out\n" + f"marker-value {work}\n".encode()
    assert err.read_bytes() == b"old err\nto stderr\n"


def test_spawn_of_a_process_already_gone_records_pid_only(
    wp: WindowsProcesses, api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def vanished(pid: int) -> ProcessHandle:
        raise psutil.NoSuchProcess(pid)

    monkeypatch.setattr(windows, "handle_of", vanished)
    spawned = wp.spawn([sys.executable, "-c", "pass"], dict(os.environ), tmp_path, tmp_path / "o", tmp_path / "e")
    assert spawned.handle == ProcessHandle(spawned.popen.pid, 0.0)  # type: ignore[union-attr]


def test_spawn_retries_without_breakaway_when_the_job_forbids_it(
    wp: WindowsProcesses, api: FakeApi, tmp_path: Path
) -> None:
    api.popen_errors = [PermissionError(errno.EACCES, "Access is denied")]
    argv = [sys.executable, "-c", "pass"]
    spawned = wp.spawn(argv, dict(os.environ), tmp_path, tmp_path / "o", tmp_path / "e")
    assert [call[2] for call in api.named("popen")] == [ALL_FLAGS, ALL_FLAGS & ~CREATE_BREAKAWAY_FROM_JOB]
    assert spawned.popen.wait(timeout=20) == 0  # type: ignore[union-attr]

    # Remembered: the next spawn doesn't ask again.
    assert wp.creationflags() == CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
    again = wp.spawn(argv, dict(os.environ), tmp_path, tmp_path / "o", tmp_path / "e")
    again.popen.wait(timeout=20)  # type: ignore[union-attr]
    assert [call[2] for call in api.named("popen")][-1] == CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
    assert len(api.named("popen")) == 3


def test_spawn_raises_when_the_program_itself_is_denied(wp: WindowsProcesses, api: FakeApi, tmp_path: Path) -> None:
    api.popen_errors = [PermissionError(errno.EACCES, "denied"), PermissionError(errno.EACCES, "still denied")]
    with pytest.raises(PermissionError, match="still denied"):
        wp.spawn(["llama-server.exe"], {}, tmp_path, tmp_path / "o", tmp_path / "e")
    assert len(api.named("popen")) == 2
    # Not the job's fault after all: breakaway stays on for later spawns.
    assert wp.creationflags() == ALL_FLAGS


def test_spawn_raises_missing_binary_without_retry(wp: WindowsProcesses, api: FakeApi, tmp_path: Path) -> None:
    api.popen_errors = [FileNotFoundError(errno.ENOENT, "no such file")]
    with pytest.raises(FileNotFoundError):
        wp.spawn(["missing.exe"], {}, tmp_path, tmp_path / "o", tmp_path / "e")
    assert len(api.named("popen")) == 1


# --- request_stop ------------------------------------------------------------------------------------------------


def test_request_stop_sends_ctrl_break_to_the_group(wp: WindowsProcesses, api: FakeApi, procs: Procs) -> None:
    popen, handle = procs.start()
    wp.request_stop(handle)
    assert api.calls == [("ctrl_break", popen.pid)]
    assert is_alive(handle)  # delivered (as far as we know): no TerminateProcess on top


def test_request_stop_on_a_dead_process_sends_nothing(wp: WindowsProcesses, api: FakeApi, procs: Procs) -> None:
    popen, handle = procs.start()
    popen.kill()
    popen.wait(timeout=20)
    wp.request_stop(handle)
    assert api.calls == []


def test_request_stop_on_a_reused_pid_sends_nothing(wp: WindowsProcesses, api: FakeApi, procs: Procs) -> None:
    popen, handle = procs.start()
    stranger = ProcessHandle(handle.pid, handle.create_time - 100.0)  # same PID, another process's create time
    wp.request_stop(stranger)
    api.ctrl_break_error = OSError(errno.EINVAL, "unused")  # even the fallback must not fire
    wp.request_stop(stranger)
    assert api.calls == []
    assert is_alive(handle) and popen.poll() is None


def test_request_stop_falls_back_to_terminate_the_tree(wp: WindowsProcesses, api: FakeApi, procs: Procs) -> None:
    popen, handle, grandchild = procs.start_tree()
    api.ctrl_break_error = OSError(errno.EINVAL, "The parameter is incorrect")  # no shared console
    wp.request_stop(handle)
    assert api.calls == [("ctrl_break", popen.pid)]
    # terminate() is SIGTERM here, TerminateProcess on Windows; the grandchild goes too.
    assert popen.wait(timeout=20) == -signal.SIGTERM
    wait_until(lambda: not is_alive(grandchild))


def test_request_stop_fallback_tolerates_a_process_that_just_exited(
    wp: WindowsProcesses, api: FakeApi, procs: Procs
) -> None:
    popen, handle = procs.start()

    def exits_meanwhile(pid: int) -> None:
        api.calls.append(("ctrl_break", pid))
        popen.kill()
        popen.wait(timeout=20)
        raise OSError(errno.EINVAL, "gone")

    api.send_ctrl_break = exits_meanwhile  # type: ignore[method-assign]
    wp.request_stop(handle)  # no error
    assert api.calls == [("ctrl_break", popen.pid)]


# --- kill_tree ---------------------------------------------------------------------------------------------------


def test_kill_tree_kills_parent_and_descendants(wp: WindowsProcesses, api: FakeApi, procs: Procs) -> None:
    _popen, handle, grandchild = procs.start_tree()
    wp.kill_tree(handle)
    # wait_procs already reaped our child, so Popen learns no exit code: check the process is gone instead.
    wait_until(lambda: not is_alive(handle))
    wait_until(lambda: not is_alive(grandchild))
    assert api.named("taskkill") == []


def test_kill_tree_on_dead_or_reused_handles_does_nothing(wp: WindowsProcesses, api: FakeApi, procs: Procs) -> None:
    popen, handle = procs.start()
    wp.kill_tree(ProcessHandle(handle.pid, handle.create_time - 100.0))
    assert is_alive(handle)
    popen.kill()
    popen.wait(timeout=20)
    wp.kill_tree(handle)
    assert api.calls == []


def test_kill_tree_falls_back_to_taskkill_when_psutil_cannot_kill(
    api: FakeApi, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    _popen, handle, grandchild = procs.start_tree()

    def denied(self: psutil.Process) -> None:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "kill", denied)
    # Our stand-in for taskkill really kills, so the final wait sees them go.
    api.on_taskkill = lambda pid: os.kill(pid, signal.SIGKILL)
    WindowsProcesses(api=api, kill_wait=0.3).kill_tree(handle)

    assert sorted(call[1] for call in api.named("taskkill")) == sorted([handle.pid, grandchild.pid])
    # wait_procs already reaped our child, so Popen learns no exit code: check the process is gone instead.
    wait_until(lambda: not is_alive(handle))
    wait_until(lambda: not is_alive(grandchild))


# --- exclusive_lock ----------------------------------------------------------------------------------------------


def test_lock_acquires_and_releases_byte_zero(wp: WindowsProcesses, api: FakeApi, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "instance.lock"
    with wp.exclusive_lock(path):
        ((_, fd),) = api.calls
        assert api.calls == [("lock", fd)]
        assert fd_is_open(fd)
        assert path.exists()
    assert api.calls == [("lock", fd), ("unlock", fd)]
    assert not fd_is_open(fd)


def test_lock_retries_while_another_process_holds_it(wp: WindowsProcesses, api: FakeApi, tmp_path: Path) -> None:
    # LK_LOCK gives up after ~10 s with EDEADLOCK (EACCES on some CRTs); the lock must keep waiting.
    api.lock_errors = [
        OSError(errno.EDEADLOCK, "Resource deadlock avoided"),
        OSError(errno.EACCES, "Permission denied"),
    ]
    entered = False
    with wp.exclusive_lock(tmp_path / "x.lock"):
        entered = True
    assert entered
    assert [call[0] for call in api.calls] == ["lock", "lock", "lock", "unlock"]
    assert len({call[1] for call in api.calls}) == 1  # the same descriptor throughout


def test_lock_raises_real_errors_and_closes_the_file(wp: WindowsProcesses, api: FakeApi, tmp_path: Path) -> None:
    api.lock_errors = [OSError(errno.EBADF, "Bad file descriptor")]
    with pytest.raises(OSError) as info, wp.exclusive_lock(tmp_path / "x.lock"):
        pytest.fail("the block must not run without the lock")
    assert info.value.errno == errno.EBADF
    ((_, fd),) = api.calls  # no unlock of a lock never taken
    assert not fd_is_open(fd)


def test_lock_is_released_when_the_block_raises(wp: WindowsProcesses, api: FakeApi, tmp_path: Path) -> None:
    api.unlock_error = OSError(errno.EACCES, "unlock failed")  # must not hide the block's own error
    with pytest.raises(RuntimeError, match="boom"), wp.exclusive_lock(tmp_path / "x.lock"):
        raise RuntimeError("boom")
    assert [call[0] for call in api.calls] == ["lock", "unlock"]
    assert not fd_is_open(api.calls[0][1])


# --- RealWinApi, against patched OS modules ----------------------------------------------------------------------


@pytest.fixture
def fake_msvcrt(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int]]:
    """A stand-in ``msvcrt`` module; records (fd, file position, mode, nbytes) for each locking() call."""
    calls: list[tuple[int, int, int, int]] = []

    def locking(fd: int, mode: int, nbytes: int) -> None:
        calls.append((fd, os.lseek(fd, 0, os.SEEK_CUR), mode, nbytes))

    # Sentinel values, so the test proves the constants are read from the module.
    module = types.SimpleNamespace(LK_LOCK=101, LK_UNLCK=100, locking=locking)
    monkeypatch.setitem(sys.modules, "msvcrt", module)
    return calls


def test_real_api_locks_byte_zero_whatever_the_position(fake_msvcrt: list[Any], tmp_path: Path) -> None:
    fd = os.open(tmp_path / "x.lock", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"moved the position")
        RealWinApi().lock_byte(fd)
        os.write(fd, b"more")
        RealWinApi().unlock_byte(fd)
    finally:
        os.close(fd)
    assert fake_msvcrt == [(fd, 0, 101, 1), (fd, 0, 100, 1)]


def test_windows_processes_with_real_api_uses_msvcrt(fake_msvcrt: list[Any], tmp_path: Path) -> None:
    with WindowsProcesses().exclusive_lock(tmp_path / "x.lock"):
        assert [call[2] for call in fake_msvcrt] == [101]
    assert [(call[1], call[2], call[3]) for call in fake_msvcrt] == [(0, 101, 1), (0, 100, 1)]


def test_real_api_popen_forwards_to_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kwargs: seen.append((argv, kwargs)) or "popen")
    result = RealWinApi().popen(("llama-server.exe", "-m", "model.gguf"), creationflags=ALL_FLAGS, close_fds=True)
    assert result == "popen"
    assert seen == [(["llama-server.exe", "-m", "model.gguf"], {"creationflags": ALL_FLAGS, "close_fds": True})]


def test_real_api_ctrl_break_uses_os_kill_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", 1, raising=False)
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    RealWinApi().send_ctrl_break(4242)
    assert sent == [(4242, 1)]


def test_real_api_ctrl_break_refuses_off_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    # On POSIX signal 1 is SIGHUP: the real api must not send it, and must fail so the caller falls back.
    sent: list[tuple[int, int]] = []
    monkeypatch.delattr(signal, "CTRL_BREAK_EVENT", raising=False)
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    with pytest.raises(OSError):
        RealWinApi().send_ctrl_break(4242)
    assert sent == []


def test_real_api_taskkill_runs_an_argv_list(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **kwargs: seen.append((argv, kwargs)))
    monkeypatch.setenv("SYSTEMROOT", r"D:\Win")
    RealWinApi().taskkill(4242)
    ((argv, kwargs),) = seen
    # By its full path: a taskkill.exe planted on PATH (or in the current folder) is not the one run.
    assert argv == [r"D:\Win\System32\taskkill.exe", "/T", "/F", "/PID", "4242"]
    assert not kwargs.get("shell", False)
    assert kwargs["creationflags"] == CREATE_NO_WINDOW
    assert kwargs["timeout"] > 0


def test_real_api_taskkill_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(argv: list[str], **kwargs: Any) -> None:
        raise FileNotFoundError(errno.ENOENT, "taskkill")

    monkeypatch.setattr(subprocess, "run", missing)
    RealWinApi().taskkill(4242)
    monkeypatch.setattr(
        subprocess, "run", lambda argv, **kwargs: (_ for _ in ()).throw(subprocess.TimeoutExpired(argv, 10))
    )
    RealWinApi().taskkill(4242)


# -- the OS scan: marked processes, psutil faked ------------------------------------------------------------------


class FakeProcess:
    """What scan reads of a psutil.Process; ``environ`` may raise like psutil does for another user's process."""

    def __init__(self, pid: int, ppid: int, env: dict[str, str] | Exception, status: str = "running") -> None:
        self.pid, self._ppid, self._env, self._status = pid, ppid, env, status

    def environ(self) -> dict[str, str]:
        if isinstance(self._env, Exception):
            raise self._env
        return self._env

    def ppid(self) -> int:
        return self._ppid

    def status(self) -> str:
        return self._status

    def create_time(self) -> float:
        return 1000.0 + self.pid


def test_scan_finds_the_top_marked_process_of_each_instance_on_windows() -> None:
    home = r"C:\Users\Ann\llama-home"
    table = [
        # Windows: any case for names and paths, either slash.
        FakeProcess(10, 1, {"Llama_Orch_Instance": "qwen", "llama_orch_instance_home": "c:/users/ann/LLAMA-HOME"}),
        FakeProcess(11, 10, {"LLAMA_ORCH_INSTANCE": "qwen", "LLAMA_ORCH_INSTANCE_HOME": home}),  # its child
        FakeProcess(20, 1, {"LLAMA_ORCH_INSTANCE": "phi", "LLAMA_ORCH_INSTANCE_HOME": home}),
        FakeProcess(21, 20, {"LLAMA_ORCH_INSTANCE": "phi", "LLAMA_ORCH_INSTANCE_HOME": home}, status="zombie"),
        FakeProcess(30, 1, {"LLAMA_ORCH_INSTANCE": "qwen", "LLAMA_ORCH_INSTANCE_HOME": r"D:\other-home"}),
        FakeProcess(40, 1, {"LLAMA_ORCH_INSTANCE_HOME": home}),  # no instance: not ours (e.g. a shell)
        FakeProcess(50, 1, psutil.AccessDenied(50)),  # another user's: skipped
        FakeProcess(60, 1, psutil.NoSuchProcess(60)),  # gone meanwhile
        # A child whose marked parent died: Windows does not re-parent, its ppid is no marked process.
        FakeProcess(70, 999, {"LLAMA_ORCH_INSTANCE": "gemma", "LLAMA_ORCH_INSTANCE_HOME": home}),
    ]
    wp = WindowsProcesses(api=None, process_iter=lambda: iter(table))  # type: ignore[arg-type]
    found = wp.scan(Path(home))
    assert [(f.name, f.pid, f.create_time) for f in found] == [
        ("gemma", 70, 1070.0),
        ("phi", 20, 1020.0),
        ("qwen", 10, 1010.0),
    ]
    assert found[0].handle == ProcessHandle(70, 1070.0)


def test_scan_on_posix_compares_names_and_paths_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_orchestrator.adapters.process.posix import PosixProcesses

    table = [
        FakeProcess(10, 1, {"LLAMA_ORCH_INSTANCE": "a", "LLAMA_ORCH_INSTANCE_HOME": "/srv/home"}),
        FakeProcess(11, 1, {"llama_orch_instance": "b", "LLAMA_ORCH_INSTANCE_HOME": "/srv/home"}),
        FakeProcess(12, 1, {"LLAMA_ORCH_INSTANCE": "c", "LLAMA_ORCH_INSTANCE_HOME": "/SRV/home"}),
    ]
    monkeypatch.setattr(psutil, "process_iter", lambda *a, **k: iter(table))
    assert [f.name for f in PosixProcesses().scan(Path("/srv/home"))] == ["a"]
