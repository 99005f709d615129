"""The OpenAI-compatible router's HTTP front end (SPEC §9), a raw ASGI callable.

    GET  /v1/models, /v1/models/<id>       answered here, from the configs
    ANY  /v1/<anything else>               routed by the body's "model" to an instance (or its replicas)
    ANY  /upstream/<name>/<path>           passed through to one instance, the body streamed both ways

Raw ASGI rather than Starlette routing, and no middleware: bench/asgi_choice.py measured Starlette's
StreamingResponse at about half the requests per second and 3/4 of the streamed events per second of the same
proxy written against ASGI directly. Nothing here may buffer or compress: each chunk from the instance is sent
on as it arrives; a stream's chunks go through the server's ``ChunkWriter`` where it offers one (the daemon's
``api.http_protocol``), past ``send`` and its per-message checks (issue 14). When served on its own (tests,
bench), the app's lifespan starts and stops the router; the daemon mounts it under its own app and calls
``router.startup()``/``shutdown()`` itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

from llama_orchestrator.api.http_protocol import CHUNK_WRITER, ChunkWriter
from llama_orchestrator.domain.routing import error_body
from llama_orchestrator.services.router import RouteError, Router
from llama_orchestrator.services.upstream import Answer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Served on its own (tests, bench); the daemon passes api.max_body_mb and checks it before the proxy sees a byte.
MAX_BODY = 16 * 1024 * 1024
_JSON = [(b"content-type", b"application/json")]


class ProxyApp:
    """The router's ASGI app, and its ``/v1`` lane (``v1_lane``) for the server's protocol to answer plain
    requests without ASGI (``api.http_protocol.LaneCycle``)."""

    def __init__(self, router: Router, max_body: int) -> None:
        self.router, self.max_body = router, max_body
        self.v1_lane = V1Lane(router, max_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await _http(self.router, scope, receive, send, self.max_body)
        elif kind == "lifespan":
            await _lifespan(self.router, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})


def make_proxy_app(router: Router, *, max_body: int = MAX_BODY) -> ProxyApp:
    return ProxyApp(router, max_body)


class V1Lane:
    """Which requests the server's protocol may answer straight from the router (issue 14: a relay as lean as
    nginx), and how: the same ``_http`` as the ASGI app, with the request already parsed and whole.

    It takes what the ASGI path would only pass along: a POST to ``/v1/...`` (not ``/v1/models``) with a
    ``Content-Length`` within the limit, no chunked body and no %-escape in the path. ``admits`` (the daemon's
    app: ``api.server``) adds what its guard and key check would ask; a request either refuses goes the ASGI way,
    which answers the refusal."""

    def __init__(
        self, router: Router, max_body: int, admits: Callable[[list[tuple[bytes, bytes]]], bool] | None = None
    ) -> None:
        self.router, self.max_body, self.admits = router, max_body, admits

    def admitting(self, admits: Callable[[list[tuple[bytes, bytes]]], bool], max_body: int) -> V1Lane:
        """This lane behind ``admits``, for bodies within ``max_body`` too (the daemon's guard's limit)."""
        return V1Lane(self.router, min(self.max_body, max_body), admits)

    def takes(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        if not url.startswith(b"/v1/") or url.startswith(b"/v1/models") or not url.isascii():
            return False
        if b"%" in url or b"#" in url:  # the ASGI path decodes escapes and drops a fragment
            return False
        length = None
        for name, value in headers:  # names in lower case (the server's parser)
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                return False
        if length is None or not length.isdigit() or int(length) > self.max_body:
            return False
        return self.admits is None or self.admits(headers)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _http(self.router, scope, receive, send, self.max_body)


async def _http(router: Router, scope: Scope, receive: Receive, send: Send, max_body: int) -> None:
    path: str = scope["path"]
    method: str = scope["method"]
    # Forwarded as the client wrote it: the decoded path would turn an escaped %2F into a real slash.
    raw = (scope.get("raw_path") or path.encode()).decode("latin-1")
    query = scope.get("query_string") or b""
    suffix = "?" + query.decode("latin-1") if query else ""
    target = raw + suffix
    if path.startswith("/upstream/"):
        name = path[len("/upstream/") :].partition("/")[0]
        rest_target = "/" + raw[len("/upstream/") :].partition("/")[2] + suffix
        await _guarded(
            scope,
            receive,
            send,
            lambda watch: _passthrough(router, name, method, rest_target, scope, receive, send, watch),
        )
        return
    if not path.startswith("/v1/"):
        await _error(
            send, 404, f"no route for {path}: use /v1/... or /upstream/<instance>/...", "not_found_error", "not_found"
        )
        return
    if path == "/v1/models" or path.startswith("/v1/models/"):
        await _models(router, path, method, send)
        return
    try:
        body = await _read_body(receive, max_body)
    except _ClientGone:
        return
    if body is None:
        await _error(
            send, 413, f"request body over {max_body / (1024 * 1024):g} MiB", "invalid_request_error", "body_too_large"
        )
        return
    model = _model_of(body)
    if model is _BAD:
        await _error(send, 400, "the body is not a JSON object", "invalid_request_error", "invalid_json")
        return
    await _guarded(
        scope, receive, send, lambda watch: _forward(router, model, method, target, scope, body, send, watch)
    )


# -- routes ------------------------------------------------------------------------------------------------------


async def _models(router: Router, path: str, method: str, send: Send) -> None:
    if method not in ("GET", "HEAD"):
        await _error(
            send, 405, f"{method} {path} is not allowed: use GET", "invalid_request_error", "method_not_allowed"
        )
        return
    models = await router.models()
    if path == "/v1/models":
        await _json(send, 200, {"object": "list", "data": models})
        return
    wanted = path[len("/v1/models/") :]
    found = next((m for m in models if m["id"] == wanted), None)
    if found is None:
        known = ", ".join(m["id"] for m in models) or "none"
        await _error(
            send, 404, f"model {wanted!r} not found; known models: {known}", "invalid_request_error", "model_not_found"
        )
        return
    await _json(send, 200, found)


async def _forward(
    router: Router, model: str | None, method: str, target: str, scope: Scope, body: bytes, send: Send, watch: _Watch
) -> None:
    watch.arm()
    try:
        upstream = await router.forward(model, method, target, scope["headers"], body)
    except RouteError as error:
        await send({"type": "http.response.start", "status": error.status, "headers": error.headers()})
        await send({"type": "http.response.body", "body": error.body()})
        return
    await _relay(upstream, scope, send, watch)


async def _passthrough(
    router: Router, name: str, method: str, target: str, scope: Scope, receive: Receive, send: Send, watch: _Watch
) -> None:
    headers = scope["headers"]
    has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in headers) and not any(
        k == b"content-length" and v.strip() == b"0" for k, v in headers
    )
    if has_body:
        body: Any = _stream_body(receive, watch)
    else:
        body = None
        watch.arm()
    try:
        upstream = await router.passthrough(name, method, target, headers, body)
    except RouteError as error:
        await send({"type": "http.response.start", "status": error.status, "headers": error.headers()})
        await send({"type": "http.response.body", "body": error.body()})
        return
    await _relay(upstream, scope, send, watch)


async def _relay(upstream: Answer, scope: Scope, send: Send, watch: _Watch) -> None:
    client_gone = False

    async def emit(message: Message) -> None:
        nonlocal client_gone
        try:
            await send(message)
        except OSError:
            client_gone = True  # the server noticed the client gone before our listener did
            raise

    try:
        try:
            # (the upstream's headers as they go back: no hop-by-hop and no CORS ones, see services.upstream)
            await emit({"type": "http.response.start", "status": upstream.status, "headers": upstream.headers})
            if upstream.small:
                await emit({"type": "http.response.body", "body": await upstream.read()})
                return
            writer = scope.get("extensions", {}).get(CHUNK_WRITER) if upstream.event_stream else None
            await upstream.relay(send, writer if writer is not None and writer.ready() else None)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            client_gone = client_gone or upstream.send_failed
            if client_gone or not upstream.event_stream:
                raise  # a cut connection is the honest answer for a broken non-stream body
            # A stream that breaks half way ends with an error event, as llama-server reports its own errors.
            event = json.dumps(
                error_body(
                    f"instance {upstream.instance!r} failed mid-stream: {exc}", "server_error", "upstream_failed"
                )
            )
            await emit({"type": "http.response.body", "body": b"data: " + event.encode() + b"\n\n", "more_body": True})
        await emit({"type": "http.response.body", "body": b""})
    finally:
        # After the answer's last bytes, so the accounting (the token count parses the answer) is not part of
        # the latency; nothing else runs on this loop in between, so /metrics still never lags behind what a
        # client has seen. Cancelled (the client left) or a failed send: close() drops the upstream connection,
        # which is what makes llama-server stop generating and free the slot.
        await upstream.close(client_gone=client_gone or watch.gone)


# -- client disconnects ------------------------------------------------------------------------------------------


class _Watch:
    """Cancels the request's task when the client disconnects, so the upstream request is cancelled with it.

    It may only listen once the request body has been read (both would call ``receive``): ``arm()`` then. With
    the server's ``ChunkWriter`` it is told by the connection itself (``on_lost``), with no task listening on
    ``receive()`` for each request.
    """

    def __init__(self, receive: Receive, task: asyncio.Task, writer: ChunkWriter | None = None) -> None:
        self._receive, self._task, self._writer = receive, task, writer
        self._listener: asyncio.Task | None = None
        self.gone = False
        self.finished = False

    def arm(self) -> None:
        if self.finished:
            return
        writer = self._writer
        if writer is not None:
            if writer.gone():
                self.client_left()  # it left while we read its body
            else:
                writer.on_lost = self.client_left
        elif self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                break
        self.client_left()

    def client_left(self) -> None:
        if not self.finished and not self.gone:
            self.gone = True
            self._task.cancel()

    def close(self) -> None:
        self.finished = True
        if self._writer is not None:
            self._writer.on_lost = None
        if self._listener is not None:
            self._listener.cancel()


async def _guarded(scope: Scope, receive: Receive, send: Send, work: Callable[[_Watch], Awaitable[None]]) -> None:
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("the proxy runs in a task of the ASGI server")
    watch = _Watch(receive, task, scope.get("extensions", {}).get(CHUNK_WRITER))
    try:
        await work(watch)
    except asyncio.CancelledError:
        if not watch.gone:
            raise  # the server is shutting down: not ours to swallow
        task.uncancel()  # the client left; the upstream request was cancelled with us
    finally:
        watch.close()


# -- helpers -----------------------------------------------------------------------------------------------------

_BAD = object()


def _model_of(body: bytes) -> Any:
    if not body.strip():
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return _BAD
    if not isinstance(payload, dict):
        return _BAD
    model = payload.get("model")
    return model if isinstance(model, str) and model else None


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive, max_body: int) -> bytes | None:
    """The whole body, or None past ``max_body`` (what was read is dropped at once)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone  # nobody to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _stream_body(receive: Receive, watch: _Watch) -> AsyncIterator[bytes]:
    # aiohttp writes the body from a task of its own: a client that leaves cancels the request's task instead.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            watch.client_left()
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body"):
            watch.arm()
            return


async def _json(send: Send, status: int, payload: Any) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def _error(send: Send, status: int, message: str, type_: str, code: str) -> None:
    await _json(send, status, error_body(message, type_, code))


async def _lifespan(router: Router, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await router.startup()
            except Exception as exc:  # noqa: BLE001 - reported to the server, which refuses to start
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await router.shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
