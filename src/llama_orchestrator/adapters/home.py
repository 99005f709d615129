"""The home: one folder that holds every config, log and bit of state (SPEC §2).

The home is private to its user: logs hold prompts, configs hold ``env`` tokens, settings hold API keys. On POSIX
every folder is created 0700 and every file 0600 (``make_private_dir``, ``create_private``), and ``Home.secure``
takes group and others' access away from what an older version left (at most once per process and home). On
Windows the folder's ACL (the user's profile) already keeps others out and ``chmod`` cannot say more, so nothing
is checked or changed there.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llama_orchestrator.domain.config import is_valid_name
from llama_orchestrator.domain.errors import UsageError

HOME_ENV = "LLAMA_ORCH_HOME"
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
GROUP_OTHER = 0o077  # the permission bits that let anyone but the owner in
POSIX_MODES = os.name == "posix"  # Windows: chmod only toggles read-only, so there is nothing to check or set
# The home's folders that are made private; models/ is left alone (shared GGUF files, often links).
PRIVATE_FOLDERS = ("instances", "logs", "state", "bins")

_secured: set[Path] = set()


def tighten(path: Path | str) -> None:
    """Take group and others' access away from ``path`` (owner bits kept: an executable stays executable).
    Links, files of other users and vanished files are left alone."""
    if not POSIX_MODES:
        return
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid() or not info.st_mode & GROUP_OTHER:
            return
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~GROUP_OTHER)
    except OSError:
        pass  # gone in the meantime, or a read-only filesystem: nothing better to do


def make_private_dir(path: Path) -> Path:
    """``mkdir -p`` where every folder it creates is 0700, and ``path`` itself 0700 when it existed already."""
    missing = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    tighten(path)
    return path


def create_private(path: Path | str, flags: int = os.O_WRONLY) -> int:
    """``os.open(path, flags | O_CREAT)``: a new file is 0600 from its first moment, an existing one is tightened
    to the owner alone. Returns the file descriptor."""
    fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_BINARY", 0), PRIVATE_FILE)
    if POSIX_MODES:
        try:
            mode = os.fstat(fd).st_mode
            if mode & GROUP_OTHER and os.fstat(fd).st_uid == os.getuid():
                os.fchmod(fd, stat.S_IMODE(mode) & ~GROUP_OTHER)
        except OSError:
            pass
    return fd


def private_opener(path: str, flags: int) -> int:
    """For ``open(path, mode, opener=private_opener)``: the file is created 0600 (tightened if it exists)."""
    return create_private(path, flags)


def open_private_log(path: Path | str) -> BinaryIO:
    """A log file opened append-only and unbuffered for a child to write into, created 0600 in a 0700 folder."""
    make_private_dir(Path(path).parent)
    return open(path, "ab", buffering=0, opener=private_opener)  # the caller closes it


def readable_by_others(path: Path) -> int | None:
    """The permission bits of ``path`` when group or others may access it (POSIX), else None."""
    if not POSIX_MODES:
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    return mode if mode & GROUP_OTHER else None


def default_root() -> Path:
    """The home when neither ``--home`` nor ``$LLAMA_ORCH_HOME`` names one: the platform's user data folder."""
    import platformdirs

    return Path(platformdirs.user_data_dir("llama-orchestrator", appauthor=False)).expanduser().absolute()


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike[str] | None = None) -> Home:
        """``--home``, else ``$LLAMA_ORCH_HOME``, else the platform's user data folder."""
        chosen = explicit or os.environ.get(HOME_ENV)
        return cls(Path(chosen).expanduser().absolute()) if chosen else cls(default_root())

    def secure(self) -> Home:
        """Create the home private and take group and others' access away from its folders and files (state,
        logs, configs, bins), once per process. ``orchestrator.json`` is checked when it is loaded instead: a
        person wrote it, so a too-open one is refused with the fix rather than changed behind their back."""
        if self.root in _secured:
            return self
        make_private_dir(self.root)
        for name in PRIVATE_FOLDERS:
            top = self.root / name
            if not top.is_dir():
                continue
            for folder, _subfolders, files in os.walk(top):
                tighten(folder)
                for entry in files:
                    tighten(os.path.join(folder, entry))
        _secured.add(self.root)
        return self

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.sqlite"

    @property
    def locks_dir(self) -> Path:
        return self.state_dir / "locks"

    @property
    def bins_dir(self) -> Path:
        return self.root / "bins"

    @property
    def registry_path(self) -> Path:
        return self.bins_dir / "registry.json"

    @property
    def settings_path(self) -> Path:
        return self.root / "orchestrator.json"

    def checked_name(self, name: str) -> str:
        # Names become folder names: validate before they touch a path (no "..", no slashes, no capitals).
        if not is_valid_name(name):
            raise UsageError(
                f"invalid instance name {name!r}: use 1-63 lowercase letters, digits and dashes, "
                "starting and ending with a letter or digit (e.g. qwen-7b)"
            )
        return name

    def instance_dir(self, name: str) -> Path:
        return self.instances_dir / self.checked_name(name)

    def config_path(self, name: str) -> Path:
        return self.instance_dir(name) / "config.json"

    def log_dir(self, name: str) -> Path:
        return self.root / "logs" / self.checked_name(name)

    def log_path(self, name: str, stream: str = "stdout") -> Path:
        return self.log_dir(name) / f"{stream}.log"

    def lock_path(self, name: str) -> Path:
        return self.locks_dir / f"{self.checked_name(name)}.lock"

    def instance_names(self) -> list[str]:
        """Every folder under instances/ that holds a config.json, sorted; stray folders are ignored."""
        if not self.instances_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.instances_dir.iterdir() if is_valid_name(p.name) and (p / "config.json").is_file()
        )
