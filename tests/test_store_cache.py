"""The daemon's row cache (``Store(cache_s=...)``): its own writes keep it fresh without reading every row again,
and ``change_stamp`` moves with others' writes and its own status changes only."""

from __future__ import annotations

from pathlib import Path

from llama_orchestrator.adapters.store import InstanceRow, Store
from llama_orchestrator.domain.states import Status


def test_own_writes_update_the_cached_row_in_place(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite", cache_s=60)
    store.put(InstanceRow(name="a", status="running", pid=1))
    store.put(InstanceRow(name="b", status="running", pid=2))
    assert store.get("a").health == "unknown"  # the cache is filled
    reads: list[str] = []
    store._db.set_trace_callback(reads.append)
    assert store.update("a", only_if={"pid": 1}, health="healthy")
    assert not store.update("a", only_if={"pid": 9}, health="unhealthy")  # CAS refused: nothing changes
    assert store.transition("b", Status.running, Status.exited, event=("exited", "gone"))
    store.add_event("a", "note", "an event does not touch the rows")
    assert (store.get("a").health, store.get("b").status) == ("healthy", "exited")
    assert not any(r.startswith("SELECT * FROM instances\n") or r == "SELECT * FROM instances" for r in reads)


def test_the_change_stamp_moves_with_others_writes_and_own_status_changes(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    daemon, cli = Store(path, cache_s=0.2), Store(path)
    daemon.put(InstanceRow(name="a", status="running", pid=1))
    stamp = daemon.change_stamp()
    daemon.update("a", health="healthy")  # a probe's result: not news
    assert daemon.change_stamp() == stamp
    cli.transition("a", Status.running, Status.stopping)  # another process
    moved = daemon.change_stamp()
    assert moved != stamp
    daemon.transition("a", Status.stopping, Status.stopped)  # our own status change (the router, the API)
    assert daemon.change_stamp() != moved
