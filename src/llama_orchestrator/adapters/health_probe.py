"""The HTTP health probe (SPEC §6): one GET, its status code and latency, as a ``ProbeOutcome``.

The client is injected, so the daemon shares one connection pool and tests pass an ``httpx.MockTransport``.
A probe never raises for network trouble: a refused connection or a timeout is an outcome like any other, for
``domain.health`` to judge. ``probe`` is for an event loop, ``probe_sync`` for the CLI, and ``probe_light`` for
the daemon, which probes every instance every few seconds: the standard library's http.client costs about half
the CPU of an httpx request, and one connection per probe that *we* close means a server that dies never finds
its port held by a half-closed keep-alive connection of ours.
"""

from __future__ import annotations

import http.client
import socket
import struct
import time
from urllib.parse import urlsplit

import httpx

from llama_orchestrator.domain.health import ProbeOutcome

# llama-server has answered on both paths across versions; a 404 on the configured one is a wrong path, not
# a sick server.
FALLBACK_PATH = "/v1/health"
_LINGER_RESET = struct.pack("ii", 1, 0)


async def probe(client: httpx.AsyncClient, base_url: str, path: str, timeout: float) -> ProbeOutcome:
    """GET ``base_url + path`` within ``timeout`` seconds; on 404, GET ``/v1/health`` with the time left."""
    started = time.perf_counter()
    outcome = await _get(client, _join(base_url, path), timeout, started)
    left = _time_left(timeout, started)
    if _wants_fallback(outcome, path, left):
        outcome = await _get(client, _join(base_url, FALLBACK_PATH), left, started)
    return outcome


def probe_sync(client: httpx.Client, base_url: str, path: str, timeout: float) -> ProbeOutcome:
    """The same probe, blocking."""
    started = time.perf_counter()
    outcome = _get_sync(client, _join(base_url, path), timeout, started)
    left = _time_left(timeout, started)
    if _wants_fallback(outcome, path, left):
        outcome = _get_sync(client, _join(base_url, FALLBACK_PATH), left, started)
    return outcome


def probe_light(base_url: str, path: str, timeout: float) -> ProbeOutcome:
    """The same probe with http.client: one connection, closed by us after the answer."""
    started = time.perf_counter()
    outcome = _get_light(base_url, path, timeout, started)
    left = _time_left(timeout, started)
    if _wants_fallback(outcome, path, left):
        outcome = _get_light(base_url, FALLBACK_PATH, left, started)
    return outcome


def _get_light(base_url: str, path: str, timeout: float, started: float) -> ProbeOutcome:
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        connection.connect()
        # Close with a reset, not a FIN: no TIME_WAIT is left on either side. Some kernels (gVisor's among them)
        # refuse a new bind of a port while a TIME_WAIT connection of it remains, even with SO_REUSEADDR, so a
        # probe's leftover would keep a crashed server from being restarted on its port for a minute.
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return ProbeOutcome(response.status, None, _ms_since(started))
    except TimeoutError as exc:
        return ProbeOutcome(None, f"timed out ({type(exc).__name__})", _ms_since(started))
    except ConnectionRefusedError as exc:
        return ProbeOutcome(None, f"cannot connect: {exc}", _ms_since(started))
    except (OSError, http.client.HTTPException) as exc:
        return ProbeOutcome(None, f"{type(exc).__name__}: {exc}", _ms_since(started))
    finally:
        connection.close()


async def _get(client: httpx.AsyncClient, url: str, timeout: float, started: float) -> ProbeOutcome:
    try:
        response = await client.get(url, timeout=timeout)
    except httpx.TransportError as exc:
        return ProbeOutcome(None, _error_text(exc), _ms_since(started))
    return ProbeOutcome(response.status_code, None, _ms_since(started))


def _get_sync(client: httpx.Client, url: str, timeout: float, started: float) -> ProbeOutcome:
    try:
        response = client.get(url, timeout=timeout)
    except httpx.TransportError as exc:
        return ProbeOutcome(None, _error_text(exc), _ms_since(started))
    return ProbeOutcome(response.status_code, None, _ms_since(started))


def _wants_fallback(outcome: ProbeOutcome, path: str, left: float) -> bool:
    # With no time left the 404 stands (as a failure): the probe as a whole must fit in its timeout.
    return outcome.status_code == 404 and path != FALLBACK_PATH and left > 0


def _join(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def _time_left(timeout: float, started: float) -> float:
    return timeout - (time.perf_counter() - started)


def _ms_since(started: float) -> float:
    # Latency of the whole probe, a 404 first try included: what a check of this instance costs.
    return (time.perf_counter() - started) * 1000


def _error_text(exc: httpx.TransportError) -> str:
    kind = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({kind})"
    detail = str(exc) or kind
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {detail}"
    return f"{kind}: {detail}" if detail != kind else kind
