"""Peers (issue 12), pure: which node serves a model name, the probe backoff of a node that is down, the choice
among replicas on several nodes, a node's concurrency limit with its FIFO queue (the instance router's rules, so
the in-cluster router queues as one node does), and which (node, model) failed lately. Time is an argument; the
I/O is ``services.peers``."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llama_orchestrator.domain.routing import Admission, admit, retry_after_s

PROBE_UP_S = 5.0  # a node that answers is asked for its models this often
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
# A (node, model) whose answer was a 502/504 or a connection cut before any byte is tried after the others for
# this long: that node's instance for the model is failing, the node itself (its other models) may be fine.
MODEL_HOLD_S = 10.0


def probe_delay(failures: int) -> float:
    """Seconds until the next probe: ``PROBE_UP_S`` while up; 1, 2, 4, ... capped at 30 after failures."""
    if failures <= 0:
        return PROBE_UP_S
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (failures - 1))


@dataclass
class PeerView:
    """What the router knows of one node: its models (the last answer, kept while it is down, so a request for
    them gets a 503 that names the node rather than a 404), its declared aliases, its load and its queue.

    ``limit`` None: no limit here (a node's own router queues). Otherwise requests beyond ``limit`` wait in a FIFO
    of ``queue_max`` for ``queue_timeout`` seconds, as ``concurrency`` does for a local instance."""

    name: str
    models: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    up: bool = False
    in_flight: int = 0  # slots held: admitted requests, until their answer is finished
    failures: int = 0
    next_probe_at: float = 0.0
    limit: int | None = None
    queue_max: int = 0
    queue_timeout: float = 60.0
    waiting: deque[tuple[int, float]] = field(default_factory=deque)  # (ticket, deadline), FIFO
    failed_models: dict[str, float] = field(default_factory=dict)  # model -> held back until

    def serves(self, model: str) -> bool:
        return model in self.models or model in self.aliases

    # -- admission: the instance router's rules (``domain.routing.admit``) ----------------------------------

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def has_room(self) -> bool:
        """A request sent now runs at once: no limit, or a free slot and nobody waiting for one."""
        return self.limit is None or (self.in_flight < self.limit and not self.waiting)

    def arrive(self, ticket: int, now: float) -> Admission:
        """A new request: ``run`` takes a slot, ``queue`` puts ``ticket`` in line until ``now + queue_timeout``,
        ``reject`` (the queue is full) is the 429."""
        if self.limit is None:
            self.in_flight += 1
            return Admission.run
        decision = admit(in_flight=self.in_flight, limit=self.limit, queued=len(self.waiting), queue_max=self.queue_max)
        if decision is Admission.run:
            self.in_flight += 1
        elif decision is Admission.queue:
            self.waiting.append((ticket, now + self.queue_timeout))
        return decision

    def deadline(self, ticket: int) -> float | None:
        return next((d for t, d in self.waiting if t == ticket), None)

    def release(self) -> int | None:
        """A slot is free: it passes straight to the first in line (its ticket is returned), else it is freed."""
        if self.waiting:
            ticket, _ = self.waiting.popleft()
            return ticket
        self.in_flight = max(0, self.in_flight - 1)
        return None

    def leave(self, ticket: int) -> bool:
        """A queued request gives up (its deadline passed, its client left). False when it is no longer in line:
        the slot was handed to it meanwhile, and the caller must release it."""
        for entry in self.waiting:
            if entry[0] == ticket:
                self.waiting.remove(entry)
                return True
        return False

    def retry_after(self, typical_s: float | None) -> int:
        return retry_after_s(queued=len(self.waiting), limit=self.limit or 1, typical_s=typical_s)

    # -- a node failing for one model -----------------------------------------------------------------------

    def model_failed(self, model: str, now: float) -> bool:
        until = self.failed_models.get(model)
        return until is not None and now < until

    def fail_model(self, model: str, now: float) -> None:
        self.failed_models[model] = now + MODEL_HOLD_S

    def model_ok(self, model: str) -> None:
        self.failed_models.pop(model, None)


def split_node(model: str, peers: list[str]) -> tuple[str, str] | None:
    """``node/model`` -> (node, model) when ``node`` is a peer's name."""
    node, sep, rest = model.partition("/")
    return (node, rest) if sep and rest and node in peers else None


def candidates(model: str, peers: list[PeerView]) -> list[tuple[PeerView, str]]:
    """Every (node, name to send) that serves ``model``: ``node/model`` names one node (known from the config, so
    it is a candidate before its first good probe: down, it gets the 503 that names it); otherwise each node whose
    models or aliases hold it."""
    by_name = {p.name: p for p in peers}
    target = split_node(model, list(by_name))
    if target is not None:
        return [(by_name[target[0]], target[1])]
    return [(p, model) for p in peers if p.serves(model)]


def pick(choices: list[tuple[PeerView, str]], local_load: int | None, *, now: float) -> tuple[PeerView, str] | None:
    """The node a request goes to among those up, or None when this node's own replicas (``local_load``
    requests in flight or queued; None when it has none) should answer.

    In order: one that has not failed for this model lately; one with room now (no limit or a free slot) before
    one where the request would queue; the fewest in flight + queued. A node that failed for the model is still
    tried when it is the only one (the failure may be over), but this node's replicas go first. A tie with
    ``local_load`` stays here."""
    up = [c for c in choices if c[0].up]
    if not up:
        return None

    def key(choice: tuple[PeerView, str]) -> tuple[bool, bool, int, str]:
        view, send_name = choice
        return (view.model_failed(send_name, now), not view.has_room, view.in_flight + view.queued, view.name)

    best = min(up, key=key)
    view, send_name = best
    if local_load is not None and (view.model_failed(send_name, now) or local_load <= view.in_flight + view.queued):
        return None
    return best


def retryable_status(status: int) -> bool:
    """A node's answer that says its instance for the model failed (502 bad gateway, 504 timeout): the request is
    tried on another replica when there is one. A 503 (loading, the node's own queue) or 429 is an answer: relayed,
    the node is not marked as failing."""
    return status in (502, 504)
