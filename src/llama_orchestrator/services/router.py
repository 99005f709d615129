"""The OpenAI-compatible router's engine (SPEC §9): model name -> instance, on-demand starts, eviction, TTL,
per-instance concurrency with a bounded queue, replica failover, and the counters behind /metrics.

Everything here runs on one asyncio loop, so the bookkeeping (phases, in-flight counts, queues) needs no locks:
a decision and the marks that make it visible to the next request happen with no ``await`` in between. The
blocking InstanceService calls (start, wait_healthy, stop, refresh) run on a thread pool of our own, so a long
start cannot starve the default executor other parts of the daemon use. The decisions themselves are the pure
functions of ``domain.routing``; ``api.proxy`` is the HTTP front end.

Upstream HTTP uses aiohttp (bench/asgi_choice.py: about 6x the requests per second of httpx.AsyncClient at
concurrency 16 on the same proxy). Each instance gets its own ClientSession so that its pooled keep-alive
connections can be dropped when it stops: a connection left open to a stopped server keeps its port busy. A
request whose body is in memory (all of /v1) goes instead on the lean client of ``adapters.http_relay``, a pool
per instance (``_relay_pool``) dropped at the same moments (issue 14: a fraction of aiohttp's CPU per request).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llama_orchestrator.adapters.http_relay import ConnectFailed, ConnectionPool, RelayConnection
from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.errors import OrchestratorError
from llama_orchestrator.domain.router_phases import LOADED, Phase, is_valid_phase_edge
from llama_orchestrator.domain.routing import (
    Admission,
    Histogram,
    Replica,
    Resident,
    TokenReport,
    admit,
    choose_evictions,
    error_body,
    pick_replica,
    retry_after_s,
)
from llama_orchestrator.domain.settings import RouterSettings
from llama_orchestrator.domain.states import ACTIVE, Health, Status
from llama_orchestrator.services.health import base_url
from llama_orchestrator.services.instances import InstanceService
from llama_orchestrator.services.router_catalog import Catalog, Snapshot
from llama_orchestrator.services.upstream import (
    Answer,
    LeanUpstream,
    Upstream,
    lean_request,
    new_session,
    upstream_headers,
)

log = logging.getLogger("llama_orchestrator.router")

TICK_S = 1.0  # how often external changes (a CLI stop, a crash) are noticed and TTLs checked (the supervisor
# refreshes every instance twice a second already; this is the router's own, cheaper view)
REPROBE_S = 1.0  # how often a replica taken out after a failure is probed again
STOP_GRACE_S = 10.0
CONNECT_ATTEMPTS = 3  # a connect error before any answer is retried (on another replica when there is one)
START_RETRY_S = 10.0  # a replica whose start failed is not chosen to be started again for this long
UNDRAIN_CHECK_S = 30.0  # undrain waits at most this long for the new process to be seen healthy
# With the supervisor's view (the daemon), the configs are re-read this often; process states come from the view
# on every tick, and only when it changed (a request for an unknown model still reads the configs at once).
CONFIG_LOOK_S = 5.0


class RouteError(Exception):
    """An answer in OpenAI's error format: what went wrong, with the HTTP status that says so."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        retry_after: int | None = None,
        *,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.retry_after = status, message, type_, code, retry_after
        self.param = param  # the request field at fault, as OpenAI names it ("model")

    def body(self) -> bytes:
        return json.dumps(error_body(self.message, self.type, self.code, self.param)).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return headers


@dataclass
class InstanceStats:
    """One instance's counters for /metrics. ``duration`` is cumulative Prometheus-style (see Histogram)."""

    requests_total: dict[int, int]  # by HTTP status; 499 = the client went away first
    in_flight: int
    queued: int
    loaded: bool
    last_used: float | None  # the router's clock (monotonic); None before the first request
    duration: Histogram
    completion_tokens_total: int
    last_tokens_per_second: float | None
    phase: str = "stopped"
    up: bool = True  # False while taken out after a failure
    drained: bool = False  # a rolling recreate holds new requests off it (Router.drain)
    starts_total: int = 0
    evictions_total: int = 0
    ttl_unloads_total: int = 0
    # by (endpoint, HTTP status): what /metrics exports; requests_total is their sum over endpoints
    requests_by_endpoint: dict[tuple[str, int], int] = field(default_factory=dict)
    time_to_first_token: Histogram | None = None  # streamed answers only
    prompt_tokens_total: int = 0


# The endpoint a request came in on, as /metrics labels it: set by forward/passthrough for the request's task.
_ENDPOINT: contextvars.ContextVar[str] = contextvars.ContextVar("llama_orch_endpoint", default="other")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def endpoint_label(path: str) -> str:
    """A bounded label value: the OpenAI paths as they are, anything else ``other``."""
    path = path.split("?", 1)[0].rstrip("/")
    return path if path in ENDPOINTS else "other"


@dataclass
class _Instance:
    name: str
    config: InstanceConfig
    memory_mb: float = 0.0
    _phase: Phase = Phase.stopped  # written by Router._swap only
    epoch: int = 0  # counts phase changes: a snapshot read before one must not undo it
    port: int | None = None  # the running process's port (the config may have changed since it started)
    pid: int | None = None  # the process we saw healthy: another pid (a restart) must be seen healthy again
    in_flight: int = 0
    waiters: deque = field(default_factory=deque)  # futures of queued requests, FIFO
    last_used: float | None = None
    last_picked: float = 0.0
    start_failed_at: float | None = None
    up: bool = True
    drained: bool = False  # no new requests: a rolling recreate replaces its process (Router.drain)
    idle: list = field(default_factory=list)  # futures of drain() calls, set once nothing is in flight or queued
    task: asyncio.Task | None = None  # our start or stop in progress
    reprobe: asyncio.Task | None = None
    session: aiohttp.ClientSession | None = None
    relay: ConnectionPool | None = None  # lean keep-alive connections for /v1 requests (adapters.http_relay)
    retired: list = field(default_factory=list)  # sessions replaced while requests used them: closed when idle
    requests: dict[int, int] = field(default_factory=dict)
    by_endpoint: dict[tuple[str, int], int] = field(default_factory=dict)
    duration: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    tokens_total: int = 0
    prompt_tokens_total: int = 0
    last_tps: float | None = None
    starts: int = 0
    evictions: int = 0
    ttl_unloads: int = 0

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def limit(self) -> int:
        return self.config.concurrency_limit

    @property
    def busy(self) -> bool:
        """Never evicted, unloaded for its ttl or forgotten: requests in flight or queued, our start or stop in
        progress, or drained (a rolling recreate owns it)."""
        return self.in_flight > 0 or bool(self.waiters) or self.task is not None or self.drained

    @property
    def settled(self) -> bool:
        """What drain() waits for: nothing in flight, queued, or being started or stopped by us."""
        return self.in_flight == 0 and not self.waiters and self.task is None

    def url(self) -> str:
        return base_url(self.config, self.port)


class Router:
    def __init__(
        self,
        service_factory: Callable[[], InstanceService],
        settings: RouterSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = TICK_S,
        on_phase: Callable[[str, Phase, Phase], None] | None = None,
    ) -> None:
        """``on_phase(name, old, new)`` is called for every phase change the table allowed (tests record them)."""
        self._factory = service_factory
        self._on_phase = on_phase
        self.settings = settings
        self.clock = clock
        self.tick_s = tick_s
        self._instances: dict[str, _Instance] = {}
        self._aliases: dict[str, list[str]] = {}
        self._broken: dict[str, str] = {}  # instance name -> why its config does not load
        self._unknown_model: dict[str, int] = {}  # by endpoint: requests for a model nothing serves
        self._service: InstanceService | None = None
        self._service_lock = threading.Lock()
        self._catalog = Catalog()
        self._pool: ThreadPoolExecutor | None = None
        self._maintainer: asyncio.Task | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._last_reload = -1e9  # when the last read of the configs began
        self._changed: asyncio.Event | None = None  # set (and replaced) when capacity may have been freed
        self._room_waiters = 0
        self._undrained: asyncio.Event | None = None  # set (and replaced) when an instance is undrained
        self._loop: asyncio.AbstractEventLoop | None = None  # ours: drain()/undrain() come from other threads
        self.peers: Any = None  # services.peers.PeerPool: other nodes' models (issue 12), set by the daemon
        # services.supervisor_view.SupervisorView, set by the daemon: the process states its supervisor saw, read
        # instead of refreshing every instance each tick (an instance it disagrees on is read directly, _reload)
        self.view: Any = None
        self._view_version: int | None = None  # the view's version the last reload applied

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="router")
        self._reload_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._undrained = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        await self._reload()
        self._maintainer = asyncio.create_task(self._maintain(), name="router-maintain")
        if self.peers is not None:
            await self.peers.start()

    async def shutdown(self) -> None:
        """Stop our tasks and close connections. Instances keep running: the next daemon adopts them."""
        tasks = [self._maintainer] + [i.reprobe for i in self._instances.values()]
        for task in tasks:
            if task is not None:
                task.cancel()
        for inst in self._instances.values():
            await self._close_session(inst)
            await self._close_retired(inst)  # shutting down: in flight or not
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.peers is not None:
            await self.peers.close()

    def stats(self) -> dict[str, InstanceStats]:
        return {
            name: InstanceStats(
                requests_total=dict(i.requests),
                in_flight=i.in_flight,
                queued=len(i.waiters),
                loaded=i.phase in LOADED,
                last_used=i.last_used,
                duration=i.duration.copy(),
                completion_tokens_total=i.tokens_total,
                last_tokens_per_second=i.last_tps,
                phase=str(i.phase),
                up=i.up,
                starts_total=i.starts,
                evictions_total=i.evictions,
                ttl_unloads_total=i.ttl_unloads,
                drained=i.drained,
                requests_by_endpoint=dict(i.by_endpoint),
                time_to_first_token=i.ttft.copy(),
                prompt_tokens_total=i.prompt_tokens_total,
            )
            for name, i in self._instances.items()
        }

    def totals(self) -> dict[str, Any]:
        """Router-wide counters for /metrics: requests that named no known model, by endpoint."""
        return {
            "unknown_model_requests": dict(self._unknown_model),
            "peers": self.peers.snapshot() if self.peers is not None else [],
        }

    async def models(self) -> list[dict[str, Any]]:
        """What /v1/models lists: every instance name, then every alias, once each."""
        await self._reload(since=self.clock())  # rare, and a config added a moment ago must be listed
        data = []
        for name, inst in sorted(self._instances.items()):
            data.append(_model_entry(name, [name], inst.phase in LOADED))
        for alias, names in sorted(self._aliases.items()):
            if alias not in self._instances:
                loaded = any(self._instances[n].phase in LOADED for n in names)
                data.append(_model_entry(alias, names, loaded))
        if self.peers is not None:  # other nodes' models; a local name wins a clash
            data += self.peers.model_entries(set(self._instances) | set(self._aliases))
        return data

    # -- the request path ------------------------------------------------------------------------------------

    async def forward(
        self, model: str | None, method: str, path: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> Answer:
        """Send a whole request to an instance serving ``model`` and return its open answer.

        Raises RouteError. A connect error before any answer is retried, on another replica when there is one.
        """
        started = self.clock()
        _ENDPOINT.set(endpoint_label(path))
        # Another node's model (issue 12): a local instance's name stays here; an alias is balanced across nodes.
        if (
            self.peers is not None
            and model
            and model not in self._instances
            and model not in self._broken
            and self.peers.has(model)
        ):
            local = [self._instances[n] for n in self._resolve(model)]
            load = sum(i.in_flight + len(i.waiters) for i in local) if local else None
            relayed = await self.peers.forward(model, method, path, headers, body, local_load=load, error=RouteError)
            if relayed is not None:
                return relayed
        failed: set[str] = set()
        last_error = ""
        inst = None
        for attempt in range(CONNECT_ATTEMPTS):
            inst = await self._route(model, failed, started + self.settings.start_timeout)
            try:
                resp = await self._exchange(inst, started, method, path, headers, body, retry=True, quiet=attempt == 0)
            except RouteError as error:
                if error.code != "start_failed" or not self._others(model, failed | {inst.name}):
                    raise
                resp = error.message  # a replica that cannot start: another one can answer
            if not isinstance(resp, str):
                return self._upstream(inst, resp, started)
            failed.add(inst.name)
            last_error = resp
        if inst is None:
            raise RuntimeError("inst is unset here: a bug in the router")
        unreachable = RouteError(
            502, f"instance {inst.name!r} did not answer: {last_error}", "server_error", "upstream_unreachable"
        )
        self._record(inst, unreachable.status, started)
        raise unreachable

    async def passthrough(
        self,
        name: str,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> Answer:
        """`/upstream/<name>/...`: one instance by name, any method and path, the body streamed; no retry."""
        _ENDPOINT.set("/upstream")
        inst = self._instances.get(name)
        if inst is None:
            await self._reload(since=self.clock())
            inst = self._instances.get(name)
        if inst is None:
            self._count_unknown()
            raise RouteError(
                404,
                f"no instance named {name!r}; instances: {', '.join(sorted(self._instances))}",
                "invalid_request_error",
                "instance_not_found",
            )
        started = self.clock()
        if inst.drained:
            await self._wait_undrained([inst], started + self.settings.start_timeout)
        resp = await self._exchange(inst, started, method, path, headers, body, keep_length=True)
        if isinstance(resp, str):
            error = RouteError(502, f"instance {name!r} did not answer: {resp}", "server_error", "upstream_unreachable")
            self._record(inst, error.status, started)
            raise error
        return self._upstream(inst, resp, started)

    def _upstream(self, inst: _Instance, resp: aiohttp.ClientResponse | RelayConnection, started: float) -> Answer:
        endpoint = _ENDPOINT.get()

        def finish(status: int, tokens: TokenReport | None) -> None:
            ttft = upstream.time_to_first_token
            if ttft is not None:
                inst.ttft.observe(ttft)
            self._finish(inst, status, started, tokens, endpoint)

        kind = LeanUpstream if isinstance(resp, RelayConnection) else Upstream
        upstream = kind(resp, inst.name, started, self.clock, finish)  # type: ignore[arg-type]
        return upstream

    async def _exchange(
        self,
        inst: _Instance,
        started: float,
        method: str,
        path: str,
        headers,
        body,
        keep_length: bool = False,
        retry: bool = False,
        quiet: bool = False,
    ) -> aiohttp.ClientResponse | RelayConnection | str:
        """Admit, make ready, send. Returns the response, or why to try again (the slot is then released).

        A whole body (``bytes``, not HEAD) goes on a lean connection (``adapters.http_relay``: a fraction of
        aiohttp's CPU per request and per streamed token); a streamed one through aiohttp.

        With ``retry`` (the body is in memory), a 503 is a reason to try again too: llama-server answers 503 while
        it loads, e.g. after the supervisor restarted it behind our back, and the client must not see that.
        """
        await self._admit(inst, started)
        try:
            await self._ensure_ready(inst, started)
            inst.last_used = self.clock()
            resp: aiohttp.ClientResponse | RelayConnection
            if isinstance(body, bytes) and method != "HEAD" and not keep_length:
                pool = self._relay_pool(inst)
                request = lean_request(method, path, pool.host_header, headers, inst.config.args, body)
                resp = await pool.exchange(request)
            else:
                resp = await self._session(inst).request(
                    method,
                    inst.url() + path,
                    data=body,
                    allow_redirects=False,
                    headers=upstream_headers(headers, inst.config.args, keep_length),
                )
        except RouteError as error:
            self._release(inst)
            self._record(inst, error.status, started)
            raise
        except (aiohttp.ClientConnectionError, OSError) as exc:
            self._release(inst)
            why = f"{type(exc).__name__}: {exc}"
            if retry and quiet and not isinstance(exc, (aiohttp.ClientConnectorError, ConnectFailed)):
                return why  # an established keep-alive connection the server had just closed: simply retry
            self._mark_down(inst, why, connect=True)
            return why
        except BaseException as exc:
            self._release(inst)
            if isinstance(exc, asyncio.CancelledError):
                self._record(inst, 499, started)  # the client left before the answer began
            raise
        if retry and resp.status == 503:
            if isinstance(resp, RelayConnection):
                resp.abort()
            else:
                resp.release()
            self._release(inst)
            self._mark_down(inst, "HTTP 503 (loading)", connect=True)
            return "HTTP 503"
        if resp.status >= 500:
            self._mark_down(inst, f"HTTP {resp.status}", connect=False)
        return resp

    # -- routing ---------------------------------------------------------------------------------------------

    async def _route(self, model: str | None, failed: set[str], deadline: float) -> _Instance:
        """The instance to send to: by name or alias, drained replicas left out (``deadline``: how long to wait
        while all of them are drained)."""
        names = self._resolve(model)
        if not names:
            await self._reload(since=self.clock())  # a config added a moment ago
            names = self._resolve(model)
        if not names and model in self._broken:
            raise RouteError(
                503, f"instance {model!r} cannot be used: {self._broken[model]}", "server_error", "config_invalid"
            )
        if not names:
            known = sorted(set(self._instances) | set(self._aliases))
            if model is None:
                raise RouteError(
                    400,
                    f"the request names no model; known models: {', '.join(known) or 'none'}",
                    "invalid_request_error",
                    "model_required",
                    param="model",
                )
            self._count_unknown()
            raise RouteError(
                404,
                f"model {model!r} not found; known models: {', '.join(known) or 'none'}",
                "invalid_request_error",
                "model_not_found",
                param="model",
            )
        candidates = [self._instances[n] for n in names]
        open_ = [i for i in candidates if not i.drained]
        if not open_:  # every replica is being recreated: wait for one to come back (as for a start)
            await self._wait_undrained(candidates, deadline)
            return await self._route(model, failed, deadline)
        candidates = open_
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            replicas = [
                Replica(
                    i.name,
                    i.in_flight,
                    len(i.waiters),
                    i.limit,
                    i.phase in LOADED,
                    i.up and i.name not in failed,
                    i.phase in LOADED or self._startable(i),
                    i.last_picked,
                )
                for i in candidates
            ]
            picked = pick_replica(replicas)
            if picked is None:
                raise RuntimeError("no replica picked among candidates: a bug in the router")
            chosen = self._instances[picked]
        chosen.last_picked = self.clock()
        return chosen

    def _others(self, model: str | None, excluded: set[str]) -> bool:
        return any(name not in excluded for name in self._resolve(model))

    def _startable(self, inst: _Instance) -> bool:
        if inst.start_failed_at is not None and self.clock() - inst.start_failed_at < START_RETRY_S:
            return False  # don't send every request to a replica whose start has just failed
        try:
            return self._plan(inst) is not None
        except RouteError:
            return False

    def _resolve(self, model: str | None) -> list[str]:
        if model is None:
            return list(self._instances) if len(self._instances) == 1 else []
        if model in self._instances:
            return [model]
        return self._aliases.get(model, [])

    # -- admission -------------------------------------------------------------------------------------------

    async def _admit(self, inst: _Instance, started: float) -> None:
        queue = inst.config.concurrency
        decision = admit(in_flight=inst.in_flight, limit=inst.limit, queued=len(inst.waiters), queue_max=queue.queue)
        if decision is Admission.run:
            inst.in_flight += 1
            return
        if decision is Admission.reject:
            self._busy(inst, started, f"{inst.name}: all {inst.limit} slots are busy and {queue.queue} requests wait")
        ticket = asyncio.get_running_loop().create_future()
        inst.waiters.append(ticket)
        try:
            await asyncio.wait_for(ticket, queue.queue_timeout)  # _release hands its slot over to us
        except TimeoutError:
            self._busy(inst, started, f"{inst.name}: no slot free after {queue.queue_timeout:g} s in the queue")
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self._release(inst)  # the slot came just as the client left: pass it on
            self._record(inst, 499, started)
            raise
        finally:
            if ticket in inst.waiters:
                inst.waiters.remove(ticket)

    def _busy(self, inst: _Instance, started: float, message: str) -> None:
        wait = retry_after_s(queued=len(inst.waiters), limit=inst.limit, typical_s=inst.duration.mean())
        self._record(inst, 429, started)
        raise RouteError(429, message, "rate_limit_error", "queue_full", retry_after=wait)

    def _release(self, inst: _Instance) -> None:
        while inst.waiters:
            ticket = inst.waiters.popleft()
            if not ticket.done():
                ticket.set_result(None)  # the slot passes straight to the next in line
                return
        inst.in_flight -= 1
        if inst.in_flight == 0:
            self._notify()
            self._wake_idle(inst)
            if inst.retired:
                _background(self._close_retired(inst), "close")

    # -- starting and evicting -------------------------------------------------------------------------------

    async def _ensure_ready(self, inst: _Instance, started: float) -> None:
        """Return once ``inst`` is healthy: start it (making room first) or wait for the start in progress."""
        start_deadline = started + self.settings.start_timeout
        room_deadline = started + inst.config.concurrency.queue_timeout
        while inst.phase is not Phase.ready:
            if self.clock() >= start_deadline:
                raise RouteError(
                    503,
                    f"{inst.name} is not ready after {self.settings.start_timeout:g} s (router.start_timeout)",
                    "server_error",
                    "starting",
                    retry_after=5,
                )
            if inst.task is not None:
                await self._await_task(inst, start_deadline)
                continue
            if inst.phase is Phase.active:
                self._begin_start(inst, [])
            else:
                victims = self._plan(inst)
                if victims is None:
                    await self._wait_for_room(inst, room_deadline)
                    continue
                self._begin_start(inst, victims)
            if inst.task is None:  # the phase table refused the start (logged as a bug): never spin on it
                raise RouteError(
                    503,
                    f"{inst.name} cannot be started from phase {inst.phase}",
                    "server_error",
                    "start_failed",
                    retry_after=5,
                )

    async def _await_task(self, inst: _Instance, deadline: float) -> None:
        task = inst.task
        if task is None:
            raise RuntimeError("task is unset here: a bug in the router")
        remaining = deadline - self.clock()
        try:
            if remaining <= 0:
                raise TimeoutError
            # shield: a client that gives up must not cancel the start others wait for
            await asyncio.wait_for(asyncio.shield(task), remaining)
        except TimeoutError:
            raise RouteError(
                503,
                f"{inst.name} is still starting after {self.settings.start_timeout:g} s "
                "(router.start_timeout); try again shortly",
                "server_error",
                "starting",
                retry_after=5,
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever stopped the start is the client's answer
            if task.get_name() == "stop":
                return  # a failed stop: the loop looks again at what runs
            raise RouteError(503, f"{inst.name} could not be started: {exc}", "server_error", "start_failed") from None

    def _plan(self, inst: _Instance) -> list[str] | None:
        """Who to evict so ``inst`` fits; None when it does not fit now. Raises when it can never fit."""
        budget = self.settings.memory_budget_mb
        if self.settings.max_loaded is None and budget is None:
            return []
        if budget is not None and inst.memory_mb > budget:
            raise RouteError(
                503,
                f"{inst.name} needs about {inst.memory_mb:g} MiB, more than router.memory_budget_mb ({budget:g})",
                "server_error",
                "model_too_large",
            )
        residents = [
            Resident(i.name, i.last_used or 0.0, i.busy, i.config.pinned, i.memory_mb)
            for i in self._instances.values()
            if i is not inst and i.phase in LOADED
        ]
        return choose_evictions(
            residents, max_loaded=self.settings.max_loaded, budget_mb=budget, need_mb=inst.memory_mb
        )

    async def _wait_for_room(self, inst: _Instance, deadline: float) -> None:
        remaining = deadline - self.clock()
        changed = self._changed
        if changed is None:
            raise RuntimeError("changed is unset here: a bug in the router")
        self._room_waiters += 1
        try:
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(changed.wait(), remaining)
        except TimeoutError:
            raise RouteError(
                503,
                f"no room to start {inst.name}: the loaded instances are busy or pinned "
                "(router.max_loaded / memory_budget_mb)",
                "server_error",
                "no_capacity",
                retry_after=5,
            ) from None
        finally:
            self._room_waiters -= 1

    def _notify(self) -> None:
        if self._changed is not None and self._room_waiters:  # an Event per wake-up, only when someone waits
            self._changed.set()
            self._changed = asyncio.Event()

    def _begin_start(self, inst: _Instance, victims: list[str]) -> None:
        for name in victims:
            self._instances[name].evictions += 1
            self._begin_stop(self._instances[name], f"evicted to make room for {inst.name}")
        if self._swap(inst, inst.phase, Phase.starting):  # STOPPED/ACTIVE -> STARTING
            inst.task = _background(self._start(inst), "start")

    async def _start(self, inst: _Instance) -> None:
        try:
            # Stops in progress finish first: evicted models leave memory before the next one loads.
            stops = [i.task for i in self._instances.values() if i.phase is Phase.stopping and i.task]
            await asyncio.gather(*stops, return_exceptions=True)
            await self._close_session(inst)  # connections to an earlier process of this instance are stale
            # by_person: a request asking for the model is a fresh start, not the supervisor's restart
            outcome = await self._call(lambda s: s.start(inst.name, by_person=True))
            if not outcome.already_running:
                inst.starts += 1
                log.info("router: started %s on demand", inst.name)
            row = await self._wait_healthy(inst)
            inst.port, inst.pid, inst.up = row.port, row.pid, True
            self._swap(inst, Phase.starting, Phase.ready)  # STARTING -> READY
            inst.start_failed_at = None
        except BaseException:
            inst.start_failed_at = self.clock()
            await self._settle(inst)
            raise
        finally:
            inst.task = None
            self._notify()
            self._wake_idle(inst)

    async def _wait_healthy(self, inst: _Instance):
        """wait_healthy in slices of a second: a thread blocked for the whole start_timeout would hold up the
        daemon's exit (the pool's threads are joined then); between slices this task can be cancelled."""
        deadline = self.clock() + self.settings.start_timeout
        while True:
            slice_s = max(0.1, min(1.0, deadline - self.clock()))

            def wait(service: InstanceService, slice_s: float = slice_s) -> Any:
                return service.wait_healthy(inst.name, slice_s)

            try:
                return await self._call(wait)
            except OrchestratorError:
                row = await self._call(lambda s: s.refresh(inst.name))
                if row.status not in ACTIVE or self.clock() >= deadline:
                    raise  # it exited (the error has its stderr), or the time is up
                # still starting: next slice

    def _begin_stop(self, inst: _Instance, why: str) -> None:
        if self._swap(inst, inst.phase, Phase.stopping):  # ACTIVE/READY -> STOPPING
            inst.task = _background(self._stop(inst, why), "stop")

    async def _stop(self, inst: _Instance, why: str) -> None:
        try:
            await self._close_session(inst)
            # by_user: the supervisor must not restart what the router unloaded; a request starts it again.
            await self._call(lambda s: s.stop(inst.name, STOP_GRACE_S, by_user=True))
            log.info("router: stopped %s (%s)", inst.name, why)
            self._swap(inst, Phase.stopping, Phase.stopped)  # STOPPING -> STOPPED
        except BaseException:
            await self._settle(inst)
            raise
        finally:
            inst.task = None
            self._notify()
            self._wake_idle(inst)

    async def _settle(self, inst: _Instance) -> None:
        """After a start or stop went wrong: the phase is what actually runs."""
        was = inst.phase  # STARTING or STOPPING: our task still owns it
        try:
            row = await self._call(lambda s: s.refresh(inst.name))
            runs = row.status in ACTIVE
        except BaseException:  # noqa: BLE001 - cancelled or broken: the next tick looks again
            runs = False
        self._swap(inst, was, Phase.active if runs else Phase.stopped)  # STARTING/STOPPING -> ACTIVE/STOPPED

    # -- phases ----------------------------------------------------------------------------------------------

    def _swap(self, inst: _Instance, expected: Phase, new: Phase) -> bool:
        """The one place a phase changes: compare-and-swap against ``expected``, checked against the table of
        ``domain.router_phases``. A mismatch or an edge outside the table is a bug: logged, refused, not written."""
        current = inst.phase
        if current is not expected or not is_valid_phase_edge(current, new):
            why = f"it is {current}" if current is not expected else "the edge is not in the table"
            log.error("router phase bug: %s %s -> %s refused (%s)", inst.name, expected, new, why)
            return False
        inst._phase = new
        inst.epoch += 1
        if self._on_phase is not None:
            self._on_phase(inst.name, current, new)
        return True

    # -- draining: rolling recreates (the Drainer of services.instances_port) -------------------------------

    def drain(self, name: str, timeout: float) -> None:
        """Stop routing new requests to ``name`` and return once its in-flight and queued requests are done (or
        ``timeout`` passed). Called from a worker thread, never from the router's loop."""
        self._from_thread(self._drain(name, timeout), timeout + 30)

    def undrain(self, name: str) -> None:
        """Route to ``name`` again, once its (new) process is seen healthy (at most UNDRAIN_CHECK_S)."""
        self._from_thread(self._undrain(name), UNDRAIN_CHECK_S + 30)

    def _from_thread(self, coro, wait_s: float) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()  # no router running: nothing routes, nothing to drain
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            coro.close()
            raise RuntimeError("Router.drain/undrain block: call them from a worker thread, not the router's loop")
        asyncio.run_coroutine_threadsafe(coro, loop).result(wait_s)

    async def _drain(self, name: str, timeout_s: float) -> None:
        inst = self._instances.get(name)
        if inst is None:
            await self._reload(since=self.clock())
            inst = self._instances.get(name)
        if inst is None:
            return  # not an instance we route to
        inst.drained = True
        log.info("router: draining %s (%d in flight, %d queued)", name, inst.in_flight, len(inst.waiters))
        deadline = self.clock() + timeout_s
        while not inst.settled:
            remaining = deadline - self.clock()
            if remaining <= 0:
                log.warning(
                    "router: %s still has %d in flight and %d queued after %g s of draining",
                    name,
                    inst.in_flight,
                    len(inst.waiters),
                    timeout_s,
                )
                return
            done = asyncio.get_running_loop().create_future()
            inst.idle.append(done)
            try:
                await asyncio.wait_for(done, remaining)
            except TimeoutError:
                pass
            finally:
                if done in inst.idle:
                    inst.idle.remove(done)

    async def _undrain(self, name: str) -> None:
        inst = self._instances.get(name)
        if inst is None or not inst.drained:
            return
        try:
            # See the new process now rather than at the next tick (its pid, its port from the new config), and
            # check it as for any process we did not start: ACTIVE -> STARTING (a no-op start) -> READY.
            await self._reload()
            if inst.phase is Phase.active and inst.task is None:
                self._begin_start(inst, [])
            if inst.task is not None:
                await asyncio.wait_for(asyncio.shield(inst.task), UNDRAIN_CHECK_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - requests then find it as it is (and start it on demand)
            log.warning("router: %s undrained without a healthy check: %s", name, exc)
        finally:
            inst.drained = False
            log.info("router: %s undrained (%s)", name, inst.phase)
            if self._undrained is not None:
                self._undrained.set()
                self._undrained = asyncio.Event()
            self._notify()

    async def _wait_undrained(self, candidates: list[_Instance], deadline: float) -> None:
        """Hold a request while every instance it may go to is drained, as a start is waited for; 503 at the
        deadline (router.start_timeout)."""
        while all(i.drained for i in candidates):
            remaining = deadline - self.clock()
            event = self._undrained
            if event is None:
                raise RuntimeError("event is unset here: a bug in the router")
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                names = ", ".join(i.name for i in candidates)
                raise RouteError(
                    503,
                    f"{names} is being recreated and not back after "
                    f"{self.settings.start_timeout:g} s (router.start_timeout)",
                    "server_error",
                    "draining",
                    retry_after=5,
                ) from None

    def _wake_idle(self, inst: _Instance) -> None:
        if inst.idle and inst.settled:
            for done in inst.idle:
                if not done.done():
                    done.set_result(None)

    # -- failures --------------------------------------------------------------------------------------------

    def _mark_down(self, inst: _Instance, why: str, *, connect: bool) -> None:
        """Take a failing instance out of the replica rotation until a health probe succeeds again."""
        log.warning("router: %s failed (%s); taken out until healthy", inst.name, why)
        inst.up = False
        if connect and inst.phase is Phase.ready:
            # READY -> ACTIVE: the next request for it checks the process (and starts it if gone)
            self._swap(inst, Phase.ready, Phase.active)
        if inst.reprobe is None or inst.reprobe.done():
            inst.reprobe = asyncio.create_task(self._reprobe(inst), name=f"reprobe-{inst.name}")

    async def _reprobe(self, inst: _Instance) -> None:
        while not inst.up:
            await asyncio.sleep(REPROBE_S)
            if self._instances.get(inst.name) is not inst:
                return  # its config was removed
            if inst.phase is Phase.stopped:
                inst.up = True  # nothing to probe: a request starts it afresh
                return
            if inst.task is not None:
                continue  # a start decides; it sets up when healthy
            try:
                path = inst.config.healthcheck.path
                async with self._session(inst).get(inst.url() + path, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    healthy = r.status == 200
            except (aiohttp.ClientError, OSError, TimeoutError):
                healthy = False
            if healthy:
                inst.up = True
                if inst.phase is Phase.active:
                    self._swap(inst, Phase.active, Phase.ready)  # ACTIVE -> READY: it answers again
                self._notify()

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def _finish(
        self, inst: _Instance, status: int, started: float, tokens: TokenReport | None, endpoint: str | None = None
    ) -> None:
        self._release(inst)
        self._record(inst, status, started, endpoint)
        if tokens is not None:
            inst.tokens_total += tokens.completion_tokens or 0
            inst.prompt_tokens_total += tokens.prompt_tokens or 0
            if tokens.tokens_per_second is not None:
                inst.last_tps = tokens.tokens_per_second

    def _record(self, inst: _Instance, status: int, started: float, endpoint: str | None = None) -> None:
        now = self.clock()
        inst.last_used = now
        inst.requests[status] = inst.requests.get(status, 0) + 1
        key = (endpoint or _ENDPOINT.get(), status)
        inst.by_endpoint[key] = inst.by_endpoint.get(key, 0) + 1
        inst.duration.observe(max(0.0, now - started))

    def _count_unknown(self) -> None:
        endpoint = _ENDPOINT.get()
        self._unknown_model[endpoint] = self._unknown_model.get(endpoint, 0) + 1

    def _session(self, inst: _Instance) -> aiohttp.ClientSession:
        if inst.session is None or inst.session.closed:
            inst.session = new_session()
        return inst.session

    def _relay_pool(self, inst: _Instance) -> ConnectionPool:
        host, _, port = inst.url().removeprefix("http://").rpartition(":")
        host = host.strip("[]")
        pool = inst.relay
        if pool is None or pool.closed or pool.address != (host, int(port)):
            if pool is not None:
                pool.close()
            pool = inst.relay = ConnectionPool(host, int(port), clock=self.clock)
        return pool

    async def _close_session(self, inst: _Instance) -> None:
        """New requests get a new session. The old one is closed once no request of this instance is in flight:
        closing it under a request (a stream still relayed from a healthy process, or one just sent) left that
        request waiting forever (aiohttp on uvloop), where it must either finish or fail. The lean pool's idle
        connections close now; one in use closes when its exchange ends."""
        if inst.relay is not None:
            inst.relay.close()
            inst.relay = None
        session, inst.session = inst.session, None
        if session is not None and not session.closed:
            inst.retired.append(session)
        if inst.in_flight == 0:
            await self._close_retired(inst)

    @staticmethod
    async def _close_retired(inst: _Instance) -> None:
        retired, inst.retired = inst.retired, []
        for session in retired:
            if not session.closed:
                await session.close()

    async def _call(self, work: Callable[[InstanceService], Any]) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: work(self._get_service()))

    def _get_service(self) -> InstanceService:
        # One service for all our threads: its Store serialises SQLite behind a lock, and the process that
        # spawned a server (and so can reap it and read its exit code) is the one that refreshes it.
        with self._service_lock:
            if self._service is None:
                self._service = self._factory()
            return self._service

    # -- the background task: configs, external changes, TTL -------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            await _sleep_to_multiple(self.tick_s)
            try:
                configs = self.view is None or self.clock() - self._last_reload >= CONFIG_LOOK_S
                await self._reload(configs=configs)
                self._unload_idle()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad tick must not end the maintenance
                log.exception("router maintenance failed")

    async def _reload(self, *, since: float | None = None, configs: bool = True) -> None:
        """Re-read configs and process states (one trip to the thread pool) and apply them.

        ``since``: unless a read began after that moment (many requests for unknown models share one read).
        ``configs=False`` (a tick with the supervisor's view): only the process states, from the view, and only
        if it changed since the last reload; the configs are read anyway when the view names an unknown instance.
        """
        if self._reload_lock is None:
            raise RuntimeError("self._reload_lock is unset here: a bug in the router")
        async with self._reload_lock:
            if since is not None and self._last_reload >= since:
                return
            view = self.view
            if not configs and (view is None or view.version == self._view_version):
                if view is None:
                    configs = True
                else:
                    return  # nothing the supervisor saw changed: no read at all
            # What our own starts and stops change while the snapshot is read is newer than the snapshot.
            epochs = {name: inst.epoch for name, inst in self._instances.items()}
            version, seen = view.snapshot() if view is not None else (None, None)
            if configs or seen is None or any(name not in self._instances for name in seen):
                self._last_reload = self.clock()
                with_memory = self.settings.memory_budget_mb is not None
                snap = await self._call(lambda s: self._catalog.read(s, with_memory=with_memory, seen=seen))
            else:
                snap = Snapshot(
                    configs={name: inst.config for name, inst in self._instances.items()},
                    rows={name: seen[name] for name in self._instances if name in seen},
                    memory_mb={name: inst.memory_mb for name, inst in self._instances.items()},
                    broken=dict(self._broken),
                )
            if seen is not None:
                # The view can lag behind our own starts and stops (the supervisor steps an instance after us),
                # so it never decides a change of phase alone: where it disagrees with ours, the row is read (as
                # is one the view does not hold).
                doubtful = [
                    n for n in snap.configs if n not in snap.rows or (n in seen and self._would_change(n, snap.rows[n]))
                ]
                if doubtful:
                    fresh = await self._call(lambda s: {n: s.refresh(n) for n in doubtful})
                    snap.rows.update(fresh)
            self._apply(snap, epochs)
            self._view_version = version

    def _apply(self, snap: Snapshot, epochs: dict[str, int]) -> None:
        for name in list(self._instances):
            if name not in snap.configs and not self._instances[name].busy:
                _background(self._close_session(self._instances.pop(name)), "close")
        aliases: dict[str, list[str]] = {}
        for name, config in snap.configs.items():
            inst = self._instances.get(name)
            if inst is None:
                inst = self._instances[name] = _Instance(name, config)
            inst.config, inst.memory_mb = config, snap.memory_mb.get(name, 0.0)
            for alias in config.aliases:
                aliases.setdefault(alias, []).append(name)
            if epochs.get(name, inst.epoch) == inst.epoch:
                self._observe(inst, snap.rows[name])
        self._aliases, self._broken = aliases, snap.broken
        self._notify()  # an external stop or a config change (pinned, limits) may have made room

    def _observe(self, inst: _Instance, row) -> None:
        if inst.task is not None:
            return  # our own start/stop owns the phase until it reports
        # `stopping` (a `down` from the CLI, a supervisor restart) counts as gone: a request starts it again, and
        # the start waits on the instance's lock until that stop is over.
        if row.status in ACTIVE and row.status != Status.stopping:
            inst.port = row.port
            if inst.phase is Phase.ready and row.pid != inst.pid:
                # READY -> ACTIVE: restarted behind our back (supervisor, CLI, a recreate): check before use
                self._swap(inst, Phase.ready, Phase.active)
            if inst.phase is Phase.stopped:
                # STOPPED -> ACTIVE: started by someone else (CLI, autostart): its TTL counts from now
                self._swap(inst, Phase.stopped, Phase.active)
                inst.last_used = self.clock()
            elif inst.phase is Phase.ready and row.health == Health.unhealthy and inst.up:
                self._mark_down(inst, "the supervisor found it unhealthy", connect=False)
        elif inst.phase in (Phase.active, Phase.ready):
            self._swap(inst, inst.phase, Phase.stopped)  # ACTIVE/READY -> STOPPED: its process is gone
            _background(self._close_session(inst), "close")
            self._notify()

    def _would_change(self, name: str, row) -> bool:
        """Whether ``_observe`` would change the instance's phase (or take it out) on ``row``."""
        inst = self._instances.get(name)
        phase = inst.phase if inst is not None else Phase.stopped
        if inst is not None and inst.task is not None:
            return False
        if row.status in ACTIVE and row.status != Status.stopping:
            if phase is Phase.stopped:
                return True
            return (
                inst is not None
                and phase is Phase.ready
                and (row.pid != inst.pid or (row.health == Health.unhealthy and inst.up))
            )
        return phase in (Phase.active, Phase.ready)

    def _unload_idle(self) -> None:
        now = self.clock()
        for inst in self._instances.values():
            ttl = inst.config.ttl
            if ttl is None or inst.phase not in (Phase.active, Phase.ready) or inst.busy:
                continue
            if inst.last_used is not None and now - inst.last_used >= ttl:
                inst.ttl_unloads += 1
                self._begin_stop(inst, f"idle for {ttl:g} s (ttl)")


async def _sleep_to_multiple(period: float) -> None:
    """Sleep until the event loop's clock is next a whole multiple of ``period``. The daemon's uvicorn ticks at each
    whole second of the same clock (``api.server``): timers due at the same instant run in one wake of the loop."""
    loop = asyncio.get_running_loop()
    woken = loop.create_future()
    handle = loop.call_at((math.floor(loop.time() / period) + 1) * period, _resolve, woken)
    try:
        await woken
    finally:
        handle.cancel()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _background(coro, name: str) -> asyncio.Task:
    task = asyncio.create_task(coro, name=name)
    # Nobody may be left to await it (every client gave up): retrieve the exception so it is not reported twice.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def _model_entry(model_id: str, instances: list[str], loaded: bool) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "llama-orchestrator",
        "instances": instances,
        "loaded": loaded,
    }
