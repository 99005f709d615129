"""The router's pure decisions, as tables: replica choice, eviction, admission, memory estimates, counters."""

from __future__ import annotations

import json

import pytest

from llama_orchestrator.domain.routing import (
    FALLBACK_KV_BYTES_PER_TOKEN,
    MIB,
    OVERHEAD_MB,
    Admission,
    Histogram,
    ModelShape,
    Replica,
    Resident,
    TokenReport,
    admit,
    choose_evictions,
    error_body,
    estimate_memory_mb,
    kv_bytes_per_token,
    pick_replica,
    retry_after_s,
    sse_token_report,
    token_report,
)

R = Replica

PICKS = [
    ("nothing to pick", [], None),
    ("one", [R("a")], "a"),
    ("fewest in flight among loaded", [R("a", 2, limit=4, loaded=True), R("b", 1, limit=4, loaded=True)], "b"),
    ("tie: least recently picked", [R("a", loaded=True, last_picked=5), R("b", loaded=True, last_picked=3)], "b"),
    ("tie, never picked: by name", [R("b", loaded=True), R("a", loaded=True)], "a"),
    (
        "a loaded one with a free slot beats starting another",
        [R("a", 1, limit=2, loaded=True), R("b", 0, loaded=False)],
        "a",
    ),
    ("all loaded ones full: start a stopped one", [R("a", 2, limit=2, loaded=True), R("b")], "b"),
    (
        "full, and the stopped one cannot start: shortest wait",
        [R("a", 2, 3, limit=2, loaded=True), R("b", 2, 1, limit=2, loaded=True), R("c", startable=False)],
        "b",
    ),
    ("a replica taken out is skipped", [R("a", loaded=True, up=False), R("b", 3, limit=4, loaded=True)], "b"),
    (
        "a down replica loses even to a full one",
        [R("a", loaded=True, up=False), R("b", 9, 9, limit=1, loaded=True)],
        "b",
    ),
    ("all down: still try one", [R("a", 1, loaded=True, up=False), R("b", 0, loaded=True, up=False)], "b"),
    ("stopped and not startable, vs full", [R("a", startable=False), R("b", 1, limit=1, loaded=True)], "b"),
]


@pytest.mark.parametrize(("why", "replicas", "expected"), PICKS, ids=[p[0] for p in PICKS])
def test_pick_replica(why: str, replicas: list[Replica], expected: str | None) -> None:
    assert pick_replica(replicas) == expected


def res(name: str, last_used: float, mb: float = 100, *, busy: bool = False, pinned: bool = False) -> Resident:
    return Resident(name, last_used, busy, pinned, mb)


EVICTIONS = [
    ("no limits", [res("a", 1)], None, None, 100, []),
    ("room under max_loaded", [res("a", 1)], 2, None, 100, []),
    ("max_loaded: the least recently used goes", [res("a", 5), res("b", 1), res("c", 3)], 3, None, 0, ["b"]),
    ("max_loaded 1", [res("a", 5)], 1, None, 0, ["a"]),
    ("pinned never", [res("a", 1, pinned=True), res("b", 2)], 2, None, 0, ["b"]),
    ("busy never", [res("a", 1, busy=True), res("b", 2)], 2, None, 0, ["b"]),
    ("nothing evictable: impossible", [res("a", 1, busy=True), res("b", 2, pinned=True)], 2, None, 0, None),
    (
        "budget: as many as needed, LRU first",
        [res("a", 1, 300), res("b", 2, 300), res("c", 3, 300)],
        None,
        1000,
        500,
        ["a", "b"],
    ),
    ("budget fits already", [res("a", 1, 300)], None, 1000, 500, []),
    (
        "budget: pinned skipped, the next oldest goes",
        [res("p", 0, 400, pinned=True), res("a", 1, 300), res("b", 2, 300)],
        None,
        1000,
        300,
        ["a"],
    ),
    (
        "budget impossible while the big one is busy",
        [res("big", 1, 800, busy=True), res("a", 2, 100)],
        None,
        1000,
        300,
        None,
    ),
    ("over the budget alone", [], None, 1000, 1500, None),
    ("both limits: the stricter decides", [res("a", 1, 10), res("b", 2, 10)], 2, 10_000, 10, ["a"]),
    ("equal last use: by name", [res("b", 1), res("a", 1)], 2, None, 0, ["a"]),
]


@pytest.mark.parametrize(
    ("why", "loaded", "max_loaded", "budget", "need", "expected"), EVICTIONS, ids=[e[0] for e in EVICTIONS]
)
def test_choose_evictions(why, loaded, max_loaded, budget, need, expected) -> None:
    assert choose_evictions(loaded, max_loaded=max_loaded, budget_mb=budget, need_mb=need) == expected


ADMISSIONS = [
    (0, 1, 0, 5, Admission.run),
    (1, 2, 0, 5, Admission.run),
    (1, 1, 0, 5, Admission.queue),
    (1, 1, 4, 5, Admission.queue),
    (1, 1, 5, 5, Admission.reject),
    (1, 1, 0, 0, Admission.reject),  # queue 0: straight to 429
    (0, 1, 1, 5, Admission.queue),  # someone waits already: no overtaking
]


@pytest.mark.parametrize(("in_flight", "limit", "queued", "queue_max", "expected"), ADMISSIONS)
def test_admit(in_flight: int, limit: int, queued: int, queue_max: int, expected: Admission) -> None:
    assert admit(in_flight=in_flight, limit=limit, queued=queued, queue_max=queue_max) is expected


@pytest.mark.parametrize(
    ("queued", "limit", "typical", "expected"),
    [
        (0, 1, None, 1),
        (5, 1, None, 5),
        (5, 1, 2.0, 10),
        (8, 4, 3.0, 6),
        (3, 1, 0.1, 1),
        (10_000, 1, 60, 600),
    ],
)
def test_retry_after(queued: int, limit: int, typical: float | None, expected: int) -> None:
    assert retry_after_s(queued=queued, limit=limit, typical_s=typical) == expected


MEMORY = [
    # Llama-3-8B-like: 32 layers, 4096 wide, 32 heads, 8 KV heads -> 128 KiB per token
    ("gqa", ModelShape(32, 4096, 32, 8), 128 * 1024),
    ("no gqa: kv heads = heads", ModelShape(32, 4096, 32), 512 * 1024),
    ("tiny test model", ModelShape(2, 64, 4, 4), 2 * 4 * 32 * 2),
    ("explicit head sizes", ModelShape(10, 1000, 10, 2, 128, 64), 10 * 2 * 192 * 2),
    ("unknown shape", None, FALLBACK_KV_BYTES_PER_TOKEN),
    ("broken shape", ModelShape(0, 0, 0), FALLBACK_KV_BYTES_PER_TOKEN),
]


@pytest.mark.parametrize(("why", "shape", "per_token"), MEMORY, ids=[m[0] for m in MEMORY])
def test_kv_bytes_per_token(why: str, shape: ModelShape | None, per_token: float) -> None:
    assert kv_bytes_per_token(shape) == per_token


def test_estimate_memory_is_weights_plus_kv_plus_overhead() -> None:
    file_bytes = 4_000 * MIB
    assert estimate_memory_mb(file_bytes, 8192, ModelShape(32, 4096, 32, 8)) == 4_000 + 1_024 + OVERHEAD_MB
    assert estimate_memory_mb(0, 0) == OVERHEAD_MB
    # Context is what users change most: twice the context, twice the KV.
    small, big = estimate_memory_mb(file_bytes, 4096), estimate_memory_mb(file_bytes, 8192)
    assert big - small == 512


def test_histogram_is_cumulative_like_prometheus() -> None:
    h = Histogram(buckets=(0.1, 1, 10))
    for value in (0.05, 0.1, 0.5, 20):
        h.observe(value)
    assert h.counts == [2, 3, 3] and h.count == 4 and h.sum == pytest.approx(20.65)
    copy = h.copy()
    h.observe(1)
    assert copy.counts == [2, 3, 3] and h.counts == [2, 4, 4]
    assert Histogram().mean() is None


TOKENS = [
    (
        "usage and timings",
        {"usage": {"completion_tokens": 7}, "timings": {"predicted_per_second": 42.5}},
        2.0,
        TokenReport(7, 42.5),
    ),
    ("usage only: speed over the elapsed time", {"usage": {"completion_tokens": 8}}, 2.0, TokenReport(8, 4.0)),
    (
        "timings only (llama-server's stream)",
        {"timings": {"predicted_n": 4, "predicted_per_second": 100}},
        None,
        TokenReport(4, 100.0),
    ),
    ("nothing about tokens", {"choices": []}, 1.0, None),
    ("not an object", [1, 2], 1.0, None),
    ("garbage types", {"usage": "x", "timings": {"predicted_per_second": "fast"}}, 1.0, None),
]


@pytest.mark.parametrize(("why", "payload", "elapsed", "expected"), TOKENS, ids=[t[0] for t in TOKENS])
def test_token_report(why: str, payload: object, elapsed: float | None, expected: TokenReport | None) -> None:
    assert token_report(payload, elapsed_s=elapsed) == expected


def test_sse_token_report_reads_the_last_events() -> None:
    finish = {"choices": [{"delta": {}, "finish_reason": "stop"}], "timings": {"predicted_per_second": 50.0}}
    usage = {"choices": [], "usage": {"completion_tokens": 12}}
    tail = b'ntent":"x"}}]}\n\ndata: ' + json.dumps(finish).encode() + b"\n\ndata: " + json.dumps(usage).encode()
    tail += b"\n\ndata: [DONE]\n\n"
    assert sse_token_report(tail) == TokenReport(12, 50.0)
    assert sse_token_report(b"data: [DONE]\n\n") is None
    only_usage = b"data: " + json.dumps(usage).encode() + b"\n\n"
    assert sse_token_report(only_usage, elapsed_s=3.0) == TokenReport(12, 4.0)


def test_error_body_is_openai_format() -> None:
    assert error_body("nope", "invalid_request_error", "model_not_found") == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": None, "code": "model_not_found"}
    }
    assert error_body("bad", "invalid_request_error", "invalid_parameter", "limit")["error"]["param"] == "limit"
