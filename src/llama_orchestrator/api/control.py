"""The control API under ``/api``: list, describe, start, stop, restart, health, events, logs, daemon; and apply:
``POST /api/plan`` (what `up` would do), ``POST /api/instances/{name}/recreate``, ``POST /api/daemon/reload``.

Every endpoint is a thin call into ``LocalInstances`` (the same port the CLI uses without a daemon), so the JSON
here is exactly what `llama-orch ... --json` prints. Blocking calls (start, stop, waits, probes) are plain ``def``
endpoints: FastAPI runs them in its threadpool, off the event loop.

Errors: the project's one hierarchy is mapped to HTTP statuses in ``STATUS_OF`` and nowhere else, with OpenAI's
error object as the body, ``{"error": {"message", "type", "param", "code"}}`` (``api.schemas.error_body``):

==========================  ======  =====================  ==================================================
error                       status  type / code            when
==========================  ======  =====================  ==================================================
InstanceNotFound            404     not_found_error /      no such instance
                                    instance_not_found
NotFoundError               404     ... / not_found        no such model file, reference, catalog ID
ConfigError                 422     invalid_request_error  the instance's config file does not load; the message
                                    / invalid_config       lists every problem
UsageError                  400     ... / invalid_request  a request that cannot be right (bad name, ``rm`` of a
                                                           running instance)
StartError, StopError       409     conflict_error /       the instance could not reach the asked state: port
                                    start_failed,          taken, model or binary missing, exited during start,
                                    stop_failed            not healthy within the timeout
InUseError                  409     ... / in_use           a model an instance uses (``POST /api/models/remove``)
any other OrchestratorError 500     server_error / <class  (a bug, or a failure with no better status)
                                    name in snake_case>
request validation          422     invalid_request_error  a parameter of the wrong type or range; ``param``
                                    / invalid_parameter,   names it (``body`` for a body that is not JSON)
                                    invalid_json
==========================  ======  =====================  ==================================================

Each route documents the statuses it can answer (``api.schemas.documented``), those of the request guard (401, 403,
413, and 415 for state-changing calls) included, with typed bodies; ``tests/test_openapi.py`` holds the answers to
the document.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from http import HTTPStatus
from typing import Any, Literal, cast

import anyio
import anyio.to_thread
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_orchestrator.api import schemas
from llama_orchestrator.api.schemas import GUARD_STATUSES, documented, error_body, error_responses
from llama_orchestrator.domain.errors import (
    ConfigError,
    InstanceNotFound,
    InUseError,
    NotFoundError,
    OrchestratorError,
    StartError,
    StopError,
    UsageError,
)
from llama_orchestrator.domain.states import ACTIVE
from llama_orchestrator.services.instances_port import STREAMS, LocalInstances

# The first row whose class the error is an instance of: (status, OpenAI-style type, code).
STATUS_OF: list[tuple[type[OrchestratorError], int, str, str | None]] = [
    (InstanceNotFound, 404, "not_found_error", "instance_not_found"),
    (NotFoundError, 404, "not_found_error", "not_found"),
    (ConfigError, 422, "invalid_request_error", "invalid_config"),
    (UsageError, 400, "invalid_request_error", "invalid_request"),
    (StartError, 409, "conflict_error", "start_failed"),
    (StopError, 409, "conflict_error", "stop_failed"),
    (InUseError, 409, "conflict_error", "in_use"),
    (OrchestratorError, 500, "server_error", None),  # code: the class name in snake_case
]
# Statuses Starlette answers itself (no such path, a method the path does not take), by their OpenAI-style type.
TYPE_OF_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error"}
SQLITE_MAX_INT = 2**63 - 1  # an event id is a SQLite integer: a larger one is a 422, not an overflow (500)
FOLLOW_POLL_S = 0.2
EXIT_CHECK_S = 1.0
HISTORY_BATCH = 1000  # log lines read in one worker-thread call
LOG_READER_THREADS = 4


def http_error_of(exc: OrchestratorError) -> tuple[int, str, str]:
    """``(status, type, code)`` of an error (``STATUS_OF``)."""
    status, type_, code = next((s, t, c) for kind, s, t, c in STATUS_OF if isinstance(exc, kind))
    return status, type_, code or snake_case(type(exc).__name__)


def snake_case(name: str) -> str:
    """``HubError`` -> ``hub_error``, ``Not Found`` -> ``not_found``."""
    out = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.replace(" ", "_"))
    return re.sub(r"[^a-z0-9]+", "_", out.lower()).strip("_")


def install_error_handlers(app: FastAPI) -> None:
    """Every error answered in one body (``ErrorBody``), and the document saying so (``_document_validation``)."""

    async def orchestrator_error(_: Request, exc: Exception) -> JSONResponse:
        status, type_, code = http_error_of(cast(OrchestratorError, exc))  # registered for that class
        return JSONResponse(error_body(str(exc), type_, code), status_code=status)

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        errors = list(cast(RequestValidationError, exc).errors())
        problems = "; ".join(f"{_where(e)}: {_what(e)}" for e in errors)
        code = "invalid_json" if any(e["type"] == "json_invalid" for e in errors) else "invalid_parameter"
        body = error_body(problems, "invalid_request_error", code, _where(errors[0]) if errors else None)
        return JSONResponse(body, status_code=422)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        http = cast(StarletteHTTPException, exc)
        status = http.status_code
        type_ = TYPE_OF_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return JSONResponse(
            error_body(str(http.detail), type_, _status_code(status)),
            status_code=status,
            headers=getattr(http, "headers", None),
        )

    app.add_exception_handler(OrchestratorError, orchestrator_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    _document_validation(app)


def _status_code(status: int) -> str:
    """``405`` -> ``method_not_allowed``."""
    try:
        return snake_case(HTTPStatus(status).phrase)
    except ValueError:  # not a status the standard library knows
        return f"http_{status}"


def _where(error: Any) -> str:
    """The parameter a validation error is about: ``limit``, ``names.0``; ``body`` for a body that is no JSON."""
    location = error["loc"]
    if error["type"] == "json_invalid":
        return str(location[0])  # the rest is the character where decoding failed
    return ".".join(str(p) for p in location[1:]) or str(location[0])


def _what(error: Any) -> str:
    if error["type"] == "json_invalid" and len(error["loc"]) > 1:
        return f"{error['msg']} at character {error['loc'][1]}"
    return str(error["msg"])


def _document_validation(app: FastAPI) -> None:
    """FastAPI documents a 422 with its own body (``HTTPValidationError``) on every route that takes parameters;
    ``invalid_request`` answers ``ErrorBody`` instead. So the document says that, and drops the 422 where no
    validation can fail (a route whose only parameters are plain string path segments)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()  # built once, then FastAPI's cached dict: fixed in place the first time
        for item in document.get("paths", {}).values():
            for operation in item.values():
                responses = operation.get("responses", {})
                if "HTTPValidationError" not in str(responses.get("422", "")):
                    continue
                if _cannot_fail(operation):
                    del responses["422"]
                else:
                    responses["422"] = {
                        "description": schemas.ERROR_STATUSES[422],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                    }
        for unused in ("HTTPValidationError", "ValidationError"):
            document.get("components", {}).get("schemas", {}).pop(unused, None)
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def _cannot_fail(operation: dict[str, Any]) -> bool:
    plain = {"type": "string"}
    return "requestBody" not in operation and all(
        p.get("in") == "path" and {k: v for k, v in p.get("schema", {}).items() if k != "title"} == plain
        for p in operation.get("parameters", [])
    )


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
    api = APIRouter(prefix="/api", tags=["control"], responses=error_responses(*GUARD_STATUSES))

    @api.get(
        "/instances",
        summary="List instances (the records of `llama-orch ps --json`)",
        **documented(list[schemas.ListedInstance], 422),
    )
    def list_instances(
        include_orphans: bool = Query(
            False, alias="all", description="also state left by instances whose config is gone"
        ),
    ) -> list[dict[str, Any]]:
        return instances.ps(include_orphans=include_orphans)

    @api.get(
        "/instances/{name}",
        summary="Describe one instance: config, runtime state, GGUF metadata, events",
        **documented(schemas.InstanceDetail, 400, 404),
    )
    def describe(name: str) -> dict[str, Any]:
        return instances.describe(name)

    @api.get(
        "/instances/{name}/runtime",
        summary="An instance's recorded state, last health check and config as loaded: cheap to poll (no probe, "
        "no model file read; the dashboard's detail)",
        **documented(schemas.InstanceRuntime, 400, 404),
    )
    def runtime(name: str) -> dict[str, Any]:
        return instances.runtime(name)

    @api.post(
        "/instances/{name}/start",
        summary="Start an instance (detached) unless it runs",
        **documented(schemas.StartResult, 400, 404, 409, 422, changes=True),
    )
    def start(
        name: str,
        wait: bool = Query(False, description="answer only when it is healthy (409 if it exits or times out)"),
        timeout: float = Query(120.0, gt=0, le=3600, description="seconds `wait` waits for healthy"),
    ) -> dict[str, Any]:
        record = instances.start(name)
        if wait:
            record["instance"] = instances.wait(name, until="healthy", timeout=timeout)
        return record

    @api.post(
        "/instances/{name}/wait",
        summary="Wait until an instance is healthy, or catch an early exit",
        **documented(schemas.InstanceRecord, 400, 404, 409, 422, changes=True),
    )
    def wait(
        name: str,
        until: Literal["healthy", "started"] = Query(
            "healthy", description="`healthy`: answers its health check; `started`: did not exit right after start"
        ),
        timeout: float = Query(120.0, gt=0, le=3600),
    ) -> dict[str, Any]:
        return instances.wait(name, until=until, timeout=timeout)

    @api.post(
        "/instances/{name}/stop",
        summary="Stop: graceful signal, then kill the tree after `timeout`",
        **documented(schemas.StopResult, 400, 404, 409, 422, changes=True),
    )
    def stop(name: str, timeout: float = Query(10.0, ge=0, le=3600)) -> dict[str, Any]:
        return instances.stop(name, timeout)

    @api.post(
        "/instances/{name}/restart",
        summary="Stop, then start again",
        **documented(schemas.RestartResult, 400, 404, 409, 422, changes=True),
    )
    def restart(
        name: str,
        timeout: float = Query(10.0, ge=0, le=3600, description="seconds to wait for a graceful stop"),
        wait: bool = Query(False, description="answer only when healthy again"),
        wait_timeout: float = Query(120.0, gt=0, le=3600),
    ) -> dict[str, Any]:
        return instances.restart(name, timeout=timeout, wait=wait, wait_timeout=wait_timeout)

    @api.get(
        "/instances/{name}/health",
        summary="Probe the health endpoint now",
        **documented(schemas.HealthResult, 400, 404, 422),
    )
    def health(name: str) -> dict[str, Any]:
        return instances.health_of(name)

    @api.get(
        "/events",
        summary="Events, oldest first: starts, exits, health changes, restarts",
        **documented(list[schemas.Event], 400, 422),
    )
    def events(
        instance: str | None = Query(None, description="only this instance"),
        after_id: int = Query(0, ge=0, le=SQLITE_MAX_INT, description="only events newer than this id (for polling)"),
        limit: int = Query(50, ge=1, le=10_000),
    ) -> list[dict[str, Any]]:
        return instances.events(instance, limit=limit, after_id=after_id)

    @api.get(
        "/instances/{name}/logs",
        summary="An instance's log: the last lines, then (follow) new lines as they are written",
        response_model=None,
        responses={
            200: {
                "description": "text/plain: one line a line; text/event-stream: an event named after its stream "
                "(stdout, stderr) a line; application/json (format=json): the lines as a list",
                "content": {
                    "text/plain": {"schema": {"type": "string"}},
                    "text/event-stream": {"schema": schemas.sse_event({"enum": ["stdout", "stderr"]}, "a line")},
                    "application/json": {"schema": {"type": "array", "items": {"type": "string"}}},
                },
            },
            **error_responses(400, 404, 422),
        },
    )
    async def logs(
        request: Request,
        name: str,
        tail: int = Query(50, ge=0, description="lines from the end (0 = all)"),
        follow: bool = Query(False, description="keep the answer open and stream new lines"),
        stream: Literal["stdout", "stderr", "both"] = Query("both"),
        as_format: Literal["text", "sse", "json"] | None = Query(
            None,
            alias="format",
            description="text/plain lines (default), server-sent events, or a JSON list (not with follow)",
        ),
        until_exit: bool = Query(False, description="with follow: end the stream when the instance has exited"),
        new_only: bool = Query(False, description="with follow: no tail, only lines written from now on (attach)"),
        since: str | None = Query(
            None,
            description="only lines written from then on: a duration back (10m, 1h30m), Unix seconds, or an "
            "RFC 3339 time (zone-less: the daemon's local time). A line's time is when the daemon saw it written, "
            "within about a second",
        ),
        until: str | None = Query(
            None, description="only lines written up to then (same forms as since); with follow, until it passes"
        ),
        timestamps: bool = Query(False, description="each line starts with its RFC 3339 UTC time and a space"),
    ) -> Any:
        from llama_orchestrator.domain.timespec import BadTime, parse_range

        streams = STREAMS if stream == "both" else (stream,)
        try:
            since_ts, until_ts = parse_range(since, until, time.time())
        except BadTime as exc:
            raise UsageError(str(exc)) from None
        paths = await run_in_threadpool(instances.log_paths, name, streams)
        if as_format is None:
            as_format = "sse" if "text/event-stream" in request.headers.get("accept", "") else "text"
        if as_format == "json":
            if follow:
                raise UsageError("format=json cannot follow: use text or sse")
            return await _read_logs(
                lambda: list(
                    instances.logs(
                        name, tail=tail, streams=streams, since=since_ts, until=until_ts, timestamps=timestamps
                    )
                )
            )
        lines = _follow_lines(
            instances,
            name,
            paths,
            0 if new_only else tail,
            follow,
            until_exit,
            shutting_down,
            new_only=new_only and follow,
            since=since_ts,
            until=until_ts,
            timestamps=timestamps,
        )
        if as_format == "sse":
            body = (f"event: {kind}\ndata: {line}\n\n" async for kind, line in lines)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return StreamingResponse((f"{line}\n" async for _, line in lines), media_type="text/plain; charset=utf-8")

    @api.post(
        "/plan",
        summary="What `up` would do to each instance: start, recreate (config changed), leave",
        **documented(list[schemas.PlanEntry], 400, 404, 422, changes=True),
    )
    def plan(body: PlanRequest) -> list[dict[str, Any]]:
        return instances.plan(body.names, recreate=body.recreate)

    @api.post(
        "/instances/{name}/recreate",
        summary="Apply the declared config to a running instance: drain (replicas), stop, start, wait healthy",
        **documented(schemas.RecreateResult, 400, 404, 409, 422, changes=True),
    )
    def recreate(name: str, body: RecreateRequest | None = None) -> dict[str, Any]:
        body = body or RecreateRequest()
        return instances.recreate(name, wait=body.wait, timeout=body.timeout, stop_timeout=body.stop_timeout)

    @api.post(
        "/daemon/reload",
        summary="One reconcile pass now (as SIGHUP): apply changed, new and removed configs",
        **documented(schemas.ReloadResult, 400, changes=True),
    )
    def reload() -> dict[str, Any]:
        return instances.reload()

    @api.get("/daemon", summary="The daemon: pid, version, uptime, API URL, home", **documented(schemas.DaemonInfo))
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
    since: float | None = None,
    until: float | None = None,
    timestamps: bool = False,
) -> AsyncIterator[tuple[str, str]]:
    """``(stream, line)``: the tail (from ``since`` to ``until``, in time order), then new lines until the client
    leaves, the instance exits (``until_exit``), ``until`` passes or the daemon stops. The cursors are placed at the
    ends before the tail is read, so no line falls in between. Every file read runs in a worker thread
    (``_read_logs``); lines are cut at ``logfiles.LINE_CAP_BYTES``. A new line's time is when it was read."""
    from itertools import islice

    from llama_orchestrator.adapters.log_times import TimedLine, timed_lines
    from llama_orchestrator.adapters.logfiles import LogCursor, read_new_lines
    from llama_orchestrator.domain.log_times import shown_line

    stream_of = {p: p.stem for p in paths}

    def open_and_tail() -> tuple[list[LogCursor], Iterator[TimedLine]]:
        cursors = []
        if follow:
            for path in paths:
                # At the end now, the history is read below (a file not there yet is read from its start when it
                # appears)
                cursor = LogCursor(path, from_end=path.exists())
                cursor.read_lines()  # opens the file at its end
                cursors.append(cursor)
        history = iter(()) if new_only else timed_lines(paths, tail=tail_n, since=since, until=until)
        return cursors, history

    def next_batch(history: Iterator[TimedLine]) -> list[tuple[str, str]]:
        # In pieces: `--tail 0` of a 50 MB log is streamed, never held whole.
        return [
            (stream_of[line.path], shown_line(line.text, line.time, timestamps=timestamps))
            for line in islice(history, HISTORY_BATCH)
        ]

    def read_new(cursors: list[LogCursor]) -> tuple[list[tuple[str, str]], bool]:
        lines, behind = read_new_lines(cursors)
        moment = time.time()
        if (since is not None and moment < since) or (until is not None and moment > until):
            return [], behind
        return [(stream_of[path], shown_line(line, moment, timestamps=timestamps)) for path, line in lines], behind

    cursors, history = await _read_logs(open_and_tail)
    try:
        while batch := await _read_logs(next_batch, history):
            for item in batch:
                yield item
        if not follow:
            return
        next_exit_check = time.monotonic() + EXIT_CHECK_S
        while not shutting_down.is_set() and (until is None or time.time() <= until):
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
