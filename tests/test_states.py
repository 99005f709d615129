"""The transition table: the edges SPEC §5 needs are there, nothing else is, and no state is a trap."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from llama_orchestrator.domain import states
from llama_orchestrator.domain.states import ACTIVE, TRANSITIONS, Health, Status, is_active, is_valid_transition

S = Status
ALLOWED = {
    (S.stopped, S.starting),
    (S.starting, S.running),
    (S.starting, S.stopping),
    (S.starting, S.exited),
    (S.starting, S.failed),
    (S.running, S.stopping),
    (S.running, S.exited),
    (S.stopping, S.stopped),
    (S.stopping, S.exited),
    (S.exited, S.starting),
    (S.exited, S.backoff),
    (S.exited, S.failed),
    (S.exited, S.stopped),
    (S.backoff, S.starting),
    (S.backoff, S.stopped),
    (S.backoff, S.failed),
    (S.failed, S.starting),
    (S.failed, S.stopped),
}
ALL_PAIRS = [(a, b) for a in Status for b in Status]


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_transition_table(current: Status, new: Status) -> None:
    assert is_valid_transition(current, new) == ((current, new) in ALLOWED)


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(Status)


def _reachable(start: Status) -> set[Status]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_status_is_reachable_from_stopped() -> None:
    assert _reachable(Status.stopped) == set(Status)


@pytest.mark.parametrize("status", list(Status))
def test_no_status_is_a_trap(status: Status) -> None:
    # Whatever happens, a person can always bring an instance back to stopped.
    assert Status.stopped in _reachable(status) or status is Status.stopped


@pytest.mark.parametrize("status", list(Status))
def test_is_active(status: Status) -> None:
    assert is_active(status) == (status in {Status.starting, Status.running, Status.stopping})
    assert (status in ACTIVE) == is_active(status)


@pytest.mark.parametrize("enum", [Status, Health])
def test_values_are_the_names(enum: type) -> None:
    # Stored in SQLite and printed by `ps`: the string is the API.
    for member in enum:
        assert member == member.name
        assert enum(member.name) is member


def test_health_values() -> None:
    assert [h.value for h in Health] == ["unknown", "loading", "healthy", "unhealthy"]


def test_states_is_a_leaf_module() -> None:
    tree = ast.parse(Path(states.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
