"""Peers (issue 12), pure: which node serves a model name, the probe backoff of a node that is down, and the
choice among replicas on several nodes. Time is an argument; the I/O is ``services.peers``."""

from __future__ import annotations

from dataclasses import dataclass, field

PROBE_UP_S = 5.0  # a node that answers is asked for its models this often
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0


def probe_delay(failures: int) -> float:
    """Seconds until the next probe: ``PROBE_UP_S`` while up; 1, 2, 4, ... capped at 30 after failures."""
    if failures <= 0:
        return PROBE_UP_S
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (failures - 1))


@dataclass
class PeerView:
    """What the router knows of one node: its models (the last answer, kept while it is down, so a request for
    them gets a 503 that names the node rather than a 404), its declared aliases and its load."""

    name: str
    models: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    up: bool = False
    in_flight: int = 0
    failures: int = 0
    next_probe_at: float = 0.0

    def serves(self, model: str) -> bool:
        return model in self.models or model in self.aliases


def split_node(model: str, peers: list[str]) -> tuple[str, str] | None:
    """``node/model`` -> (node, model) when ``node`` is a peer's name."""
    node, sep, rest = model.partition("/")
    return (node, rest) if sep and rest and node in peers else None


def candidates(model: str, peers: list[PeerView]) -> list[tuple[PeerView, str]]:
    """Every (node, name to send) that serves ``model``: ``node/model`` names one node; otherwise each node whose
    models or aliases hold it."""
    by_name = {p.name: p for p in peers}
    target = split_node(model, list(by_name))
    if target is not None:
        return [(by_name[target[0]], target[1])]
    return [(p, model) for p in peers if p.serves(model)]


def pick(choices: list[tuple[PeerView, str]], local_load: int | None) -> tuple[PeerView, str] | None:
    """The node with the fewest requests in flight among those up, or None when this node's own replicas
    (``local_load`` requests in flight; None when it has none) are no busier: a tie stays here."""
    up = [c for c in choices if c[0].up]
    if not up:
        return None
    best = min(up, key=lambda c: c[0].in_flight)
    if local_load is not None and local_load <= best[0].in_flight:
        return None
    return best
