"""Daemon-wide settings: ``orchestrator.json`` in the home (optional; every field has a default)."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, model_validator

LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiSettings(_Strict):
    host: str = Field("127.0.0.1", description="address the daemon's HTTP API and router listen on")
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys accepted by the OpenAI router")
    control_keys: list[str] = Field(
        default_factory=list, description="Bearer keys for the control API (/api/...); default: the api_keys"
    )
    enabled: bool = Field(True, description="serve HTTP at all")

    @model_validator(mode="after")
    def _keys_beyond_loopback(self) -> ApiSettings:
        # Anyone on the network could start, stop and use models: binding beyond loopback needs a key.
        if self.enabled and not is_loopback(self.host) and not self.api_keys:
            raise ValueError(f"api.host {self.host} is reachable from other machines: set api.api_keys as well")
        return self

    @property
    def effective_control_keys(self) -> list[str]:
        return self.control_keys or self.api_keys


class RouterSettings(_Strict):
    max_loaded: int | None = Field(None, ge=1, description="instances running at once; least recently used stopped")
    memory_budget_mb: float | None = Field(None, gt=0, description="estimated model memory allowed at once")
    start_timeout: float = Field(300, gt=0, description="seconds a request waits for an on-demand start")


class Settings(_Strict):
    schema_ref: str | None = Field(None, alias="$schema", exclude=True)
    api: ApiSettings = Field(default_factory=ApiSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
