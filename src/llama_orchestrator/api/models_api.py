"""``/api/models``: what `models list|pull|rm` do, for the dashboard and other nodes (issue 11).

    GET  /api/models                    the records of `llama-orch models list --json`
    POST /api/models/pull               {"reference": "hf.co/u/r:Q8_0" | catalog ID, "file"?, "revision"?}
                                        -> application/x-ndjson, one JSON object a line:
                                           {"event": "plan", "files": [{"name", "size"}]}
                                           {"event": "progress", "file", "done", "total"}   (at most ~10 a second)
                                           {"event": "done", "reference", "path", "files", "downloaded", ...}
                                           {"event": "error", "message", "type", "code"}    (the pull failed)
    POST /api/models/remove             {"reference": ...} -> {"deleted": [paths]}; 409 while an instance uses it

A reference that does not parse, or an unknown catalog ID, is answered with its status before any stream starts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from llama_orchestrator.adapters.home import Home
from llama_orchestrator.api import schemas
from llama_orchestrator.api.schemas import documented, error_responses
from llama_orchestrator.domain.errors import OrchestratorError

PROGRESS_EVERY_S = 0.1


class PullRequest(BaseModel):
    reference: str = Field(description="[hf.co/]<user>/<repo>[:QUANT], or a catalog ID")
    file: str | None = Field(None, description="the GGUF file in the repository (default: chosen by :QUANT)")
    revision: str | None = Field(None, description="branch, tag or commit (default: main)")


class RemoveRequest(BaseModel):
    reference: str = Field(description="[hf.co/]<user>/<repo>[:QUANT], or a catalog ID")


def make_models_router(home: Home) -> APIRouter:
    api = APIRouter(prefix="/models", tags=["models"])

    @api.get(
        "",
        summary="Models: pulled, in the models folder, or named by a config (`models list --json`)",
        **documented(list[schemas.ModelRecord]),
    )
    def list_() -> list[dict[str, Any]]:
        from llama_orchestrator.services.models import list_models

        return [entry.as_dict() for entry in list_models(home)]

    @api.post(
        "/pull",
        summary="Pull a model from Hugging Face; progress streamed as NDJSON",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "one JSON object a line: plan, progress..., then done or error",
                "content": {"application/x-ndjson": {"schema": schemas.PullEvent.model_json_schema()}},
            },
            **error_responses(400, 404, 415, 422),
        },
    )
    async def pull(body: PullRequest) -> StreamingResponse:
        from llama_orchestrator.services import model_store

        ref = model_store.resolve(home, body.reference, file=body.file, revision=body.revision)  # 400/404 now
        return StreamingResponse(
            _pull_events(home, ref), media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"}
        )

    @api.post(
        "/remove",
        summary="Delete a pulled model's files; 409 while an instance uses them",
        **documented(schemas.RemoveResult, 400, 404, 409, 422, changes=True),
    )
    def remove(body: RemoveRequest) -> dict[str, Any]:
        from llama_orchestrator.services import model_store

        return {"deleted": [str(p) for p in model_store.remove(home, body.reference)]}

    return api


async def _pull_events(home: Home, ref) -> AsyncIterator[str]:  # HfRef
    """Runs the pull on a worker thread; its callbacks post events to this coroutine through a queue."""
    from llama_orchestrator.api.control import http_error_of
    from llama_orchestrator.services import model_store

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict | None] = asyncio.Queue()
    last: dict[str, float] = {}

    def post(event: dict | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    def on_plan(files: list[tuple[str, int | None]]) -> None:
        post({"event": "plan", "files": [{"name": n, "size": s} for n, s in files]})

    def on_progress(name: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if total is not None and done < total and now - last.get(name, 0.0) < PROGRESS_EVERY_S:
            return
        last[name] = now
        post({"event": "progress", "file": name, "done": done, "total": total})

    def work() -> None:
        try:
            result = model_store.pull(home, ref, on_progress=on_progress, on_plan=on_plan)
            post({"event": "done", **result.as_dict()})
        except OrchestratorError as exc:
            _, type_, code = http_error_of(exc)
            post({"event": "error", "message": str(exc), "type": type_, "code": code})
        except Exception as exc:  # noqa: BLE001 - the stream has started: the error travels in it
            message = f"{type(exc).__name__}: {exc}"
            post({"event": "error", "message": message, "type": "server_error", "code": "internal_error"})
        finally:
            post(None)

    # A client that goes away does not cancel the pull: the worker finishes it (a later pull finds the file).
    loop.run_in_executor(None, work)
    while (event := await queue.get()) is not None:
        yield json.dumps(event) + "\n"
