"""The CLI's fast path (``cli.fast``): `--help` and `ps` answered without typer, rich, pydantic or httpx, with the
same output as the typer commands; the help cache and the settings cache invalidated by their files' stamps."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from conftest import Cli, _cli_command
from helpers import free_port, subprocess_env
from llama_orchestrator.adapters import config_cache, http_get
from llama_orchestrator.adapters.config_files import load_settings
from llama_orchestrator.cli import fast, render
from llama_orchestrator.domain.errors import ConfigError


def run_cli(*args: str, env: dict[str, str], importtime: bool = False) -> subprocess.CompletedProcess[str]:
    command = _cli_command()
    if importtime:  # the same program, under -X importtime: which modules it imported, on stderr
        command = [sys.executable, "-X", "importtime", *(command if len(command) == 1 else command[1:])]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL
    )


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env(
        {"LLAMA_ORCH_HOME": str(tmp_path / "home"), "LLAMA_ORCH_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "100"}
    )


# -- --help ----------------------------------------------------------------------------------------------------


def test_cached_help_is_what_typer_prints(env: dict[str, str], tmp_path: Path) -> None:
    typer_says = run_cli("--help", env={**env, fast.NO_FAST_ENV: "1"})
    first = run_cli("--help", env=env)  # not cached yet: typer prints it, and it is recorded
    assert (tmp_path / "cache" / "help.json").is_file()
    second = run_cli("--help", env=env, importtime=True)  # from the cache
    assert typer_says.returncode == first.returncode == second.returncode == 0
    assert first.stdout == typer_says.stdout == second.stdout
    assert "Usage:" in second.stdout and "ps" in second.stdout
    assert not {"typer", "click", "rich"} & imported(second.stderr)  # the replay imported none of them
    # Another width is another text: not served from the entry of the first.
    narrow = run_cli("--help", env={**env, "COLUMNS": "60"})
    assert narrow.stdout == run_cli("--help", env={**env, "COLUMNS": "60", fast.NO_FAST_ENV: "1"}).stdout
    assert narrow.stdout != first.stdout


def test_help_key_changes_with_the_sources_and_the_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "commands.py"
    source.write_text("HELP = 'one'\n")
    before = fast.help_key([str(source)])
    assert fast.help_key([str(source)]) == before
    source.write_text("HELP = 'two, longer'\n")  # an edit: another size and time
    assert fast.help_key([str(source)]) != before
    after_edit = fast.help_key([str(source)])
    monkeypatch.setenv("COLUMNS", "61")
    assert fast.help_key([str(source)]) != after_edit
    # The real key covers every module of the CLI (the typer commands live in cli/commands.py).
    assert any(p.endswith(os.path.join("cli", "commands.py")) for p in fast.help_sources())


def test_help_is_recorded_only_when_it_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fast.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(fast.NO_FAST_ENV, raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(SystemExit), fast.recording_help(["--help"]):
        print("half a help")
        raise SystemExit(2)
    assert fast.help_cache().get(fast.help_key()) is None
    with pytest.raises(SystemExit), fast.recording_help(["--home", "x", "--help"]):
        print("the help")
        raise SystemExit(0)
    assert fast.help_cache().get(fast.help_key()) == "the help\n"
    assert sys.stdout.getvalue() == "half a help\nthe help\n"  # written through as well


# -- ps: flags ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], (False, False, False, [], None)),
        (["-a", "--json"], (True, True, False, [], None)),
        (["-aq"], (True, False, True, [], None)),
        (["-qf", "status=running", "--filter=name=x"], (False, False, True, ["status=running", "name=x"], None)),
        (["-fhealth=healthy", "--format", "{{.Name}}"], (False, False, False, ["health=healthy"], "{{.Name}}")),
        (["--format=json", "--format", "table {{.Name}}"], (False, False, False, [], "table {{.Name}}")),
        (["--filter", "--json"], (False, False, False, ["--json"], None)),  # as click: the next word is the value
    ],
)
def test_ps_flags_as_click_reads_them(args: list[str], expected: tuple[object, ...]) -> None:
    flags = fast.parse_ps(args)
    assert flags is not None
    assert (flags.all, flags.json, flags.quiet, flags.filters, flags.fmt) == expected


@pytest.mark.parametrize(
    "args", [["--help"], ["-h"], ["name"], ["-x"], ["-ax"], ["--filter"], ["-f"], ["--all=1"], ["--"], ["--jso"]]
)
def test_ps_leaves_to_typer_what_it_does_not_understand(args: list[str]) -> None:
    assert fast.parse_ps(args) is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ps"], ({}, ["ps"])),
        (["--home", "/h", "--host=x:1", "ps", "-a"], ({"home": "/h", "host": "x:1"}, ["ps", "-a"])),
        (["--api-key", "k", "--help"], ({"api_key": "k"}, ["--help"])),
        (["--home"], None),
        (["--home", "", "ps"], None),
        (["--verbose", "ps"], None),
    ],
)
def test_root_options(argv: list[str], expected: object) -> None:
    assert fast.split_globals(argv) == expected


# -- ps: rendering -----------------------------------------------------------------------------------------------


RECORDS = [
    {
        "name": "qwen",
        "status": "running",
        "health": "healthy",
        "pid": 4242,
        "port": 8001,
        "backend": "auto",
        "backend_resolved": "vulkan",
        "model": "/models/qwen2.5-0.5b-q4_k_m.gguf",
        "uptime_s": 3725,
        "restarts": 1,
        "config_changed": True,
    },
    {
        "name": "broken",
        "status": "exited",
        "exit_code": 139,
        "health": "unhealthy",
        "pid": None,
        "port": 8002,
        "backend": "cpu",
        "model": "C:\\models\\x.gguf",
        "uptime_s": None,
        "restarts": 5,
    },
    {
        "name": "gone",
        "status": "failed",
        "health": "unknown",
        "pid": 77,
        "port": None,
        "backend": None,
        "model": None,
        "uptime_s": None,
        "restarts": 0,
        "config_removed": True,
    },
    {
        "name": "warming",
        "status": "starting",
        "health": "loading",
        "pid": 9,
        "port": 8003,
        "backend": "cuda",
        "model": "m.gguf",
        "uptime_s": 2,
        "restarts": 0,
    },
    {
        "name": "bad",
        "status": "invalid-config",
        "health": "unknown",
        "pid": None,
        "port": None,
        "backend": None,
        "model": None,
        "uptime_s": None,
        "restarts": 0,
    },
]


def rich_prints(records: list[dict[str, object]], *, styled: bool, width: int) -> str:
    """What `ps` printed before the fast path: rich's table and the legend."""
    out = io.StringIO()
    console = Console(
        file=out,
        force_terminal=styled,
        color_system="standard" if styled else None,
        width=width,
        highlight=False,
        soft_wrap=True,
    )
    console.print(render.ps_table(records, now=0))
    for line in render.ps_legend(records):
        console.print(line, markup=False, style="dim")
    return out.getvalue()


@pytest.mark.parametrize("styled", [False, True])
@pytest.mark.parametrize("count", [1, 2, 5])
def test_ps_text_is_rich_table(styled: bool, count: int) -> None:
    records = RECORDS[:count]
    assert render.ps_text(records, styled=styled, width=200) == rich_prints(records, styled=styled, width=200)


def test_ps_text_leaves_to_rich_what_rich_would_do_otherwise() -> None:
    assert render.ps_text(RECORDS, styled=False, width=40) is None  # rich would wrap the MODEL column
    odd = [{**RECORDS[0], "model": "/m/[bold]x.gguf"}, {**RECORDS[1], "model": "/m/modèle.gguf"}]
    for record in odd:  # markup rich would read, a character rich would measure
        assert render.ps_text([record], styled=False, width=200) is None


def test_text_target_decides_as_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR", "COLUMNS", "TERM"):
        monkeypatch.delenv(name, raising=False)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert render.text_target(io.StringIO()) == (False, render.PIPED_WIDTH)
    monkeypatch.setenv("COLUMNS", "123")
    assert render.text_target(io.StringIO()) == (False, 123)
    if sys.platform != "win32":
        monkeypatch.setenv("TERM", "xterm-256color")
        assert render.text_target(Tty()) == (True, 123)
        monkeypatch.setenv("NO_COLOR", "1")
        assert render.text_target(Tty()) is None  # rich keeps bold and dim then: rich prints it
        monkeypatch.delenv("NO_COLOR")
        monkeypatch.setenv("FORCE_COLOR", "1")
        assert render.text_target(io.StringIO()) == (True, 123)
        monkeypatch.setenv("TTY_COMPATIBLE", "0")
        assert render.text_target(Tty()) == (False, 123)


# -- ps: end to end ----------------------------------------------------------------------------------------------


def test_ps_without_daemon_matches_typer_and_skips_typer(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    for name in ("alpha", "beta"):
        cli.run("init", name, "--model", str(tiny_model), "--binary", str(fake_binary), check=True)
    env = subprocess_env({"LLAMA_ORCH_HOME": str(cli.home), "COLUMNS": "200", "NO_COLOR": "1"})
    for args in (["ps"], ["ps", "--json"], ["ps", "-aq"], ["ps", "--format", "{{.Name}} {{.Port}}"], ["ps", "-f", "x"]):
        quick, slow = run_cli(*args, env=env), run_cli(*args, env={**env, fast.NO_FAST_ENV: "1"})
        assert (quick.returncode, quick.stdout, quick.stderr) == (slow.returncode, slow.stdout, slow.stderr), args
    modules = imported(run_cli("ps", env=env, importtime=True).stderr)
    assert not {"typer", "click", "rich", "httpx"} & modules


# -- the settings cache ------------------------------------------------------------------------------------------


def write_settings(path: Path, document: object) -> None:
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    path.chmod(0o600)


def test_control_key_is_validated_again_when_the_file_changes(tmp_path: Path) -> None:
    settings, state = tmp_path / "orchestrator.json", tmp_path / "state"
    assert config_cache.control_key(settings, state) is None  # no file: the defaults hold no key
    write_settings(settings, {"api": {"control_keys": ["first-key-0123456789abcdef"]}})
    assert config_cache.control_key(settings, state) == "first-key-0123456789abcdef"
    assert (state / "validated.json").stat().st_mode & 0o777 == 0o600  # it holds a key
    assert config_cache.control_key(settings, state) == "first-key-0123456789abcdef"  # from the cache
    write_settings(settings, {"api": {"control_keys": ["second-key-0123456789abcdef-longer"]}})
    assert config_cache.control_key(settings, state) == "second-key-0123456789abcdef-longer"


def test_control_key_of_a_malformed_edit_is_none_and_the_error_is_unchanged(tmp_path: Path) -> None:
    settings, state = tmp_path / "orchestrator.json", tmp_path / "state"
    write_settings(settings, {"api": {"control_keys": ["a-key-0123456789abcdef"]}})
    assert config_cache.control_key(settings, state) == "a-key-0123456789abcdef"
    write_settings(settings, '{"api": {"control_keys": ["a-key-0123456789abcdef"]')  # cut short
    with pytest.raises(ConfigError) as broken:
        load_settings(settings)
    assert "invalid JSON" in str(broken.value)
    assert config_cache.control_key(settings, state) is None  # as before the cache: no key, the daemon says 401
    write_settings(settings, {"api": {"control_keys": ["a-key-0123456789abcdef"]}, "bogus": 1})
    with pytest.raises(ConfigError) as unknown:
        load_settings(settings)
    assert "bogus" in str(unknown.value)
    assert config_cache.control_key(settings, state) is None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_control_key_sees_a_chmod(tmp_path: Path) -> None:
    settings, state = tmp_path / "orchestrator.json", tmp_path / "state"
    write_settings(settings, {"api": {"control_keys": ["a-key-0123456789abcdef"]}})
    assert config_cache.control_key(settings, state) == "a-key-0123456789abcdef"
    settings.chmod(0o644)  # keys others can read: load_settings refuses the file, so no key
    assert config_cache.control_key(settings, state) is None


# -- http_get ----------------------------------------------------------------------------------------------------


class _Answers(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b'[{"a": ', b'"b c"}]'):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        status = 404 if self.path.startswith("/missing") else 200
        body = json.dumps({"path": self.path, "auth": self.headers.get("Authorization")}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_http_get(server: str) -> None:
    status, _, body = http_get.get(
        server + "/", "/api/x", {"all": "false", "q": "a b/é"}, {"Authorization": "Bearer k"}
    )
    assert status == 200
    assert json.loads(body) == {"path": "/api/x?all=false&q=a%20b%2F%C3%A9", "auth": "Bearer k"}
    assert http_get.get(server, "/chunked")[::2] == (200, b'[{"a": "b c"}]')
    assert http_get.get(server, "/missing")[0] == 404
    with pytest.raises(OSError):
        http_get.get(f"http://127.0.0.1:{free_port()}", "/api/instances")
    with pytest.raises(http_get.NotPlainHttp):
        http_get.get("https://127.0.0.1:1", "/")


def test_http_get_names_and_addresses(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    assert http_get.get(f"http://localhost:{port}", "/ok")[0] == 200  # a name: looked up
    assert json.loads(http_get.get(f"{server}/base/", "/api/x")[2])["path"] == "/base/api/x"
    assert http_get.split_url("http://[::1]:8000/base") == ("::1", 8000, "[::1]:8000", "/base")
    assert http_get.split_url("http://host") == ("host", 80, "host", "")
    assert http_get.normalize_url("gpu-box:8000/") == "http://gpu-box:8000"


# -- ps without a daemon: the snapshot ---------------------------------------------------------------------------


def _uptimes_aside(text: str) -> list[str]:
    text = re.sub(r'"uptime_s": [0-9.e+-]+', '"uptime_s": U', text)
    return [re.sub(r"\s+", " ", re.sub(r"\b\d+[dhms]( \d+[hms])?\b", "T", line)) for line in text.splitlines()]


def _same_ps(env: dict[str, str], *args: str) -> str:
    """`ps ARGS` through the fast path and through typer agree (uptimes aside); the fast one's output."""
    quick, slow = run_cli("ps", *args, env=env), run_cli("ps", *args, env={**env, fast.NO_FAST_ENV: "1"})
    assert (quick.returncode, _uptimes_aside(quick.stdout), quick.stderr) == (
        slow.returncode,
        _uptimes_aside(slow.stdout),
        slow.stderr,
    )
    return quick.stdout


def test_ps_snapshot_follows_every_change(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    for name in ("alpha", "beta"):
        cli.run("init", name, "--model", str(tiny_model), "--binary", str(fake_binary), check=True)
    cli.run("up", "alpha", "-d", "--wait", "--timeout", "60", check=True)
    env = subprocess_env({"LLAMA_ORCH_HOME": str(cli.home), "COLUMNS": "200", "NO_COLOR": "1"})
    snapshot = cli.home / "state" / "ps-snapshot.json"
    _same_ps(env, "-q")  # computed, and kept
    assert snapshot.is_file() and snapshot.stat().st_mode & 0o777 == 0o600
    assert not {"pydantic", "typer", "rich"} & imported(run_cli("ps", env=env, importtime=True).stderr)
    assert status_in(_same_ps(env), "alpha") == "running"

    beta = cli.home / "instances" / "beta" / "config.json"
    document = json.loads(beta.read_text())
    document["server"]["port"] = free_port()
    beta.write_text(json.dumps(document, indent=2))  # an edit: validated again
    assert f"{document['server']['port']}" in _same_ps(env, "--format", "{{.Name}} {{.Port}}")

    beta.write_text('{"name": "beta", "model": {')  # a malformed edit: the same report as ever
    assert status_in(_same_ps(env), "beta") == "invalid-config"
    beta.write_text(json.dumps(document, indent=2))

    pid = cli.ps()["alpha"]["pid"]
    os.kill(pid, 9)  # no file changes: the snapshot's process check sees it
    wait_gone(pid)
    assert status_in(_same_ps(env), "alpha") == "exited"
    cli.run("down", "alpha", check=True)
    assert status_in(_same_ps(env), "alpha") == "stopped"
    _same_ps(env, "-a", "--json")


def status_in(table: str, name: str) -> str:
    return next(line.split()[1] for line in table.splitlines() if line.split()[0] == name)


def wait_gone(pid: int) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=10)


def test_ps_snapshot_key_ignores_an_empty_wal(tmp_path: Path) -> None:
    from llama_orchestrator.adapters import ps_snapshot

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.sqlite").write_bytes(b"db")
    before = ps_snapshot.key(str(tmp_path), False)
    (tmp_path / "state" / "state.sqlite-wal").write_bytes(b"")  # a reader's open connection
    assert ps_snapshot.key(str(tmp_path), False) == before
    (tmp_path / "state" / "state.sqlite-wal").write_bytes(b"frame")  # a write
    assert ps_snapshot.key(str(tmp_path), False) != before
    assert ps_snapshot.key(str(tmp_path), True) != ps_snapshot.key(str(tmp_path), False)
