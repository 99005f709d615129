"""The checks every request passes before the daemon routes it: browser attacks and hostile input (issue 10).

Why: a daemon on loopback without keys is reachable by every web page the user opens. DNS rebinding (Ollama's
CVE-2024-28224) lets a page talk to it under the page's own name; a cross-origin "simple" request (a form,
``text/plain``, a body-less ``fetch``) needs no preflight. And any client can send a body of any size. In order:

1. ``Host`` must be a name the daemon serves (loopback, ``api.host``, ``api.allowed_hosts``; with a wildcard bind
   also this machine's names and addresses): else 403.
2. An ``Origin`` must be the daemon's own (same host:port as ``Host``: /docs, /ui/) or in ``api.cors_origins``:
   else 403, on every zone but the open paths, reads included (nothing legitimate sends a foreign Origin, and
   reads such as a health probe or a followed log have costs). Preflights (``OPTIONS`` +
   ``Access-Control-Request-Method``) are answered here; answers to allowed foreign origins get
   ``Access-Control-Allow-Origin`` and ``Vary: Origin``, and no other CORS header an app (llama-server) set.
3. A body over ``api.max_body_mb``: 413 from ``Content-Length`` before a byte is read. A chunked body is counted:
   on the router as the proxy reads it (past the limit the proxy is told the client left, so it drops what it
   holds); elsewhere it is read here, within the limit, because the control app may answer without reading it.
4. A state-changing control request (not GET/HEAD/OPTIONS) must be one no page can send without a preflight: a
   JSON body, or no body and an ``Authorization`` header or an allowed ``Origin``: else 415. The router does not
   ask this (``curl -d`` sends a form type); the Origin rule covers it there.

Refusals come in the zone's error shape (OpenAI's on the router) and name the setting that would allow them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from llama_orchestrator.adapters.memory import release_freed_memory
from llama_orchestrator.domain.routing import error_body
from llama_orchestrator.domain.settings import ApiSettings
from llama_orchestrator.domain.web_access import (
    SAFE_METHODS,
    WILDCARD_BINDS,
    HostPolicy,
    OriginPolicy,
    media_type,
    preflighted,
)

Inner = Callable[[dict, Callable, Callable], Awaitable[None]]

# What a preflight may ask for; the keys and the JSON type are all our routes need, the rest is llama-server's.
PREFLIGHT_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
PREFLIGHT_MAX_AGE_S = b"600"
EXPOSED_HEADERS = b"retry-after, x-llama-orch-instance"
MACHINE_NAMES_TTL_S = 30.0  # addresses change (DHCP, VPN): a Host that misses looks again, at most this often


async def send_json(send: Callable, status: int, body: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def refusal(message: str, kind: str, code: str) -> dict[str, Any]:
    """The error body of a refusal: OpenAI's error object, as every other error answer of every zone."""
    return error_body(message, kind, code)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:  # the ASGI server gives names in lower case
            return value.decode("latin-1")
    return None


def machine_names() -> set[str]:
    """This machine's host name and every address of its interfaces: what a wildcard bind is reached by."""
    import psutil

    hostname = socket.gethostname()
    names = {hostname, f"{hostname.partition('.')[0]}.local"}  # .local: the name mDNS gives it on the LAN
    try:
        for found in psutil.net_if_addrs().values():
            names |= {a.address.partition("%")[0] for a in found if a.family in (socket.AF_INET, socket.AF_INET6)}
    except OSError:  # an interface list that cannot be read leaves the host name
        pass
    return names


class RequestGuard:
    """The checks above, for one ``ApiSettings``; ``inner`` is what a request that passes them goes on to."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.wildcard_bind = settings.host.strip().lower() in WILDCARD_BINDS
        self._machine_names_at = 0.0
        self.hosts = self._host_policy()
        self.origins = OriginPolicy(settings.cors_origins)
        self.max_body = settings.max_body_bytes

    def _host_policy(self) -> HostPolicy:
        served = {self.settings.host}
        if self.wildcard_bind:
            served |= machine_names()
            self._machine_names_at = time.monotonic()
        return HostPolicy(served, self.settings.allowed_hosts)

    def host_allowed(self, host: str | None) -> bool:
        if self.hosts.allows(host):
            return True
        if self.wildcard_bind and time.monotonic() - self._machine_names_at > MACHINE_NAMES_TTL_S:
            self.hosts = self._host_policy()
            return self.hosts.allows(host)
        return False

    def passes_untouched(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether a router request with these headers and a sized body within the limit would pass every check
        above and go on unchanged: a Host it serves, and no Origin (a browser's request, whose CORS answer is
        the guard's to write). What the server's ``/v1`` lane asks before answering without the guard."""
        host = None
        for name, value in headers:
            if name == b"origin":
                return False
            if name == b"host" and host is None:  # the first, as ``header`` reads it
                host = value.decode("latin-1")
        return self.host_allowed(host)

    async def __call__(self, zone: str, scope: dict, receive: Callable, send: Callable, inner: Inner) -> None:
        headers = scope.get("headers", [])
        http = scope["type"] == "http"
        host = header(headers, b"host")
        if not self.host_allowed(host):
            message = (
                f"Host {host!r} is not a name this daemon serves (a page using DNS rebinding sends its own "
                "name): add it to api.allowed_hosts in orchestrator.json to allow it"
            )
            await _refuse(http, send, 403, refusal(message, "permission_error", "host_not_allowed"))
            return
        origin = header(headers, b"origin")
        if origin is not None and zone != "open":
            if not self.origins.allows(origin, host):
                message = (
                    f"requests from the web page at {origin} are refused: add that origin to "
                    "api.cors_origins in orchestrator.json to allow it"
                )
                await _refuse(http, send, 403, refusal(message, "permission_error", "origin_not_allowed"))
                return
            if http and scope["method"] == "OPTIONS" and header(headers, b"access-control-request-method"):
                await _preflight(send, origin, header(headers, b"access-control-request-headers"))
                return
            if http and self.origins.cross_origin(origin, host):
                send = _with_cors(send, origin)
        if not http:
            await inner(scope, receive, send)
            return
        length = header(headers, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body:
            # Refused before a byte of it is read; ``connection: close`` so the rest is never parsed either.
            await self._too_large(zone, send)
            return
        chunked = length is None and header(headers, b"transfer-encoding") is not None
        if zone == "control" and scope["method"] not in SAFE_METHODS:
            has_body = chunked or (length or "0").strip() not in ("", "0")
            if not preflighted(
                media=media_type(header(headers, b"content-type")),
                has_body=has_body,
                has_authorization=header(headers, b"authorization") is not None,
                origin_allowed=origin is not None,
            ):  # a disallowed one was refused above
                message = (
                    f"{scope['method']} {scope['path']} needs `Content-Type: application/json` (or no body "
                    "and an `Authorization: Bearer` header): an HTML form or text/plain request from a web "
                    "page must not change anything"
                )
                await send_json(send, 415, refusal(message, "invalid_request_error", "content_type_not_allowed"))
                return
        if not chunked:
            await inner(scope, receive, send)
            return
        if zone != "router":
            # The control app may answer without reading a body at all (its routes take the query), and the
            # server would then read and drop the rest: read it here, within the limit, and hand it on.
            body = await _read_within(receive, self.max_body)
            if body is None:
                release_freed_memory()
                await self._too_large(zone, send)
                return
            await inner(scope, _replay(body, receive), send)
            return
        meter = _BodyMeter(receive, self.max_body)
        send, started = _tracking(send)
        await inner(scope, meter, send)
        if meter.over:
            release_freed_memory()  # what the proxy read of it is garbage now
            if not started():
                await self._too_large(zone, send)

    async def _too_large(self, zone: str, send: Callable) -> None:
        message = f"request body over {self.settings.max_body_mb:g} MiB (api.max_body_mb in orchestrator.json)"
        await send_json(
            send, 413, refusal(message, "invalid_request_error", "body_too_large"), [(b"connection", b"close")]
        )


async def _refuse(http: bool, send: Callable, status: int, body: dict) -> None:
    if http:
        await send_json(send, status, body)
    else:
        await send({"type": "websocket.close", "code": 1008})


async def _preflight(send: Callable, origin: str, wanted_headers: str | None) -> None:
    # Any header may be asked for: the browser still enforces the answer, and keys are checked on the request.
    allow_headers = (wanted_headers or "authorization, content-type").encode("latin-1")
    await send(
        {
            "type": "http.response.start",
            "status": 204,
            "headers": [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-methods", PREFLIGHT_METHODS),
                (b"access-control-allow-headers", allow_headers),
                (b"access-control-max-age", PREFLIGHT_MAX_AGE_S),
                (b"vary", b"origin"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


def _with_cors(send: Callable, origin: str) -> Callable:
    """``send`` that makes the answer readable by the page at ``origin`` (an allowed foreign one): whatever CORS
    headers an app set are replaced by ours, so only ``api.cors_origins`` decides."""
    allow = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"vary", b"origin"),
        (b"access-control-expose-headers", EXPOSED_HEADERS),
    ]

    async def cors_send(message: dict) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
            message = {**message, "headers": [*kept, *allow]}
        await send(message)

    return cors_send


class _BodyMeter:
    """``receive`` for a body of unknown length: counts it, and once it passes ``limit`` tells the app the client
    left (so the app drops what it read, as for any client that leaves); the guard then answers 413."""

    def __init__(self, receive: Callable, limit: int) -> None:
        self.receive, self.limit = receive, limit
        self.size = 0
        self.over = False

    async def __call__(self) -> dict:
        if self.over:
            return {"type": "http.disconnect"}
        message = await self.receive()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                self.over = True
                return {"type": "http.disconnect"}
        return message


async def _read_within(receive: Callable, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` (or the client left); what was read is dropped then."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        size += len(message.get("body", b""))
        if size > limit:
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable:
    """``receive`` that gives ``body`` once, then waits on the real one (for the client's disconnect)."""
    pending = [body]

    async def replayed() -> dict:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replayed


def _tracking(send: Callable) -> tuple[Callable, Callable[[], bool]]:
    """``send``, and a function that says whether the answer has begun."""
    began = False

    async def tracked(message: dict) -> None:
        nonlocal began
        if message["type"] == "http.response.start":
            began = True
        await send(message)

    return tracked, lambda: began
