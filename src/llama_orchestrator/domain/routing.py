"""The router's decisions (SPEC §9), pure: which replica, what to evict, admit or queue, how much memory.

No I/O, no asyncio, time is an argument. ``services.router`` gathers the facts (in-flight counts, what is loaded,
file sizes) and acts on these answers; the tests in ``tests/test_routing.py`` are tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# -- replicas ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    """One instance that can answer a model name, as the router sees it now."""

    name: str
    in_flight: int = 0  # admitted requests (including those waiting for its start)
    queued: int = 0  # requests waiting for one of its slots
    limit: int = 1  # its concurrency limit
    loaded: bool = False  # its process runs (or is being started)
    up: bool = True  # False after a connect error / 5xx, until a health probe succeeds again
    startable: bool = True  # starting it now needs no eviction that is impossible
    last_picked: float = 0.0  # tie-break: the least recently picked first, so sequential requests alternate


def pick_replica(replicas: Sequence[Replica]) -> str | None:
    """The replica a new request goes to; None when there is none.

    In order of preference: a loaded replica with a free slot (fewest in flight); a stopped one that can be started
    without waiting (more demand than the loaded ones can take is worth another replica); a loaded but full one
    (fewest in flight + queued, so the wait is shortest); a stopped one that cannot be started yet. Replicas taken
    out after a failure come last, in the same order: with all of them out, the request still tries one (the
    failure may be over) rather than failing without trying.
    """
    if not replicas:
        return None

    def tier(r: Replica) -> int:
        if r.loaded and r.in_flight < r.limit:
            return 0
        if not r.loaded and r.startable:
            return 1
        if r.loaded:
            return 2
        return 3

    best = min(replicas, key=lambda r: (not r.up, tier(r), r.in_flight + r.queued, r.last_picked, r.name))
    return best.name


# -- eviction ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resident:
    """A loaded instance, as eviction sees it."""

    name: str
    last_used: float
    busy: bool = False  # requests in flight or queued, or a start/stop in progress: never evicted
    pinned: bool = False
    estimated_mb: float = 0.0


def choose_evictions(
    loaded: Iterable[Resident], *, max_loaded: int | None, budget_mb: float | None, need_mb: float
) -> list[str] | None:
    """Which instances to stop so one more (needing ``need_mb``) fits; [] when it fits already.

    Least recently used first; pinned and busy instances never. None when it cannot fit by evicting what may be
    evicted now (the caller waits for capacity, or reports that the model alone is over the budget).
    """
    residents = list(loaded)
    count = len(residents)
    used = sum(r.estimated_mb for r in residents)

    def fits() -> bool:
        return (max_loaded is None or count + 1 <= max_loaded) and (budget_mb is None or used + need_mb <= budget_mb)

    victims: list[str] = []
    evictable = sorted((r for r in residents if not r.pinned and not r.busy), key=lambda r: (r.last_used, r.name))
    for resident in evictable:
        if fits():
            break
        victims.append(resident.name)
        count -= 1
        used -= resident.estimated_mb
    return victims if fits() else None


# -- admission ---------------------------------------------------------------------------------------------------


class Admission(StrEnum):
    run = "run"  # a slot is free: go
    queue = "queue"  # wait for a slot
    reject = "reject"  # the queue is full: 429


def admit(*, in_flight: int, limit: int, queued: int, queue_max: int) -> Admission:
    """A new request's fate. While anyone waits, a newcomer queues behind them even if a slot just freed (FIFO)."""
    if in_flight < limit and queued == 0:
        return Admission.run
    if queued < queue_max:
        return Admission.queue
    return Admission.reject


def retry_after_s(*, queued: int, limit: int, typical_s: float | None) -> int:
    """A Retry-After hint in whole seconds: the queue ahead drained at the typical request duration (1 s unknown)."""
    per_request = typical_s if typical_s and typical_s > 0 else 1.0
    return max(1, min(600, math.ceil(per_request * max(1, queued) / max(1, limit))))


# -- memory ------------------------------------------------------------------------------------------------------

MIB = 1024 * 1024
# Compute buffers, the server's own allocations and the tokenizer: measured at 40-120 MiB for llama-server on CPU
# with the default batch size; one fixed figure keeps the estimate simple and errs on the high side for small models.
OVERHEAD_MB = 96.0
# Without the model's shape: 128 KiB of f16 K+V per token of context, what Llama-3-8B (32 layers, 8 KV heads of 128)
# needs. Most models people run locally are that size or smaller.
FALLBACK_KV_BYTES_PER_TOKEN = 128 * 1024


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache size depends on, from the GGUF metadata (``<arch>.block_count`` etc.)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int | None = None  # grouped-query attention: fewer K/V heads than query heads
    head_dim_k: int | None = None  # <arch>.attention.key_length, when the model says (else n_embd / n_head)
    head_dim_v: int | None = None


def kv_bytes_per_token(shape: ModelShape | None, *, bytes_per_element: float = 2.0) -> float:
    """K and V for one token in every layer: n_layer * n_head_kv * (head_dim_k + head_dim_v) * element size."""
    if shape is None or shape.n_layer <= 0 or shape.n_head <= 0:
        return float(FALLBACK_KV_BYTES_PER_TOKEN)
    head_dim = shape.n_embd / shape.n_head
    heads_kv = shape.n_head_kv or shape.n_head
    per_head = (shape.head_dim_k or head_dim) + (shape.head_dim_v or head_dim)
    return shape.n_layer * heads_kv * per_head * bytes_per_element


def estimate_memory_mb(file_bytes: int, context_size: int, shape: ModelShape | None = None) -> float:
    """Estimated resident memory of one llama-server, in MiB:

        weights (the GGUF file size: all of it is mapped and touched) + KV cache (f16 K and V for ``context_size``
        tokens, which llama-server allocates up front and shares among its --parallel slots) + a fixed overhead.

    K/V types other than f16 (``-ctk q8_0``) and GPU offload are not modelled: the budget is one number for the
    memory the models compete for.
    """
    kv = kv_bytes_per_token(shape) * context_size
    return round(file_bytes / MIB + kv / MIB + OVERHEAD_MB, 1)


# -- metrics -----------------------------------------------------------------------------------------------------

# Seconds. LLM requests run from milliseconds (embeddings) to minutes (long generations).
DURATION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class Histogram:
    """A Prometheus-style histogram: ``counts[i]`` is the number of observations <= ``buckets[i]`` (cumulative,
    as `_bucket{le=...}` is exported); ``count`` is the +Inf bucket."""

    buckets: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.sum, self.count)

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


@dataclass(frozen=True)
class TokenReport:
    completion_tokens: int | None
    tokens_per_second: float | None
    prompt_tokens: int | None = None  # usage.prompt_tokens, or llama-server's timings.prompt_n


def token_report(payload: object, *, elapsed_s: float | None = None) -> TokenReport | None:
    """Tokens generated and the generation speed, from a response object (``usage``, llama-server's ``timings``).

    ``timings.predicted_per_second`` is the server's own measurement; without it the speed is the completion tokens
    over ``elapsed_s``. None when the payload says nothing about tokens.
    """
    if not isinstance(payload, dict):
        return None
    raw_usage, raw_timings = payload.get("usage"), payload.get("timings")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    timings: dict[str, Any] = raw_timings if isinstance(raw_timings, dict) else {}
    tokens = usage.get("completion_tokens", timings.get("predicted_n"))
    speed = timings.get("predicted_per_second")
    prompt = usage.get("prompt_tokens", timings.get("prompt_n"))
    tokens = int(tokens) if isinstance(tokens, (int, float)) else None
    prompt = int(prompt) if isinstance(prompt, (int, float)) else None
    speed = float(speed) if isinstance(speed, (int, float)) and speed > 0 else None
    if speed is None and tokens and elapsed_s and elapsed_s > 0:
        speed = tokens / elapsed_s
    if tokens is None and speed is None and prompt is None:
        return None
    return TokenReport(tokens, speed, prompt)


def sse_token_report(tail: bytes, *, elapsed_s: float | None = None) -> TokenReport | None:
    """The token report of a stream, from its last bytes: the last `data:` events carrying usage or timings."""
    found: TokenReport | None = None
    tokens: int | None = None
    speed: float | None = None
    prompt: int | None = None
    for line in tail.split(b"\n"):
        # Only the events that carry the figures are parsed (the finish chunk, a usage chunk): not every token's.
        if not line.startswith(b"data:") or (b'"usage"' not in line and b'"timings"' not in line):
            continue
        try:
            report = token_report(json.loads(line[5:]))
        except ValueError:
            continue  # the first event in the tail may be cut
        if report is not None:
            found = report
            # llama-server may put timings in the finish chunk and usage in a last one: keep what each says.
            tokens = report.completion_tokens if report.completion_tokens is not None else tokens
            speed = report.tokens_per_second if report.tokens_per_second is not None else speed
            prompt = report.prompt_tokens if report.prompt_tokens is not None else prompt
    if found is None:
        return None
    if speed is None and tokens and elapsed_s and elapsed_s > 0:
        speed = tokens / elapsed_s
    return TokenReport(tokens, speed, prompt)


def error_body(message: str, type_: str, code: str | int | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, the body of every error answer (the router's, the control API's, the guard's):
    ``type`` a category (``invalid_request_error``, ``not_found_error``...), ``code`` what happened, ``param`` the
    request field at fault, if one is."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
