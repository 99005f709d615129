"""``/metrics``: Prometheus text 0.0.4 for every instance in one scrape, checked with a strict parser of our own
(and with ``prometheus_client``'s when it is installed)."""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import Cli

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')


@dataclass
class Family:
    kind: str = "untyped"
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse(text: str) -> dict[str, Family]:
    """Text format 0.0.4, strictly: HELP and TYPE before samples, samples of declared families only, label syntax,
    numeric values, cumulative histogram buckets ending at +Inf == _count."""
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith(("# HELP ", "# TYPE ")):
            _, keyword, name, rest = line.split(" ", 3)
            assert METRIC_NAME.fullmatch(name), line
            family = families.setdefault(name, Family())
            assert not family.samples, f"{keyword} after samples: {line}"
            if keyword == "TYPE":
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), line
                family.kind = rest
            else:
                family.help = rest
            continue
        assert not line.startswith("#"), line
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        assert match, f"bad sample line: {line!r}"
        name, _, label_text, value = match.groups()
        labels: dict[str, str] = {}
        if label_text:
            consumed = 0
            for label in LABEL.finditer(label_text):
                assert label.start() == consumed, f"bad labels: {line!r}"
                labels[label.group(1)] = label.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                consumed = label.end() + (1 if label_text[label.end() : label.end() + 1] == "," else 0)
            assert consumed == len(label_text), f"bad labels: {line!r}"
        owner = next((n for n in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if n in families), None)
        assert owner is not None, f"sample of an undeclared family: {line!r}"
        families[owner].samples.append((name, labels, float(value)))
    for name, family in families.items():
        if family.kind == "histogram":
            series: dict[tuple, list[tuple[float, float]]] = {}
            counts: dict[tuple, float] = {}
            for sample, labels, value in family.samples:
                key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                if sample.endswith("_bucket"):
                    series.setdefault(key, []).append((float(labels["le"]), value))
                elif sample.endswith("_count"):
                    counts[key] = value
            for key, buckets in series.items():
                assert [b for b, _ in buckets] == sorted(b for b, _ in buckets), name
                assert all(a <= b for (_, a), (_, b) in itertools.pairwise(buckets)), f"{name} not cumulative"
                assert math.isinf(buckets[-1][0]) and buckets[-1][1] == counts[key], name
    return families


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    """The value of the sample ``name`` (a family's name, or with _bucket/_sum/_count) whose labels include these."""
    family = families.get(name) or families[re.sub(r"_(bucket|sum|count)$", "", name)]
    for sample, sample_labels, number in family.samples:
        if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            return number
    raise KeyError(f"{name}{labels}")


# -- rendering, from records and router statistics ------------------------------------------------------------------


def records() -> list[dict]:
    return [
        {"name": "alpha", "status": "running", "health": "healthy", "restarts": 2, "uptime_s": 12.5},
        {"name": "beta", "status": "exited", "health": "unknown", "restarts": 0, "uptime_s": None},
        {"name": "gamma", "status": "invalid-config", "health": "unknown", "restarts": 0, "uptime_s": None},
    ]


def router_stats() -> dict:
    from llama_orchestrator.domain.routing import Histogram

    hist = Histogram()
    for seconds in (0.004, 0.2, 0.2, 3.0, 10_000.0):
        hist.observe(seconds)
    try:
        from llama_orchestrator.services.router import InstanceStats
    except ImportError:  # the router's own module: a plain object with the same attributes stands in
        from types import SimpleNamespace as InstanceStats  # type: ignore[assignment]
    return {
        "alpha": InstanceStats(
            requests_total={200: 4, 429: 1},
            in_flight=2,
            queued=3,
            loaded=True,
            last_used=90.0,
            duration=hist,
            completion_tokens_total=321,
            last_tokens_per_second=42.5,
        ),
    }


def test_every_instance_in_one_scrape_with_model_name_labels() -> None:
    from llama_orchestrator.api.metrics import render_metrics

    text = render_metrics(
        records(), router_stats(), {"version": "9.9", "pid": 42, "started_at": 1000.0}, now=1060.0, router_now=100.0
    )
    families = parse(text)
    assert value(families, "llama_orch_daemon_info", version="9.9", pid="42") == 1
    assert value(families, "llama_orch_daemon_uptime_seconds") == 60
    assert value(families, "llama_orch_instances") == 3
    assert [value(families, "llama_orch_instance_up", model_name=n) for n in ("alpha", "beta", "gamma")] == [1, 0, 0]
    assert value(families, "llama_orch_instance_health", model_name="alpha", health="healthy") == 1
    assert value(families, "llama_orch_instance_health", model_name="alpha", health="unhealthy") == 0
    assert value(families, "llama_orch_instance_status", model_name="beta", status="exited") == 1
    assert value(families, "llama_orch_instance_status", model_name="gamma", status="invalid-config") == 1
    assert families["llama_orch_instance_restarts_total"].kind == "counter"
    assert value(families, "llama_orch_instance_restarts_total", model_name="alpha") == 2
    assert value(families, "llama_orch_instance_requests_total", model_name="alpha", code="429") == 1
    assert value(families, "llama_orch_instance_tokens_per_second", model_name="alpha") == 42.5
    assert value(families, "llama_orch_instance_completion_tokens_total", model_name="alpha") == 321
    assert value(families, "llama_orch_instance_queue_depth", model_name="alpha") == 3
    assert value(families, "llama_orch_instance_in_flight", model_name="alpha") == 2
    assert value(families, "llama_orch_instance_idle_seconds", model_name="alpha") == 10
    duration = families["llama_orch_instance_request_duration_seconds"]
    assert duration.kind == "histogram"
    buckets = {s[1]["le"]: s[2] for s in duration.samples if s[0].endswith("_bucket")}
    assert buckets["+Inf"] == 5 and buckets["0.005"] == 1 and buckets["0.25"] == 3
    assert value(families, "llama_orch_instance_request_duration_seconds_count", model_name="alpha") == 5
    # No router statistics for an instance: no made-up zeros for it.
    assert not [s for s in families["llama_orch_instance_in_flight"].samples if s[1]["model_name"] == "beta"]


def test_no_sample_carries_a_label_prometheus_sets_on_the_target() -> None:
    """A scrape adds `instance` (host:port) and `job` to every sample; a sample that brings its own is stored as
    `exported_instance`/`exported_job` (honor_labels: false, the default), and the per-instance label is lost."""
    from llama_orchestrator.api.metrics import render_metrics

    text = render_metrics(
        records(),
        router_stats(),
        {"version": "1", "pid": 1, "started_at": 1.0},
        now=2.0,
        totals={"unknown_model_requests": {"/v1/chat/completions": 2}},
    )
    labels = {k for family in parse(text).values() for _, sample_labels, _ in family.samples for k in sample_labels}
    assert "model_name" in labels
    assert not labels & {"instance", "job"}
    assert not [k for k in labels if k.startswith("__")]


def test_requests_by_endpoint_time_to_first_token_prompt_tokens_and_unknown_models() -> None:
    from llama_orchestrator.api.metrics import render_metrics
    from llama_orchestrator.domain.routing import Histogram
    from llama_orchestrator.services.router import InstanceStats

    ttft = Histogram()
    ttft.observe(0.02)
    ttft.observe(0.3)
    stats = {
        "alpha": InstanceStats(
            requests_total={200: 3, 404: 1},
            in_flight=0,
            queued=0,
            loaded=True,
            last_used=None,
            duration=Histogram(),
            completion_tokens_total=9,
            last_tokens_per_second=None,
            prompt_tokens_total=17,
            time_to_first_token=ttft,
            requests_by_endpoint={("/v1/chat/completions", 200): 2, ("/v1/embeddings", 200): 1, ("other", 404): 1},
        )
    }
    families = parse(
        render_metrics(records()[:1], stats, {}, now=0.0, totals={"unknown_model_requests": {"/v1/completions": 4}})
    )
    requests = "llama_orch_instance_requests_total"
    assert value(families, requests, model_name="alpha", endpoint="/v1/chat/completions", code="200") == 2
    assert value(families, requests, model_name="alpha", endpoint="/v1/embeddings", code="200") == 1
    assert value(families, requests, model_name="alpha", endpoint="other", code="404") == 1
    first = families["llama_orch_instance_time_to_first_token_seconds"]
    assert first.kind == "histogram"
    assert value(families, "llama_orch_instance_time_to_first_token_seconds_bucket", le="0.025") == 1
    assert value(families, "llama_orch_instance_time_to_first_token_seconds_count", model_name="alpha") == 2
    assert families["llama_orch_instance_prompt_tokens_total"].kind == "counter"
    assert value(families, "llama_orch_instance_prompt_tokens_total", model_name="alpha") == 17
    assert families["llama_orch_unknown_model_requests_total"].kind == "counter"
    assert value(families, "llama_orch_unknown_model_requests_total", endpoint="/v1/completions") == 4


def promtool() -> str:
    import shutil

    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (Debian: apt-get install -y prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message + ": in CI the promtool check must run")
        pytest.skip(message)
    return found


def promtool_check(text: str) -> str:
    """`promtool check metrics` on ``text``: its complaints (lint included), empty when clean."""
    import subprocess

    done = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 3) or done.stderr, done  # 3: lint problems, listed on stdout/stderr
    return (done.stdout + done.stderr).strip() if done.returncode else ""


def test_promtool_finds_the_scrape_clean() -> None:
    from llama_orchestrator.api.metrics import render_metrics

    text = render_metrics(
        records(),
        router_stats(),
        {"version": "1", "pid": 1, "started_at": 1.0},
        now=2.0,
        router_now=3.0,
        totals={"unknown_model_requests": {"/v1/chat/completions": 1}},
    )
    assert promtool_check(text) == ""
    # The check is real: a counter without `_total` is a lint problem it reports.
    assert promtool_check("# HELP x_requests Bad.\n# TYPE x_requests counter\nx_requests 1\n") != ""


def test_prometheus_client_reads_the_scrape() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    from llama_orchestrator.api.metrics import render_metrics

    text = render_metrics(records(), router_stats(), {"version": "1", "pid": 1, "started_at": 1.0}, now=2.0)
    parsed = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert parsed["llama_orch_instance_request_duration_seconds"].type == "histogram"
    assert parsed["llama_orch_instance_restarts"].type == "counter"  # the client drops `_total` from the name
    assert {s.labels["model_name"] for s in parsed["llama_orch_instance_up"].samples} == {"alpha", "beta", "gamma"}


def test_label_values_are_escaped() -> None:
    from llama_orchestrator.api.metrics import render_metrics

    text = render_metrics([], {}, {"version": 'a"b\\c\nd', "pid": 1}, now=0.0)
    assert value(parse(text), "llama_orch_daemon_info", version='a"b\\c\nd') == 1


def test_a_router_without_some_counters_does_not_break_a_scrape() -> None:
    from llama_orchestrator.api.metrics import render_metrics

    text = render_metrics(records()[:1], {"alpha": {"in_flight": 1}, "extra": object()}, {}, now=0.0)
    families = parse(text)
    assert value(families, "llama_orch_instance_in_flight", model_name="alpha") == 1
    assert value(families, "llama_orch_instance_up", model_name="extra") == 0


# -- a real daemon --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")
def test_the_daemon_serves_metrics_for_all_instances(cli: Cli, tiny_model: Path, fake_binary: Path) -> None:
    from test_api import add_instance, start_daemon

    add_instance(cli, "up-one", tiny_model, fake_binary)
    add_instance(cli, "down-one", tiny_model, fake_binary)
    daemon = start_daemon(cli)
    try:
        with daemon.client() as api:
            api.post("/api/instances/up-one/start", params={"wait": "true", "timeout": 30}).raise_for_status()
            # One request through the router: its counters reach the scrape.
            chat = api.post(
                "/v1/chat/completions", json={"model": "up-one", "messages": [{"role": "user", "content": "hi"}]}
            )
            assert chat.status_code == 200, chat.text
            stream = api.post("/v1/completions", json={"model": "up-one", "prompt": "one two", "stream": True})
            assert stream.status_code == 200 and "[DONE]" in stream.text, stream.text
            unknown = api.post("/v1/chat/completions", json={"model": "nobody", "messages": []})
            assert unknown.status_code == 404
            answer = api.get("/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = parse(answer.text)
        assert value(families, "llama_orch_instance_up", model_name="up-one") == 1
        assert value(families, "llama_orch_instance_up", model_name="down-one") == 0
        assert value(families, "llama_orch_instance_status", model_name="up-one", status="running") == 1
        assert value(families, "llama_orch_instance_status", model_name="down-one", status="stopped") == 1
        assert value(families, "llama_orch_instance_restarts_total", model_name="down-one") == 0
        assert value(families, "llama_orch_daemon_info", pid=str(daemon.pid())) == 1
        requests = "llama_orch_instance_requests_total"
        assert value(families, requests, model_name="up-one", endpoint="/v1/chat/completions", code="200") == 1
        assert value(families, requests, model_name="up-one", endpoint="/v1/completions", code="200") == 1
        assert value(families, "llama_orch_instance_request_duration_seconds_count", model_name="up-one") == 2
        assert value(families, "llama_orch_instance_time_to_first_token_seconds_count", model_name="up-one") == 1
        assert value(families, "llama_orch_instance_completion_tokens_total", model_name="up-one") > 0
        assert value(families, "llama_orch_instance_prompt_tokens_total", model_name="up-one") > 0
        assert value(families, "llama_orch_unknown_model_requests_total", endpoint="/v1/chat/completions") == 1
        if shutil.which("promtool"):
            assert promtool_check(answer.text) == ""
        assert httpx.get(daemon.url + "/metrics").status_code == 200  # no keys configured: open on loopback
    finally:
        cli.run("daemon", "stop", timeout=60)
        cli.run("down", "--all", "--timeout", "1", timeout=120)
