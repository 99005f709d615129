"""Other nodes' routers (issue 12): probing them for their models (with backoff while down), forwarding a request
for one of their models through a limit and a queue like an instance's, retrying a failed answer on another
replica, remembering each node's models across restarts, and their counters for /metrics. The decisions are
``domain.peers``'; this is the I/O.

A request is relayed to the node's own /v1 as it came (the body's ``model`` rewritten only for ``node/model``), so
streaming, cancellation (closing our connection makes that node close its upstream) and its errors pass through.
Failing to connect marks the node down. A 502/504, or the connection cut before any byte of the answer, marks
that node failing for that model (``domain.peers.MODEL_HOLD_S``) and the request goes to another replica (another
node, or this node's own) when there is one, before anything reached the client; with none, that answer is
relayed. A 503 (loading, its own queue full) or 429 is that node's answer: relayed, nothing marked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from llama_orchestrator.domain.peers import PeerView, candidates, pick, probe_delay, retryable_status
from llama_orchestrator.domain.routing import Admission
from llama_orchestrator.domain.settings import PeerSettings
from llama_orchestrator.services.upstream import Upstream, new_session, upstream_headers

log = logging.getLogger("llama_orchestrator.peers")
PROBE_TIMEOUT_S = 5.0
PROBE_BODY_MAX = 4 * 1024 * 1024  # a /v1/models answer larger than this is a fault, not a model list
MEMORY_FILE_MAX = 1024 * 1024  # the remembered model lists (state/peers.json)
MEMORY_MODELS_MAX = 10_000  # per node
LOOP_TICK_S = 0.25


@dataclass
class PeerStats:
    requests: dict[int, int] = field(default_factory=dict)  # by HTTP status (499: the client left, 503: down)
    latency_s: float | None = None  # the last successful probe's round trip
    last_error: str | None = None
    probes_failed: int = 0
    # answers that counted as a failure of the node for a model, by kind: connect, disconnect (cut before any
    # byte), http_502, http_504; and how many of those requests were then sent to another replica
    failures: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    duration_sum: float = 0.0  # of the answers relayed, for the Retry-After of a full queue
    duration_count: int = 0

    def typical_s(self) -> float | None:
        return self.duration_sum / self.duration_count if self.duration_count else None


class PeerPool:
    def __init__(
        self,
        peers: Iterable[PeerSettings],
        *,
        clock: Callable[[], float] = time.monotonic,
        memory: Path | None = None,
    ) -> None:
        """``memory``: a private JSON file (the home's ``state/peers.json``) holding each node's last model list,
        so that after a restart a node that is down still answers its models with a 503, not a 404."""
        self.config = {p.name: p for p in peers}
        self.views = {name: _view(p) for name, p in self.config.items()}
        self.stats = {name: PeerStats() for name in self.config}
        self.clock = clock
        self.memory = memory
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._tickets = itertools.count(1)
        self._slots: dict[int, asyncio.Future] = {}  # queued requests' tickets -> the future their slot sets
        for name, models in _read_memory(memory, self.config).items():
            self.views[name].models = models

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
                body = await _read_capped(resp, PROBE_BODY_MAX)
                data = json.loads(body).get("data") or []
        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError, AttributeError) as exc:
            self._down(name, f"{type(exc).__name__}: {exc}")
            stats.probes_failed += 1
            return
        # Only its own models: what it serves from its peers is theirs to list (no loops between nodes).
        models = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and not m.get("node")]
        if models != view.models:
            view.models = models
            self._remember()
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

    def _remember(self) -> None:
        if self.memory is None:
            return
        document = {
            "peers": {
                name: {"url": self.config[name].url, "models": view.models[:MEMORY_MODELS_MAX]}
                for name, view in sorted(self.views.items())
                if view.models
            }
        }
        try:
            _write_private(self.memory, json.dumps(document, indent=1) + "\n")
        except OSError as exc:  # a full disk costs the memory across restarts, not the request path
            log.warning("could not remember the peers' models in %s: %s", self.memory, exc)

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
        """Relay to the node that ``domain.peers.pick`` chooses for ``model``, through its limit and queue; None
        when this node's replicas should answer (``local_load``: their requests in flight, None when it has none).
        ``error(status, message, type, code, retry_after)`` builds the router's error: 429 when the node's queue
        is full or the wait in it ran out, 503 when every node serving it is down."""
        started = self.clock()
        choices = candidates(model, list(self.views.values()))
        tried: set[str] = set()
        why: dict[str, str] = {}  # node -> why it did not answer this request
        busy: Exception | None = None  # the first 429, raised when no other replica can take the request
        cut: tuple[str, str] | None = None  # the last node that cut the connection before answering, and how
        cut_retried = False
        while True:
            left = [c for c in choices if c[0].name not in tried]
            chosen = pick(left, local_load, now=self.clock())
            if chosen is None:
                if local_load is not None:
                    return None
                if busy is not None:
                    raise busy
                if cut is not None:  # up, but it did not answer: what the router says of an instance so
                    self._count(cut[0], 502)
                    raise error(
                        502,
                        f"node {cut[0]!r} did not answer for {model!r}: {cut[1]}",
                        "server_error",
                        "upstream_unreachable",
                        None,
                    )
                raise self._unavailable(model, choices, why, error)
            view, send_name = chosen
            tried.add(view.name)
            # Another replica could answer if this one fails: a node up and untried, or this node's own.
            fallback = local_load is not None or any(c[0].up for c in left if c[0] is not view)
            try:
                await self._admit(view, started, error)
            except Exception as exc:
                if getattr(exc, "status", None) != 429:
                    raise
                busy = busy or exc
                continue
            outcome = await self._send(view, send_name, model, method, path, headers, body, started)
            if isinstance(outcome, Upstream):
                if not retryable_status(outcome.status):
                    view.model_ok(send_name)
                    return outcome
                self._failed(view, send_name, f"http_{outcome.status}", f"HTTP {outcome.status}")
                if not fallback:
                    return outcome  # nowhere else to go: its answer is the client's
                await outcome.close()
                self.stats[view.name].retried += 1
                why[view.name] = f"HTTP {outcome.status}"
                continue
            kind, reason = outcome
            why[view.name] = reason
            if kind == "connect":
                self._down(view.name, reason)
                self._count_failure(view.name, "connect")
            else:  # the connection was cut before any byte of the answer
                self._failed(view, send_name, "disconnect", reason)
                cut = (view.name, reason)
                if not fallback and not cut_retried:
                    cut_retried = True  # a keep-alive connection it had just closed: once more, on a new one
                    tried.discard(view.name)
                    continue
            if fallback:
                self.stats[view.name].retried += 1

    def _unavailable(
        self, model: str, choices: list[tuple[PeerView, str]], why: dict[str, str], error: Callable[..., Exception]
    ) -> Exception:
        views = [c[0] for c in choices]
        now = self.clock()
        wait = max(1, int(min((v.next_probe_at for v in views if not v.up), default=now) - now) + 1)
        names = ", ".join(sorted(v.name for v in views))
        reasons = "; ".join(
            f"{v.name}: {why.get(v.name) or self.stats[v.name].last_error or 'not probed yet'}"
            for v in sorted(views, key=lambda v: v.name)
        )
        for view in views:
            self._count(view.name, 503)
        return error(
            503,
            f"model {model!r} is served by node {names}, which is unreachable ({reasons}); retry in {wait} s",
            "server_error",
            "peer_unavailable",
            wait,
        )

    # -- a node's slots and queue (``PeerView.arrive``/``release``: the instance router's rules) -------------

    async def _admit(self, view: PeerView, started: float, error: Callable[..., Exception]) -> None:
        ticket = next(self._tickets)
        decision = view.arrive(ticket, self.clock())
        if decision is Admission.run:
            return
        if decision is Admission.reject:
            raise self._busy(view, error, f"{view.name}: all {view.limit} slots are busy and {view.queue_max} wait")
        slot = asyncio.get_running_loop().create_future()
        self._slots[ticket] = slot
        try:
            deadline = view.deadline(ticket) or self.clock()
            await asyncio.wait_for(asyncio.shield(slot), max(0.0, deadline - self.clock()))
        except TimeoutError:
            if view.leave(ticket):
                raise self._busy(
                    view, error, f"{view.name}: no slot free after {view.queue_timeout:g} s in the queue"
                ) from None
            # the slot came just as the wait ran out: take it
        except asyncio.CancelledError:
            if not view.leave(ticket):
                self._release(view)  # the slot came just as the client left: pass it on
            self._count(view.name, 499)
            raise
        finally:
            self._slots.pop(ticket, None)

    def _busy(self, view: PeerView, error: Callable[..., Exception], message: str) -> Exception:
        self._count(view.name, 429)
        wait = view.retry_after(self.stats[view.name].typical_s())
        return error(429, message, "rate_limit_error", "queue_full", wait)

    def _release(self, view: PeerView) -> None:
        ticket = view.release()
        if ticket is not None:
            slot = self._slots.get(ticket)
            if slot is not None and not slot.done():
                slot.set_result(None)  # the slot passes straight to the next in line

    # -- one exchange ----------------------------------------------------------------------------------------

    async def _send(
        self,
        view: PeerView,
        send_name: str,
        model: str,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        started: float,
    ) -> Upstream | tuple[str, str]:
        """The node's open answer, or (``connect``|``disconnect``, why) when none came; the slot (taken by
        ``_admit``) is held until the answer is finished, or released here when there is none."""
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
        try:
            resp = await self.session().request(
                method, peer.url.rstrip("/") + path, data=body, headers=out, allow_redirects=False
            )
        except (aiohttp.ClientConnectorError, TimeoutError, OSError) as exc:
            self._release(view)
            return "connect", f"{type(exc).__name__}: {exc}"
        except aiohttp.ClientConnectionError as exc:  # connected, then cut before the status line
            self._release(view)
            return "disconnect", f"{type(exc).__name__}: {str(exc) or 'connection closed before any answer'}"
        except BaseException as exc:
            self._release(view)
            if isinstance(exc, asyncio.CancelledError):
                self._count(view.name, 499)
            raise
        stats = self.stats[view.name]

        def finish(status: int, _tokens) -> None:
            self._release(view)
            self._count(view.name, status)
            if 200 <= status < 300:
                stats.duration_sum += self.clock() - started
                stats.duration_count += 1

        upstream = Upstream(resp, f"{view.name}/{send_name}", started, self.clock, finish)
        named = [h for h in upstream.headers if h[0] == b"x-llama-orch-instance"]
        if len(named) > 1:  # that node's router named its instance: keep its word, say which node
            upstream.headers.remove(named[-1])
        upstream.headers.append((b"x-llama-orch-node", view.name.encode()))
        return upstream

    def _failed(self, view: PeerView, send_name: str, kind: str, why: str) -> None:
        if not view.model_failed(send_name, self.clock()):
            log.warning(
                "peer %s failed for %s (%s): tried after the other replicas for a while", view.name, send_name, why
            )
        view.fail_model(send_name, self.clock())
        self._count_failure(view.name, kind)
        self.stats[view.name].last_error = why

    def _count_failure(self, name: str, kind: str) -> None:
        failures = self.stats[name].failures
        failures[kind] = failures.get(kind, 0) + 1

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
                "queued": view.queued,
                "limit": view.limit,
                "latency_ms": _ms(self.stats[name].latency_s),
                "last_error": self.stats[name].last_error,
                "requests": dict(self.stats[name].requests),
                "probes_failed": self.stats[name].probes_failed,
                "failures": dict(self.stats[name].failures),
                "retried": self.stats[name].retried,
            }
            for name, view in sorted(self.views.items())
        ]


def _view(peer: PeerSettings) -> PeerView:
    view = PeerView(peer.name, aliases=list(peer.aliases))
    if peer.concurrency is not None:
        view.limit = peer.concurrency.limit
        view.queue_max = peer.concurrency.queue
        view.queue_timeout = peer.concurrency.queue_timeout
    return view


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"/v1/models answered more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _read_memory(path: Path | None, config: dict[str, PeerSettings]) -> dict[str, list[str]]:
    """The remembered model lists of the configured nodes (a node whose url changed is another node: not its)."""
    if path is None:
        return {}
    try:
        with path.open("rb") as file:
            raw = file.read(MEMORY_FILE_MAX + 1)
        if len(raw) > MEMORY_FILE_MAX:
            raise ValueError(f"larger than {MEMORY_FILE_MAX} bytes")
        peers = json.loads(raw).get("peers")
        if not isinstance(peers, dict):
            raise ValueError("no peers object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("ignoring the remembered peer models in %s: %s", path, exc)
        return {}
    out = {}
    for name, entry in peers.items():
        peer = config.get(name)
        if peer is None or not isinstance(entry, dict) or entry.get("url") != peer.url:
            continue
        models = entry.get("models")
        if isinstance(models, list):
            out[name] = [m for m in models[:MEMORY_MODELS_MAX] if isinstance(m, str) and 0 < len(m) <= 1024]
    return out


def _write_private(path: Path, text: str) -> None:
    """Atomically (a temporary file beside it, then os.replace), 0600 from its first moment."""
    from llama_orchestrator.adapters.home import create_private, make_private_dir

    make_private_dir(path.parent)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = create_private(temp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
