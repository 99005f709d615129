"""The bodies of the control API (``/api``), as pydantic models: what ``/openapi.json`` documents.

They describe the plain dicts ``services.instances_port`` builds (the records `llama-orch ... --json` prints); the
routes return those dicts as they are and name these models in ``responses=`` only (``documented``), so a `ps`
through the daemon costs no second validation. ``tests/test_openapi.py`` checks the real answers against them
(schemathesis).

Errors have one shape everywhere, OpenAI's: ``{"error": {"message", "type", "param", "code"}}`` (``error_body``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llama_orchestrator.domain.routing import error_body

# -- errors --------------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong and, where there is one, what to do about it")
    type: str = Field(
        description="the category, as OpenAI's: invalid_request_error, authentication_error, permission_error, "
        "not_found_error, conflict_error, server_error"
    )
    param: str | None = Field(description="the request parameter at fault, when one is (e.g. `limit`)")
    code: str = Field(description="the kind of error, stable snake_case (e.g. instance_not_found, start_failed)")


class ErrorBody(BaseModel):
    """Every error answer of ``/api``, the request guard's refusals included."""

    error: ErrorDetail


__all__ = ["error_body"]  # re-exported: one shape for /api, /v1 and the guard's refusals (domain.routing)


# -- instances -----------------------------------------------------------------------------------------------------


class Record(BaseModel):
    """A record as the API sends it: the fields below, and maybe more (a newer daemon may add fields)."""

    model_config = ConfigDict(extra="allow")


class InstanceRecord(Record):
    """One row of `llama-orch ps --json` (``services.instances_port.ps_record``)."""

    name: str
    status: str = Field(
        description="stopped, starting, running, stopping, exited, backoff, failed; invalid-config when its config "
        "file does not load"
    )
    health: str = Field(description="unknown, loading, healthy, unhealthy")
    pid: int | None = Field(description="the server's process while it is starting, running or stopping")
    port: int | None
    host: str | None
    backend: str | None = Field(description="gpu.backend of the config (may be `auto`)")
    model: str | None = Field(description="model.path of the config")
    uptime_s: float | None
    restarts: int
    exit_code: int | None
    started_at: float | None = Field(description="Unix time of the last start")
    last_error: str | None
    autostart: bool
    aliases: list[str]
    config_changed: bool = Field(description="it runs another config than its file declares (`up` recreates it)")
    config_removed: bool = Field(description="its config folder is gone but state is left")


class ListedInstance(InstanceRecord):
    """A row of ``GET /api/instances``."""

    backend_resolved: str | None = Field(description="what `auto` means for it (the binary's backend), if known")


class DriftRecord(Record):
    path: str
    running: Any = None
    declared: Any = None
    needs_recreate: bool


class InstanceEvent(Record):
    """An event as `describe` shows it."""

    time: str = Field(description="local time, YYYY-MM-DD HH:MM:SS")
    ts: float = Field(description="Unix time")
    kind: str
    message: str


class InstanceDetail(InstanceRecord):
    """`llama-orch describe --json`: the ps record, the config (secrets masked), the model file, recent events."""

    config_path: str | None
    config: dict[str, Any] | None = Field(description="the config document, env values that look secret masked")
    config_error: str | None
    model_file: dict[str, Any] | str | None = Field(description="GGUF metadata, or why it cannot be read")
    config_drift: list[DriftRecord]
    events: list[InstanceEvent]


class InstanceRuntime(InstanceRecord):
    """``GET /api/instances/{name}/runtime``: the ps record, the last health check and the config as loaded."""

    stopped_at: float | None = Field(description="Unix time it last stopped or exited")
    health_checked_at: float | None = Field(description="Unix time of the last health check")
    health_latency_ms: float | None = Field(description="how long the last health check took to answer")
    health_error: str | None = Field(description="why the last health check failed, if it did")
    config_path: str | None
    config: dict[str, Any] | None = Field(
        description="the config as loaded (defaults filled in), env values that look secret masked"
    )
    config_error: str | None


class StartResult(Record):
    name: str
    already_running: bool
    status: str
    pid: int | None
    port: int | None
    restart_policy: str
    instance: InstanceRecord | None = Field(None, description="with wait=true: the record once healthy")


class StopResult(Record):
    name: str
    was_running: bool
    status: str


class RestartResult(Record):
    name: str
    pid: int | None
    port: int | None
    healthy: bool = Field(description="it was waited for and is healthy")


class HealthResult(Record):
    """A probe now; an instance that does not run has only name, health (``not running``) and status."""

    name: str
    status: str
    health: str
    response_ms: float | None = None
    detail: str | None = None
    checked_at: str | None = None


class Event(Record):
    id: int
    time: float = Field(description="Unix time")
    instance: str
    kind: str = Field(description="started, exited, healthy, unhealthy, restarting, stopped, recreated, ...")
    message: str


class PlanEntry(Record):
    name: str
    action: str = Field(description="start, recreate, leave or report-invalid")
    reason: str
    changes: list[str]
    status: str
    pid: int | None


class RecreateResult(Record):
    name: str
    action: str
    old_pid: int | None
    pid: int | None
    port: int | None
    status: str
    changes: list[str]
    healthy: bool
    restart_policy: str


class ReloadResult(Record):
    requested: bool


class DaemonInfo(Record):
    """``GET /api/daemon``; a daemon built without a pid file's details answers its version only."""

    version: str
    pid: int | None = None
    started_at: float | None = None
    uptime_s: float | None = None
    api_url: str | None = None
    home: str | None = None


# -- models --------------------------------------------------------------------------------------------------------


class ModelRecord(Record):
    """A row of `llama-orch models list --json` (``services.models.ModelEntry.as_dict``)."""

    path: str
    file: str
    exists: bool
    in_folder: bool
    used_by: list[str]
    architecture: str | None = None
    name: str | None = None
    parameters: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    size_bytes: int | None = None
    reference: str | None = None
    default_context: int | None = None
    estimated_memory_mb: float | None = None
    error: str | None = None


class RemoveResult(Record):
    deleted: list[str] = Field(description="the files deleted")


class PullEvent(Record):
    """One line of the NDJSON a pull streams: ``plan`` (files and sizes), ``progress``, then ``done`` or
    ``error`` (the pull failed after the stream began: message, type and code as in an error body)."""

    event: str = Field(description="plan, progress, done or error")


def sse_event(event: dict[str, Any], data: str) -> dict[str, Any]:
    """The JSON schema of one server-sent event (how OpenAPI 3.1 tools read a ``text/event-stream`` schema):
    ``event`` the name (``event`` a schema of it), ``data`` its text; an event may carry only ``retry``."""
    return {
        "type": "object",
        "properties": {
            "event": {"type": "string", **event},
            "data": {"type": "string", "description": data},
            "id": {"type": "string"},
            "retry": {"type": "integer", "description": "milliseconds before a client reconnects"},
        },
    }


# -- documenting the answers of a route ----------------------------------------------------------------------------

ERROR_STATUSES: dict[int, str] = {
    400: "A request that cannot be right: an invalid instance name, a log stream that does not exist, a `reload` "
    "without a daemon (code invalid_request)",
    401: "No key, or a wrong one, while keys are set: send `Authorization: Bearer <control key>` "
    "(code missing_or_wrong_key; answered before the route)",
    403: "The Host is not a name this daemon serves, or the Origin is a foreign web page's "
    "(codes host_not_allowed, origin_not_allowed; answered before the route)",
    404: "No such instance (code instance_not_found), model or reference (not_found)",
    409: "The instance could not reach the asked state (start_failed, stop_failed: port taken, model or binary "
    "missing, exited during start, not healthy in time), or a model is in use (in_use)",
    413: "A body over api.max_body_mb (code body_too_large; answered before the route)",
    415: "A state-changing call with a body that is not JSON, or with no body, no key and no allowed Origin "
    "(code content_type_not_allowed; answered before the route)",
    422: "A parameter of the wrong type or range (code invalid_parameter, `param` names it), a body that is not JSON "
    "(invalid_json), or an instance config that does not load (invalid_config, the message lists every problem)",
}
GUARD_STATUSES = (401, 403, 413)  # api.guard and api.server answer these for every /api route, before it runs


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for FastAPI: each status with the one error body."""
    return {status: {"model": ErrorBody, "description": ERROR_STATUSES[status]} for status in statuses}


def documented(ok: Any, *errors: int, changes: bool = False) -> dict[str, Any]:
    """The keywords of a route that returns a plain dict (or list) described by ``ok``, and may answer ``errors``.
    ``ok`` is documented, not enforced: ``response_model=Any`` has pydantic-core dump the dict as it is (a tenth of
    a millisecond for a hundred `ps` records; ``response_model=None`` would run ``jsonable_encoder``, twenty times
    slower). ``changes``: a state-changing call, which the guard answers 415 when it is not JSON."""
    statuses = sorted({*errors, *((415,) if changes else ())})
    return {"response_model": Any, "responses": {200: {"model": ok}, **error_responses(*statuses)}}
