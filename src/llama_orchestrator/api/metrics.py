"""``/metrics``: Prometheus text format 0.0.4, every instance in one scrape, labelled ``model_name``.

Not ``instance``: Prometheus sets that label itself, to the scraped target (``host:port`` of the daemon), and a
scrape of ours would have been stored as ``exported_instance``. ``model_name`` is vLLM's label for the same thing:
the name a client puts in ``model`` (every instance is listed under its name in /v1/models).

Two sources: the instance records (status, health, restarts; what `ps` shows) and the router's per-instance
statistics (requests by status code, latency histogram, tokens, queue, in flight). The router's statistics are read
by attribute name (``services.router.InstanceStats``) and every one is optional, so a router with fewer or more
counters never breaks a scrape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from llama_orchestrator.domain.states import Health, Status

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "llama_orch"
LABEL = "model_name"  # the instance's name (see the module's docstring)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float]],
        *,
        suffix_samples: Iterable[tuple[str, dict[str, str], float]] = (),
    ) -> None:
        full = f"{PREFIX}_{name}"
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self.lines.append(f"{full}{_labels(labels)} {_number(value)}")
        for suffix, labels, value in suffix_samples:
            self.lines.append(f"{full}{suffix}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``obj`` has (attribute or mapping key)."""
    for name in names:
        if isinstance(obj, Mapping):
            if name in obj:
                return obj[name]
        elif hasattr(obj, name):
            return getattr(obj, name)
    return default


def _histogram(stats: Any, name: str = "duration") -> tuple[float, int, list[tuple[float, int]]] | None:
    """``(sum, count, cumulative buckets)`` of one of the router's histograms (``domain.routing.Histogram``:
    ``buckets`` are the upper bounds, ``counts`` the cumulative counts, ``count`` the +Inf bucket)."""
    hist = _get(stats, name)
    if hist is None:
        return None
    total = float(_get(hist, "sum", default=0.0) or 0.0)
    count = int(_get(hist, "count", default=0) or 0)
    bounds = _get(hist, "buckets", default=()) or ()
    counts = _get(hist, "counts", default=()) or ()
    pairs = sorted((float(b), int(c)) for b, c in zip(bounds, counts, strict=False))
    if not pairs or not math.isinf(pairs[-1][0]):
        pairs.append((math.inf, count))
    return total, count, pairs


def render_metrics(
    records: list[dict[str, Any]],
    stats: Mapping[str, Any],
    daemon: Mapping[str, Any],
    *,
    now: float,
    router_now: float | None = None,
    totals: Mapping[str, Any] | None = None,
) -> str:
    """The whole scrape. ``records``: `ps` records; ``stats``: the router's ``InstanceStats`` by instance (may be
    empty); ``router_now``: the router's clock now, against which its ``last_used`` times are read; ``totals``:
    the router's own counters (``Router.totals``)."""
    out = _Writer()
    version = str(daemon.get("version", ""))
    out.family(
        "daemon_info",
        "gauge",
        "The daemon: version and pid (value always 1).",
        [({"version": version, "pid": str(daemon.get("pid", ""))}, 1)],
    )
    started = daemon.get("started_at")
    if started:
        out.family("daemon_start_time_seconds", "gauge", "Unix time the daemon started.", [({}, float(started))])
        out.family(
            "daemon_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            [({}, max(0.0, now - float(started)))],
        )
    names = sorted({r["name"] for r in records} | set(stats))
    by_name = {r["name"]: r for r in records}
    out.family("instances", "gauge", "Instances known to the daemon.", [({}, len(names))])

    def each(value_of) -> list[tuple[dict[str, str], float]]:
        samples = []
        for name in names:
            value = value_of(name)
            if value is not None:
                samples.append(({LABEL: name}, value))
        return samples

    def record(name: str, key: str) -> Any:
        return by_name.get(name, {}).get(key)

    active = ("starting", "running", "stopping")
    out.family(
        "instance_up",
        "gauge",
        "1 while the instance's process runs (starting, running or stopping).",
        each(lambda n: 1 if record(n, "status") in active else 0),
    )
    out.family(
        "instance_healthy",
        "gauge",
        "1 when the last health check answered 200.",
        each(lambda n: 1 if record(n, "health") == Health.healthy and record(n, "status") in active else 0),
    )
    out.family(
        "instance_health",
        "gauge",
        "Health state of the instance: 1 for the current state, 0 for the others.",
        [({LABEL: n, "health": h.value}, 1 if record(n, "health") == h.value else 0) for n in names for h in Health],
    )
    statuses = [s.value for s in Status] + ["invalid-config"]
    out.family(
        "instance_status",
        "gauge",
        "Lifecycle state of the instance: 1 for the current state, 0 for the others.",
        [({LABEL: n, "status": s}, 1 if record(n, "status") == s else 0) for n in names for s in statuses],
    )
    out.family(
        "instance_restarts_total",
        "counter",
        "Restarts done by the supervisor.",
        each(lambda n: int(record(n, "restarts") or 0)),
    )
    out.family(
        "instance_uptime_seconds",
        "gauge",
        "Seconds since the current process started.",
        each(lambda n: record(n, "uptime_s")),
    )

    def stat(name: str, *keys: str) -> Any:
        return _get(stats[name], *keys) if name in stats else None

    requests = []
    for name in names:
        by_endpoint = stat(name, "requests_by_endpoint") or {
            ("other", code): count for code, count in (stat(name, "requests_total") or {}).items()
        }
        for (endpoint, code), count in sorted(by_endpoint.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            requests.append(({LABEL: name, "endpoint": endpoint, "code": str(code)}, int(count)))
    out.family(
        "instance_requests_total",
        "counter",
        "Requests the router relayed, by endpoint and HTTP status code (499: the client left first).",
        requests,
    )

    def histogram(metric: str, attr: str, help_text: str) -> None:
        lines: list[tuple[str, dict[str, str], float]] = []
        for name in names:
            hist = _histogram(stats[name], attr) if name in stats else None
            if hist is None:
                continue
            total, count, buckets = hist
            for bound, cumulative in buckets:
                lines.append(("_bucket", {LABEL: name, "le": _le(bound)}, cumulative))
            lines.append(("_sum", {LABEL: name}, total))
            lines.append(("_count", {LABEL: name}, count))
        out.family(metric, "histogram", help_text, [], suffix_samples=lines)

    histogram("instance_request_duration_seconds", "duration", "Time from request to the end of the answer.")
    histogram(
        "instance_time_to_first_token_seconds",
        "time_to_first_token",
        "Time from request to the first streamed bytes of the answer (streamed answers only).",
    )
    unknown = (totals or {}).get("unknown_model_requests") or {}
    out.family(
        "unknown_model_requests_total",
        "counter",
        "Requests for a model no instance or alias serves (answered 404), by endpoint.",
        [({"endpoint": e}, int(c)) for e, c in sorted(unknown.items())],
    )
    peers = (totals or {}).get("peers") or []  # other nodes (issue 12), labelled node
    if peers:
        out.family(
            "peer_up",
            "gauge",
            "1 while the peer node answers its /v1/models.",
            [({"node": p["name"]}, 1 if p["up"] else 0) for p in peers],
        )
        out.family(
            "peer_requests_total",
            "counter",
            "Requests relayed to a peer node, by HTTP status (503: it was down, 429: its queue here was full).",
            [({"node": p["name"], "code": str(code)}, n) for p in peers for code, n in sorted(p["requests"].items())],
        )
        out.family(
            "peer_in_flight",
            "gauge",
            "Requests being relayed to the peer node now.",
            [({"node": p["name"]}, p["in_flight"]) for p in peers],
        )
        out.family(
            "peer_probe_latency_seconds",
            "gauge",
            "Round trip of the last successful probe of the peer node.",
            [({"node": p["name"]}, p["latency_ms"] / 1000) for p in peers if p["latency_ms"] is not None],
        )
        out.family(
            "peer_probe_failures_total",
            "counter",
            "Probes of the peer node that failed.",
            [({"node": p["name"]}, p["probes_failed"]) for p in peers],
        )
        out.family(
            "peer_queued",
            "gauge",
            "Requests waiting here for one of the peer node's slots (peers[].concurrency).",
            [({"node": p["name"]}, p.get("queued", 0)) for p in peers],
        )
        out.family(
            "peer_failures_total",
            "counter",
            "Answers that counted as a failure of the peer node, by kind: connect, disconnect (cut before any "
            "byte), http_502, http_504.",
            [({"node": p["name"], "kind": k}, n) for p in peers for k, n in sorted((p.get("failures") or {}).items())],
        )
        out.family(
            "peer_retried_total",
            "counter",
            "Requests sent to another replica after the peer node failed them.",
            [({"node": p["name"]}, p.get("retried", 0)) for p in peers],
        )

    out.family(
        "instance_prompt_tokens_total",
        "counter",
        "Prompt tokens processed (from usage).",
        each(lambda n: stat(n, "prompt_tokens_total")),
    )
    out.family(
        "instance_completion_tokens_total",
        "counter",
        "Completion tokens generated (from usage).",
        each(lambda n: stat(n, "completion_tokens_total")),
    )
    out.family(
        "instance_tokens_per_second",
        "gauge",
        "Generation speed of the last completed request.",
        each(lambda n: stat(n, "last_tokens_per_second")),
    )
    out.family("instance_queue_depth", "gauge", "Requests waiting for a free slot.", each(lambda n: stat(n, "queued")))
    out.family("instance_in_flight", "gauge", "Requests being answered now.", each(lambda n: stat(n, "in_flight")))
    out.family(
        "instance_loaded",
        "gauge",
        "1 when the router considers the model loaded.",
        each(lambda n: None if stat(n, "loaded") is None else (1 if stat(n, "loaded") else 0)),
    )

    def idle(name: str) -> float | None:
        last = stat(name, "last_used")
        return None if last is None or router_now is None else max(0.0, router_now - float(last))

    out.family("instance_idle_seconds", "gauge", "Seconds since the router last relayed a request to it.", each(idle))
    out.family(
        "instance_on_demand_starts_total",
        "counter",
        "Starts the router made for a request.",
        each(lambda n: stat(n, "starts_total")),
    )
    out.family(
        "instance_evictions_total",
        "counter",
        "Stops the router made to make room for another model.",
        each(lambda n: stat(n, "evictions_total")),
    )
    out.family(
        "instance_ttl_unloads_total",
        "counter",
        "Stops the router made after `ttl` idle seconds.",
        each(lambda n: stat(n, "ttl_unloads_total")),
    )
    return out.text()
