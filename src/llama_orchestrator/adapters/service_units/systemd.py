"""Linux: a systemd user unit, ``~/.config/systemd/user/<name>.service``, started at login (``Target.name``:
``llama-orchestrator`` for the default home, with a hash of the home's path for the others)."""

from __future__ import annotations

from pathlib import Path

from llama_orchestrator.adapters.service_units import (
    SERVICE_NAME,
    RemoveFile,
    RunCommand,
    Runner,
    ServiceStatus,
    ServiceUnavailable,
    Step,
    Target,
    WriteFile,
    output_of,
)

UNIT = f"{SERVICE_NAME}.service"  # the default home's


def unit_name(target: Target) -> str:
    return f"{target.name}.service"


SYSTEMCTL = ["systemctl", "--user"]


class SystemdUserUnit:
    name = "systemd user unit"

    def unit_path(self, target: Target) -> Path:
        # systemd reads user units from $XDG_CONFIG_HOME/systemd/user (default ~/.config/systemd/user).
        return target.config_home / "systemd" / "user" / unit_name(target)

    def files(self, target: Target) -> list[Path]:
        return [self.unit_path(target)]

    def render(self, target: Target) -> str:
        lines = [
            "# Written by `llama-orch service install`; `llama-orch service uninstall` removes it.",
            "[Unit]",
            "Description=llama-orchestrator daemon: supervises llama-server instances",
            "",
            "[Service]",
            "Type=simple",
            f"ExecStart={exec_line(target.argv)}",
            f"WorkingDirectory=-{_escape_specifiers(str(target.home))}",
            "Environment=PYTHONUNBUFFERED=1",
        ]
        if target.path_env:
            # The user manager's PATH is short: keep the one `service install` ran with, so the daemon finds
            # the same llama-server the user's shell does.
            lines.append(f"Environment={_quote(f'PATH={target.path_env}')}")
        lines += [
            "Restart=on-failure",
            "RestartSec=5",
            "# Stopping the daemon leaves the llama-server instances running, as `llama-orch daemon stop` does;",
            "# the next daemon adopts them. `llama-orch down --all` stops them.",
            "KillMode=process",
            "TimeoutStopSec=30",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
        return "\n".join(lines)

    def install_steps(self, target: Target) -> list[Step]:
        return [
            WriteFile(self.unit_path(target), self.render(target)),
            RunCommand([*SYSTEMCTL, "daemon-reload"]),
            RunCommand([*SYSTEMCTL, "enable", "--now", unit_name(target)]),
        ]

    def uninstall_steps(self, target: Target) -> list[Step]:
        unit = self.unit_path(target)
        return [
            RunCommand([*SYSTEMCTL, "disable", "--now", unit_name(target)], check=False),
            RemoveFile(unit),
            # `disable` removes this link; removing it again covers a unit disabled by hand or half installed.
            RemoveFile(unit.parent / "default.target.wants" / unit_name(target)),
            RunCommand([*SYSTEMCTL, "daemon-reload"]),
            RunCommand([*SYSTEMCTL, "reset-failed", unit_name(target)], check=False),
        ]

    def check_usable(self, target: Target, run: Runner) -> None:
        result = run([*SYSTEMCTL, "show-environment"])
        if result.returncode == 0:
            return
        if result.returncode == 127:
            raise ServiceUnavailable(
                "systemctl was not found: this system does not run systemd. "
                "`llama-orch service install --dry-run` shows the unit; run `llama-orch daemon run` from your "
                "init system instead"
            )
        raise ServiceUnavailable(
            f"`systemctl --user` is not usable here ({output_of(result) or f'exit {result.returncode}'}): there is "
            "no systemd user session (common in containers, over `su`/`sudo`, or without a login session). Log in "
            f"normally, or run `loginctl enable-linger {target.user}` so the user manager runs without a login, "
            "then retry; `llama-orch service install --dry-run` prints the unit to install by hand"
        )

    def status(self, target: Target, run: Runner) -> ServiceStatus:
        unit = self.unit_path(target)
        status = ServiceStatus(self.name, unit.is_file(), files=[str(unit)])
        try:
            self.check_usable(target, run)
        except ServiceUnavailable as exc:
            status.detail = str(exc)
            return status
        enabled = output_of(run([*SYSTEMCTL, "is-enabled", unit_name(target)])).splitlines()
        active = output_of(run([*SYSTEMCTL, "is-active", unit_name(target)])).splitlines()
        status.enabled = bool(enabled) and enabled[0] in ("enabled", "enabled-runtime", "linked")
        status.active = bool(active) and active[0] == "active"
        status.detail = f"{enabled[0] if enabled else '?'}, {active[0] if active else '?'}"
        return status


def exec_line(argv: list[str]) -> str:
    """An argv list as systemd's ExecStart= reads it: words split on spaces, double quotes around those that
    need them, ``%`` (specifiers) and ``$`` (variables) doubled."""
    return " ".join(_quote(arg).replace("$", "$$") for arg in argv)


def _quote(word: str) -> str:
    word = _escape_specifiers(word)
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _escape_specifiers(text: str) -> str:
    return text.replace("%", "%%")
