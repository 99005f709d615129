"""Windows: a Task Scheduler task that runs the daemon at logon, or an NSSM service where ``nssm`` is installed."""

from __future__ import annotations

import subprocess
from pathlib import Path
from xml.sax.saxutils import escape

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

TASK_NS = "http://schemas.microsoft.com/windows/2004/02/mit/task"


def windowless(argv: list[str]) -> list[str]:
    """pythonw.exe beside python.exe, where it exists: a logon task must not open a console window (the daemon
    logs to state/daemon.log, not to a console)."""
    exe = Path(argv[0])
    if exe.name.lower() == "python.exe" and exe.with_name("pythonw.exe").is_file():
        return [str(exe.with_name("pythonw.exe")), *argv[1:]]
    return list(argv)


class ScheduledTask:
    """``schtasks /Create /XML``: an XML definition, because ``/TR`` is limited to 261 characters and its tasks are
    stopped after 72 hours (ExecutionTimeLimit); this one runs for good, restarts on failure, as the user, with
    least privilege (``/RL LIMITED``)."""

    name = "Task Scheduler task"

    def xml_path(self, target: Target) -> Path:
        return target.state_dir / f"{target.name}.task.xml"

    def files(self, target: Target) -> list[Path]:
        return [self.xml_path(target)]

    def render(self, target: Target) -> str:
        argv = windowless(target.argv)
        user = f"\n      <UserId>{escape(target.user)}</UserId>" if target.user else ""
        return f"""<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="{TASK_NS}">
  <RegistrationInfo>
    <Description>llama-orchestrator daemon: supervises llama-server instances. Written by `llama-orch service
      install`; `llama-orch service uninstall` removes it.</Description>
    <URI>\\{escape(target.name)}</URI>
  </RegistrationInfo>
  <Triggers>
    <LogonTrigger>
      <Enabled>true</Enabled>{user}
    </LogonTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">{user}
      <LogonType>InteractiveToken</LogonType>
      <RunLevel>LeastPrivilege</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <AllowHardTerminate>true</AllowHardTerminate>
    <StartWhenAvailable>false</StartWhenAvailable>
    <RunOnlyIfNetworkAvailable>false</RunOnlyIfNetworkAvailable>
    <IdleSettings>
      <StopOnIdleEnd>false</StopOnIdleEnd>
      <RestartOnIdle>false</RestartOnIdle>
    </IdleSettings>
    <AllowStartOnDemand>true</AllowStartOnDemand>
    <Enabled>true</Enabled>
    <Hidden>false</Hidden>
    <RunOnlyIfIdle>false</RunOnlyIfIdle>
    <WakeToRun>false</WakeToRun>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <Priority>7</Priority>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>999</Count>
    </RestartOnFailure>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{escape(argv[0])}</Command>
      <Arguments>{escape(subprocess.list2cmdline(argv[1:]))}</Arguments>
      <WorkingDirectory>{escape(str(target.home))}</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
"""

    def install_steps(self, target: Target) -> list[Step]:
        xml = self.xml_path(target)
        return [
            WriteFile(xml, self.render(target), encoding="utf-16"),  # schtasks reads UTF-16 task definitions
            RunCommand(["schtasks", "/Create", "/TN", target.name, "/XML", str(xml), "/F"]),
            RunCommand(["schtasks", "/Run", "/TN", target.name]),  # now, not only at the next logon
        ]

    def uninstall_steps(self, target: Target) -> list[Step]:
        return [
            RunCommand(["schtasks", "/End", "/TN", target.name], check=False),
            RunCommand(["schtasks", "/Delete", "/TN", target.name, "/F"]),
            RemoveFile(self.xml_path(target)),
        ]

    def check_usable(self, target: Target, run: Runner) -> None:
        return None

    def status(self, target: Target, run: Runner) -> ServiceStatus:
        result = run(["schtasks", "/Query", "/TN", target.name, "/FO", "LIST", "/V"])
        status = ServiceStatus(self.name, result.returncode == 0, files=[str(self.xml_path(target))])
        if result.returncode != 0:
            status.enabled, status.active, status.detail = False, False, "no such task"
            return status
        fields = _list_fields(output_of(result))
        state, running = fields.get("Scheduled Task State"), fields.get("Status")
        status.enabled = None if state is None else state.lower() == "enabled"
        status.active = None if running is None else running.lower() == "running"
        status.detail = ", ".join(filter(None, [state, running])) or "registered"
        return status


class NssmService:
    """An NSSM service (chosen when ``nssm`` is on PATH): starts at boot, restarts the daemon when it exits.
    Installing and removing a service needs an elevated (administrator) prompt."""

    name = "NSSM service"

    def files(self, target: Target) -> list[Path]:
        return []  # NSSM keeps its settings in the registry; `nssm remove` deletes them

    def install_steps(self, target: Target) -> list[Step]:
        nssm = ["nssm"]
        return [
            # A service left by an earlier install is replaced, not reported as "already exists".
            RunCommand([*nssm, "stop", target.name], check=False),
            RunCommand([*nssm, "remove", target.name, "confirm"], check=False),
            RunCommand([*nssm, "install", target.name, target.argv[0]]),
            RunCommand([*nssm, "set", target.name, "AppParameters", subprocess.list2cmdline(target.argv[1:])]),
            RunCommand([*nssm, "set", target.name, "AppDirectory", str(target.home)]),
            RunCommand([*nssm, "set", target.name, "AppStdout", str(target.state_dir / "nssm.stdout.log")]),
            RunCommand([*nssm, "set", target.name, "AppStderr", str(target.state_dir / "nssm.stderr.log")]),
            RunCommand([*nssm, "set", target.name, "AppExit", "Default", "Restart"]),
            # Stopping the service stops the daemon only: the instances keep running, as with `daemon stop`
            # (NSSM's default kills the whole process tree), and the next daemon adopts them.
            RunCommand([*nssm, "set", target.name, "AppKillProcessTree", "0"]),
            RunCommand(
                [
                    *nssm,
                    "set",
                    target.name,
                    "Description",
                    "llama-orchestrator daemon: supervises llama-server instances",
                ]
            ),
            RunCommand([*nssm, "set", target.name, "Start", "SERVICE_AUTO_START"]),
            RunCommand([*nssm, "start", target.name]),
        ]

    def uninstall_steps(self, target: Target) -> list[Step]:
        return [
            RunCommand(["nssm", "stop", target.name], check=False),
            RunCommand(["nssm", "remove", target.name, "confirm"]),
        ]

    def check_usable(self, target: Target, run: Runner) -> None:
        return None

    def status(self, target: Target, run: Runner) -> ServiceStatus:
        result = run(["nssm", "status", target.name])
        state = output_of(result).splitlines()
        status = ServiceStatus(self.name, result.returncode == 0)
        if result.returncode != 0:
            status.enabled, status.active, status.detail = False, False, "no such service"
            return status
        start = output_of(run(["nssm", "get", target.name, "Start"])).splitlines()
        status.active = bool(state) and state[0] == "SERVICE_RUNNING"
        status.enabled = bool(start) and start[0] in ("SERVICE_AUTO_START", "SERVICE_DELAYED_AUTO_START")
        status.detail = ", ".join(filter(None, [start[0] if start else None, state[0] if state else None]))
        return status


def _list_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields
