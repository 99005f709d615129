"""`llama-orch nodes`: the peers in ``orchestrator.json`` (state, models, latency), from the daemon's router
(``GET /api/nodes``) or, without a daemon, probed now."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

NODE_FIELDS = (
    "name",
    "url",
    "up",
    "models",
    "aliases",
    "latency_ms",
    "last_error",
    "in_flight",
    "queued",
    "limit",
    "requests",
    "probes_failed",
    "failures",
    "retried",
)


def nodes(json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """The other nodes this router serves models from (`peers` in orchestrator.json): as the daemon's router sees
    them, or probed now when no daemon runs.

    Example: llama-orch nodes
    """
    from llama_orchestrator.cli.app import instances, say

    port = instances()  # --host's daemon, else this home's when it runs: its router's own view
    client = getattr(port, "client", None)
    rows = client.get("/api/nodes") if client is not None else _probe_now()
    if json_:
        # (.get: a daemon of an older version reports fewer fields; they read as absent, not as an error)
        records = [{k: r.get(k) for k in NODE_FIELDS} | {"state": "up" if r["up"] else "down"} for r in rows]
        sys.stdout.write(json.dumps(records, indent=2) + "\n")
        return
    if not rows:
        say('no peers: list other nodes in orchestrator.json as "peers": [{"name", "url", "api_key"}]')
        return
    from rich.markup import escape
    from rich.table import Table

    from llama_orchestrator.cli.render import console

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "URL", "STATE", "LATENCY", "LOAD", "MODELS"):
        table.add_column(column)
    for r in rows:
        latency = f"{r['latency_ms']:.0f} ms" if r["latency_ms"] is not None else "--"
        state = "up" if r["up"] else f"down ({r['last_error']})"
        models = ", ".join([*r["models"], *(a for a in r["aliases"] if a not in r["models"])]) or "--"
        table.add_row(escape(r["name"]), escape(r["url"]), escape(state), latency, _load(r), escape(models))
    console().print(table)


def _load(row: dict) -> str:
    """``in flight/limit +queued`` (``3/4 +2``), or just what is in flight for a node without a limit here."""
    in_flight = row.get("in_flight") or 0
    if row.get("limit") is None:
        return str(in_flight)
    queued = row.get("queued") or 0
    return f"{in_flight}/{row['limit']}" + (f" +{queued}" if queued else "")


def _probe_now() -> list[dict]:
    import asyncio
    import logging

    from llama_orchestrator.adapters.config_files import load_settings
    from llama_orchestrator.cli.app import service
    from llama_orchestrator.services.peers import PeerPool

    pool = PeerPool(load_settings(service().home.settings_path).peers)
    logging.getLogger("llama_orchestrator.peers").setLevel(logging.ERROR)  # the table says what is down

    async def probe_all() -> list[dict]:
        try:
            await asyncio.gather(*(pool.probe(name) for name in pool.views))
            return pool.snapshot()
        finally:
            await pool.close()

    return asyncio.run(probe_all())
