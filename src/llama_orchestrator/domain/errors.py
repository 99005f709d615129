"""One error hierarchy for the whole project.

Front ends map it in one place each: the CLI to exit codes (``cli.app``), the HTTP API to statuses. Exit codes are
documented in the README: 0 ok, 1 failed, 2 usage or invalid config, 3 not found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3


class OrchestratorError(Exception):
    """Something the user can act on; ``str()`` is the message shown to them."""

    exit_code = EXIT_FAILED


class UsageError(OrchestratorError):
    exit_code = EXIT_USAGE


class NotFoundError(OrchestratorError):
    exit_code = EXIT_NOT_FOUND


class InstanceNotFound(NotFoundError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no instance named {name!r} (see `llama-orch ps -a`, or create it with `llama-orch init`)")
        self.name = name


class StartError(OrchestratorError):
    """An instance could not be started: raised before spawning when a check fails, or after it exited early."""


class StopError(OrchestratorError):
    pass


class InUseError(OrchestratorError):
    """Refused because something still uses it: a model file an instance's config names (`models rm`)."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: where (a dotted field path, or ``line N, column M``), what, and the fix."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass
class ConfigError(OrchestratorError):
    """A config file that does not load. Names the file and every field that is wrong."""

    path: str
    problems: list[ConfigProblem] = field(default_factory=list)
    exit_code = EXIT_USAGE

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"invalid config {self.path}:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
