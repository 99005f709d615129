"""`ps --filter` and `ps --format`, as `docker ps` has them. Pure: ps records in, records or text out.

Filters: ``key=value``, repeatable; values of one key are alternatives (OR), different keys must all match (AND), as
in Docker. Keys: ``status`` (exact, ``exited`` matches any exit code), ``health`` (exact), ``name`` (substring, as
Docker matches names), ``model`` (substring of the model file's path), ``alias`` (exact), ``backend`` (exact).

Formats: ``json`` (one object per line, as ``docker ps --format json``), ``table TEMPLATE`` (a header row, columns
aligned), or a Go-style ``TEMPLATE`` with ``{{.Field}}`` (Docker's names work too: ``.Names``, ``.ID``, ``.State``,
``.Ports``, ``.RunningFor``), ``{{json .}}`` and ``{{json .Field}}``; ``\\t`` and ``\\n`` are tab and newline.
"""

from __future__ import annotations

import json
import re

TYPE_CHECKING = False  # typing stays unimported: `ps` starts in a few tens of milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    Record = dict[str, Any]

FILTER_KEYS = ("status", "health", "name", "model", "alias", "backend")
# Template field -> record key; Docker's spellings beside ours (an instance's name is its ID).
FIELDS = {
    "name": "name",
    "names": "name",
    "id": "name",
    "status": "status",
    "state": "status",
    "health": "health",
    "pid": "pid",
    "port": "port",
    "ports": "port",
    "host": "host",
    "backend": "backend",
    "model": "model",
    "image": "model",
    "uptime": "uptime",
    "runningfor": "uptime",
    "restarts": "restarts",
    "exitcode": "exit_code",
    "lasterror": "last_error",
    "aliases": "aliases",
    "createdat": "started_at",
    "startedat": "started_at",
}
FIELD_NAMES = (
    "Name",
    "Names",
    "ID",
    "Status",
    "State",
    "Health",
    "PID",
    "Port",
    "Ports",
    "Host",
    "Backend",
    "Model",
    "Image",
    "Uptime",
    "RunningFor",
    "Restarts",
    "ExitCode",
    "LastError",
    "Aliases",
    "StartedAt",
    "CreatedAt",
)
_PLACEHOLDER = re.compile(r"\{\{\s*(json\s+)?\.([A-Za-z_]*)\s*\}\}")


def _usage(message: str) -> Exception:
    # Imported when needed: domain.errors imports dataclasses (and inspect), and `ps` starts without them.
    from llama_orchestrator.domain.errors import UsageError

    return UsageError(message)


def parse_filters(specs: Iterable[str]) -> dict[str, set[str]]:
    """``["status=running", "status=exited", "name=q"]`` -> ``{"status": {"running", "exited"}, "name": {"q"}}``."""
    wanted: dict[str, set[str]] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip().lower()
        if not sep or key not in FILTER_KEYS:
            raise _usage(f"invalid filter {spec!r}: use KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}")
        wanted.setdefault(key, set()).add(value.strip())
    return wanted


def _matches(key: str, value: str, record: Record) -> bool:
    if key == "status":
        return record.get("status") == value or (value == "exited" and str(record.get("status")).startswith("exited"))
    if key == "health":
        return record.get("health") == value
    if key == "name":
        return value in str(record.get("name") or "")
    if key == "model":
        return value in str(record.get("model") or "").replace("\\", "/")
    if key == "alias":
        return value in (record.get("aliases") or [])
    if key == "backend":
        return value in (record.get("backend"), record.get("backend_resolved"))
    return False


def apply_filters(records: list[Record], wanted: dict[str, set[str]]) -> list[Record]:
    return [r for r in records if all(any(_matches(k, v, r) for v in values) for k, values in wanted.items())]


def render_format(records: list[Record], fmt: str, cell: Callable[[Record, str], str]) -> str:
    """The text of ``ps --format FMT`` (newline-terminated lines). ``cell(record, key)``: a field as ps shows it."""
    if fmt.strip() == "json":
        return "".join(json.dumps(r, default=str) + "\n" for r in records)
    table = fmt.startswith("table")
    template = fmt[len("table") :].lstrip() if table else fmt
    template = template.replace("\\t", "\t").replace("\\n", "\n")
    for _, field in _PLACEHOLDER.findall(template):
        if field and field.lower() not in FIELDS:
            raise _usage(f"template: can't evaluate field {field} (fields: {', '.join(FIELD_NAMES)})")
    if not _PLACEHOLDER.search(template):
        raise _usage(
            f"invalid --format {fmt!r}: use json, a template such as '{{{{.Name}}}}\\t{{{{.Status}}}}'"
            ", or 'table' and a template"
        )

    def expand(record: Record | None) -> str:
        def one(match: re.Match[str]) -> str:
            as_json, field = bool(match.group(1)), match.group(2)
            if record is None:  # the header row
                return (field or "JSON").upper()
            if not field:
                return json.dumps(record, default=str)
            key = FIELDS[field.lower()]
            return json.dumps(record.get(key), default=str) if as_json else cell(record, key)

        return _PLACEHOLDER.sub(one, template)

    rows = [expand(r) for r in records]
    if not table:
        return "".join(row + "\n" for row in rows)
    return _aligned([expand(None), *rows])


def _aligned(rows: list[str]) -> str:
    """Tab-separated cells padded into columns (Docker's tabwriter, padding 3)."""
    cells = [row.split("\t") for row in rows]
    widths: dict[int, int] = {}
    for line in cells:
        for i, text in enumerate(line[:-1]):
            widths[i] = max(widths.get(i, 0), len(text))
    return "".join(
        "".join(t.ljust(widths[i] + 3) if i < len(line) - 1 else t for i, t in enumerate(line)) + "\n" for line in cells
    )
