"""`models list`: the GGUF files the instance configs name plus those in a models folder, with their metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llama_orchestrator.adapters.home import Home
from llama_orchestrator.domain.errors import NotFoundError, OrchestratorError


@dataclass
class ModelEntry:
    path: Path
    exists: bool
    in_folder: bool  # found in the models folder (else only named by a config)
    used_by: list[str] = field(default_factory=list)
    info: dict | None = None  # adapters.gguf_meta.GgufInfo.as_dict()
    error: str | None = None
    reference: str | None = None  # hf.co/<user>/<repo>[:QUANT] for a pulled file (services.model_store)
    memory: dict | None = None  # default context and estimated memory at it
    size_bytes: int | None = None  # every part of a split model, readable or not

    def as_dict(self) -> dict:
        info = self.info or {}
        return {
            "path": str(self.path),
            "file": self.path.name,
            "exists": self.exists,
            "in_folder": self.in_folder,
            "used_by": self.used_by,
            "architecture": info.get("architecture"),
            "name": info.get("name"),
            "parameters": info.get("parameters"),
            "quantization": info.get("file_type"),
            "context_length": info.get("context_length"),
            "size_bytes": self.size_bytes if self.size_bytes is not None else info.get("size_bytes"),
            "reference": self.reference,
            "default_context": (self.memory or {}).get("context_size"),
            "estimated_memory_mb": (self.memory or {}).get("estimated_mb"),
            "error": self.error,
        }


def default_models_dir(home: Home) -> Path:
    return home.root / "models"


def list_models(home: Home, folder: Path | None = None, *, require_folder: bool = False) -> list[ModelEntry]:
    """Every model, sorted by path. ``folder`` (default ``<home>/models``) is searched recursively for ``*.gguf``;
    with ``require_folder`` a missing folder is a NotFoundError (an explicit --dir), else it is skipped."""
    from llama_orchestrator.adapters.config_files import load_config

    folder = (folder or default_models_dir(home)).expanduser().absolute()
    if require_folder and not folder.is_dir():
        raise NotFoundError(f"models folder {folder} does not exist")
    entries: dict[str, ModelEntry] = {}

    def entry_for(path: Path, in_folder: bool) -> ModelEntry:
        key = os.path.normcase(os.path.realpath(path))
        if key not in entries:
            entries[key] = ModelEntry(path, path.is_file(), in_folder)
        entries[key].in_folder |= in_folder
        return entries[key]

    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() == ".gguf" and path.is_file() and not _hidden_or_later_part(path, folder):
                entry_for(path, True)
    for name in home.instance_names():
        config_path = home.config_path(name)
        try:
            config = load_config(config_path, expected_name=name)
        except OrchestratorError:
            continue  # a broken config is `config validate`'s to report
        entry = entry_for(config.model_path(config_path.parent), False)
        entry.used_by.append(name)

    result = sorted(entries.values(), key=lambda e: str(e.path))
    from llama_orchestrator.services import model_store

    budget = model_store.memory_budget_mb(home)
    for entry in result:
        _read_metadata(entry)
        entry.reference = model_store.reference_of(home, entry.path)
        if entry.exists:
            entry.size_bytes = model_store.model_bytes(entry.path)
        if entry.info is not None:
            plan = model_store.memory_plan(home, entry.path, budget_mb=budget, trained=entry.info.get("context_length"))
            entry.memory = {"context_size": plan.context_size, "estimated_mb": plan.estimated_mb}
    return result


def _hidden_or_later_part(path: Path, folder: Path) -> bool:
    """Downloads in progress (``.partial/``) and the 2nd..Nth parts of a split model (listed under the first)."""
    rel = path.relative_to(folder)
    if any(part.startswith(".") for part in rel.parts):
        return True
    import re

    split = re.search(r"-(\d{5})-of-\d{5}\.gguf$", path.name, re.IGNORECASE)
    return split is not None and split.group(1) != "00001"


def _read_metadata(entry: ModelEntry) -> None:
    from llama_orchestrator.adapters.gguf_meta import read_gguf_info

    if not entry.exists:
        entry.error = "file not found"
        return
    try:
        entry.info = read_gguf_info(entry.path).as_dict()
    except Exception as exc:  # noqa: BLE001 - a file that is not GGUF is listed with the reason, not fatal
        entry.error = f"not a readable GGUF file: {exc}"
