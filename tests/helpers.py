"""Small generic helpers shared by the tests: free ports, waiting on conditions, subprocess environments."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SRC_DIR = Path(__file__).resolve().parent.parent / "src"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    ignore: tuple[type[BaseException], ...] = (),
    message: str | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that value.

    Exceptions of the types in ``ignore`` count as "not yet" (e.g. ``httpx.TransportError`` while a server starts).
    Raises ``TimeoutError`` after ``timeout`` seconds, naming the last value or exception seen.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with this checkout's ``src`` first on PYTHONPATH.

    So ``python -m llama_orchestrator…`` children import this working tree even when the package isn't installed.
    """
    env = dict(os.environ)
    parts = [str(SRC_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(extra or {})
    return env


def time_scale() -> float:
    """How much longer than usual Python code takes here: 3 while coverage measures this process (its tracer slows
    every frame), else 1. For the few tests that bound how long something takes."""
    coverage = sys.modules.get("coverage")
    return 3.0 if coverage is not None and coverage.Coverage.current() is not None else 1.0
