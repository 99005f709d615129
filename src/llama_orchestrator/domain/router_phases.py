"""The router's view of one instance (``Phase``) and the table of the edges it may take.

A leaf module, like ``domain.states``: the standard library only. The instance's own status (``domain.states``) is
the process axis the supervisor keeps; the router's phase is what the router may do with the instance now: send to
it (``ready``), check it first (``active``), wait for its own start or stop (``starting``, ``stopping``), or start
it on demand (``stopped``). Every change goes through ``services.router._Instance.swap(expected, new)``, which
refuses (and logs as a bug) an edge that is not in ``TRANSITIONS`` or a phase that is not the one the caller saw.

Draining (a rolling recreate, ``Router.drain``) is not a phase: it is a gate on new requests that holds across
phases. While an instance is drained the phase keeps following what runs (the old process stops, the new one
starts), so that on ``undrain`` the router knows whether the new process must still be checked.
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    stopped = "stopped"  # no process, as last seen
    active = "active"  # a process runs that we have not seen healthy (started elsewhere, or failed a request)
    starting = "starting"  # our start or health wait is in progress (the instance's task)
    ready = "ready"  # healthy: requests go straight through
    stopping = "stopping"  # our stop is in progress (the instance's task)


# What the router counts as loaded: a process runs or is being started (memory budget, max_loaded, /v1/models).
LOADED: frozenset[Phase] = frozenset({Phase.active, Phase.starting, Phase.ready})

TRANSITIONS: dict[tuple[Phase, Phase], str] = {
    # STOPPED -> ...
    (Phase.stopped, Phase.starting): "a request needs it and there is room: our start begins",
    (Phase.stopped, Phase.active): "the reload saw a process that someone else started (CLI, autostart, supervisor)",
    # ACTIVE -> ...
    (Phase.active, Phase.starting): "a request needs it: our start (a no-op when it runs) waits for healthy",
    (Phase.active, Phase.ready): "the re-probe of a replica taken out after a failure answered 200",
    (Phase.active, Phase.stopping): "ttl expired, or evicted to make room",
    (Phase.active, Phase.stopped): "the reload saw its process gone (a CLI down, a crash)",
    # STARTING -> ...
    (Phase.starting, Phase.ready): "our start finished: healthy",
    (Phase.starting, Phase.active): "our start failed or was cancelled, but a process runs",
    (Phase.starting, Phase.stopped): "our start failed: no process",
    # READY -> ...
    (Phase.ready, Phase.active): "a connect error or 503, or the reload saw another pid (restarted behind our back)",
    (Phase.ready, Phase.stopping): "ttl expired, or evicted to make room",
    (Phase.ready, Phase.stopped): "the reload saw its process gone (a CLI down, a crash, a rolling recreate)",
    # STOPPING -> ...
    (Phase.stopping, Phase.stopped): "our stop finished, or failed with no process left",
    (Phase.stopping, Phase.active): "our stop failed and the process still runs",
}


def is_valid_phase_edge(current: Phase, new: Phase) -> bool:
    return (current, new) in TRANSITIONS
