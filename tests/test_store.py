"""The SQLite state file: real files, several connections and processes writing at once."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import subprocess_env
from llama_orchestrator.adapters.store import SCHEMA_VERSION, InstanceRow, Store
from llama_orchestrator.domain.states import Status


def test_rows_round_trip_and_compare_and_swap(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite")
    store.put(InstanceRow(name="a", status="running", pid=10, create_time=1.5))
    assert store.get("a").pid == 10
    assert not store.update("a", only_if={"pid": 11}, restarts=3), "stale knowledge changes nothing"
    assert store.get("a").restarts == 0
    assert store.update("a", only_if={"pid": 10}, only_if_status={"running"}, restarts=3)
    assert store.get("a").restarts == 3
    assert store.update("new", restarts=1) and store.get("new").status == "stopped", "a missing row is made"
    with pytest.raises(ValueError):
        store.update("a", status="exited")  # the status changes only through transition


def test_transition_is_a_compare_and_swap_with_its_event(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite")
    store.put(InstanceRow(name="a", status="running", pid=10, create_time=1.5))
    assert not store.transition("a", Status.starting, Status.exited, event=("exited", "x")), "status moved on"
    assert not store.transition("a", Status.running, Status.exited, only_if={"pid": 11}), "another process"
    assert store.get("a").status == "running" and store.events() == []
    assert store.transition(
        "a", {Status.running, Status.starting}, Status.exited, event=("exited", "gone"), now=5.0, exit_code=3
    )
    row = store.get("a")
    assert (row.status, row.exit_code, row.updated_at) == ("exited", 3, 5.0)
    assert [(e.instance, e.kind, e.message, e.ts) for e in store.events()] == [("a", "exited", "gone", 5.0)]


def test_an_edge_outside_the_table_is_refused_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "state.sqlite")
    store.put(InstanceRow(name="a", status="stopped"))
    with caplog.at_level(logging.ERROR, logger="llama_orchestrator.store"):
        assert not store.transition("a", Status.stopped, Status.stopping, event=("stopping", "x"))
    assert store.get("a").status == "stopped" and store.events() == [], "never written, event included"
    assert "BUG" in caplog.text and "stopped to stopping" in caplog.text
    assert store.transition("missing", None, Status.starting), "a missing row counts as stopped"
    assert store.transition("a", Status.stopped, Status.stopped, stopped_by_user=True), "same status: no edge"


def test_a_missing_database_is_created_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    assert Store(path).fresh == "missing"
    assert Store(path).fresh is None
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def _corrupt(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def _filled(path: Path) -> Store:
    store = Store(path)
    for _n in range(200):  # enough pages that half the file loses some
        store.add_event("a", "kind", "x" * 200)
    store.put(InstanceRow(name="a", status="running", pid=1))
    return store


def test_a_corrupt_database_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    _filled(path).close()
    _corrupt(path)
    store = Store(path)
    assert store.fresh and store.fresh.startswith("corrupt")
    kept = list(tmp_path.glob("state.sqlite.corrupt-*"))
    assert [p.name for p in kept if not p.name.endswith(("-wal", "-shm"))], "the damaged file is kept"
    assert store.all() == {} and store.events() == []
    store.add_event("a", "k", "m")  # and it works


def test_corruption_found_mid_run_is_recovered_once(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = _filled(path)
    calls: list[str | None] = []
    store.on_fresh = lambda s: calls.append(s.fresh)
    store._db.close()  # as if the file went bad under an open connection: drop the page cache, reopen on it
    store._connect()
    _corrupt(path)
    store.events(limit=1000)
    assert calls and calls[0].startswith("corrupt"), calls
    assert list(tmp_path.glob("state.sqlite.corrupt-*"))
    store.put(InstanceRow(name="b"))
    assert set(store.all()) == {"b"}


def test_a_deleted_database_is_noticed_and_reopened(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = Store(path, cache_s=0.0001)
    store.put(InstanceRow(name="a", status="running"))
    calls: list[str | None] = []
    store.on_fresh = lambda s: calls.append(s.fresh)
    for extra in ("", "-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
    store._identity_checked = 0.0  # the next call looks (it does every half second)
    assert store.get("a") is None
    assert calls == ["missing"] and path.exists()


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    Store(tmp_path / "state.sqlite")
    db = sqlite3.connect(tmp_path / "state.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_version_1_file_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    from llama_orchestrator.adapters import store as store_module

    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    for statement in store_module._MIGRATIONS[1].split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO instances (name, status, restarts, updated_at) VALUES ('old', 'running', 4, 0)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    row = Store(path).get("old")
    assert (row.status, row.restarts, row.restart_attempts) == ("running", 4, 0)


def test_events_are_kept_in_order_and_paged(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite")
    for index in range(5):
        store.add_event("a" if index % 2 == 0 else "b", "kind", f"message {index}", ts=float(index))
    assert [e.message for e in store.events("a")] == ["message 0", "message 2", "message 4"]
    newest_two = store.events(limit=2)
    assert [e.message for e in newest_two] == ["message 3", "message 4"]
    assert [e.message for e in store.events(after_id=newest_two[0].id)] == ["message 4"]


def test_the_cache_sees_other_processes_writes(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    cached = Store(path, cache_s=0.0001)
    cached.put(InstanceRow(name="a", status="running"))
    other = Store(path)
    other.transition("a", Status.running, Status.exited)
    deadline_reads = [cached.get("a").status for _ in range(1000)]
    assert deadline_reads[-1] == "exited"
    cached.transition("a", Status.exited, Status.starting)
    assert cached.get("a").status == "starting", "own writes are seen at once"


WRITER = """
import sys
from pathlib import Path
from llama_orchestrator.adapters.store import Store
store = Store(Path(sys.argv[1]))
for i in range(200):
    store.update(sys.argv[2], restarts=i)
    store.add_event(sys.argv[2], "tick", str(i))
"""


def test_several_processes_write_at_once_without_database_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    Store(path)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"w{n}"], stderr=subprocess.PIPE, text=True, env=subprocess_env()
        )
        for n in range(4)
    ]
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0, 0, 0], errors
    store = Store(path)
    assert {name: row.restarts for name, row in store.all().items()} == {f"w{n}": 199 for n in range(4)}
    assert len(store.events(limit=10_000)) == 800


OPENER = """
import sys
from pathlib import Path
from llama_orchestrator.adapters.store import Store
store = Store(Path(sys.argv[1]))
store.add_event("x", "opened", sys.argv[2])
print(len(store.events(limit=1000)))
"""


def test_processes_finding_the_same_corrupt_file_at_once_all_carry_on(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    _filled(path).close()
    _corrupt(path)
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(path), f"p{n}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for n in range(4)
    ]
    results = [o.communicate(timeout=120) for o in openers]
    assert [o.returncode for o in openers] == [0, 0, 0, 0], results
    assert all("Traceback" not in err for _, err in results)
    assert sorted(e.message for e in Store(path).events()) == ["p0", "p1", "p2", "p3"], "none wrote to a lost file"
