"""Two homes on one machine: each daemon gets its own API port (8000, else a free one recorded in the home's
``orchestrator.json``), and each home's CLI finds its own daemon."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import httpx
import pytest

from conftest import Cli, instance_doc
from helpers import free_port


def test_the_chosen_port_is_recorded_and_the_rest_of_the_file_kept(tmp_path: Path) -> None:
    from llama_orchestrator.adapters.config_files import load_settings, record_api_port

    fresh = tmp_path / "a" / "orchestrator.json"
    record_api_port(fresh, 41234)
    assert json.loads(fresh.read_text()) == {"api": {"port": 41234}}
    if os.name != "nt":
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    kept = tmp_path / "orchestrator.json"
    kept.write_text(json.dumps({"reload": "auto", "api": {"host": "127.0.0.1"}, "router": {"max_loaded": 2}}))
    kept.chmod(0o600)
    record_api_port(kept, 41235)
    settings = load_settings(kept)
    assert (settings.api.port, settings.api.host, settings.reload, settings.router.max_loaded) == (
        41235,
        "127.0.0.1",
        "auto",
        2,
    )


def _hold(port: int) -> socket.socket | None:
    """Hold 127.0.0.1:``port`` as a stranger would; None when something already does."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
    except OSError:
        sock.close()
        return None
    return sock


@pytest.mark.skipif(os.name == "nt", reason="the fake binary wrapper is a POSIX shell script")
def test_two_homes_two_daemons_without_a_settings_file(tmp_path: Path, tiny_model: Path, fake_binary: Path) -> None:
    homes = [Cli(tmp_path / name, daemon=True) for name in ("home-a", "home-b")]
    # 8000 taken by another program: neither daemon may give up (whoever held it before us counts as well).
    stranger = _hold(8000)
    try:
        for cli in homes:
            cli.home.mkdir()
            cli.write_config("one", instance_doc("one", tiny_model, free_port(), fake_binary))
            assert not (cli.home / "orchestrator.json").exists()
            up = cli.run("up", "one", "-d", "--wait", "--timeout", "60", timeout=120)
            assert up.returncode == 0, up.stdout + up.stderr
        urls = [cli.json("daemon", "status")["api_url"] for cli in homes]
        assert all(urls) and urls[0] != urls[1], urls
        for cli, url in zip(homes, urls, strict=True):
            recorded = json.loads((cli.home / "orchestrator.json").read_text())["api"]["port"]
            assert url == f"http://127.0.0.1:{recorded}" and recorded != 8000
            assert stat.S_IMODE((cli.home / "orchestrator.json").stat().st_mode) == 0o600
            answer = httpx.get(url + "/api/instances", timeout=10).json()
            assert [(r["name"], r["status"]) for r in answer] == [("one", "running")]
        # The next daemon of a home takes the port recorded for it; the CLI reaches it there.
        first = homes[0]
        first.run("daemon", "stop", check=True, timeout=60)
        first.run("daemon", "start", check=True, timeout=60)
        assert first.json("daemon", "status")["api_url"] == urls[0]
    finally:
        if stranger is not None:
            stranger.close()
        for cli in homes:
            cli.run("daemon", "stop", timeout=60)
            cli.run("down", "--all", "--timeout", "1", timeout=120)


@pytest.mark.skipif(os.name == "nt", reason="POSIX")
def test_a_port_the_person_chose_is_not_changed_behind_their_back(tmp_path: Path) -> None:
    cli = Cli(tmp_path / "home", daemon=True)
    cli.home.mkdir()
    port = free_port()
    settings = cli.home / "orchestrator.json"
    settings.write_text(json.dumps({"api": {"port": port}}))
    settings.chmod(0o600)
    holder = _hold(port)
    assert holder is not None
    try:
        result = cli.run("daemon", "start", timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "already in use" in result.stdout + result.stderr
        assert json.loads(settings.read_text()) == {"api": {"port": port}}
    finally:
        holder.close()
        cli.run("daemon", "stop", timeout=60)
