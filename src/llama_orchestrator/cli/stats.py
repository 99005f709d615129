"""`llama-orch stats`: live CPU, memory, requests and tokens per second of each instance, as `docker stats`.

A ``Sample`` is taken at one moment: CPU seconds and memory of each instance's process tree (psutil, on this
machine only) and the router's request and completion-token counters from the daemon's ``/metrics``. ``rows``
turns two samples into rates; it is pure (the samples carry their own times), so tests replay it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_SAMPLE = re.compile(r"^(llama_orch_instance_(?:requests|completion_tokens)_total)\{([^}]*)\} (\S+)$")
_NAME = re.compile(r'model_name="((?:[^"\\]|\\.)*)"')


@dataclass
class Usage:
    cpu_s: float | None = None  # user + system CPU seconds of the process and its children
    rss: int | None = None  # resident bytes, summed over the tree
    pids: int = 0


@dataclass
class Sample:
    at: float  # time.monotonic() when taken
    usage: dict[str, Usage] = field(default_factory=dict)
    requests: dict[str, float] = field(default_factory=dict)  # total requests the router relayed, by instance
    tokens: dict[str, float] = field(default_factory=dict)  # completion tokens, by instance
    memory_total: int | None = None


def counters(metrics_text: str) -> tuple[dict[str, float], dict[str, float]]:
    """``(requests, completion tokens)`` by instance from a /metrics scrape (requests summed over labels)."""
    requests: dict[str, float] = {}
    tokens: dict[str, float] = {}
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        name = _NAME.search(match.group(2))
        if name is None:
            continue
        target = requests if match.group(1).endswith("requests_total") else tokens
        key = name.group(1)
        target[key] = target.get(key, 0.0) + float(match.group(3))
    return requests, tokens


def process_usage(pid: int | None) -> Usage:
    import psutil

    if not pid:
        return Usage()
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return Usage()
    usage = Usage(cpu_s=0.0, rss=0)
    for process in tree:
        try:
            times, memory = process.cpu_times(), process.memory_info()
        except psutil.Error:
            continue
        usage.cpu_s = (usage.cpu_s or 0.0) + times.user + times.system
        usage.rss = (usage.rss or 0) + memory.rss
        usage.pids += 1
    return usage


def take(
    records: list[dict[str, Any]],
    metrics_text: str | None,
    at: float,
    *,
    local: bool,
    usage_of: Callable[[int | None], Usage] = process_usage,
) -> Sample:
    """One sample. ``local``: the pids are this machine's (not another node's), so CPU and memory can be read."""
    import psutil

    sample = Sample(at=at, memory_total=psutil.virtual_memory().total if local else None)
    for record in records:
        sample.usage[record["name"]] = usage_of(record.get("pid")) if local else Usage()
    if metrics_text is not None:
        sample.requests, sample.tokens = counters(metrics_text)
    return sample


def rows(names: list[str], before: Sample, after: Sample) -> list[dict[str, Any]]:
    """One row per instance: ``cpu_percent`` (100 = one core), ``memory_bytes``, ``memory_percent``,
    ``requests_per_second``, ``tokens_per_second``, ``pids``. None where it cannot be known."""
    span = after.at - before.at
    out = []
    for name in names:
        old, new = before.usage.get(name, Usage()), after.usage.get(name, Usage())
        cpu = None
        if span > 0 and old.cpu_s is not None and new.cpu_s is not None:
            cpu = max(0.0, (new.cpu_s - old.cpu_s) / span * 100.0)

        memory_percent = None
        if new.rss is not None and after.memory_total:
            memory_percent = new.rss / after.memory_total * 100.0
        out.append(
            {
                "name": name,
                "cpu_percent": cpu,
                "memory_bytes": new.rss,
                "memory_percent": memory_percent,
                "requests_per_second": _rate(name, before.requests, after.requests, span),
                "tokens_per_second": _rate(name, before.tokens, after.tokens, span),
                "pids": new.pids,
            }
        )
    return out


def _rate(name: str, before: dict[str, float], after: dict[str, float], span: float) -> float | None:
    """Per second over ``span``, from two readings of a counter; None without two readings."""
    if span <= 0 or name not in after:
        return None
    return max(0.0, (after[name] - before.get(name, 0.0)) / span)


def table(stat_rows: list[dict[str, Any]]):
    from rich.table import Table

    grid = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "CPU %", "MEM USAGE", "MEM %", "REQ/S", "TOK/S", "PIDS"):
        grid.add_column(column, no_wrap=True, justify="left" if column == "NAME" else "right")
    for row in stat_rows:
        grid.add_row(
            row["name"],
            _fixed(row["cpu_percent"], "%"),
            _bytes(row["memory_bytes"]),
            _fixed(row["memory_percent"], "%"),
            _fixed(row["requests_per_second"]),
            _fixed(row["tokens_per_second"]),
            str(row["pids"]),
        )
    return grid


def _fixed(value: float | None, unit: str = "") -> str:
    return "--" if value is None else f"{value:.2f}{unit}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "--"
    if value < 1024:
        return f"{value}B"
    scaled = value / 1024
    for unit in ("KiB", "MiB"):
        if scaled < 1024:
            return f"{scaled:.1f}{unit}"
        scaled /= 1024
    return f"{scaled:.1f}GiB"
