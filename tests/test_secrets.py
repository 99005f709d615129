"""Secrets at rest: the home private to its user (0700 folders, 0600 files, on POSIX), a settings file with keys
refused when others can read it, and env values that look secret masked wherever they are shown (describe, /api,
the dashboard) but given to the server as they are. Real files, the installed CLI, the fake llama-server."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import psutil
import pytest

from conftest import Cli, instance_doc
from helpers import free_port, wait_until
from llama_orchestrator.domain.secrets import MASK, is_secret_name, mask_args, mask_env

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX; Windows keeps the profile's ACL")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def open_to_others(paths: list[Path]) -> dict[str, str]:
    """The paths that group or others may access, with their modes (empty when every one is private)."""
    return {str(p): f"{mode(p):04o}" for p in paths if mode(p) & 0o077}


# -- which names are secret ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("HF_TOKEN", True),
        ("LLAMA_API_KEY", True),
        ("OPENAI_KEY", True),
        ("aws_secret_access_key", True),
        ("DB_PASSWORD", True),
        ("Password", True),
        ("GITHUB_TOKEN_FILE", True),
        ("MY_CREDENTIALS", True),
        ("CUDA_VISIBLE_DEVICES", False),
        ("OMP_NUM_THREADS", False),
        ("LLAMA_ARG_CTX_SIZE", False),
        ("PATH", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_mask_env_hides_the_values_of_secret_names_only() -> None:
    env = {"HF_TOKEN": "hf_abcdefghijklmnop", "API_KEY": "x", "EMPTY_KEY": "", "OMP_NUM_THREADS": "4"}
    assert mask_env(env) == {"HF_TOKEN": MASK, "API_KEY": MASK, "EMPTY_KEY": "", "OMP_NUM_THREADS": "4"}
    assert env["HF_TOKEN"] == "hf_abcdefghijklmnop"  # a copy: the config itself is not changed


def test_mask_args_hides_the_values_of_secret_options() -> None:
    args = ["--api-key", "sk-1", "--alias", "x", "--api-key=sk-2", "--api-key-file", "/run/key", "--hf-token", "t"]
    assert mask_args(args) == [
        "--api-key",
        MASK,
        "--alias",
        "x",
        f"--api-key={MASK}",
        "--api-key-file",
        "/run/key",
        "--hf-token",
        MASK,
    ]


# -- masked where shown, not where used -------------------------------------------------------------------------


@posix_only
def test_describe_and_the_dashboard_mask_secret_env_but_the_server_gets_it(
    cli: Cli, tiny_model: Path, fake_binary: Path
) -> None:
    env = {"HF_TOKEN": "hf_live_secret_value", "LLAMA_API_KEY": "sk-instance-key", "OMP_NUM_THREADS": "2"}
    config = cli.write_config(
        "keyed", instance_doc("keyed", tiny_model, free_port(), fake_binary, env=env, args=["--api-key", "sk-arg-key"])
    )

    shown = cli.json("describe", "keyed")
    assert shown["config"]["env"] == {"HF_TOKEN": MASK, "LLAMA_API_KEY": MASK, "OMP_NUM_THREADS": "2"}
    assert shown["config"]["args"] == ["--api-key", MASK]
    table = cli.run("describe", "keyed", check=True).stdout
    assert not {"hf_live_secret_value", "sk-instance-key", "sk-arg-key"} & set(table.split())
    assert "hf_live_secret_value" not in table and "sk-arg-key" not in table
    assert json.loads(config.read_text())["env"] == env  # the file keeps the values

    from llama_orchestrator.adapters.home import Home
    from llama_orchestrator.services.instances import InstanceService
    from llama_orchestrator.services.instances_port import LocalInstances
    from llama_orchestrator.tui.data import Backend

    detail = Backend(LocalInstances(InstanceService(Home(cli.home))), daemon=lambda: None).detail("keyed")
    assert "hf_live_secret_value" not in detail.config and "sk-instance-key" not in detail.config
    assert f'"HF_TOKEN": "{MASK}"' in detail.config and '"OMP_NUM_THREADS": "2"' in detail.config

    cli.run("up", "keyed", "-d", "--wait", "--timeout", "30", check=True)
    try:
        server = psutil.Process(cli.ps()["keyed"]["pid"])
        given = server.environ()
        assert (given["HF_TOKEN"], given["LLAMA_API_KEY"]) == ("hf_live_secret_value", "sk-instance-key")
        assert not any("sk-instance-key" in part for part in server.cmdline())  # env stays off the command line
    finally:
        cli.run("down", "keyed", check=True)


# -- the home is private --------------------------------------------------------------------------------------


@posix_only
def test_a_new_home_is_created_private(cli: Cli, tiny_model: Path, fake_binary: Path, tmp_path: Path) -> None:
    fresh = Cli(tmp_path / "fresh-home")  # does not exist yet: every folder is made by us
    previous = os.umask(0o022)  # the common default, under which plain creation gives 0755/0644
    try:
        fresh.run(
            "init",
            "one",
            "--model",
            str(tiny_model),
            "--binary",
            str(fake_binary),
            "--port",
            str(free_port()),
            check=True,
        )
        fresh.run("up", "one", "-d", "--wait", "--timeout", "30", check=True)
        fresh.run("down", "one", check=True)
    finally:
        os.umask(previous)
    home = fresh.home
    state = home / "state"
    folders = [home, home / "instances", home / "instances" / "one", home / "logs", home / "logs" / "one", state]
    files = [
        home / "instances" / "one" / "config.json",
        state / "state.sqlite",
        home / "logs" / "one" / "stdout.log",
        home / "logs" / "one" / "stderr.log",
    ]
    files += [p for p in (state / "state.sqlite-wal", state / "state.sqlite-shm") if p.exists()]
    assert open_to_others(folders + files) == {}
    assert all(mode(p) == 0o700 for p in folders)
    assert all(mode(p) == 0o600 for p in files)


@posix_only
def test_the_daemon_writes_its_log_and_pid_file_private(cli: Cli) -> None:
    (cli.home / "orchestrator.json").write_text(json.dumps({"api": {"enabled": False}}))
    cli.daemon = True
    previous = os.umask(0o022)
    try:
        cli.run("daemon", "start", check=True)
    finally:
        os.umask(previous)
    try:
        state = cli.home / "state"
        wait_until(lambda: (state / "daemon.log").exists() and (state / "daemon.pid").exists(), 20)
        daemon_files = [state / "daemon.log", state / "daemon.pid", state / "daemon.out"]
        assert open_to_others([state, *[p for p in daemon_files if p.exists()]]) == {}
    finally:
        cli.run("daemon", "stop", timeout=60)


@posix_only
def test_a_home_left_open_by_an_older_version_is_tightened_when_opened(
    cli: Cli, tiny_model: Path, fake_binary: Path
) -> None:
    cli.write_config("old", instance_doc("old", tiny_model, free_port(), fake_binary))
    cli.run("ps", check=True)  # makes state/state.sqlite
    logs = cli.home / "logs" / "old"
    logs.mkdir(parents=True)
    (logs / "stderr.log").write_text("an old line\n")
    (logs / "stderr.log.1").write_text("an older line\n")
    everything = [*list(cli.home.rglob("*")), cli.home]
    for path in everything:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert open_to_others(everything)

    cli.run("ps", check=True)
    assert open_to_others(everything) == {}


# -- a settings file with keys that others can read is refused ----------------------------------------------------


@posix_only
@pytest.mark.parametrize(
    ("permissions", "keys", "refused"),
    [
        (0o644, {"api_keys": ["sk-router"]}, True),
        (0o640, {"control_keys": ["admin"]}, True),
        (0o604, {"api_keys": ["sk-router"]}, True),
        (0o600, {"api_keys": ["sk-router"], "control_keys": ["admin"]}, False),
        (0o400, {"api_keys": ["sk-router"]}, False),
        (0o644, {}, False),  # nothing secret in it: readable is fine
    ],
)
def test_settings_with_keys_must_be_private(tmp_path: Path, permissions: int, keys: dict, refused: bool) -> None:
    from llama_orchestrator.adapters.config_files import load_settings
    from llama_orchestrator.domain.errors import ConfigError

    path = tmp_path / "orchestrator.json"
    path.write_text(json.dumps({"api": {"port": 8123, **keys}}))
    path.chmod(permissions)
    if not refused:
        assert load_settings(path).api.port == 8123
        return
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert str(path) in message and f"chmod 600 {path}" in message and f"{permissions:04o}" in message


@posix_only
def test_the_daemon_refuses_open_settings_with_keys_and_says_the_fix(cli: Cli) -> None:
    settings = cli.home / "orchestrator.json"
    settings.write_text(json.dumps({"api": {"port": free_port(), "api_keys": ["sk-router"]}}))
    settings.chmod(0o644)
    cli.daemon = True
    result = cli.run("daemon", "run", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"chmod 600 {settings}" in result.stderr + result.stdout


def test_only_an_option_whose_last_word_is_secret_is_masked() -> None:
    # "token" inside an option name is not enough: --draft-token-delay takes a number, --ssl-key-file a path.
    args = ["--fake-token-delay", "0.1", "--ssl-key-file", "/k.pem", "--api_key", "sk", "--hf-token=t"]
    assert mask_args(args) == [
        "--fake-token-delay",
        "0.1",
        "--ssl-key-file",
        "/k.pem",
        "--api_key",
        MASK,
        f"--hf-token={MASK}",
    ]
