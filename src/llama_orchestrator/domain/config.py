"""Instance configuration: the pydantic models of SPEC §3 and the translation of both seed dialects.

Pure: no file access. ``adapters.config_files`` reads and writes the JSON and turns errors into ``ConfigError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)

Backend = Literal["auto", "cpu", "vulkan", "cuda", "metal", "rocm"]
RestartPolicyName = Literal["always", "on-failure", "unless-stopped", "never"]


def is_valid_name(name: str) -> bool:
    """Instance names become folder names: lowercase letters, digits and inner dashes only, 1-63 characters."""
    return bool(_NAME_RE.match(name))


class _Strict(BaseModel):
    # Unknown keys are errors: a typo such as "contex_size" must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    path: str = Field(description="GGUF file; relative paths are resolved from the config file's folder")
    context_size: int = Field(4096, ge=256, le=1_048_576, description="--ctx-size")
    batch_size: int = Field(512, ge=1, le=65_536, description="--batch-size")
    threads: int | None = Field(None, ge=1, le=1024, description="--threads (default: llama-server's choice)")
    source: str | None = Field(
        None,
        description="where the file came from: hf.co/<user>/<repo>[:QUANT] or a "
        "catalog ID (`init --model` writes it; `models pull` brings the file back)",
    )

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a .gguf file")
        return value


class ServerSection(_Strict):
    host: str = Field("127.0.0.1", description="address llama-server listens on")
    port: int = Field(8001, ge=1024, le=65535)
    parallel: int = Field(1, ge=1, le=256, description="--parallel: concurrent request slots")
    timeout: int | None = Field(None, ge=1, description="--timeout: server read/write timeout in seconds")


class GpuSection(_Strict):
    backend: Backend = "auto"
    device_id: int | None = Field(None, ge=0, description="GPU index (sets the backend's visible-devices variable)")
    layers: int = Field(0, ge=-1, description="--n-gpu-layers (0 = CPU only, -1 = all)")


class HealthcheckSection(_Strict):
    path: str = Field("/health", pattern=r"^/")
    interval: float = Field(10, gt=0, le=3600, description="seconds between probes")
    timeout: float = Field(5, gt=0, le=600, description="seconds before a probe counts as failed")
    retries: int = Field(3, ge=1, le=100, description="consecutive failures that make the instance unhealthy")
    start_period: float = Field(60, ge=0, le=86_400, description="seconds after start in which failures don't count")


class RestartSection(_Strict):
    policy: RestartPolicyName = "on-failure"
    max_retries: int = Field(5, ge=0, le=1000)
    backoff_seconds: float = Field(10, ge=0, le=86_400)
    backoff_multiplier: float = Field(2.0, ge=1.0, le=10.0)
    max_backoff_seconds: float = Field(300, ge=0, le=86_400)
    reset_after_seconds: float = Field(300, ge=0, le=86_400)


class LogsSection(_Strict):
    max_size_mb: float = Field(100, gt=0, le=100_000)
    rotation: int = Field(5, ge=1, le=100, description="rotated files kept (.1 ... .N)")


class ConcurrencySection(_Strict):
    limit: int | None = Field(
        None, ge=1, le=1024, description="requests at once through the router (default: server.parallel)"
    )
    queue: int = Field(32, ge=0, le=100_000, description="requests that wait for a slot before the router answers 429")
    queue_timeout: float = Field(60, gt=0, le=3600, description="seconds a queued request waits before a 429")


class InstanceConfig(_Strict):
    """The canonical instance config. ``from_document`` accepts the seed dialects too."""

    schema_ref: str | None = Field(None, alias="$schema", exclude=True)
    name: str = Field(pattern=NAME_PATTERN)
    model: ModelSection
    server: ServerSection = Field(default_factory=ServerSection)
    gpu: GpuSection = Field(default_factory=GpuSection)
    env: dict[str, str] = Field(default_factory=dict)
    args: list[str] = Field(default_factory=list, description="extra llama-server arguments, passed as they are")
    binary: str | None = Field(None, description="a registered binary's name, or a path to llama-server")
    autostart: bool = False
    healthcheck: HealthcheckSection = Field(default_factory=HealthcheckSection)
    restart: RestartSection = Field(default_factory=RestartSection)
    logs: LogsSection = Field(default_factory=LogsSection)
    # The router (SPEC §9): other names clients may ask for (instances sharing one are replicas), idle unload,
    # and never-evict.
    aliases: list[str] = Field(default_factory=list, description="other model names the router maps to this instance")
    ttl: float | None = Field(None, gt=0, description="seconds without requests before the router stops it")
    pinned: bool = Field(False, description="never stopped to make room for another model")
    concurrency: ConcurrencySection = Field(default_factory=ConcurrencySection)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return value

    @field_validator("aliases")
    @classmethod
    def _alias_text(cls, value: list[str]) -> list[str]:
        for alias in value:
            if not alias.strip() or len(alias) > 256:
                raise ValueError(f"alias {alias!r} must be 1-256 characters")
        return value

    @property
    def concurrency_limit(self) -> int:
        return self.concurrency.limit or self.server.parallel

    @model_validator(mode="after")
    def _reserved_args(self) -> InstanceConfig:
        # These are set from the structured fields; passing them again in `args` would make two sources of truth.
        owned = {"--port", "--host", "-m", "--model"}
        clash = sorted(owned.intersection(self.args))
        if clash:
            raise ValueError(f"args must not set {', '.join(clash)}: use model.path, server.host and server.port")
        return self

    @classmethod
    def from_document(cls, document: Any) -> InstanceConfig:
        """Validate a parsed JSON document in either seed dialect (raises pydantic's ValidationError)."""
        return cls.model_validate(normalize_dialects(document))

    def model_path(self, config_dir: Path) -> Path:
        """The GGUF path, resolved relative to the folder that holds the config file (as the seeds use it)."""
        path = Path(self.model.path).expanduser()
        return path if path.is_absolute() else (config_dir / path).resolve()

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


# Seed 000 calls the health check `health` with longer names; seed 001 has `restart_policy` and `model.gpu_layers`.
_HEALTH_RENAMES = {"interval_seconds": "interval", "timeout_seconds": "timeout", "max_failures": "retries"}


def normalize_dialects(document: Any) -> Any:
    """Rewrite seed-dialect keys into the canonical form; anything else is left for validation to judge."""
    if not isinstance(document, dict):
        return document
    doc = dict(document)
    if "health" in doc:
        health = doc.pop("health")
        if isinstance(health, dict):
            health = {_HEALTH_RENAMES.get(k, k): v for k, v in health.items()}
        if "healthcheck" in doc and isinstance(doc["healthcheck"], dict) and isinstance(health, dict):
            health = {**health, **doc["healthcheck"]}
        doc["healthcheck"] = health
    if "restart_policy" in doc:
        legacy = doc.pop("restart_policy")
        if isinstance(legacy, dict):
            legacy = dict(legacy)
            enabled = legacy.pop("enabled", True)
            legacy.setdefault("policy", "on-failure" if enabled else "never")
        restart = doc.get("restart")
        doc["restart"] = {**legacy, **restart} if isinstance(restart, dict) and isinstance(legacy, dict) else legacy
    model = doc.get("model")
    if isinstance(model, dict) and "gpu_layers" in model:
        model = dict(model)
        layers = model.pop("gpu_layers")
        gpu = dict(doc.get("gpu") or {}) if isinstance(doc.get("gpu", {}), dict) else doc.get("gpu")
        if isinstance(gpu, dict):
            gpu.setdefault("layers", layers)
        doc["model"], doc["gpu"] = model, gpu
    logs = doc.get("logs")
    if isinstance(logs, dict) and ("stdout" in logs or "stderr" in logs):
        # Seed 001 lets a config name its log files; the home's layout (logs/<name>/) decides them here.
        doc["logs"] = {k: v for k, v in logs.items() if k not in ("stdout", "stderr")}
    return doc


def dialect_warnings(document: Any) -> list[str]:
    """Lint: keys that load but are the seeds' older spellings."""
    warnings: list[str] = []
    if not isinstance(document, dict):
        return warnings
    if "health" in document:
        warnings.append("`health` is the old spelling: use `healthcheck` {interval, timeout, retries, start_period}")
    if "restart_policy" in document:
        warnings.append("`restart_policy` is the old spelling: use `restart` {policy, max_retries, ...}")
    if isinstance(document.get("model"), dict) and "gpu_layers" in document["model"]:
        warnings.append("`model.gpu_layers` is the old spelling: use `gpu.layers`")
    logs = document.get("logs")
    if isinstance(logs, dict) and ("stdout" in logs or "stderr" in logs):
        warnings.append("`logs.stdout`/`logs.stderr` are ignored: logs always go to logs/<name>/ in the home")
    return warnings
