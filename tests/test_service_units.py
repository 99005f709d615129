"""`service install|uninstall|status`: each OS's files rendered and checked here; OS commands faked through the
runner (every one recorded as an argv list), systemd's unit verified by `systemd-analyze` where it exists."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from llama_orchestrator.adapters.home import Home, default_root
from llama_orchestrator.adapters.service_units import Target, service_name_for
from llama_orchestrator.adapters.service_units.launchd import LaunchdAgent
from llama_orchestrator.adapters.service_units.systemd import SystemdUserUnit, exec_line
from llama_orchestrator.adapters.service_units.windows_task import ScheduledTask
from llama_orchestrator.domain.errors import OrchestratorError, UsageError
from llama_orchestrator.services.system_service import ServiceInstaller, daemon_argv

TASK = "{http://schemas.microsoft.com/windows/2004/02/mit/task}"
PLATFORMS = {"linux": "linux", "macos": "darwin", "windows": "win32"}


class Runner:
    """Records every argv; answers from ``answers`` (the longest matching argv prefix), else exit 0 and no output."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[list[str]] = []

    def __call__(self, argv):
        argv = list(argv)
        assert all(isinstance(a, str) for a in argv), argv
        self.calls.append(argv)
        for prefix in sorted(self.answers, key=len, reverse=True):
            if tuple(argv[: len(prefix)]) == prefix:
                code, out = self.answers[prefix]
                return subprocess.CompletedProcess(argv, code, out if code == 0 else "", out if code else "")
        return subprocess.CompletedProcess(argv, 0, "", "")


@pytest.fixture
def orch(tmp_path: Path) -> Home:
    # Spaces and a percent sign: the quoting of every format is exercised.
    return Home(tmp_path / "my home %i")


@pytest.fixture
def target(orch: Home, tmp_path: Path) -> Target:
    user_home = tmp_path / "user"
    return Target(
        home=orch.root,
        argv=daemon_argv(orch),
        state_dir=orch.state_dir,
        user_home=user_home,
        config_home=user_home / ".config",
        uid=501,
        user="alice",
        path_env="/usr/local/bin:/usr/bin",
    )


def installer(orch: Home, target: Target, os_name: str, runner: Runner, **kw) -> ServiceInstaller:
    return ServiceInstaller(orch, os_name=os_name, runner=runner, target=target, platform=PLATFORMS[os_name], **kw)


def every_file(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# -- Linux: systemd user unit ---------------------------------------------------------------------------------


def test_the_unit_runs_the_daemon_in_the_foreground_and_restarts_on_failure(target, orch):
    unit = SystemdUserUnit().render(target)
    lines = unit.splitlines()
    assert f"ExecStart={exec_line(target.argv)}" in lines
    assert f'--home "{orch.root}"'.replace("%", "%%") in unit  # a space quoted, the specifier doubled
    assert exec_line(target.argv).endswith(" daemon run")
    for line in (
        "Restart=on-failure",
        "Type=simple",
        "WantedBy=default.target",
        "KillMode=process",
        "Environment=PATH=/usr/local/bin:/usr/bin",
    ):
        assert line in lines, line
    assert exec_line(["/a b/python", "-c", 'print("$HOME 100%")']) == '"/a b/python" -c "print(\\"$$HOME 100%%\\")"'


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_passes_systemd_analyze_verify(target, tmp_path):
    folder = tmp_path / "units"
    folder.mkdir()
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}

    def verify(text: str) -> subprocess.CompletedProcess[str]:
        unit = folder / "llama-orchestrator.service"
        unit.write_text(text)
        return subprocess.run(
            ["systemd-analyze", "verify", "--user", str(unit)],
            capture_output=True,
            text=True,
            env=env,
            cwd=folder,
            timeout=60,
        )

    good = verify(SystemdUserUnit().render(target))
    assert good.returncode == 0 and "llama-orchestrator.service" not in good.stderr, good.stderr
    bad = verify(SystemdUserUnit().render(target).replace("Restart=on-failure", "Restart=sometimes"))
    assert "sometimes" in bad.stderr  # the check is real: a wrong value is reported


def test_linux_install_writes_the_unit_then_reloads_and_enables(orch, target):
    runner = Runner()
    plan = installer(orch, target, "linux", runner).install()
    unit = target.config_home / "systemd" / "user" / "llama-orchestrator.service"
    assert unit.read_text() == SystemdUserUnit().render(target)
    assert unit.read_text() in plan.describe()  # --dry-run shows exactly this file
    assert runner.calls == [
        ["systemctl", "--user", "show-environment"],
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "llama-orchestrator.service"],
    ]
    assert orch.state_dir.is_dir()


def test_linux_status_asks_is_enabled_and_is_active(orch, target):
    runner = Runner(
        {("systemctl", "--user", "is-enabled"): (0, "enabled\n"), ("systemctl", "--user", "is-active"): (0, "active\n")}
    )
    status = installer(orch, target, "linux", runner).status()
    assert (status.installed, status.enabled, status.active) == (False, True, True)
    assert runner.calls[1:] == [
        ["systemctl", "--user", "is-enabled", "llama-orchestrator.service"],
        ["systemctl", "--user", "is-active", "llama-orchestrator.service"],
    ]


def test_linux_uninstall_removes_every_trace(orch, target):
    installer(orch, target, "linux", Runner()).install()
    wants = target.config_home / "systemd" / "user" / "default.target.wants"
    wants.mkdir()
    (wants / "llama-orchestrator.service").symlink_to("../llama-orchestrator.service")  # what `enable` makes
    runner = Runner({("systemctl", "--user", "disable"): (1, "Unit not loaded.")})  # a failure it may ignore
    plan = installer(orch, target, "linux", runner).uninstall()
    assert plan is not None
    assert every_file(target.config_home) == ["systemd", "systemd/user", "systemd/user/default.target.wants"]
    assert [c[2:] for c in runner.calls[-3:]] == [
        ["disable", "--now", "llama-orchestrator.service"],
        ["daemon-reload"],
        ["reset-failed", "llama-orchestrator.service"],
    ]
    assert installer(orch, target, "linux", Runner()).uninstall() is None  # again: nothing to do


def test_without_a_user_bus_install_fails_clearly_and_writes_nothing(orch, target):
    runner = Runner({("systemctl", "--user", "show-environment"): (1, "Failed to connect to bus: No medium found")})
    with pytest.raises(OrchestratorError) as info:
        installer(orch, target, "linux", runner).install()
    message = str(info.value)
    assert "No medium found" in message and "--dry-run" in message and "loginctl enable-linger alice" in message
    assert every_file(target.user_home) == []
    assert runner.calls == [["systemctl", "--user", "show-environment"]]
    missing = Runner({("systemctl",): (127, "systemctl: program not found")})
    with pytest.raises(OrchestratorError, match="does not run systemd"):
        installer(orch, target, "linux", missing).install()


def test_a_failing_command_stops_the_install_and_names_it(orch, target):
    runner = Runner({("systemctl", "--user", "enable"): (1, "Failed to enable unit: Access denied")})
    with pytest.raises(
        OrchestratorError,
        match=r"`systemctl --user enable --now llama-orchestrator.service` "
        r"failed \(exit 1\): Failed to enable unit: Access denied",
    ):
        installer(orch, target, "linux", runner).install()


# -- macOS: launchd agent -------------------------------------------------------------------------------------


def test_the_plist(target, orch):
    plist = plistlib.loads(LaunchdAgent().render(target).encode())
    assert plist["Label"] == "io.github.llama-orchestrator"
    assert plist["ProgramArguments"] == target.argv
    assert plist["ProgramArguments"][-4:] == ["--home", str(orch.root), "daemon", "run"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardOutPath"] == str(orch.state_dir / "launchd.stdout.log")
    assert plist["StandardErrorPath"] == str(orch.state_dir / "launchd.stderr.log")
    assert plist["EnvironmentVariables"]["PATH"] == "/usr/local/bin:/usr/bin"


def test_macos_install_status_uninstall(orch, target):
    plist = target.user_home / "Library" / "LaunchAgents" / "io.github.llama-orchestrator.plist"
    runner = Runner({("launchctl", "bootout"): (3, "Boot-out failed: 3: No such process")})
    installer(orch, target, "macos", runner).install()
    assert plist.read_text() == LaunchdAgent().render(target)
    assert runner.calls == [
        ["launchctl", "bootout", "gui/501/io.github.llama-orchestrator"],
        ["launchctl", "bootstrap", "gui/501", str(plist)],
    ]

    printed = "gui/501/io.github.llama-orchestrator = {\n\tactive count = 1\n\tstate = running\n\tpid = 4242\n}"
    status = installer(orch, target, "macos", Runner({("launchctl", "print"): (0, printed)})).status()
    assert (status.installed, status.enabled, status.active) == (True, True, True)
    assert "pid 4242" in status.detail

    runner = Runner()
    installer(orch, target, "macos", runner).uninstall()
    assert runner.calls[-1] == ["launchctl", "bootout", "gui/501/io.github.llama-orchestrator"]
    assert every_file(target.user_home) == ["Library", "Library/LaunchAgents"]
    gone = installer(orch, target, "macos", Runner({("launchctl", "print"): (113, "Could not find service")}))
    assert gone.status().installed is False


# -- Windows: Task Scheduler, NSSM ----------------------------------------------------------------------------


def test_the_task_definition(target, orch):
    windows_target = Target(**{**target.__dict__, "user": "DESKTOP-1\\alice"})
    rendered = ScheduledTask().render(windows_target).replace('encoding="UTF-16"', "")
    root = ET.fromstring(rendered)  # noqa: S314 - our own rendering, not untrusted input
    assert root.tag == f"{TASK}Task"
    assert root.findtext(f"{TASK}Triggers/{TASK}LogonTrigger/{TASK}UserId") == "DESKTOP-1\\alice"
    principal = root.find(f"{TASK}Principals/{TASK}Principal")
    assert principal.findtext(f"{TASK}RunLevel") == "LeastPrivilege"  # /RL LIMITED
    assert principal.findtext(f"{TASK}LogonType") == "InteractiveToken"
    assert root.findtext(f"{TASK}Settings/{TASK}ExecutionTimeLimit") == "PT0S"  # runs for good, not 72 hours
    exec_ = root.find(f"{TASK}Actions/{TASK}Exec")
    assert exec_.findtext(f"{TASK}Command") == target.argv[0]
    assert exec_.findtext(f"{TASK}Arguments") == subprocess.list2cmdline(target.argv[1:])
    assert f'--home "{orch.root}" daemon run' in exec_.findtext(f"{TASK}Arguments")


def test_windows_task_install_status_uninstall(orch, target):
    xml = orch.state_dir / "llama-orchestrator.task.xml"
    runner = Runner()
    installer(orch, target, "windows", runner, which=lambda program: None).install()
    assert xml.read_bytes()[:2] == b"\xff\xfe"  # UTF-16 with its byte-order mark, as schtasks reads it
    assert xml.read_text(encoding="utf-16").replace("\r\n", "\n") == ScheduledTask().render(target)
    assert runner.calls == [
        ["schtasks", "/Create", "/TN", "llama-orchestrator", "/XML", str(xml), "/F"],
        ["schtasks", "/Run", "/TN", "llama-orchestrator"],
    ]

    listing = (
        "Folder: \\\nHostName:      DESKTOP-1\nTaskName:      \\llama-orchestrator\nStatus:        Running\n"
        "Scheduled Task State:          Enabled\n"
    )
    status = installer(
        orch, target, "windows", Runner({("schtasks", "/Query"): (0, listing)}), which=lambda program: None
    ).status()
    assert (status.installed, status.enabled, status.active) == (True, True, True)

    runner = Runner()
    installer(orch, target, "windows", runner, which=lambda program: None).uninstall()
    assert runner.calls[1:] == [
        ["schtasks", "/End", "/TN", "llama-orchestrator"],
        ["schtasks", "/Delete", "/TN", "llama-orchestrator", "/F"],
    ]
    assert not xml.exists()


def test_nssm_is_used_when_it_is_on_path(orch, target):
    def nssm(program):
        return "C:\\tools\\nssm.exe" if program == "nssm" else None

    runner = Runner({("nssm", "stop"): (3, "Can't open service!"), ("nssm", "remove"): (3, "Can't open service!")})
    svc = installer(orch, target, "windows", runner, which=nssm)
    assert svc.manager.name == "NSSM service"
    svc.install()
    assert runner.calls[2] == ["nssm", "install", "llama-orchestrator", target.argv[0]]
    parameters = subprocess.list2cmdline(target.argv[1:])
    assert ["nssm", "set", "llama-orchestrator", "AppParameters", parameters] in runner.calls
    assert ["nssm", "set", "llama-orchestrator", "Start", "SERVICE_AUTO_START"] in runner.calls
    # A service stop stops the daemon alone (NSSM kills the whole tree by default): the instances keep running.
    kill_tree = ["nssm", "set", "llama-orchestrator", "AppKillProcessTree", "0"]
    assert kill_tree in runner.calls and runner.calls.index(kill_tree) < runner.calls.index(runner.calls[-1])
    assert runner.calls[-1] == ["nssm", "start", "llama-orchestrator"]
    # NSSM answers in UTF-16: the NULs are dropped before reading.
    utf16 = Runner(
        {
            ("nssm", "status"): (0, "\x00".join("SERVICE_RUNNING") + "\x00"),
            ("nssm", "get"): (0, "SERVICE_AUTO_START\r\n"),
        }
    )
    status = installer(orch, target, "windows", utf16, which=nssm).status()
    assert (status.installed, status.enabled, status.active) == (True, True, True)
    runner = Runner()
    installer(orch, target, "windows", runner, via="nssm").uninstall()
    assert runner.calls[-1] == ["nssm", "remove", "llama-orchestrator", "confirm"]


def test_options_that_do_not_fit_are_usage_errors(orch, target):
    with pytest.raises(UsageError, match="unknown --os"):
        ServiceInstaller(orch, os_name="bsd")
    with pytest.raises(UsageError, match=re.escape("--via task|nssm is for Windows")):
        ServiceInstaller(orch, os_name="linux", via="nssm")
    with pytest.raises(UsageError, match="only renders that OS's files: add --dry-run"):
        ServiceInstaller(orch, os_name="macos", platform="linux", runner=Runner()).install()


# -- the command line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("os_name", "expected"),
    [
        # NAME: this (not default) home's service name, llama-orchestrator-<hash of its path>
        (
            "linux",
            [
                "[Service]",
                "Restart=on-failure",
                "$ systemctl --user daemon-reload",
                "$ systemctl --user enable --now NAME.service",
                "/systemd/user/NAME.service",
            ],
        ),
        (
            "macos",
            [
                "<key>RunAtLoad</key>",
                "<key>SuccessfulExit</key>",
                "$ launchctl bootstrap gui/",
                "/Library/LaunchAgents/io.github.NAME.plist",
            ],
        ),
        (
            "windows",
            [
                "<LogonTrigger>",
                "<RunLevel>LeastPrivilege</RunLevel>",
                "> schtasks /Create /TN NAME /XML",
                "> schtasks /Run /TN NAME",
            ],
        ),
    ],
)
def test_dry_run_prints_the_files_and_commands_of_each_os(cli, os_name, expected):
    out = cli.run("service", "install", "--dry-run", "--os", os_name, check=True).stdout
    name = service_name_for(cli.home, default_root())
    assert name.startswith("llama-orchestrator-") and len(name) == len("llama-orchestrator-") + 8
    for text in expected:
        assert text.replace("NAME", name) in out, text
    if os_name == "macos":
        assert f"<string>--home</string>\n\t\t<string>{cli.home}</string>" in out
    else:
        assert f"--home {cli.home}" in out
    assert ("<string>daemon</string>\n\t\t<string>run</string>" if os_name == "macos" else "daemon run") in out
    assert not (cli.home / "state").exists()  # a dry run changes nothing
    undo = cli.run("service", "uninstall", "--dry-run", "--os", os_name, check=True).stdout
    assert "# remove " in undo or "nssm remove" in undo


def test_cli_refusals(cli):
    assert cli.run("service", "install", "--dry-run", "--os", "bsd").returncode == 2
    assert cli.run("service", "install", "--dry-run", "--os", "linux", "--via", "nssm").returncode == 2
    out = cli.run("service", "install", "--dry-run", "--os", "windows", "--via", "nssm", check=True).stdout
    assert f"> nssm install {service_name_for(cli.home, default_root())} " in out
    foreign = "windows" if sys.platform != "win32" else "linux"
    result = cli.run("service", "install", "--os", foreign)
    assert result.returncode == 2 and "--dry-run" in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the systemd path")
def test_install_without_a_user_session_exits_1_with_advice(cli, tmp_path, monkeypatch):
    # No user bus anywhere: an empty runtime folder and no session bus address (so nothing real is touched).
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "user" / ".config"))
    result = cli.run("service", "install")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--dry-run" in result.stderr
    assert "loginctl enable-linger" in result.stderr or "does not run systemd" in result.stderr
    assert every_file(tmp_path / "user") == []
    status = cli.run("service", "status", "--json")
    assert status.returncode == 1
    assert '"installed": false' in status.stdout
    assert "nothing to remove" in cli.run("service", "uninstall", check=True).stdout


# -- several homes on one machine -----------------------------------------------------------------------------


def test_the_default_home_keeps_the_plain_name_and_every_other_home_gets_its_own(tmp_path):
    default = tmp_path / "default home"
    assert service_name_for(default, default) == "llama-orchestrator"
    names = {service_name_for(tmp_path / h, default) for h in ("a", "b", "default home/../a")}
    assert len(names) == 2 and all(n.startswith("llama-orchestrator-") for n in names)  # ../a is a
    assert service_name_for(tmp_path / "a", default) == service_name_for(tmp_path / "a", None)  # stable


@pytest.mark.parametrize("os_name", ["linux", "macos", "windows", "nssm"])
def test_two_homes_install_side_by_side(tmp_path, os_name):
    """Each home's install writes its own files and registers its own name; the other's is left alone."""
    user_home = tmp_path / "user"
    plans, runners = [], []
    for folder in ("home-a", "home-b"):
        orch = Home(tmp_path / folder)
        target = Target(
            home=orch.root,
            argv=daemon_argv(orch),
            state_dir=orch.state_dir,
            user_home=user_home,
            config_home=user_home / ".config",
            uid=501,
            user="alice",
            name=service_name_for(orch.root, tmp_path / "default"),
        )
        runner = Runner({("nssm", "stop"): (3, ""), ("nssm", "remove"): (3, "")})
        via = {"via": "nssm", "which": lambda p: "nssm"} if os_name == "nssm" else {}
        real_os = "windows" if os_name == "nssm" else os_name
        installer(orch, target, real_os, runner, **via).install()
        plans.append(target)
        runners.append(runner)
    a, b = plans
    assert a.name != b.name
    name = re.compile(r"(gui/501/)?(io\.github\.)?llama-orchestrator(-[0-9a-f]{8})?(\.service)?")
    registered = [{arg for call in r.calls for arg in call if name.fullmatch(arg)} for r in runners]
    assert registered[0] and registered[1] and not registered[0] & registered[1]
    if os_name in ("linux", "macos"):
        files = every_file(user_home)
        written = [f for f in files if f.endswith((".service", ".plist"))]
        assert len(written) == 2, files
        assert a.name in " ".join(written) and b.name in " ".join(written)
