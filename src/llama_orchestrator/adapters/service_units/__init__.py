"""Registering the daemon as a login service: one module per OS behind one small interface (SPEC §10).

A manager turns a ``Target`` (what to run, for whom) into ordered ``Step``s: files to write or remove and argv
lists to run. ``services.system_service`` prints them (``--dry-run``) or carries them out through a ``Runner``, so
every OS's files are rendered and tested on any OS and no command ever goes through a shell.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

SERVICE_NAME = "llama-orchestrator"
OS_NAMES = ("linux", "windows", "macos")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class Target:
    """Everything the service files depend on, gathered once (tests build it by hand).

    ``argv`` is the daemon command (``<python> -m llama_orchestrator --home <home> daemon run``); ``user_home``,
    ``config_home`` (XDG), ``uid`` and ``user`` say where and for whom it is installed. ``name`` is the unit's,
    agent's, task's or service's name for this home (``service_name_for``).
    """

    home: Path
    argv: list[str]
    state_dir: Path
    user_home: Path
    config_home: Path
    uid: int
    user: str
    path_env: str = ""
    name: str = SERVICE_NAME


def service_name_for(home: Path, default_home: Path | None = None) -> str:
    """``llama-orchestrator`` for the platform's default home (the name earlier versions installed, so their
    `service uninstall` still finds it), else ``llama-orchestrator-<8 hex>``: a hash of the home's absolute path,
    so the services of several homes on one machine coexist and each install replaces only its own."""

    def norm(path: Path) -> str:
        return os.path.normcase(os.path.abspath(path))

    if default_home is not None and norm(home) == norm(default_home):
        return SERVICE_NAME
    return f"{SERVICE_NAME}-{hashlib.sha256(norm(home).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class WriteFile:
    path: Path
    content: str
    encoding: str = "utf-8"


@dataclass(frozen=True)
class RemoveFile:
    path: Path


@dataclass(frozen=True)
class RunCommand:
    argv: list[str]
    check: bool = True  # False: a failure is expected at times (stopping what is not running) and is ignored


Step = WriteFile | RemoveFile | RunCommand


@dataclass
class ServiceStatus:
    manager: str
    installed: bool  # the service file / registration exists
    enabled: bool | None = None  # starts at login (None: could not tell)
    active: bool | None = None  # running now
    detail: str = ""
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "manager": self.manager,
            "installed": self.installed,
            "enabled": self.enabled,
            "active": self.active,
            "detail": self.detail,
            "files": self.files,
        }


class ServiceUnavailable(Exception):
    """The OS service manager cannot be used from here (e.g. no systemd user bus); the message says what to do."""


class ServiceManager(Protocol):
    name: str  # for people: "systemd user unit", "launchd agent", ...

    def files(self, target: Target) -> list[Path]:
        """Every file install writes (uninstall removes them all)."""

    def install_steps(self, target: Target) -> list[Step]: ...

    def uninstall_steps(self, target: Target) -> list[Step]: ...

    def check_usable(self, target: Target, run: Runner) -> None:
        """Raise ServiceUnavailable when install/uninstall could not work here."""

    def status(self, target: Target, run: Runner) -> ServiceStatus: ...


def manager_for(os_name: str, *, use_nssm: bool = False) -> ServiceManager:
    """The manager for ``linux``, ``macos`` or ``windows`` (Task Scheduler, or NSSM with ``use_nssm``)."""
    if os_name == "linux":
        from llama_orchestrator.adapters.service_units.systemd import SystemdUserUnit

        return SystemdUserUnit()
    if os_name == "macos":
        from llama_orchestrator.adapters.service_units.launchd import LaunchdAgent

        return LaunchdAgent()
    if os_name == "windows":
        from llama_orchestrator.adapters.service_units.windows_task import NssmService, ScheduledTask

        return NssmService() if use_nssm else ScheduledTask()
    raise ValueError(f"unknown OS {os_name!r}: one of {', '.join(OS_NAMES)}")


def command_text(argv: Sequence[str], os_name: str) -> str:
    """An argv list as one would type it in that OS's shell (for --dry-run and error messages)."""
    if os_name == "windows":
        return subprocess.list2cmdline(list(argv))
    return shlex.join(argv)


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    # NSSM and some Windows tools answer in UTF-16: read as text, the NULs remain.
    return f"{result.stdout or ''}\n{result.stderr or ''}".replace("\x00", "").strip()
