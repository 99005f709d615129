"""One health check of one instance, from the CLI: probe, record the result, move `starting` to `running`.

The daemon keeps a ``HealthTracker`` per instance across probes (consecutive failures, start period); a single
check from the CLI (`health`, `up --wait`, `ps` on a starting instance) judges one probe on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.health import ProbeOutcome, classify
from llama_orchestrator.domain.states import Health, Status

if TYPE_CHECKING:
    from llama_orchestrator.adapters.store import InstanceRow
    from llama_orchestrator.services.instances import InstanceService

Probe = Callable[[str, str, float], ProbeOutcome]


@dataclass(frozen=True)
class CheckResult:
    health: Health
    outcome: ProbeOutcome
    checked_at: float


def base_url(config: InstanceConfig, port: int | None = None) -> str:
    """Where the instance answers; ``port``: the one its process was started on, when it differs from the file's."""
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - recognising a wildcard, not binding one
        host = "127.0.0.1"  # a server on all interfaces answers on loopback
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port or config.server.port}"


def default_probe(url: str, path: str, timeout: float) -> ProbeOutcome:
    from llama_orchestrator.adapters.health_probe import probe_light

    return probe_light(url, path, timeout)


def judge_single(outcome: ProbeOutcome, in_start_period: bool) -> Health:
    verdict = classify(outcome)
    if verdict == "ok":
        return Health.healthy
    if verdict == "loading":
        return Health.loading
    # No answer yet while it is still starting is expected: the server has not opened its port.
    return Health.unknown if in_start_period else Health.unhealthy


def check_once(
    service: InstanceService, name: str, config: InstanceConfig, row: InstanceRow, *, probe: Probe | None = None
) -> CheckResult:
    outcome = (probe or default_probe)(base_url(config, row.port), config.healthcheck.path, config.healthcheck.timeout)
    now = service.clock()
    in_start = row.started_at is not None and now - row.started_at < config.healthcheck.start_period
    health = judge_single(outcome, in_start and row.status == Status.starting)
    changes: dict[str, Any] = {  # Store.update keyword arguments
        "health": health,
        "health_checked_at": now,
        "health_latency_ms": outcome.latency_ms,
        "health_error": None if health == Health.healthy else outcome.describe(),
    }
    became_running = False
    if health == Health.healthy and row.status == Status.starting:
        became_running = service.store.transition(
            name,
            Status.starting,
            Status.running,
            only_if={"pid": row.pid},
            now=now,
            event=("healthy", f"answering on port {config.server.port}"),
            last_error=None,
            **changes,
        )
    if not became_running:
        service.store.update(name, only_if={"pid": row.pid}, **changes)
    return CheckResult(health, outcome, now)


def quick_probe(url: str, path: str, timeout: float) -> ProbeOutcome:
    """A probe for someone waiting on the screen: at most half a second."""
    return default_probe(url, path, min(timeout, 0.5))


def probe_starting(service: InstanceService, views: list, probe: Probe = quick_probe) -> None:
    """One quick probe of the `starting` instances among ``views`` moves those that answer to `running` now (``ps``,
    the dashboard): without a daemon nobody else would, and the daemon's own probe may be an interval away.
    Updates each probed view's row in place."""
    starting = [v for v in views if v.row.status == Status.starting and v.config is not None]
    if not starting:
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(starting))) as pool:
        list(pool.map(lambda v: check_once(service, v.name, v.config, v.row, probe=probe), starting))
    for view in starting:
        view.row = service.store.get(view.name) or view.row
