"""Acceptance of issue 9 (drift and apply) against the real llama-server from llama.cpp and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Cli

pytestmark = pytest.mark.real_server


def served_context(port: int) -> int:
    props = httpx.get(f"http://127.0.0.1:{port}/props", timeout=30).json()
    return props["default_generation_settings"]["n_ctx"]


def test_edit_context_size_then_up_recreates_the_real_server(cli: Cli, tiny_model: Path, real_binary: Path) -> None:
    cli.run("init", "tiny", "--model", str(tiny_model), "--binary", str(real_binary), "-c", "256", check=True)
    cli.run("up", "tiny", "-d", "--wait", "--timeout", "60", check=True)
    before = cli.ps()["tiny"]
    port = before["port"]
    assert served_context(port) == 256 and before["config_changed"] is False

    path = cli.home / "instances" / "tiny" / "config.json"
    doc = json.loads(path.read_text())
    doc["model"]["context_size"] = 512
    path.write_text(json.dumps(doc, indent=2))
    assert cli.ps()["tiny"]["config_changed"] is True
    assert served_context(port) == 256  # nothing applied it yet

    result = cli.run("up", "tiny", "-d", "--wait", "--timeout", "60", check=True)
    assert "tiny recreated" in result.stdout and "model.context_size" in result.stdout
    after = cli.ps()["tiny"]
    assert after["pid"] != before["pid"]
    assert not psutil.pid_exists(before["pid"]) or psutil.Process(before["pid"]).status() == psutil.STATUS_ZOMBIE
    assert after["config_changed"] is False and after["health"] == "healthy"
    assert served_context(port) == 512
    cli.run("down", "tiny", check=True)
