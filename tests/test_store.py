"""The SQLite state file: real files, several connections and processes writing at once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env
from llama_orchestrator.adapters.store import SCHEMA_VERSION, InstanceRow, Store


def test_rows_round_trip_and_compare_and_swap(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite")
    store.put(InstanceRow(name="a", status="running", pid=10, create_time=1.5))
    assert store.get("a").pid == 10
    assert not store.update("a", only_if={"pid": 11}, status="exited"), "stale knowledge changes nothing"
    assert store.get("a").status == "running"
    assert store.update("a", only_if={"pid": 10}, only_if_status={"running"}, status="exited")
    assert store.get("a").status == "exited"
    assert store.update("new", status="backoff") and store.get("new").status == "backoff", "a missing row is made"


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
    other.update("a", status="stopped")
    deadline_reads = [cached.get("a").status for _ in range(1000)]
    assert deadline_reads[-1] == "stopped"
    cached.update("a", status="starting")
    assert cached.get("a").status == "starting", "own writes are seen at once"


WRITER = """
import sys
from pathlib import Path
from llama_orchestrator.adapters.store import Store
store = Store(Path(sys.argv[1]))
for i in range(200):
    store.update(sys.argv[2], status="running", restarts=i)
    store.add_event(sys.argv[2], "tick", str(i))
"""


def test_several_processes_write_at_once_without_database_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    Store(path)
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{n}"], stderr=subprocess.PIPE, text=True,
                         env=subprocess_env())
        for n in range(4)
    ]
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0, 0, 0], errors
    store = Store(path)
    assert {name: row.restarts for name, row in store.all().items()} == {f"w{n}": 199 for n in range(4)}
    assert len(store.events(limit=10_000)) == 800
