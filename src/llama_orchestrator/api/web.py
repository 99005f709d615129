"""The web dashboard's side of the daemon (issue 13): the page's files under ``/ui/``, ``/docs`` with its assets
shipped in the package (no CDN; ``/redoc`` is off, its page loads a logo from one), and ``GET /api/stream``, the
live feed the page reads.

* ``/ui/...``: static files from ``llama_orchestrator/web/static`` (no key: they reveal nothing, and a browser
  cannot send a bearer when it navigates; the page asks for the key and sends it on every ``/api`` and ``/v1``
  call). The Host rule applies as everywhere. Every answer carries a Content-Security-Policy that allows nothing
  but this origin, ``X-Content-Type-Options: nosniff`` and ``Cache-Control`` (``no-cache`` + ETag: a daemon
  upgrade is seen at the next load).
* ``/api/stream``: server-sent events, one ``snapshot`` a second: the ``ps`` records with CPU, memory, requests and
  tokens per second, and the events since the last one. It is under ``/api``, so it takes a control key; the page
  reads it with ``fetch`` (an ``EventSource`` cannot send ``Authorization``), so no key ever sits in a URL. The
  records are built in a worker thread; the router's counters are read on the event loop, where they change.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import mimetypes
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llama_orchestrator.adapters.usage import PsutilSampler
from llama_orchestrator.api.schemas import GUARD_STATUSES, error_body, error_responses, sse_event
from llama_orchestrator.services.instances_port import LocalInstances

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"
SWAGGER = "/ui/vendor/swagger-ui"
STREAM_INTERVAL_S = 1.0
FIRST_EVENTS = 30

# Nothing but this origin: no CDN, no remote fonts, no inline code. ``data:`` images only (the favicon, SVG icons).
UI_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# FastAPI's /docs page starts their bundles with an inline script: still no remote origin.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}


def security_headers(csp: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }


def static_file(relative: str) -> Path | None:
    """The file under STATIC_DIR that ``relative`` names, or None (missing, a folder, outside it, unknown type)."""
    candidate = (STATIC_DIR / relative).resolve()
    if not candidate.is_relative_to(STATIC_DIR) or not candidate.is_file():
        return None
    if candidate.suffix not in CONTENT_TYPES:
        return None
    return candidate


def file_response(path: Path, request: Request) -> Response:
    stat = path.stat()
    digest = hashlib.sha1(f"{stat.st_mtime_ns}-{stat.st_size}".encode(), usedforsecurity=False).hexdigest()
    etag = f'"{digest[:16]}"'
    headers = {**security_headers(UI_CSP), "Cache-Control": "no-cache", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    media = CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return Response(path.read_bytes(), media_type=media, headers=headers)


def not_found() -> Response:
    body = json.dumps(error_body("no such file under /ui/", "not_found_error", "not_found"))
    return Response(body, status_code=404, media_type="application/json", headers=security_headers(UI_CSP))


# -- the live feed -------------------------------------------------------------------------------------------------


class Rates:
    """Requests and completion tokens per second per instance, from the router's counters between two snapshots."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int, int]] = {}

    def update(self, stats: dict[str, Any], now: float) -> dict[str, dict[str, Any]]:
        rates: dict[str, dict[str, Any]] = {}
        for name, s in stats.items():
            requests = sum(getattr(s, "requests_total", {}).values())
            tokens = int(getattr(s, "completion_tokens_total", 0))
            before = self._last.get(name)
            self._last[name] = (now, requests, tokens)
            rps = tps = None
            if before is not None and now > before[0]:
                elapsed = now - before[0]
                rps = round(max(0, requests - before[1]) / elapsed, 2)
                tps = round(max(0, tokens - before[2]) / elapsed, 1)
            rates[name] = {
                "requests_per_s": rps,
                "tokens_per_s": tps,
                "requests_total": requests,
                "tokens_total": tokens,
                "in_flight": getattr(s, "in_flight", 0),
                "queued": getattr(s, "queued", 0),
            }
        return rates


def collect(instances: LocalInstances, sampler: PsutilSampler, after_id: int, first: bool) -> dict[str, Any]:
    """Blocking (SQLite, /proc): run in a worker thread. The ps records with usage, and events after ``after_id``."""
    records = instances.ps()
    alive: set[tuple[int, float | None]] = set()
    for record in records:
        record["cpu_percent"] = record["memory_bytes"] = None
        if record.get("pid"):
            row = instances.service.store.get(record["name"])
            create_time = row.create_time if row is not None else None
            alive.add((record["pid"], create_time))
            usage = sampler.sample(record["pid"], create_time)
            record["cpu_percent"] = None if usage.cpu_percent is None else round(usage.cpu_percent, 1)
            record["memory_bytes"] = usage.memory_bytes
    sampler.keep_only(alive)
    events = instances.events(limit=FIRST_EVENTS if first else 1000, after_id=after_id)
    return {"instances": records, "events": events}


async def snapshots(
    instances: LocalInstances,
    stats: Callable[[], dict[str, Any]],
    shutting_down: threading.Event,
    interval: float,
) -> AsyncIterator[str]:
    sampler, rates = PsutilSampler(), Rates()
    after_id, first = 0, True
    yield "retry: 2000\n\n"
    while not shutting_down.is_set():
        data = await run_in_threadpool(collect, instances, sampler, after_id, first)
        now = time.time()
        try:
            per_instance = rates.update(stats(), time.monotonic())  # on the loop: the router mutates it there
        except Exception:  # noqa: BLE001 - the page still shows the instances when the router's stats fail
            per_instance = {}
        for record in data["instances"]:
            record.update(per_instance.get(record["name"], {}))
        if data["events"]:
            after_id = max(after_id, max(e["id"] for e in data["events"]))
        data["time"] = now
        first = False
        yield f"event: snapshot\ndata: {json.dumps(data, default=str)}\n\n"
        await asyncio.sleep(interval)


# -- wiring ---------------------------------------------------------------------------------------------------------


def install_web(
    control: FastAPI,
    instances: LocalInstances,
    *,
    stats: Callable[[], dict[str, Any]],
    shutting_down: threading.Event,
    dependencies: list[Any],
) -> None:
    """Add /ui, /docs and /api/stream to ``control`` (built with ``docs_url=None, redoc_url=None``)."""
    pages = APIRouter(include_in_schema=False)

    @pages.get("/ui")
    async def ui_root() -> Response:
        return RedirectResponse("/ui/", status_code=308)

    @pages.get("/ui/")
    async def ui_index(request: Request) -> Response:
        return await ui_file(request, "index.html")

    @pages.get("/ui/{relative:path}")
    async def ui_file(request: Request, relative: str) -> Response:
        path = static_file(relative)
        return not_found() if path is None else await run_in_threadpool(file_response, path, request)

    @pages.get("/docs")
    async def docs() -> Response:
        page = get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{control.title} - API docs",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url="/ui/favicon.svg",
        )
        page.headers.update(security_headers(DOCS_CSP))
        return page

    @pages.get("/docs/oauth2-redirect")
    async def oauth2_redirect() -> Response:
        return get_swagger_ui_oauth2_redirect_html()

    control.include_router(pages)

    api = APIRouter(
        prefix="/api", tags=["control"], dependencies=dependencies, responses=error_responses(*GUARD_STATUSES)
    )

    @api.get(
        "/stream",
        summary="Live feed for the web page: a `snapshot` event a second (server-sent events)",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "`event: snapshot` a second, its data the JSON of {instances, events, time}",
                "content": {
                    "text/event-stream": {"schema": sse_event({"const": "snapshot"}, "the JSON of a snapshot")}
                },
            },
            **error_responses(422),
        },
    )
    async def stream(interval: float = Query(STREAM_INTERVAL_S, ge=0.2, le=60)) -> StreamingResponse:
        body = snapshots(instances, stats, shutting_down, interval)
        return StreamingResponse(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    control.include_router(api)
