"""Runtime state in SQLite (WAL): one row per instance, and the event log.

Several processes write here at once (CLI commands, the daemon, the dashboard). Every write is one short
``BEGIN IMMEDIATE`` transaction and the busy timeout is long, so writers queue instead of failing with
"database is locked"; readers never block writers in WAL mode.

Status changes go through one method, ``transition``: compare-and-swap on the current status, checked against
``domain.states.TRANSITIONS``, the event written in the same transaction. An edge outside the table is a bug: it is
logged and refused, never written.

The database is a cache of what the configs and the OS say (SPEC §13): a file that is missing is created anew, one
that SQLite finds corrupt (on open, or mid-run) is moved aside as ``state.sqlite.corrupt-<UTC time>`` (its -wal/-shm
with it) and replaced by a new one. Either way ``fresh`` says so, and ``on_fresh`` (set by the instance service)
rebuilds the rows of running instances from a scan of the processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import cast

from llama_orchestrator.domain.states import Status, is_valid_transition

log = logging.getLogger("llama_orchestrator.store")

# How often a long-lived connection checks that its file is still the one at ``path`` (deleted, or replaced by
# another process's recovery): then it reopens.
_IDENTITY_CHECK_S = 0.5

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
        self._busy_timeout_s = busy_timeout_s
        self._cache_s = cache_s
        self._cache: dict[str, InstanceRow] | None = None
        self._cache_checked = 0.0
        self._cache_version = -1
        self._status_changes = 0  # status changes this Store made (others' writes show in data_version)
        # One connection, shared by the threads of one process (the daemon's workers): one statement or
        # transaction at a time.
        self._lock = threading.RLock()
        # Why this database is new, when it is: "missing" or "corrupt: moved to <file>". Cleared by whoever rebuilt.
        self.fresh: str | None = None
        # Called (outside any transaction) after a mid-run reopen made the database fresh.
        self.on_fresh: Callable[[Store], None] | None = None
        self._generation = 0  # counts the times the database was made anew
        self._identity: tuple[int, int] | None = None
        self._identity_checked = 0.0
        from llama_orchestrator.adapters.home import make_private_dir, tighten

        make_private_dir(path.parent)  # 0700; a database an older version left 0644 is tightened (with -wal/-shm)
        for extra in ("", "-wal", "-shm"):
            tighten(path.with_name(path.name + extra))
        self._db: sqlite3.Connection | None = None
        self._open()

    # -- opening, and recovery from a lost or corrupt file ----------------------------------------------------

    def _open(self) -> None:
        """Open (creating when missing) and migrate; a corrupt file is moved aside and a new one made."""
        if not self.path.exists():
            self._move_aside(None)  # a -wal/-shm without its database belongs to a lost one: never replay it
            self._made_fresh(self.fresh or "missing")
            # Created private (0600) before SQLite opens it: the state names models, ports and errors.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        found = _identity(self.path)
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _is_corruption(exc):
                raise
            self._close_quietly()
            if _identity(self.path) != found:
                self._open()  # another process has just moved it aside and made a new one: use that
                return
            moved = self._move_aside(_stamp())
            log.error("state database %s is corrupt (%s); moved to %s, starting a new one", self.path, exc, moved)
            self._made_fresh(f"corrupt ({exc}): moved to {moved.name if moved else '?'}")
            self._connect()

    def _connect(self) -> None:
        # isolation_level=None: we issue BEGIN ourselves, so each transaction is exactly as long as we say.
        db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._db = db
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        empty = db.execute("PRAGMA user_version").fetchone()[0] == 0
        self._migrate()
        # A first real read: a damaged page often shows only here.
        db.execute("SELECT count(*) FROM instances").fetchone()
        db.execute("SELECT max(id) FROM events").fetchone()
        if empty and self.fresh is None:
            self._made_fresh("missing")  # an empty file (e.g. truncated to 0 bytes) is a new database
        self._identity = _identity(self.path)
        self._identity_checked = time.monotonic()

    def _made_fresh(self, reason: str) -> None:
        self.fresh = reason
        self._generation += 1

    def _close_quietly(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None

    def _move_aside(self, stamp: str | None) -> Path | None:
        """Move the database and its -wal/-shm to ``<name>.corrupt-<stamp>`` (kept for a person to look at);
        with ``stamp`` None, only a -wal/-shm left without a database (``.orphan-<time>``)."""
        moved = None
        suffix = f".corrupt-{stamp}" if stamp else f".orphan-{_stamp()}"
        for extra in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + extra)
            if stamp is None and extra == "":
                continue
            if source.exists():
                target = self.path.with_name(self.path.name + suffix + extra)
                with contextlib.suppress(OSError):
                    os.replace(source, target)
                    if extra == "":
                        moved = target
        return moved

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """A corrupt database found mid-run: move it aside (unless another process already did) and reopen."""
        with self._lock:
            self._cache = None
            self._close_quietly()
            if self._identity is not None and _identity(self.path) == self._identity:
                moved = self._move_aside(_stamp())
                log.error("state database %s is corrupt (%s); moved to %s, starting a new one", self.path, exc, moved)
                self._made_fresh(f"corrupt ({exc}): moved to {moved.name if moved else '?'}")
            self._open()

    def _check_identity(self) -> None:
        """Reopen when the file at ``path`` is no longer the one we have open (deleted, or moved aside)."""
        now = time.monotonic()
        if now - self._identity_checked < _IDENTITY_CHECK_S:
            return
        self._identity_checked = now
        if _identity(self.path) != self._identity:
            log.warning("state database %s was deleted or replaced; reopening", self.path)
            self._cache = None
            self._close_quietly()
            self._open()

    @property
    def _conn(self) -> sqlite3.Connection:
        """The open connection; between a close and the next open there is none, and using the store is a bug."""
        if self._db is None:
            raise sqlite3.ProgrammingError(f"state database {self.path} is closed")
        return self._db

    def _guarded(self, work: Callable[[sqlite3.Connection], object]) -> object:
        """Run ``work`` on the connection; corruption found on the way is recovered from once, then retried."""
        with self._lock:
            generation = self._generation
            try:
                self._check_identity()
                result = work(self._conn)
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError) and not _is_corruption(exc):
                    raise
                self._recover(exc)
                result = work(self._conn)
            became_fresh = self._generation != generation
        if became_fresh and self.on_fresh is not None:
            self.on_fresh(self)
        return result

    def close(self) -> None:
        self._close_quietly()

    def change_stamp(self) -> tuple[int, int]:
        """Changes since the last look, cheaply: another process's write (SQLite's ``data_version``) or a status
        change through this Store. The daemon does a full pass when it moves, instead of every half second."""
        version = self._query("PRAGMA data_version")[0][0]
        return int(version), self._status_changes

    @contextlib.contextmanager
    def transaction(self, *, rows: bool = True) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; ``rows=False``: it writes no instance row (the cache stays)."""
        if rows:
            self._cache = None  # our own writes do not change data_version for this connection
        with self._lock:
            db = self._conn
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _write(self, work: Callable[[sqlite3.Connection], object]) -> object:
        def in_transaction(_db: sqlite3.Connection) -> object:
            with self.transaction() as db:
                return work(db)

        return self._guarded(in_transaction)

    def _write_row(self, name: str, work: Callable[[sqlite3.Connection], bool]) -> bool:
        """A write of one row that keeps the row cache: the row is read back in the same transaction and replaces
        its cached copy, instead of the whole cache being dropped (and every row read again) after each write."""

        def in_transaction(_db: sqlite3.Connection) -> bool:
            cache = self._cache if self._cache_s > 0 else None
            with self.transaction() as db:
                changed = work(db)
                found = (
                    db.execute("SELECT * FROM instances WHERE name = ?", (name,)).fetchone()
                    if cache is not None
                    else None
                )
            if cache is not None and found is not None and self._cache is None:
                cache[name] = _to_row(found)
                self._cache = cache
            return changed

        return bool(self._guarded(in_transaction))

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        rows = self._guarded(lambda db: db.execute(sql, params).fetchall())
        return cast("list[sqlite3.Row]", rows)  # the connection's row_factory is sqlite3.Row

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
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
        """Write a whole row as it is, status included, unchecked: for seeding (tests, imports), never for a
        status change (that is ``transition``)."""
        row.updated_at = time.time() if now is None else now
        values = asdict(row)
        placeholders = ", ".join("?" for _ in _COLUMNS)
        columns = ", ".join(_COLUMNS)
        sql = f"INSERT OR REPLACE INTO instances ({columns}) VALUES ({placeholders})"  # noqa: S608 - fixed names
        self._write(lambda db: db.execute(sql, [values[c] for c in _COLUMNS]))

    def update(
        self,
        name: str,
        *,
        only_if_status: set[str] | None = None,
        only_if: dict[str, object] | None = None,
        **changes: object,
    ) -> bool:
        """Change some fields other than the status; with ``only_if_status``/``only_if``, only while the row still
        has those values (compare-and-swap, so a writer acting on stale knowledge changes nothing).

        Returns whether a row was changed. A missing row is created first, so updates never get lost. The status
        changes only through ``transition``.
        """
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown columns {unknown}")
        if "status" in changes:
            raise ValueError("status changes go through Store.transition")
        changes = {"updated_at": time.time(), **changes}
        sets = ", ".join(f"{k} = ?" for k in changes)
        sql = f"UPDATE instances SET {sets} WHERE name = ?"  # noqa: S608 - keys checked against _COLUMNS above
        params: list[object] = [*changes.values(), name]
        if only_if_status:
            sql += f" AND status IN ({', '.join('?' for _ in only_if_status)})"
            params += sorted(only_if_status)
        for column, value in (only_if or {}).items():
            if column not in _COLUMNS:
                raise ValueError(f"unknown column {column}")
            sql += f" AND {column} IS ?"
            params.append(value)

        def work(db: sqlite3.Connection) -> bool:
            db.execute("INSERT OR IGNORE INTO instances (name, updated_at) VALUES (?, ?)", (name, time.time()))
            return db.execute(sql, params).rowcount == 1

        return bool(self._write_row(name, work))

    def transition(
        self,
        name: str,
        expected: Status | str | Iterable[Status | str] | None,
        new: Status | str,
        *,
        event: tuple[str, str] | None = None,
        only_if: dict[str, object] | None = None,
        now: float | None = None,
        **changes: object,
    ) -> bool:
        """The one way a status changes: in one transaction, read the row; unless its status is one of
        ``expected`` (None: any) and the fields in ``only_if`` still hold, change nothing and return False
        (compare-and-swap: the caller acted on stale knowledge). An edge ``domain.states.TRANSITIONS`` does not
        hold is a bug: logged as an error, refused, never written. Otherwise write ``new`` and ``changes``, and
        ``event`` (kind, message) with them. A missing row counts as ``stopped``.

        Staying in the same status is not an edge: only the other fields change.
        """
        new = Status(new)
        allowed = (
            None
            if expected is None
            else {Status(expected)}
            if isinstance(expected, str)
            else {Status(e) for e in expected}
        )
        unknown = (set(changes) | set(only_if or {})) - set(_COLUMNS)
        if unknown or "status" in changes:
            raise ValueError(f"bad columns {unknown or {'status'}}")
        ts = time.time() if now is None else now

        def work(db: sqlite3.Connection) -> bool:
            found = db.execute("SELECT * FROM instances WHERE name = ?", (name,)).fetchone()
            current = Status(found["status"]) if found is not None else Status.stopped
            if allowed is not None and current not in allowed:
                return False
            for column, value in (only_if or {}).items():
                if (found[column] if found is not None else None) != value:
                    return False
            if current != new and not is_valid_transition(current, new):
                log.error("BUG: refused status change of %s from %s to %s (not in TRANSITIONS)", name, current, new)
                return False
            if found is None:
                db.execute("INSERT INTO instances (name, updated_at) VALUES (?, ?)", (name, ts))
            values = {**changes, "status": str(new), "updated_at": ts}
            sets = ", ".join(f"{k} = ?" for k in values)
            sql = f"UPDATE instances SET {sets} WHERE name = ?"  # noqa: S608 - keys checked against _COLUMNS
            db.execute(sql, [*values.values(), name])
            if event is not None:
                db.execute("INSERT INTO events (ts, instance, kind, message) VALUES (?, ?, ?, ?)", (ts, name, *event))
            if current != new:
                self._status_changes += 1
            return True

        return bool(self._write_row(name, work))

    def delete(self, name: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM instances WHERE name = ?", (name,)))

    # -- events ------------------------------------------------------------------------------------------------

    def add_event(self, instance: str, kind: str, message: str, ts: float | None = None) -> None:
        def in_transaction(_db: sqlite3.Connection) -> None:
            with self.transaction(rows=False) as db:
                db.execute(
                    "INSERT INTO events (ts, instance, kind, message) VALUES (?, ?, ?, ?)",
                    (time.time() if ts is None else ts, instance, kind, message),
                )

        self._guarded(in_transaction)

    def events(self, instance: str | None = None, *, limit: int = 50, after_id: int = 0) -> list[Event]:
        """The newest ``limit`` events (of one instance, or all) with id > after_id, oldest first."""
        where = "WHERE id > ?"
        params: list[object] = [after_id]
        if instance is not None:
            where += " AND instance = ?"
            params.append(instance)
        newest = f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?"  # noqa: S608 - fixed clauses, values bound
        sql = f"SELECT * FROM ({newest}) ORDER BY id"  # noqa: S608 - as above
        rows = self._query(sql, [*params, limit])
        return [Event(r["id"], r["ts"], r["instance"], r["kind"], r["message"]) for r in rows]


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Whether an error says the file is damaged (not busy, not locked, not a full disk)."""
    text = str(exc).lower()
    return any(p in text for p in ("malformed", "not a database", "corrupt", "no such table"))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _to_row(row: sqlite3.Row) -> InstanceRow:
    data = {c: row[c] for c in _COLUMNS}
    data["stopped_by_user"] = bool(data["stopped_by_user"])
    return InstanceRow(**data)
