"""The transition table's shape: every status has a row, every status is reachable, none is a trap."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from llama_orchestrator.domain import states
from llama_orchestrator.domain.states import ACTIVE, TRANSITIONS, Health, Status, is_active

# Whether the code keeps to the table is tested against the code's own writes: tests/test_transitions.py drives every
# row of it. Here: the table's own shape.


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
