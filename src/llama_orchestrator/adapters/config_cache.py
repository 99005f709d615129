"""What was derived from a config file, remembered by the file's stamp, so an unchanged file is not parsed and
validated again (nor pydantic imported) on every call; any change to the file invalidates it.

A stamp is ``(mtime_ns, size, inode, mode, uid)``: an edit changes the time or the size, a replace (as editors and
``record_api_port`` do) the inode, a ``chmod``/``chown`` the mode or owner (what ``load_settings`` checks for keys).
The stamp is taken before the file is read, so a change made while it is read is seen next time.

Standard library only: the CLI's fast path (``cli.fast``) uses it before anything heavy is imported.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False  # typing and pathlib stay unimported: the fast path counts milliseconds
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    Stamp = list[int]
CACHE_VERSION = 1


def stamp(path: str | Path) -> Stamp | None:
    """The file's stamp, or None when it does not exist (or cannot be looked at)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode, getattr(st, "st_uid", 0)]


class StampCache:
    """A small JSON file of ``{kind:path: {"stamp": ..., "value": ...}}``, private to its user (0600): a value may
    be a key read from ``orchestrator.json``. A cache that cannot be read or written is treated as empty."""

    def __init__(self, file: str | Path) -> None:
        self.file = os.fspath(file)
        self._entries: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._entries is None:
            try:
                with open(self.file, encoding="utf-8") as cached:
                    data = json.load(cached)
                entries = data["entries"] if data.get("version") == CACHE_VERSION else {}
                self._entries = entries if isinstance(entries, dict) else {}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._entries = {}
        return self._entries

    def get(self, kind: str, path: str | Path, current: Stamp | None) -> tuple[bool, Any]:
        """``(True, value)`` when ``value`` was stored for ``path`` at exactly the stamp ``current``."""
        entry = self._load().get(f"{kind}:{os.fspath(path)}")
        if isinstance(entry, dict) and entry.get("stamp") == current:
            return True, entry.get("value")
        return False, None

    def put(self, kind: str, path: str | Path, at: Stamp | None, value: Any) -> None:
        """Remember ``value`` for ``path`` at stamp ``at`` (taken before the file was read), atomically."""
        entries = self._load()
        entries[f"{kind}:{os.fspath(path)}"] = {"stamp": at, "value": value}
        folder, name = os.path.split(self.file)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        try:
            os.makedirs(folder or ".", mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(json.dumps({"version": CACHE_VERSION, "entries": entries}))
            os.replace(tmp, self.file)
        except OSError:  # a read-only home: no cache, the answer is computed again next time
            try:  # noqa: SIM105 - contextlib costs 4 ms of imports on the fast path
                os.unlink(tmp)
            except OSError:
                pass


def cache_of(state_dir: str | Path) -> StampCache:
    return StampCache(os.path.join(state_dir, "validated.json"))


def control_key(settings_path: str | Path, state_dir: str | Path) -> str | None:
    """The first control key of ``orchestrator.json`` (what this home's daemon accepts from its own CLI), or None
    when it has none or does not load (the daemon then answers 401 and the CLI reports that). Validated with
    ``load_settings`` only when the file changed since the last call."""
    current = stamp(settings_path)
    if current is None:
        return None  # no file: the defaults, which hold no keys
    cache = cache_of(state_dir)
    hit, value = cache.get("control_key", settings_path, current)
    if hit:
        return value if isinstance(value, str) else None
    from pathlib import Path

    from llama_orchestrator.adapters.config_files import load_settings
    from llama_orchestrator.domain.errors import ConfigError

    try:
        keys = load_settings(Path(settings_path)).api.effective_control_keys
    except ConfigError:
        return None  # not cached: a broken file is read again (and reported by whoever loads it for real)
    key = keys[0] if keys else None
    cache.put("control_key", settings_path, current, key)
    return key
