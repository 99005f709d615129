"""Daemon-wide settings: ``orchestrator.json`` in the home (optional; every field has a default)."""

from __future__ import annotations

import ipaddress
from typing import Literal

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
    # Browsers: see domain/web_access.py for why (DNS rebinding and cross-origin "simple" requests).
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the API answers to besides loopback and api.host (a wildcard bind adds this "
        'machine\'s names): exact names, "*.example.com" for subdomains, "*" for any',
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="web origins (scheme://host[:port]) other than the daemon's own that may call it from a "
        'browser; "*" for any. Default: none',
    )
    # 16 MiB holds a chat with a few base64 photos; what the router buffers per request (it reads "model" from the
    # body) is at most this, so a handful of oversized uploads at once stays within tens of MB.
    max_body_mb: float = Field(16, gt=0, description="largest request body accepted (413 beyond it)")
    header_timeout: float = Field(
        10, gt=0, description="seconds a client has to send a request's headers; a slower one is disconnected"
    )
    idle_timeout: float = Field(5, gt=0, description="seconds an idle keep-alive connection is kept open")

    @model_validator(mode="after")
    def _keys_beyond_loopback(self) -> ApiSettings:
        # Anyone on the network could start, stop and use models: binding beyond loopback needs a key.
        if self.enabled and not is_loopback(self.host) and not self.api_keys:
            raise ValueError(f"api.host {self.host} is reachable from other machines: set api.api_keys as well")
        return self

    @property
    def effective_control_keys(self) -> list[str]:
        return self.control_keys or self.api_keys

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class RouterSettings(_Strict):
    max_loaded: int | None = Field(None, ge=1, description="instances running at once; least recently used stopped")
    memory_budget_mb: float | None = Field(None, gt=0, description="estimated model memory allowed at once")
    start_timeout: float = Field(300, gt=0, description="seconds a request waits for an on-demand start")


class PeerConcurrency(_Strict):
    """A limit and a queue for one peer, with the fields and the rules of an instance's ``concurrency``: what
    `export kubernetes` writes for the router's peers (each instance's parallel slots and queue)."""

    limit: int = Field(ge=1, le=1024, description="requests at once relayed to that node")
    queue: int = Field(32, ge=0, le=100_000, description="requests that wait for a slot before the router answers 429")
    queue_timeout: float = Field(60, gt=0, le=3600, description="seconds a queued request waits before a 429")


class PeerSettings(_Strict):
    """Another node (issue 12): its router's models are merged into this one's /v1."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", description="the node's name: `NAME/model`")
    url: str = Field(pattern=r"^https?://", description="the node's daemon (or a llama-server): http://host:port")
    api_key: str | None = Field(None, description="Bearer key for that node's router (its api.api_keys)")
    aliases: list[str] = Field(default_factory=list, description="more names it serves (for a plain llama-server)")
    concurrency: PeerConcurrency | None = Field(
        None,
        description="a limit and queue here, as an instance has (absent: none; a daemon peer queues itself). "
        "For a plain llama-server, its --parallel slots",
    )


class Settings(_Strict):
    schema_ref: str | None = Field(None, alias="$schema", exclude=True)
    api: ApiSettings = Field(default_factory=ApiSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    peers: list[PeerSettings] = Field(
        default_factory=list, description="other nodes whose models this router serves too (`llama-orch nodes`)"
    )
    reload: Literal["auto", "manual"] = Field(
        "manual",
        description="auto: the daemon applies config changes itself (start new autostart instances, recreate "
        "changed ones, stop removed ones) 2 s after the last edit; manual: `ps` shows drift until `up` or "
        "`llama-orch daemon reload`",
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
