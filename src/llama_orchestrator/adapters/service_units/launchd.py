"""macOS: a launchd agent, ``~/Library/LaunchAgents/io.github.llama-orchestrator.plist``, loaded at login."""

from __future__ import annotations

import plistlib
from pathlib import Path

from llama_orchestrator.adapters.service_units import (
    RemoveFile,
    RunCommand,
    Runner,
    ServiceStatus,
    Step,
    Target,
    WriteFile,
    output_of,
)

LABEL = "io.github.llama-orchestrator"  # the default home's


def label(target: Target) -> str:
    """``io.github.<Target.name>``: one agent per home."""
    return f"io.github.{target.name}"


class LaunchdAgent:
    name = "launchd agent"

    def plist_path(self, target: Target) -> Path:
        return target.user_home / "Library" / "LaunchAgents" / f"{label(target)}.plist"

    def files(self, target: Target) -> list[Path]:
        return [self.plist_path(target)]

    def render(self, target: Target) -> str:
        document = {
            "Label": label(target),
            "ProgramArguments": list(target.argv),
            "RunAtLoad": True,
            # Restarted when it exits with an error or is killed; a clean exit (daemon stop) stays down.
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": 10,
            "WorkingDirectory": str(target.home),
            "StandardOutPath": str(target.state_dir / "launchd.stdout.log"),
            "StandardErrorPath": str(target.state_dir / "launchd.stderr.log"),
            # launchd agents start with PATH=/usr/bin:/bin:/usr/sbin:/sbin: keep the one install ran with, so a
            # Homebrew llama-server is found.
            "EnvironmentVariables": {"PYTHONUNBUFFERED": "1", **({"PATH": target.path_env} if target.path_env else {})},
            # Instances outlive a stopped daemon, as with `llama-orch daemon stop`; the next daemon adopts them.
            "AbandonProcessGroup": True,
            "ProcessType": "Background",
        }
        return plistlib.dumps(document, sort_keys=False).decode("utf-8")

    def _domain(self, target: Target) -> str:
        return f"gui/{target.uid}"

    def install_steps(self, target: Target) -> list[Step]:
        plist = self.plist_path(target)
        return [
            WriteFile(plist, self.render(target)),
            # An agent loaded before (a reinstall) must be booted out, or bootstrap fails with "already loaded".
            RunCommand(["launchctl", "bootout", f"{self._domain(target)}/{label(target)}"], check=False),
            RunCommand(["launchctl", "bootstrap", self._domain(target), str(plist)]),
        ]

    def uninstall_steps(self, target: Target) -> list[Step]:
        return [
            RunCommand(["launchctl", "bootout", f"{self._domain(target)}/{label(target)}"], check=False),
            RemoveFile(self.plist_path(target)),
        ]

    def check_usable(self, target: Target, run: Runner) -> None:
        return None  # launchctl's own errors are clear; they surface from the step that fails

    def status(self, target: Target, run: Runner) -> ServiceStatus:
        plist = self.plist_path(target)
        status = ServiceStatus(self.name, plist.is_file(), files=[str(plist)])
        result = run(["launchctl", "print", f"{self._domain(target)}/{label(target)}"])
        if result.returncode != 0:
            status.enabled, status.active = False, False
            status.detail = "not loaded"
            return status
        fields = {}
        for line in output_of(result).splitlines():
            key, sep, value = line.strip().partition(" = ")
            if sep and key not in fields:
                fields[key] = value.strip()
        status.enabled = True
        status.active = fields.get("state") == "running"
        status.detail = f"loaded, state {fields.get('state', '?')}"
        if "pid" in fields:
            status.detail += f", pid {fields['pid']}"
        return status
