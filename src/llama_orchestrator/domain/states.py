"""Instance states (SPEC §5) and the table of allowed transitions.

A leaf module: it must not import anything outside the standard library, so every layer can use it.
Status is the process axis; Health is a separate axis, judged by ``domain.health``. Member names are the
values (``Status.running == "running"``), as stored in SQLite and shown by `ps`.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    stopped = "stopped"  # no process, and none wanted (never started, or a person stopped it)
    starting = "starting"  # checks and spawn in progress; the process may exist but is not up yet
    running = "running"  # the process is up (health says whether it answers)
    stopping = "stopping"  # a stop signal was sent; waiting for the process to end
    exited = "exited"  # the process ended without being asked to (Docker's "Exited"); policy decides what next
    backoff = "backoff"  # waiting for the backoff delay before a restart
    failed = "failed"  # gave up after max_retries, or could not start; stays down until a person acts


class Health(StrEnum):
    unknown = "unknown"  # not probed yet, or only inside the start period with no answer
    loading = "loading"  # the server answers 503 while it loads the model
    healthy = "healthy"
    unhealthy = "unhealthy"  # `retries` consecutive failures after the start period


# Every edge the code takes, and why. ``adapters.store.Store.transition`` refuses (and logs as a bug) any other;
# staying in the same status is not an edge. "Found running" is the OS scan (SPEC §13): a process carrying our
# marker runs while the database says otherwise (it was lost, rebuilt, or is behind), so it is adopted.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.stopped: frozenset(
        {
            Status.starting,  # a person (or autostart) starts it
            Status.running,  # found running: adopted from the OS scan (e.g. after the database was lost)
            Status.failed,  # a person's start could not execute the binary: nothing was spawned
            Status.backoff,  # the daemon's start (autostart, policy at daemon start) failed before spawning: retry
        }
    ),
    Status.starting: frozenset(
        {
            Status.running,  # spawned and up
            Status.stopping,  # a person stops it while it starts
            Status.exited,  # it died during start: the restart policy decides
        }
    ),
    Status.running: frozenset(
        {
            Status.stopping,  # a person stops it, or the supervisor stops it to restart an unhealthy instance
            Status.exited,  # it ended on its own: crash, kill from outside, or clean exit
        }
    ),
    Status.stopping: frozenset(
        {
            Status.stopped,  # a person's stop completed (or its stopper died and the process is gone)
            Status.exited,  # a supervisor stop (unhealthy) completed, or it died on its own meanwhile: policy decides
            Status.running,  # the stopper died half way (its lock is free) and the process still runs: settled back
        }
    ),
    Status.exited: frozenset(
        {
            Status.starting,  # restart with no delay (backoff_seconds = 0), or a person starts it
            Status.backoff,  # restart after a delay
            Status.failed,  # max_retries restarts used up, or a person's start could not execute the binary
            Status.stopped,  # a person brings it down: nothing is wanted any more
            Status.running,  # found running: adopted from the OS scan
        }
    ),
    Status.backoff: frozenset(
        {
            Status.starting,  # the delay is over
            Status.stopped,  # a person stops it before the delay is over
            Status.failed,  # the restarts are used up (its start kept failing before spawning)
            Status.running,  # found running: adopted from the OS scan
        }
    ),
    Status.failed: frozenset(
        {
            Status.starting,  # a person starts it again
            Status.stopped,  # a person brings it down: clears the failure
            Status.running,  # found running: adopted from the OS scan
        }
    ),
}

# A process should exist in these states: the ones a stop must act on and a daemon must adopt.
ACTIVE: frozenset[Status] = frozenset({Status.starting, Status.running, Status.stopping})


def is_valid_transition(current: Status, new: Status) -> bool:
    return new in TRANSITIONS[current]


def is_active(status: Status) -> bool:
    return status in ACTIVE
