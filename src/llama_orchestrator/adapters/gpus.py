"""Which GPUs this machine has and how much memory is free (`llama-orch gpus`, `backend: auto`, `init --profile`).

Sources, each asked only where present: the llama-server binary's ``--list-devices`` (what that build can use),
``nvidia-smi``, ``rocm-smi`` and ``vulkaninfo --summary`` (what the hardware has). Every program runs through an
injectable ``Runner`` and ``which``, so tests feed recorded outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_orchestrator.adapters.binaries import Runner, library_env, parse_list_devices, run_command
from llama_orchestrator.domain.profiles import PCI_VENDORS, GpuDevice

NVIDIA_SMI_QUERY = ["--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"]
ROCM_SMI_QUERY = ["--showmeminfo", "vram", "--json"]
VULKANINFO_QUERY = ["--summary"]
_MIB = 1024 * 1024


@dataclass
class SourceResult:
    """What one source said: ``ok``, ``absent`` (program not installed) or ``failed`` with the reason."""

    source: str
    status: str
    devices: list[GpuDevice] = field(default_factory=list)
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "status": self.status,
            "detail": self.detail,
            "devices": [d.as_dict() for d in self.devices],
        }


@dataclass
class GpuReport:
    sources: list[SourceResult]

    @property
    def devices(self) -> list[GpuDevice]:
        return [d for s in self.sources for d in s.devices]

    def as_dict(self) -> dict[str, Any]:
        return {"devices": [d.as_dict() for d in self.devices], "sources": [s.as_dict() for s in self.sources]}


# -- parsers (recorded outputs in tests/test_gpus.py) ---------------------------------------------------------


def parse_nvidia_smi(text: str) -> list[GpuDevice]:
    """``0, NVIDIA H200, 143771, 143061`` lines (csv, noheader, nounits: MiB)."""
    devices = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        devices.append(
            GpuDevice(
                source="nvidia-smi",
                backend="cuda",
                name=parts[1],
                index=int(parts[0]),
                id=f"CUDA{parts[0]}",
                total_mib=_int_or_none(parts[2]),
                free_mib=_int_or_none(parts[3]),
                vendor="nvidia",
            )
        )
    return devices


def parse_rocm_smi(text: str) -> list[GpuDevice]:
    """``{"card0": {"VRAM Total Memory (B)": "17163091968", "VRAM Total Used Memory (B)": "1234"}}``."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    devices = []
    for card, info in sorted(data.items() if isinstance(data, dict) else []):
        if not card.startswith("card") or not isinstance(info, dict):
            continue
        index = _int_or_none(card.removeprefix("card"))
        total = _int_or_none(info.get("VRAM Total Memory (B)"))
        used = _int_or_none(info.get("VRAM Total Used Memory (B)"))
        name = info.get("Card series") or info.get("Card SKU") or f"AMD GPU {card}"
        devices.append(
            GpuDevice(
                source="rocm-smi",
                backend="rocm",
                name=str(name),
                index=index,
                id=f"ROCm{index}" if index is not None else card,
                total_mib=total // _MIB if total is not None else None,
                free_mib=(total - used) // _MIB if total is not None and used is not None else None,
                vendor="amd",
            )
        )
    return devices


def parse_vulkaninfo_summary(text: str) -> list[GpuDevice]:
    """The ``GPUn:`` blocks of ``vulkaninfo --summary``; software renderers (deviceType CPU, llvmpipe) are left
    out. vulkaninfo reports no free memory."""
    blocks: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("GPU") and line.endswith(":") and line[3:-1].isdigit():
            blocks.append({"index": line[3:-1]})
        elif blocks and "=" in line:
            key, _, value = line.partition("=")
            blocks[-1].setdefault(key.strip(), value.strip())
    devices = []
    for block in blocks:
        if block.get("deviceType", "").endswith("_CPU") or "deviceName" not in block:
            continue
        vendor = PCI_VENDORS.get(block.get("vendorID", "").lower())
        index = int(block["index"])
        devices.append(
            GpuDevice(
                source="vulkaninfo",
                backend="vulkan",
                name=block["deviceName"],
                index=index,
                id=f"Vulkan{index}",
                vendor=vendor,
            )
        )
    return devices


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None  # nvidia-smi prints "[N/A]" for what a card does not report


# -- detection ------------------------------------------------------------------------------------------------


def detect(
    binary: Path | None,
    *,
    runner: Runner | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> GpuReport:
    """Ask every source that is present. ``binary`` None: the llama-server source is reported absent."""
    run = runner or run_command
    sources = [_from_binary(binary, runner)]
    for program, query, parse in (
        ("nvidia-smi", NVIDIA_SMI_QUERY, parse_nvidia_smi),
        ("rocm-smi", ROCM_SMI_QUERY, parse_rocm_smi),
        ("vulkaninfo", VULKANINFO_QUERY, parse_vulkaninfo_summary),
    ):
        found = which(program)
        if not found:
            sources.append(SourceResult(program, "absent", detail="not installed"))
            continue
        result = run([found, *query])
        if result.returncode != 0:
            reason = (result.stderr or result.stdout or "").strip().splitlines()
            sources.append(
                SourceResult(
                    program, "failed", detail=f"exit {result.returncode}: {reason[-1] if reason else 'no output'}"
                )
            )
            continue
        sources.append(SourceResult(program, "ok", parse(result.stdout)))
    return GpuReport(sources)


def _from_binary(binary: Path | None, runner: Runner | None) -> SourceResult:
    if binary is None:
        return SourceResult("llama-server", "absent", detail="no llama-server found (see `llama-orch bins`)")
    if runner is None:
        env = library_env(binary, os.environ, platform=sys.platform)
        result = run_command([str(binary), "--list-devices"], env=env)
    else:
        result = runner([str(binary), "--list-devices"])
    if result.returncode != 0:
        return SourceResult("llama-server", "failed", detail=f"{binary} --list-devices: exit {result.returncode}")
    return SourceResult(
        "llama-server", "ok", parse_list_devices(f"{result.stdout}\n{result.stderr}"), detail=str(binary)
    )


def physical_cores() -> int:
    """Physical cores (llama.cpp's best thread count); the logical count where psutil cannot tell."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
