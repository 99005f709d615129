"""What the router knows of the instances on disk, read on a worker thread: every config that loads (cached until
its file changes), each instance's recorded state, and (with a memory budget) its estimated memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llama_orchestrator.adapters.store import InstanceRow
from llama_orchestrator.domain.config import InstanceConfig
from llama_orchestrator.domain.errors import OrchestratorError
from llama_orchestrator.domain.routing import ModelShape, estimate_memory_mb
from llama_orchestrator.services.instances import InstanceService


@dataclass
class Snapshot:
    configs: dict[str, InstanceConfig] = field(default_factory=dict)
    rows: dict[str, InstanceRow] = field(default_factory=dict)
    memory_mb: dict[str, float] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # name -> why its config does not load


class Catalog:
    """Not thread-safe: the router calls ``read`` from one worker at a time."""

    def __init__(self) -> None:
        self._configs: dict[str, tuple[tuple[int, int], InstanceConfig]] = {}
        self._memory: dict[tuple, float] = {}

    def read(
        self, service: InstanceService, *, with_memory: bool, seen: dict[str, InstanceRow] | None = None
    ) -> Snapshot:
        """``seen``: rows already known (the supervisor's view): those instances are not refreshed here."""
        snap = Snapshot()
        for name in service.names():
            path = service.home.config_path(name)
            try:
                stat = path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                cached = self._configs.get(name)
                config = cached[1] if cached and cached[0] == stamp else service.load(name)
                self._configs[name] = (stamp, config)
            except OrchestratorError as exc:
                snap.broken[name] = str(exc)  # `validate` and `ps` report it too; a request for it says so
                continue
            except OSError:
                continue  # removed while we looked
            snap.configs[name] = config
            known = seen.get(name) if seen is not None else None
            snap.rows[name] = known if known is not None else service.refresh(name)
            if with_memory:
                snap.memory_mb[name] = self._estimate(config.model_path(path.parent), config.model.context_size)
        return snap

    def _estimate(self, model: Path, context_size: int) -> float:
        try:
            stat = model.stat()
        except OSError:
            return 0.0  # a missing model fails at start, with its own clear error
        key = (str(model), stat.st_mtime_ns, stat.st_size, context_size)
        if key not in self._memory:
            self._memory[key] = estimate_memory_mb(stat.st_size, context_size, model_shape(model))
        return self._memory[key]


def model_shape(path: Path) -> ModelShape | None:
    """n_layer etc. from the GGUF metadata, for the KV cache estimate; None when the file does not say."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path), "r")

        def value(key: str):
            f = reader.fields.get(key)
            v = f.contents() if f is not None else None
            return max(v) if isinstance(v, list) and v else v  # per-layer arrays: the largest

        arch = value("general.architecture")
        n_layer, n_embd, n_head = (
            value(f"{arch}.{k}") for k in ("block_count", "embedding_length", "attention.head_count")
        )
        if not (n_layer and n_embd and n_head):
            return None
        return ModelShape(
            int(n_layer),
            int(n_embd),
            int(n_head),
            _int(value(f"{arch}.attention.head_count_kv")),
            _int(value(f"{arch}.attention.key_length")),
            _int(value(f"{arch}.attention.value_length")),
        )
    except Exception:  # noqa: BLE001 - any unreadable file falls back to the default per-token estimate
        return None


def _int(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and value > 0 else None
