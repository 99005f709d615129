"""The control API under ``/api``: list, describe, start, stop, restart, health, events, logs, daemon; and apply:
``POST /api/plan`` (what `up` would do), ``POST /api/instances/{name}/recreate``, ``POST /api/daemon/reload``.

Every endpoint is a thin call into ``LocalInstances`` (the same port the CLI uses without a daemon), so the JSON
here is exactly what `llama-orch ... --json` prints. Blocking calls (start, stop, waits, probes) are plain ``def``
endpoints: FastAPI runs them in its threadpool, off the event loop.

Errors: the project's one hierarchy is mapped to HTTP statuses in ``STATUS_OF`` and nowhere else, with the body
``{"error": {"message": ..., "type": <error class>}}``:

==========================  ======  =========================================================================
NotFoundError (instance)    404     no such instance (or model file, ...)
ConfigError                 422     the instance's config file does not load; the message lists every problem
UsageError                  400     a request that cannot be right (bad name, ``rm`` of a running instance)
StartError, StopError       409     the instance could not reach the asked state: port taken, model or binary
                                    missing, exited during start, not healthy within the timeout
InUseError                  409     a model an instance uses (``POST /api/models/remove``)
any other OrchestratorError 500
request validation          422     a query parameter of the wrong type or range (type ``invalid_request``)
==========================  ======  =========================================================================
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import anyio
import anyio.to_thread
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_orchestrator.domain.errors import (
    ConfigError,
    InUseError,
    NotFoundError,
    OrchestratorError,
    StartError,
    StopError,
    UsageError,
)
from llama_orchestrator.domain.states import ACTIVE
from llama_orchestrator.services.instances_port import STREAMS, LocalInstances

STATUS_OF: list[tuple[type[OrchestratorError], int]] = [
    (NotFoundError, 404),
    (ConfigError, 422),
    (UsageError, 400),
    (StartError, 409),
    (StopError, 409),
    (InUseError, 409),
    (OrchestratorError, 500),
]
FOLLOW_POLL_S = 0.2
EXIT_CHECK_S = 1.0
LOG_READER_THREADS = 4


def http_status(exc: OrchestratorError) -> int:
    return next(status for kind, status in STATUS_OF if isinstance(exc, kind))


def error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def install_error_handlers(app: FastAPI) -> None:
    async def orchestrator_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OrchestratorError)
        return JSONResponse(error_body(str(exc), type(exc).__name__), status_code=http_status(exc))

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse(error_body(problems, "invalid_request"), status_code=422)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(
            error_body(str(exc.detail), "http_error"),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    app.add_exception_handler(OrchestratorError, orchestrator_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)


class PlanRequest(BaseModel):
    names: list[str] = Field(description="the instances `up` names, in order")
    recreate: Literal["changed", "never", "force"] = Field(
        "changed",
        description="changed: recreate running instances whose config changed; never: --no-recreate; "
        "force: --force-recreate",
    )


class RecreateRequest(BaseModel):
    wait: bool = Field(False, description="answer once healthy (replicas and drained instances always are)")
    timeout: float = Field(120.0, gt=0, le=3600, description="seconds to wait for healthy")
    stop_timeout: float = Field(10.0, ge=0, le=3600, description="seconds to wait for a graceful stop")


def make_control_router(
    instances: LocalInstances,
    daemon_record: Callable[[], dict[str, Any]],
    shutting_down: threading.Event,
) -> APIRouter:
    """The ``/api`` routes over ``instances``. ``shutting_down`` ends open log streams when the daemon stops."""
    api = APIRouter(prefix="/api", tags=["control"])

    @api.get("/instances", summary="List instances (the records of `llama-orch ps --json`)")
    def list_instances(
        all: bool = Query(False, description="also state left by instances whose config is gone"),
    ) -> list[dict[str, Any]]:
        return instances.ps(include_orphans=all)

    @api.get("/instances/{name}", summary="Describe one instance: config, runtime state, GGUF metadata, events")
    def describe(name: str) -> dict[str, Any]:
        return instances.describe(name)

    @api.post("/instances/{name}/start", summary="Start an instance (detached) unless it runs")
    def start(
        name: str,
        wait: bool = Query(False, description="answer only when it is healthy (409 if it exits or times out)"),
        timeout: float = Query(120.0, gt=0, le=3600, description="seconds `wait` waits for healthy"),
    ) -> dict[str, Any]:
        record = instances.start(name)
        if wait:
            record["instance"] = instances.wait(name, until="healthy", timeout=timeout)
        return record

    @api.post("/instances/{name}/wait", summary="Wait until an instance is healthy, or catch an early exit")
    def wait(
        name: str,
        until: Literal["healthy", "started"] = Query(
            "healthy", description="`healthy`: answers its health check; `started`: did not exit right after start"
        ),
        timeout: float = Query(120.0, gt=0, le=3600),
    ) -> dict[str, Any]:
        return instances.wait(name, until=until, timeout=timeout)

    @api.post("/instances/{name}/stop", summary="Stop: graceful signal, then kill the tree after `timeout`")
    def stop(name: str, timeout: float = Query(10.0, ge=0, le=3600)) -> dict[str, Any]:
        return instances.stop(name, timeout)

    @api.post("/instances/{name}/restart", summary="Stop, then start again")
    def restart(
        name: str,
        timeout: float = Query(10.0, ge=0, le=3600, description="seconds to wait for a graceful stop"),
        wait: bool = Query(False, description="answer only when healthy again"),
        wait_timeout: float = Query(120.0, gt=0, le=3600),
    ) -> dict[str, Any]:
        return instances.restart(name, timeout=timeout, wait=wait, wait_timeout=wait_timeout)

    @api.get("/instances/{name}/health", summary="Probe the health endpoint now")
    def health(name: str) -> dict[str, Any]:
        return instances.health_of(name)

    @api.get("/events", summary="Events, oldest first: starts, exits, health changes, restarts")
    def events(
        instance: str | None = Query(None, description="only this instance"),
        after_id: int = Query(0, ge=0, description="only events newer than this id (for polling)"),
        limit: int = Query(50, ge=1, le=10_000),
    ) -> list[dict[str, Any]]:
        return instances.events(instance, limit=limit, after_id=after_id)

    @api.get(
        "/instances/{name}/logs",
        summary="An instance's log: the last lines, then (follow) new lines as they are written",
        response_model=None,
        responses={200: {"content": {"text/plain": {}, "text/event-stream": {}, "application/json": {}}}},
    )
    async def logs(
        request: Request,
        name: str,
        tail: int = Query(50, ge=0, description="lines from the end (0 = all)"),
        follow: bool = Query(False, description="keep the answer open and stream new lines"),
        stream: Literal["stdout", "stderr", "both"] = Query("both"),
        format: Literal["text", "sse", "json"] | None = Query(
            None, description="text/plain lines (default), server-sent events, or a JSON list (not with follow)"
        ),
        until_exit: bool = Query(False, description="with follow: end the stream when the instance has exited"),
        new_only: bool = Query(False, description="with follow: no tail, only lines written from now on (attach)"),
    ) -> Any:
        streams = STREAMS if stream == "both" else (stream,)
        paths = await run_in_threadpool(instances.log_paths, name, streams)
        if format is None:
            format = "sse" if "text/event-stream" in request.headers.get("accept", "") else "text"
        if format == "json":
            if follow:
                raise UsageError("format=json cannot follow: use text or sse")
            return await _read_logs(lambda: list(instances.logs(name, tail=tail, streams=streams)))
        lines = _follow_lines(
            instances,
            name,
            paths,
            0 if new_only else tail,
            follow,
            until_exit,
            shutting_down,
            new_only=new_only and follow,
        )
        if format == "sse":
            body = (f"event: {kind}\ndata: {line}\n\n" async for kind, line in lines)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return StreamingResponse((f"{line}\n" async for _, line in lines), media_type="text/plain; charset=utf-8")

    @api.post("/plan", summary="What `up` would do to each instance: start, recreate (config changed), leave")
    def plan(body: PlanRequest) -> list[dict[str, Any]]:
        return instances.plan(body.names, recreate=body.recreate)

    @api.post(
        "/instances/{name}/recreate",
        summary="Apply the declared config to a running instance: drain (replicas), stop, start, wait healthy",
    )
    def recreate(name: str, body: RecreateRequest | None = None) -> dict[str, Any]:
        body = body or RecreateRequest()
        return instances.recreate(name, wait=body.wait, timeout=body.timeout, stop_timeout=body.stop_timeout)

    @api.post("/daemon/reload", summary="One reconcile pass now (as SIGHUP): apply changed, new and removed configs")
    def reload() -> dict[str, Any]:
        return instances.reload()

    @api.get("/daemon", summary="The daemon: pid, version, uptime, API URL, home")
    def daemon() -> dict[str, Any]:
        return daemon_record()

    from llama_orchestrator.api.models_api import make_models_router

    api.include_router(make_models_router(instances.service.home))  # /api/models: list, pull, remove
    return api


# One limiter per event loop (a limiter belongs to the loop it was made on; tests run several daemons).
_log_readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()


async def _read_logs(function: Callable[..., Any], *args: Any) -> Any:
    """Run a log read in a worker thread, never on the event loop (a tail can scan a 50 MB line). Log reads have
    threads of their own, so many open tails cannot take the threads that start/stop and the other routes need."""
    loop = asyncio.get_running_loop()
    limiter = _log_readers.get(loop)
    if limiter is None:
        limiter = _log_readers[loop] = anyio.CapacityLimiter(LOG_READER_THREADS)
    return await anyio.to_thread.run_sync(function, *args, limiter=limiter)


async def _follow_lines(
    instances: LocalInstances,
    name: str,
    paths: list,
    tail_n: int,
    follow: bool,
    until_exit: bool,
    shutting_down: threading.Event,
    *,
    new_only: bool = False,
) -> AsyncIterator[tuple[str, str]]:
    """``(stream, line)``: the tail, then new lines until the client leaves, the instance exits (``until_exit``)
    or the daemon stops. The cursors are placed at the ends before the tail is read, so no line falls in between.
    Every file read runs in a worker thread (``_read_logs``); lines are cut at ``logfiles.LINE_CAP_BYTES``."""
    from llama_orchestrator.adapters.logfiles import LogCursor, read_new_lines, tail

    stream_of = {p: p.stem for p in paths}

    def open_and_tail() -> tuple[list[LogCursor], list[tuple[str, str]]]:
        cursors = []
        if follow:
            for path in paths:
                # new_only: at the end now (a file not there yet is read from its start when it appears)
                cursor = LogCursor(path, from_end=tail_n > 0 or (new_only and path.exists()))
                if tail_n > 0 or new_only:
                    cursor.read_lines()  # opens the file at its end
                cursors.append(cursor)
        batch: list[tuple[str, str]] = []
        if (tail_n > 0 or not follow) and not new_only:
            for path in paths:
                batch += [(stream_of[path], line) for line in tail(path, tail_n)]
        return cursors, batch[-tail_n:] if tail_n > 0 else batch

    def read_new(cursors: list[LogCursor]) -> tuple[list[tuple[str, str]], bool]:
        lines, behind = read_new_lines(cursors)
        return [(stream_of[path], line) for path, line in lines], behind

    cursors, batch = await _read_logs(open_and_tail)
    try:
        for item in batch:
            yield item
        if not follow:
            return
        next_exit_check = time.monotonic() + EXIT_CHECK_S
        while not shutting_down.is_set():
            lines, behind = await _read_logs(read_new, cursors)
            for item in lines:
                yield item
            if lines or behind:
                continue
            if until_exit and time.monotonic() >= next_exit_check:
                next_exit_check = time.monotonic() + EXIT_CHECK_S
                row = await run_in_threadpool(instances.service.refresh, name)
                if row.status not in ACTIVE:
                    lines, _ = await _read_logs(read_new, cursors)  # what it wrote just before it exited
                    for item in lines:
                        yield item
                    return
            await asyncio.sleep(FOLLOW_POLL_S)  # polling files: no portable change notification to wait on
    finally:
        for cursor in cursors:
            cursor.close()
