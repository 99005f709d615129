"""The fake llama-server fixture (SPEC §12), run as a real subprocess on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from helpers import free_port, subprocess_env, wait_until
from llama_orchestrator.testing.fake_server import parse_args

MODULE = "llama_orchestrator.testing.fake_server"
POSIX = os.name == "posix"
posix_only = pytest.mark.skipif(not POSIX, reason="POSIX signals and process groups")
LOADING_BODY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


@dataclass
class Fake:
    proc: subprocess.Popen[bytes]
    port: int
    out_path: Path
    err_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def post(self, path: str, body: dict[str, Any], timeout: float = 10.0) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=timeout)

    def first_response(self, path: str = "/health", timeout: float = 20.0) -> httpx.Response:
        """The first answer once the port accepts connections (whatever its status)."""
        return wait_until(lambda: self.get(path, timeout=2.0), timeout, ignore=(httpx.TransportError,))

    def wait_healthy(self, timeout: float = 20.0) -> httpx.Response:
        def healthy() -> httpx.Response | None:
            assert self.proc.poll() is None, f"fake exited with {self.proc.returncode}: {self.stderr()[-2000:]}"
            r = self.get("/health", timeout=2.0)
            return r if r.status_code == 200 else None

        return wait_until(healthy, timeout, ignore=(httpx.TransportError,), message="fake /health 200")

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def start_fake(tmp_path: Path):
    fakes: list[Fake] = []

    def _start(*args: str, env: dict[str, str] | None = None, port: int | None = None, model: bool = True) -> Fake:
        port = port or free_port()
        n = len(fakes)
        out_path, err_path = tmp_path / f"fake{n}.stdout", tmp_path / f"fake{n}.stderr"
        argv = [sys.executable, "-m", MODULE, "--host", "127.0.0.1", "--port", str(port)]
        if model:
            argv += ["--model", str(tmp_path / "models" / "tiny-q4.gguf")]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:  # the child keeps its own copies
            proc = subprocess.Popen(
                argv + list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=subprocess_env(env),
                start_new_session=POSIX,
            )
        fake = Fake(proc, port, out_path, err_path)
        fakes.append(fake)
        return fake

    yield _start

    for fake in fakes:
        if POSIX:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group: a spawned sleeper too
                os.killpg(fake.proc.pid, signal.SIGKILL)
        if fake.proc.poll() is None:
            fake.proc.kill()
        fake.proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------- argument parsing


def test_parse_args_accepts_llama_server_args_and_ignores_unknown() -> None:
    argv = [
        "-m",
        "models/x.gguf",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
        "-c",
        "1024",
        "--batch-size",
        "256",
        "-t",
        "2",
        "-ngl",
        "99",
        "-np",
        "3",
        "--timeout",
        "30",
        "--alias",
        "tiny",
        # llama-server options we don't know must not be read as -c/-t/-m with a glued value
        "-ctk",
        "q8_0",
        "-ctv",
        "q8_0",
        "-cb",
        "-ts",
        "1,1",
        "-mg",
        "0",
        "-tb",
        "4",
        "--flash-attn",
        "on",
        "--no-webui",
        "--jinja",
        "--mlock",
    ]
    ns = parse_args(argv, environ={})
    assert (ns.model, ns.host, ns.port, ns.ctx_size, ns.batch_size) == ("models/x.gguf", "0.0.0.0", 9000, 1024, 256)
    assert (ns.threads, ns.n_gpu_layers, ns.parallel, ns.timeout, ns.alias) == (2, "99", 3, 30, "tiny")
    assert parse_args(["-ngl", "auto", "-t", "-1"], environ={}).n_gpu_layers == "auto"
    assert (ns.fake_load_seconds, ns.fake_crash_after, ns.fake_tokens, ns.fake_token_delay) == (0.0, None, 8, 0.0)
    assert ns.fake_ignore_sigterm is False and ns.fake_spawn_child is False


def test_parse_args_env_flags_and_cli_precedence() -> None:
    env = {
        "FAKE_LLAMA_LOAD_SECONDS": "2.5",
        "FAKE_LLAMA_CRASH_AFTER": "7",
        "FAKE_LLAMA_EXIT_CODE": "4",
        "FAKE_LLAMA_HANG_AFTER": "9",
        "FAKE_LLAMA_IGNORE_SIGTERM": "1",
        "FAKE_LLAMA_SPAWN_CHILD": "true",
        "FAKE_LLAMA_LOG_FLOOD": "1000",
        "FAKE_LLAMA_TOKEN_DELAY": "0.1",
        "FAKE_LLAMA_TOKENS": "3",
    }
    ns = parse_args([], environ=env)
    assert (ns.fake_load_seconds, ns.fake_crash_after, ns.fake_exit_code, ns.fake_hang_after) == (2.5, 7.0, 4, 9.0)
    assert ns.fake_ignore_sigterm is True and ns.fake_spawn_child is True
    assert (ns.fake_log_flood, ns.fake_token_delay, ns.fake_tokens) == (1000, 0.1, 3)
    ns = parse_args(["--fake-tokens", "5", "--fake-load-seconds=0"], environ=env)
    assert ns.fake_tokens == 5 and ns.fake_load_seconds == 0.0
    assert parse_args([], environ={"FAKE_LLAMA_IGNORE_SIGTERM": "0"}).fake_ignore_sigterm is False


def test_version_and_list_devices_exit_at_once() -> None:
    run = [sys.executable, "-m", MODULE]
    v = subprocess.run(
        [*run, "--version", "--port", "1"], capture_output=True, text=True, env=subprocess_env(), timeout=30
    )
    assert v.returncode == 0 and v.stderr.startswith("version: ")  # to stderr, like llama-server
    d = subprocess.run([*run, "--list-devices"], capture_output=True, text=True, env=subprocess_env(), timeout=30)
    assert d.returncode == 0 and d.stdout.startswith("Available devices:")


# ------------------------------------------------------------------------------------------------------ endpoints


def test_health_is_503_while_loading_then_200(start_fake) -> None:
    fake = start_fake("--fake-load-seconds", "2.5")
    first = fake.first_response("/health")
    assert first.status_code == 503
    assert first.json() == LOADING_BODY
    assert fake.get("/v1/health").status_code in (503, 200)  # same route; may race the end of loading
    ok = fake.wait_healthy()
    assert ok.json() == {"status": "ok"}
    v1 = fake.get("/v1/health")
    assert v1.status_code == 200 and v1.json() == {"status": "ok"}
    err = fake.stderr()
    assert "request: GET /health 127.0.0.1 503" in err
    assert "request: GET /health 127.0.0.1 200" in err
    assert f"main: server is listening on http://127.0.0.1:{fake.port} - starting the main loop" in err
    assert "srv  update_slots: all slots are idle" in err


def test_openai_endpoints(start_fake) -> None:
    fake = start_fake(
        "--alias", "tiny", "-c", "1024", "-np", "2", "-ngl", "99", "-ctk", "q8_0", "--no-webui", "--fake-tokens", "5"
    )
    fake.wait_healthy()

    models = fake.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    props = fake.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 1024 and props["total_slots"] == 2

    chat = fake.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi you"}]})
    assert chat.status_code == 200
    c = chat.json()
    assert c["object"] == "chat.completion" and c["model"] == "tiny"
    assert c["choices"][0]["message"]["role"] == "assistant"
    assert len(c["choices"][0]["message"]["content"].split()) == 5
    assert c["choices"][0]["finish_reason"] == "stop"
    assert c["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}

    capped = fake.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert capped.json()["usage"]["completion_tokens"] == 2 and capped.json()["choices"][0]["finish_reason"] == "length"

    comp = fake.post("/v1/completions", {"prompt": "once upon"}).json()
    assert comp["object"] == "text_completion" and len(comp["choices"][0]["text"].split()) == 5
    assert comp["usage"]["completion_tokens"] == 5

    emb = fake.post("/v1/embeddings", {"input": ["a", "b c"]}).json()
    assert [d["index"] for d in emb["data"]] == [0, 1] and len(emb["data"][0]["embedding"]) > 0
    assert emb["usage"]["prompt_tokens"] == 3

    metrics = fake.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.text.splitlines() if line and line[0] != "#"}
    assert values["llamacpp:prompt_tokens_total"] >= 2 + 1 + 2 + 3
    assert values["llamacpp:tokens_predicted_total"] >= 5 + 2 + 5

    assert fake.get("/nope").status_code == 404
    assert fake.post("/v1/chat/completions", {"messages": "nope"}).status_code == 400
    bad = httpx.post(fake.url + "/v1/chat/completions", content=b"{not json", timeout=5)
    assert bad.status_code == 400


def test_model_id_defaults_to_model_file_name(start_fake) -> None:
    fake = start_fake()
    fake.wait_healthy()
    assert [m["id"] for m in fake.get("/v1/models").json()["data"]] == ["tiny-q4.gguf"]


def _sse_events(fake: Fake, path: str, body: dict[str, Any]) -> list[tuple[float, str]]:
    """(arrival time, data) for each SSE event, read as the bytes come in."""
    with httpx.Client(timeout=20) as client, client.stream("POST", fake.url + path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        # time.monotonic() per line, as each one arrives: the tests compare the arrival times
        return [(time.monotonic(), line[len("data: ") :]) for line in r.iter_lines() if line.startswith("data: ")]


def test_chat_stream_sends_one_sse_event_per_token_as_it_goes(start_fake) -> None:
    fake = start_fake("--fake-tokens", "4", "--fake-token-delay", "0.3")
    fake.wait_healthy()
    events = _sse_events(
        fake, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(content) == 4
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}  # as llama-server does
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 4
    # three 0.3 s gaps between the four tokens: they arrived one by one, not in one buffered lump
    times = [t for t, data in events[1 : 1 + len(content)]]
    assert times[-1] - times[0] >= 0.6


def test_completions_stream_matches_non_stream_text(start_fake) -> None:
    fake = start_fake("--fake-tokens", "6")
    fake.wait_healthy()
    events = _sse_events(fake, "/v1/completions", {"prompt": "x", "stream": True})
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert len(chunks) == 6 + 1  # one per token, then the finish_reason chunk
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == fake.post("/v1/completions", {"prompt": "x"}).json()["choices"][0]["text"]


def test_client_disconnect_mid_stream_leaves_server_serving(start_fake) -> None:
    fake = start_fake("--fake-tokens", "50", "--fake-token-delay", "0.05")
    fake.wait_healthy()
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", fake.url + "/v1/chat/completions", json={"messages": [], "stream": True}) as r,
    ):
        next(r.iter_lines())
    wait_until(lambda: "client disconnected" in fake.stderr(), 10)
    assert fake.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------- fake behaviours


@pytest.mark.parametrize(("extra", "code"), [([], 3), (["--fake-exit-code", "7"], 7), (["--fake-exit-code", "0"], 0)])
def test_crash_after_exits_with_the_code(start_fake, extra: list[str], code: int) -> None:
    fake = start_fake("--fake-crash-after", "0.3", *extra)
    assert fake.wait_exit() == code
    assert f"simulated crash, exiting with code {code}" in fake.stderr()


def test_exit_code_alone_fails_at_startup(start_fake) -> None:
    fake = start_fake("--fake-exit-code", "5")
    assert fake.wait_exit() == 5
    assert "error loading model" in fake.stderr()


def test_fake_flags_from_environment(start_fake) -> None:
    fake = start_fake(env={"FAKE_LLAMA_CRASH_AFTER": "0.2", "FAKE_LLAMA_EXIT_CODE": "9"})
    assert fake.wait_exit() == 9


def test_port_in_use_exits_1(start_fake) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        fake = start_fake(port=s.getsockname()[1])
        assert fake.wait_exit() == 1
    assert "couldn't bind HTTP server socket" in fake.stderr()


@posix_only
def test_sigterm_exits_0(start_fake) -> None:
    fake = start_fake()
    fake.wait_healthy()
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait_exit() == 0
    assert "received SIGTERM, cleaning up before exit" in fake.stderr()


@posix_only
def test_ignore_sigterm_survives_sigterm_and_dies_on_sigkill(start_fake) -> None:
    fake = start_fake("--fake-ignore-sigterm")
    fake.wait_healthy()
    fake.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "received SIGTERM, ignoring it" in fake.stderr(), 10)
    assert fake.get("/health").status_code == 200  # the handler already ran, and it is still serving
    assert fake.proc.poll() is None
    fake.proc.send_signal(signal.SIGKILL)
    assert fake.wait_exit() == -signal.SIGKILL


@posix_only
def test_spawn_child_starts_a_child_in_the_same_process_group(start_fake) -> None:
    fake = start_fake("--fake-spawn-child")
    line = wait_until(lambda: next((x for x in fake.stdout().splitlines() if x.startswith("child pid ")), None), 20)
    child_pid = int(line.split()[-1])
    child = psutil.Process(child_pid)
    assert child.ppid() == fake.proc.pid
    assert "python" in " ".join(child.cmdline()).lower()
    assert os.getpgid(child_pid) == os.getpgid(fake.proc.pid)
    fake.wait_healthy()
    # a graceful stop ends the server only: the child outlives it, so the orchestrator must kill the tree
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait_exit() == 0
    assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    os.killpg(os.getpgid(child_pid), signal.SIGKILL)
    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10)


def test_hang_after_accepts_connections_but_never_answers(start_fake) -> None:
    fake = start_fake("--fake-hang-after", "1.5")
    fake.wait_healthy()

    def hung() -> bool:
        try:
            fake.get("/health", timeout=0.3)
        except httpx.ReadTimeout:
            return True
        return False

    wait_until(hung, 20)
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5):
        pass  # the port still accepts
    assert fake.proc.poll() is None
    if POSIX:  # signals are still handled while requests hang
        fake.proc.send_signal(signal.SIGTERM)
        assert fake.wait_exit() == 0


def test_log_flood_writes_to_stderr(start_fake) -> None:
    fake = start_fake("--fake-log-flood", "200000")
    wait_until(lambda: fake.err_path.stat().st_size >= 50_000, 20)
    assert "log_flood" in fake.stderr()
