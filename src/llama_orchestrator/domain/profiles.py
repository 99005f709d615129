"""GPU devices, the backend `auto` resolves to, and the defaults of `init --profile` (SPEC §3 gpu, §10).

Pure: the devices come from ``adapters.gpus`` (llama-server --list-devices, nvidia-smi, rocm-smi, vulkaninfo); the
platform and core count are arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llama_orchestrator.domain.errors import UsageError

PROFILES = ("cpu", "vulkan", "cuda", "rocm", "metal", "auto")

# Vendor names as they appear in device names, and PCI vendor ids as vulkaninfo prints them.
_VENDOR_WORDS = {
    "nvidia": ("nvidia", "geforce", "quadro", "tesla", "rtx"),
    "amd": ("amd", "radeon", "instinct", "radv"),
    "intel": ("intel", "iris", "uhd graphics"),
    "apple": ("apple",),
}
PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x1022": "amd", "0x8086": "intel", "0x106b": "apple"}


@dataclass(frozen=True)
class GpuDevice:
    """One accelerator as one source saw it.

    ``backend`` is the API it was listed through: the llama-server device prefix (``Vulkan0`` -> vulkan, ``CUDA0``
    -> cuda, ``ROCm0`` -> rocm, ``MTL0`` -> metal), or the tool's (nvidia-smi -> cuda, rocm-smi -> rocm,
    vulkaninfo -> vulkan). ``index`` is the number that backend's visible-devices variable takes.
    """

    source: str
    backend: str
    name: str
    index: int | None = None
    id: str | None = None
    total_mib: int | None = None
    free_mib: int | None = None
    vendor: str | None = None

    def __post_init__(self) -> None:
        if self.vendor is None:
            object.__setattr__(self, "vendor", vendor_of(self.name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def vendor_of(name: str) -> str | None:
    lowered = f" {name.lower()} "
    for vendor, words in _VENDOR_WORDS.items():
        if any(word in lowered for word in words):
            return vendor
    return None


def auto_backend(devices: Iterable[GpuDevice], *, platform: str, available: Iterable[str] | None = None) -> str:
    """What ``gpu.backend: auto`` means on this machine.

    cuda for an NVIDIA card, rocm (when ROCm sees it) or vulkan for AMD, vulkan for other Vulkan GPUs (Intel),
    metal on macOS, else cpu. With ``available`` (the backends of the registered binaries), a backend no binary
    offers is skipped for the next choice: an NVIDIA card with only a Vulkan build gives vulkan.
    """
    devices = list(devices)
    vendors = {d.vendor for d in devices}
    backends = {d.backend for d in devices}
    candidates: list[str] = []
    if platform == "darwin" or "metal" in backends:
        candidates.append("metal")
    if "nvidia" in vendors or "cuda" in backends:
        candidates += ["cuda", "vulkan"]
    if "amd" in vendors or "rocm" in backends:
        candidates += ["rocm", "vulkan"] if "rocm" in backends else ["vulkan", "rocm"]
    if "vulkan" in backends:
        candidates.append("vulkan")
    allowed = None if available is None else set(available)
    for backend in candidates:
        if allowed is None or backend in allowed:
            return backend
    return "cpu"


def profile_defaults(
    profile: str, *, physical_cores: int, devices: Sequence[GpuDevice], platform: str = "linux"
) -> dict[str, Any]:
    """A partial config document for ``init --profile``; the user's explicit options are merged over it.

    threads = the physical core count (llama.cpp runs best without hyper-threads), gpu.layers = -1 (all) for a GPU
    profile and 0 for cpu, gpu.backend = the profile (``auto`` resolves from the devices). Where several devices of
    that backend exist, gpu.device_id picks the one with the most free memory.
    """
    if profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    backend = auto_backend(devices, platform=platform) if profile == "auto" else profile
    gpu: dict[str, Any] = {"backend": backend, "layers": 0 if backend == "cpu" else -1}
    device_id = _roomiest(devices, backend)
    if device_id is not None:
        gpu["device_id"] = device_id
    return {"model": {"threads": max(1, int(physical_cores))}, "gpu": gpu}


def _roomiest(devices: Sequence[GpuDevice], backend: str) -> int | None:
    matching = {d.index: d for d in devices if d.backend == backend and d.index is not None}
    if len(matching) < 2:
        return None  # one device (or none known): leave every device visible
    return max(matching.values(), key=lambda d: (d.free_mib or 0, -(d.index or 0))).index


def merge_under(defaults: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """``explicit`` over ``defaults``, nested dicts merged key by key; ``None`` in explicit means "not given"."""
    merged = dict(defaults)
    for key, value in explicit.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_under(merged[key], value)
        else:
            merged[key] = value
    return merged
