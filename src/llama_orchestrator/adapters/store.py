"""Runtime state in SQLite (WAL): one row per instance, and the event log.

Several processes write here at once (CLI commands, the daemon, the dashboard). Every write is one short
``BEGIN IMMEDIATE`` transaction and the busy timeout is long, so writers queue instead of failing with
"database is locked"; readers never block writers in WAL mode.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

SCHEMA_VERSION = 3
_MIGRATIONS = {
    1: """
    CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        status TEXT NOT NULL DEFAULT 'stopped',
        health TEXT NOT NULL DEFAULT 'unknown',
        pid INTEGER,
        create_time REAL,
        port INTEGER,
        started_at REAL,
        stopped_at REAL,
        exit_code INTEGER,
        restarts INTEGER NOT NULL DEFAULT 0,
        stopped_by_user INTEGER NOT NULL DEFAULT 0,
        next_restart_at REAL,
        last_error TEXT,
        health_checked_at REAL,
        health_latency_ms REAL,
        health_error TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        instance TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_instance ON events(instance, id);
    """,
    # The supervisor's backoff counter, so a restarted daemon continues the sequence instead of starting over.
    2: """
    ALTER TABLE instances ADD COLUMN restart_attempts INTEGER NOT NULL DEFAULT 0;
    """,
    # The config the process was started with (domain.drift): its hash for `ps`, its copy for `describe`.
    3: """
    ALTER TABLE instances ADD COLUMN config_hash TEXT;
    ALTER TABLE instances ADD COLUMN config_json TEXT;
    """,
}


@dataclass
class InstanceRow:
    name: str
    status: str = "stopped"
    health: str = "unknown"
    pid: int | None = None
    create_time: float | None = None
    port: int | None = None
    started_at: float | None = None
    stopped_at: float | None = None
    exit_code: int | None = None
    restarts: int = 0
    stopped_by_user: bool = False
    next_restart_at: float | None = None
    last_error: str | None = None
    health_checked_at: float | None = None
    health_latency_ms: float | None = None
    health_error: str | None = None
    updated_at: float = 0.0
    restart_attempts: int = 0
    config_hash: str | None = None  # domain.drift.fingerprint of the config the process runs
    config_json: str | None = None


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    instance: str
    kind: str
    message: str


_COLUMNS = [f.name for f in fields(InstanceRow)]


class Store:
    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0, cache_s: float = 0.0) -> None:
        """``cache_s`` > 0 (the daemon): rows are read from a cache that is dropped whenever another process has
        written (SQLite's ``data_version``), looked at most every ``cache_s`` seconds, and on every own write."""
        self.path = path
        self._cache_s = cache_s
        self._cache: dict[str, InstanceRow] | None = None
        self._cache_checked = 0.0
        self._cache_version = -1
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves, so each transaction is exactly as long as we say.
        self._db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        # One connection, shared by the threads of one process (the daemon's workers): one statement or
        # transaction at a time.
        self._lock = threading.RLock()
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._cache = None  # our own writes do not change data_version for this connection
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: list | tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _migrate(self) -> None:
        version = self._query("PRAGMA user_version")[0][0]
        if version >= SCHEMA_VERSION:
            return
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]  # another process may have just done it
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")

    # -- instances ---------------------------------------------------------------------------------------------

    def get(self, name: str) -> InstanceRow | None:
        if self._cache_s > 0:
            row = self._cached_rows().get(name)
            return replace(row) if row is not None else None
        rows = self._query("SELECT * FROM instances WHERE name = ?", (name,))
        return _to_row(rows[0]) if rows else None

    def _cached_rows(self) -> dict[str, InstanceRow]:
        now = time.monotonic()
        if self._cache is None or now - self._cache_checked >= self._cache_s:
            self._cache_checked = now
            version = self._query("PRAGMA data_version")[0][0]
            if self._cache is None or version != self._cache_version:
                self._cache_version = version
                self._cache = {r["name"]: _to_row(r) for r in self._query("SELECT * FROM instances")}
        return self._cache

    def all(self) -> dict[str, InstanceRow]:
        return {r["name"]: _to_row(r) for r in self._query("SELECT * FROM instances ORDER BY name")}

    def put(self, row: InstanceRow, now: float | None = None) -> None:
        row.updated_at = time.time() if now is None else now
        values = asdict(row)
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with self.transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO instances ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                [values[c] for c in _COLUMNS],
            )

    def update(
        self,
        name: str,
        *,
        only_if_status: set[str] | None = None,
        only_if: dict[str, object] | None = None,
        **changes: object,
    ) -> bool:
        """Change some fields; with ``only_if_status``/``only_if``, only while the row still has those values
        (compare-and-swap, so a writer acting on stale knowledge changes nothing).

        Returns whether a row was changed. A missing row is created first, so updates never get lost.
        """
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown columns {unknown}")
        changes = {"updated_at": time.time(), **changes}
        sets = ", ".join(f"{k} = ?" for k in changes)
        sql = f"UPDATE instances SET {sets} WHERE name = ?"
        params: list[object] = [*changes.values(), name]
        if only_if_status:
            sql += f" AND status IN ({', '.join('?' for _ in only_if_status)})"
            params += sorted(only_if_status)
        for column, value in (only_if or {}).items():
            if column not in _COLUMNS:
                raise ValueError(f"unknown column {column}")
            sql += f" AND {column} IS ?"
            params.append(value)
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO instances (name, updated_at) VALUES (?, ?)", (name, time.time()))
            return db.execute(sql, params).rowcount == 1

    def delete(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM instances WHERE name = ?", (name,))

    # -- events ------------------------------------------------------------------------------------------------

    def add_event(self, instance: str, kind: str, message: str, ts: float | None = None) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO events (ts, instance, kind, message) VALUES (?, ?, ?, ?)",
                (time.time() if ts is None else ts, instance, kind, message),
            )

    def events(self, instance: str | None = None, *, limit: int = 50, after_id: int = 0) -> list[Event]:
        """The newest ``limit`` events (of one instance, or all) with id > after_id, oldest first."""
        where, params = "WHERE id > ?", [after_id]
        if instance is not None:
            where += " AND instance = ?"
            params.append(instance)
        rows = self._query(
            f"SELECT * FROM (SELECT * FROM events {where} ORDER BY id DESC LIMIT ?) ORDER BY id", [*params, limit]
        )
        return [Event(r["id"], r["ts"], r["instance"], r["kind"], r["message"]) for r in rows]


def _to_row(row: sqlite3.Row) -> InstanceRow:
    data = {c: row[c] for c in _COLUMNS}
    data["stopped_by_user"] = bool(data["stopped_by_user"])
    return InstanceRow(**data)
