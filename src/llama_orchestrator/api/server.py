"""The daemon's HTTP front: one ASGI app, served by uvicorn on a thread of the daemon.

Paths and who may call them (``Authorization: Bearer <key>``, keys compared in constant time):

* ``/v1/...``, ``/upstream/...``: the OpenAI-compatible router (``api.proxy``); one of ``api.api_keys`` when any
  is set.
* ``/api/...``: the control API (``api.control``); one of ``api.effective_control_keys`` (the control keys, else the
  API keys) when any is set.
* ``/metrics``: any of those keys when any is set (Prometheus can send a bearer token).
* ``/healthz``, ``/openapi.json``, ``/docs``, ``/ui/``: open; they reveal nothing and let load balancers and
  browsers in (the web page at ``/ui/`` asks for the key and sends it on its ``/api`` and ``/v1`` calls).

Settings refuse a bind beyond loopback without keys, so keys are always required there. The router's ``startup`` and
``shutdown`` run in the ASGI lifespan, on the server's event loop.

Before any of that, every request passes ``api.guard.RequestGuard``: Host and Origin (DNS rebinding, cross-origin
pages), the body limit, and the content type of state-changing control calls. A plain OpenAI POST that the guard
and the key check would let through untouched (no Origin, a Host served, a sized body within the limit, the key)
is answered by the proxy's ``/v1`` lane from the server's protocol without the ASGI cycle
(``OrchestratorApp._lane_admits``, ``api.http_protocol.LaneCycle``); anything else takes the guarded way.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from llama_orchestrator import __version__
from llama_orchestrator.api.control import install_error_handlers, make_control_router
from llama_orchestrator.api.guard import RequestGuard, send_json
from llama_orchestrator.api.metrics import CONTENT_TYPE, render_metrics
from llama_orchestrator.api.schemas import GUARD_STATUSES, error_responses
from llama_orchestrator.api.web import install_web
from llama_orchestrator.domain.errors import OrchestratorError
from llama_orchestrator.domain.routing import error_body
from llama_orchestrator.domain.settings import ApiSettings
from llama_orchestrator.services.instances_port import LocalInstances

log = logging.getLogger("llama_orchestrator.api")
ROUTER_PREFIXES = ("/v1/", "/upstream/")
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})

ASGIApp = Callable[..., Any]


class ApiBindError(OrchestratorError):
    """The API's address cannot be bound (port in use, address not on this machine)."""

    in_use = False  # True: another socket holds the port (the daemon may choose another, see services.daemon)


def _zone(path: str) -> str:
    if path == "/v1" or path.startswith(ROUTER_PREFIXES):
        return "router"
    if path in OPEN_PATHS or path == "/ui" or path.startswith("/ui/"):  # the web page's files (api.web)
        return "open"
    if path == "/metrics":
        return "metrics"
    return "control"


def bearer_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def key_matches(given: str | None, keys: list[str]) -> bool:
    """Constant time over every key: neither the match nor its position shows in the timing."""
    if given is None:
        return False
    candidate = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key.encode())
    return found


class OrchestratorApp:
    """The ASGI entry point: lifespan (router startup/shutdown), the request guard, key checks, then the router or
    the control app."""

    def __init__(self, control: ASGIApp, proxy: ASGIApp | None, settings: ApiSettings, router: Any | None) -> None:
        self.control = control
        self.proxy = proxy
        self.router = router
        self.keys = {
            "router": list(settings.api_keys),
            "control": list(settings.effective_control_keys),
            "metrics": list(dict.fromkeys([*settings.api_keys, *settings.effective_control_keys])),
            "open": [],
        }
        self.shutting_down = threading.Event()
        self.router_error: str | None = None if proxy is not None else "the router is not available in this build"
        self.settings = settings
        self.guard = RequestGuard(settings)
        # The server's protocol answers plain /v1 requests through the proxy's lane (api.http_protocol) once
        # they pass what the guard and the key check would ask of them here; its bodies within the guard's limit.
        lane = getattr(proxy, "v1_lane", None)
        self.v1_lane = lane.admitting(self._lane_admits, self.guard.max_body) if lane is not None else None

    def _lane_admits(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """A request the guard and the key check would let through untouched (the lane has checked its size)."""
        if self.router_error is not None or self.proxy is None or not self.guard.passes_untouched(headers):
            return False
        keys = self.keys["router"]
        return not keys or key_matches(bearer_key(headers), keys)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        zone = _zone(scope.get("path", ""))

        async def dispatch(scope: dict, receive: Callable, send: Callable) -> None:
            await self._dispatch(zone, scope, receive, send)

        await self.guard(zone, scope, receive, send, dispatch)

    async def _dispatch(self, zone: str, scope: dict, receive: Callable, send: Callable) -> None:
        keys = self.keys[zone]
        if keys and not key_matches(bearer_key(scope.get("headers", [])), keys):
            if scope["type"] != "http":
                await send({"type": "websocket.close", "code": 1008})
                return
            which = "an API key" if zone == "router" else "a control key"
            message = f"missing or wrong API key: send `Authorization: Bearer <key>` with {which}"
            await send_json(
                send,
                401,
                error_body(message, "authentication_error", "missing_or_wrong_key"),
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if zone == "router":
            if self.router_error is not None or self.proxy is None:
                message = self.router_error or "the router is not available in this build"
                await send_json(send, 503, error_body(message, "server_error", "router_unavailable"))
                return
            await self.proxy(scope, receive, send)
            return
        await self.control(scope, receive, send)

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.router is not None:
                        await self.router.startup()
                except Exception as exc:  # the control API and supervision carry on without it
                    # A broken router must not take supervision and the control API down with it: /v1 and
                    # /upstream answer 503 with the reason, which daemon.log records with its traceback.
                    log.exception("the router did not start; /v1 and /upstream answer 503")
                    self.router_error = f"the router did not start: {exc} (see daemon.log)"
                    self.router = None
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.shutting_down.set()
                try:
                    if self.router is not None:
                        await self.router.shutdown()
                except Exception:  # shutting down anyway
                    log.exception("router shutdown failed")
                await send({"type": "lifespan.shutdown.complete"})
                return


def make_app(
    instances: LocalInstances,
    settings: ApiSettings,
    *,
    router: Any | None = None,
    proxy: ASGIApp | None = None,
    daemon: Callable[[], dict[str, Any]] | None = None,
) -> OrchestratorApp:
    """The whole app. ``router``: a ``services.router.Router`` (its stats feed /metrics); ``proxy``: its ASGI app,
    built from ``router`` with ``api.proxy.make_proxy_app`` when not given."""
    if proxy is None and router is not None:
        proxy = _proxy_for(router, settings.max_body_bytes)
    daemon = daemon or (lambda: {"version": __version__})
    control = FastAPI(
        title="llama-orchestrator",
        version=__version__,
        summary="Control API of the llama-orchestrator daemon; the OpenAI-compatible router is under /v1/.",
        docs_url=None,  # api.web serves /docs with its assets from the package, not a CDN
        redoc_url=None,
    )
    install_error_handlers(control)
    app = OrchestratorApp(control, proxy, settings, router)
    # Documents the bearer scheme in the schema (the Authorize button of /docs); the check itself is above.
    bearer = HTTPBearer(auto_error=False, description="a control key (api.control_keys, else api.api_keys)")
    control.include_router(make_control_router(instances, daemon, app.shutting_down), dependencies=[Depends(bearer)])
    install_web(
        control,
        instances,
        stats=lambda: app.router.stats() if app.router is not None else {},
        shutting_down=app.shutting_down,
        dependencies=[Depends(bearer)],
    )

    @control.get("/healthz", tags=["daemon"], summary="Liveness of the daemon's HTTP server (no key needed)")
    async def healthz() -> dict[str, Any]:
        # async: answered on the event loop, never queued behind busy worker threads
        return {"status": "ok", "version": __version__}

    @control.get(
        "/api/nodes",
        tags=["nodes"],
        summary="The peer nodes as this router sees them: state, models, latency, requests (issue 12)",
        dependencies=[Depends(bearer)],
        responses=error_responses(*GUARD_STATUSES),
    )
    async def nodes() -> list[dict[str, Any]]:
        peers = getattr(app.router, "peers", None) if app.router is not None else None
        return peers.snapshot() if peers is not None else []

    @control.get(
        "/metrics",
        tags=["daemon"],
        summary="Prometheus metrics of every instance",
        response_class=Response,
        dependencies=[Depends(bearer)],
    )
    async def metrics() -> Response:
        records = await run_in_threadpool(instances.ps)
        stats: dict[str, Any] = {}
        router_now = None
        totals: dict[str, Any] = {}
        if app.router is not None:
            try:
                stats = dict(app.router.stats())
                clock = getattr(app.router, "clock", None)
                router_now = clock() if callable(clock) else None
                totals_of = getattr(app.router, "totals", None)
                totals = dict(totals_of()) if callable(totals_of) else {}
            except Exception:  # a scrape shows the instances even when the router's stats fail
                log.exception("router stats failed")
        text = render_metrics(records, stats, daemon(), now=time.time(), router_now=router_now, totals=totals)
        return Response(text, media_type=CONTENT_TYPE)

    return app


def _proxy_for(router: Any, max_body: int) -> ASGIApp | None:
    try:
        from llama_orchestrator.api.proxy import make_proxy_app

        return make_proxy_app(router, max_body=max_body)
    except Exception:  # supervision and the control API carry on without the router
        log.exception("api.proxy is not available: /v1 and /upstream answer 503")
        return None


def make_router(service_factory: Callable[[], Any], settings: Any, *, clock: Callable[[], float] | None = None):
    """The daemon's Router, or None in a build without ``services.router``."""
    try:
        from llama_orchestrator.services.router import Router

        return Router(service_factory, settings) if clock is None else Router(service_factory, settings, clock=clock)
    except Exception:  # supervision and the control API carry on without the router
        log.exception("services.router is not available: /v1 and /upstream answer 503")
        return None


# -- serving --------------------------------------------------------------------------------------------------------


def url_for(host: str, port: int) -> str:
    """The URL clients on this machine use: a wildcard bind answers on loopback."""
    if host in ("0.0.0.0", "", "*"):  # noqa: S104 - a comparison: which address answers a wildcard bind
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a taken port is a clear error before the daemon says it is up, and connections made
    before uvicorn runs wait in the backlog."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ApiBindError(f"cannot serve the API on {host}:{port}: {exc} (api.host in orchestrator.json)") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: a second bind must fail
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use by another program" if _in_use(exc) else exc.strerror or str(exc)
        error = ApiBindError(
            f"cannot serve the API on {host}:{port}: {reason}; choose another api.port (or set api.enabled to "
            "false) in orchestrator.json"
        )
        error.in_use = _in_use(exc)
        raise error from None
    sock.set_inheritable(False)
    return sock


def _in_use(exc: OSError) -> bool:
    import errno

    return exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1))


def _second_tick_server(config: Any) -> Any:
    """A ``uvicorn.Server`` whose main loop wakes once a second instead of ten times.

    uvicorn's loop ticks every 0.1 s to refresh its Date header (every tenth tick) and to look at ``should_exit``:
    an idle daemon's largest fixed cost. This one ticks once a second (the Date header's resolution), at the whole
    seconds of the event loop's clock, where the router's own tick is too (``services.router``: one wake for both),
    and at once when ``ring()`` (``ApiServer.stop``) tells it to exit."""
    import asyncio
    import math

    import uvicorn

    def resolve(future: asyncio.Future) -> None:
        if not future.done():
            future.set_result(None)

    class SecondTickServer(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None
        _waiting: asyncio.Future | None = None

        async def main_loop(self) -> None:
            self._loop = loop = asyncio.get_running_loop()
            while not await self.on_tick(0):  # counter 0: its Date header is refreshed on every tick
                self._waiting = woken = loop.create_future()
                if self.should_exit:  # rung before this wait began
                    break
                handle = loop.call_at(math.floor(loop.time()) + 1.0, resolve, woken)
                try:
                    await woken
                finally:
                    handle.cancel()

        def ring(self) -> None:
            """Any thread: end the wait between ticks now (``should_exit`` set first)."""
            loop, waiting = self._loop, self._waiting
            if loop is not None and waiting is not None:
                with contextlib.suppress(RuntimeError):  # its loop is closed already
                    loop.call_soon_threadsafe(resolve, waiting)

    return SecondTickServer(config)


class ApiServer:
    """uvicorn on its own thread and event loop, on a socket bound beforehand; the caller's thread keeps signals."""

    def __init__(
        self, app: ASGIApp, sock: socket.socket, *, graceful_s: float = 3.0, settings: ApiSettings | None = None
    ) -> None:
        import uvicorn

        from llama_orchestrator.api.http_protocol import head_deadline_protocol

        self.app = app
        self.sock = sock
        # The timeouts are the app's settings unless given: the daemon builds both from the same ApiSettings.
        settings = settings or getattr(app, "settings", None) or ApiSettings()
        config = uvicorn.Config(
            app,
            log_config=None,  # our handlers (daemon.log) stay; uvicorn's loggers propagate to them
            access_log=True,
            lifespan="on",
            # uvicorn takes any number of seconds for both, although its hints say int
            timeout_graceful_shutdown=graceful_s,  # type: ignore[arg-type]
            timeout_keep_alive=settings.idle_timeout,  # type: ignore[arg-type]
            http=head_deadline_protocol(settings.header_timeout) or "auto",
            server_header=False,
        )
        self.server = _second_tick_server(config)
        self.thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a failed lifespan included
            self._error = exc

    def start(self, timeout: float = 30.0) -> None:
        """Serve; returns when requests are answered. Raises OrchestratorError if it cannot start."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise OrchestratorError(f"the HTTP API did not start ({self._error!r}); see daemon.log")
            if time.monotonic() > deadline:
                self.stop()
                raise OrchestratorError(f"the HTTP API did not start within {timeout:g} s; see daemon.log")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        shutting = getattr(self.app, "shutting_down", None)
        if shutting is not None:
            shutting.set()  # open log streams end now instead of holding the shutdown
        self.server.should_exit = True
        self.server.ring()  # its loop waits a second between ticks: it hears of the exit now
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(2.0)
        with contextlib.suppress(OSError):
            self.sock.close()
