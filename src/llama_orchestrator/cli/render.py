"""Turning service results into text: tables, durations, JSON. No decisions here."""

from __future__ import annotations

import json
import sys
import time

TYPE_CHECKING = False  # typing stays unimported: `ps` starts in a few tens of milliseconds
if TYPE_CHECKING:
    from typing import Any

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


PIPED_WIDTH = 4096  # output to a pipe or file is never cut to fit a terminal (`ps | grep` sees whole names)


def console(stderr: bool = False):
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=PIPED_WIDTH if piped else None)


def text_target(stream: Any = None) -> tuple[bool, int] | None:
    """``(styled, width)`` of what ``console()`` would print to ``stream`` (default stdout), decided as rich decides
    (TTY_COMPATIBLE, FORCE_COLOR, isatty; COLUMNS, the terminal's size), for ``ps_text``. None where only rich can
    say how it would look: a terminal with NO_COLOR (rich keeps bold and dim), a dumb one, or Windows'."""
    import os

    stream = sys.stdout if stream is None else stream
    environ = os.environ
    try:
        isatty = bool(hasattr(stream, "isatty") and stream.isatty())
    except ValueError:
        isatty = False
    compatible, force = environ.get("TTY_COMPATIBLE", ""), environ.get("FORCE_COLOR")
    if compatible in ("0", "1"):
        styled = compatible == "1"
    elif force is not None:
        styled = force != ""
    else:
        styled = isatty
    if styled and (
        sys.platform == "win32"
        or environ.get("NO_COLOR", "") != ""
        or environ.get("TERM", "").lower() in ("dumb", "unknown")
    ):
        return None
    columns = environ.get("COLUMNS")
    if not isatty and not columns:
        return styled, PIPED_WIDTH
    if columns is not None and columns.isdigit():
        return styled, int(columns)
    for fd in (0, 1, 2):
        try:
            return styled, os.get_terminal_size(fd).columns or 80
        except (AttributeError, ValueError, OSError):
            continue
    return styled, 80


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


def status_text(item: InstanceView | dict[str, Any]) -> str:
    """The STATUS column: ``exited (CODE)``, ``invalid-config``, else the status. A view or a ps record."""
    if isinstance(item, dict):
        status, exit_code = item["status"], item.get("exit_code")
    else:
        if item.config_error is not None:
            return "invalid-config"
        status, exit_code = item.row.status, item.row.exit_code
    if status == "exited" and exit_code is not None:
        return f"exited ({exit_code})"
    return status


DRIFT_MARK = "*"


def ps_status(record: dict[str, Any]) -> str:
    """The STATUS cell: the status, ``*`` when the process runs another config than declared (drift), and
    ``(config removed)`` when the config folder is gone but state is left."""
    text = status_text(record)
    if record.get("config_changed"):
        text += DRIFT_MARK
    if record.get("config_removed"):
        text += " (config removed)"
    return text


def ps_legend(records: list[dict[str, Any]]) -> list[str]:
    """The lines under the `ps` table that explain its marks (only those that appear)."""
    lines = []
    if any(r.get("config_changed") for r in records):
        lines.append(
            f"{DRIFT_MARK} config changed since it started, not applied: `llama-orch up NAME -d` recreates "
            "it, `llama-orch describe NAME` shows the difference"
        )
    if any(r.get("config_removed") and r.get("pid") for r in records):
        lines.append("(config removed) the config folder is gone while it runs: `llama-orch down NAME` stops it")
    return lines


def ps_record(view: InstanceView, now: float) -> dict[str, Any]:
    from llama_orchestrator.services.instances_port import ps_record as record

    return record(view, now)


def ps_table(records: list[dict[str, Any]] | list[InstanceView], now: float | None = None):
    """The `ps` table of ps records (views are turned into records first)."""
    from rich.table import Table

    now = time.time() if now is None else now
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in PS_COLUMNS:
        table.add_column(column, no_wrap=column != "MODEL")
    for item in records:
        record = item if isinstance(item, dict) else ps_record(item, now)
        table.add_row(*(f"[{style}]{escape(text)}[/]" if style else text for text, style in ps_cells(record)))
    return table


PS_COLUMNS = ("NAME", "STATUS", "HEALTH", "PID", "PORT", "BACKEND", "MODEL", "UPTIME", "RESTARTS")
_SGR = {"green": "32", "yellow": "33", "red": "31", "bold red": "1;31", "dim": "2", "bold": "1"}


def ps_cells(record: dict[str, Any]) -> list[tuple[str, str | None]]:
    """One row of the `ps` table: each cell's text and its style (None: plain), as ``ps_table`` shows them."""
    health = record["health"] if record["status"] in ("starting", "running") else "-"
    model = record["model"] or "-"
    return [
        (record["name"], None),
        (ps_status(record), STATUS_STYLE.get(record["status"], "red")),
        (health, HEALTH_STYLE.get(health, "dim")),
        (str(record["pid"] or "-"), None),
        (str(record["port"] or "-"), None),
        (record.get("backend_resolved") or record["backend"] or "-", None),
        (model.replace("\\", "/").rsplit("/", 1)[-1], None),
        (duration(record["uptime_s"]), None),
        (str(record["restarts"]), None),
    ]


def ps_text(records: list[dict[str, Any]], *, styled: bool, width: int) -> str | None:
    """The `ps` table and its legend exactly as ``console().print(ps_table(...))`` writes them, without importing
    rich (about 45 ms of a 100 ms budget): plain, or with the SGR codes of rich's standard colours when ``styled``
    (a terminal). None when only rich can say (a cell rich would read as markup or measure differently, a table
    wider than ``width`` that rich would wrap, a style not in ``_SGR``): then use ``ps_table``."""
    rows = [ps_cells(r) for r in records]
    for row in rows:
        for i, (text, style) in enumerate(row):
            if not text.isascii() or not text.isprintable() or (i != 1 and "[" in text):
                return None
            if styled and style is not None and style not in _SGR:
                return None
    widths = [max([len(h)] + [len(row[i][0]) for row in rows]) for i, h in enumerate(PS_COLUMNS)]
    if sum(widths) + 2 * (len(widths) - 1) > width:
        return None
    last = len(widths) - 1

    def paint(text: str, style: str | None) -> str:
        return f"\x1b[{_SGR[style]}m{text}\x1b[0m" if styled and style and text else text

    lines = []
    if styled:  # rich styles the header's padding too, one segment per pad
        pad = paint(" ", "bold")
        header = "".join(
            paint(h.ljust(widths[i]), "bold") + ("" if i == last else pad + pad) for i, h in enumerate(PS_COLUMNS)
        )
    else:
        header = "  ".join(h.ljust(widths[i]) for i, h in enumerate(PS_COLUMNS[:last])) + "  " + PS_COLUMNS[last]
    lines.append(header)
    lines.extend(
        "".join(
            paint(text, style) + " " * (widths[i] - len(text)) + ("" if i == last else "  ")
            for i, (text, style) in enumerate(row)
        )
        for row in rows
    )
    lines.extend(paint(line, "dim") for line in ps_legend(records))
    return "".join(line + "\n" for line in lines)


def print_describe(record: dict[str, Any]) -> None:
    """`describe` for people: the state, the config, the model file's metadata, recent events."""
    out = console()
    out.print(f"[bold]{record['name']}[/]  {status_text(record)}  health: {record['health']}")
    for key in ("pid", "port", "uptime_s", "restarts", "exit_code", "last_error"):
        value = duration(record[key]) if key == "uptime_s" else record[key]
        out.print(f"  {key:<10} {value if value is not None else '-'}")
    out.print(f"\n[bold]Config[/] {record['config_path'] or '(config removed)'}")
    if record.get("config_error"):
        out.print(f"[red]{escape(record['config_error'])}[/]")
    else:
        out.print(json.dumps(record["config"], indent=2), markup=False)
    drift = record.get("config_drift") or []
    if drift:
        out.print("\n[bold]Config drift[/] (running -> declared)")
        for change in drift:
            how = "needs a recreate: `llama-orch up NAME -d`" if change["needs_recreate"] else "applied live"
            out.print(
                f"  {change['path']}: {json.dumps(change['running'])} -> {json.dumps(change['declared'])}  "
                f"({how.replace('NAME', record['name'])})",
                markup=False,
            )
    out.print("\n[bold]Model file[/]")
    gguf = record["model_file"]
    if isinstance(gguf, dict):
        for key, value in gguf.items():
            if key == "size_bytes":
                value = f"{value / 1e6:.1f} MB"
            out.print(f"  {key:<15} {value}")
    else:
        out.print(f"  {gguf}")
    out.print("\n[bold]Events[/]")
    for event in record["events"] or [{"time": "", "kind": "", "message": "(none)"}]:
        out.print(f"  {event['time']}  {event['kind']:<12} {event['message']}", markup=False)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def print_json(data: Any) -> None:
    """``--json``: lists as arrays, times as ``json_ready`` writes them."""
    sys.stdout.write(json.dumps(json_ready(data), indent=2, default=str) + "\n")


def json_line(data: Any) -> str:
    """One compact JSON object and a newline: what a stream (``events -f --json``) writes per item."""
    return json.dumps(json_ready(data), default=str) + "\n"


_LOCAL_TIME = "%Y-%m-%d %H:%M:%S"


def is_time_key(key: str) -> bool:
    return key == "time" or key.endswith("_at")


def iso_time(ts: float) -> str:
    """ISO-8601 in UTC with its zone, to the millisecond: ``2026-12-01T11:53:38.123+00:00``."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")


def json_ready(data: Any) -> Any:
    """The one JSON convention of every ``--json``: a time (a ``time`` or ``*_at`` field) is an ISO-8601 string
    with its zone, and ``<field>_epoch`` beside it holds Unix seconds; lists stay arrays. A time given as a local
    ``YYYY-MM-DD HH:MM:SS`` string (with its epoch in a ``ts`` beside it, or read as local time) is converted."""
    if isinstance(data, list):
        return [json_ready(item) for item in data]
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    epoch_of_ts = data.get("ts") if isinstance(data.get("ts"), (int, float)) else None
    for key, value in data.items():
        if key == "ts" and epoch_of_ts is not None and "time" in data:
            continue  # folded into time / time_epoch
        if isinstance(key, str) and is_time_key(key) and not isinstance(value, bool):
            epoch = _epoch(value, epoch_of_ts if key == "time" else None)
            if epoch is not None or value is None:
                out[key] = None if epoch is None else iso_time(epoch)
                out[f"{key}_epoch"] = epoch
                continue
        out[key] = json_ready(value)
    return out


def _epoch(value: Any, fallback: float | None) -> float | None:
    if isinstance(value, (int, float)):
        return float(value) if value else None
    if isinstance(value, str):
        if fallback is not None:
            return float(fallback)
        try:
            return time.mktime(time.strptime(value, _LOCAL_TIME))
        except ValueError:
            return None
    return None


def ps_cell(record: dict[str, Any], key: str) -> str:
    """One field of a ps record as ``ps --format`` prints it (None: empty)."""
    if key == "status":
        return ps_status(record)
    if key == "uptime":
        return duration(record.get("uptime_s"))
    if key == "backend":
        return str(record.get("backend_resolved") or record.get("backend") or "")
    value = record.get(key)
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
