"""Other nodes' routers (issue 12): probing them for their models (with backoff while down), forwarding a request
for one of their models, and their counters for /metrics. The decisions are ``domain.peers``'; this is the I/O.

A request is relayed to the node's own /v1 as it came (the body's ``model`` rewritten only for ``node/model``), so
streaming, cancellation (closing our connection makes that node close its upstream) and its errors pass through.
Only failing to reach the node marks it down; its own 4xx/5xx answers are relayed as they are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llama_orchestrator.domain.peers import PeerView, candidates, pick, probe_delay
from llama_orchestrator.domain.settings import PeerSettings
from llama_orchestrator.services.upstream import Upstream, new_session, upstream_headers

log = logging.getLogger("llama_orchestrator.peers")
PROBE_TIMEOUT_S = 5.0
LOOP_TICK_S = 0.25


@dataclass
class PeerStats:
    requests: dict[int, int] = field(default_factory=dict)  # by HTTP status (499: the client left, 503: down)
    latency_s: float | None = None  # the last successful probe's round trip
    last_error: str | None = None
    probes_failed: int = 0


class PeerPool:
    def __init__(self, peers: Iterable[PeerSettings], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = {p.name: p for p in peers}
        self.views = {name: PeerView(name, aliases=list(p.aliases)) for name, p in self.config.items()}
        self.stats = {name: PeerStats() for name in self.config}
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.probe_due()  # the first answers before the first request, when the nodes are up
        self._task = asyncio.create_task(self._loop(), name="peers-probe")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(LOOP_TICK_S)
            try:
                await self.probe_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad probe round must not end probing
                log.exception("peer probing failed")

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session()
        return self._session

    # -- probing ---------------------------------------------------------------------------------------------

    async def probe_due(self) -> None:
        now = self.clock()
        due = [name for name, view in self.views.items() if view.next_probe_at <= now]
        if due:
            await asyncio.gather(*(self.probe(name) for name in due))

    async def probe(self, name: str) -> None:
        """GET the node's /v1/models: up with its models, or down with the next probe backed off."""
        view, stats, peer = self.views[name], self.stats[name], self.config[name]
        began = self.clock()
        try:
            async with self.session().get(
                peer.url.rstrip("/") + "/v1/models",
                headers=self._auth(peer),
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"/v1/models answered HTTP {resp.status}")
                data = (await resp.json(content_type=None)).get("data") or []
        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError, AttributeError) as exc:
            self._down(name, f"{type(exc).__name__}: {exc}")
            stats.probes_failed += 1
            return
        # Only its own models: what it serves from its peers is theirs to list (no loops between nodes).
        view.models = [m["id"] for m in data if isinstance(m, dict) and m.get("id") and not m.get("node")]
        if not view.up:
            log.info("peer %s is up (%d models)", name, len(view.models))
        view.up, view.failures = True, 0
        stats.latency_s, stats.last_error = self.clock() - began, None
        view.next_probe_at = self.clock() + probe_delay(0)

    def _down(self, name: str, why: str) -> None:
        view = self.views[name]
        if view.up or view.failures == 0:
            log.warning("peer %s is down (%s); probing it back with backoff", name, why)
        view.up = False
        view.failures += 1
        view.next_probe_at = self.clock() + probe_delay(view.failures)
        self.stats[name].last_error = why

    @staticmethod
    def _auth(peer: PeerSettings) -> dict[str, str]:
        return {"authorization": f"Bearer {peer.api_key}"} if peer.api_key else {}

    # -- what the router asks --------------------------------------------------------------------------------

    def has(self, model: str | None) -> bool:
        if not model:
            return False
        return bool(candidates(model, list(self.views.values())))

    def model_entries(self, local: set[str]) -> list[dict[str, Any]]:
        """/v1/models entries: ``node/model`` for every model of every node, and the plain name unless this node
        serves it (a local instance wins a name clash). Each says its node; a down node's are listed as not
        loaded."""
        entries: dict[str, dict[str, Any]] = {}
        for view in sorted(self.views.values(), key=lambda v: v.name):
            for model in [*view.models, *view.aliases]:
                for model_id in (f"{view.name}/{model}", model):
                    if model_id in local:
                        continue
                    entry = entries.setdefault(
                        model_id,
                        {
                            "id": model_id,
                            "object": "model",
                            "created": 0,
                            "owned_by": "llama-orchestrator",
                            "node": view.name,
                            "nodes": [],
                            "loaded": False,
                        },
                    )
                    if view.name not in entry["nodes"]:
                        entry["nodes"].append(view.name)
                    entry["loaded"] = entry["loaded"] or view.up
        return list(entries.values())

    async def forward(
        self,
        model: str,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        *,
        local_load: int | None,
        error: Callable[..., Exception],
    ) -> Upstream | None:
        """Relay to the least busy node serving ``model``; None when this node's replicas should answer
        (``local_load``: their requests in flight, None when it has none). ``error(status, message, type, code,
        retry_after)`` builds the router's error (503 when every node serving it is down)."""
        choices = candidates(model, list(self.views.values()))
        tried: set[str] = set()
        last = ""
        while True:
            chosen = pick([c for c in choices if c[0].name not in tried], local_load)
            if chosen is None:
                if local_load is not None:
                    return None
                down = [c[0] for c in choices]
                wait = int(min((v.next_probe_at for v in down), default=self.clock()) - self.clock()) + 1
                names = ", ".join(sorted(v.name for v in down))
                why = last or "; ".join(filter(None, (self.stats[v.name].last_error for v in down))) or "not probed"
                for view in down:
                    self._count(view.name, 503)
                raise error(
                    503,
                    f"model {model!r} is served by node {names}, which is unreachable ({why}); "
                    f"retry in {max(1, wait)} s",
                    "server_error",
                    "peer_unavailable",
                    max(1, wait),
                )
            view, send_name = chosen
            tried.add(view.name)
            try:
                return await self._send(view, send_name, model, method, path, headers, body)
            except (aiohttp.ClientConnectionError, OSError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._down(view.name, last)

    async def _send(self, view: PeerView, send_name: str, model: str, method: str, path: str, headers, body: bytes):
        peer = self.config[view.name]
        if send_name != model:
            try:
                document = json.loads(body)
                document["model"] = send_name
                body = json.dumps(document).encode()
            except (ValueError, TypeError):
                pass
        out = upstream_headers(headers, [], False)
        out.update(self._auth(peer))
        started = self.clock()
        view.in_flight += 1
        try:
            resp = await self.session().request(
                method, peer.url.rstrip("/") + path, data=body, headers=out, allow_redirects=False
            )
        except BaseException as exc:
            view.in_flight -= 1
            if isinstance(exc, asyncio.CancelledError):
                self._count(view.name, 499)
            raise

        def finish(status: int, _tokens) -> None:
            view.in_flight -= 1
            self._count(view.name, status)

        upstream = Upstream(resp, f"{view.name}/{send_name}", started, self.clock, finish)
        named = [h for h in upstream.headers if h[0] == b"x-llama-orch-instance"]
        if len(named) > 1:  # that node's router named its instance: keep its word, say which node
            upstream.headers.remove(named[-1])
        upstream.headers.append((b"x-llama-orch-node", view.name.encode()))
        return upstream

    def _count(self, name: str, status: int) -> None:
        requests = self.stats[name].requests
        requests[status] = requests.get(status, 0) + 1

    def snapshot(self) -> list[dict[str, Any]]:
        """For `nodes`, /api/nodes and /metrics."""
        return [
            {
                "name": name,
                "url": self.config[name].url,
                "up": view.up,
                "models": list(view.models),
                "aliases": list(view.aliases),
                "in_flight": view.in_flight,
                "latency_ms": _ms(self.stats[name].latency_s),
                "last_error": self.stats[name].last_error,
                "requests": dict(self.stats[name].requests),
                "probes_failed": self.stats[name].probes_failed,
            }
            for name, view in sorted(self.views.items())
        ]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
