"""A fake llama.cpp ``llama-server`` for tests and demos (standard library only, starts in milliseconds).

Run it as::

    python -m llama_orchestrator.testing.fake_server --model M.gguf --host 127.0.0.1 --port 8080 [fake flags]

It accepts the llama-server arguments the orchestrator passes (``--model/-m --host --port --ctx-size/-c
--batch-size/-b --threads/-t --n-gpu-layers/-ngl --parallel/-np --timeout/-to --alias/-a``) and ignores any other
argument. Endpoints: ``GET /health`` and ``/v1/health`` (503 "Loading model" while loading, then 200), ``GET
/v1/models``, ``POST /v1/chat/completions`` and ``/v1/completions`` (JSON, or SSE with ``"stream": true``), ``POST
/v1/embeddings``, ``GET /metrics``, ``GET /props``. As in llama-server, every endpoint answers 503 while loading.

Fake behaviour flags; each can also be set with the environment variable ``FAKE_LLAMA_<NAME>`` (e.g.
``FAKE_LLAMA_LOAD_SECONDS=2``, ``FAKE_LLAMA_IGNORE_SIGTERM=1``); a command-line flag wins over the environment:

``--fake-load-seconds S``   answer 503 "Loading model" for S seconds after the port opens (default 0)
``--fake-crash-after S``    exit with the crash code S seconds after the port opens
``--fake-exit-code N``      the crash code (default 3); given without --fake-crash-after, the server fails at
                            startup (before binding the port) with this code, like a model that cannot load
``--fake-hang-after S``     S seconds after the port opens, stop answering: connections are accepted, requests never
                            get a response (the process still handles signals)
``--fake-ignore-sigterm``   log and ignore SIGTERM (and SIGBREAK on Windows); only SIGKILL/SIGINT end it
``--fake-spawn-child``      start a child ``python -c`` sleeper in the same process group; prints ``child pid N``
                            to stdout
``--fake-log-flood B``      write about B bytes per second of log lines to stderr
``--fake-token-delay S``    delay between streamed tokens (default 0.0)
``--fake-tokens N``         tokens per answer (default 8; ``max_tokens`` in a request lowers it)

``--version`` prints ``version: 0.0.0-fake (build 0, commit fake)`` to stderr and ``--list-devices`` prints
``Available devices:`` to stdout, both exiting 0 at once, as llama-server does.

Exit codes: 0 after SIGTERM/SIGINT, 1 when the port cannot be bound, the crash code for simulated crashes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FAKE_VERSION", "FakeConfig", "build_parser", "main", "parse_args"]

FAKE_VERSION = "0.0.0-fake"
_ENV_PREFIX = "FAKE_LLAMA_"
_TRUE = {"1", "true", "yes", "on"}
_WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "llama",
    "runs",
    "fast",
    "fake",
    "tokens",
    "stream",
)


class FakeConfig(argparse.Namespace):
    model: str | None
    host: str
    port: int
    ctx_size: int
    batch_size: int
    threads: int
    n_gpu_layers: str
    parallel: int
    timeout: int
    alias: str | None
    version: bool
    list_devices: bool
    fake_load_seconds: float
    fake_crash_after: float | None
    fake_exit_code: int | None
    fake_hang_after: float | None
    fake_ignore_sigterm: bool
    fake_spawn_child: bool
    fake_log_flood: int
    fake_token_delay: float
    fake_tokens: int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_orchestrator.testing.fake_server",
        description="Fake llama-server for tests. Unknown arguments are ignored.",
        allow_abbrev=False,
    )
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-b", "--batch-size", type=int, default=2048)
    p.add_argument("-t", "--threads", type=int, default=-1)
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", default="0")  # N, auto or all
    p.add_argument("-np", "--parallel", type=int, default=1)
    p.add_argument("-to", "--timeout", type=int, default=600)
    p.add_argument("-a", "--alias", default=None)
    p.add_argument("--version", action="store_true", help="print a llama-server-like version to stderr and exit 0")
    p.add_argument("--list-devices", action="store_true", help="print 'Available devices:' and exit 0")
    g = p.add_argument_group("fake behaviour (also FAKE_LLAMA_<NAME> environment variables)")
    g.add_argument("--fake-load-seconds", type=float, default=None, metavar="S")
    g.add_argument("--fake-crash-after", type=float, default=None, metavar="S")
    g.add_argument("--fake-exit-code", type=int, default=None, metavar="N")
    g.add_argument("--fake-hang-after", type=float, default=None, metavar="S")
    g.add_argument("--fake-ignore-sigterm", action="store_true", default=None)
    g.add_argument("--fake-spawn-child", action="store_true", default=None)
    g.add_argument("--fake-log-flood", type=int, default=None, metavar="BYTES_PER_SEC")
    g.add_argument("--fake-token-delay", type=float, default=None, metavar="S")
    g.add_argument("--fake-tokens", type=int, default=None, metavar="N")
    return p


# (attribute, converter, default) for the fake flags, in the order of the table above.
_FAKE_FLAGS: tuple[tuple[str, Any, Any], ...] = (
    ("fake_load_seconds", float, 0.0),
    ("fake_crash_after", float, None),
    ("fake_exit_code", int, None),
    ("fake_hang_after", float, None),
    ("fake_ignore_sigterm", lambda v: v.strip().lower() in _TRUE, False),
    ("fake_spawn_child", lambda v: v.strip().lower() in _TRUE, False),
    ("fake_log_flood", int, 0),
    ("fake_token_delay", float, 0.0),
    ("fake_tokens", int, 8),
)


def _select_known(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Keep only our options (exact option strings or ``--opt=value``) with their values; drop everything else.

    llama-server has many short options (``-ctk``, ``-ts``, ``-mg``, ``-cb``…) that argparse would otherwise read as
    our ``-c``/``-t``/``-m`` with a glued value, so unknown arguments are filtered out before parsing.
    """
    actions = parser._option_string_actions  # stdlib, stable
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        opt = arg.split("=", 1)[0] if arg.startswith("--") else arg
        action = actions.get(opt)
        if action is None or opt in ("-h", "--help"):
            if opt in ("-h", "--help"):
                out.append(opt)
            i += 1
            continue
        if ("=" in arg and arg.startswith("--")) or action.nargs == 0:
            out.append(arg)
            i += 1
        else:
            out.extend(argv[i : i + 2])
            i += 2
    return out


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> FakeConfig:
    """Parse llama-server style arguments plus fake flags; fill unset fake flags from ``FAKE_LLAMA_*``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env: Mapping[str, str] = os.environ if environ is None else environ
    parser = build_parser()
    ns, _unknown = parser.parse_known_args(_select_known(argv, parser), namespace=FakeConfig())
    for attr, conv, default in _FAKE_FLAGS:
        if getattr(ns, attr) is not None:
            continue
        raw = env.get(_ENV_PREFIX + attr[len("fake_") :].upper())
        if raw is not None and raw.strip() != "":
            try:
                setattr(ns, attr, conv(raw))
                continue
            except ValueError:
                parser.error(f"invalid value for {_ENV_PREFIX}{attr[len('fake_') :].upper()}: {raw!r}")
        setattr(ns, attr, default)
    return ns


class _Log:
    """Thread-safe line writer to stderr that survives a closed pipe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        self.raw(line + "\n")

    def raw(self, text: str) -> bool:
        """Write ``text`` as is; False when stderr is gone."""
        with self._lock:
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
                return True
            except (OSError, ValueError):
                return False


log = _Log()


class FakeState:
    def __init__(self, cfg: FakeConfig) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.ready_at = self.started + max(0.0, cfg.fake_load_seconds)
        self.hang = threading.Event()
        self.forever = threading.Event()  # never set: hung handlers wait on it
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.predicted_tokens = 0
        self.requests = 0
        self.processing = 0
        name = cfg.model or "model.gguf"
        self.model_id = cfg.alias or os.path.basename(name.replace("\\", "/")) or "model.gguf"

    def loading(self) -> bool:
        return time.monotonic() < self.ready_at

    def block_if_hung(self) -> None:
        if self.hang.is_set():
            self.forever.wait()


def _count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def _answer_tokens(n: int) -> list[str]:
    return [(_WORDS[i % len(_WORDS)] if i == 0 else " " + _WORDS[i % len(_WORDS)]) for i in range(n)]


def _embedding(text: str, dim: int = 16) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [round((digest[i % len(digest)] - 127.5) / 127.5, 6) for i in range(dim)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llama.cpp"
    sys_version = ""
    state: FakeState  # set on the subclass made in serve()

    # ----------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib method's parameter name
        pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        path = self.path.split("?", 1)[0] if hasattr(self, "path") else "-"
        code_val = getattr(code, "value", code)
        log(f"srv  log_server_r: request: {self.command} {path} {self.client_address[0]} {code_val}")

    def end_headers(self) -> None:
        # As llama-server's CORS middleware does: any Origin is reflected (the router must not relay that).
        origin = self.headers.get("Origin")
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
        super().end_headers()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, code: int, obj: Any, extra_headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_text(self, code: int, text: str, content_type: str) -> None:
        body = text.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _error(self, code: int, message: str, type_: str) -> None:
        self._send_json(code, {"error": {"code": code, "message": message, "type": type_}})

    def _route(self, method: str) -> None:
        st = self.state
        st.block_if_hung()
        path = self.path.split("?", 1)[0]
        body = self._read_body() if method == "POST" else b""
        st.block_if_hung()
        if st.loading():
            self._error(503, "Loading model", "unavailable_error")
            return
        routes: Mapping[str, object] = _GET_ROUTES if method in ("GET", "HEAD") else _POST_ROUTES
        if path not in routes:
            if path in _GET_ROUTES or path in _POST_ROUTES:
                self._error(405, "Method Not Allowed", "invalid_request_error")
            else:
                self._error(404, "File Not Found", "not_found_error")
            return
        if method == "POST":
            try:
                payload = json.loads(body or b"{}")
                if not isinstance(payload, dict):
                    raise ValueError("request body must be a JSON object")
            except ValueError as exc:
                self._error(400, f"invalid JSON body: {exc}", "invalid_request_error")
                return
            _POST_ROUTES[path](self, payload)
        else:
            _GET_ROUTES[path](self)

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    # ---------------------------------------------------------------- endpoints
    def health(self) -> None:
        self._send_json(200, {"status": "ok"})

    def models(self) -> None:
        st = self.state
        self._send_json(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": st.model_id,
                        "aliases": [st.model_id],
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "llamacpp",
                        "meta": {"n_ctx_train": st.cfg.ctx_size, "fake": True},
                    }
                ],
            },
        )

    def props(self) -> None:
        cfg = self.state.cfg
        self._send_json(
            200,
            {
                "default_generation_settings": {"n_ctx": cfg.ctx_size},
                "total_slots": cfg.parallel,
                "model_path": cfg.model,
                "model_alias": self.state.model_id,
                "build_info": "fake",
            },
        )

    def metrics(self) -> None:
        st = self.state
        with st.lock:
            vals = (st.prompt_tokens, st.predicted_tokens, st.requests, st.processing)
        lines = [
            "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.",
            "# TYPE llamacpp:prompt_tokens_total counter",
            f"llamacpp:prompt_tokens_total {vals[0]}",
            "# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.",
            "# TYPE llamacpp:tokens_predicted_total counter",
            f"llamacpp:tokens_predicted_total {vals[1]}",
            "# HELP llamacpp:n_decode_total Total number of llama_decode() calls",
            "# TYPE llamacpp:n_decode_total counter",
            f"llamacpp:n_decode_total {vals[2]}",
            "# HELP llamacpp:requests_processing Number of requests processing.",
            "# TYPE llamacpp:requests_processing gauge",
            f"llamacpp:requests_processing {vals[3]}",
            "# HELP llamacpp:requests_deferred Number of requests deferred.",
            "# TYPE llamacpp:requests_deferred gauge",
            "llamacpp:requests_deferred 0",
        ]
        self._send_text(200, "\n".join(lines) + "\n", "text/plain; version=0.0.4")

    def chat_completions(self, req: dict[str, Any]) -> None:
        messages = req.get("messages")
        if not isinstance(messages, list):
            self._error(400, "'messages' is required and must be a list", "invalid_request_error")
            return
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        self._complete(req, _count_tokens(text), chat=True)

    def completions(self, req: dict[str, Any]) -> None:
        prompt = req.get("prompt", "")
        text = " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
        self._complete(req, _count_tokens(text), chat=False)

    def embeddings(self, req: dict[str, Any]) -> None:
        inp = req.get("input", req.get("content"))
        if inp is None:
            self._error(400, "'input' is required", "invalid_request_error")
            return
        items = [str(x) for x in inp] if isinstance(inp, list) else [str(inp)]
        n_prompt = sum(_count_tokens(t) for t in items)
        with self.state.lock:
            self.state.prompt_tokens += n_prompt
            self.state.requests += 1
        self._send_json(
            200,
            {
                "object": "list",
                "model": req.get("model") or self.state.model_id,
                "data": [{"object": "embedding", "index": i, "embedding": _embedding(t)} for i, t in enumerate(items)],
                "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt},
            },
        )

    # ------------------------------------------------------------- generation
    def _complete(self, req: dict[str, Any], n_prompt: int, *, chat: bool) -> None:
        st = self.state
        n = st.cfg.fake_tokens
        max_tokens = req.get("max_tokens", req.get("max_completion_tokens", req.get("n_predict")))
        finish = "stop"
        if isinstance(max_tokens, int) and 0 <= max_tokens < n:
            n, finish = max_tokens, "length"
        tokens = _answer_tokens(n)
        model = req.get("model") or st.model_id
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        with st.lock:
            st.prompt_tokens += n_prompt
            st.requests += 1
            st.processing += 1
        try:
            if req.get("stream"):
                self._stream(tokens, finish, model, cid, created, usage, chat=chat)
                return
            for _ in tokens:
                if st.cfg.fake_token_delay > 0:
                    time.sleep(st.cfg.fake_token_delay)
                st.block_if_hung()
            content = "".join(tokens)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            with st.lock:
                st.predicted_tokens += n
            self._send_json(
                200,
                {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage},
            )
        finally:
            with st.lock:
                st.processing -= 1

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(
        self, tokens: list[str], finish: str, model: str, cid: str, created: int, usage: dict[str, int], *, chat: bool
    ) -> None:
        st = self.state
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any], with_usage: bool = False) -> bytes:
            payload: dict[str, Any] = {
                "id": cid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if with_usage:
                payload["usage"] = usage
            return b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n"

        try:
            if chat:  # like llama-server: a role-only first chunk, then one chunk per token
                self._write_chunk(
                    event({"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None})
                )
            for i, tok in enumerate(tokens):
                if i > 0 and st.cfg.fake_token_delay > 0:
                    time.sleep(st.cfg.fake_token_delay)
                st.block_if_hung()
                if chat:
                    choice = {"index": 0, "delta": {"content": tok}, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": tok, "logprobs": None, "finish_reason": None}
                self._write_chunk(event(choice))
                with st.lock:
                    st.predicted_tokens += 1
            final = (
                {"index": 0, "delta": {}, "finish_reason": finish}
                if chat
                else {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
            )
            self._write_chunk(event(final, with_usage=True))
            self._write_chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            log("srv  log_server_r: client disconnected during stream, cancelling task")
            self.close_connection = True


_GET_ROUTES = {
    "/health": Handler.health,
    "/v1/health": Handler.health,
    "/v1/models": Handler.models,
    "/models": Handler.models,
    "/metrics": Handler.metrics,
    "/props": Handler.props,
}
_POST_ROUTES = {
    "/v1/chat/completions": Handler.chat_completions,
    "/chat/completions": Handler.chat_completions,
    "/v1/completions": Handler.completions,
    "/completions": Handler.completions,
    "/completion": Handler.completions,
    "/v1/embeddings": Handler.embeddings,
    "/embeddings": Handler.embeddings,
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False  # a port in use must fail, like llama-server
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            return
        log(f"srv  log_server_r: internal error: {exc!r}")


class _Server6(_Server):
    address_family = socket.AF_INET6


def _after(seconds: float, fn: Any) -> None:
    t = threading.Timer(max(0.0, seconds), fn)
    t.daemon = True
    t.start()


def _flood(bytes_per_sec: int) -> None:
    line = ("srv  log_flood: " + "x" * 100)[:100] + "\n"
    budget = 0.0
    last = time.monotonic()
    while True:
        time.sleep(0.05)
        now = time.monotonic()
        budget += (now - last) * bytes_per_sec
        last = now
        chunk = []
        while budget >= len(line):
            chunk.append(line)
            budget -= len(line)
        if chunk and not log.raw("".join(chunk)):
            return


def _spawn_child() -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(3600)"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )
    return proc.pid


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.version:  # llama-server prints its version to stderr
        log(f"version: {FAKE_VERSION} (build 0, commit fake)")
        log(f"built with Python {sys.version.split()[0]} for fake-llama-server")
        return 0
    if cfg.list_devices:
        sys.stdout.write("Available devices:\n  (none)\n")
        sys.stdout.flush()
        return 0
    log(f"build: 0 (fake) with Python {sys.version.split()[0]} for fake-llama-server")
    log(f"system info: n_threads = {cfg.threads}, fake = true")
    log("main: binding port with default address family")

    if cfg.fake_exit_code is not None and cfg.fake_crash_after is None:
        log(f"llama_model_load: error loading model: fake failure requested (exit code {cfg.fake_exit_code})")
        log("srv    load_model: failed to load model, '" + str(cfg.model) + "'")
        log("main: exiting due to model loading error")
        return cfg.fake_exit_code

    stop = threading.Event()
    signame = ""  # handlers go in before the port opens: no window where SIGTERM kills us raw

    def on_term(signum: int, _frame: Any) -> None:
        nonlocal signame
        name = signal.Signals(signum).name
        if cfg.fake_ignore_sigterm and name in ("SIGTERM", "SIGBREAK"):
            log(f"fake: received {name}, ignoring it")
            return
        signame = name
        stop.set()

    for sig_name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        sig = getattr(signal, sig_name, None)
        if sig is not None:
            signal.signal(sig, on_term)

    server_cls = _Server6 if ":" in cfg.host else _Server

    class Handler_(Handler):  # one per server: its FakeState is set below
        pass

    try:
        server = server_cls((cfg.host, cfg.port), Handler_)
    except OSError as exc:
        log(f"main: couldn't bind HTTP server socket, hostname: {cfg.host}, port: {cfg.port} ({exc})")
        return 1
    state = FakeState(cfg)
    Handler_.state = state
    port = server.server_address[1]
    log(f"main: HTTP server is listening, hostname: {cfg.host}, port: {port}, http threads: 4")
    log("main: loading model")
    log(f"srv    load_model: loading model '{cfg.model}'")

    if cfg.fake_spawn_child:
        try:
            sys.stdout.write(f"child pid {_spawn_child()}\n")
            sys.stdout.flush()
        except OSError:
            pass

    def loaded() -> None:
        log("main: model loaded")
        log("main: chat template, chat_template: chatml, example_format: fake")
        log("srv  llama_server: model loaded")
        log(f"srv  llama_server: listening on http://{cfg.host}:{port}")
        log(f"main: server is listening on http://{cfg.host}:{port} - starting the main loop")
        log("srv  update_slots: all slots are idle")

    _after(cfg.fake_load_seconds, loaded)

    if cfg.fake_crash_after is not None:
        code = 3 if cfg.fake_exit_code is None else cfg.fake_exit_code

        def crash() -> None:
            log(f"fake: simulated crash, exiting with code {code}")
            try:
                sys.stdout.flush()
            finally:
                os._exit(code)

        _after(cfg.fake_crash_after, crash)

    if cfg.fake_hang_after is not None:

        def hang() -> None:
            state.hang.set()
            log("fake: hanging, requests will no longer be answered")

        _after(cfg.fake_hang_after, hang)

    if cfg.fake_log_flood > 0:
        threading.Thread(target=_flood, args=(cfg.fake_log_flood,), daemon=True).start()

    serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serve.start()
    while not stop.wait(0.5):
        pass
    log(f"srv    operator(): operator(): received {signame}, cleaning up before exit...")
    server.shutdown()
    server.server_close()
    log("main: exiting")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
