"""Turning service results into text: tables, durations, JSON. No decisions here."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_orchestrator.services.instances import InstanceView

STATUS_STYLE = {
    "running": "green",
    "starting": "yellow",
    "stopping": "yellow",
    "backoff": "yellow",
    "exited": "red",
    "failed": "bold red",
    "stopped": "dim",
}
HEALTH_STYLE = {"healthy": "green", "loading": "yellow", "unhealthy": "red", "unknown": "dim"}


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def timestamp(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def status_text(view: InstanceView) -> str:
    row = view.row
    if view.config_error is not None:
        return "invalid-config"
    if row.status == "exited" and row.exit_code is not None:
        return f"exited ({row.exit_code})"
    return row.status


def ps_record(view: InstanceView, now: float) -> dict[str, Any]:
    config, row = view.config, view.row
    return {
        "name": view.name,
        "status": row.status if view.config_error is None else "invalid-config",
        "health": row.health,
        "pid": row.pid if row.status in ("starting", "running", "stopping") else None,
        "port": config.server.port if config else row.port,
        "host": config.server.host if config else None,
        "backend": config.gpu.backend if config else None,
        "model": config.model.path if config else None,
        "uptime_s": view.uptime_s(now),
        "restarts": row.restarts,
        "exit_code": row.exit_code,
        "started_at": row.started_at,
        "last_error": row.last_error or (str(view.config_error) if view.config_error else None),
    }


def ps_table(views: list[InstanceView], now: float):
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "STATUS", "HEALTH", "PID", "PORT", "BACKEND", "MODEL", "UPTIME", "RESTARTS"):
        table.add_column(column, no_wrap=column != "MODEL")
    for view in views:
        record = ps_record(view, now)
        status = status_text(view)
        health = record["health"] if record["status"] in ("starting", "running") else "-"
        model = record["model"] or "-"
        table.add_row(
            view.name,
            f"[{STATUS_STYLE.get(record['status'], 'red')}]{status}[/]",
            f"[{HEALTH_STYLE.get(health, 'dim')}]{health}[/]",
            str(record["pid"] or "-"),
            str(record["port"] or "-"),
            record["backend"] or "-",
            model.replace("\\", "/").rsplit("/", 1)[-1],
            duration(record["uptime_s"]),
            str(record["restarts"]),
        )
    return table


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
