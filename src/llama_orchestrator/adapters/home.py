"""The home: one folder that holds every config, log and bit of state (SPEC §2)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llama_orchestrator.domain.config import is_valid_name
from llama_orchestrator.domain.errors import UsageError

HOME_ENV = "LLAMA_ORCH_HOME"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike[str] | None = None) -> Home:
        """``--home``, else ``$LLAMA_ORCH_HOME``, else the platform's user data folder."""
        chosen = explicit or os.environ.get(HOME_ENV)
        if not chosen:
            import platformdirs

            chosen = platformdirs.user_data_dir("llama-orchestrator", appauthor=False)
        return cls(Path(chosen).expanduser().absolute())

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
