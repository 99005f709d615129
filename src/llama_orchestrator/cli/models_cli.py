"""`models pull|register|catalog|unregister|rm` (issue 11), added to ``cli.system``'s ``models_app``; and the part of
`init --model` that turns a reference or catalog ID into a local file. Parse, call ``services.model_store``, render.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from llama_orchestrator.cli.system import JsonOption, _home, _size, models_app

FileOption = Annotated[
    str | None,
    typer.Option("--file", help="The GGUF file in the repository (default: chosen by :QUANT).", show_default=False),
]
RevisionOption = Annotated[
    str | None, typer.Option("--revision", help="Branch, tag or commit (default: main).", show_default=False)
]


@contextmanager
def progress_bars():
    """A rich progress bar per file (size, speed, ETA) on stderr; yields the callback the pull reports to."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from llama_orchestrator.cli.render import console

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def report(name: str, done: int, total: int | None) -> None:
        if name not in tasks:
            tasks[name] = bars.add_task(name, total=total, completed=done)
        bars.update(tasks[name], completed=done, total=total)

    with bars:
        yield report


def remote_api():
    """With ``--host``: a client of that node's daemon API (its models, its disk); else None (this home)."""
    from llama_orchestrator.cli.app import _state

    host = _state.get("host")
    if not host:
        return None
    from llama_orchestrator.adapters.api_client import ApiClient

    key = _state.get("api_key")
    return ApiClient(str(host), key if isinstance(key, str) else None)


def pull_remote(api, body: dict) -> dict:  # ApiClient
    """`models pull --host`: the node's daemon pulls; its NDJSON progress events drive the same bars."""
    import json

    from llama_orchestrator.adapters.hub import HubError

    with progress_bars() as report:
        for line in api.post_lines("/api/models/pull", body):
            if not line.strip():
                continue
            event = json.loads(line)
            if event["event"] == "progress":
                report(event["file"], event["done"], event["total"])
            elif event["event"] == "error":
                raise HubError(event["message"])
            elif event["event"] == "done":
                return event
    raise HubError(f"the pull on {api.base_url} ended without a result")


def pull_reference(text: str, *, file: str | None = None, revision: str | None = None):
    """Resolve and pull, drawing progress. Returns the services' PullResult."""
    from llama_orchestrator.services import model_store

    home = _home()
    ref = model_store.resolve(home, text, file=file, revision=revision)
    with progress_bars() as report:
        return model_store.pull(home, ref, on_progress=report)


@models_app.command("pull")
def models_pull(
    reference: Annotated[str, typer.Argument(help="[hf.co/]<user>/<repo>[:QUANT], or a catalog ID.")],
    file: FileOption = None,
    revision: RevisionOption = None,
    json_: JsonOption = False,
) -> None:
    """Download a GGUF model from Hugging Face into <home>/models/hf/<user>/<repo>/ (resumes, verifies sha256);
    with --host, the node's daemon pulls it onto that node.

    :QUANT picks the file whose name carries it (case-insensitive); without it Q4_K_M, else the only GGUF. Split
    models bring every part. HF_TOKEN (or `hf auth login`) and HF_ENDPOINT are honoured.

    Example: llama-orch models pull bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M
    """
    from rich.markup import escape

    from llama_orchestrator.cli.app import say
    from llama_orchestrator.cli.render import print_json

    api = remote_api()
    if api is not None:
        record = pull_remote(api, {"reference": reference, "file": file, "revision": revision})
        record.pop("event", None)
    else:
        record = pull_reference(reference, file=file, revision=revision).as_dict()
    if json_:
        print_json(record)
        return
    fetched = (
        f"downloaded {len(record['downloaded'])} file(s), {_size(record['bytes_fetched'])}"
        if record["downloaded"]
        else "already pulled"
    )
    say(f"{escape(record['reference'])}: {fetched}")
    say(f"  path: {escape(record['path'])}")
    say(f"use it: llama-orch init NAME --model {escape(record['reference'])}")


@models_app.command("register")
def models_register(
    model_id: Annotated[str, typer.Argument(help="Catalog ID, e.g. qwen-0.5b.")],
    repo: Annotated[str, typer.Option("--repo", help="<user>/<repo>[:QUANT] on Hugging Face.")],
    name: Annotated[str | None, typer.Option(help="Display name.", show_default=False)] = None,
    file: FileOption = None,
) -> None:
    """Add (or replace) a catalog entry: an ID for a model on the Hub, usable by `models pull` and `init --model`.

    Example: llama-orch models register qwen-0.5b --repo Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M --name "Qwen 0.5B"
    """
    from rich.markup import escape

    from llama_orchestrator.cli.app import local_only, say
    from llama_orchestrator.services.model_store import ModelCatalog

    local_only("models register")
    entry = ModelCatalog(_home()).register(model_id, repo, name, file)
    say(
        f"registered [bold]{escape(model_id)}[/]: hf.co/{escape(entry['repo'])} "
        f"(pull it with `llama-orch models pull {escape(model_id)}`)"
    )


@models_app.command("catalog")
def models_catalog(json_: JsonOption = False) -> None:
    """The catalog: ID NAME DOWNLOADED SIZE REPO.

    Example: llama-orch models catalog --json
    """
    from rich.markup import escape
    from rich.table import Table

    from llama_orchestrator.cli.app import say
    from llama_orchestrator.cli.render import console, print_json
    from llama_orchestrator.services.model_store import catalog_rows

    rows = catalog_rows(_home())
    if json_:
        print_json(rows)
        return
    if not rows:
        say("the catalog is empty: `llama-orch models register ID --repo <user>/<repo>[:QUANT]` adds a model")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "NAME", "DOWNLOADED", "SIZE", "REPO"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            escape(r["id"]),
            escape(r["name"]),
            "yes" if r["downloaded"] else "no",
            _size(r["size_bytes"]),
            escape(r["repo"]),
        )
    console().print(table)


@models_app.command("unregister")
def models_unregister(model_id: Annotated[str, typer.Argument(help="Catalog ID.")]) -> None:
    """Remove a catalog entry; its downloaded files stay (`models rm` deletes them).

    Example: llama-orch models unregister qwen-0.5b
    """
    from llama_orchestrator.cli.app import local_only, say
    from llama_orchestrator.services.model_store import ModelCatalog

    local_only("models unregister")
    ModelCatalog(_home()).unregister(model_id)
    say(f"unregistered {model_id} (files kept)")


@models_app.command("rm")
def models_rm(reference: Annotated[str, typer.Argument(help="[hf.co/]<user>/<repo>[:QUANT] or a catalog ID.")]) -> None:
    """Delete a pulled model's files (every part). Refused, exit 1, while an instance uses it.

    Example: llama-orch models rm hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M
    """
    from rich.markup import escape

    from llama_orchestrator.cli.app import say
    from llama_orchestrator.services.model_store import remove

    api = remote_api()
    deleted = (
        api.request("POST", "/api/models/remove", json={"reference": reference})["deleted"]
        if api
        else remove(_home(), reference)
    )
    for path in deleted:
        say(f"deleted {escape(str(path))}")


# -- init --model ----------------------------------------------------------------------------------------------


def _reference_or_id(text: str) -> bool:
    """A missing path that reads as ``user/repo[:QUANT]`` or is a catalog ID."""
    from llama_orchestrator.domain.errors import UsageError
    from llama_orchestrator.domain.model_refs import parse_ref
    from llama_orchestrator.services.model_store import ModelCatalog

    if "/" not in text:
        return ModelCatalog(_home()).ref(text) is not None
    try:
        parse_ref(text)
        return True
    except UsageError:
        return False


def model_for_init(text: str) -> tuple[Path, str | None]:
    """`init --model`: a file path as it is; a reference or catalog ID pulled when it is not here yet. Returns the
    local file (the first part of a split model) and the reference to remember (None for a path)."""
    from llama_orchestrator.cli.app import say
    from llama_orchestrator.domain.model_refs import is_hf_ref
    from llama_orchestrator.services import model_store

    as_path = Path(text).expanduser()
    looks_like_ref = is_hf_ref(text) or (
        not as_path.exists() and not text.lower().endswith(".gguf") and _reference_or_id(text)
    )
    if not looks_like_ref:
        return as_path.absolute(), None
    home = _home()
    ref = model_store.resolve(home, text)
    files = model_store.local_files(home, ref)
    if files is not None:
        return files[0], text
    say(f"pulling {text} ...")
    with progress_bars() as report:
        result = model_store.pull(home, ref, on_progress=report)
    return result.primary, text


def memory_warning(home, config, plan) -> None:  # Home, InstanceConfig, MemoryPlan
    """After `init`: the context chosen and the estimate; a warning when it does not fit the free RAM (plus free
    VRAM when layers go to the GPU)."""
    from llama_orchestrator.cli.app import say, warn

    free_mb = _free_ram_mb()
    if config.gpu.layers:
        try:
            from llama_orchestrator.services.system_service import gpu_overview

            free_mb = (free_mb or 0) + sum(d.free_mib or 0 for d in gpu_overview(home).report.devices)
        except Exception:  # noqa: BLE001, S110 - a warning must not fail `init`: no GPU figure, RAM alone
            pass
    say(
        f"context {config.model.context_size} tokens"
        + (f" (trained: {plan.trained_context})" if plan.trained_context else "")
        + f", estimated memory {plan.estimated_mb:.0f} MiB"
    )
    limit = min(x for x in (free_mb, plan.budget_mb) if x is not None) if (free_mb or plan.budget_mb) else None
    if limit is not None and plan.estimated_mb > limit:
        warn(
            f"the estimate ({plan.estimated_mb:.0f} MiB) is more than the memory available ({limit:.0f} MiB: free "
            "RAM/VRAM, or router.memory_budget_mb): lower --context-size or pick a smaller quantisation"
        )


def _free_ram_mb() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().available / (1024 * 1024)
    except Exception:  # noqa: BLE001 - a platform psutil cannot read: no figure, no warning
        return None
